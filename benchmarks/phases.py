"""Where the CPU forward's time goes: each phase of fastattn's attention forward kernel, timed
inside the kernel (fastattn._C.cpu_forward_phase_ns), against the machine's peak FMA rate
measured in the same run.

    python benchmarks/phases.py [--quick] [--out benchmarks/results/cpu_phases.json]

Phases (csrc/cpu/params.h FwdPhase): pack (Q^T, K and V converted to fp32 tiles, the mask
read), scores (S^T = K Q^T), softmax (cap, ALiBi, mask, online max / exp / sum, O rescaled),
values (O += P V), store (O normalised and written). For the two GEMM phases the table gives
their own rate (their FLOPs over the CPU time spent in them, per core) as a fraction of the
peak FMA rate per core; the whole forward's rate is attention's 4 * Sq * Sk * D FLOPs over its
wall time, as a fraction of the peak of every core. The kernel reaches the peak only if every
phase but the GEMMs is free and the GEMMs run at the peak: the breakdown says which of the two
is missing, and by how much.
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastattn import ops  # noqa: E402
from fastattn.benchmark.report import command_line, environment, script_args  # noqa: E402

# (label, (B, H, S, D)): the CPU targets' forward shapes (issue: head dims 64 and 128).
CASES = [("D64", (4, 12, 512, 64)), ("D128", (2, 8, 1024, 128)), ("causal D64", (1, 12, 2048, 64))]
FMA_ITERATIONS = 2_000_000
REPEATS = 5
TILE = 64  # queries and keys per tile of the forward kernel (csrc/cpu/kernels.h kFwdBQ, kFwdBK)


def peak_flops_per_s():
    """The peak FMA rate of all intra-op threads together, FLOP/s (the best of three runs)."""
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        flops = ops._C.cpu_fma_peak(FMA_ITERATIONS)
        best = max(best, flops / (time.perf_counter() - start))
    return best


def measure(shape, causal):
    """The median over REPEATS calls of the forward's wall time (s) and of each phase's CPU time
    (s, summed over threads)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    window = (-1, 0) if causal else (-1, -1)
    ops._C.cpu_forward_phase_ns(q, k, v, *window)  # warm-up: scratch buffers, caches
    walls, phases = [], []
    for _ in range(REPEATS):
        start = time.perf_counter()
        ns = ops._C.cpu_forward_phase_ns(q, k, v, *window)
        walls.append(time.perf_counter() - start)
        phases.append([t * 1e-9 for t in ns])
    by_wall = sorted(range(REPEATS), key=lambda i: walls[i])
    median = by_wall[REPEATS // 2]
    return walls[median], dict(zip(ops._C.cpu_forward_phases, phases[median]))


def main():
    args = script_args(__doc__, "cpu_phases.json", "smaller shapes")
    threads = torch.get_num_threads()
    peak = peak_flops_per_s()
    print(f"peak FMA rate: {peak / 1e9:.1f} GFLOP/s on {threads} threads\n")
    print(f"{'case':<28} {'wall ms':>8} {'of peak':>8}  " + "  ".join(f"{p:>8}" for p in ops._C.cpu_forward_phases)
          + f"  {'QK^T/peak':>9} {'PV/peak':>8}")
    rows = []
    for label, shape in CASES:
        causal = label.startswith("causal")
        if args.quick:
            shape = (1, 2, shape[2] // 4, shape[3])
        B, H, S, D = shape
        visible = S * (S + 1) / 2 if causal else S * S  # attention's scores
        tiles = S // TILE * (S // TILE + 1) / 2 if causal else (S // TILE) ** 2  # the GEMMs' (S % TILE == 0)
        gemm_flops = 2 * B * H * tiles * TILE * TILE * D  # per GEMM phase
        wall, phase_s = measure(shape, causal)
        busy = sum(phase_s.values())
        per_core_peak = peak / threads
        row = {
            "case": f"{label} B{B} H{H} S{S} fp32 fwd",
            "wall_ms": round(wall * 1e3, 2),
            "forward / peak": round(4 * B * H * visible * D / wall / peak, 3),
            "phase share": {name: round(t / busy, 3) for name, t in phase_s.items()},
            "scores GEMM / peak": round(gemm_flops / phase_s["scores"] / per_core_peak, 3),
            "values GEMM / peak": round(gemm_flops / phase_s["values"] / per_core_peak, 3),
        }
        rows.append(row)
        shares = "  ".join(f"{row['phase share'][name]:>8.1%}" for name in ops._C.cpu_forward_phases)
        print(f"{label + f' S{S} D{D}':<28} {row['wall_ms']:>8} {row['forward / peak']:>8.2f}  {shares}  "
              f"{row['scores GEMM / peak']:>9.2f} {row['values GEMM / peak']:>8.2f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": command_line(), "environment": environment("cpu"), "threads": threads,
                   "peak_gflops": round(peak / 1e9, 1), "rows": rows}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
