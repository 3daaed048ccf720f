#!/usr/bin/env bash
# PostgreSQL's own CPU for reading a table the ways the initial snapshot can, side by side in
# one session, interleaved ROUNDS times (the order rotates): the whole table with
# `COPY t TO '/dev/null'`, key chunks (`WHERE id > lo ORDER BY id LIMIT n`, as
# `snapshot-chunking = "key"` reads them), ctid chunks of whole pages (`WHERE ctid > ... AND
# ctid <= ...`, as `snapshot-chunking = "ctid"` reads them), and ctid chunks that also print
# each row's ctid (an earlier form). Every chunk is written server side to /dev/null in CSV, as
# the snapshot's COPY writes it. CPU is the backend's own (`log_statement_stats`: user +
# system), which other processes on a loaded machine disturb far less than wall time.
#
#   PSQL="psql -h HOST -p PORT -U postgres" benches/snapshot-chunk-cpu.sh [ROWS_PER_CHUNK] [ROUNDS]
#
# Needs a superuser (COPY to a server file) and the benchmark's table, made once:
#   CREATE TABLE t (id int PRIMARY KEY, v text, n bigint);
#   INSERT INTO t SELECT g, 'row ' || g, g * 7 FROM generate_series(1, 10000000) g;
#   VACUUM ANALYZE t;
set -euo pipefail
psql_cmd="${PSQL:-psql}"
chunk="${1:-200000}"
rounds="${2:-3}"
read -r pages tuples maxid < <($psql_cmd -tAF' ' -c \
    "SELECT relpages, reltuples::int8, (SELECT max(id) FROM t) FROM pg_class WHERE oid = 't'::regclass")
per_chunk=$(( chunk * pages / tuples ))
[ "$per_chunk" -ge 1 ] || per_chunk=1
csv="(FORMAT csv, NULL E'\\\\N')"

whole() { echo "COPY t TO '/dev/null';"; }
key() {
    local lo=0
    while [ "$lo" -lt "$maxid" ]; do
        echo "COPY (SELECT id, v, n FROM t WHERE (id) > ('$lo') ORDER BY id LIMIT $chunk) TO '/dev/null' $csv;"
        lo=$(( lo + chunk ))
    done
}
ctid() {
    local cols="$1" a=0 b
    while [ "$a" -lt "$pages" ]; do
        b=$(( a + per_chunk - 1 ))
        local lo="" hi=" AND ctid <= '($b,65535)'::tid"
        [ "$a" -gt 0 ] && lo=" AND ctid > '($(( a - 1 )),65535)'::tid"
        [ "$b" -ge $(( pages - 1 )) ] && hi=""
        echo "COPY (SELECT $cols FROM t WHERE true$lo$hi) TO '/dev/null' $csv;"
        a=$(( b + 1 ))
    done
}
methods=(whole key ctid ctid-printed)
script() {
    echo "SET client_min_messages = log; SET max_parallel_workers_per_gather = 0;"
    for r in $(seq 0 $(( rounds - 1 ))); do
        for i in 0 1 2 3; do
            local m="${methods[$(( (i + r) % 4 ))]}"
            echo "\\echo METHOD $m"
            echo "SET log_statement_stats = on;"
            case "$m" in
            whole) whole ;;
            key) key ;;
            ctid) ctid "id, v, n" ;;
            ctid-printed) ctid "ctid::text, id, v, n" ;;
            esac
            echo "SET log_statement_stats = off;"
        done
    done
}
script | $psql_cmd -q 2>&1 | awk -v pages="$pages" -v per="$per_chunk" '
    /^METHOD/ { if (m != "") { cpu[m] = cpu[m] " " sprintf("%.2f", c); wall[m] = wall[m] " " sprintf("%.2f", w) } m = $2; c = 0; w = 0; next }
    /s user, .* s system, .* s elapsed/ { for (i = 1; i <= NF; i++) { if ($(i+1) == "s" && $(i+2) ~ /^user/) c += $i; if ($(i+1) == "s" && $(i+2) ~ /^system/) c += $i; if ($(i+1) == "s" && $(i+2) ~ /^elapsed/) w += $i } }
    END {
        cpu[m] = cpu[m] " " sprintf("%.2f", c); wall[m] = wall[m] " " sprintf("%.2f", w)
        printf "table: %d pages; ctid chunks of %d pages\n", pages, per
        for (k in cpu) printf "%-13s backend CPU s:%s   elapsed s:%s\n", k, cpu[k], wall[k]
    }'
