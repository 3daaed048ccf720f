#!/usr/bin/env bash
# pgbench -S through pgprism beside direct PostgreSQL and PgBouncer (session pool mode), in the
# same run, on this machine. Prints TPS, the ratio to direct, and each proxy's CPU microseconds
# per transaction (utime+stime from /proc/PID/stat divided by transactions).
#
#   benches/proxy-pgbench.sh                 # 15 s per cell
#   DURATION=5 CLIENTS="16" benches/proxy-pgbench.sh
#   SHARDS=2 MODES="simple prepared" benches/proxy-pgbench.sh
#
# Needs: PostgreSQL server binaries, pgbench, pgbouncer (installed with apt-get when missing and
# running as root). Runs as root or as a normal user; the servers run as `postgres` when root.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-15}
CLIENTS=${CLIENTS:-"16 64"}
MODES=${MODES:-"simple prepared"}
SCALE=${SCALE:-10}
SHARDS=${SHARDS:-$(nproc)}
PG_PORT=${PG_PORT:-55501}
PRISM_PORT=${PRISM_PORT:-55502}
BOUNCER_PORT=${BOUNCER_PORT:-55503}
OUT=${OUT:-bench-results}

BINDIR=$(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
if ! command -v pgbouncer >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null || {
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null; }
  else
    echo "pgbouncer is not installed (apt-get install pgbouncer)" >&2; exit 1
  fi
fi
systemctl stop pgbouncer >/dev/null 2>&1 || true

cargo build --release --quiet
PGPRISM=$PWD/target/release/pgprism

WORK=$(mktemp -d /dev/shm/pgprism-bench.XXXXXX)
RUNAS=()
if [ "$(id -u)" = 0 ]; then RUNAS=(runuser -u postgres --); chown postgres "$WORK"; fi
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  "${RUNAS[@]}" "$BINDIR/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== setup: PostgreSQL $("$BINDIR/postgres" --version | awk '{print $3}'), scale $SCALE, ${DURATION}s per cell, $(nproc) cores"
"${RUNAS[@]}" "$BINDIR/initdb" -D "$WORK/pg" -U postgres -A trust --no-sync >/dev/null
"${RUNAS[@]}" "$BINDIR/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w \
  -o "-p $PG_PORT -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off -c synchronous_commit=off -c shared_buffers=256MB" \
  start >/dev/null
pgbench -h 127.0.0.1 -p "$PG_PORT" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1

"$PGPRISM" proxy --listen "127.0.0.1:$PRISM_PORT" --primary "postgres://127.0.0.1:$PG_PORT" \
  --shards "$SHARDS" --admin "" --log warn >"$WORK/pgprism.out" 2>"$WORK/pgprism.err" &
PRISM_PID=$!; PIDS+=("$PRISM_PID")

cat >"$WORK/pgbouncer.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$PG_PORT dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = session
max_client_conn = 1000
default_pool_size = 200
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
EOF
echo '"postgres" ""' >"$WORK/userlist.txt"
[ "$(id -u)" = 0 ] && chown postgres "$WORK"/pgbouncer.ini "$WORK"/userlist.txt
"${RUNAS[@]}" pgbouncer -d "$WORK/pgbouncer.ini" >/dev/null 2>&1
for _ in $(seq 50); do [ -s "$WORK/pgbouncer.pid" ] && break; sleep 0.1; done
BOUNCER_PID=$(cat "$WORK/pgbouncer.pid"); PIDS+=("$BOUNCER_PID")

for port in "$PRISM_PORT" "$BOUNCER_PORT"; do
  for _ in $(seq 100); do
    psql -h 127.0.0.1 -p "$port" -U postgres -XAtc 'select 1' postgres >/dev/null 2>&1 && break
    sleep 0.1
  done
done

ticks() { # utime + stime of a pid, in clock ticks
  awk '{print $14 + $15}' "/proc/$1/stat"
}
HZ=$(getconf CLK_TCK)

mkdir -p "$OUT"
RESULT="$OUT/proxy-pgbench-$(date +%Y%m%d-%H%M%S).txt"
printf '%-9s %-8s %-10s %12s %9s %14s\n' mode clients target tps vs_direct cpu_us_per_tx | tee "$RESULT"
for mode in $MODES; do
  for c in $CLIENTS; do
    declare -A TPS=()
    for target in direct pgprism pgbouncer; do
      case $target in
        direct) port=$PG_PORT; pid="" ;;
        pgprism) port=$PRISM_PORT; pid=$PRISM_PID ;;
        pgbouncer) port=$BOUNCER_PORT; pid=$BOUNCER_PID ;;
      esac
      before=0; [ -n "$pid" ] && before=$(ticks "$pid")
      out=$(pgbench -h 127.0.0.1 -p "$port" -U postgres -n -S -M "$mode" -c "$c" -j 2 -T "$DURATION" postgres 2>&1)
      after=0; [ -n "$pid" ] && after=$(ticks "$pid")
      tps=$(echo "$out" | awk -F'= ' '/^tps/ {print $2+0}')
      txns=$(echo "$out" | awk -F': ' '/actually processed/ {split($2,a,"/"); print a[1]}')
      TPS[$target]=$tps
      ratio=$(awk -v a="$tps" -v b="${TPS[direct]}" 'BEGIN {printf "%.2f", a/b}')
      cpu="-"
      [ -n "$pid" ] && cpu=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$txns" 'BEGIN {printf "%.1f", t * 1e6 / hz / n}')
      printf '%-9s %-8s %-10s %12.0f %9s %14s\n' "$mode" "$c" "$target" "$tps" "$ratio" "$cpu" | tee -a "$RESULT"
    done
  done
done
echo "== written to $RESULT"
