"""Sliding windows and the logit softcap on CPU: fastattn's windowed forward against its own
full causal forward and against PyTorch SDPA given the equivalent boolean mask, and the cost
of softcap, timed interleaved in one run (fastattn.benchmark).

    python benchmarks/window.py [--quick] [--out benchmarks/results/cpu_window.json]

Figures (each a ratio measured in this run), fp32 forward:
  window vs causal   causal sliding window of 256 keys over (1, 8, 16384, 64): fastattn's full
                     causal forward time / its windowed forward time
  window vs SDPA     SDPA given the window as a boolean (S, S) mask / fastattn windowed
  softcap overhead   fastattn with softcap=50 / without, (1, 8, 4096, 64), no mask and causal
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastattn  # noqa: E402
from fastattn import reference  # noqa: E402
from fastattn.benchmark.measure import Timing, time_named  # noqa: E402
from fastattn.benchmark.report import script_args, write_figures  # noqa: E402

WINDOW = 256
SOFTCAP = 50.0  # Gemma 2's attention cap
TARGETS = {  # figure: (bound, "min" = at least / "max" = at most)
    "window vs full causal speedup (fastattn)": (15.0, "min"),
    "window vs SDPA with the boolean mask speedup": (20.0, "min"),
    "softcap time / no softcap (no mask)": (1.3, "max"),
    "softcap time / no softcap (causal)": (1.3, "max"),
}


def main():
    args = script_args(__doc__, "cpu_window.json", "shorter sequences and fewer repetitions")
    timing = Timing(min_reps=2, budget_s=0.3, max_reps=5) if args.quick else Timing(min_reps=3, budget_s=2.0, max_reps=10)
    seq, cap_seq = (4096, 1024) if args.quick else (16384, 4096)
    g = torch.Generator().manual_seed(0)
    figures, rows = {}, []

    q, k, v = (torch.randn(1, 8, seq, 64, generator=g) for _ in range(3))
    band = reference.window_visibility(seq, seq, reference.Window(WINDOW, 0), "cpu")
    ms = time_named({
        "fastattn window": lambda: fastattn.attention(q, k, v, causal=True, window=(WINDOW, None)),
        "fastattn causal": lambda: fastattn.attention(q, k, v, causal=True),
        "sdpa band mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=band),
    }, timing)
    rows.append({"case": f"causal window {WINDOW}, B1 H8 S{seq} D64 fp32 fwd", **{n: round(t, 2) for n, t in ms.items()}})
    figures["window vs full causal speedup (fastattn)"] = ms["fastattn causal"] / ms["fastattn window"]
    figures["window vs SDPA with the boolean mask speedup"] = ms["sdpa band mask"] / ms["fastattn window"]

    q, k, v = (torch.randn(1, 8, cap_seq, 64, generator=g) for _ in range(3))
    for causal, name in ((False, "no mask"), (True, "causal")):
        ms = time_named({
            "softcap": lambda: fastattn.attention(q, k, v, causal=causal, softcap=SOFTCAP),
            "plain": lambda: fastattn.attention(q, k, v, causal=causal),
        }, timing)
        rows.append({"case": f"softcap {SOFTCAP:g}, {name}, B1 H8 S{cap_seq} D64 fp32 fwd",
                     **{n: round(t, 2) for n, t in ms.items()}})
        figures[f"softcap time / no softcap ({name})"] = ms["softcap"] / ms["plain"]

    write_figures(args.out, rows, figures, TARGETS)


if __name__ == "__main__":
    main()
