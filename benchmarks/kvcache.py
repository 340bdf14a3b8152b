"""Decoding with a KV cache: fastattn.attention_with_kvcache against PyTorch SDPA on the same
tensors, contiguous and paged caches, split-KV across threads, and the cache-read bandwidth
against a copy of the same bytes. CPU, timed interleaved in one run (fastattn.benchmark).

    python benchmarks/kvcache.py [--quick] [--out benchmarks/results/cpu_kvcache.json]

Figures (each a ratio measured in this run):
  decode fp32 / bf16   B=8, Hq=32, Hkv=8, D=128, 4095 cached tokens + 1 new one (appended in
                       place), against SDPA(enable_gqa=True) over the same 4096-token cache
  paged / contiguous   the same step on a paged cache (64-token pages in shuffled order)
  split-KV             B=1, Hq=32, Hkv=8, 32768 cached tokens: 2 threads against 1
  bandwidth            cache bytes read per second by the decode step, against a copy of the
                       same bytes (torch.Tensor.copy_), for the contiguous fp32 step
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastattn  # noqa: E402
from fastattn.benchmark.measure import Timing, time_named  # noqa: E402
from fastattn.benchmark.report import script_args, write_figures  # noqa: E402

PAGE = 64
TARGETS = {  # figure: (bound, "min" = at least / "max" = at most)
    "decode fp32 speedup vs sdpa": (1.5, "min"),
    "decode bf16 speedup vs sdpa": (2.0, "min"),
    "paged / contiguous time (fp32)": (1.15, "max"),
    "paged / contiguous time (bf16)": (1.15, "max"),
    "split-KV speedup, 2 threads vs 1": (1.7, "min"),
    "cache read bandwidth / copy bandwidth": (0.6, "min"),
}


def make_cache(B, Hq, Hkv, cached, D, dtype, seed=0):
    """q and the new token's k/v, a contiguous cache holding `cached` tokens and the same
    rows as a paged cache (pages in shuffled order)."""
    g = torch.Generator().manual_seed(seed)
    room = cached + 1
    pages_per_row = -(-room // PAGE)
    k = torch.randn(B, Hkv, pages_per_row * PAGE, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, pages_per_row * PAGE, D, generator=g).to(dtype)
    table = torch.randperm(B * pages_per_row, generator=g).view(B, pages_per_row).to(torch.int32)
    k_pages, v_pages = (
        torch.empty(B * pages_per_row, Hkv, PAGE, D, dtype=dtype) for _ in range(2)
    )
    for rows, pages in ((k, k_pages), (v, v_pages)):
        pages[table.flatten().long()] = rows.view(B, Hkv, pages_per_row, PAGE, D).transpose(1, 2).flatten(0, 1)
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype)
    new = torch.randn(B, Hkv, 1, D, generator=g).to(dtype), torch.randn(B, Hkv, 1, D, generator=g).to(dtype)
    lengths = torch.full((B,), cached, dtype=torch.int32)
    return dict(q=q, k=k, v=v, table=table, k_pages=k_pages, v_pages=v_pages, new=new, lengths=lengths, room=room)


def decode_steps(c):
    """Step callables: fastattn on the contiguous and the paged cache, SDPA on the same tokens."""
    k_new, v_new = c["new"]
    room = c["room"]

    def contiguous():
        fastattn.attention_with_kvcache(c["q"], c["k"], c["v"], cache_seqlens=c["lengths"], k_new=k_new, v_new=v_new)

    def paged():
        fastattn.attention_with_kvcache(c["q"], c["k_pages"], c["v_pages"], cache_seqlens=c["lengths"],
                                        k_new=k_new, v_new=v_new, block_table=c["table"])

    def sdpa():
        F.scaled_dot_product_attention(c["q"], c["k"][:, :, :room], c["v"][:, :, :room], enable_gqa=True)

    return {"fastattn": contiguous, "fastattn paged": paged, "sdpa": sdpa}


def main():
    args = script_args(__doc__, "cpu_kvcache.json", "smaller caches and fewer repetitions")
    timing = Timing(min_reps=3, budget_s=0.3, max_reps=10) if args.quick else Timing(min_reps=10, budget_s=2.0, max_reps=60)
    cached, long_cached = (1023, 8191) if args.quick else (4095, 32767)
    threads = torch.get_num_threads()
    figures, rows = {}, []

    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.").replace("float32", "fp32").replace("bfloat16", "bf16")
        c = make_cache(8, 32, 8, cached, 128, dtype)
        ms = time_named(decode_steps(c), timing)
        rows.append({"case": f"decode {name} B=8 Hq=32 Hkv=8 D=128 keys={cached + 1}", **{k: round(v, 3) for k, v in ms.items()}})
        figures[f"decode {name} speedup vs sdpa"] = ms["sdpa"] / ms["fastattn"]
        figures[f"paged / contiguous time ({name})"] = ms["fastattn paged"] / ms["fastattn"]
        if dtype == torch.float32:
            cache_bytes = 2 * c["k"][:, :, : c["room"]].numel() * c["k"].element_size()
            k_copy, v_copy = c["k"].clone(), c["v"].clone()
            copy_ms = time_named({"copy": lambda: (k_copy.copy_(c["k"]), v_copy.copy_(c["v"]))}, timing)["copy"]
            copy_ms *= c["room"] / c["k"].shape[2]  # the same bytes as the step reads
            figures["cache read bandwidth / copy bandwidth"] = copy_ms / ms["fastattn"]
            rows.append({"case": "bandwidth fp32", "cache GB/s": round(cache_bytes / ms["fastattn"] / 1e6, 2),
                         "copy GB/s": round(cache_bytes / copy_ms / 1e6, 2)})

    c = make_cache(1, 32, 8, long_cached, 128, torch.float32)
    step = decode_steps(c)["fastattn"]
    per_threads = {}
    for n in (1, threads):
        torch.set_num_threads(n)
        per_threads[n] = time_named({"step": step}, timing)["step"]
    torch.set_num_threads(threads)
    figures["split-KV speedup, 2 threads vs 1"] = per_threads[1] / per_threads[threads]
    rows.append({"case": f"split-KV B=1 Hq=32 Hkv=8 keys={long_cached + 1} fp32",
                 "1 thread": round(per_threads[1], 3), f"{threads} threads": round(per_threads[threads], 3)})

    write_figures(args.out, rows, figures, TARGETS)


if __name__ == "__main__":
    main()
