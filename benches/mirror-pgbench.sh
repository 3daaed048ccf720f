#!/usr/bin/env bash
# pgbench -S and -N through pgprism with one mirror receiving every statement, beside pgprism
# without a mirror and direct PostgreSQL, then with the mirror stalled (its processes stopped
# with SIGSTOP: a mirror that accepts nothing more) and dead (server stopped). Prints TPS, the
# ratio to the healthy-mirror run, and pgprism's CPU microseconds per transaction.
#
#   benches/mirror-pgbench.sh            # 10 s per cell
#   DURATION=5 CLIENTS=16 benches/mirror-pgbench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-16}
SCALE=${SCALE:-10}
OUT=${OUT:-bench-results}
cargo build --release --quiet
PGPRISM=$PWD/target/release/pgprism
. benches/common.sh

echo "== setup: primary and mirror, scale $SCALE, $CLIENTS clients, ${DURATION}s per cell, $(nproc) cores"
start_pg primary 55511
start_pg mirror 55512
for port in 55511 55512; do pgbench -h 127.0.0.1 -p $port -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1; done
start_pgprism 55513 --primary postgres://127.0.0.1:55511
PLAIN_PID=$PRISM_PID
start_pgprism 55514 --primary postgres://127.0.0.1:55511 --mirror postgres://postgres@127.0.0.1:55512/postgres \
  --mirror-all-queries --mirror-retries 1000000 --retry-delay 100ms
MIRROR_PID=$PRISM_PID

mkdir -p "$OUT"
RESULT="$OUT/mirror-pgbench-$(date +%Y%m%d-%H%M%S).txt"
printf '%-6s %-22s %10s %12s %14s\n' load setup tps vs_healthy cpu_us_per_tx | tee "$RESULT"
row() { printf '%-6s %-22s %10.0f %12s %14s\n' "$1" "$2" "$TPS" "$3" "$CPU" | tee -a "$RESULT"; }
for load in S N; do
  args=(-"$load" -c "$CLIENTS" -j 2 -T "$DURATION")
  bench 55511 "" "${args[@]}"; row "-$load" direct "-"
  bench 55513 "$PLAIN_PID" "${args[@]}"; row "-$load" "pgprism, no mirror" "-"
  bench 55514 "$MIRROR_PID" "${args[@]}"; HEALTHY=$TPS; row "-$load" "pgprism + mirror" "1.00"
  stalled=$(pids_of_pg mirror)
  kill -STOP $stalled 2>/dev/null || true  # a backend may have exited meanwhile
  bench 55514 "$MIRROR_PID" "${args[@]}"
  row "-$load" "mirror stalled" "$(awk -v a="$TPS" -v b="$HEALTHY" 'BEGIN {printf "%.2f", a/b}')"
  kill -CONT $stalled 2>/dev/null || true
  "${RUNAS[@]}" "$BINDIR/pg_ctl" -D "$WORK/mirror" -m fast -w stop >/dev/null
  bench 55514 "$MIRROR_PID" "${args[@]}"
  row "-$load" "mirror dead" "$(awk -v a="$TPS" -v b="$HEALTHY" 'BEGIN {printf "%.2f", a/b}')"
  "${RUNAS[@]}" "$BINDIR/pg_ctl" -D "$WORK/mirror" -l "$WORK/mirror.log" -w \
    -o "-p 55512 -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off -c synchronous_commit=off" start >/dev/null
done
echo "== written to $RESULT"
