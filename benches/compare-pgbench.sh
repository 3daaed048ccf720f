#!/usr/bin/env bash
# pgbench -S directly, through pgprism as a plain proxy, in mirror mode (every statement
# replayed to a second server) and in compare mode (every statement run on a shadow and the
# results compared), in the same run. Prints TPS, the ratio to direct, and pgprism's CPU
# microseconds per transaction (utime+stime from /proc/PID/stat divided by transactions).
#
#   benches/compare-pgbench.sh
#   DURATION=5 CLIENTS="8" MODES=simple benches/compare-pgbench.sh
#   LOAD=-N SCALE=1 TARGETS=compare CLIENTS="8 64" benches/compare-pgbench.sh
#   LOAD= SCALE=1 TARGETS=compare benches/compare-pgbench.sh      (TPC-B)
#
# LOAD is pgbench's workload flag (-S, the default; -N; empty: TPC-B). A workload that writes
# must run through compare targets only (TARGETS), or the targets that write to the primary
# alone (direct, proxy) leave the shadow's data behind and compare reports that as it should.
# The inconclusive verdicts of the compare target are counted against its statements, by the
# reason the report names (see docs/compare.md, "Three verdicts").
#
# Needs PostgreSQL server binaries and pgbench. The servers run as `postgres` when root.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-15}
CLIENTS=${CLIENTS:-"8 32"}
MODES=${MODES:-"simple prepared"}
SCALE=${SCALE:-10}
LOAD=${LOAD--S}
LOAD_ARGS=(); [ -n "$LOAD" ] && LOAD_ARGS=("$LOAD")
TARGETS=${TARGETS:-"direct proxy mirror compare-unordered compare compare-pooled"}
# Statements a transaction of the workload sends: SELECT; BEGIN, 3 writes, SELECT, END;
# TPC-B's 2 more writes.
case "$LOAD" in -S) PER_TX=1 ;; -N) PER_TX=5 ;; *) PER_TX=7 ;; esac
COMPARED=0
SHARDS=${SHARDS:-$(nproc)}
BASE_PORT=${BASE_PORT:-55521}
OUT=${OUT:-bench-results}

BINDIR=$(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
cargo build --release --quiet
PGPRISM=$PWD/target/release/pgprism

WORK=$(mktemp -d /dev/shm/pgprism-cmp.XXXXXX)
RUNAS=()
if [ "$(id -u)" = 0 ]; then RUNAS=(runuser -u postgres --); chown postgres "$WORK"; fi
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  # A pgprism that exited early says why here.
  for f in "$WORK"/pgprism-*.err; do [ -s "$f" ] && { echo "== $f"; tail -5 "$f"; }; done
  for db in primary shadow; do
    "${RUNAS[@]}" "$BINDIR/pg_ctl" -D "$WORK/$db" -m immediate stop >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

PRIMARY_PORT=$BASE_PORT; SHADOW_PORT=$((BASE_PORT + 1))
PLAIN_PORT=$((BASE_PORT + 2)); MIRROR_PORT=$((BASE_PORT + 3)); COMPARE_PORT=$((BASE_PORT + 4))
UNORDERED_PORT=$((BASE_PORT + 5)); POOLED_PORT=$((BASE_PORT + 6))
# compare-pooled: compare mode on a pooled shadow (`--shadow-pool-size`): the sessions lease
# SHADOW_POOL shadow connections per transaction instead of one each.
SHADOW_POOL=${SHADOW_POOL:-8}
echo "== setup: PostgreSQL $("$BINDIR/postgres" --version | awk '{print $3}'), scale $SCALE, ${DURATION}s per cell, $(nproc) cores"
for db in primary shadow; do
  port=$PRIMARY_PORT; [ $db = shadow ] && port=$SHADOW_PORT
  "${RUNAS[@]}" "$BINDIR/initdb" -D "$WORK/$db" -U postgres -A trust --no-sync >/dev/null
  "${RUNAS[@]}" "$BINDIR/pg_ctl" -D "$WORK/$db" -l "$WORK/$db.log" -w \
    -o "-p $port -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off -c synchronous_commit=off -c shared_buffers=256MB" \
    start >/dev/null
  pgbench -h 127.0.0.1 -p "$port" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
done

start_prism() { # port, extra args...
  local port=$1; shift
  "$PGPRISM" proxy --listen "127.0.0.1:$port" --primary "postgres://127.0.0.1:$PRIMARY_PORT" \
    --shards "$SHARDS" --admin "" --log warn "$@" >"$WORK/pgprism-$port.out" 2>"$WORK/pgprism-$port.err" &
  PIDS+=("$!")
  echo "$!"
}
SHADOW_URL="postgres://postgres@127.0.0.1:$SHADOW_PORT/postgres"
PLAIN_PID=$(start_prism "$PLAIN_PORT")
MIRROR_PID=$(start_prism "$MIRROR_PORT" --mirror "$SHADOW_URL" --mirror-all-queries)
# Slow-query EXPLAINs off the measured path: on 2 shared cores scheduling noise alone makes
# statements "5x slower" on one side, and each EXPLAIN opens two connections.
COMPARE_PID=$(start_prism "$COMPARE_PORT" --shadow "$SHADOW_URL" --compare-report "$WORK/mismatches.jsonl" \
  --slow-query-min-ms 60000)
# compare-unordered: compare mode without the ordered shadow dispatch (compare.order-wait-ms
# = 0, as before issue 15), for the cost of ordering in the same run.
UNORDERED_PID=$(start_prism "$UNORDERED_PORT" --shadow "$SHADOW_URL" --compare-report "$WORK/unordered.jsonl" \
  --slow-query-min-ms 60000 --compare-order-wait-ms 0)
POOLED_PID=$(start_prism "$POOLED_PORT" --shadow "$SHADOW_URL" --compare-report "$WORK/pooled.jsonl" \
  --slow-query-min-ms 60000 --shadow-pool-size "$SHADOW_POOL")
PIDS+=("$PLAIN_PID" "$MIRROR_PID" "$COMPARE_PID" "$UNORDERED_PID" "$POOLED_PID")
for port in "$PLAIN_PORT" "$MIRROR_PORT" "$COMPARE_PORT" "$UNORDERED_PORT" "$POOLED_PORT"; do
  for _ in $(seq 100); do
    psql -h 127.0.0.1 -p "$port" -U postgres -XAtc 'select 1' postgres >/dev/null 2>&1 && break
    sleep 0.1
  done
done

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
mkdir -p "$OUT"
RESULT="$OUT/compare-pgbench-$(date +%Y%m%d-%H%M%S).txt"
printf '%-9s %-8s %-17s %12s %9s %14s\n' mode clients target tps vs_direct cpu_us_per_tx | tee "$RESULT"
for mode in $MODES; do
  for c in $CLIENTS; do
    declare -A TPS=()
    for target in $TARGETS; do
      case $target in
        direct) port=$PRIMARY_PORT; pid="" ;;
        proxy) port=$PLAIN_PORT; pid=$PLAIN_PID ;;
        mirror) port=$MIRROR_PORT; pid=$MIRROR_PID ;;
        compare) port=$COMPARE_PORT; pid=$COMPARE_PID ;;
        compare-unordered) port=$UNORDERED_PORT; pid=$UNORDERED_PID ;;
        compare-pooled) port=$POOLED_PORT; pid=$POOLED_PID ;;
      esac
      before=0; [ -n "$pid" ] && before=$(ticks "$pid")
      out=$(pgbench -h 127.0.0.1 -p "$port" -U postgres -n "${LOAD_ARGS[@]}" -M "$mode" -c "$c" -j 2 -T "$DURATION" postgres 2>&1)
      after=0; [ -n "$pid" ] && after=$(ticks "$pid")
      tps=$(echo "$out" | awk -F'= ' '/^tps/ {print $2+0}')
      txns=$(echo "$out" | awk -F': ' '/actually processed/ {split($2,a,"/"); print a[1]}')
      TPS[$target]=$tps
      ratio=$(awk -v a="$tps" -v b="${TPS[direct]:-0}" 'BEGIN {if (b > 0) printf "%.2f", a/b; else print "-"}')
      [ "$target" = compare ] && COMPARED=$((COMPARED + txns * PER_TX))
      cpu="-"
      [ -n "$pid" ] && cpu=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$txns" 'BEGIN {printf "%.1f", t * 1e6 / hz / n}')
      printf '%-9s %-8s %-17s %12.0f %9s %14s\n' "$mode" "$c" "$target" "$tps" "$ratio" "$cpu" | tee -a "$RESULT"
    done
  done
done
mismatches=$(grep -c '"record":"mismatch"' "$WORK/mismatches.jsonl" 2>/dev/null || true)
slow=$(grep -c '"record":"slow"' "$WORK/mismatches.jsonl" 2>/dev/null || true)
inconclusive=$(grep -c '"record":"inconclusive"' "$WORK/mismatches.jsonl" 2>/dev/null || true)
reasons=$(grep '"record":"inconclusive"' "$WORK/mismatches.jsonl" 2>/dev/null | grep -o '"reason":"[a-z_ ]*"' | sort | uniq -c | tr -s ' \n' ' ' || true)
echo "== compare mode: ${inconclusive:-0} inconclusive in about $COMPARED statements ($(awk -v i="${inconclusive:-0}" -v n="$COMPARED" 'BEGIN {if (n > 0) printf "%.3f", 100 * i / n; else print "-"}')%; by reason:${reasons:- none})"
echo "== compare mode: ${mismatches:-0} mismatch reports (expected 0: both servers were initialised the same), ${slow:-0} slow-query reports (bounded by compare.explains-max per shard)"
pooled=$(grep -c '"record":"mismatch"' "$WORK/pooled.jsonl" 2>/dev/null || true)
echo "== compare-pooled (shadow pool $SHADOW_POOL): ${pooled:-0} mismatch reports (expected 0)"
echo "== written to $RESULT"
