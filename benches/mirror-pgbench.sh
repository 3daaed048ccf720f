#!/usr/bin/env bash
# pgbench -S and -N through pgprism with one mirror receiving every statement, beside pgprism
# without a mirror and direct PostgreSQL, then with the mirror slowed, stalled and dead. Prints
# TPS, the ratio to the healthy-mirror run, and pgprism's CPU microseconds per transaction.
#
# - slowed: the mirror runs in its own network namespace behind a veth pair, and for this cell
#   both ends get a token-bucket qdisc (`tc ... tbf rate $SLOW_RATE`, default 2mbit): a slow
#   network path, paid for by the kernel, not by a user-space delay process competing for the
#   same 2 cores (this kernel has no netem). Needs root and iproute2; without them the mirror
#   runs on loopback and the slowed cell is skipped.
# - stalled: the mirror's processes stopped with SIGSTOP (a mirror that accepts nothing more).
# - dead: the mirror server stopped.
#
#   benches/mirror-pgbench.sh            # 10 s per cell
#   DURATION=5 CLIENTS=16 SLOW_RATE=1mbit benches/mirror-pgbench.sh
#   SHARDS=1 benches/mirror-pgbench.sh   # one shard (default: one per core)
#   FLOOR=1 benches/mirror-pgbench.sh    # adds the floor (benches/floor-forwarder.rs), bytes
#                                        # only: without a mirror, and copying every client
#                                        # byte to the mirror (what any mirroring proxy pays)
#
# The "+ mirror, flush N ms" row is the healthy mirror again with `--mirror-flush-delay-us`
# (FLUSH_DELAY_US, default 20000): each session's statements for the mirror are coalesced into
# one write per N ms.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-16}
SCALE=${SCALE:-10}
SLOW_RATE=${SLOW_RATE:-2mbit}
FLUSH_DELAY_US=${FLUSH_DELAY_US:-20000}
FLOOR=${FLOOR:-}
SHARDS=${SHARDS:-$(nproc)}
OUT=${OUT:-bench-results}
cargo build --release --quiet
PGPRISM=$PWD/target/release/pgprism
. benches/common.sh

# The mirror's own network namespace, when possible.
NS=""
MIRROR_HOST=127.0.0.1
NSEXEC=()
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null && command -v tc >/dev/null; then
  NS=pgprism-bench-$$
  VETH=pgpb$$
  if ip netns add "$NS" 2>/dev/null &&
     ip link add "${VETH}a" type veth peer name "${VETH}b" &&
     ip link set "${VETH}b" netns "$NS" &&
     ip addr add 10.231.0.1/24 dev "${VETH}a" && ip link set "${VETH}a" up &&
     ip -n "$NS" addr add 10.231.0.2/24 dev "${VETH}b" && ip -n "$NS" link set "${VETH}b" up &&
     ip -n "$NS" link set lo up; then
    MIRROR_HOST=10.231.0.2
    NSEXEC=(ip netns exec "$NS")
  else
    ip netns del "$NS" 2>/dev/null || true
    NS=""
  fi
fi
netns_cleanup() {
  if [ -n "$NS" ]; then
    ip link del "${VETH}a" 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
  fi
}
trap 'cleanup; netns_cleanup' EXIT

start_mirror() {
  "${NSEXEC[@]}" "${RUNAS[@]}" "$BINDIR/pg_ctl" -D "$WORK/mirror" -l "$WORK/mirror.log" -w \
    -o "-p 55512 -k $WORK -c listen_addresses=$MIRROR_HOST -c max_connections=300 -c fsync=off -c synchronous_commit=off -c shared_buffers=256MB" \
    start >/dev/null
}

echo "== setup: primary and mirror, scale $SCALE, $CLIENTS clients, ${DURATION}s per cell, $(nproc) cores"
start_pg primary 55511
"${RUNAS[@]}" "$BINDIR/initdb" -D "$WORK/mirror" -U postgres -A trust --no-sync >/dev/null
echo "host all all 10.231.0.0/24 trust" >>"$WORK/mirror/pg_hba.conf"
start_mirror
SERVERS+=("$WORK/mirror")
pgbench -h 127.0.0.1 -p 55511 -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
pgbench -h "$MIRROR_HOST" -p 55512 -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
start_pgprism 55513 --shards "$SHARDS" --primary postgres://127.0.0.1:55511
PLAIN_PID=$PRISM_PID
start_pgprism 55514 --shards "$SHARDS" --primary postgres://127.0.0.1:55511 --mirror "postgres://postgres@$MIRROR_HOST:55512/postgres" \
  --mirror-all-queries --mirror-retries 1000000 --retry-delay 100ms
MIRROR_PID=$PRISM_PID
# The same mirror with coalesced writes (`flush-delay-us`): several statements per send.
start_pgprism 55515 --shards "$SHARDS" --primary postgres://127.0.0.1:55511 --mirror "postgres://postgres@$MIRROR_HOST:55512/postgres" \
  --mirror-all-queries --mirror-retries 1000000 --retry-delay 100ms --mirror-flush-delay-us "$FLUSH_DELAY_US"
COALESCED_PID=$PRISM_PID
if [ -n "$FLOOR" ]; then
  # The floor (benches/floor-forwarder.rs): bytes only, without and with a copy of every client
  # byte to the mirror, whose answers it reads and drops.
  FLOOR_BIN=$(cargo build --release --quiet --bench floor-forwarder --message-format=json |
    sed -n 's/.*"executable":"\([^"]*floor_forwarder[^"]*\)".*/\1/p' | tail -1)
  "$FLOOR_BIN" 127.0.0.1:55517 127.0.0.1:55511 >"$WORK/floor.out" 2>&1 &
  FLOOR_PID=$!; PIDS+=("$FLOOR_PID")
  "$FLOOR_BIN" 127.0.0.1:55516 127.0.0.1:55511 "$MIRROR_HOST:55512" >"$WORK/floor-mirror.out" 2>&1 &
  FLOOR_MIRROR_PID=$!; PIDS+=("$FLOOR_MIRROR_PID")
  wait_ready 55517
  PGSSLMODE=disable wait_ready 55516
fi

mkdir -p "$OUT"
RESULT="$OUT/mirror-pgbench-$(date +%Y%m%d-%H%M%S).txt"
[ -n "$NS" ] && echo "# mirror in network namespace $NS at $MIRROR_HOST; slowed = tbf rate $SLOW_RATE both ways" | tee "$RESULT"
printf '%-6s %-24s %10s %12s %14s\n' load setup tps vs_healthy cpu_us_per_tx | tee -a "$RESULT"
row() { printf '%-6s %-24s %10.0f %12s %14s\n' "$1" "$2" "$TPS" "$3" "$CPU" | tee -a "$RESULT"; }
ratio() { awk -v a="$TPS" -v b="$HEALTHY" 'BEGIN {printf "%.2f", a/b}'; }
for load in S N; do
  args=(-"$load" -c "$CLIENTS" -j 2 -T "$DURATION")
  bench 55511 "" "${args[@]}"; row "-$load" direct "-"
  bench 55513 "$PLAIN_PID" "${args[@]}"; row "-$load" "pgprism, no mirror" "-"
  bench 55514 "$MIRROR_PID" "${args[@]}"; HEALTHY=$TPS; row "-$load" "pgprism + mirror" "1.00"
  bench 55515 "$COALESCED_PID" "${args[@]}"
  row "-$load" "+ mirror, flush $((FLUSH_DELAY_US / 1000)) ms" "$(ratio)"
  if [ -n "$FLOOR" ]; then
    # No SSLRequest: the mirror would get the startup packet before it answered one.
    export PGSSLMODE=disable
    bench 55517 "$FLOOR_PID" "${args[@]}"; row "-$load" "floor, no mirror" "-"
    bench 55516 "$FLOOR_MIRROR_PID" "${args[@]}"; row "-$load" "floor + mirror" "$(ratio)"
    unset PGSSLMODE
  fi
  if [ -n "$NS" ]; then
    tc qdisc add dev "${VETH}a" root tbf rate "$SLOW_RATE" burst 16kbit latency 200ms
    tc -n "$NS" qdisc add dev "${VETH}b" root tbf rate "$SLOW_RATE" burst 16kbit latency 200ms
    bench 55514 "$MIRROR_PID" "${args[@]}"
    row "-$load" "mirror slowed ($SLOW_RATE)" "$(ratio)"
    tc qdisc del dev "${VETH}a" root
    tc -n "$NS" qdisc del dev "${VETH}b" root
  fi
  stalled=$(pids_of_pg mirror)
  kill -STOP $stalled 2>/dev/null || true  # a backend may have exited meanwhile
  bench 55514 "$MIRROR_PID" "${args[@]}"
  row "-$load" "mirror stalled" "$(ratio)"
  kill -CONT $stalled 2>/dev/null || true
  "${RUNAS[@]}" "$BINDIR/pg_ctl" -D "$WORK/mirror" -m fast -w stop >/dev/null
  bench 55514 "$MIRROR_PID" "${args[@]}"
  row "-$load" "mirror dead" "$(ratio)"
  start_mirror
done
echo "== written to $RESULT"
