#!/usr/bin/env bash
# Interleaved A/B: two pgprism processes with different arguments in front of the same primary
# (and, with MIRROR=1, the same mirror), pgbench against each in turn, ROUNDS times. On a
# shared machine whose speed drifts by ±20% between runs, only alternating rounds resolve a
# difference of a few percent. Prints TPS and each pgprism's CPU microseconds per transaction.
#
#   A="" B="--mirror-flush-delay-us 20000" MIRROR=1 benches/ab-pgbench.sh
#   A="--mirror-latency-sample-every 1" B="" MIRROR=1 LOADS="S N" ROUNDS=5 benches/ab-pgbench.sh
#   PGPRISM_A=/tmp/pgprism-old A="" B="" benches/ab-pgbench.sh    # two builds
#   TRANSPORT=unix PGPRISM_A=/tmp/pgprism-old benches/ab-pgbench.sh
#   SHADOW=1 PGPRISM_A=/tmp/pgprism-old A="" B="" benches/ab-pgbench.sh  # compare mode
#   POOL=1 A="" B="--config b.toml" CLIENTS="16 64" benches/ab-pgbench.sh    # transaction pooling
#
# CLIENTS may list several client counts (each round runs every one); MODE is pgbench's -M
# (simple, extended, prepared). POOL=1 gives both `--pool-mode transaction --pool-size
# $POOL_SIZE --auth-type trust` (default pool size 20) before their own arguments.
#
# TRANSPORT=unix: pgbench reaches each pgprism, and each pgprism the primary, through Unix
# sockets (as in benches/proxy-pgbench.sh).
# With MIRROR=1 both get `--mirror <mirror> --mirror-all-queries` before their own arguments;
# with SHADOW=1, `--shadow <shadow>` (compare mode, report only).
#
# SPLIT=1 adds, per run, the arm's user and kernel CPU per transaction (utime and stime from
# /proc/PID/stat), and its system calls and context switches per transaction (perf stat of
# raw_syscalls:sys_enter and context-switches on the process, over pgbench's whole run):
# callgrind counts user-space instructions only, and a change that adds wake-ups shows here.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-3}
LOADS=${LOADS:-"S N"}
CLIENTS=${CLIENTS:-16}
SCALE=${SCALE:-10}
MIRROR=${MIRROR:-0}
SHADOW=${SHADOW:-0}
POOL=${POOL:-0}
POOL_SIZE=${POOL_SIZE:-20}
MODE=${MODE:-simple}
SPLIT=${SPLIT:-0}
TRANSPORT=${TRANSPORT:-tcp}
A=${A:-}
B=${B:-}
# PORT_BASE: the five ports used are PORT_BASE to PORT_BASE+4 (another run of this script
# on the machine needs another base).
PORT_BASE=${PORT_BASE:-55611}
P_PRIMARY=$PORT_BASE P_MIRROR=$((PORT_BASE + 1)) P_A=$((PORT_BASE + 2)) P_B=$((PORT_BASE + 3))
P_SHADOW=$((PORT_BASE + 4))
# Prebuilt binaries in both arms: no build (the tree may be mid-edit).
if [ -z "${PGPRISM_A:-}" ] || [ -z "${PGPRISM_B:-}" ]; then cargo build --release --quiet; fi
PGPRISM_A=${PGPRISM_A:-$PWD/target/release/pgprism}
PGPRISM_B=${PGPRISM_B:-$PWD/target/release/pgprism}
. benches/common.sh

start_pg primary $P_PRIMARY
pgbench -h 127.0.0.1 -p $P_PRIMARY -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
COMMON=(--primary postgres://127.0.0.1:$P_PRIMARY)
if [ "$TRANSPORT" = unix ]; then
  CLIENT_HOST=$WORK
  COMMON=(--primary "postgres://postgres@/postgres?host=$WORK&port=$P_PRIMARY" --unix-socket-dir "$WORK")
fi
if [ "$MIRROR" = 1 ]; then
  start_pg mirror $P_MIRROR
  pgbench -h 127.0.0.1 -p $P_MIRROR -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
  COMMON+=(--mirror postgres://postgres@127.0.0.1:$P_MIRROR/postgres --mirror-all-queries)
fi
if [ "$SHADOW" = 1 ]; then
  start_pg shadow $P_SHADOW
  pgbench -h 127.0.0.1 -p $P_SHADOW -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
  COMMON+=(--shadow postgres://postgres@127.0.0.1:$P_SHADOW/postgres --compare-report "$WORK/ab-mismatches.jsonl")
fi
if [ "$POOL" = 1 ]; then
  COMMON+=(--pool-mode transaction --pool-size "$POOL_SIZE" --auth-type trust)
fi
# shellcheck disable=SC2086 # A and B are argument lists
PGPRISM=$PGPRISM_A start_pgprism $P_A "${COMMON[@]}" $A
PID_A=$PRISM_PID
# shellcheck disable=SC2086
PGPRISM=$PGPRISM_B start_pgprism $P_B "${COMMON[@]}" $B
PID_B=$PRISM_PID
echo "== A: ${A:-(no extra arguments)}"
echo "== B: ${B:-(no extra arguments)}"
echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "$SPLIT" = 1 ]; then
  command -v perf >/dev/null || { echo "SPLIT=1 needs perf" >&2; exit 1; }
  printf '%-6s %-6s %-7s %-3s %10s %14s %8s %8s %9s %9s\n' round load clients arm tps cpu_us_per_tx user_us sys_us syscalls ctx_sw
else
  printf '%-6s %-6s %-7s %-3s %10s %14s\n' round load clients arm tps cpu_us_per_tx
fi
# Odd rounds run A first, even rounds B first: whatever the first run of a pair leaves
# behind (dirty pages, a checkpoint, autovacuum) does not always fall on the same arm.
run_arm() {
  if [ "$1" = A ]; then port=$P_A pid=$PID_A; else port=$P_B pid=$PID_B; fi
  if [ "$SPLIT" != 1 ]; then
    bench "$port" "$pid" -"$2" -M "$MODE" -c "$4" -j 2 -T "$DURATION"
    printf '%-6s %-6s %-7s %-3s %10.0f %14s\n' "$3" "-$2" "$4" "$1" "$TPS" "$CPU"
    return
  fi
  local u0 s0 u1 s1 perf_pid
  u0=$(awk '{print $14}' "/proc/$pid/stat"); s0=$(awk '{print $15}' "/proc/$pid/stat")
  perf stat -e raw_syscalls:sys_enter,context-switches -p "$pid" -x, -o "$WORK/perf.csv" &
  perf_pid=$!
  bench "$port" "$pid" -"$2" -M "$MODE" -c "$4" -j 2 -T "$DURATION"
  kill -INT "$perf_pid" 2>/dev/null || true
  wait "$perf_pid" 2>/dev/null || true
  u1=$(awk '{print $14}' "/proc/$pid/stat"); s1=$(awk '{print $15}' "/proc/$pid/stat")
  awk -v r="$3" -v l="-$2" -v c="$4" -v a="$1" -v tps="$TPS" -v cpu="$CPU" -v n="${TXNS:-0}" \
    -v hz="$HZ" -v du=$((u1 - u0)) -v ds=$((s1 - s0)) \
    -v sys="$(awk -F, '/raw_syscalls/ {print $1}' "$WORK/perf.csv")" \
    -v cs="$(awk -F, '/context-switches/ {print $1}' "$WORK/perf.csv")" 'BEGIN {
      if (n == 0) { printf "%-6s %-6s %-7s %-3s failed\n", r, l, c, a; exit }
      printf "%-6s %-6s %-7s %-3s %10.0f %14s %8.1f %8.1f %9.2f %9.2f\n", r, l, c, a, tps, cpu,
        du * 1e6 / hz / n, ds * 1e6 / hz / n, sys / n, cs / n
    }'
}
for r in $(seq "$ROUNDS"); do
  for load in $LOADS; do
    if [ $((r % 2)) = 1 ]; then order="A B"; else order="B A"; fi
    for c in $CLIENTS; do
      for arm in $order; do run_arm "$arm" "$load" "$r" "$c"; done
    done
  done
done
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
