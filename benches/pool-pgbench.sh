#!/usr/bin/env bash
# Transaction pooling, side by side in one run: pgbench through pgprism (`--pool-mode
# transaction --pool-size N`) and through PgBouncer (`pool_mode = transaction`,
# `default_pool_size` the same), both with trust authentication, in front of one throw-away
# PostgreSQL, at several client counts and protocols (issue 14, "Tests and figures"). Prints a
# Markdown table: TPS, p99 latency, each proxy's CPU microseconds per transaction
# (utime+stime from /proc/PID/stat divided by transactions), the ratios to PgBouncer, and the
# failures. Debian's PgBouncer is 1.18, without `max_prepared_statements`: its prepared cells
# fail (pgbench aborts its clients on "prepared statement "P_0" already exists" or "... does not
# exist") and that is a row of the table, not an abort.
#
#   benches/pool-pgbench.sh                          # the default cells: 32 runs of 10 s, ~6 min
#   CLIENTS="16 64" DURATION=5 ROUNDS=1 benches/pool-pgbench.sh     # a minute after the build
#   SHARDS="0 1" benches/pool-pgbench.sh             # pgprism with one shard per core AND one
#   FLOOR=1 benches/pool-pgbench.sh                  # adds the bytes-only floor
#   POOL_FLOOR=1 MODES=simple benches/pool-pgbench.sh   # adds the pooled floor
#   MIRROR=1 FLOOR=1 benches/pool-pgbench.sh         # adds pooled mirrors and floor + mirror
#
# Settings (environment):
#   CLIENTS="16 64 512 2000"  pgbench client counts (-c); `ulimit -n` is raised to fit them
#   MODES="simple prepared"   pgbench protocols (-M): simple, extended, prepared
#   WORKLOAD=select           select: pgbench -S (select-only); tpcb: pgbench's default script
#   DURATION=10               seconds per pgbench run (-T)
#   ROUNDS=2                  runs per target and cell; targets alternate their order per round
#                             and the table shows the mean TPS, the total CPU over total
#                             transactions and the p99 of every transaction of every round
#   JOBS=2                    pgbench threads (-j)
#   POOL_SIZE=20              pgprism --pool-size and PgBouncer default_pool_size
#   POOL_MODE=transaction     pgprism's --pool-mode (`session` only to test the plumbing;
#                             PgBouncer stays in transaction mode)
#   SHARDS=0                  pgprism --shards, a list: 0 = pgprism's default, one per core;
#                             "0 1" runs both side by side
#   SHARED_DEPTH=             pool.shared-depth-max (pipelined lending), through a config file
#   PRISM_ARGS=               more flags for every pgprism
#   SCALE=10                  pgbench -i scale
#   FLOOR=1                   adds the floor (benches/floor-forwarder.rs): bytes only, one
#                             server connection per client, what the kernel alone costs a
#                             proxy per transaction (needs max_connections above the clients:
#                             PostgreSQL then gets max(300, largest CLIENTS + 100)). Targets
#                             with a server connection per client run CLIENTS/200 s longer
#                             (2,000 clients: 10 s), for PostgreSQL to fork the backends; the
#                             TPS is pgbench's "without initial connection time" everywhere
#   POOL_FLOOR=1              adds the pooled floor (floor-forwarder --pool POOL_SIZE): what
#                             every transaction pooler does at least, the floor answering the
#                             clients' startup itself and lending POOL_SIZE logged-in server
#                             connections (split over its loops, each lending its own) from the
#                             first byte of a request to the ReadyForQuery 'I' that ends it,
#                             by message headers alone. It maps no prepared statement: its
#                             `prepared` cells are skipped (a row says so)
#   FLOOR_THREADS=1           the event loops (--threads) of both floors: 2 lays them out as
#                             pgprism's default shards (one loop per core, SO_REUSEPORT, pinned)
#   MIRROR=1                  adds a second PostgreSQL as a mirror: pgprism with `--mirror ...
#                             --mirror-pool-size $MIRROR_POOL --mirror-all-queries` (its admin
#                             endpoint on, for the mirror's lag, the statements it was sent
#                             per transaction (-S: 1.00 when every one reaches it) and its
#                             skipped_* and units_lost counters) and, with
#                             FLOOR=1, the floor copying every client byte to the mirror
#   MIRROR_POOL=8             --mirror-pool-size
#   PG_MAX_CONNECTIONS=       max_connections of the servers (default 300, or as FLOOR says)
#   LATENCY_LOG=1             pgbench -l for the p99 (0: no log, no p99)
#   WARMUP=3                  seconds of unmeasured -S load per target before the cells
#   GRACE=120                 seconds a run may take beyond DURATION before it is killed
#                             (connecting 2,000 clients, a hung proxy): the row says "hung"
#   PGPRISM=, FLOOR_BIN=      prebuilt binaries instead of `cargo build --release`
#   OUT=bench-results         where the table, the raw runs and the processes' logs go
#   PORT_BASE=26400           ports PORT_BASE+1 to +39 (below the ephemeral range)
#
# p99: every transaction's latency from pgbench's per-transaction log (-l), the 99th
# percentile over all rounds of the cell. Mirror lag p99: from pgprism's admin `/metrics`
# histogram `pgprism_mirror_lag_seconds` (every message's queueing delay, read of the client's
# message to its write to the mirror), the difference of its buckets before and after each run
# summed over the cell's rounds; the table gives the upper bound of the bucket holding the 99th
# percentile and the share of messages that waited longer than 5 ms. Mirror lag max/s: the gauge
# `pgprism_mirror_lag_seconds_micro` (the longest queueing delay of each 1 s report interval),
# sampled once a second during the run; the table gives the p99 of those samples, an upper
# bound of the statements' lag p99. CPU per transaction counts the whole pgbench run, so at
# 2,000 clients it includes accepting and authenticating them (once per run, as PgBouncer's).
#
# Needs: PostgreSQL server binaries, pgbench, psql, curl (for MIRROR=1), pgbouncer (installed
# with apt-get when missing and running as root). Runs as root or as a normal user; the
# servers run as `postgres` when root.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-"16 64 512 2000"}
MODES=${MODES:-"simple prepared"}
WORKLOAD=${WORKLOAD:-select}
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-2}
JOBS=${JOBS:-2}
POOL_SIZE=${POOL_SIZE:-20}
POOL_MODE=${POOL_MODE:-transaction}
SHARDS=${SHARDS:-0}
SHARED_DEPTH=${SHARED_DEPTH:-}
PRISM_ARGS=${PRISM_ARGS:-}
SCALE=${SCALE:-10}
FLOOR=${FLOOR:-}
POOL_FLOOR=${POOL_FLOOR:-}
FLOOR_THREADS=${FLOOR_THREADS:-1}
MIRROR=${MIRROR:-}
MIRROR_POOL=${MIRROR_POOL:-8}
LATENCY_LOG=${LATENCY_LOG:-1}
WARMUP=${WARMUP:-3}
GRACE=${GRACE:-120}
OUT=${OUT:-bench-results}
PORT_BASE=${PORT_BASE:-26400}
[ "$FLOOR" = 0 ] && FLOOR=
[ "$POOL_FLOOR" = 0 ] && POOL_FLOOR=
[ "$MIRROR" = 0 ] && MIRROR=

case $WORKLOAD in
  select) WL=(-S) ;;
  tpcb) WL=() ;;
  *) echo "WORKLOAD must be select or tpcb, not '$WORKLOAD'" >&2; exit 2 ;;
esac
for m in $MODES; do
  case $m in simple | extended | prepared) ;; *) echo "MODES: '$m' is not simple, extended or prepared" >&2; exit 2 ;; esac
done
case $POOL_MODE in session | transaction) ;; *) echo "POOL_MODE must be session or transaction" >&2; exit 2 ;; esac
MAX_CLIENTS=$(printf '%s\n' $CLIENTS | sort -n | tail -1)

# The command line that reproduces this run, printed with the table.
COMMAND="CLIENTS=\"$CLIENTS\" MODES=\"$MODES\" WORKLOAD=$WORKLOAD DURATION=$DURATION ROUNDS=$ROUNDS POOL_SIZE=$POOL_SIZE SHARDS=\"$SHARDS\""
[ "$POOL_MODE" != transaction ] && COMMAND+=" POOL_MODE=$POOL_MODE"
[ -n "$SHARED_DEPTH" ] && COMMAND+=" SHARED_DEPTH=$SHARED_DEPTH"
[ -n "$PRISM_ARGS" ] && COMMAND+=" PRISM_ARGS=\"$PRISM_ARGS\""
[ "$SCALE" != 10 ] && COMMAND+=" SCALE=$SCALE"
[ "$JOBS" != 2 ] && COMMAND+=" JOBS=$JOBS"
[ -n "$FLOOR" ] && COMMAND+=" FLOOR=1"
[ -n "$POOL_FLOOR" ] && COMMAND+=" POOL_FLOOR=1"
[ -n "$FLOOR$POOL_FLOOR" ] && [ "$FLOOR_THREADS" != 1 ] && COMMAND+=" FLOOR_THREADS=$FLOOR_THREADS"
[ -n "$MIRROR" ] && COMMAND+=" MIRROR=1 MIRROR_POOL=$MIRROR_POOL"
COMMAND+=" benches/pool-pgbench.sh"

if ! command -v pgbouncer >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null || {
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null; }
  else
    echo "pgbouncer is not installed (apt-get install pgbouncer)" >&2; exit 1
  fi
fi
systemctl stop pgbouncer >/dev/null 2>&1 || true
if [ -n "$MIRROR" ] && ! command -v curl >/dev/null; then
  echo "MIRROR=1 reads pgprism's /metrics with curl, which is missing" >&2; exit 1
fi
if [ -z "${PGPRISM:-}" ]; then
  cargo build --release --quiet
  PGPRISM=$PWD/target/release/pgprism
fi
if [ -n "$FLOOR$POOL_FLOOR" ] && [ -z "${FLOOR_BIN:-}" ]; then
  FLOOR_BIN=$(cargo build --release --quiet --bench floor-forwarder --message-format=json |
    sed -n 's/.*"executable":"\([^"]*floor_forwarder[^"]*\)".*/\1/p' | tail -1)
fi
. benches/common.sh

mkdir -p "$OUT"
STAMP=$(date +%Y%m%d-%H%M%S)
RESULT="$OUT/pool-pgbench-$STAMP.md"
RAW="$OUT/pool-pgbench-$STAMP.runs.txt"
LOGS="$OUT/pool-pgbench-$STAMP.logs"
# The processes' logs outlive $WORK: pgprism's stderr is where a failure is explained.
save_logs() {
  rm -f "$WORK/pgbench.out"
  mkdir -p "$LOGS" && cp "$WORK"/*.err "$WORK"/*.out "$WORK"/*.log "$LOGS"/ 2>/dev/null || true
}
trap 'set +e; save_logs; cleanup' EXIT

# Clients, server connections and the floor's two connections per client need descriptors.
want_fds=$((MAX_CLIENTS * 3 + 1024))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$want_fds" ]; then
  ulimit -n "$want_fds" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
fi

# Every client of the floor (and of pgprism in session mode) is a server connection.
PG_MAX_CONNECTIONS=${PG_MAX_CONNECTIONS:-300}
# The pooled floor's POOL_SIZE come on top.
if [ -n "$FLOOR" ] || [ "$POOL_MODE" = session ]; then
  want=$((MAX_CLIENTS + 100)); [ -n "$POOL_FLOOR" ] && want=$((want + POOL_SIZE))
  [ "$PG_MAX_CONNECTIONS" -lt "$want" ] && PG_MAX_CONNECTIONS=$want
fi
# common.sh's start_pg with max_connections as given.
start_pg_max() {
  local dir="$WORK/$1"
  "${RUNAS[@]}" "$BINDIR/initdb" -D "$dir" -U postgres -A trust --no-sync >/dev/null
  "${RUNAS[@]}" "$BINDIR/pg_ctl" -D "$dir" -l "$WORK/$1.log" -w \
    -o "-p $2 -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=$PG_MAX_CONNECTIONS -c fsync=off -c synchronous_commit=off -c shared_buffers=256MB" \
    start >/dev/null
  SERVERS+=("$dir")
}

# start_prism PORT ADMIN ARGS...: like common.sh's start_pgprism, with the admin endpoint
# ADMIN (empty: off); returns 1 (and prints the end of its log) when it does not come up.
start_prism() {
  local port=$1 admin=$2; shift 2
  "$PGPRISM" proxy --listen "127.0.0.1:$port" --admin "$admin" --log warn "$@" \
    >"$WORK/pgprism-$port.out" 2>"$WORK/pgprism-$port.err" &
  PRISM_PID=$!; PIDS+=("$PRISM_PID")
  for _ in $(seq 100); do
    kill -0 "$PRISM_PID" 2>/dev/null || break
    psql -h "$CLIENT_HOST" -p "$port" -U postgres -XAtc 'select 1' postgres >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "   pgprism on port $port did not come up ($*):" >&2
  tail -5 "$WORK/pgprism-$port.err" | sed 's/^/     /' >&2
  kill "$PRISM_PID" 2>/dev/null || true
  return 1
}

PG_PORT=$((PORT_BASE + 1))
MIRROR_PORT=$((PORT_BASE + 2))
BOUNCER_PORT=$((PORT_BASE + 3))
FLOOR_PORT=$((PORT_BASE + 4))
FLOOR_MIRROR_PORT=$((PORT_BASE + 5))
POOL_FLOOR_PORT=$((PORT_BASE + 6))
BOUNCER_VERSION=$(pgbouncer --version 2>/dev/null | awk 'NR == 1 {print $2}')
CORES=$(nproc)
export PGSSLMODE=disable # no SSLRequest anywhere: the floor + mirror cannot answer one

echo "== setup: PostgreSQL $("$BINDIR/postgres" --version | awk '{print $3}') (max_connections $PG_MAX_CONNECTIONS), PgBouncer $BOUNCER_VERSION, scale $SCALE, workload $WORKLOAD, ${DURATION}s x $ROUNDS rounds per cell, nproc $CORES, ulimit -n $(ulimit -n)"
start_pg_max pg "$PG_PORT"
pgbench -h 127.0.0.1 -p "$PG_PORT" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
if [ -n "$MIRROR" ]; then
  start_pg_max mirror "$MIRROR_PORT"
  pgbench -h 127.0.0.1 -p "$MIRROR_PORT" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
fi

# The targets, in their order within a round.
TARGETS=()
declare -A PORT=() PID=() LABEL=() ADMIN=()
PRISM_CONFIG=()
if [ -n "$SHARED_DEPTH" ]; then
  printf '[pool]\nshared-depth-max = %s\n' "$SHARED_DEPTH" >"$WORK/pool.toml"
  PRISM_CONFIG=(--config "$WORK/pool.toml")
fi
# shellcheck disable=SC2206
EXTRA=($PRISM_ARGS)
prism_args() { # prism_args SHARDS: the flags of a pgprism target
  local a=(--primary "postgres://127.0.0.1:$PG_PORT" --pool-mode "$POOL_MODE" --pool-size "$POOL_SIZE" --auth-type trust)
  [ "$1" != 0 ] && a+=(--shards "$1")
  echo "${a[@]}" "${PRISM_CONFIG[@]}" "${EXTRA[@]}"
}
shard_label() { if [ "$1" = 0 ]; then echo "$CORES shards"; elif [ "$1" = 1 ]; then echo "1 shard"; else echo "$1 shards"; fi; }
i=0
for s in $SHARDS; do
  name=pgprism; [ "$s" != 0 ] && name=pgprism-s$s
  port=$((PORT_BASE + 10 + i))
  # shellcheck disable=SC2046
  start_prism "$port" "" $(prism_args "$s")
  TARGETS+=("$name"); PORT[$name]=$port; PID[$name]=$PRISM_PID
  LABEL[$name]="pgprism ($(shard_label "$s"))"
  i=$((i + 1))
done

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
max_client_conn = $((MAX_CLIENTS + 100 > 2100 ? MAX_CLIENTS + 100 : 2100))
ignore_startup_parameters = extra_float_digits
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
INI
echo '"postgres" ""' >"$WORK/userlist.txt"
[ "$(id -u)" = 0 ] && chown postgres "$WORK"/pgbouncer.ini "$WORK"/userlist.txt
# runuser's pam_limits puts the soft descriptor limit back to 1024: raise it for PgBouncer.
"${RUNAS[@]}" bash -c "ulimit -n $want_fds 2>/dev/null || ulimit -n \$(ulimit -Hn); exec pgbouncer -d '$WORK/pgbouncer.ini'" >/dev/null 2>&1
for _ in $(seq 50); do [ -s "$WORK/pgbouncer.pid" ] && break; sleep 0.1; done
BOUNCER_PID=$(cat "$WORK/pgbouncer.pid"); PIDS+=("$BOUNCER_PID")
wait_ready "$BOUNCER_PORT"
grep -m1 'file descriptor limit' "$WORK/pgbouncer.log" | sed 's/^.*LOG /   pgbouncer: /' || true
TARGETS+=(pgbouncer); PORT[pgbouncer]=$BOUNCER_PORT; PID[pgbouncer]=$BOUNCER_PID
LABEL[pgbouncer]="PgBouncer $BOUNCER_VERSION"

if [ -n "$FLOOR" ]; then
  "$FLOOR_BIN" --threads "$FLOOR_THREADS" "127.0.0.1:$FLOOR_PORT" "127.0.0.1:$PG_PORT" >"$WORK/floor.out" 2>&1 &
  PID[floor]=$!; PIDS+=("${PID[floor]}")
  wait_ready "$FLOOR_PORT"
  TARGETS+=(floor); PORT[floor]=$FLOOR_PORT; LABEL[floor]="floor (1 conn/client)"
  if [ "$FLOOR_THREADS" != 1 ]; then LABEL[floor]="floor ($FLOOR_THREADS threads, 1 conn/client)"; fi
fi
if [ -n "$POOL_FLOOR" ]; then
  "$FLOOR_BIN" --threads "$FLOOR_THREADS" --pool "$POOL_SIZE" --user postgres --database postgres \
    "127.0.0.1:$POOL_FLOOR_PORT" "127.0.0.1:$PG_PORT" >"$WORK/pool-floor.out" 2>&1 &
  PID[poolfloor]=$!; PIDS+=("${PID[poolfloor]}")
  wait_ready "$POOL_FLOOR_PORT"
  TARGETS+=(poolfloor); PORT[poolfloor]=$POOL_FLOOR_PORT
  LABEL[poolfloor]="pooled floor (1 thread, pool $POOL_SIZE)"
  if [ "$FLOOR_THREADS" != 1 ]; then LABEL[poolfloor]="pooled floor ($FLOOR_THREADS threads, pool $POOL_SIZE)"; fi
fi

if [ -n "$MIRROR" ]; then
  i=0
  for s in $SHARDS; do
    name=pgprism+mirror; [ "$s" != 0 ] && name=pgprism-s$s+mirror
    port=$((PORT_BASE + 20 + i)) admin=127.0.0.1:$((PORT_BASE + 30 + i))
    # shellcheck disable=SC2046
    if start_prism "$port" "$admin" $(prism_args "$s") \
      --mirror "postgres://postgres@127.0.0.1:$MIRROR_PORT/postgres" --mirror-pool-size "$MIRROR_POOL" \
      --mirror-all-queries --mirror-retries 1000000 --retry-delay 100ms; then
      TARGETS+=("$name"); PORT[$name]=$port; PID[$name]=$PRISM_PID; ADMIN[$name]=$admin
      LABEL[$name]="pgprism + mirror ($(shard_label "$s"), mirror pool $MIRROR_POOL)"
    else
      echo "   skipped: pgprism with --mirror-pool-size $MIRROR_POOL did not start (pooled mirrors not there yet?)" >&2
    fi
    i=$((i + 1))
  done
  if [ -n "$FLOOR" ]; then
    "$FLOOR_BIN" "127.0.0.1:$FLOOR_MIRROR_PORT" "127.0.0.1:$PG_PORT" "127.0.0.1:$MIRROR_PORT" >"$WORK/floor-mirror.out" 2>&1 &
    PID[floor+mirror]=$!; PIDS+=("${PID[floor+mirror]}")
    wait_ready "$FLOOR_MIRROR_PORT"
    TARGETS+=(floor+mirror); PORT[floor+mirror]=$FLOOR_MIRROR_PORT
    LABEL[floor+mirror]="floor + mirror (1+1 conn/client)"
  fi
fi

# Warm-up, not measured: first sessions, pools, buffers and allocator arenas.
for t in "${TARGETS[@]}"; do
  pgbench -h "$CLIENT_HOST" -p "${PORT[$t]}" -U postgres -n -S -c 16 -j 2 -T "$WARMUP" postgres >/dev/null 2>&1 || true
done

# The mirror's counters on an admin endpoint: "statements sent, skipped-statement and
# lost-unit counters summed".
mirror_counters() {
  curl -s --max-time 2 "http://$1/metrics" 2>/dev/null | awk '
    /^pgprism_mirror_statements_total/ {n += $2}
    /^pgprism_mirror_(skipped_[a-z_]*|units_lost)_total/ {s += $2}
    END {print n + 0, s + 0}' || true
}
# mirror_lag_buckets ADMIN: "LE COUNT" per bucket of the mirror lag histogram (summed over
# mirrors), LE in microseconds ("inf" last).
mirror_lag_buckets() {
  curl -s --max-time 2 "http://$1/metrics" 2>/dev/null | awk '
    /^pgprism_mirror_lag_seconds_bucket/ {
      match($0, /le="[^"]*"/); le = substr($0, RSTART + 4, RLENGTH - 5)
      k = (le == "+Inf") ? "inf" : sprintf("%d", le * 1e6 + 0.5)
      if (!(k in n)) order[++m] = k
      n[k] += $2 }
    END {for (i = 1; i <= m; i++) print order[i], n[order[i]]}' || true
}
# lag_p99 FILE: from "LE COUNT" lines (differences of runs, several per bucket), the bound of
# the bucket holding the 99th percentile in ms ("≤ B"), and the share above 5 ms in percent.
lag_p99() {
  awk '{if (!($1 in n)) order[++m] = $1; n[$1] += $2}
    END {
      total = n["inf"]; if (total <= 0) {print "- | -"; exit}
      for (i = 1; i <= m; i++) if (n[order[i]] >= 0.99 * total) {
        p = (order[i] == "inf") ? "> " order[i - 1] / 1000 : "≤ " order[i] / 1000; break }
      printf "%s | %.2f\n", p, 100 * (total - n["5000"]) / total }' "$1"
}
mirror_lag_us() {
  curl -s --max-time 1 "http://$1/metrics" 2>/dev/null |
    awk '/^pgprism_mirror_lag_seconds_micro/ {if ($2 > m) m = $2; n++} END {if (n) print m + 0}' || true
}
proc_ticks() { if [ -r "/proc/$1/stat" ]; then ticks "$1"; else echo -1; fi; }
# percentile P FILE: the P-th percentile of the numbers in FILE, one a line, or "-".
percentile() {
  sort -n "$2" | awk -v p="$1" '{a[NR] = $1} END {
    if (NR == 0) { print "-"; exit }
    i = int(NR * p / 100); if (i < NR * p / 100) i++; if (i < 1) i = 1
    print a[i] }'
}

# Aggregates per cell and target, keyed "clients|mode|target".
declare -A TPS_LIST=() TICKS=() TXNS_SUM=() FAILS=() DIED=() SKIPPED=() MIRRORED=() NOT_RUN=()
mkdir -p "$WORK/lat"

# run_one TARGET CLIENTS MODE ROUND: one pgbench run, added to the cell's aggregates.
run_one() {
  local t=$1 c=$2 mode=$3 r=$4
  local key="$c|$mode|$t" port=${PORT[$t]} pid=${PID[$t]} admin=${ADMIN[$t]:-}
  local prefix="$WORK/lat/run" out="$WORK/pgbench.out" rc=0 before after tps txns failed aborted errors err p99 counters_before="0 0"
  # One server connection per client: PostgreSQL forks a backend per client before the first
  # transaction (2,000 take about 8 s on 2 cores), inside pgbench's -T.
  local slack=0
  case $t in floor*) slack=$((c / 200)) ;; pgprism*) [ "$POOL_MODE" = session ] && slack=$((c / 200)) ;; esac
  local args=(-h "$CLIENT_HOST" -p "$port" -U postgres -n "${WL[@]}" -M "$mode" -c "$c" -j "$JOBS" -T $((DURATION + slack)))
  [ "$LATENCY_LOG" = 1 ] && args+=(-l --log-prefix "$prefix")
  rm -f "$prefix".*
  [ -n "$admin" ] && counters_before=$(mirror_counters "$admin") &&
    mirror_lag_buckets "$admin" >"$WORK/lat/buckets.before"
  before=$(proc_ticks "$pid")
  timeout -k 10 $((DURATION + slack + GRACE)) pgbench "${args[@]}" postgres >"$out" 2>&1 &
  local bp=$!
  if [ -n "$admin" ]; then
    while kill -0 "$bp" 2>/dev/null; do
      sleep 1
      mirror_lag_us "$admin" >>"$WORK/lat/$key.lag" || true
    done
  fi
  wait "$bp" || rc=$?
  after=$(proc_ticks "$pid")
  tps=$(awk -F'= ' '/^tps/ {print $2 + 0; exit}' "$out"); tps=${tps:-0}
  txns=$(awk -F': ' '/actually processed/ {split($2, a, "/"); print a[1] + 0}' "$out"); txns=${txns:-0}
  failed=$(awk -F': ' '/number of failed transactions/ {print $2 + 0}' "$out"); failed=${failed:-0}
  aborted=$(grep -cE 'client [0-9]+ (script [0-9]+ )?aborted' "$out" || true)
  # Errors a client went on after (pgbench logs a failed Parse and carries on: through
  # PgBouncer 1.18, "P_0" ends up prepared by some client on every server connection).
  errors=$(grep -c 'ERROR:' "$out" || true)
  # The first error, without pgbench's prefixes ("client 3 script 0 aborted in command 1 ...").
  err=$(grep -m1 -E 'ERROR|FATAL|error:|aborted' "$out" |
    sed -E 's/^.*(ERROR|FATAL): +//; s/^pgbench: error: //; s/  +/ /g' | cut -c1-90 || true)
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && err="hung: killed after $((DURATION + GRACE)) s${err:+; $err}"
  p99=-
  if [ "$LATENCY_LOG" = 1 ]; then
    cat "$prefix".* 2>/dev/null | awk '$3 ~ /^[0-9]+$/ {print $3}' >"$WORK/lat/one" || true
    cat "$WORK/lat/one" >>"$WORK/lat/$key.us"
    p99=$(percentile 99 "$WORK/lat/one")
    [ "$p99" != - ] && p99=$(awk -v u="$p99" 'BEGIN {printf "%.2f", u / 1000}')
    rm -f "$prefix".* "$WORK/lat/one"
  fi
  TPS_LIST[$key]="${TPS_LIST[$key]:-} $tps"
  TXNS_SUM[$key]=$((${TXNS_SUM[$key]:-0} + txns))
  if [ "$before" -ge 0 ] && [ "$after" -ge 0 ]; then
    TICKS[$key]=$((${TICKS[$key]:-0} + after - before))
  fi
  [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null && DIED[$key]=1
  [ "$txns" = 0 ] && [ -z "$err" ] && err="no transaction completed"
  if [ "$rc" != 0 ] || [ "$aborted" -gt 0 ] || [ "$failed" -gt 0 ] || [ "$errors" -gt 0 ] || [ "$txns" = 0 ]; then
    head -c 20000 "$out" >"$WORK/pgbench-$t-$c-$mode-r$r.out" # saved with the logs
    local f="pgbench rc $rc"
    [ "$aborted" -gt 0 ] && f+=", $aborted/$c clients aborted"
    [ "$failed" -gt 0 ] && f+=", $failed failed txns"
    [ "$errors" -gt "$aborted" ] && f+=", $errors errors"
    [ -n "$err" ] && f+=": $err"
    # Each distinct error once per cell.
    if [ -z "$err" ] || [[ "${FAILS[$key]:-}" != *"$err"* ]]; then
      FAILS[$key]="${FAILS[$key]:+${FAILS[$key]}; }r$r $f"
    fi
  fi
  if [ -n "$admin" ]; then
    # Shards send their counters to the admin endpoint once per metrics.report-interval-ms
    # (1 s): read right after pgbench, the endpoint missed up to a second of statements
    # (0.97 statements per transaction where every one was sent). Wait for a report that
    # comes after the run.
    sleep 1.2
    local counters_after
    counters_after=$(mirror_counters "$admin")
    mirror_lag_buckets "$admin" | awk 'NR == FNR {b[$1] = $2; next} {print $1, $2 - b[$1]}' \
      "$WORK/lat/buckets.before" - >>"$WORK/lat/$key.hist" || true
    MIRRORED[$key]=$((${MIRRORED[$key]:-0} + ${counters_after% *} - ${counters_before% *}))
    SKIPPED[$key]=$((${SKIPPED[$key]:-0} + ${counters_after#* } - ${counters_before#* }))
  fi
  local cpu=-
  [ "$before" -ge 0 ] && [ "$after" -ge 0 ] && [ -n "$pid" ] && [ "$txns" -gt 0 ] &&
    cpu=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$txns" 'BEGIN {printf "%.1f", t * 1e6 / hz / n}')
  printf '%-6s %-9s r%-2s %-22s tps %9.0f  p99 %7s ms  cpu %7s us/tx  rc %s%s\n' \
    "$c" "$mode" "$r" "$t" "$tps" "$p99" "$cpu" "$rc" "${err:+  [$err]}" | tee -a "$RAW"
  return 0
}

echo "== $COMMAND" | tee "$RAW"
echo "== targets: ${TARGETS[*]}" | tee -a "$RAW"
for c in $CLIENTS; do
  for mode in $MODES; do
    for r in $(seq "$ROUNDS"); do
      order=("${TARGETS[@]}")
      if [ $((r % 2)) = 0 ]; then
        order=(); for ((k = ${#TARGETS[@]} - 1; k >= 0; k--)); do order+=("${TARGETS[$k]}"); done
      fi
      for t in "${order[@]}"; do
        if [ "$t" = poolfloor ] && [ "$mode" = prepared ]; then
          NOT_RUN[$c|$mode|$t]="not run: the pooled floor maps no prepared statement (a named statement lives on one server connection, the client's next transaction may get another)"
          continue
        fi
        if [ -n "${DIED[$c|$mode|$t]:-}" ] || { [ -n "${PID[$t]:-}" ] && ! kill -0 "${PID[$t]}" 2>/dev/null; }; then
          FAILS[$c|$mode|$t]="process exited (log in $LOGS)"; DIED[$c|$mode|$t]=1; continue
        fi
        run_one "$t" "$c" "$mode" "$r"
      done
    done
  done
done

# The table.
mean() { awk '{s = 0; for (i = 1; i <= NF; i++) s += $i; if (NF) printf "%.0f", s / NF; else print 0}' <<<"$1"; }
cpu_of() { # cpu_of KEY: CPU us per transaction over every round, or "-"
  local k=$1
  if [ -n "${PID[${k##*|}]:-}" ] && [ -n "${TICKS[$k]:-}" ] && [ "${TXNS_SUM[$k]:-0}" -gt 0 ]; then
    awk -v t="${TICKS[$k]}" -v hz="$HZ" -v n="${TXNS_SUM[$k]}" 'BEGIN {printf "%.1f", t * 1e6 / hz / n}'
  else echo -; fi
}
ratio() { if [ "$1" = - ] || [ "$2" = - ] || [ "$2" = 0 ] || [ "$2" = 0.0 ]; then echo -; else awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; fi; }
failed_cell() { [ -n "${FAILS[$1]:-}" ] || [ -n "${DIED[$1]:-}" ]; }
{
  echo
  echo "pgbench ${WL[*]:-(tpcb-like)} through pgprism (--pool-mode $POOL_MODE --pool-size $POOL_SIZE) and PgBouncer $BOUNCER_VERSION (pool_mode = transaction, default_pool_size = $POOL_SIZE), ${DURATION} s x $ROUNDS rounds per cell, -j $JOBS, nproc $CORES ($(uname -r)), PostgreSQL max_connections $PG_MAX_CONNECTIONS."
  echo
  echo "Command: \`$COMMAND\`"
  echo
  hdr="| clients | mode | target | TPS | p99 ms | CPU µs/tx | TPS ÷ PgB | CPU ÷ PgB |"
  sep="|---:|---|---|---:|---:|---:|---:|---:|"
  [ -n "$FLOOR" ] && { hdr+=" CPU ÷ floor |"; sep+="---:|"; }
  [ -n "$POOL_FLOOR" ] && { hdr+=" CPU ÷ pooled floor |"; sep+="---:|"; }
  [ -n "$MIRROR" ] && { hdr+=" mirror stmts/tx | mirror lag p99 ms | lag > 5 ms % | lag max/s p99 ms | mirror skipped+lost |"; sep+="---:|---:|---:|---:|---:|"; }
  echo "$hdr failures |"
  echo "$sep---|"
  for c in $CLIENTS; do
    for mode in $MODES; do
      bk="$c|$mode|pgbouncer"
      btps=$(mean "${TPS_LIST[$bk]:-}"); bcpu=$(cpu_of "$bk")
      bfail=; failed_cell "$bk" && bfail=1
      for t in "${TARGETS[@]}"; do
        k="$c|$mode|$t"
        tps=$(mean "${TPS_LIST[$k]:-}"); cpu=$(cpu_of "$k")
        p99=-
        if [ -s "$WORK/lat/$k.us" ]; then
          p99=$(percentile 99 "$WORK/lat/$k.us"); p99=$(awk -v u="$p99" 'BEGIN {printf "%.2f", u / 1000}')
        fi
        [ -n "${NOT_RUN[$k]:-}" ] && tps=-
        if [ "$t" = pgbouncer ]; then rt=1.00 rc=1.00; [ -n "$bfail" ] && rt=- rc=-
        elif [ -n "${NOT_RUN[$k]:-}" ]; then rt=- rc=-
        elif [ -n "$bfail" ]; then rt="n/a" rc="n/a"
        else rt=$(ratio "$tps" "$btps"); rc=$(ratio "$cpu" "$bcpu"); fi
        row="| $c | $mode | ${LABEL[$t]} | $tps | $p99 | $cpu | $rt | $rc |"
        if [ -n "$FLOOR" ]; then
          fk="$c|$mode|floor"; case $t in *mirror) fk="$c|$mode|floor+mirror" ;; esac
          if [ -n "${PORT[${fk##*|}]:-}" ] && ! failed_cell "$fk"; then row+=" $(ratio "$cpu" "$(cpu_of "$fk")") |"; else row+=" - |"; fi
        fi
        if [ -n "$POOL_FLOOR" ]; then
          pk="$c|$mode|poolfloor"
          if [ -z "${NOT_RUN[$pk]:-}" ] && ! failed_cell "$pk"; then row+=" $(ratio "$cpu" "$(cpu_of "$pk")") |"; else row+=" - |"; fi
        fi
        if [ -n "$MIRROR" ]; then
          lag=- skipped=- mirrored=- hist="- | -"
          if [ -n "${ADMIN[$t]:-}" ]; then
            [ -s "$WORK/lat/$k.lag" ] && lag=$(awk -v u="$(percentile 99 "$WORK/lat/$k.lag")" 'BEGIN {printf "%.2f", u / 1000}')
            [ -s "$WORK/lat/$k.hist" ] && hist=$(lag_p99 "$WORK/lat/$k.hist")
            skipped=${SKIPPED[$k]:-0}
            [ "${TXNS_SUM[$k]:-0}" -gt 0 ] && mirrored=$(awk -v m="${MIRRORED[$k]:-0}" -v n="${TXNS_SUM[$k]}" 'BEGIN {printf "%.2f", m / n}')
          fi
          row+=" $mirrored | $hist | $lag | $skipped |"
        fi
        f=${FAILS[$k]:-}
        [ -n "${DIED[$k]:-}" ] && [ -z "$f" ] && f="process exited (log in $LOGS)"
        [ -n "${ADMIN[$t]:-}" ] && [ "${MIRRORED[$k]:-0}" = 0 ] && [ "${TXNS_SUM[$k]:-0}" -gt 0 ] &&
          f="${f:+$f; }the mirror was sent no statement"
        [ -n "$f" ] && f="fails: $f"
        [ -n "${NOT_RUN[$k]:-}" ] && f=${NOT_RUN[$k]}
        echo "$row ${f:--} |"
      done
    done
  done
  echo
} | tee "$RESULT"
echo "== table in $RESULT, every run in $RAW, the processes' logs in $LOGS"
