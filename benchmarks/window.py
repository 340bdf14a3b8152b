"""Score modifiers on CPU: fastattn's windowed forward against its own full causal forward and
against PyTorch SDPA given the equivalent boolean mask, and the cost of softcap, sinks and
ALiBi, timed interleaved in one run (fastattn.benchmark).

    python benchmarks/window.py [--quick] [--modernbert-layers N] [--out benchmarks/results/cpu_window.json]

Figures (each a ratio measured in this run), fp32 forward:
  window vs causal   causal sliding window of 256 keys over (1, 8, 16384, 64): fastattn's full
                     causal forward time / its windowed forward time
  window vs SDPA     SDPA given the window as a boolean (S, S) mask / fastattn windowed
  softcap overhead   fastattn with softcap=50 / without, (1, 8, 4096, 64), no mask and causal
  sinks overhead     fastattn with a sink per head / without, (1, 8, 4096, 64), causal, forward
                     and backward (the sinks' gradient included)
  ALiBi overhead     fastattn with BLOOM's slopes / without, the same shape, causal, forward and
                     backward (bound: softcap's 30%, this project's own)
  ALiBi vs SDPA      SDPA given ALiBi's bias and the causal rule as one float mask (as BLOOM-style
                     models feed it) / fastattn with alibi_slopes, causal, forward and backward
  ModernBERT         a ModernBERT-base-sized encoder from its config (random weights: 768 wide,
                     12 heads, local windows of 128 tokens with a global layer every third),
                     forward of a padded batch of 4 sequences of 4096, 3072, 2048 and 1024
                     tokens: "sdpa" time / "fastattn" time through transformers. Timed with the
                     model's first --modernbert-layers layers (default 3: one global and two
                     local, the model's own pattern, so the ratio is the 22-layer model's up to
                     its embeddings and head). Its row also times the model with an attention
                     that costs nothing (zeros): "sdpa" time / that time bounds the speedup any
                     attention kernel can give this model (Amdahl).
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastattn  # noqa: E402
import fastattn.integrations.transformers as fastattn_hf  # noqa: E402
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
    "sinks time / no sinks (causal fwd+bwd)": (1.1, "max"),  # O(S * D) on top of O(S^2 * D)
    "alibi time / no alibi (causal fwd+bwd)": (1.3, "max"),
    "alibi vs SDPA with the bias as a float mask speedup (causal fwd+bwd)": (1.5, "min"),
    "ModernBERT padded batch forward speedup vs sdpa": (3.0, "min"),
}


def free_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention that costs nothing: zeros shaped like transformers' attention output."""
    return query.new_zeros(query.shape).transpose(1, 2), None


def modernbert_forward(layers, lengths, impl):
    """A no-grad forward of a ModernBERT-base-sized encoder (random weights) with `layers`
    layers over a right-padded batch of `lengths`, through attn_implementation `impl`."""
    import transformers

    config = transformers.ModernBertConfig(num_hidden_layers=layers, global_attn_every_n_layers=3,
                                           local_attention=128, max_position_embeddings=max(lengths))
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config, attn_implementation=impl).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, config.vocab_size, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths).view(-1, 1)).long()

    def run():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state

    return run, mask.bool()


def main():
    args = script_args(__doc__, "cpu_window.json", "shorter sequences and fewer repetitions",
                       extra=[("--modernbert-layers", dict(type=int, default=3))])
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

    q, k, v = (t.requires_grad_() for t in (q, k, v))
    sinks = torch.randn(8, generator=g).requires_grad_()

    def forward_backward(**options):
        out = fastattn.attention(q, k, v, causal=True, **options)
        out.backward(torch.ones_like(out))

    ms = time_named({"sinks": lambda: forward_backward(sinks=sinks), "plain": forward_backward}, timing)
    rows.append({"case": f"sinks, causal, B1 H8 S{cap_seq} D64 fp32 fwd+bwd",
                 **{n: round(t, 2) for n, t in ms.items()}})
    figures["sinks time / no sinks (causal fwd+bwd)"] = ms["sinks"] / ms["plain"]

    slopes = 2.0 ** (-8.0 * torch.arange(1, 9) / 8)  # BLOOM's, 8 heads
    bias = reference.alibi_bias(slopes, cap_seq, cap_seq, reference.CAUSAL, torch.float32)
    bias = bias.masked_fill(~reference.window_visibility(cap_seq, cap_seq, reference.CAUSAL, "cpu"), float("-inf"))

    def sdpa_forward_backward():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out.backward(torch.ones_like(out))

    ms = time_named({"alibi": lambda: forward_backward(alibi_slopes=slopes), "plain": forward_backward,
                     "sdpa float mask": sdpa_forward_backward}, timing)
    rows.append({"case": f"alibi, causal, B1 H8 S{cap_seq} D64 fp32 fwd+bwd",
                 **{n: round(t, 2) for n, t in ms.items()}})
    figures["alibi time / no alibi (causal fwd+bwd)"] = ms["alibi"] / ms["plain"]
    figures["alibi vs SDPA with the bias as a float mask speedup (causal fwd+bwd)"] = ms["sdpa float mask"] / ms["alibi"]

    fastattn_hf.register()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("attention-free", free_attention)
    AttentionMaskInterface.register("attention-free", AttentionMaskInterface._global_mapping["sdpa"])
    lengths = [1024, 768, 512, 256] if args.quick else [4096, 3072, 2048, 1024]
    runs = {impl: modernbert_forward(args.modernbert_layers, lengths, impl)
            for impl in ("fastattn", "sdpa", "attention-free")}
    (fast_run, valid), (sdpa_run, _) = runs["fastattn"], runs["sdpa"]
    difference = (fast_run()[valid] - sdpa_run()[valid]).abs().max().item()  # same weights, same tokens
    ms = time_named({impl: run for impl, (run, _) in runs.items()}, Timing(min_reps=2, budget_s=0.0, max_reps=2))
    rows.append({"case": f"ModernBERT-base {args.modernbert_layers} layers, padded {lengths} fp32 fwd",
                 **{n: round(t, 1) for n, t in ms.items()}, "max |fastattn - sdpa|": difference,
                 "bound: sdpa / attention-free": round(ms["sdpa"] / ms["attention-free"], 2)})
    figures["ModernBERT padded batch forward speedup vs sdpa"] = ms["sdpa"] / ms["fastattn"]

    write_figures(args.out, rows, figures, TARGETS)


if __name__ == "__main__":
    main()
