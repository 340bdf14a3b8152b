"""Attention benchmark: fastattn against PyTorch SDPA and eager softmax(q @ k^T) @ v.

    python benchmarks/attention.py [--quick] [--device cpu|cuda] [--out DIR]

On CPU it runs the targets suite: the shapes of the CPU performance targets, forward and
forward+backward, plus the peak-memory increase of one long forward; the table is followed
by each target, its measured value and met / not met. On CUDA it runs the encoder, decoder,
padded and cross suites. Writes results.json (with the targets), results.csv and plots into
--out (default benchmarks/results/<device>_attention). Same engine as `python -m fastattn bench`.
"""
import os
import sys

from fastattn.benchmark.cli import main

SUITES = {"cpu": ["targets"], "cuda": ["encoder", "decoder", "padded", "cross"]}
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "{device}_attention")

if __name__ == "__main__":
    sys.exit(main(fixed_suites=SUITES, description=__doc__.splitlines()[0], default_out=OUT))
