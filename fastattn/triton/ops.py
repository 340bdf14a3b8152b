"""Launchers for the Triton kernels, registered as the ops fastattn::triton_attn_fwd,
triton_attn_bwd, triton_softmax_fwd, triton_softmax_bwd, triton_varlen_fwd, triton_varlen_bwd
and triton_attn_fwd_kvcache (same schemas as attn_fwd etc.).

On a GPU the ops are `torch.library.triton_op`s whose launches go through `wrap_triton`, so
torch.compile sees (and can fuse around) the kernels. Under TRITON_INTERPRET=1 the kernels
are plain Python and cannot be traced, so the same functions are registered as opaque
`custom_op`s and a FakeTensor call (shape propagation) skips the launch.

fp32 inputs use exact fp32 dots unless torch allows TF32 matmuls
(torch.set_float32_matmul_precision("high") or "medium"); then they run on tf32 tensor cores.
"""
from typing import NamedTuple, Optional

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensor

from .. import philox, reference
from . import configs, kernels
from .capabilities import DTYPES, MAX_HEAD_DIM

INTERPRET = not isinstance(kernels._attn_fwd_kernel, triton.runtime.jit.JITFunction)
_RAW = {
    "fwd": kernels._attn_fwd_kernel,
    "dkdv": kernels._attn_bwd_dkdv_kernel,
    "dq": kernels._attn_bwd_dq_kernel,
    "softmax_fwd": kernels._softmax_fwd_kernel,
    "softmax_bwd": kernels._softmax_bwd_kernel,
    "kvcache": kernels._attn_fwd_kvcache_kernel,
}


class _InterpretedLaunch:
    """Stands in for wrap_triton under the interpreter: launches eagerly, except for
    FakeTensor calls (the fake implementation only needs the output shapes)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if not any(isinstance(a, FakeTensor) for a in args):
                self.kernel[grid](*args, **kwargs)

        return launch


if INTERPRET:
    _TUNED = {}

    def wrap_triton(kernel):
        return _InterpretedLaunch(kernel)

    def _define(name, fn):
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op

else:
    from torch.library import wrap_triton

    def _define(name, fn):
        return torch.library.triton_op(name, fn, mutates_args=())

    _TUNED = {
        job: {
            bucket: triton.autotune(configs.attention_configs(table, bucket), key=configs.ATTN_KEY)(_RAW[job])
            for bucket in table
        }
        for job, table in (("fwd", configs.ATTN_FWD), ("dkdv", configs.ATTN_BWD_DKDV), ("dq", configs.ATTN_BWD_DQ))
    }
    for _job in ("softmax_fwd", "softmax_bwd"):
        _TUNED[_job] = triton.autotune(configs.softmax_configs(), key=configs.SOFTMAX_KEY)(_RAW[_job])
    # One config per bucket (nothing to time), given as an autotuner so that its warps and
    # stages reach the launch the way the other kernels' do.
    _TUNED["kvcache"] = {
        bucket: triton.autotune(configs.kvcache_configs(bucket), key=[])(_RAW["kvcache"]) for bucket in configs.KVCACHE
    }


# ----------------------------------------------------------------------------- support checks


def _device_reason(t):
    if t.device.type == "cuda" or (t.device.type == "cpu" and INTERPRET):
        return None
    if t.device.type == "cpu":
        return "the Triton kernels take CUDA tensors (CPU tensors need TRITON_INTERPRET=1 set before triton is imported)"
    return f"the Triton kernels take CUDA tensors, got {t.device.type}"


def _mask_reason(mask, dtype):
    if mask is not None and mask.dtype not in (torch.bool, torch.float32, dtype):
        return f"the Triton kernels take bool, float32 or {dtype} masks, got {mask.dtype}"
    return None


def supports(q, k, v, mask):
    """None if the attention kernels can run this call, else a short reason why not. Dtypes
    and head dims are checked beforehand against fastattn.capabilities.CAPABILITIES."""
    return _device_reason(q) or _mask_reason(mask, q.dtype)


def supports_softmax(x, mask):
    """None if the softmax kernels can run this call, else a short reason why not."""
    return _device_reason(x) or _mask_reason(mask, x.dtype)


# ----------------------------------------------------------------------------- argument checks


def _check_dtype(name, t, dtype):
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")


def _check_shape(name, t, shape):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_mask(mask, shape, dtype):
    if mask is not None:
        _check_shape("mask", mask, shape)
        if _mask_reason(mask, dtype):
            raise TypeError(f"mask: {_mask_reason(mask, dtype)}")


def _check_softcap(softcap):
    if not softcap >= 0.0:
        raise ValueError(f"softcap must be >= 0 (0: no cap), got {softcap}")


def _check_sinks(sinks, q):
    if sinks is not None:
        heads = q.shape[-2] if q.dim() == 3 else q.shape[1]
        _check_dtype("sinks", sinks, torch.float32)
        _check_shape("sinks", sinks, (heads,))
        if not sinks.is_contiguous() or sinks.device != q.device:
            raise ValueError(f"sinks must be contiguous on {q.device}")


def _check_alibi(alibi_slopes, batch, heads, q):
    if alibi_slopes is not None:
        _check_dtype("alibi_slopes", alibi_slopes, torch.float32)
        _check_shape("alibi_slopes", alibi_slopes, (batch, heads))
        if not alibi_slopes.is_contiguous() or alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes must be contiguous on {q.device}")


def _check_dropout(dropout_p, rng_state, q):
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if dropout_p == 0.0:
        return
    if rng_state is None:
        raise ValueError("rng_state must be given when dropout_p > 0: an int64 (seed, offset) tensor, got None")
    if rng_state.dtype != torch.int64 or tuple(rng_state.shape) != (2,) or rng_state.device != q.device:
        raise ValueError(f"rng_state must be an int64 (seed, offset) tensor of shape (2,) on {q.device}, got "
                         f"{rng_state.dtype} {tuple(rng_state.shape)} on {rng_state.device}")


def _check_qkv(q, k, v, layout):
    """Dims (len(layout) names them) and dtypes of q, k and v."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != len(layout):
            raise ValueError(f"{name} must be {len(layout)}-d ({', '.join(layout)}), got shape {tuple(t.shape)}")
    if q.dtype not in DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    _check_dtype("k", k, q.dtype)
    _check_dtype("v", v, q.dtype)


def _check_attention(q, k, v, mask, softcap, dropout_p, rng_state):
    _check_qkv(q, k, v, ("batch", "heads", "seq", "head_dim"))
    B, Hq, Sq, D = q.shape
    _, Hkv, Sk, Dv = v.shape
    _check_shape("k", k, (B, Hkv, Sk, D))
    if v.shape[0] != B or Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"v must have shape (B={B}, Hkv, Sk, Dv) with Hq={Hq} a multiple of Hkv, got {tuple(v.shape)}")
    if max(D, Dv) > MAX_HEAD_DIM:
        raise ValueError(f"q/v head dims must be at most {MAX_HEAD_DIM}, got {D} and {Dv}")
    _check_mask(mask, (B, Hq, Sq, Sk), q.dtype)
    _check_softcap(softcap)
    _check_dropout(dropout_p, rng_state, q)


# ----------------------------------------------------------------------------- launch helpers


def _dot_precision(dtype):
    if INTERPRET:
        return "upcast"  # see kernels._dot
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _mask_args(mask, dummy):
    """(pointer tensor, 4 strides, kind) for a kernel's mask arguments."""
    if mask is None:
        return dummy, (0, 0, 0, 0), kernels.MASK_NONE
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), mask.stride(), kernels.MASK_BOOL
    return mask, mask.stride(), kernels.MASK_ADDITIVE


def _pad(d):
    return max(16, triton.next_power_of_2(d))


def _attention_meta(q, v, mask, window, softcap, dropout_p, alibi_slopes, varlen):
    """Constexpr launch arguments shared by the attention kernels."""
    d, dv = q.shape[-1], v.shape[-1]
    return {
        "D": d,
        "DV": dv,
        "D_PAD": _pad(d),
        "DV_PAD": _pad(dv),
        "MASK_KIND": _mask_args(mask, q)[2],
        "ROW_SHARED": mask is not None and (mask.stride(2) == 0 or mask.shape[2] == 1),
        "WINDOW": window != reference.UNBOUNDED,
        "SOFTCAP": softcap > 0.0,
        "ALIBI": alibi_slopes is not None,
        "VARLEN": varlen,
        "DROPOUT": dropout_p > 0.0,
        "PRECISION": _dot_precision(q.dtype),
    }


def _attention_kernel(job, meta, element_size):
    """(kernel, extra launch kwargs): the autotuner of the head-dim bucket on a GPU, the plain
    kernel with fixed small blocks under the interpreter."""
    if INTERPRET:
        return _RAW[job], dict(configs.INTERPRET_ATTN_BLOCKS)
    return _TUNED[job][configs.head_bucket(meta["D_PAD"], meta["DV_PAD"], element_size)], {}


def _diagonal(window, sq, sk, varlen=False):
    """The key query 0 sits on (i' - i of the window rule and ALiBi). Packed calls get the
    diagonal through query 0 and key 0, which kernels._seq_info moves to each sequence's own."""
    return 0 if varlen else window.offset(sq, sk)


def _window_offsets(window, sq, sk, varlen=False):
    """(win_lo, win_hi): query i sees keys i + win_lo <= j <= i + win_hi (kernels._visible),
    around `_diagonal`; an unbounded side becomes an offset past every key."""
    offset = _diagonal(window, sq, sk, varlen)
    win_lo = offset - window.left if window.left >= 0 else -(sq + sk)
    win_hi = offset + window.right if window.right >= 0 else sq + sk
    return win_lo, win_hi


def _rng_arg(rng_state, seqs):
    """The kernels' RngState pointer: the call's (seed, offset), or a placeholder without dropout."""
    return seqs.cu_q if rng_state is None else rng_state


def _alibi_arg(alibi_slopes, placeholder):
    """The kernels' AlibiSlopes pointer: the slopes, or a placeholder (never read) without ALiBi."""
    return placeholder if alibi_slopes is None else alibi_slopes


def _seq_bucket(sq, sk):
    return triton.next_power_of_2(max(sq, sk, 1))


def _softmax_kernel(job, n_cols):
    """(kernel, BLOCK_C, BLOCK_R) for a softmax job."""
    max_c = configs.INTERPRET_SOFTMAX_MAX_BLOCK_C if INTERPRET else configs.SOFTMAX_MAX_BLOCK_C
    block_c, block_r = configs.softmax_blocks(n_cols, max_c)
    return (_RAW if INTERPRET else _TUNED)[job], block_c, block_r


# ----------------------------------------------------------------------------- ops


class _Seqs(NamedTuple):
    """The sequences of a call as the kernels' _seq_info reads them: how many, the longest
    query and key lengths, the int32 cumulative lengths of packed calls (a placeholder
    otherwise), the input strides (batch stride 0 when packed), and the numbering of output
    rows: query rows (out, dq) and key rows (dk, dv) as (batch, head, row) strides in rows, the
    statistics as (batch, head) strides with rows 1 apart."""

    batch: int
    max_q: int
    max_k: int
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    varlen: bool
    query_rows: tuple
    key_rows: tuple
    stat: tuple

    def strides(self, t):
        """(batch, head, row, dim) strides of an input, output or gradient view."""
        return (0, t.stride(1), t.stride(0), t.stride(2)) if self.varlen else t.stride()

    def scalars(self, scale, softcap, window, dropout_p):
        """The kernels' runtime scalars after the group size: scale, softcap, window bounds, diagonal, bucket,
        dropout's threshold (words below it drop their score) and the scale of kept probabilities."""
        keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0  # p = 1 drops everything
        return (scale, softcap, *_window_offsets(window, self.max_q, self.max_k, self.varlen),
                _diagonal(window, self.max_q, self.max_k, self.varlen), _seq_bucket(self.max_q, self.max_k), philox.drop_threshold(dropout_p), keep_scale)


def _padded_seqs(q, k):
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    none = torch.empty(0, dtype=torch.int32, device=q.device)
    return _Seqs(B, Sq, Sk, none, none, False, (Hq * Sq, Sq, 1), (Hkv * Sk, Sk, 1), (Hq * Sq, Sq))


def _packed_seqs(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    total_q, Hq, _ = q.shape
    return _Seqs(
        cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k, True,
        (0, 1, Hq), (0, 1, k.shape[1]), (0, total_q),
    )


def _forward(q, k, v, mask, scale, window, softcap, dropout_p, rng_state, sinks, alibi_slopes, seqs, out, lse, stats):
    """Launches the forward into out, lse and the statistics (numbered as `seqs` says)."""
    Hq, Hkv = q.shape[1], k.shape[1]  # (B, H, S, D) or packed (rows, H, D)
    meta = {**_attention_meta(q, v, mask, window, softcap, dropout_p, alibi_slopes, seqs.varlen),
            "SINKS": sinks is not None}
    kernel, blocks = _attention_kernel("fwd", meta, q.element_size())
    mask_t, mask_strides, _ = _mask_args(mask, q)

    def grid(m):
        return (triton.cdiv(seqs.max_q, m["BLOCK_M"]), seqs.batch * Hq)

    wrap_triton(kernel)[grid](
        q, k, v, mask_t, out, lse, stats[0], stats[1], seqs.cu_q, seqs.cu_k, _rng_arg(rng_state, seqs),
        lse if sinks is None else sinks, _alibi_arg(alibi_slopes, lse),
        *seqs.strides(q), *seqs.strides(k), *seqs.strides(v), *mask_strides, *seqs.query_rows, *seqs.stat,
        Hq, seqs.max_q, seqs.max_k, Hq // Hkv, *seqs.scalars(scale, softcap, window, dropout_p), **meta, **blocks,
    )


def triton_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
    window_left: int = -1, window_right: int = -1, window_top_left: bool = False, softcap: float = 0.0,
    dropout_p: float = 0.0, rng_state: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_attention(q, k, v, mask, softcap, dropout_p, rng_state)
    _check_sinks(sinks, q)
    _check_alibi(alibi_slopes, q.shape[0], q.shape[1], q)
    window = reference.Window(window_left, window_right, window_top_left)
    B, Hq, Sq, _ = q.shape
    _, Hkv, Sk, Dv = v.shape
    out = torch.empty((B, Hq, Sq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    stats = torch.empty((reference.SOFTMAX_STATS, B, Hq, Sq), dtype=torch.float32, device=q.device)
    if Sk == 0:  # nothing to attend to: every row sees only its sink, if any
        _fill_keyless_stats(lse, stats, None if sinks is None else sinks.view(1, Hq, 1))
        return out.zero_(), lse, stats
    if out.numel() == 0:
        return out, lse, stats
    _forward(q, k, v, mask, scale, window, softcap, dropout_p, rng_state, sinks, alibi_slopes, _padded_seqs(q, k), out,
             lse, stats)
    return out, lse, stats


def _fill_keyless_stats(lse, stats, sink_rows):
    """lse and statistics of rows without keys: -inf and 0, or with a sink (sink_rows, a view
    broadcasting over lse) the sink alone: max = lse = sink, sum 1."""
    if sink_rows is None:
        lse.fill_(float("-inf"))
        stats[1].zero_()
    else:
        lse.copy_(sink_rows.expand_as(lse))
        stats[1].fill_(1.0)
    stats[0].copy_(lse)


def _backward(grad_out, q, k, v, out, softmax_stats, mask, scale, window, softcap, dropout_p, rng_state, alibi_slopes,
              mask_grad, seqs, dq, dk, dv, dmask):
    """Launches the backward (delta, then dk/dv, then dq) into dq, dk, dv and dmask."""
    Hq, Hkv = q.shape[1], k.shape[1]  # (B, H, S, D) or packed (rows, H, D)
    Dv = v.shape[-1]
    stats = softmax_stats.contiguous()
    delta = torch.empty(stats.shape[1:], dtype=torch.float32, device=q.device)
    meta = _attention_meta(q, v, mask, window, softcap, dropout_p, alibi_slopes, seqs.varlen)
    mask_t, mask_strides, _ = _mask_args(mask, q)
    rng = _rng_arg(rng_state, seqs)
    alibi = _alibi_arg(alibi_slopes, delta)
    block_delta = 16 if INTERPRET else 64
    wrap_triton(kernels._attn_bwd_delta_kernel)[(triton.cdiv(seqs.max_q, block_delta), seqs.batch * Hq)](
        out, grad_out, delta, seqs.cu_q, seqs.cu_k, *seqs.strides(out), *seqs.strides(grad_out), *seqs.stat,
        Hq, seqs.max_q, seqs.max_k, DV=Dv, DV_PAD=meta["DV_PAD"], VARLEN=seqs.varlen, BLOCK_M=block_delta,
    )
    common = (
        *seqs.strides(q), *seqs.strides(k), *seqs.strides(v), *mask_strides, *seqs.strides(grad_out),
    )
    scalars = seqs.scalars(scale, softcap, window, dropout_p)

    kernel, blocks = _attention_kernel("dkdv", meta, q.element_size())

    def grid_dkdv(m):
        return (triton.cdiv(seqs.max_k, m["BLOCK_N"]), seqs.batch * Hkv)

    wrap_triton(kernel)[grid_dkdv](
        q, k, v, mask_t, grad_out, stats[0], stats[1], delta, dk, dv, dmask, seqs.cu_q, seqs.cu_k, rng, alibi, *common,
        *seqs.key_rows, *seqs.stat, Hq, Hkv, seqs.max_q, seqs.max_k, Hq // Hkv, *scalars, MASK_GRAD=mask_grad,
        **meta, **blocks,
    )

    kernel, blocks = _attention_kernel("dq", meta, q.element_size())

    def grid_dq(m):
        return (triton.cdiv(seqs.max_q, m["BLOCK_M"]), seqs.batch * Hq)

    wrap_triton(kernel)[grid_dq](
        q, k, v, mask_t, grad_out, stats[0], stats[1], delta, dq, seqs.cu_q, seqs.cu_k, rng, alibi, *common,
        *seqs.query_rows, *seqs.stat, Hq, seqs.max_q, seqs.max_k, Hq // Hkv, *scalars, **meta, **blocks,
    )


def triton_attn_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_stats: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    mask_grad: bool,
    window_left: int = -1,
    window_right: int = -1,
    window_top_left: bool = False,
    softcap: float = 0.0,
    dropout_p: float = 0.0,
    rng_state: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_attention(q, k, v, mask, softcap, dropout_p, rng_state)
    _check_alibi(alibi_slopes, q.shape[0], q.shape[1], q)
    window = reference.Window(window_left, window_right, window_top_left)
    B, Hq, Sq, D = q.shape
    _, Hkv, Sk, Dv = v.shape
    _check_shape("grad_out", grad_out, (B, Hq, Sq, Dv))
    _check_shape("out", out, (B, Hq, Sq, Dv))
    _check_shape("softmax_stats", softmax_stats, (reference.SOFTMAX_STATS, B, Hq, Sq))
    _check_dtype("softmax_stats", softmax_stats, torch.float32)
    dq = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, Sk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, Hkv, Sk, Dv), dtype=v.dtype, device=q.device)
    # dmask is written only for the tiles the kernel visits; skipped tiles stay 0.
    dmask_shape = (B, Hq, Sq, Sk) if mask_grad else (0,)
    dmask = torch.zeros(dmask_shape, dtype=torch.float32, device=q.device)
    if Sq == 0 or Sk == 0 or B * Hq == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dmask
    _backward(grad_out, q, k, v, out, softmax_stats, mask, scale, window, softcap, dropout_p, rng_state, alibi_slopes,
              mask_grad, _padded_seqs(q, k), dq, dk, dv, dmask)
    return dq, dk, dv, dmask


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softcap, dropout_p, rng_state):
    _check_qkv(q, k, v, ("total tokens", "heads", "head_dim"))
    total_q, Hq, D = q.shape
    total_k, Hkv, Dv = v.shape
    _check_shape("k", k, (total_k, Hkv, D))
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"v must have a number of heads dividing q's {Hq}, got {tuple(v.shape)}")
    if max(D, Dv) > MAX_HEAD_DIM:
        raise ValueError(f"q/v head dims must be at most {MAX_HEAD_DIM}, got {D} and {Dv}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] != cu_seqlens_q.shape[0] or cu.shape[0] == 0:
            raise ValueError(f"{name} must be 1-d int32 with B + 1 entries like cu_seqlens_q, got {cu.dtype} {tuple(cu.shape)}")
    _check_softcap(softcap)
    _check_dropout(dropout_p, rng_state, q)


def triton_varlen_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int = -1, window_right: int = -1,
    softcap: float = 0.0, dropout_p: float = 0.0, rng_state: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None, alibi_slopes: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softcap, dropout_p, rng_state)
    _check_sinks(sinks, q)
    _check_alibi(alibi_slopes, cu_seqlens_q.shape[0] - 1, q.shape[1], q)
    total_q, Hq, _ = q.shape
    out = torch.empty((total_q, Hq, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((Hq, total_q), dtype=torch.float32, device=q.device)
    stats = torch.empty((reference.SOFTMAX_STATS, Hq, total_q), dtype=torch.float32, device=q.device)
    if out.numel():
        seqs = _packed_seqs(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        _forward(q, k, v, None, scale, reference.Window(window_left, window_right), softcap, dropout_p, rng_state,
                 sinks, alibi_slopes, seqs, out, lse, stats)
    return out, lse, stats


def triton_varlen_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    softmax_stats: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
    max_seqlen_k: int, scale: float, window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
    dropout_p: float = 0.0, rng_state: Optional[torch.Tensor] = None, alibi_slopes: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softcap, dropout_p, rng_state)
    _check_alibi(alibi_slopes, cu_seqlens_q.shape[0] - 1, q.shape[1], q)
    total_q, Hq, _ = q.shape
    _check_shape("grad_out", grad_out, (total_q, Hq, v.shape[-1]))
    _check_shape("out", out, (total_q, Hq, v.shape[-1]))
    _check_shape("softmax_stats", softmax_stats, (reference.SOFTMAX_STATS, Hq, total_q))
    _check_dtype("softmax_stats", softmax_stats, torch.float32)
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    seqs = _packed_seqs(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _backward(grad_out, q, k, v, out, softmax_stats, None, scale, reference.Window(window_left, window_right), softcap,
              dropout_p, rng_state, alibi_slopes, False, seqs, dq, dk, dv, dq.new_empty(0))
    return dq, dk, dv


def _check_kvcache(q, k_cache, v_cache, cache_seqlens, block_table, softcap):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-d (batch or pages, heads, seq, head_dim), got shape {tuple(t.shape)}")
    if q.dtype not in DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    _check_dtype("k_cache", k_cache, q.dtype)
    _check_dtype("v_cache", v_cache, q.dtype)
    B, Hq, _, D = q.shape
    Hkv = k_cache.shape[1]
    if k_cache.shape[3] != D or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"k_cache must be (.., Hkv, S, {D}) and v_cache agree with it in the first three dims, got "
                         f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the cache's kv heads must divide q's {Hq} heads, got {Hkv}")
    if max(D, v_cache.shape[3]) > MAX_HEAD_DIM:
        raise ValueError(f"q/v_cache head dims must be at most {MAX_HEAD_DIM}, got {D} and {v_cache.shape[3]}")
    if cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (B,) or cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens must be an int32 tensor of shape ({B},) on {q.device}, got "
                         f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)} on {cache_seqlens.device}")
    if block_table is None:
        if k_cache.shape[0] != B:
            raise ValueError(f"a contiguous k_cache must have q's batch size {B}, got {tuple(k_cache.shape)}")
    elif (block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != B
          or block_table.device != q.device):
        raise ValueError(f"block_table must be an int32 tensor of shape ({B}, max_blocks) on {q.device}, got "
                         f"{block_table.dtype} {tuple(block_table.shape)} on {block_table.device}")
    _check_softcap(softcap)


def _device_sms(device):
    """Streaming multiprocessors the split-KV heuristic fills (a pretend count when interpreted)."""
    if INTERPRET:
        return configs.INTERPRET_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def triton_attn_fwd_kvcache(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    block_table: Optional[torch.Tensor], scale: float, window_left: int = -1, window_right: int = -1,
    softcap: float = 0.0, sinks: Optional[torch.Tensor] = None, alibi_slopes: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_kvcache(q, k_cache, v_cache, cache_seqlens, block_table, softcap)
    _check_sinks(sinks, q)
    _check_alibi(alibi_slopes, q.shape[0], q.shape[1], q)
    B, Hq, Sq, D = q.shape
    Hkv, Dv = k_cache.shape[1], v_cache.shape[3]
    out = torch.empty((B, Hq, Sq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if lse.numel() == 0:
        return out, lse
    paged = block_table is not None
    capacity = k_cache.shape[2] * (block_table.shape[1] if paged else 1)
    if q.device.type == "cpu" and not isinstance(cache_seqlens, FakeTensor):  # interpreted: lengths on the host
        from ..kvcache import check_room  # imported at use: fastattn.kvcache imports this module's callers
        check_room(cache_seqlens, 0, capacity)
    group = Hq // Hkv
    group_pad = triton.next_power_of_2(group)
    bucket = configs.head_bucket(_pad(D), _pad(Dv), q.element_size())
    if INTERPRET:
        kernel, blocks = _RAW["kvcache"], {"BLOCK_N": configs.INTERPRET_KVCACHE_BLOCK_N}
        block_n, max_rows = configs.INTERPRET_KVCACHE_BLOCK_N, configs.INTERPRET_KVCACHE_MAX_ROWS
        min_split_blocks = configs.INTERPRET_MIN_SPLIT_BLOCKS
    else:
        kernel, blocks = _TUNED["kvcache"][bucket], {}
        block_n, max_rows = configs.KVCACHE[bucket][0], configs.KVCACHE_MAX_ROWS[bucket]
        min_split_blocks = configs.KVCACHE_MIN_SPLIT_BLOCKS
    block_q = configs.kvcache_block_q(Sq, group_pad, max_rows)
    programs = B * Hkv * triton.cdiv(Sq, block_q)
    splits = configs.kvcache_splits(programs, capacity, block_n, _device_sms(q.device), min_split_blocks)
    n_rows = B * Hq * Sq
    if splits == 1:  # the kernel writes the result
        part_out, part_lse = out, lse
    else:
        part_out = torch.empty((splits, n_rows, Dv), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((splits, n_rows), dtype=torch.float32, device=q.device)
    cache_seqlens = cache_seqlens.contiguous()  # the kernel reads both with unit strides
    table = block_table.contiguous() if paged else cache_seqlens
    window = reference.Window(window_left, window_right)
    precision = _dot_precision(q.dtype)
    wrap_triton(kernel)[(B * Hkv, triton.cdiv(Sq, block_q), splits)](
        q, k_cache, v_cache, cache_seqlens, table, part_out, part_lse,
        lse if sinks is None else sinks, _alibi_arg(alibi_slopes, lse),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), table.stride(0), Hq, Hkv, Sq, group, capacity,
        k_cache.shape[2], n_rows, scale, softcap, *_window_offsets(window, Sq, capacity, varlen=True),
        D=D, DV=Dv, D_PAD=_pad(D), DV_PAD=_pad(Dv), GROUP_PAD=group_pad, WINDOW=window != reference.UNBOUNDED,
        SOFTCAP=softcap > 0.0, ALIBI=alibi_slopes is not None, SINKS=sinks is not None and splits == 1, PAGED=paged,
        PRECISION=precision, BLOCK_Q=block_q, **blocks,
    )
    if splits > 1:
        block_r = configs.KVCACHE_COMBINE_ROWS
        wrap_triton(kernels._kvcache_combine_kernel)[(triton.cdiv(n_rows, block_r),)](
            part_out, part_lse, out, lse, lse if sinks is None else sinks, n_rows, Hq, Sq, splits,
            DV=Dv, DV_PAD=_pad(Dv), SINKS=sinks is not None, PRECISION=precision, BLOCK_R=block_r,
        )
    return out, lse


def triton_softmax_fwd(
    x: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
    window_left: int = -1, window_right: int = -1, window_top_left: bool = False,
) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"x must be 4-d (batch, heads, rows, cols), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    _check_mask(mask, x.shape, x.dtype)
    window = reference.Window(window_left, window_right, window_top_left)
    B, H, R, C = x.shape
    y = torch.empty((B, H, R, C), dtype=x.dtype, device=x.device)
    n_rows = B * H * R
    if y.numel() == 0:
        return y
    kernel, block_c, block_r = _softmax_kernel("softmax_fwd", C)
    mask_t, mask_strides, mask_kind = _mask_args(mask, x)
    wrap_triton(kernel)[(triton.cdiv(n_rows, block_r),)](
        x, mask_t, y, *x.stride(), *mask_strides, H, R, C, n_rows, scale, *_window_offsets(window, R, C),
        MASK_KIND=mask_kind, WINDOW=window != reference.UNBOUNDED, ONE_PASS=C <= block_c,
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return y


def triton_softmax_bwd(grad_y: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if y.dim() != 4:
        raise ValueError(f"y must be 4-d (batch, heads, rows, cols), got shape {tuple(y.shape)}")
    if y.dtype not in DTYPES:
        raise TypeError(f"y must be float16, bfloat16 or float32, got {y.dtype}")
    _check_shape("grad_y", grad_y, y.shape)
    B, H, R, C = y.shape
    dx = torch.empty((B, H, R, C), dtype=y.dtype, device=y.device)
    n_rows = B * H * R
    if dx.numel() == 0:
        return dx
    kernel, block_c, block_r = _softmax_kernel("softmax_bwd", C)
    wrap_triton(kernel)[(triton.cdiv(n_rows, block_r),)](
        grad_y, y, dx, *grad_y.stride(), *y.stride(), H, R, C, n_rows,
        ONE_PASS=C <= block_c, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return dx


attn_fwd = _define("fastattn::triton_attn_fwd", triton_attn_fwd)
attn_bwd = _define("fastattn::triton_attn_bwd", triton_attn_bwd)
softmax_fwd = _define("fastattn::triton_softmax_fwd", triton_softmax_fwd)
softmax_bwd = _define("fastattn::triton_softmax_bwd", triton_softmax_bwd)
varlen_fwd = _define("fastattn::triton_varlen_fwd", triton_varlen_fwd)
varlen_bwd = _define("fastattn::triton_varlen_bwd", triton_varlen_bwd)
attn_fwd_kvcache = _define("fastattn::triton_attn_fwd_kvcache", triton_attn_fwd_kvcache)
