#!/usr/bin/env bash
# pgbench -S through pgprism beside direct PostgreSQL and PgBouncer (session pool mode), in the
# same run, on this machine. Prints TPS, the ratio to direct, and each proxy's CPU microseconds
# per transaction (utime+stime from /proc/PID/stat divided by transactions).
#
#   benches/proxy-pgbench.sh                 # 15 s per cell
#   DURATION=5 CLIENTS="16" benches/proxy-pgbench.sh
#   SHARDS=2 MODES="simple prepared" benches/proxy-pgbench.sh
#   TRANSPORT=unix benches/proxy-pgbench.sh  # Unix sockets instead of loopback TCP
#   RATE=4000 benches/proxy-pgbench.sh       # a fixed load (pgbench -R): CPU per transaction
#                                            # below saturation, where sleeps and wake-ups cost
#   FLOOR=1 benches/proxy-pgbench.sh         # adds the floor: a bytes-only io_uring forwarder
#                                            # (benches/floor-forwarder.rs), what the kernel
#                                            # alone costs a proxy per transaction (TCP only)
#
# TRANSPORT=tcp (default): every hop is loopback TCP. TRANSPORT=unix: every hop is a Unix
# socket in $WORK, like for like: pgbench reaches PostgreSQL, pgprism (--unix-socket-dir) and
# PgBouncer (unix_socket_dir) through their sockets, and both proxies reach PostgreSQL
# through its socket.
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
OUT=${OUT:-bench-results}
TRANSPORT=${TRANSPORT:-tcp}
RATE=${RATE:-}
FLOOR=${FLOOR:-}
case $TRANSPORT in
  tcp | unix) ;;
  *) echo "TRANSPORT must be tcp or unix, not '$TRANSPORT'" >&2; exit 2 ;;
esac

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
TARGETS="direct pgprism pgbouncer"
if [ -n "$FLOOR" ]; then
  [ "$TRANSPORT" = tcp ] || { echo "FLOOR=1 needs TRANSPORT=tcp" >&2; exit 2; }
  FLOOR_BIN=$(cargo build --release --quiet --bench floor-forwarder --message-format=json |
    sed -n 's/.*"executable":"\([^"]*floor_forwarder[^"]*\)".*/\1/p' | tail -1)
  TARGETS="$TARGETS floor"
fi
. benches/common.sh

# PostgreSQL's socket is in $WORK (start_pg passes -k $WORK).
if [ "$TRANSPORT" = unix ]; then
  CLIENT_HOST=$WORK
  PRIMARY_URL="postgres://postgres@/postgres?host=$WORK&port=55501"
  PRISM_UNIX=(--unix-socket-dir "$WORK")
  BOUNCER_DB_HOST=$WORK
  BOUNCER_SOCKET_DIR=$WORK
else
  PRIMARY_URL=postgres://127.0.0.1:55501
  PRISM_UNIX=()
  BOUNCER_DB_HOST=127.0.0.1
  BOUNCER_SOCKET_DIR=
fi

echo "== setup: PostgreSQL $("$BINDIR/postgres" --version | awk '{print $3}'), scale $SCALE, ${DURATION}s per cell, $(nproc) cores, transport $TRANSPORT"
start_pg pg 55501
pgbench -h "$CLIENT_HOST" -p 55501 -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
start_pgprism 55502 --primary "$PRIMARY_URL" --shards "$SHARDS" "${PRISM_UNIX[@]}"

cat >"$WORK/pgbouncer.ini" <<INI
[databases]
postgres = host=$BOUNCER_DB_HOST port=55501 dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = 55503
unix_socket_dir = $BOUNCER_SOCKET_DIR
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = session
max_client_conn = 1000
default_pool_size = 200
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
INI
echo '"postgres" ""' >"$WORK/userlist.txt"
[ "$(id -u)" = 0 ] && chown postgres "$WORK"/pgbouncer.ini "$WORK"/userlist.txt
"${RUNAS[@]}" pgbouncer -d "$WORK/pgbouncer.ini" >/dev/null 2>&1
for _ in $(seq 50); do [ -s "$WORK/pgbouncer.pid" ] && break; sleep 0.1; done
BOUNCER_PID=$(cat "$WORK/pgbouncer.pid"); PIDS+=("$BOUNCER_PID")
wait_ready 55503
if [ -n "$FLOOR" ]; then
  "$FLOOR_BIN" 127.0.0.1:55504 127.0.0.1:55501 >"$WORK/floor.out" 2>&1 &
  FLOOR_PID=$!; PIDS+=("$FLOOR_PID")
  wait_ready 55504
fi

# Warm-up, not measured: each target's first sessions, buffers and allocator arenas (the first
# measured cell otherwise carried pgprism's, 2-4 us per transaction in 10 s cells).
for port in 55501 55502 55503 ${FLOOR:+55504}; do
  pgbench -h "$CLIENT_HOST" -p "$port" -U postgres -n -S -c 16 -j 2 -T "${WARMUP:-3}" postgres >/dev/null 2>&1 || true
done

mkdir -p "$OUT"
RESULT="$OUT/proxy-pgbench-$TRANSPORT-$(date +%Y%m%d-%H%M%S).txt"
printf '%-9s %-8s %-10s %12s %9s %14s %12s\n' mode clients target tps vs_direct cpu_us_per_tx tcp_segs_tx | tee "$RESULT"
for mode in $MODES; do
  for c in $CLIENTS; do
    DIRECT=
    for target in $TARGETS; do
      case $target in
        direct) port=55501; pid="" ;;
        pgprism) port=55502; pid=$PRISM_PID ;;
        pgbouncer) port=55503; pid=$BOUNCER_PID ;;
        floor) port=55504; pid=$FLOOR_PID ;;
      esac
      # TCP segments per transaction, all hops (kernel counters; "-" without nstat): a proxy
      # cannot go below 4 (request and response, on each side) and extra pure ACKs or split
      # writes would show here.
      command -v nstat >/dev/null && nstat -n >/dev/null 2>&1
      bench "$port" "$pid" -S ${RATE:+-R "$RATE"} -M "$mode" -c "$c" -j 2 -T "$DURATION"
      SEGS="-"
      command -v nstat >/dev/null &&
        SEGS=$(nstat -z 2>/dev/null | awk -v n="$TXNS" '$1 == "TcpOutSegs" {printf "%.2f", $2 / n}')
      [ -z "$DIRECT" ] && DIRECT=$TPS
      ratio=$(awk -v a="$TPS" -v b="$DIRECT" 'BEGIN {printf "%.2f", a/b}')
      printf '%-9s %-8s %-10s %12.0f %9s %14s %12s\n' "$mode" "$c" "$target" "$TPS" "$ratio" "$CPU" "$SEGS" | tee -a "$RESULT"
    done
  done
done
echo "== written to $RESULT"
