#!/usr/bin/env bash
# Instructions per transaction of two pgprism builds, counted by callgrind: on a shared
# machine whose CPU time per transaction drifts by ±20% between runs, instruction counts
# repeat within a few percent, so they resolve a hot-path change that benches/ab-pgbench.sh
# cannot. One pgbench client (so batching does not depend on timing), one shard; each build
# runs T1 and T2 transactions under callgrind and the per-transaction figure is
# (Ir(T2) - Ir(T1)) / (T2 - T1), which cancels start-up and shutdown.
#
#   benches/callgrind-ab.sh /tmp/pgprism-old target/release/pgprism          # proxy, -S
#   LOAD=-N MIRROR=1 benches/callgrind-ab.sh /tmp/pgprism-old target/release/pgprism
#   LOAD=-N SHADOW=1 benches/callgrind-ab.sh /tmp/pgprism-old target/release/pgprism
#   LOAD=-N SHADOW=1 ARGS="--compare-order-wait-ms 0" benches/callgrind-ab.sh target/release/pgprism
#
# ARGS: more pgprism flags for every build (e.g. compare without ordering, to weigh the
# ordering's own cost in one build). KEEP=DIR keeps each build's two profiles as
# DIR/N.T1.cg and DIR/N.T2.cg (N: the build's place in the list): `benches/callgrind-rank.py
# DIR/1.100.cg DIR/1.600.cg T2-T1` ranks the functions behind the figure per transaction.
#
# The counts are dumped (`callgrind_control --dump`) once pgbench is done, before pgprism is
# stopped: under valgrind a compare-mode pgprism may not stop on TERM in any useful time,
# and its shutdown is no part of the figure anyway.
#
# CLIENTS: pgbench clients (default 1; T1 and T2 are then transactions per client, and the
# figure divides by CLIENTS too): how the per-transaction count grows with the clients a
# shard serves, e.g. `CLIENTS=512 T1=2 T2=8 ARGS="--pool-mode transaction --auth-type trust"`.
#
# CG_ARGS: more valgrind flags, e.g. "--cache-sim=yes" (the kept profiles then hold simulated
# cache misses: `callgrind_annotate DIR/1.T.cg | grep TOTALS`).
#
# PORT_BASE: the four ports used are PORT_BASE to PORT_BASE+3 (default 55711; another run of
# this script on the machine needs another base).
#
# Needs valgrind. Counts user-space instructions only: the kernel's share of a proxy's CPU
# (most of it, on loopback) is not in them.
set -euo pipefail
cd "$(dirname "$0")/.."
T1=${T1:-100}
T2=${T2:-600}
CLIENTS=${CLIENTS:-1}
LOAD=${LOAD:--S}
PORT_BASE=${PORT_BASE:-55711}
P_PRIMARY=$PORT_BASE P_MIRROR=$((PORT_BASE + 1)) P_SHADOW=$((PORT_BASE + 2)) P_PROXY=$((PORT_BASE + 3))
[ $# -ge 1 ] || { echo "usage: $0 PGPRISM_BINARY..." >&2; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind is needed" >&2; exit 2; }
. benches/common.sh

start_pg primary $P_PRIMARY
pgbench -h 127.0.0.1 -p $P_PRIMARY -U postgres -i -s 2 -q postgres >/dev/null 2>&1
EXTRA=()
if [ "${MIRROR:-0}" = 1 ]; then
  start_pg mirror $P_MIRROR
  pgbench -h 127.0.0.1 -p $P_MIRROR -U postgres -i -s 2 -q postgres >/dev/null 2>&1
  EXTRA+=(--mirror postgres://postgres@127.0.0.1:$P_MIRROR/postgres --mirror-all-queries)
fi
if [ "${SHADOW:-0}" = 1 ]; then
  start_pg shadow $P_SHADOW
  pgbench -h 127.0.0.1 -p $P_SHADOW -U postgres -i -s 2 -q postgres >/dev/null 2>&1
  EXTRA+=(--shadow postgres://postgres@127.0.0.1:$P_SHADOW/postgres --compare-report "$WORK/r.jsonl")
fi

read -r -a MORE <<<"${ARGS:-}"
EXTRA+=("${MORE[@]}")

# instructions BINARY TXNS: callgrind's program total for TXNS transactions.
instructions() {
  local vpid ready=0
  # Under valgrind the start takes seconds, and now and then never ends: the shard thread
  # waits in io_uring_enter while valgrind's lock keeps the main thread from running (no
  # CPU used, no answer). Such a start is killed and tried again.
  for _ in 1 2 3 4; do
    rm -f "$WORK"/cg.*
    # shellcheck disable=SC2086 # CG_ARGS is an argument list
    valgrind --tool=callgrind ${CG_ARGS:-} --callgrind-out-file="$WORK/cg.%p" -q "$1" proxy \
      --listen 127.0.0.1:$P_PROXY --admin "" --log warn --shards 1 \
      --primary postgres://127.0.0.1:$P_PRIMARY "${EXTRA[@]}" >/dev/null 2>"$WORK/vg.err" &
    vpid=$!
    local until=$((SECONDS + 60))
    while [ "$SECONDS" -lt "$until" ]; do
      if timeout 5 psql -h 127.0.0.1 -p $P_PROXY -U postgres -XAtc 'select 1' postgres >/dev/null 2>&1; then
        ready=1
        break
      fi
      sleep 0.2
    done
    [ "$ready" = 1 ] && break
    kill -KILL "$vpid" 2>/dev/null || true
    wait "$vpid" || true
  done
  [ "$ready" = 1 ] || { echo "pgprism never started under valgrind" >&2; exit 1; }
  pgbench -h 127.0.0.1 -p $P_PROXY -U postgres -n "$LOAD" -c "$CLIENTS" -j 2 -t "$2" postgres >/dev/null 2>&1
  callgrind_control --dump "$vpid" >/dev/null 2>&1
  kill -TERM "$vpid"
  for _ in $(seq 50); do kill -0 "$vpid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$vpid" 2>/dev/null || true
  wait "$vpid" || true
  # The dump: everything up to the end of pgbench's run (`.1`, the first dump).
  callgrind_annotate "$WORK"/cg.*.1 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP"; cp "$WORK"/cg.*.1 "$KEEP/$3.$2.cg"
  fi
  rm -f "$WORK"/cg.*
}

printf '%-40s %14s %14s %12s\n' build "Ir($T1)" "Ir($T2)" Ir_per_tx
n=0
for bin in "$@"; do
  n=$((n + 1))
  a=$(instructions "$bin" "$T1" "$n")
  b=$(instructions "$bin" "$T2" "$n")
  printf '%-40s %14s %14s %12s\n' "$bin" "$a" "$b" "$(( (b - a) / ((T2 - T1) * CLIENTS) ))"
done
