#!/usr/bin/env python3
"""Numberings of the hot-row workload's primary completions tried offline against the
primary's own order (issue 15, session 17).

The order-gap measurement writes its raw trace with the send time of each statement:

  PGPRISM_GAP_DUMP=/tmp/gap PGPRISM_GAP_RUNS=64:2 cargo nextest run --release --test \
      compare_concurrent hot_row_order_gap --run-ignored only --no-capture
  benches/order-gap-numberings.py /tmp/gap/gap-64x2.log [more traces...]

Each write's `RETURNING v` is its place in its row's history and each read's value is how
many writes it saw, so a numbering misplaces a read when another number of writes of its
row is numbered before it. Prints, per numbering, the reads misplaced in each trace.
"""
import bisect
import collections
import re
import sys


def load(path):
    rows = []
    for line in open(path):
        if "primary completion" not in line:
            continue
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        d = {}
        for k in ("c", "stamp_ns", "since_ns", "seen_ns", "shard", "session"):
            d[k] = int(re.search(r" %s=(\d+)" % k, line).group(1))
        st = re.search(r'statement=Some\("([^"]*)"', line).group(1)
        d["id"] = int(re.search(r"id = (\d+)", st).group(1))
        d["w"] = st.startswith("UPDATE")
        d["v"] = int(re.search(r'row=Some\("\((-?\d+)\)"', line).group(1))
        d["dur"] = d["stamp_ns"] - d["since_ns"]
        rows.append(d)
    byid = collections.defaultdict(list)
    for r in rows:
        if r["w"]:
            byid[r["id"]].append(r)
    for ws in byid.values():
        for w in ws:
            # Another session's write of the row was in flight when this one was answered.
            w["waiter"] = any(
                o["session"] != w["session"] and o["since_ns"] < w["stamp_ns"] < o["stamp_ns"]
                for o in ws
            )
    return rows


def misplaced(rows, wkey, rkey):
    n = 0
    for i in set(r["id"] for r in rows):
        keys = sorted(wkey(w) for w in rows if w["id"] == i and w["w"])
        for r in rows:
            if r["id"] == i and not r["w"] and bisect.bisect_left(keys, rkey(r)) != r["v"]:
                n += 1
    return n


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] // 1000


traces = [load(p) for p in sys.argv[1:]]
for rows in traces:
    reads = [r["dur"] for r in rows if not r["w"]]
    writes = [r["dur"] for r in rows if r["w"]]
    print(
        "sent to answered, us: reads p50 %d p90 %d, writes p50 %d p90 %d"
        % (pct(reads, 0.5), pct(reads, 0.9), pct(writes, 0.5), pct(writes, 0.9))
    )


def show(name, wkey, rkey):
    print("%-34s %s" % (name, [misplaced(rows, wkey, rkey) for rows in traces]))


def stamp(r):
    return r["stamp_ns"]


def lead(us):
    return lambda r: max(r["stamp_ns"] - us * 1000, r["since_ns"])


show("pgprism's numbers (c)", lambda w: w["c"], lambda r: r["c"])
for us in (0, 15, 30, 60):
    show("read lead %d us" % us, stamp, lead(us))
for f in (0.02, 0.05, 0.1):
    for cap in (60, 200):
        show(
            "read lead %.0f%% of its time, cap %d us" % (100 * f, cap),
            stamp,
            lambda r, f=f, cap=cap: r["stamp_ns"] - min(cap * 1000, int(f * r["dur"])),
        )
for us in (15, 100):
    show(
        "writes with a waiter %d us earlier" % us,
        lambda w, us=us: w["stamp_ns"] - (us * 1000 if w["waiter"] else 0),
        lead(15),
    )
show("every write 15 us earlier", lead(15), lead(15))
