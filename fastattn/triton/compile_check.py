"""Compiles the Triton kernels for NVIDIA GPUs without a GPU and reports their resources.

    python -m fastattn.triton.compile_check [--arch 80 90] [--quick]

Every autotune config of every attention job (heaviest flag variant), and the flag variants
(dtypes, mask kinds, window, softcap, dropout, mask gradient, head dims) with one config each, and the
KV-cache decode kernel at each head-dim bucket's config with its split combine, go through the
full Triton pipeline down to a cubin with Triton's bundled ptxas. Prints registers, spills and
shared memory per compile, and exits non-zero if a compile fails or a config needs more
shared memory than the GPU has (autotuning would drop it). Register spills are reported, not
failed: the widest head dims cannot avoid a few. Must run without TRITON_INTERPRET=1.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import configs, kernels

SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block, opt-in maximum
_FLOAT_ARGS = {"sm_scale", "scale", "softcap", "keep_scale"}
_UNIT_STRIDES = {"stride_qd", "stride_kd", "stride_vd", "stride_mn", "stride_gd", "stride_od", "stride_xc",
                 "stride_mc", "stride_gc", "stride_yc"}
_POINTERS = {"Q", "K", "V", "Mask", "Out", "Lse", "RowMax", "RowSum", "Delta", "dO", "dQ", "dK", "dV", "dMask", "X", "Y", "dY", "dX",
             "CuSeqlensQ", "CuSeqlensK", "RngState", "Sinks", "AlibiSlopes", "KCache", "VCache", "CacheSeqlens",
             "BlockTable", "PartOut", "PartLse"}


def _signature(fn, dtype, pointer_dtypes, constexprs):
    """Triton signature of `fn` as the launchers call it: 16-byte aligned pointers, unit
    last-dim strides specialised to 1, other ints i32 (divisible by 16 where realistic)."""
    signature, attrs, consts = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in _UNIT_STRIDES:
            signature[name], consts[name] = "constexpr", 1
        elif name in _POINTERS:
            signature[name] = "*" + pointer_dtypes.get(name, dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


def _ptxas_report(ptx, arch):
    """(registers, spill bytes) from ptxas -v on the generated PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", src, "-o", src + ".o"],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


def compile_one(fn, arch, dtype, constexprs, num_warps, num_stages, pointer_dtypes=None):
    signature, consts, attrs = _signature(fn, dtype, pointer_dtypes or {}, constexprs)
    src = ASTSource(fn, signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    regs, spills = _ptxas_report(compiled.asm["ptx"], arch)
    return compiled.metadata.shared, regs, spills


def _attn_flags(dtype, d, mask_kind, row_shared, window, softcap=False, varlen=False, dropout=False, alibi=False):
    pad = max(16, triton.next_power_of_2(d))
    return {"D": d, "DV": d, "D_PAD": pad, "DV_PAD": pad, "MASK_KIND": mask_kind, "ROW_SHARED": row_shared,
            "WINDOW": window, "SOFTCAP": softcap, "ALIBI": alibi, "VARLEN": varlen, "DROPOUT": dropout,
            "PRECISION": "tf32" if dtype == "fp32" else "ieee"}


def _kvcache_jobs():
    """The decode kernel at each head-dim bucket's config (GQA group of 8, paged, every option;
    fp32 once) and the split combine."""
    f32 = {"Lse": "fp32", "Sinks": "fp32", "AlibiSlopes": "fp32", "CacheSeqlens": "i32", "BlockTable": "i32"}
    for dtype, d in (("bf16", 64), ("bf16", 128), ("fp16", 256), ("fp32", 128)):
        bucket = configs.head_bucket(d, d, 4 if dtype == "fp32" else 2)
        block_n, warps, stages = configs.KVCACHE[bucket]
        block_q = configs.kvcache_block_q(1, 8, configs.KVCACHE_MAX_ROWS[bucket])
        flags = {"D": d, "DV": d, "D_PAD": d, "DV_PAD": d, "GROUP_PAD": 8, "WINDOW": True, "SOFTCAP": True,
                 "ALIBI": True, "SINKS": True, "PAGED": True, "PRECISION": "tf32" if dtype == "fp32" else "ieee",
                 "BLOCK_Q": block_q, "BLOCK_N": block_n}
        yield (f"kvcache {dtype} D={d} paged window softcap alibi sinks {block_q}x8x{block_n} w{warps} s{stages}",
               kernels._attn_fwd_kvcache_kernel, dtype, flags, warps, stages, f32)
    yield ("kvcache combine bf16 D=128 sinks", kernels._kvcache_combine_kernel, "bf16",
           {"DV": 128, "DV_PAD": 128, "SINKS": True, "PRECISION": "ieee", "BLOCK_R": configs.KVCACHE_COMBINE_ROWS}, 4, 1,
           {"PartOut": "fp32", "PartLse": "fp32", "Lse": "fp32", "Sinks": "fp32"})


def _attention_jobs(quick):
    """(label, kernel, dtype, constexprs, warps, stages, pointer dtypes) to compile."""
    tables = {"fwd": (kernels._attn_fwd_kernel, configs.ATTN_FWD),
              "dkdv": (kernels._attn_bwd_dkdv_kernel, configs.ATTN_BWD_DKDV),
              "dq": (kernels._attn_bwd_dq_kernel, configs.ATTN_BWD_DQ)}
    f32 = {"Lse": "fp32", "RowMax": "fp32", "RowSum": "fp32", "Delta": "fp32", "dMask": "fp32",
           "CuSeqlensQ": "i32", "CuSeqlensK": "i32", "RngState": "i64", "Sinks": "fp32",
           "AlibiSlopes": "fp32"}
    bucket_dims = {64: 64, 128: 128, 256: 256}
    for job, (fn, table) in tables.items():
        extra = {"MASK_GRAD": True} if job == "dkdv" else {"SINKS": True} if job == "fwd" else {}
        for bucket, entries in table.items():
            for m, n, w, s in entries[:1] if quick else entries:
                flags = _attn_flags("bf16", bucket_dims[bucket], kernels.MASK_ADDITIVE, False, True, True, alibi=True)
                yield (f"{job} D={bucket} bf16 additive window softcap alibi {m}x{n} w{w} s{s}", fn, "bf16",
                       {**flags, **extra, "BLOCK_M": m, "BLOCK_N": n}, w, s, f32)
        # (label, dtype, head dim, mask kind, row-shared mask, window, varlen, dropout, alibi); --quick
        # compiles the first four
        variants = [("fp32 tf32 no-mask", "fp32", 80, kernels.MASK_NONE, False, False, False, False, False),
                    ("bf16 varlen window alibi", "bf16", 64, kernels.MASK_NONE, False, True, True, False, True),
                    ("bf16 D=128 window dropout", "bf16", 128, kernels.MASK_NONE, False, True, False, True, False),
                    ("fp16 varlen dropout", "fp16", 64, kernels.MASK_NONE, False, False, True, True, False),
                    ("fp16 bool key-padding", "fp16", 80, kernels.MASK_BOOL, True, False, False, False, False),
                    ("bf16 D=40 bool 2-d window", "bf16", 40, kernels.MASK_BOOL, False, True, False, False, False),
                    ("bf16 D=256 additive dropout", "bf16", 256, kernels.MASK_ADDITIVE, False, False, False, True,
                     False)]
        for label, dtype, d, kind, shared, window, varlen, dropout, alibi in variants[:4] if quick else variants:
            flags = _attn_flags(dtype, d, kind, shared, window, varlen=varlen, dropout=dropout, alibi=alibi)
            m, n, w, s = table[configs.head_bucket(flags["D_PAD"], flags["DV_PAD"], 4 if dtype == "fp32" else 2)][0]
            ptrs = {**f32, "Mask": "u8"} if kind == kernels.MASK_BOOL else f32
            extra = {"MASK_GRAD": False} if job == "dkdv" else {"SINKS": False} if job == "fwd" else {}
            yield (f"{job} {label} {m}x{n} w{w} s{s}", fn, dtype, {**flags, **extra, "BLOCK_M": m, "BLOCK_N": n},
                   w, s, ptrs)
    yield from _kvcache_jobs()
    for varlen in (False, True):
        yield (f"delta bf16 D=128 varlen={varlen}", kernels._attn_bwd_delta_kernel, "bf16",
               {"DV": 128, "DV_PAD": 128, "VARLEN": varlen, "BLOCK_M": 64}, 4, 1,
               {"Delta": "fp32", "CuSeqlensQ": "i32", "CuSeqlensK": "i32"})
    for one_pass, block_c, block_r in ((True, 1024, 2), (False, configs.SOFTMAX_MAX_BLOCK_C, 1)):
        for dtype, kind in (("bf16", kernels.MASK_BOOL), ("fp32", kernels.MASK_ADDITIVE)):
            yield (f"softmax_fwd {dtype} mask={kind} one_pass={one_pass}", kernels._softmax_fwd_kernel, dtype,
                   {"MASK_KIND": kind, "WINDOW": True, "ONE_PASS": one_pass, "BLOCK_R": block_r,
                    "BLOCK_C": block_c}, 8, 1, {"Mask": "u8"} if kind == kernels.MASK_BOOL else {})
        yield (f"softmax_bwd bf16 one_pass={one_pass}", kernels._softmax_bwd_kernel, "bf16",
               {"ONE_PASS": one_pass, "BLOCK_R": block_r, "BLOCK_C": block_c}, 8, 1, {})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80, 90)")
    parser.add_argument("--quick", action="store_true", help="one config per job and bucket, one flag variant")
    args = parser.parse_args(argv)
    if not isinstance(kernels._attn_fwd_kernel, triton.runtime.jit.JITFunction):
        sys.exit("compile_check needs compiled kernels: unset TRITON_INTERPRET")
    failures = 0
    for arch in args.arch:
        for label, fn, dtype, consts, warps, stages, ptrs in _attention_jobs(args.quick):
            start = time.time()
            try:
                shared, regs, spills = compile_one(fn, arch, dtype, consts, warps, stages, ptrs)
            except Exception as error:  # report every failing variant, not only the first
                failures += 1
                print(f"sm_{arch} FAIL {label}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
                continue
            problems = []
            if shared > SMEM_LIMIT.get(arch, SMEM_LIMIT[80]):
                problems.append("shared memory over the limit")
            failures += bool(problems)
            print(f"sm_{arch} {'FAIL' if problems else 'ok  '} {label}: {regs} regs, {spills} B spilled, "
                  f"{shared} B shared, {time.time() - start:.1f}s {' '.join(problems)}", flush=True)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
