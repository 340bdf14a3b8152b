"""Decoding with a KV cache: fastattn.attention_with_kvcache against PyTorch SDPA on the same
tensors, contiguous and paged caches, split-KV across threads, and the cache-read bandwidth
against a copy of the same bytes. CPU, timed interleaved in one run (fastattn.benchmark).

    python benchmarks/kvcache.py [--quick] [--only kernels|generate] [--out benchmarks/results/cpu_kvcache.json]

Figures (each a ratio measured in this run):
  decode fp32 / bf16   B=8, Hq=32, Hkv=8, D=128, 4095 cached tokens + 1 new one (appended in
                       place), against SDPA(enable_gqa=True) over the same 4096-token cache
  paged / contiguous   the same step on a paged cache (64-token pages in shuffled order)
  split-KV             B=1, Hq=32, Hkv=8, 32768 cached tokens: 2 threads against 1
  bandwidth            cache bytes read per second by the decode step, against a copy of the
                       same bytes (torch.Tensor.copy_), for the contiguous fp32 step
  generate             model.generate() of Llama-style models (random weights, GQA, fp32), one
                       2048-token prompt, 128 new tokens, greedy, static and dynamic caches:
                       tokens/s of attn_implementation "fastattn" against "sdpa" (eager's
                       (2048, 2048) score matrices per head make it too slow to include), timed
                       interleaved. Each run also splits its time into the prefill (first
                       forward) and the decoding steps, and within those the attention calls
                       and the mask building (timers around the registered functions), so the
                       share attention has of a step, and the most a faster attention can gain,
                       show beside the speedup.
"""
import collections
import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastattn  # noqa: E402
from fastattn.benchmark.measure import Timing, time_named  # noqa: E402
from fastattn.benchmark.report import script_args, write_figures  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PAGE = 64
GENERATE_IMPLS = ("fastattn", "sdpa")
GENERATE_CACHES = ("static", "dynamic")
# Llama-style configs (head dim 64, 4 query heads per kv head): one about TinyLlama's width
# (attention a small share of a decoding step), one narrow with a small vocabulary, where the
# cache reads weigh more against the weights.
GENERATE_MODELS = {
    "llama-1024w-8L": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                           intermediate_size=2816, vocab_size=32000),
    "llama-256w-4L": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                          intermediate_size=704, vocab_size=4096),
}
GENERATE_SPEEDUP_TARGET = 1.2
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


class PhaseTimer:
    """Seconds per step of a generate() call (the first step is the prefill), a step running
    from the end of the previous model forward to the end of its own (so generate()'s work
    between forwards, mask building included, counts), and within each step the time in the
    attention and mask functions registered under the implementation's name."""

    def __init__(self):
        self.steps = []  # per step: {"total": s, "attention": s, "mask": s}
        self.current = collections.Counter()
        self.step_start = time.perf_counter()

    def timed(self, part, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[part] += time.perf_counter() - start
        return wrapper

    def timed_forward(self, forward):
        def wrapper(*args, **kwargs):
            out = forward(*args, **kwargs)
            end = time.perf_counter()
            self.current["total"] = end - self.step_start
            self.steps.append(self.current)
            self.current, self.step_start = collections.Counter(), end
            return out
        return wrapper

    @contextlib.contextmanager
    def around(self, model, impl):
        """Times `model`'s forwards and the attention and mask functions of `impl` while inside."""
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        interfaces = [(AttentionInterface, "attention"), (AttentionMaskInterface, "mask")]
        originals = [interface._global_mapping[impl] for interface, _ in interfaces]
        for (interface, part), fn in zip(interfaces, originals):
            interface._global_mapping[impl] = self.timed(part, fn)
        model.forward = self.timed_forward(model.forward)
        self.step_start = time.perf_counter()
        try:
            yield self
        finally:
            del model.forward
            for (interface, _), fn in zip(interfaces, originals):
                interface._global_mapping[impl] = fn

    def split(self):
        """{"prefill"|"decode": {"total"|"attention"|"mask": seconds}}."""
        decode = sum(self.steps[1:], collections.Counter())
        return {"prefill": dict(self.steps[0]), "decode": dict(decode)}


def generate_models(config):
    """The same random weights under each of GENERATE_IMPLS."""
    import transformers

    import fastattn.integrations.transformers as fastattn_hf

    fastattn_hf.register()
    torch.manual_seed(0)
    models = {}
    for impl in GENERATE_IMPLS:  # a config each: from_config records the implementation in it
        llama = transformers.LlamaConfig(**config, max_position_embeddings=4096, bos_token_id=1, eos_token_id=None,
                                         pad_token_id=0)
        models[impl] = transformers.AutoModelForCausalLM.from_config(llama, attn_implementation=impl).eval()
    for model in list(models.values())[1:]:
        model.load_state_dict(models[GENERATE_IMPLS[0]].state_dict())
    return models


def time_generate(models, prompt, new_tokens, cache, rounds):
    """Per implementation, the median over `rounds` (interleaved) of generate()'s seconds and
    of its phase split (PhaseTimer.split), and the tokens of the last run."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  cache_implementation=cache)
    runs, tokens = collections.defaultdict(list), {}
    with torch.no_grad():
        for model in models.values():  # warm-up: the first call of each runs transformers' one-off set-up
            model.generate(input_ids=prompt[:, :16], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
        for _ in range(rounds):
            for impl, model in models.items():
                with PhaseTimer().around(model, impl) as timer:
                    start = time.perf_counter()
                    tokens[impl] = model.generate(input_ids=prompt, **kwargs)
                    runs[impl].append((time.perf_counter() - start, timer.split()))
    medians = {}
    for impl, timings in runs.items():
        timings.sort(key=lambda run: run[0])
        medians[impl] = timings[len(timings) // 2]
    return medians, tokens


def generate_rows(quick):
    """Rows and figures of the generate() cases."""
    prompt_len, new_tokens, rounds = (256, 16, 1) if quick else (2048, 128, 2)
    rows, figures = [], {}
    for name, config in GENERATE_MODELS.items():
        models = generate_models(config)
        prompt = torch.randint(2, config["vocab_size"], (1, prompt_len), generator=torch.Generator().manual_seed(0))
        for cache in GENERATE_CACHES:
            medians, tokens = time_generate(models, prompt, new_tokens, cache, rounds)
            row = {"case": f"generate {name} {cache} prompt={prompt_len} new={new_tokens}",
                   "tokens equal": torch.equal(tokens["fastattn"], tokens["sdpa"])}
            for impl, (seconds, phases) in medians.items():
                decode = phases["decode"]
                row[f"{impl} tokens/s"] = round(new_tokens / seconds, 3)
                row[f"{impl} prefill s"] = round(phases["prefill"]["total"], 3)
                row[f"{impl} decode tokens/s"] = round((new_tokens - 1) / decode["total"], 3)
                row[f"{impl} decode attention share"] = round(decode["attention"] / decode["total"], 3)
                row[f"{impl} decode mask share"] = round(decode["mask"] / decode["total"], 3)
                row[f"{impl} prefill attention share"] = round(
                    phases["prefill"]["attention"] / phases["prefill"]["total"], 3)
            rows.append(row)
            figure = f"generate {name} {cache}: tokens/s vs sdpa"
            figures[figure] = row["fastattn tokens/s"] / row["sdpa tokens/s"]
    return rows, figures


def kernel_rows(quick):
    """Rows and figures of the decoding-step cases."""
    timing = Timing(min_reps=3, budget_s=0.3, max_reps=10) if quick else Timing(min_reps=10, budget_s=2.0, max_reps=60)
    cached, long_cached = (1023, 8191) if quick else (4095, 32767)
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
    return rows, figures


PARTS = {"kernels": kernel_rows, "generate": generate_rows}


def main():
    args = script_args(__doc__, "cpu_kvcache.json", "smaller caches and fewer repetitions", parts=tuple(PARTS))
    rows, figures = [], {}
    for part, measure in PARTS.items():
        if args.only in (None, part):
            part_rows, part_figures = measure(args.quick)
            rows += part_rows
            figures.update(part_figures)
    targets = {**TARGETS, **{figure: (GENERATE_SPEEDUP_TARGET, "min") for figure in figures if figure not in TARGETS}}
    write_figures(args.out, rows, figures, targets)


if __name__ == "__main__":
    main()
