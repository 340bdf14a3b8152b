"""The public functions: argument checks, backend choice, then one op call."""
import math
from typing import Callable, NamedTuple

import torch

from . import dispatch, ops, philox, reference
from .reference import CAUSAL, CAUSAL_TOP_LEFT, UNBOUNDED


def _ops_for(backend):
    return ops.TRITON_OPS if backend == "triton" else ops.NATIVE_OPS


def _rng_state(dropout_p, device):
    """The (seed, offset) of one dropout call, drawn here rather than in a kernel, so that
    torch.manual_seed reproduces it, a checkpointed recomputation restores it, and compiled
    graphs need no break; None without dropout."""
    return philox.draw_rng_state(device) if dropout_p > 0.0 else None


def _attention(q, k, v, mask, scale, window, backend, dropout_p=0.0, softcap=0.0, sinks=None, alibi_slopes=None):
    """Runs checked inputs on the chosen backend; returns (out, lse)."""
    if scale is None:
        scale = reference.default_scale(q.shape[-1])
    rng_state = _rng_state(dropout_p, q.device)
    chosen = "reference"
    # Empty inputs have nothing to compute: the reference gives their (empty or zero) results
    # and gradients in every shape.
    if not _is_empty(q, k, v):
        chosen = dispatch.choose(
            lambda name: dispatch.attention_reason(name, q, k, v, mask, scale, window, softcap, dropout_p, sinks,
                                                   alibi_slopes),
            q.device, backend,
        )
    if chosen == "reference":
        return reference.attention(q, k, v, mask, scale, window, dropout_p, rng_state=rng_state, softcap=softcap,
                                   sinks=sinks, alibi_slopes=alibi_slopes)
    q, k, v = (ops.last_dim_contiguous(t) for t in (q, k, v))
    out, lse, _ = _ops_for(chosen).attn_fwd(q, k, v, mask, float(scale), *window, softcap, float(dropout_p), rng_state,
                                            sinks, alibi_slopes)
    return out, lse


def _is_empty(*tensors):
    return any(t.numel() == 0 for t in tensors)


class BlockOps(NamedTuple):
    """Attention over one block of keys, without autograd, for callers that split rows' keys
    into blocks and merge the partial results by their lse (ring attention). `causal` is
    attention()'s bottom-right rule.
      forward(q, k, v, causal) -> (out, lse float32)
      backward(grad_out, q, k, v, out, lse, causal) -> (dq, dk, dv): given the out and lse of
        whole rows (all blocks merged), the block's share of dq and the block's dk, dv."""

    forward: Callable
    backward: Callable


def block_ops(q, k, v, scale, backend=None):
    """BlockOps on the backend dispatch picks for inputs like q, k, v (no mask) and `scale`."""
    chosen = dispatch.choose(lambda name: dispatch.attention_reason(name, q, k, v, None, scale), q.device, backend)
    family = None if chosen == "reference" else _ops_for(chosen)

    def forward(q, k, v, causal):
        window = CAUSAL if causal else UNBOUNDED
        if family is None:
            return reference.attention(q, k, v, None, scale, window)
        q, k, v = (ops.last_dim_contiguous(t) for t in (q, k, v))
        out, lse, _ = family.attn_fwd(q, k, v, None, float(scale), *window)
        return out, lse

    def backward(grad_out, q, k, v, out, lse, causal):
        window = CAUSAL if causal else UNBOUNDED
        if family is None:
            return reference.attention_backward(grad_out, q, k, v, out, lse, None, scale, window)
        grad_out, q, k, v, out = (ops.last_dim_contiguous(t) for t in (grad_out, q, k, v, out))
        # The kernels' softmax statistics of whole rows from their lse: row max lse, row sum 1
        # (0 for rows that see no key).
        stats = torch.stack([lse, (~torch.isneginf(lse)).float()])
        dq, dk, dv, _ = family.attn_bwd(grad_out, q, k, v, out, stats, None, float(scale), False, *window)
        return dq, dk, dv

    return BlockOps(forward, backward)


def _check_options(causal, scale, dropout_p, return_lse, window, softcap):
    """Checks attention()'s and varlen_attention()'s options; returns the Window the causal
    flag and the window make together (bottom-right aligned) and the softcap (0.0: none)."""
    ops.check_flag("causal", causal)
    ops.check_scale("scale", scale, optional=True)
    ops.check_probability("dropout_p", dropout_p)
    ops.check_flag("return_lse", return_lse)
    return ops.window_rule(causal, window), ops.check_softcap(softcap)


def attention(q, k, v, *, attn_mask=None, causal=False, scale=None, return_lse=False, backend=None, window=None,
              softcap=None, dropout_p=0.0, sinks=None, alibi_slopes=None):
    """Fused attention softmax(cap(scale * q @ k^T) + mask) @ v.

    q: (B, Hq, Sq, D); k: (B, Hkv, Sk, D); v: (B, Hkv, Sk, Dv), Hq a multiple of Hkv (GQA/MQA:
    query head h reads key/value head h // (Hq // Hkv), without copies).
    attn_mask: broadcastable to (B, Hq, Sq, Sk); bool (True = attend) or float (added).
    causal: query i sees keys j <= i + Sk - Sq (bottom-right alignment, as KV-cache decoding
    needs; equal to the usual rule when Sq == Sk).
    window: (left, right) sliding window: query i sees keys j with i' - left <= j <= i' + right,
    i' = i + Sk - Sq (the causal alignment); None or a negative side is unbounded. With
    causal=True the right side is 0. Key blocks outside the window are skipped, so a window
    of width W costs O(S * W) rather than O(S^2).
    softcap: c > 0 caps the scaled scores at c * tanh(s / c) before the mask is added (Gemma 2).
    sinks: (Hq,) float tensor, a learned logit per query head that joins each row's softmax
    denominator and carries no value (attention sinks, gpt-oss): row i's probabilities are
    exp(s_ij) / (exp(sinks[h]) + sum_j exp(s_ij)). It gets a gradient.
    alibi_slopes: (Hq,) or (B, Hq) float tensor of ALiBi slopes (BLOOM, MPT): -slope * |i' - j|
    is added to the (capped) scaled score of query i and key j, i' = i + Sk - Sq as in the
    causal rule, before the mask (flash-attention's convention). Constants: no gradient.
    dropout_p: dropout of the attention probabilities, inside the kernels of backends with the
    "dropout" capability (others are skipped): kept probabilities are scaled by 1 / (1 - p),
    the decisions regenerated from a per-call rng state in the backward (docs/design.md); the
    returned lse is the undropped softmax's.
    return_lse: also return the natural-log sum-exp of each row's scores, float32 (B, Hq, Sq),
    -inf for rows that see no key (their output is zero); with sinks, the sink is included.
    backend: force "cpu", "cuda", "triton" or "reference" (default: the fastest that can run it).
    """
    mask = ops.check_attention_inputs(q, k, v, attn_mask, enable_gqa=True)
    window, softcap = _check_options(causal, scale, dropout_p, return_lse, window, softcap)
    sinks = ops.check_sinks(sinks, q.shape[1], q)
    alibi_slopes = ops.check_alibi_slopes(alibi_slopes, q.shape[0], q.shape[1], q)
    out, lse = _attention(q, k, v, mask, scale, window, backend, dropout_p, softcap, sinks, alibi_slopes)
    return (out, lse) if return_lse else out


def varlen_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False, scale=None, dropout_p=0.0,
    return_lse=False, backend=None, window=None, softcap=None, sinks=None, alibi_slopes=None,
):
    """Attention of packed variable-length sequences (flash-attention's flash_attn_varlen_func).

    q: (total_q, Hq, D), the queries of every sequence end to end; k: (total_k, Hkv, D) and
    v: (total_k, Hkv, Dv) likewise, Hq a multiple of Hkv (GQA).
    cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) cumulative lengths on q's device: sequence b's
    queries are rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q, and it attends only to rows
    cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v. Sequences may be empty.
    max_seqlen_q, max_seqlen_k: the longest query and key sequence (they size the kernels' work;
    checked against the lengths for CPU tensors).
    causal: bottom-right within each sequence: query i of a sequence with Sq queries and Sk keys
    sees keys j <= i + Sk - Sq.
    window, softcap, sinks: as in attention(), the window aligned bottom-right within each sequence.
    alibi_slopes: (Hq,) or (B, Hq) (per sequence) as in attention(), i' aligned within each sequence.
    dropout_p: as in attention(), sequence b dropping like batch b (its queries and keys
    numbered from 0).
    return_lse: also return the natural-log sum-exp of each row, float32 (Hq, total_q), -inf
    for rows that see no key (their output is zero).
    backend: force "cpu", "cuda", "triton" or "reference" (default: the fastest that can run it).
    Nothing is padded: each sequence costs its own Sq x Sk. Returns out (total_q, Hq, Dv).
    """
    ops.check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    window, softcap = _check_options(causal, scale, dropout_p, return_lse, window, softcap)
    sinks = ops.check_sinks(sinks, q.shape[1], q)
    alibi_slopes = ops.check_alibi_slopes(alibi_slopes, cu_seqlens_q.shape[0] - 1, q.shape[1], q)
    scale = reference.default_scale(q.shape[-1]) if scale is None else scale
    rng_state = _rng_state(dropout_p, q.device)
    chosen = dispatch.choose(
        lambda name: dispatch.varlen_reason(name, q, k, v, scale, window, softcap, dropout_p, sinks, alibi_slopes),
        q.device, backend,
    )
    if chosen == "reference" or _is_empty(q, k, v):
        out, lse = reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, window, dropout_p,
                                              rng_state=rng_state, softcap=softcap, sinks=sinks,
                                              alibi_slopes=alibi_slopes)
    else:
        q, k, v = (ops.last_dim_contiguous(t) for t in (q, k, v))
        out, lse, _ = _ops_for(chosen).varlen_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(scale), window.left, window.right,
            softcap, float(dropout_p), rng_state, sinks, alibi_slopes,
        )
    return (out, lse) if return_lse else out


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention (same signature, same
    results). Differences: rows with no visible key give zeros instead of NaN; attn_mask and
    is_causal may be combined; dropout draws fastattn's Philox decisions (not torch's), in the
    fused kernels where the backend has them. Inputs may be (B, H, S, D) or (B, S, D)."""
    squeeze = query.dim() == 3
    if squeeze:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
    ops.check_flag("enable_gqa", enable_gqa)
    mask = ops.check_attention_inputs(query, key, value, attn_mask, enable_gqa=enable_gqa)
    ops.check_probability("dropout_p", dropout_p)
    ops.check_flag("is_causal", is_causal)
    ops.check_scale("scale", scale, optional=True)
    window = CAUSAL_TOP_LEFT if is_causal else UNBOUNDED
    out, _ = _attention(query, key, value, mask, scale, window, None, dropout_p)
    return out.squeeze(1) if squeeze else out


def softmax(x, mask=None, scale=1.0, causal=False, dim=-1, *, backend=None, window=None):
    """Fused softmax(scale * x + mask) along `dim`, forward and backward, any row length.

    mask: broadcastable to x; bool (True = keep) or float (added after scaling).
    causal, window: x's last two dims are (queries, keys), with attention()'s bottom-right
    rules; need dim == -1. Rows with nothing visible give zeros.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dim")
    ops.check_scale("scale", scale, optional=False)
    ops.check_flag("causal", causal)
    ops.check_dim("dim", dim, x)
    dim = dim % x.dim()
    rule = ops.window_rule(causal, window)
    if (causal or window is not None) and (x.dim() < 2 or dim != x.dim() - 1):
        given = "causal=True" if causal else "window"
        raise ValueError(f"{given} needs x with (..., queries, keys) dims and dim=-1")
    mask = ops.prepare_mask(mask, x.shape, x, "mask")
    if dim != x.dim() - 1:
        x = x.movedim(dim, -1)
        mask = None if mask is None else mask.movedim(dim, -1)
    shape = x.shape
    x4 = ops.last_dim_contiguous(_as_4d(x))
    mask4 = None if mask is None else _as_4d(mask)
    chosen = dispatch.choose(lambda name: dispatch.softmax_reason(name, x4, mask4), x.device, backend)
    if chosen == "reference" or _is_empty(x4):
        y = reference.softmax(x4, mask4, scale, rule)
    else:
        y = _ops_for(chosen).softmax_fwd(x4, mask4, float(scale), *rule)
    y = y.reshape(shape)
    return y.movedim(-1, dim) if dim != y.dim() - 1 else y


def _as_4d(t):
    """(..., R, C) -> (B, H, R, C): pads leading dims with 1s or folds the extra ones."""
    if t.dim() <= 4:
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t.reshape(math.prod(t.shape[:-3]), *t.shape[-3:])  # not -1: ambiguous when empty
