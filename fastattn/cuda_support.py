"""What the CUDA C++ kernels (csrc/cuda/) accept, for the dispatcher.

`supports(q, k, v, mask)` and `supports_softmax(x, mask)` return None when the CUDA backend
can run the call, else a reason string. The KV-cache op (fastattn::attn_fwd_kvcache, the
decode kernel of csrc/cuda/decode.cu) is asked through `supports` with the caches as k and v:
it needs of them what the attention kernels need of k and v (16-byte rows and strides, v's
head dim equal to q's) and takes pages of any block size in any order, rows of any length
(checked against the cache's room on no side: lengths and block-table entries stay on the
device) and every feature of the CUDA capabilities but masks and dropout, which the KV-cache
path never asks for. They look only at shapes, strides, dtypes and
devices, so they also work on fake tensors under torch.compile. csrc/cuda_bindings.cpp raises
for anything else.
"""
import functools

import torch

from .capabilities import CAPABILITIES

MASK_DTYPES = (torch.bool, torch.float16, torch.bfloat16, torch.float32)


def _compiled_archs():
    """(major, minor, ptx) of every architecture fastattn._C was compiled for."""
    try:
        from . import _C
    except ImportError:
        return ()
    archs = []
    for item in str(getattr(_C, "cuda_archs", "")).replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        major, _, minor = item.removesuffix("+PTX").partition(".")
        try:
            archs.append((int(major), int(minor or 0), ptx))
        except ValueError:
            continue
    return tuple(archs)


def device_reason(index):
    """None if the kernels run on CUDA device `index`, else why not. A constant of the machine:
    torch.compile evaluates it once while tracing instead of tracing the device queries."""
    return _device_reason(index)


# What torch.compiler.assume_constant_result(device_reason) does, without importing dynamo
# (and with it Triton and inductor) whenever fastattn is imported.
device_reason._dynamo_marked_constant = True


@functools.lru_cache(maxsize=None)
def _device_reason(index):
    major, minor = torch.cuda.get_device_capability(index)
    least = CAPABILITIES["cuda"].min_compute_capability
    if major * 10 + minor < least:
        return f"the cuda backend needs compute capability >= {least // 10}.{least % 10} (mma.sync bf16, cp.async), got {major}.{minor}"
    archs = _compiled_archs()
    if not archs:
        return None  # unknown build list: trust the build
    for a_major, a_minor, ptx in archs:
        # SASS runs on the same major with an equal or newer minor; PTX JIT-compiles upward.
        if (a_major == major and a_minor <= minor) or (ptx and (a_major, a_minor) <= (major, minor)):
            return None
    built = ";".join(f"{a}.{b}{'+PTX' if p else ''}" for a, b, p in archs)
    return (f"fastattn._C was compiled for {built}, not for this GPU ({major}.{minor}); "
            f"rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}")


def _operand_reason(name, t, packed):
    """Why the kernels cannot read `t` ((B, H, S, D), or (total tokens, H, D) when packed)."""
    ndim, layout = (3, "(total tokens, H, D)") if packed else (4, "(B, H, S, D)")
    if t.dim() != ndim:
        return f"{name} must be {ndim}-d {layout}, got shape {tuple(t.shape)}"
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return f"{name} needs a contiguous last dim, got strides {t.stride()}"
    for i in range(ndim - 1):
        if t.shape[i] > 1 and t.stride(i) % 8 != 0:
            return f"{name} strides must be multiples of 8 elements (16-byte rows), got {t.stride()}"
    # torch.compile cannot trace storage_offset(); there the op itself rejects a misaligned
    # operand with a ValueError (automatic dispatch tries Triton, which needs no alignment, first)
    if not torch.compiler.is_compiling() and t.storage_offset() % 8 != 0:
        return f"{name} must start 16-byte aligned (storage offset {t.storage_offset()})"
    return None


def supports(q, k, v, mask=None, scale=None, packed=False):
    """None if the CUDA flash kernels can run attention on these inputs (packed: varlen's
    (total tokens, H, D) layout), else why not. Dtypes, head dims and features are checked
    beforehand against CAPABILITIES["cuda"]; this checks what the kernels need of strides,
    alignment, scale and device."""
    if scale is not None and not scale > 0:
        return f"the cuda attention kernels need a positive scale, got {scale}"
    if q.device.type != "cuda":
        return f"the cuda backend takes CUDA tensors, got {q.device.type}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        reason = _operand_reason(name, t, packed)
        if reason:
            return reason
    if mask is not None and mask.dtype not in MASK_DTYPES:
        return f"the cuda kernels take bool or float16/bfloat16/float32 masks, got {mask.dtype}"
    if mask is not None and mask.device != q.device:
        return f"mask is on {mask.device}, q on {q.device}"
    return device_reason(q.device.index if q.device.index is not None else torch.cuda.current_device())


def supports_softmax(x, mask=None):
    """None if the CUDA fused softmax kernels can run on x (B, H, R, C) with `mask`."""
    if x.device.type != "cuda":
        return f"the cuda backend takes CUDA tensors, got {x.device.type}"
    if x.dim() != 4:
        return f"x must be 4-d (B, H, R, C), got shape {tuple(x.shape)}"
    if mask is not None and mask.dtype not in MASK_DTYPES:
        return f"the cuda kernels take bool or float16/bfloat16/float32 masks, got {mask.dtype}"
    return device_reason(x.device.index if x.device.index is not None else torch.cuda.current_device())
