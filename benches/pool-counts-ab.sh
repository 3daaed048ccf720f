#!/usr/bin/env bash
# The pool's own counts per transaction for two pgprism builds (or two argument lists),
# interleaved: pgbench -S through each in turn, and from each one's /metrics before and after,
# lends, pipelines started, shared units and the writes that carried them, wait time and
# server connections opened, each divided by the transactions. Counts hold up on a shared
# machine where CPU totals do not (other builds on the same 2 cores): give the load average
# with them, which the script prints.
#
#   PGPRISM_A=/tmp/pgprism-old PGPRISM_B=target/release/pgprism CLIENTS="64 512" \
#     benches/pool-counts-ab.sh
#
# Settings (environment): PGPRISM_A, PGPRISM_B (default: target/release/pgprism, built),
# A, B (more flags per arm), CLIENTS="64 512", ROUNDS=2, DURATION=6, MODE=simple (pgbench -M),
# POOL_SIZE=20, DEPTH=8 (pool.shared-depth-max of both, through a config file). Needs curl.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-"64 512"}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-6}
MODE=${MODE:-simple}
POOL_SIZE=${POOL_SIZE:-20}
DEPTH=${DEPTH:-8}
A=${A:-}
B=${B:-}
if [ -z "${PGPRISM_A:-}" ] || [ -z "${PGPRISM_B:-}" ]; then cargo build --release --quiet; fi
PGPRISM_A=${PGPRISM_A:-$PWD/target/release/pgprism}
PGPRISM_B=${PGPRISM_B:-$PWD/target/release/pgprism}
command -v curl >/dev/null || { echo "needs curl" >&2; exit 1; }
. benches/common.sh

start_pg primary 26651
pgbench -h 127.0.0.1 -p 26651 -U postgres -i -s 10 -q postgres >/dev/null 2>&1
printf '[pool]\nshared-depth-max = %s\n' "$DEPTH" >"$WORK/pool.toml"
declare -A PORT ADMIN PID
i=0
for arm in A B; do
  if [ "$arm" = A ]; then bin=$PGPRISM_A extra=$A; else bin=$PGPRISM_B extra=$B; fi
  PORT[$arm]=$((26660 + i)); ADMIN[$arm]=$((26670 + i))
  # shellcheck disable=SC2086 # extra is an argument list
  "$bin" proxy --listen "127.0.0.1:${PORT[$arm]}" --admin "127.0.0.1:${ADMIN[$arm]}" --log warn \
    --primary postgres://127.0.0.1:26651 --pool-mode transaction --pool-size "$POOL_SIZE" \
    --auth-type trust --config "$WORK/pool.toml" $extra >"$WORK/pgprism-$arm.out" 2>&1 &
  PID[$arm]=$!; PIDS+=("$!")
  wait_ready "${PORT[$arm]}"
  i=$((i + 1))
done

KEYS="lends pipelines shared_units shared_writes wait_us servers_opened"
# metric ADMIN_PORT KEY: pgprism_pool_KEY_total summed over its labels.
metric() {
  curl -s --max-time 2 "http://127.0.0.1:$1/metrics" |
    awk -v k="pgprism_pool_$2_total" '$1 == k || index($1, k "{") == 1 {s += $NF} END {printf "%d", s}'
}

echo "== pgbench -S -M $MODE, ${DURATION}s per run, pool size $POOL_SIZE, shared-depth-max $DEPTH"
echo "== A: $PGPRISM_A ${A:-(no extra arguments)}"
echo "== B: $PGPRISM_B ${B:-(no extra arguments)}"
echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-5s %-7s %-3s %8s %7s' round clients arm tps cpu_us
for k in $KEYS; do printf ' %14s' "$k/tx"; done
echo
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then order="A B"; else order="B A"; fi
  for c in $CLIENTS; do
    for arm in $order; do
      declare -A before=()
      # Counters are published by the shards every 250 ms: read them settled.
      sleep 0.6
      for k in $KEYS; do before[$k]=$(metric "${ADMIN[$arm]}" "$k"); done
      bench "${PORT[$arm]}" "${PID[$arm]}" -S -M "$MODE" -c "$c" -j 2 -T "$DURATION"
      sleep 0.6
      printf '%-5s %-7s %-3s %8.0f %7s' "$r" "$c" "$arm" "$TPS" "$CPU"
      for k in $KEYS; do
        after=$(metric "${ADMIN[$arm]}" "$k")
        printf ' %14s' "$(awk -v a="$after" -v b="${before[$k]}" -v t="${TXNS:-0}" \
          'BEGIN { if (t > 0) printf "%.4f", (a - b) / t; else print "-" }')"
      done
      echo
    done
  done
done
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
