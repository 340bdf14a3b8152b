#!/usr/bin/env python3
"""How much `import fastattn` adds to `import torch`, on the CPU-only path.

Each import runs in fresh interpreters (--runs of each, interleaved so that machine noise
hits both alike), timed inside the child around the import statement alone. Prints the
median of each and their difference, and exits 1 when the difference exceeds --budget
seconds. The children see no CUDA device and no TRITON_INTERPRET, the case where fastattn
must not load Triton: with either, the Triton backend loads at import by design.

    python tools/import_time.py [--runs 7] [--budget 0.5]
"""
import argparse
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMED_IMPORT = "import time; start = time.perf_counter(); import {module}; print(time.perf_counter() - start)"


def import_seconds(module, env):
    result = subprocess.run(
        [sys.executable, "-c", TIMED_IMPORT.format(module=module)],
        capture_output=True, text=True, env=env, cwd=ROOT, check=True,
    )
    return float(result.stdout.split()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh interpreters per module (default 7)")
    parser.add_argument("--budget", type=float, default=0.5,
                        help="largest allowed difference of the medians, in seconds (default 0.5)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")

    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    times = {"torch": [], "fastattn": []}
    for _ in range(args.runs):
        for module, samples in times.items():
            samples.append(import_seconds(module, env))

    medians = {module: statistics.median(samples) for module, samples in times.items()}
    added = medians["fastattn"] - medians["torch"]
    print(f"import torch     {medians['torch']:.2f} s (median of {args.runs})")
    print(f"import fastattn  {medians['fastattn']:.2f} s (median of {args.runs}, torch included)")
    print(f"fastattn adds    {added:.2f} s (budget {args.budget:.2f} s)")
    if added > args.budget:
        sys.exit(f"import fastattn adds {added:.2f} s to import torch, over the {args.budget:.2f} s budget")


if __name__ == "__main__":
    main()
