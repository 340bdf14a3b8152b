"""Fused attention dropout on CPU: fastattn's forward + backward with dropout against PyTorch
SDPA with the same dropout probability and against fastattn without dropout, timed
interleaved in one run (fastattn.benchmark), and the peak memory of a long sequence.

    python benchmarks/dropout.py [--quick] [--out benchmarks/results/cpu_dropout.json]

Figures (each measured in this run), fp32, dropout 0.1:
  vs SDPA           (4, 12, 512, 64) fwd+bwd: SDPA with dropout_p=0.1 (it draws and stores a
                    mask) / fastattn with dropout_p=0.1 (decisions regenerated, no mask)
  vs no dropout     the same shape: fastattn with dropout / fastattn without
  peak memory       (1, 8, 8192, 64) fwd+bwd with dropout: peak resident memory above the inputs
                    (outputs and gradients included), measured after all timing with exact
                    allocation accounting (fastattn.benchmark.measure.exact_cpu_peaks)
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastattn  # noqa: E402
from fastattn.benchmark.measure import Timing, exact_cpu_peaks, peak_memory, time_named  # noqa: E402
from fastattn.benchmark.report import script_args, write_figures  # noqa: E402

P = 0.1
SHAPE = (4, 12, 512, 64)
MEMORY_SHAPE = (1, 8, 8192, 64)
TARGETS = {  # figure: (bound, "min" = at least / "max" = at most)
    "fwd+bwd dropout speedup vs SDPA dropout": (1.5, "min"),
    "fwd+bwd dropout time / no dropout (fastattn)": (1.25, "max"),
    "fwd+bwd dropout peak memory above inputs (MB)": (200.0, "max"),
}


def _inputs(shape, g):
    return [torch.randn(*shape, generator=g).requires_grad_() for _ in range(3)]


def _fwd_bwd(attend, q, k, v, grad_out):
    return lambda: torch.autograd.grad(attend(q, k, v), (q, k, v), grad_out)


def main():
    args = script_args(__doc__, "cpu_dropout.json", "fewer repetitions and a shorter memory case")
    timing = Timing(min_reps=2, budget_s=0.3, max_reps=5) if args.quick else Timing(min_reps=5, budget_s=2.0, max_reps=15)
    memory_shape = (1, 8, 2048, 64) if args.quick else MEMORY_SHAPE
    g = torch.Generator().manual_seed(0)
    figures, rows = {}, []

    q, k, v = _inputs(SHAPE, g)
    grad_out = torch.randn(SHAPE, generator=g)
    attends = {
        "fastattn dropout": lambda q, k, v: fastattn.attention(q, k, v, dropout_p=P),
        "fastattn": lambda q, k, v: fastattn.attention(q, k, v),
        "sdpa dropout": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=P),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    }
    shape = "B{} H{} S{} D{}".format(*SHAPE)
    with torch.no_grad():
        ms = time_named({name: lambda a=a: a(q, k, v) for name, a in attends.items()}, timing)
    rows.append({"case": f"dropout {P}, {shape} fp32 fwd", **{n: round(t, 2) for n, t in ms.items()}})
    ms = time_named({name: _fwd_bwd(a, q, k, v, grad_out) for name, a in attends.items()}, timing)
    rows.append({"case": f"dropout {P}, {shape} fp32 fwd+bwd", **{n: round(t, 2) for n, t in ms.items()}})
    figures["fwd+bwd dropout speedup vs SDPA dropout"] = ms["sdpa dropout"] / ms["fastattn dropout"]
    figures["fwd+bwd dropout time / no dropout (fastattn)"] = ms["fastattn dropout"] / ms["fastattn"]

    exact_cpu_peaks()  # after all timing: it changes allocation speed
    q, k, v = _inputs(memory_shape, g)
    grad_out = torch.randn(memory_shape, generator=g)
    peaks = {name: peak_memory(_fwd_bwd(attends[name], q, k, v, grad_out), "cpu") / 2**20
             for name in ("fastattn dropout", "fastattn")}
    rows.append({"case": "peak MB above inputs, B{} H{} S{} D{} fp32 fwd+bwd".format(*memory_shape),
                 **{n: round(mb, 1) for n, mb in peaks.items()}})
    figures["fwd+bwd dropout peak memory above inputs (MB)"] = peaks["fastattn dropout"]

    write_figures(args.out, rows, figures, TARGETS)


if __name__ == "__main__":
    main()
