"""Fused masked softmax (fastattn.softmax) against torch.softmax, forward and backward.

    python benchmarks/softmax.py [--device cpu|cuda] [--quick] [--out DIR]

Prints the table and writes results.json, results.csv and softmax_*.png into --out
(default ./bench_out). Same engine and options as `python -m fastattn bench --suite softmax`.
"""
import sys

from fastattn.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main(fixed_suites=["softmax"], description=__doc__.splitlines()[0]))
