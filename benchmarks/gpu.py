"""GPU benchmark: fastattn's CUDA and Triton kernels against every SDPA kernel that runs.

    python benchmarks/gpu.py [--head-dims 64 128 256] [--seqs 512 ... 16384] [--out FILE]

Attention (bf16, 16k tokens per batch, hidden size 2048 so heads = 2048 / head dim): forward
and backward TFLOP/s for head dims 64 / 128 / 256, S 512..16384, causal and not, plus key
padding that hides half the keys and a causal sliding window of 256 keys (SDPA given it as a
boolean mask; TFLOP/s count the visible scores only); each fastattn backend and each SDPA kernel (flash, efficient,
cuDNN, and the math one for masks where the others refuse) on the same fresh random inputs.
Backward is timed through autograd for both libraries (the backward kernels only: the forward
graph is built once and kept). Softmax: GB/s of the fused masked softmax against a measured
device-to-device copy. KV-cache decoding (one new query per row, Hq 32, Hkv 8, head dim 128,
fp16 and bf16, the cache contiguous or in shuffled pages of 16): B 8 with 4096 cached tokens
and B 1 with 32768 (split-KV), the GB/s at which the CUDA op, the Triton op and SDPA
(enable_gqa, on the contiguous cache) read the cache, against a copy of as many bytes timed in
the same run. Times are medians of CUDA-event timings (triton.testing.do_bench).
Writes JSON (device, versions, command, rows) to --out and prints a table with ratios to the
best SDPA kernel of each case.
"""
import argparse
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastattn

SDPA_KERNELS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
}
TOKENS = 16384
HIDDEN = 2048
WINDOW = 256  # keys before the diagonal a query sees in the sliding-window cases


def bench_ms(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def attention_flops(B, H, Sq, Sk, D, causal, visible_fraction=1.0):
    # two matmuls of 2*Sq*Sk*D each; causal (Sq == Sk) sees about half the scores
    return 4 * B * H * Sq * Sk * D * (0.5 if causal else 1.0) * visible_fraction


def attention_cases(head_dims, seqs):
    """(D, S, causal, key padding, sliding window): head dim 128 first, then key padding and
    the window, then 64 and 256: a run cut short keeps the main ones."""
    for D in sorted(head_dims, key=lambda d: (d != 128, d)):
        for S in seqs:
            for causal in (False, True):
                yield D, S, causal, False, False
        if D == 128:
            for S in [s for s in seqs if s in (1024, 4096, 16384)]:
                yield 128, S, False, True, False
                yield 128, S, True, False, True


def run_attention_case(D, S, causal, key_padding, sliding):
    B, H = max(1, TOKENS // S), HIDDEN // D
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = None
    visible = 1.0
    if key_padding:  # every row sees the first half of the keys
        mask = (torch.arange(S, device="cuda") < S // 2)[None, None, None, :].expand(B, 1, S, S)
        visible = 0.5
    window = (WINDOW, None) if sliding else None
    sdpa_mask = mask
    if sliding:  # SDPA gets the window as a boolean mask; fastattn skips the blocks outside it
        sdpa_mask = fastattn.reference.window_visibility(S, S, fastattn.reference.Window(WINDOW, 0), "cuda")
        visible = sdpa_mask.sum().item() / (S * S) * 2  # attention_flops halves causal cases
    grad_out = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
    flops = attention_flops(B, H, S, S, D, causal, visible)

    def fastattn_call(backend):
        return lambda: fastattn.attention(q, k, v, attn_mask=mask, causal=causal, window=window, backend=backend)

    def sdpa_call(kernel):
        def call():
            with sdpa_kernel(kernel):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=causal and sdpa_mask is None)
        return call

    # SDPA first: the first SDPA kernel that runs gives the output every other one is checked
    # against (a wrong result is flagged in the table, and its time kept for diagnosis)
    impls = {name: sdpa_call(kernel) for name, kernel in SDPA_KERNELS.items()}
    if (key_padding or sliding) and S <= 4096:  # the math kernel materialises B*H*S*S scores
        impls["sdpa_math"] = sdpa_call(SDPBackend.MATH)
    impls.update({"fastattn_cuda": fastattn_call("cuda"), "fastattn_triton": fastattn_call("triton")})
    name = (f"D{D} S{S} B{B} H{H}" + (" causal" if causal else "") + (" keypad50%" if key_padding else "")
            + (f" window{WINDOW}" if sliding else ""))
    rows = []
    expected = None
    for impl, call in impls.items():
        row = {"case": name, "impl": impl, "D": D, "S": S, "B": B, "H": H, "causal": causal,
               "key_padding": key_padding, "window": window}
        try:
            with torch.no_grad():
                out = call().float()
            if expected is None:
                expected = out
            else:
                row["rel_err"] = ((out - expected).norm() / expected.norm()).item()
                row["wrong"] = not row["rel_err"] < 2e-2  # bf16 outputs agree to about 4e-3
            with torch.no_grad():
                ms = bench_ms(call)
            row.update(fwd_ms=ms, fwd_tflops=flops / ms / 1e9)
            out = call()
            ms = bench_ms(lambda: torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True))
            row.update(bwd_ms=ms, bwd_tflops=2.5 * flops / ms / 1e9)
        except Exception as e:  # an SDPA kernel that refuses this case, or a failure to report
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        rows.append(row)
    del q, k, v, mask, sdpa_mask, grad_out
    torch.cuda.empty_cache()
    return rows


def copy_gbs():
    src = torch.randn(256 * 1024 * 1024, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def decode_cases():
    """(B, cached tokens, dtype, block size or None): B 8 x 4096 fills the device with rows,
    B 1 x 32768 needs split-KV."""
    for B, length in ((8, 4096), (1, 32768)):
        for dtype in (torch.float16, torch.bfloat16):
            for block in (None, 16):
                yield B, length, dtype, block


def decode_rows(B, length, dtype, block, Hq=32, Hkv=8, D=128):
    """Decode GB/s: bytes of K and V the rows see over the time of one call (a new query per
    row, causal), against a device copy of as many bytes (read + write: a copy's GB/s counts
    both, the decode only its reads, so `of_copy` is read GB/s / copy GB/s)."""
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=dtype)
    keys, values = (torch.randn(B, Hkv, length, D, device="cuda", dtype=dtype) for _ in range(2))
    seqlens = torch.full((B,), length, dtype=torch.int32, device="cuda")
    if block is None:
        table, k_cache, v_cache = None, keys, values
    else:  # rows' pages in shuffled order within one pool
        per_row = length // block
        table = torch.randperm(B * per_row, device="cuda").view(B, per_row).to(torch.int32)
        k_cache, v_cache = (torch.empty(B * per_row, Hkv, block, D, device="cuda", dtype=dtype) for _ in range(2))
        for pool, rows in ((k_cache, keys), (v_cache, values)):
            pool[table.flatten().long()] = rows.view(B, Hkv, per_row, block, D).transpose(1, 2).flatten(0, 1)
    scale = D ** -0.5
    nbytes = 2 * keys.numel() * keys.element_size()
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy = 2 * nbytes / bench_ms(lambda: dst.copy_(src)) / 1e6
    ops = torch.ops.fastattn
    impls = {
        "sdpa_gqa": lambda: F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=True),
        "fastattn_cuda": lambda: ops.attn_fwd_kvcache(q, k_cache, v_cache, seqlens, table, scale)[0],
        "fastattn_triton": lambda: ops.triton_attn_fwd_kvcache(q, k_cache, v_cache, seqlens, table, scale)[0],
    }
    name = f"B{B} L{length} {str(dtype)[6:]}" + (f" pages{block}" if block else "")
    rows, expected = [], None
    for impl, call in impls.items():
        row = {"case": name, "impl": impl, "B": B, "length": length, "block": block, "copy_gbs": copy}
        try:
            out = call().float()
            if expected is None:
                expected = out
            else:
                row["rel_err"] = ((out - expected).norm() / expected.norm()).item()
                row["wrong"] = not row["rel_err"] < 2e-2
            ms = bench_ms(call)
            row.update(ms=ms, read_gbs=nbytes / ms / 1e6, of_copy=nbytes / ms / 1e6 / copy)
        except Exception as e:  # an implementation that refuses this case
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        rows.append(row)
    del q, keys, values, k_cache, v_cache, src, dst
    torch.cuda.empty_cache()
    return rows


def print_decode_table(rows):
    print(f"{'decode case':<26} {'impl':<16} {'us':>8} {'read GB/s':>10} {'of copy':>8}")
    for r in rows:
        if "ms" not in r:
            print(f"{r['case']:<26} {r['impl']:<16} {r['error'][:60]}")
            continue
        flag = f"  WRONG (rel err {r['rel_err']:.2g})" if r.get("wrong") else ""
        print(f"{r['case']:<26} {r['impl']:<16} {r['ms'] * 1e3:8.1f} {r['read_gbs']:10.0f} {r['of_copy']:8.0%}{flag}")


def eager_softmax(x, mask, scale):
    """PyTorch's scaled, masked softmax as eager attention computes it (the baseline)."""
    scores = x * scale
    return torch.softmax(scores if mask is None else scores.masked_fill(~mask, float("-inf")), -1)


def softmax_rows(copy):
    rows = []
    for B, H, R, C, dtype, masked in ((8, 16, 1024, 1024, torch.bfloat16, False),
                                      (8, 16, 1024, 1024, torch.bfloat16, True),
                                      (4, 16, 512, 8192, torch.bfloat16, False),
                                      (4, 16, 2048, 2048, torch.float32, False)):
        x = torch.randn(B, H, R, C, device="cuda", dtype=dtype)
        mask = (torch.rand(B, 1, 1, C, device="cuda") > 0.1) if masked else None
        nbytes = 2 * x.numel() * x.element_size()  # read x, write y (the mask is negligible)
        name = f"B{B} H{H} R{R} C{C} {str(dtype)[6:]}" + (" keypad" if masked else "")
        for impl, call in (("fastattn", lambda: fastattn.softmax(x, mask, 0.125)),
                           ("torch", lambda: eager_softmax(x, mask, 0.125))):
            ms = bench_ms(call)
            rows.append({"case": name, "impl": impl, "ms": ms, "gbs": nbytes / ms / 1e6,
                         "of_copy": nbytes / ms / 1e6 / copy})
        y = fastattn.softmax(x, mask, 0.125)
        ref = eager_softmax(x.float(), mask, 0.125)
        rows[-2]["max_abs_err"] = (y.float() - ref).abs().max().item()
    return rows


def versions():
    import triton

    return {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "cudnn": torch.backends.cudnn.version(), "fastattn": fastattn.__version__,
            "python": platform.python_version()}


def print_attention_table(rows, header=True):
    if header:
        print(f"{'case':<34} {'impl':<16} {'fwd TF/s':>9} {'x best':>7} {'bwd TF/s':>9} {'x best':>7}")
    for case in dict.fromkeys(r["case"] for r in rows):
        group = [r for r in rows if r["case"] == case]
        sdpa = [r for r in group if r["impl"].startswith("sdpa") and "fwd_tflops" in r]
        best_fwd = max((r["fwd_tflops"] for r in sdpa), default=None)
        best_bwd = max((r["bwd_tflops"] for r in sdpa if "bwd_tflops" in r), default=None)
        for r in group:
            if "fwd_tflops" not in r:
                print(f"{case:<34} {r['impl']:<16} {r['error'][:60]}")
                continue
            rf = r["fwd_tflops"] / best_fwd if best_fwd else float("nan")
            rb = r["bwd_tflops"] / best_bwd if best_bwd and "bwd_tflops" in r else float("nan")
            flag = f"  WRONG (rel err {r['rel_err']:.2g})" if r.get("wrong") else ""
            bwd = f"{r['bwd_tflops']:9.1f} {rb:7.2f}" if "bwd_tflops" in r else f"{'-':>9} {'-':>7} {r['error'][:40]}"
            print(f"{case:<34} {r['impl']:<16} {r['fwd_tflops']:9.1f} {rf:7.2f} {bwd}{flag}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384],
                        help="sequence lengths (key padding runs at those of 1024, 4096, 16384)")
    parser.add_argument("--out", default="gpu_bench.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    result = {"versions": versions(), "command": " ".join(["python", "benchmarks/gpu.py", *sys.argv[1:]]),
              "attention": [], "softmax": [], "decode": []}
    copy = copy_gbs()
    result["copy_gbs"] = copy
    print(f"device-to-device copy: {copy:.0f} GB/s")
    result["softmax"] = softmax_rows(copy)
    for case in decode_cases():
        result["decode"] += decode_rows(*case)
    print_decode_table(result["decode"])
    for i, case in enumerate(attention_cases(args.head_dims, args.seqs)):
        rows = run_attention_case(*case)
        print_attention_table(rows, header=i == 0)
        result["attention"] += rows
        with open(args.out, "w") as f:  # written after every case: a cut-off run keeps what it measured
            json.dump(result, f, indent=1)
    print(json.dumps(result["versions"]))
    for r in result["softmax"]:
        print(f"softmax {r['case']:<30} {r['impl']:<9} {r['gbs']:8.0f} GB/s  {r['of_copy']:.0%} of copy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
