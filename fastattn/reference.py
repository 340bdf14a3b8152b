"""Pure-PyTorch attention and softmax: the ground truth for tests and the last-resort backend.

Everything here is differentiable with plain autograd and materialises the full score
matrix, so it is simple rather than fast. Low-precision inputs are computed in float32 and
cast back, like the fused kernels do.
"""
import torch

# Causal alignment codes shared by every backend (and passed to the compiled ops).
CAUSAL_NONE = 0
CAUSAL_TOP_LEFT = 1  # SDPA's rule: query i sees keys <= i
CAUSAL_BOTTOM_RIGHT = 2  # flash-attention's rule: query i sees keys <= i + Sk - Sq

# The fused forwards' third output, softmax_stats (SOFTMAX_STATS, B, Hq, Sq) float32: [0] the
# row max of the scores, [1] the row sum of exp(score - row max), so lse = [0] + log([1]); rows
# that see no key: -inf and 0. The backwards recompute P = exp(score - [0]) / [1] from them:
# an fp32 lse keeps the row sum only to |lse| * 2^-24, which at large logits costs P many
# times PyTorch's accuracy.
SOFTMAX_STATS = 2


def causal_visibility(sq: int, sk: int, causal: int, device) -> torch.Tensor:
    """Boolean (sq, sk) matrix, True where a query may see a key under `causal`."""
    offset = 0 if causal == CAUSAL_TOP_LEFT else sk - sq
    rows = torch.arange(sq, device=device).unsqueeze(1)
    cols = torch.arange(sk, device=device).unsqueeze(0)
    return cols <= rows + offset


def _masked_scores(scores, mask, causal):
    """Adds/applies `mask` and the causal rule to float scores (..., Sq, Sk)."""
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    if causal != CAUSAL_NONE:
        visible = causal_visibility(scores.shape[-2], scores.shape[-1], causal, scores.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def _safe_softmax(scores):
    """Softmax over the last dim that gives zeros (and zero gradients) for rows with no
    finite score, plus the natural-log sum-exp of each row (-inf for such rows)."""
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


def attention(q, k, v, mask=None, scale=None, causal=CAUSAL_NONE, dropout_p=0.0, upcast=True):
    """Reference attention. q: (B, Hq, Sq, D), k: (B, Hkv, Sk, D), v: (B, Hkv, Sk, Dv) with
    Hq % Hkv == 0; mask broadcastable to (B, Hq, Sq, Sk), bool (True = attend) or additive.
    upcast=False computes in the input dtype: the low-precision baseline of the tests.
    Returns (out (B, Hq, Sq, Dv) in q's dtype, lse (B, Hq, Sq) float32)."""
    compute_dtype = _compute_dtype(q.dtype, upcast)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(compute_dtype), k.to(compute_dtype).transpose(-2, -1)) * scale
    probs, lse = _safe_softmax(_masked_scores(scores, mask, causal))
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, v.to(compute_dtype))
    # lse is float32 like the kernels', except in float64 runs (the ground truth keeps its precision)
    return out.to(q.dtype), lse if lse.dtype == torch.float64 else lse.float()


def softmax(x, mask=None, scale=1.0, causal=CAUSAL_NONE, upcast=True):
    """Reference fused softmax over the last dim of `scale * x (+ mask)`; rows with no
    visible entry give zeros. upcast=False computes in x's dtype."""
    compute_dtype = _compute_dtype(x.dtype, upcast)
    scores = x.to(compute_dtype) * scale
    probs, _ = _safe_softmax(_masked_scores(scores, mask, causal))
    return probs.to(x.dtype)
