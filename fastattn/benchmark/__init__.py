"""Benchmarks of fastattn against PyTorch: `python -m fastattn bench`, benchmarks/*.py.

    engine   Case / Impl / Result, run_cases (timing, FLOPs, peak memory, speedups)
    suites   the op-level suites (encoder, decoder, padded, cross, softmax) and their shapes;
             the targets suite and its CPU targets
    report   table, targets block, JSON, CSV and PNG plots
    cli      the command line shared by `python -m fastattn bench` and benchmarks/*.py
"""
from .engine import FWD, FWD_BWD, Case, Impl, Result, attention_flops, run_cases
from .measure import Timing

__all__ = ["FWD", "FWD_BWD", "Case", "Impl", "Result", "Timing", "attention_flops", "run_cases"]
