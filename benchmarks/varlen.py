"""Packed variable-length sequences: fastattn.varlen_attention forward+backward against the
same sequences as a padded batch with a key-padding mask, on fastattn and on PyTorch SDPA.
CPU, timed interleaved in one run (fastattn.benchmark).

    python benchmarks/varlen.py [--quick] [--causal] [--out benchmarks/results/cpu_varlen.json]

32 sequences with lengths uniform in [16, 512] (fixed seed), H=12, D=64, fp32. The padded
batch is (32, 12, longest, 64): every row computes the longest length's queries and keys,
the mask hides the padding keys. Figures (ratios measured in this run): varlen fwd+bwd
against fastattn on the padded batch and against SDPA on the padded batch.

Next to them the script prints the ideal speedup over the padded batch, from the lengths
alone: a kernel can skip the padding keys (the mask hides them) but not the padding queries
(a key-padding mask leaves their rows defined: they attend to the real keys), so sequence b
costs longest x L_b scores padded (causal: sum over the longest queries of min(i + 1, L_b))
against L_b x L_b packed (causal: L_b (L_b + 1) / 2). With these lengths that ratio is about
1.5, so it bounds the first figure whatever the kernels do.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastattn  # noqa: E402
from fastattn.benchmark.measure import Timing, time_cpu  # noqa: E402
from fastattn.benchmark.report import command_line, environment  # noqa: E402

SEQUENCES, HEADS, HEAD_DIM, SHORTEST, LONGEST = 32, 12, 64, 16, 512
TARGETS = {"varlen speedup vs fastattn padded": 1.6, "varlen speedup vs sdpa padded": 2.0}  # at least


def make_inputs(seed=0):
    """Packed q, k, v (total, H, D), cumulative lengths, and the same tokens padded to
    (B, H, longest, D) with their key-padding mask (B, 1, 1, longest)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(SHORTEST, LONGEST + 1, (SEQUENCES,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    total, width = int(cu[-1]), int(lengths.max())
    packed = [torch.randn(total, HEADS, HEAD_DIM, generator=g) for _ in range(3)]
    keep = torch.arange(width) < lengths[:, None]  # (B, width)
    padded = []
    for t in packed:
        rows = torch.zeros(SEQUENCES, width, HEADS, HEAD_DIM)
        rows[keep] = t
        padded.append(rows.transpose(1, 2).contiguous())
    return dict(packed=packed, cu=cu, longest=width, padded=padded, mask=keep.view(SEQUENCES, 1, 1, width),
                lengths=lengths)


def ideal_speedup(lengths, longest, causal):
    """Scores computed for the padded batch (padding keys skipped, padding queries not) over
    those of the packed sequences: the most packing can gain over the padded batch."""
    lengths = [int(n) for n in lengths]
    if causal:
        padded = sum(sum(min(i + 1, n) for i in range(longest)) for n in lengths)
        packed = sum(n * (n + 1) // 2 for n in lengths)
    else:
        padded, packed = sum(longest * n for n in lengths), sum(n * n for n in lengths)
    return padded / packed


def steps(c, causal):
    """Factories of fwd+bwd steps (fresh gradient seeds per run, made outside the timing)."""
    def fwd_bwd(forward, inputs):
        def make():
            leaves = [t.detach().requires_grad_() for t in inputs]
            grad = torch.randn_like(inputs[0][..., :HEAD_DIM])

            def step():
                out = forward(*leaves)
                torch.autograd.grad(out, leaves, grad)

            return step

        return make

    def varlen(q, k, v):
        return fastattn.varlen_attention(q, k, v, c["cu"], c["cu"], c["longest"], c["longest"], causal=causal)

    def padded_fastattn(q, k, v):
        return fastattn.attention(q, k, v, attn_mask=c["mask"], causal=causal)

    def padded_sdpa(q, k, v):
        mask = c["mask"] & torch.ones(c["longest"], c["longest"], dtype=torch.bool).tril() if causal else c["mask"]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return {
        "varlen": fwd_bwd(varlen, c["packed"]),
        "fastattn padded": fwd_bwd(padded_fastattn, c["padded"]),
        "sdpa padded": fwd_bwd(padded_sdpa, c["padded"]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--causal", action="store_true", help="causal attention within each sequence")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu_varlen.json"))
    args = parser.parse_args()
    timing = Timing(min_reps=3, budget_s=0.5, max_reps=10) if args.quick else Timing(min_reps=7, budget_s=3.0, max_reps=30)
    c = make_inputs()
    factories = steps(c, args.causal)
    for make in factories.values():  # warm-up
        make()()
    results = time_cpu(list(factories.values()), timing)
    ms = {name: result[0] for name, result in zip(factories, results)}
    runs = {name: result[1] for name, result in zip(factories, results)}
    figures = {
        "varlen speedup vs fastattn padded": ms["fastattn padded"] / ms["varlen"],
        "varlen speedup vs sdpa padded": ms["sdpa padded"] / ms["varlen"],
    }
    lengths = c["lengths"]
    case = (f"fwd+bwd{' causal' if args.causal else ''} fp32, {SEQUENCES} sequences of {int(lengths.min())}-"
            f"{int(lengths.max())} tokens ({int(lengths.sum())} in all, padded to {c['longest']}), H={HEADS} D={HEAD_DIM}")
    print(case)
    for name, value in ms.items():
        print(f"  {name:<18} {value:9.1f} ms  ({runs[name]} runs)")
    ideal = ideal_speedup(lengths, c["longest"], args.causal)
    print(f"\nideal speedup over the padded batch (from the lengths): {ideal:.3f}; varlen reaches "
          f"{figures['varlen speedup vs fastattn padded'] / ideal:.0%} of it")
    print(f"\n{'figure':<36} {'value':>7}  target")
    checked = []
    for figure, value in figures.items():
        bound = TARGETS[figure]
        checked.append({"figure": figure, "value": round(value, 3), "target": f">= {bound}", "met": value >= bound})
        print(f"{figure:<36} {value:7.2f}  >= {bound}  {'met' if value >= bound else 'NOT MET'}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": command_line(), "environment": environment("cpu"), "threads": torch.get_num_threads(),
                   "case": case, "lengths": lengths.tolist(), "ms": {k: round(v, 2) for k, v in ms.items()},
                   "runs": runs, "ideal speedup vs padded": round(ideal, 3), "targets": checked}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
