#!/usr/bin/env bash
# Where a pooling proxy's system calls and sleeps come from, per shard thread: for each
# pgprism target (one per entry of TARGETS, each with its own flags) and round, pgbench -S
# through it, then per transaction and per thread of the process: io_uring_enter calls,
# io_uring completions, context switches (perf stat --per-thread), voluntary and involuntary
# context switches (/proc/PID/task/TID/status), CPU (utime + stime of the thread), and the
# sessions each shard served (the admin endpoint's pgprism_connections_accepted_total).
#
#   PGPRISM=target/release/pgprism benches/shard-wakes.sh
#   TARGETS="pack:--client-placement=pack kernel:--client-placement=kernel" benches/shard-wakes.sh
#
# Settings (environment): CLIENTS="16 64", ROUNDS=2, DURATION=6, MODE=simple, POOL_SIZE=20,
# TARGETS="default:" (NAME:FLAGS, flags comma-separated), PGPRISM (a prebuilt binary instead
# of cargo build --release). Needs perf and pgbench. Prints the load average with the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-"16 64"}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-6}
MODE=${MODE:-simple}
POOL_SIZE=${POOL_SIZE:-20}
TARGETS_SPEC=${TARGETS:-"default:"}
if [ -z "${PGPRISM:-}" ]; then
  cargo build --release --quiet
  PGPRISM=$PWD/target/release/pgprism
fi
command -v perf >/dev/null || { echo "needs perf" >&2; exit 1; }
. benches/common.sh
PG_PORT=${PG_PORT:-26651}
start_pg primary "$PG_PORT"
pgbench -h 127.0.0.1 -p "$PG_PORT" -U postgres -i -s 10 -q postgres >/dev/null 2>&1

declare -A PORT PID ADMIN
TARGETS=()
i=0
for spec in $TARGETS_SPEC; do
  name=${spec%%:*}
  flags=${spec#*:}
  port=$((PG_PORT + 10 + i)); admin=$((PG_PORT + 30 + i))
  # shellcheck disable=SC2046 # flags are an argument list, comma-separated
  "$PGPRISM" proxy --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" --log warn \
    --primary "postgres://127.0.0.1:$PG_PORT" --pool-mode transaction --pool-size "$POOL_SIZE" \
    --auth-type trust $(echo "$flags" | tr ',' ' ') >"$WORK/p-$name.out" 2>"$WORK/p-$name.err" &
  PRISM_PID=$!; PIDS+=("$PRISM_PID")
  wait_ready "$port"
  TARGETS+=("$name"); PORT[$name]=$port; PID[$name]=$PRISM_PID; ADMIN[$name]=$admin
  i=$((i + 1))
done

# thread_snap PID: "TID comm ticks voluntary nonvoluntary cpu_ns wait_ns" per thread (the last
# two from /proc/.../schedstat: time on the core, time runnable waiting for it; their sum over
# the wall time is what placement's busy figure measures, see src/server/placement.rs).
thread_snap() {
  local pid=$1 t
  for t in /proc/"$pid"/task/*; do
    printf '%s %s %s %s %s %s\n' "${t##*/}" "$(cat "$t/comm")" \
      "$(awk '{print $14 + $15}' "$t/stat")" \
      "$(awk '/^voluntary_ctxt_switches/ {print $2}' "$t/status")" \
      "$(awk '/^nonvoluntary_ctxt_switches/ {print $2}' "$t/status")" \
      "$(awk '{print $1, $2}' "$t/schedstat")"
  done
}
accepted() { # per shard: connections served, handed to another shard, pooled clients moved in
  curl -s "http://127.0.0.1:$1/metrics" | awk -F'[{}" ]+' '
    /^pgprism_connections_accepted_total\{/ {a[$3] = $NF}
    /^pgprism_clients_handed_over_total\{/ {h[$3] = $NF}
    /^pgprism_clients_moved_in_total\{/ {m[$3] = $NF}
    END {for (s in a) print s, a[s], h[s] + 0, m[s] + 0}'
}

# Shards report once a second: without their first report the first run has no per-shard
# figures to start from.
sleep 1.5
echo "== pgbench -S -M $MODE, ${DURATION}s per run, $ROUNDS rounds, pool size $POOL_SIZE, nproc $(nproc)"
echo "== targets: $TARGETS_SPEC"
echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$ROUNDS"); do
  for c in $CLIENTS; do
    n=${#TARGETS[@]}
    for k in $(seq 0 $((n - 1))); do
      t=${TARGETS[$(((k + r) % n))]}
      pid=${PID[$t]}
      a0=$(accepted "${ADMIN[$t]}")
      thread_snap "$pid" >"$WORK/t0"
      w0=$(date +%s%N)
      perf stat --per-thread -e syscalls:sys_enter_io_uring_enter,io_uring:io_uring_complete,context-switches \
        -p "$pid" -x, -o "$WORK/perf.csv" &
      perf_pid=$!
      out=$(pgbench -h 127.0.0.1 -p "${PORT[$t]}" -U postgres -n -S -M "$MODE" -c "$c" -j 2 -T "$DURATION" postgres 2>&1 || true)
      kill -INT "$perf_pid" 2>/dev/null || true
      wait "$perf_pid" 2>/dev/null || true
      thread_snap "$pid" >"$WORK/t1"
      w1=$(date +%s%N)
      a1=$(accepted "${ADMIN[$t]}")
      tps=$(echo "$out" | awk -F'= ' '/^tps/ {print $2+0}')
      txns=$(echo "$out" | awk -F': ' '/actually processed/ {split($2,a,"/"); print a[1]}')
      echo "-- r$r $c clients $t: tps $tps, transactions ${txns:-0}, clients served (handed over, moved in) per shard: $(join -j1 <(echo "$a0" | sort) <(echo "$a1" | sort) | awk '{printf "s%s=%d (%d, %d) ", $1, $5 - $2, $6 - $3, $7 - $4}')"
      printf '   %-18s %8s %8s %8s %8s %8s %8s %10s %6s %6s\n' thread cpu_us enters compl comp/ent ctx_sw vol_cs invol_cs cpu% wait%
      # perf --per-thread lines: comm-tid,count,,event,...
      join -j1 <(sort "$WORK/t0") <(sort "$WORK/t1") | while read -r tid comm k0 v0 n0 c0 d0 _ k1 v1 n1 c1 d1; do
        ent=$(awk -F, -v tid="$tid" '$1 ~ "-"tid"$" && $4 ~ /io_uring_enter/ {print $2}' "$WORK/perf.csv")
        cmp=$(awk -F, -v tid="$tid" '$1 ~ "-"tid"$" && $4 ~ /io_uring_complete/ {print $2}' "$WORK/perf.csv")
        csw=$(awk -F, -v tid="$tid" '$1 ~ "-"tid"$" && $4 ~ /context-switches/ {print $2}' "$WORK/perf.csv")
        awk -v comm="$comm" -v n="${txns:-0}" -v hz="$HZ" -v dk=$((k1 - k0)) -v dv=$((v1 - v0)) -v dn=$((n1 - n0)) \
          -v ent="${ent:-0}" -v cmp="${cmp:-0}" -v csw="${csw:-0}" \
          -v dc=$((c1 - c0)) -v dd=$((d1 - d0)) -v dw=$((w1 - w0)) 'BEGIN {
            if (n == 0 || (dk == 0 && ent + 0 == 0 && dv == 0)) exit
            printf "   %-18s %8.2f %8.3f %8.3f %8.1f %8.3f %8.3f %10.3f %6.1f %6.1f\n", comm, dk * 1e6 / hz / n, ent / n, cmp / n,
              (ent > 0 ? cmp / ent : 0), csw / n, dv / n, dn / n, dc * 100 / dw, dd * 100 / dw
          }'
      done
    done
  done
done
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
