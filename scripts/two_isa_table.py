#!/usr/bin/env python3
"""The README's two-instruction-set table from two `cargo xtask bench --peer` runs.

Usage: scripts/two_isa_table.py NATIVE/results.json AVX2/results.json

Each argument is the `results.json` of one run (copy `target/bench-report/` away between the
native run and the `--isa avx2` one: each run overwrites it). Prints one Markdown row per
workload that both runs measured on both sides: each side's median, their ratio (peer / ours,
above 1 means we are faster) and the same ratio of each side's quickest iteration, as
`report.md` computes them.
"""
import json
import statistics
import sys


def load(path):
    with open(path) as f:
        return {pair["id"]: pair for pair in json.load(f)["pairs"]}


def fmt(ms):
    if ms < 10:
        return f"{ms:.2f} ms"
    return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


def columns(pair):
    ours, peer = statistics.median(pair["ours_ms"]), statistics.median(pair["peer_ms"])
    quickest = min(pair["peer_ms"]) / min(pair["ours_ms"])
    return [fmt(ours), fmt(peer), f"{peer / ours:.2f}", f"{quickest:.2f}"]


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    native, avx2 = load(sys.argv[1]), load(sys.argv[2])
    print(
        "| work | native: ours | peer | ratio | quickest ratio "
        "| `--isa avx2`: ours | peer | ratio | quickest ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for work, pair in native.items():
        other = avx2.get(work)
        if other and pair.get("peer_ms") and other.get("peer_ms"):
            print(f"| `{work}` | " + " | ".join(columns(pair) + columns(other)) + " |")


if __name__ == "__main__":
    main()
