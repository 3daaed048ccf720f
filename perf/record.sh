#!/usr/bin/env bash
# Profiles pgprism under a pgbench load and prints where the CPU goes (user and kernel).
#
#   perf/record.sh                     # proxy, pgbench -S, 16 clients, 8 s
#   MODE=mirror perf/record.sh         # with one mirror receiving every statement
#   MODE=compare perf/record.sh        # with a shadow: every statement compared
#   PGBENCH_ARGS="-N -c 8" perf/record.sh
#
# Needs perf (apt-get install linux-perf). Writes perf-results/pgprism.data; open it with
# `perf report -i perf-results/pgprism.data` (add -g for call graphs).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${MODE:-proxy}
DURATION=${DURATION:-8}
PGBENCH_ARGS=${PGBENCH_ARGS:-"-S -c 16 -j 2"}
cargo build --profile profiling --quiet
PGPRISM=$PWD/target/profiling/pgprism
. benches/common.sh
start_pg primary 55521
pgbench -h 127.0.0.1 -p 55521 -U postgres -i -s 10 -q postgres >/dev/null 2>&1
extra=()
if [ "$MODE" = mirror ] || [ "$MODE" = compare ]; then
  start_pg second 55522
  pgbench -h 127.0.0.1 -p 55522 -U postgres -i -s 10 -q postgres >/dev/null 2>&1
  if [ "$MODE" = mirror ]; then
    extra=(--mirror postgres://postgres@127.0.0.1:55522/postgres --mirror-all-queries)
  else
    extra=(--shadow postgres://postgres@127.0.0.1:55522/postgres --compare-report "$WORK/compare.jsonl")
  fi
fi
start_pgprism 55523 --primary postgres://127.0.0.1:55521 "${extra[@]}"
mkdir -p perf-results
# shellcheck disable=SC2086
pgbench -h 127.0.0.1 -p 55523 -U postgres -n $PGBENCH_ARGS -T "$DURATION" postgres >perf-results/pgbench.txt 2>&1 &
PGBENCH_PID=$!
sleep 1
perf record -g -p "$PRISM_PID" -o perf-results/pgprism.data -- sleep $((DURATION - 2)) 2>/dev/null
wait "$PGBENCH_PID"
grep -E "^tps|processed" perf-results/pgbench.txt
perf report -i perf-results/pgprism.data --no-children --sort dso,symbol 2>/dev/null |
  grep -v '^#' | grep '%' | grep -v '^ *|' | grep -v -- '--' | head -30
