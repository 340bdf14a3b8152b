#!/usr/bin/env python3
"""Times fastattn's CPU attention in two source trees (each with its own built fastattn._C),
in separate processes, alternating, to see whether a change made the kernels faster or slower.

    python tools/compare_builds.py OLD_ROOT NEW_ROOT [--rounds 7]

Prints, per shape and pass, the fastest of the rounds for each tree and their ratio: the
fastest run is the one least disturbed by other work on the machine.
"""
import argparse
import ast
import subprocess
import sys

CASES = {"base": (4, 12, 512, 64, False), "causal": (1, 12, 2048, 64, True), "d128": (2, 8, 1024, 128, False)}

TIMING = r'''
import statistics, sys, time
import torch
sys.path.insert(0, sys.argv[1])
import fastattn
assert fastattn.__file__.startswith(sys.argv[1]), f"imported {fastattn.__file__}, not the tree {sys.argv[1]}"
torch.manual_seed(0)
times = {}
for name, (B, H, S, D, causal) in CASES.items():
    q, k, v = (torch.randn(B, H, S, D, requires_grad=True) for _ in range(3))

    def forward():
        with torch.no_grad():
            fastattn.attention(q, k, v, causal=causal, backend="cpu")

    def forward_backward():
        out = fastattn.attention(q, k, v, causal=causal, backend="cpu")
        out.backward(torch.ones_like(out))

    for label, step in (("fwd", forward), ("fwd+bwd", forward_backward)):
        step()
        runs = []
        for _ in range(7):
            start = time.perf_counter()
            step()
            runs.append(time.perf_counter() - start)
        times[f"{name} {label}"] = statistics.median(runs) * 1e3
print(repr(times))
'''


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old_root")
    parser.add_argument("new_root")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    code = f"CASES = {CASES!r}\n" + TIMING
    results = {"old": [], "new": []}
    for _ in range(args.rounds):
        for label, root in (("old", args.old_root), ("new", args.new_root)):
            proc = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, cwd="/")
            if proc.returncode:
                sys.exit(proc.stderr[-2000:])
            results[label].append(ast.literal_eval(proc.stdout.strip().splitlines()[-1]))
    for key in results["old"][0]:
        old, new = (min(r[key] for r in results[label]) for label in ("old", "new"))
        print(f"{key:16s} old {old:8.1f} ms  new {new:8.1f} ms  new/old {new / old:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
