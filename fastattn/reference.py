"""Pure-PyTorch attention and softmax: the ground truth for tests and the last-resort backend.

Everything here is differentiable with plain autograd and materialises the full score
matrix, so it is simple rather than fast. Low-precision inputs are computed in float32 and
cast back, like the fused kernels do.
"""
from typing import NamedTuple

import torch

from . import philox


class Window(NamedTuple):
    """Which keys each query sees, the one visibility rule of every backend: query i sees key j
    iff i' - left <= j <= i' + right, with i' = i + Sk - Sq (bottom-right alignment, as KV-cache
    decoding needs) or i' = i (top_left, SDPA's causal rule). A negative side is unbounded.
    Causal attention is right = 0 with left unbounded."""

    left: int = -1
    right: int = -1
    top_left: bool = False

    def offset(self, sq, sk):
        """i' - i: where the diagonal of query 0 lies among the keys."""
        return 0 if self.top_left else sk - sq


UNBOUNDED = Window()  # every key
CAUSAL = Window(-1, 0)  # flash-attention's rule: query i sees keys <= i + Sk - Sq
CAUSAL_TOP_LEFT = Window(-1, 0, True)  # SDPA's rule: query i sees keys <= i

# The fused forwards' third output, softmax_stats (SOFTMAX_STATS, B, Hq, Sq) float32: [0] a
# reference max of the row (its largest score; the CPU kernels may keep one up to 8 ln 2 below
# it, to rescale their accumulators less often), [1] the row sum of exp(score - [0]), so
# lse = [0] + log([1]); rows that see no key: -inf and 0. The backwards recompute
# P = exp(score - [0]) / [1] from them: an fp32 lse keeps the row sum only to |lse| * 2^-24,
# which at large logits costs P many times PyTorch's accuracy.
SOFTMAX_STATS = 2


def window_visibility(sq: int, sk: int, window: Window, device) -> torch.Tensor:
    """Boolean (sq, sk) matrix, True where a query may see a key under `window`."""
    diagonal = torch.arange(sq, device=device).unsqueeze(1) + window.offset(sq, sk)
    cols = torch.arange(sk, device=device).unsqueeze(0)
    visible = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if window.left >= 0:
        visible &= cols >= diagonal - window.left
    if window.right >= 0:
        visible &= cols <= diagonal + window.right
    return visible


def default_scale(head_dim: int) -> float:
    """1 / sqrt(head_dim), SDPA's default; 1.0 for an empty head dim (the scores are all zero)."""
    return head_dim**-0.5 if head_dim > 0 else 1.0


def alibi_bias(slopes, sq, sk, window, dtype):
    """ALiBi's bias -slope * |i' - j| (B or 1, H, sq, sk) for slopes (H,) or (B, H): i' = i + the
    window's offset, so that the bias is 0 on the diagonal the causal rule ends at."""
    diagonal = torch.arange(sq, device=slopes.device).unsqueeze(1) + window.offset(sq, sk)
    distance = (diagonal - torch.arange(sk, device=slopes.device).unsqueeze(0)).abs().to(dtype)
    slopes = slopes.to(dtype)
    per_batch = slopes if slopes.dim() == 2 else slopes.unsqueeze(0)
    return -per_batch[:, :, None, None] * distance


def _masked_scores(scores, mask, window, softcap=0.0, alibi_slopes=None):
    """Caps scaled float scores (..., Sq, Sk) (softcap * tanh(scores / softcap) when softcap > 0),
    adds ALiBi's bias (alibi_bias), then adds/applies `mask` and hides the keys outside `window`."""
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, scores.shape[-2], scores.shape[-1], window, scores.dtype)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    if window != UNBOUNDED:
        visible = window_visibility(scores.shape[-2], scores.shape[-1], window, scores.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def _safe_softmax(scores, sinks=None):
    """Softmax over the last dim that gives zeros (and zero gradients) for rows with no
    finite score, plus the natural-log sum-exp of each row (-inf for such rows). sinks: one
    logit per head (dim -3) that joins every row's softmax with no value (gpt-oss)."""
    if sinks is not None:
        sink_column = sinks.to(scores.dtype).view(-1, 1, 1).expand(*scores.shape[:-1], 1)
        probs, lse = _safe_softmax(torch.cat([scores, sink_column], dim=-1))
        return probs[..., :-1], lse
    if scores.shape[-1] == 0:  # no keys at all: amax has nothing to reduce
        row_max = scores.new_full(scores.shape[:-1] + (1,), float("-inf"))
    else:
        row_max = scores.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(row_max)
    row_max = torch.where(empty, torch.zeros_like(row_max), row_max).detach()
    exp = torch.exp(scores - row_max)
    total = exp.sum(dim=-1, keepdim=True)
    probs = exp / torch.where(empty, torch.ones_like(total), total)
    lse = (torch.log(total) + row_max).squeeze(-1)
    return probs, lse


def _compute_dtype(dtype, upcast):
    if not upcast or dtype == torch.float64:
        return dtype
    return torch.float32


def dropout(probs, p, rng_state, first_batch=0):
    """Dropout of attention probabilities (B, H, Sq, Sk) of batches first_batch.. with the fused
    kernels' decisions: kept entries scaled by 1 / (1 - p), under rng_state (fastattn/philox.py)."""
    keep = philox.keep_mask(rng_state, probs.shape, p, first_batch)
    return torch.where(keep, probs * (1.0 / (1.0 - p) if p < 1.0 else 0.0), torch.zeros_like(probs))


def repeat_to_query_heads(t, query_heads):
    """(B, Hkv, S, D) -> (B, query_heads, S, D): each key/value head once per query head of its
    group (GQA); unchanged without groups."""
    group = query_heads // t.shape[1] if t.shape[1] else 1
    return t.repeat_interleave(group, dim=1) if group > 1 else t


def masked_scores(q, k, mask, scale, window, compute_dtype, softcap=0.0, alibi_slopes=None):
    """The scaled scores q.k^T (B, Hq, Sq, Sk) in compute_dtype, capped by `softcap`, with ALiBi,
    `mask` and `window` applied, and k repeated to q's heads (GQA) in compute_dtype."""
    k_wide = repeat_to_query_heads(k.to(compute_dtype), q.shape[1])
    scores = torch.matmul(q.to(compute_dtype), k_wide.transpose(-2, -1)) * scale
    return _masked_scores(scores, mask, window, softcap, alibi_slopes), k_wide


def attention(q, k, v, mask=None, scale=None, window=UNBOUNDED, dropout_p=0.0, upcast=True, rng_state=None,
              softcap=0.0, first_batch=0, sinks=None, alibi_slopes=None):
    """Reference attention. q: (B, Hq, Sq, D), k: (B, Hkv, Sk, D), v: (B, Hkv, Sk, Dv) with
    Hq % Hkv == 0; mask broadcastable to (B, Hq, Sq, Sk), bool (True = attend) or additive;
    window: a Window; softcap > 0 caps the scaled scores at +-softcap (before the mask).
    upcast=False computes in the input dtype: the low-precision baseline of the tests.
    dropout_p > 0 drops probabilities as the fused kernels do under rng_state (int64 (seed,
    offset); drawn from torch's generator when None), numbering the batches from first_batch.
    sinks: (Hq,) logits, one per query head, that join each row's softmax denominator and carry
    no value (attention sinks, gpt-oss); the lse includes them.
    alibi_slopes: (Hq,) or (B, Hq); -slope * |i' - j| is added to the (capped) scaled score of
    query i and key j, i' = i + Sk - Sq (i with window.top_left), before the mask.
    Returns (out (B, Hq, Sq, Dv) in q's dtype, lse (B, Hq, Sq) float32)."""
    compute_dtype = _compute_dtype(q.dtype, upcast)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    scores, _ = masked_scores(q, k, mask, scale, window, compute_dtype, softcap, alibi_slopes)
    probs, lse = _safe_softmax(scores, sinks)
    if dropout_p > 0.0:
        rng_state = philox.draw_rng_state(q.device) if rng_state is None else rng_state
        probs = dropout(probs, dropout_p, rng_state, first_batch)
    out = torch.matmul(probs, repeat_to_query_heads(v.to(compute_dtype), q.shape[1]))
    # lse is float32 like the kernels', except in float64 runs (the ground truth keeps its precision)
    return out.to(q.dtype), lse if lse.dtype == torch.float64 else lse.float()


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=None, window=UNBOUNDED, dropout_p=0.0,
                     upcast=True, rng_state=None, softcap=0.0, sinks=None, alibi_slopes=None):
    """Reference attention of packed sequences: q (total_q, Hq, D), k (total_k, Hkv, D), v
    (total_k, Hkv, Dv); sequence b's queries are rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q
    and its keys rows [cu_seqlens_k[b], cu_seqlens_k[b + 1]) of k and v (int cumulative lengths);
    each sequence is attention() of its own rows (the window aligned within it), with sequence b
    as dropout's batch b and row b of (B, Hq) alibi_slopes as its slopes.
    Returns (out (total_q, Hq, Dv) in q's dtype, lse (Hq, total_q) float32)."""
    if dropout_p > 0.0 and rng_state is None:
        rng_state = philox.draw_rng_state(q.device)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(bounds_q) - 1):
        def rows(t, bounds):  # (1, H, S, D) view of sequence b
            return t[bounds[b]:bounds[b + 1]].transpose(0, 1).unsqueeze(0)

        out, lse = attention(rows(q, bounds_q), rows(k, bounds_k), rows(v, bounds_k), None, scale, window,
                             dropout_p, upcast, rng_state, softcap, first_batch=b, sinks=sinks,
                             alibi_slopes=_batch_rows(alibi_slopes, b))
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    if not outs:  # no sequences
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_empty(0, q.shape[1], v.shape[2]), q.new_empty(q.shape[1], 0, dtype=lse_dtype)
    return torch.cat(outs), torch.cat(lses, dim=1)


def _batch_rows(slopes, b):
    """Sequence b's slopes from (Hq,) or (B, Hq) slopes (None stays None)."""
    return slopes if slopes is None or slopes.dim() == 1 else slopes[b:b + 1]


def probabilities_from_lse(q, k, lse, mask, scale, window, compute_dtype):
    """exp(scores - lse): the attention probabilities of q against k given each row's log-sum-exp
    (zero for rows whose lse is -inf). With the lse of whole rows and k one block of their keys,
    these are the block's share of the row's probabilities. Returns (probs (B, Hq, Sq, Sk),
    k repeated to Hq heads), both in compute_dtype."""
    scores, k_wide = masked_scores(q, k, mask, scale, window, compute_dtype)
    finite_lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).to(compute_dtype)
    return torch.exp(scores - finite_lse.unsqueeze(-1)), k_wide


def attention_backward(grad_out, q, k, v, out, lse, mask=None, scale=None, window=UNBOUNDED):
    """dq, dk, dv of attention from its output and lse, as the fused backward kernels compute
    them (float32, float64 for float64 inputs). Given the out and lse of whole rows while k, v
    are one block of their keys, returns that block's share of dq and the block's dk, dv."""
    compute_dtype = _compute_dtype(q.dtype, upcast=True)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    probs, k_wide = probabilities_from_lse(q, k, lse, mask, scale, window, compute_dtype)
    v_wide = repeat_to_query_heads(v.to(compute_dtype), q.shape[1])
    grad_out = grad_out.to(compute_dtype)
    delta = (grad_out * out.to(compute_dtype)).sum(dim=-1, keepdim=True)
    dscores = probs * (torch.matmul(grad_out, v_wide.transpose(-2, -1)) - delta) * scale
    dq = torch.matmul(dscores, k_wide)
    dk = torch.matmul(dscores.transpose(-2, -1), q.to(compute_dtype))
    dv = torch.matmul(probs.transpose(-2, -1), grad_out)
    kv_heads = k.shape[1]
    return dq.to(q.dtype), sum_query_groups(dk, kv_heads).to(k.dtype), sum_query_groups(dv, kv_heads).to(v.dtype)


def sum_query_groups(t, kv_heads):
    """(B, Hq, ...) -> (B, kv_heads, ...): sums the query heads that share a key/value head (GQA)."""
    return t.unflatten(1, (kv_heads, t.shape[1] // kv_heads)).sum(2)


def softmax(x, mask=None, scale=1.0, window=UNBOUNDED, upcast=True):
    """Reference fused softmax over the last dim of `scale * x (+ mask)`, x's last two dims
    (queries, keys) under `window`; rows with no visible entry give zeros. upcast=False
    computes in x's dtype."""
    compute_dtype = _compute_dtype(x.dtype, upcast)
    scores = x.to(compute_dtype) * scale
    probs, _ = _safe_softmax(_masked_scores(scores, mask, window))
    return probs.to(x.dtype)
