"""Where the CPU kernels' time goes: each phase of fastattn's attention forward and backward
kernels, timed inside the kernels (fastattn._C.cpu_forward_phase_ns, cpu_backward_phase_ns),
against the machine's peak FMA rate measured in the same run.

    python benchmarks/phases.py [--quick] [--out benchmarks/results/cpu_phases.json]

Forward phases (csrc/cpu/params.h FwdPhase): pack (Q^T, K and V converted to fp32 tiles, the
mask read), scores (S^T = K Q^T), softmax (cap, ALiBi, mask, online max / exp / sum, O
rescaled), values (O += P V), store (O normalised and written). Backward phases (BwdPhase):
pack (Q, dO, O, delta, K, V), recompute (S and dP = dO V^T), softmax (P and dS, element-wise),
products (dV, dK, dQ), store. Each pass's GEMM phases get their own rate (their FLOPs over the
CPU time spent in them, per core) as a fraction of the peak FMA rate per core; the pass's
whole rate is attention's FLOPs (forward 4 * Sq * Sk * D, backward 2.5 times that, causal
half) over its time (the forward's wall time; the backward's busy time over the threads, as
its call also runs an untimed forward), as a fraction of the peak of every core. A pass
reaches the peak only if every phase but the GEMMs is free and the GEMMs run at the peak: the
breakdown says which of the two is missing, and by how much. The GEMM phases are also given
as a fraction of the kernels' own tile GEMM on one L1-resident tile (fastattn._C.
cpu_tile_gemm_peak), timed in the same run: below 1, the GEMMs lose to cache misses; the tile
GEMM's own fraction of the peak is what the micro-kernel loses. Also printed: page faults per
call, and the CPU time per 64 x 64 tile of scores (all phases; the JSON has each phase's).
`taskset -c 1 python benchmarks/phases.py` measures one thread alone.
"""
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastattn import ops  # noqa: E402
from fastattn.benchmark.report import command_line, environment, script_args  # noqa: E402
from fastattn.benchmark.suites import FMA_ITERATIONS, TILE_GEMM_ITERATIONS  # noqa: E402

# (label, (B, H, S, D)): the CPU targets' shapes (head dims 64 and 128, causal).
CASES = [("D64", (4, 12, 512, 64)), ("D128", (2, 8, 1024, 128)), ("causal D64", (1, 12, 2048, 64))]
REPEATS = 5
TILE = 64  # queries and keys per tile of both kernels (csrc/cpu/kernels.h kFwdBQ/BK, kBwdBQ/BK)
# pass: (its phases, its GEMM phases with the number of tile GEMMs each runs, FLOPs / forward's)
PASSES = {
    "forward": (ops._C.cpu_forward_phases, {"scores": 1, "values": 1}, 1.0),
    "backward": (ops._C.cpu_backward_phases, {"recompute": 2, "products": 3}, 2.5),
}


def ceiling_flops_per_s(loop, iterations):
    """The rate of a ceiling loop (ops._C.cpu_fma_peak or cpu_tile_gemm_peak) on all intra-op
    threads together, FLOP/s: the best of five runs, after one that starts the thread pool."""
    loop(iterations // 100)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        flops = loop(iterations)
        best = max(best, flops / (time.perf_counter() - start))
    return best


def ceilings():
    """(peak FMA rate, L1-resident tile GEMM rate), FLOP/s, with the attention benchmark's
    full-scale loop sizes (the last of its (tiny, full) pairs)."""
    return (ceiling_flops_per_s(ops._C.cpu_fma_peak, FMA_ITERATIONS[-1]),
            ceiling_flops_per_s(ops._C.cpu_tile_gemm_peak, TILE_GEMM_ITERATIONS[-1]))


def measure(kind, shape, causal):
    """The median over REPEATS calls (by time) of the pass's time (s) and of each phase's CPU
    time (s, summed over threads), and the page faults per call (memory touched for the first
    time: the outputs and any scratch the kernels did not keep)."""
    g = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(*shape, generator=g) for _ in range(4))
    window = (-1, 0) if causal else (-1, -1)
    if kind == "forward":
        def run():
            return ops._C.cpu_forward_phase_ns(q, k, v, *window)
    else:
        def run():
            return ops._C.cpu_backward_phase_ns(q, k, v, grad_out, *window)
    run()  # warm-up: scratch buffers, caches
    runs = []
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(REPEATS):
        start = time.perf_counter()
        seconds = [t * 1e-9 for t in run()]
        wall = time.perf_counter() - start
        runs.append((wall if kind == "forward" else sum(seconds) / torch.get_num_threads(), seconds))
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / REPEATS
    runs.sort(key=lambda r: r[0])
    elapsed, seconds = runs[REPEATS // 2]
    return elapsed, dict(zip(PASSES[kind][0], seconds)), faults


def main():
    args = script_args(__doc__, "cpu_phases.json", "smaller shapes")
    threads = torch.get_num_threads()
    # Timed before and after the cases, the best kept: a core taken by something else for a
    # moment must not lower the ceiling every figure is divided by.
    ceilings_before = ceilings()
    measured = {kind: [] for kind in PASSES}
    for kind in PASSES:
        for label, shape in CASES:
            if args.quick:
                shape = (1, 2, shape[2] // 4, shape[3])
            measured[kind].append((label, shape, measure(kind, shape, label.startswith("causal"))))
    peak, tile_peak = (max(pair) for pair in zip(ceilings_before, ceilings()))
    per_core_peak, per_core_tile = peak / threads, tile_peak / threads
    print(f"peak FMA rate: {peak / 1e9:.1f} GFLOP/s on {threads} threads; the kernels' tile GEMM in L1: "
          f"{tile_peak / 1e9:.1f} ({tile_peak / peak:.2f} of the peak)")
    rows = []
    for kind, (names, gemms, flop_factor) in PASSES.items():
        print(f"\n{kind:<24} {'ms':>8} {'of peak':>8}  " + "  ".join(f"{p:>9}" for p in names)
              + "  " + "  ".join(f"{g + '/peak':>14}  {g + '/tile':>14}" for g in gemms)
              + f"  {'faults':>7}  {'us/tile':>7}")
        for label, shape, (elapsed, phase_s, faults) in measured[kind]:
            causal = label.startswith("causal")
            B, H, S, D = shape
            visible = S * (S + 1) / 2 if causal else S * S  # attention's scores
            tiles = S // TILE * (S // TILE + 1) / 2 if causal else (S // TILE) ** 2  # (S % TILE == 0)
            tile_gemm_flops = 2 * B * H * tiles * TILE * TILE * D  # one GEMM over every computed tile
            busy = sum(phase_s.values())
            computed_tiles = B * H * tiles
            row = {
                "pass": kind,
                "case": f"{label} B{B} H{H} S{S} fp32",
                "ms": round(elapsed * 1e3, 2),
                "of peak": round(flop_factor * 4 * B * H * visible * D / elapsed / peak, 3),
                "phase share": {name: round(t / busy, 3) for name, t in phase_s.items()},
                "CPU us per tile": {name: round(t / computed_tiles * 1e6, 2) for name, t in phase_s.items()},
                **{f"{name} GEMM / peak": round(count * tile_gemm_flops / phase_s[name] / per_core_peak, 3)
                   for name, count in gemms.items()},
                **{f"{name} GEMM / tile GEMM": round(count * tile_gemm_flops / phase_s[name] / per_core_tile, 3)
                   for name, count in gemms.items()},
                "page faults per call": round(faults),
            }
            rows.append(row)
            shares = "  ".join(f"{row['phase share'][name]:>9.1%}" for name in names)
            rates = "  ".join(f"{row[f'{name} GEMM / peak']:>14.2f}  {row[f'{name} GEMM / tile GEMM']:>14.2f}"
                              for name in gemms)
            print(f"{label + f' S{S} D{D}':<24} {row['ms']:>8} {row['of peak']:>8.2f}  {shares}  {rates}  {faults:>7.0f}  {busy / computed_tiles * 1e6:>7.2f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": command_line(), "environment": environment("cpu"), "threads": threads,
                   "peak_gflops": round(peak / 1e9, 1), "tile_gemm_gflops": round(tile_peak / 1e9, 1),
                   "rows": rows}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
