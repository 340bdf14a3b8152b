"""Attention benchmark: fastattn against PyTorch SDPA and eager softmax(q @ k^T) @ v.

    python benchmarks/attention.py [--quick] [--device cpu] [--out PATH]

Every case times all implementations in the same run, interleaved round by round (so a busy
machine slows them alike), and reports the median after warm-up on fresh random inputs:
milliseconds, GFLOP/s (forward 4*B*Hq*Sq*Sk*D, halved for square causal; backward 2.5x the
forward) and speed relative to SDPA. It also measures how much one long forward raises the
peak RSS of a fresh process. Results go to a JSON file (default
benchmarks/results/<device>_attention.json).
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fastattn  # noqa: E402

MEMORY_SHAPE = (1, 8, 8192, 64)

# name, (B, H, Sq, Sk, D), dtype, causal, key-padding mask (keeps the first half of the keys)
CASES = [
    ("base", (4, 12, 512, 512, 64), torch.float32, False, False),
    ("causal", (1, 12, 2048, 2048, 64), torch.float32, True, False),
    ("key-padding", (4, 12, 512, 512, 64), torch.float32, False, True),
    ("base-bf16", (4, 12, 512, 512, 64), torch.bfloat16, False, False),
    ("causal-bf16", (1, 12, 2048, 2048, 64), torch.bfloat16, True, False),
    ("head128", (2, 8, 1024, 1024, 128), torch.float32, False, False),
]


# ---------------------------------------------------------------- implementations
def fastattn_fn(q, k, v, mask, causal, device):
    backend = "cpu" if device == "cpu" else None
    return fastattn.attention(q, k, v, attn_mask=mask, causal=causal, backend=backend)


def sdpa_fn(q, k, v, mask, causal, device):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def eager_fn(q, k, v, mask, causal, device):
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


IMPLEMENTATIONS = {"fastattn": fastattn_fn, "sdpa": sdpa_fn, "eager": eager_fn}


# ---------------------------------------------------------------- timing
def synchronize(device):
    if device != "cpu":
        torch.cuda.synchronize()


def time_interleaved(fns, device, reps, warmup):
    """Median seconds per call of each fn; one call of each per round, so load spikes hit all."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def case_inputs(shape, dtype, key_padding, device, requires_grad):
    b, h, sq, sk, d = shape
    q, k, v = (torch.randn(b, h, s, d, dtype=dtype, device=device) for s in (sq, sk, sk))
    if requires_grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = None
    if key_padding:
        mask = torch.zeros(b, 1, 1, sk, dtype=torch.bool, device=device)
        mask[..., : sk // 2] = True
    return q, k, v, mask


def case_flops(shape, causal, backward):
    b, h, sq, sk, d = shape
    flops = 4 * b * h * sq * sk * d / (2 if causal and sq == sk else 1)
    return flops * (3.5 if backward else 1.0)


def run_case(name, shape, dtype, causal, key_padding, backward, device, reps, warmup, impls):
    q, k, v, mask = case_inputs(shape, dtype, key_padding, device, backward)
    grad = torch.randn(shape[0], shape[1], shape[2], shape[4], dtype=dtype, device=device)
    fns = {}
    for impl in impls:
        fn = IMPLEMENTATIONS[impl]
        if backward:
            def call(fn=fn):
                for t in (q, k, v):
                    t.grad = None
                fn(q, k, v, mask, causal, device).backward(grad)
        else:
            def call(fn=fn):
                with torch.no_grad():
                    fn(q, k, v, mask, causal, device)
        fns[impl] = call
    seconds = time_interleaved(fns, device, reps, warmup)
    flops = case_flops(shape, causal, backward)
    rows = []
    for impl, sec in seconds.items():
        rows.append({
            "case": name, "mode": "fwd+bwd" if backward else "fwd", "impl": impl,
            "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "causal": causal,
            "key_padding_mask": key_padding, "ms": sec * 1e3, "gflops": flops / sec / 1e9,
            "speedup_vs_sdpa": seconds["sdpa"] / sec if "sdpa" in seconds else None,
        })
    return rows


def print_table(rows):
    header = f"{'case':<12} {'mode':<8} {'impl':<9} {'shape (B,H,Sq,Sk,D)':<24} {'dtype':<9}" \
             f" {'ms':>9} {'GFLOP/s':>8} {'vs SDPA':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = "" if r["speedup_vs_sdpa"] is None else f"{r['speedup_vs_sdpa']:.2f}x"
        print(f"{r['case']:<12} {r['mode']:<8} {r['impl']:<9} {str(tuple(r['shape'])):<24}"
              f" {r['dtype']:<9} {r['ms']:>9.2f} {r['gflops']:>8.1f} {ratio:>8}")


# ---------------------------------------------------------------- peak memory
def reset_peak_rss():
    """Lowers the peak-RSS mark to the current RSS (Linux >= 4.0), so that peaks from imports
    and warm-up do not hide the forward's own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss():
    """Peak resident bytes of this process: VmHWM on Linux (the mark clear_refs resets;
    ru_maxrss also keeps peaks folded in from exited threads), else getrusage's ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def rss_child(impl):
    """Runs in a fresh process: prints the peak-RSS increase (bytes) of one forward."""
    q, k, v, _ = case_inputs(MEMORY_SHAPE[:3] + MEMORY_SHAPE[2:], torch.float32, False, "cpu", False)
    small = [t[:, :, :64] for t in (q, k, v)]
    with torch.no_grad():
        IMPLEMENTATIONS[impl](*small, None, False, "cpu")  # load code paths before the baseline
        reset_peak_rss()
        before = peak_rss()
        IMPLEMENTATIONS[impl](q, k, v, None, False, "cpu")
        after = peak_rss()
    print(after - before)


def peak_rss_increase(impl):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-child", impl],
                         check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main
def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--device", default="cpu", choices=["cpu"], help="where to run")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>_attention.json)")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child)
        return
    out_path = args.out or os.path.join(ROOT, "benchmarks", "results", f"{args.device}_attention.json")
    reps, warmup = (3, 1) if args.quick else (9, 2)
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    rows = []
    for name, shape, dtype, causal, key_padding in CASES:
        for backward in (False, True):
            # eager at long causal fwd+bwd is slow and adds nothing; keep the run short
            impls = ["fastattn", "sdpa"] + ([] if backward and shape[2] > 1024 else ["eager"])
            rows += run_case(name, shape, dtype, causal, key_padding, backward, args.device, reps, warmup, impls)
    print_table(rows)
    memory = {impl: peak_rss_increase(impl) for impl in ("fastattn", "eager")}
    print(f"\npeak RSS increase of one fp32 forward at (B,H,S,D)={MEMORY_SHAPE}: "
          + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in memory.items()))
    result = {
        "device": args.device, "cpu_model": cpu_model(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "fastattn": fastattn.__version__,
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "reps": reps, "warmup": warmup, "results": rows,
        "peak_rss_increase_bytes": {"shape": list(MEMORY_SHAPE), **memory},
    }
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
