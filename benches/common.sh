# Shared pieces of the benchmark scripts (sourced, not run): throw-away PostgreSQL servers in
# /dev/shm, CPU accounting from /proc, and pgbench result parsing.

BINDIR=$(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
HZ=$(getconf CLK_TCK)
WORK=$(mktemp -d /dev/shm/pgprism-bench.XXXXXX)
RUNAS=()
if [ "$(id -u)" = 0 ]; then RUNAS=(runuser -u postgres --); chown postgres "$WORK"; fi
PIDS=()
SERVERS=()
# Where pgbench and psql connect: 127.0.0.1, or a socket directory ($WORK) for Unix sockets.
CLIENT_HOST=${CLIENT_HOST:-127.0.0.1}

cleanup() {
  # A process that already died (a pgprism that refused its arguments) must not stop the
  # cleanup under set -e and leave the servers running.
  for p in "${PIDS[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
  for d in "${SERVERS[@]}"; do "${RUNAS[@]}" "$BINDIR/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# start_pg NAME PORT: initdb + start a server tuned for benchmarks (fsync off, data in RAM;
# max_connections $PG_MAX_CONNECTIONS, 300 unless set).
start_pg() {
  local dir="$WORK/$1"
  "${RUNAS[@]}" "$BINDIR/initdb" -D "$dir" -U postgres -A trust --no-sync >/dev/null
  "${RUNAS[@]}" "$BINDIR/pg_ctl" -D "$dir" -l "$WORK/$1.log" -w \
    -o "-p $2 -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=${PG_MAX_CONNECTIONS:-300} -c fsync=off -c synchronous_commit=off -c shared_buffers=256MB" \
    start >/dev/null
  SERVERS+=("$dir")
}

# pids_of_pg NAME: the postmaster and every backend of server NAME.
pids_of_pg() {
  local pm
  pm=$(head -1 "$WORK/$1/postmaster.pid")
  echo "$pm" $(pgrep -P "$pm")
}

# start_pgprism PORT ARGS...: runs pgprism proxy in the background, sets PRISM_PID.
start_pgprism() {
  local port=$1; shift
  "$PGPRISM" proxy --listen "127.0.0.1:$port" --admin "" --log warn "$@" >"$WORK/pgprism-$port.out" 2>"$WORK/pgprism-$port.err" &
  PRISM_PID=$!; PIDS+=("$PRISM_PID")
  wait_ready "$port"
}

wait_ready() {
  for _ in $(seq 100); do
    psql -h "$CLIENT_HOST" -p "$1" -U postgres -XAtc 'select 1' postgres >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "nothing answers on port $1" >&2; return 1
}

ticks() { # utime + stime of a pid, in clock ticks
  awk '{print $14 + $15}' "/proc/$1/stat"
}

# bench PORT PID ARGS...: runs pgbench, sets TPS, TXNS and CPU (us per transaction of PID, or -).
bench() {
  local port=$1 pid=$2; shift 2
  local before=0 after=0 out
  [ -n "$pid" ] && before=$(ticks "$pid")
  out=$(pgbench -h "$CLIENT_HOST" -p "$port" -U postgres -n "$@" postgres 2>&1)
  [ -n "$pid" ] && after=$(ticks "$pid")
  TPS=$(echo "$out" | awk -F'= ' '/^tps/ {print $2+0}')
  TXNS=$(echo "$out" | awk -F': ' '/actually processed/ {split($2,a,"/"); print a[1]}')
  CPU="-"
  [ -n "$pid" ] && [ -n "$TXNS" ] && [ "$TXNS" -gt 0 ] &&
    CPU=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$TXNS" 'BEGIN {printf "%.1f", t * 1e6 / hz / n}')
  return 0
}
