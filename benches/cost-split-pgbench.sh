#!/usr/bin/env bash
# Where a transaction-pooling proxy's CPU goes, pgprism beside PgBouncer, interleaved: for each
# target and round, pgbench -S through it, then per transaction its user-space and kernel CPU
# (utime and stime from /proc/PID/stat), its system calls and its context switches (perf stat
# of raw_syscalls:sys_enter and context-switches on the process) and the wake-ups it causes
# (sched:sched_waking, counted in the waker's context: a sleeping PostgreSQL backend or
# pgbench thread woken by a send on loopback costs the sender's kernel time) and its page
# faults (memory its allocator gave back and touched again is kernel time too). The kernel column is the
# part no user-space change can remove without sleeping less or making fewer system calls;
# against PgBouncer's total it says how far the issue's "CPU <= 0.85x PgBouncer" is reachable.
#
#   benches/cost-split-pgbench.sh                                   # 16 and 64 clients, 3 rounds
#   CLIENTS=16 ROUNDS=5 PRISM_ARGS="--config b.toml" benches/cost-split-pgbench.sh
#
# Settings (environment): CLIENTS="16 64", ROUNDS=3, DURATION=6, MODE=simple (pgbench -M),
# POOL_SIZE=20, POOL_MODE=transaction (pgprism --pool-mode; session to weigh what lending
# adds), SHARDS="0 1" (pgprism --shards, 0 = one per core; each is a target),
# PRISM_ARGS (more pgprism flags), PGPRISM (a prebuilt binary instead of cargo build --release),
# PACK=1 (one more target: the default shards with --client-placement pack), FLOOR=1 (one
# more target: the bytes-only floor of benches/floor-forwarder.rs, one server connection per
# client; FLOOR_BIN a prebuilt one).
# Needs perf, pgbench, PostgreSQL server binaries and pgbouncer. Prints the load average with
# the figures: the machine may be shared.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-"16 64"}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-6}
MODE=${MODE:-simple}
POOL_SIZE=${POOL_SIZE:-20}
POOL_MODE=${POOL_MODE:-transaction}
SHARDS=${SHARDS:-"0 1"}
PRISM_ARGS=${PRISM_ARGS:-}
if [ -z "${PGPRISM:-}" ]; then
  cargo build --release --quiet
  PGPRISM=$PWD/target/release/pgprism
fi
command -v perf >/dev/null || { echo "needs perf" >&2; exit 1; }
command -v pgbouncer >/dev/null || { echo "needs pgbouncer" >&2; exit 1; }
PACK=${PACK:-}
FLOOR=${FLOOR:-}
if [ -n "$FLOOR" ] && [ -z "${FLOOR_BIN:-}" ]; then
  FLOOR_BIN=$(cargo build --release --quiet --bench floor-forwarder --message-format=json |
    sed -n 's/.*"executable":"\([^"]*floor_forwarder[^"]*\)".*/\1/p' | tail -1)
fi
max_clients=0
for c in $CLIENTS; do [ "$c" -gt "$max_clients" ] && max_clients=$c; done
# The floor's clients are each a server connection, and two descriptors of the floor.
if [ -n "$FLOOR" ]; then
  export PG_MAX_CONNECTIONS=$((max_clients > 200 ? max_clients + 100 : 300))
  want_fds=$((max_clients * 3 + 1024))
  if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$want_fds" ]; then
    ulimit -n "$want_fds" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
  fi
fi
. benches/common.sh
PG_PORT=26551
start_pg primary "$PG_PORT"
pgbench -h 127.0.0.1 -p "$PG_PORT" -U postgres -i -s 10 -q postgres >/dev/null 2>&1

declare -A PORT PID
TARGETS=()
i=0
for s in $SHARDS; do
  name=pgprism-s$s
  port=$((26560 + i))
  a=(--primary "postgres://127.0.0.1:$PG_PORT" --pool-mode "$POOL_MODE" --pool-size "$POOL_SIZE" --auth-type trust)
  [ "$s" != 0 ] && a+=(--shards "$s")
  # shellcheck disable=SC2086 # PRISM_ARGS is an argument list
  start_pgprism "$port" "${a[@]}" $PRISM_ARGS
  TARGETS+=("$name"); PORT[$name]=$port; PID[$name]=$PRISM_PID
  i=$((i + 1))
done
if [ -n "$PACK" ]; then
  # shellcheck disable=SC2086 # PRISM_ARGS is an argument list
  start_pgprism 26569 --primary "postgres://127.0.0.1:$PG_PORT" --pool-mode "$POOL_MODE" \
    --pool-size "$POOL_SIZE" --auth-type trust $PRISM_ARGS --client-placement pack
  TARGETS+=(pgprism-pack); PORT[pgprism-pack]=26569; PID[pgprism-pack]=$PRISM_PID
fi
if [ -n "$FLOOR" ]; then
  "$FLOOR_BIN" 127.0.0.1:26568 "127.0.0.1:$PG_PORT" >"$WORK/floor.out" 2>&1 &
  PID[floor]=$!; PIDS+=("${PID[floor]}")
  wait_ready 26568
  TARGETS+=(floor); PORT[floor]=26568
fi
BOUNCER_PORT=26559
cat >"$WORK/pgbouncer.ini" <<INI
[databases]
postgres = host=127.0.0.1 port=$PG_PORT dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = 2100
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
INI
echo '"postgres" ""' >"$WORK/userlist.txt"
[ "$(id -u)" = 0 ] && chown postgres "$WORK"/pgbouncer.ini "$WORK"/userlist.txt
"${RUNAS[@]}" pgbouncer -d "$WORK/pgbouncer.ini" >/dev/null 2>&1
for _ in $(seq 50); do [ -s "$WORK/pgbouncer.pid" ] && break; sleep 0.1; done
PID[pgbouncer]=$(cat "$WORK/pgbouncer.pid"); PIDS+=("${PID[pgbouncer]}")
PORT[pgbouncer]=$BOUNCER_PORT
wait_ready "$BOUNCER_PORT"
TARGETS+=(pgbouncer)

utime() { awk '{print $14}' "/proc/$1/stat"; }
stime() { awk '{print $15}' "/proc/$1/stat"; }

echo "== pgbench -S -M $MODE, ${DURATION}s per run, $ROUNDS rounds, pool size $POOL_SIZE, nproc $(nproc), pgprism args: ${PRISM_ARGS:-(none)}"
echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-5s %-7s %-12s %8s %9s %9s %9s %9s %9s %9s %9s\n' round clients target tps user_us sys_us total_us syscalls ctx_sw wakeups faults
for r in $(seq "$ROUNDS"); do
  for c in $CLIENTS; do
    # Rotate the order per round: no target always runs first.
    n=${#TARGETS[@]}
    for k in $(seq 0 $((n - 1))); do
      t=${TARGETS[$(((k + r) % n))]}
      pid=${PID[$t]}
      u0=$(utime "$pid"); s0=$(stime "$pid")
      perf stat -e raw_syscalls:sys_enter,context-switches,sched:sched_waking,page-faults -p "$pid" -x, -o "$WORK/perf.csv" &
      perf_pid=$!
      out=$(pgbench -h 127.0.0.1 -p "${PORT[$t]}" -U postgres -n -S -M "$MODE" -c "$c" -j 2 -T "$DURATION" postgres 2>&1 || true)
      kill -INT "$perf_pid" 2>/dev/null || true
      wait "$perf_pid" 2>/dev/null || true
      u1=$(utime "$pid"); s1=$(stime "$pid")
      tps=$(echo "$out" | awk -F'= ' '/^tps/ {print $2+0}')
      txns=$(echo "$out" | awk -F': ' '/actually processed/ {split($2,a,"/"); print a[1]}')
      # The perf window is pgbench's whole run (connections included), like the CPU figures.
      sys=$(awk -F, '/raw_syscalls/ {print $1}' "$WORK/perf.csv")
      cs=$(awk -F, '/context-switches/ {print $1}' "$WORK/perf.csv")
      wk=$(awk -F, '/sched_waking/ {print $1}' "$WORK/perf.csv")
      pf=$(awk -F, '/page-faults/ {print $1}' "$WORK/perf.csv")
      awk -v r="$r" -v c="$c" -v t="$t" -v tps="$tps" -v n="${txns:-0}" -v hz="$HZ" \
        -v du=$((u1 - u0)) -v ds=$((s1 - s0)) -v sys="${sys:-0}" -v cs="${cs:-0}" -v wk="${wk:-0}" -v pf="${pf:-0}" 'BEGIN {
          if (n == 0) { printf "%-5s %-7s %-12s %8s failed\n", r, c, t, "-"; exit }
          u = du * 1e6 / hz / n; s = ds * 1e6 / hz / n
          printf "%-5s %-7s %-12s %8.0f %9.1f %9.1f %9.1f %9.2f %9.2f %9.2f %9.3f\n", r, c, t, tps, u, s, u + s, sys / n, cs / n, wk / n, pf / n
        }'
    done
  done
done
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
