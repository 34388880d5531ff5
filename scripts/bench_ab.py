"""Two builds of `peft-bench` (e.g. before and after a change) on the same workloads, rounds
interleaved (the order alternates each round), medians and the ratio new/old, and the same of the
10th percentiles:

    bench_ab.py OLD_BIN NEW_BIN ROUNDS ITERATIONS ID [ID ...]

Build the old binary in its own worktree *and its own CARGO_TARGET_DIR*: cargo keys path
packages relative to the workspace, so a shared target folder mixes the two builds."""
import json, statistics, subprocess, sys
old, new, rounds, iters = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ids = sys.argv[5:]
procs = {n: subprocess.Popen([b, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for n, b in (("old", old), ("new", new))}
ms = {(n, i): [] for n in procs for i in ids}
for r in range(rounds):
    for i in ids:
        for n in (("old", "new") if r % 2 == 0 else ("new", "old")):
            p = procs[n]
            p.stdin.write(f"{i} {iters}\n"); p.stdin.flush()
            ms[(n, i)] += json.loads(p.stdout.readline())["ms"]
for p in procs.values():
    p.stdin.close(); p.wait()
for i in ids:
    o, n = statistics.median(ms[("old", i)]), statistics.median(ms[("new", i)])
    # The tenth percentile: interference only adds time, so the fast end is steadier.
    lo = {k: sorted(ms[(k, i)])[len(ms[(k, i)]) // 10] for k in ("old", "new")}
    print(f"{i:40s} old {o:9.2f} ms  new {n:9.2f} ms  new/old {n/o:.3f}"
          f"  (10th percentile {lo['old']:.2f} / {lo['new']:.2f}: {lo['new']/lo['old']:.3f})")
