#!/usr/bin/env python3
"""Ranks functions by instructions per transaction between two callgrind profiles of one
build (benches/callgrind-ab.sh with KEEP=DIR): the difference of each function's count
between the T1 and the T2 run, divided by T2 - T1, so start-up and shutdown cancel.

    benches/callgrind-rank.py DIR/1.100.cg DIR/1.1100.cg 1000 [--inclusive] [--top 40]

The last line, "without periodic work", leaves out what runs on a timer rather than per
transaction (the shard's stats report, about 140,000 instructions a second under valgrind):
the two runs last as long as valgrind makes them, so its share of a transaction changes
from run to run by a few thousand instructions.
"""
import argparse
import re
import subprocess

# Entry points of work done on a timer, not per transaction (inclusive counts).
PERIODIC = ["pgprism::stats::ShardStats::report"]

LINE = re.compile(r"^\s*([\d,]+)\s+\([^)]*\)\s+(.*)$")


def counts(path, inclusive):
    out = subprocess.run(
        ["callgrind_annotate", "--threshold=100", f"--inclusive={'yes' if inclusive else 'no'}", path],
        capture_output=True, text=True, check=True).stdout
    result = {}
    for line in out.splitlines():
        m = LINE.match(line)
        if not m or "PROGRAM TOTALS" in m.group(2):
            continue
        name = re.sub(r"\s+\[[^\]]*\]$", "", m.group(2))
        name = re.sub(r"^\S*?:(?=\S)", "", name, count=1) if name.startswith(("???:", "./", "/")) else name
        result[name] = result.get(name, 0) + int(m.group(1).replace(",", ""))
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("t1")
    p.add_argument("t2")
    p.add_argument("transactions", type=int)
    p.add_argument("--inclusive", action="store_true")
    p.add_argument("--top", type=int, default=40)
    a = p.parse_args()
    before, after = counts(a.t1, a.inclusive), counts(a.t2, a.inclusive)
    rows = [(after.get(k, 0) - before.get(k, 0), k) for k in set(before) | set(after)]
    rows.sort(reverse=True)
    total = sum(d for d, _ in rows) if not a.inclusive else None
    for d, k in rows[: a.top]:
        share = f" {100 * d / total:5.1f}%" if total else ""
        print(f"{d / a.transactions:10.0f}{share}  {k[:150]}")
    if total:
        print(f"{total / a.transactions:10.0f}  total")
        inc_before, inc_after = counts(a.t1, True), counts(a.t2, True)
        periodic = sum(inc_after.get(k, 0) - inc_before.get(k, 0) for k in PERIODIC)
        print(f"{(total - periodic) / a.transactions:10.0f}  total without periodic work")


main()
