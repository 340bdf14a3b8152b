"""Custom operators: loading the compiled ops, their fake (meta) implementations, the autograd
formulas shared by every kernel family, and the user-facing argument checks.

Two op families share one set of schemas (csrc/fastattn.cpp):
  fastattn::attn_fwd / attn_bwd / softmax_fwd / softmax_bwd / varlen_fwd / varlen_bwd  (C++ kernels)
  fastattn::triton_attn_fwd / ... / triton_varlen_bwd                                 (Triton kernels)
"""
import numbers

import torch

from . import reference

try:  # registers the C++ ops and their CPU (and, in CUDA builds, CUDA) kernels
    from . import _C
except ImportError as error:  # pure-Python install: the reference backend still works
    _C = None
    C_IMPORT_ERROR = f"fastattn._C is not built ({error})"
else:
    C_IMPORT_ERROR = None

# Registers the Triton ops where they can run (a CUDA device, or TRITON_INTERPRET set);
# elsewhere triton stays unimported and TRITON_IMPORT_ERROR says why the backend is unusable.
from . import triton as triton_backend

TRITON_IMPORT_ERROR = triton_backend.UNAVAILABLE_REASON


# ----------------------------------------------------------------------------- argument checks

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name, t, ndim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-d (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _is_real_number(value):
    # bool is an int to Python, but True as a scale or probability is a mistake, not 1.0.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_scale(name, scale, optional):
    """`scale` multiplies the scores: a real number (or None where `optional`). Like torch,
    inf and NaN are accepted and propagate into the scores."""
    if scale is None and optional:
        return
    if not _is_real_number(scale):
        expected = "a float or None (None: 1/sqrt(head_dim))" if optional else "a float"
        raise TypeError(f"{name} must be {expected}, got {type(scale).__name__} {scale!r}")


def check_probability(name, p):
    """A dropout probability: a real number in [0, 1] (1 drops everything, as in torch)."""
    if not _is_real_number(p):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(p).__name__} {p!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p}")


def check_flag(name, value):
    """A switch such as causal: True or False, so that a string or tensor is not read as truthy."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def check_window(window):
    """window=(left, right), each side an int or None (None or negative: unbounded), or None
    for no window. Returns (left, right) with -1 for an unbounded side."""
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be None or a pair (left, right) of ints or None, got {type(window).__name__} {window!r}")
    sides = []
    for name, side in zip(("left", "right"), window):
        if side is not None and (isinstance(side, bool) or not isinstance(side, numbers.Integral)):
            raise TypeError(f"window's {name} side must be an int or None, got {type(side).__name__} {side!r}")
        sides.append(-1 if side is None else max(int(side), -1))
    return tuple(sides)


def window_rule(causal, window):
    """The reference.Window that a causal flag and a window=(left, right) make together
    (bottom-right aligned; causal sets the right side to 0)."""
    left, right = check_window(window)
    return reference.Window(left, 0 if causal else right)


def check_softcap(softcap):
    """softcap: None (no cap) or a positive finite float. Returns the kernels' value (0.0: no cap)."""
    if softcap is None:
        return 0.0
    if not _is_real_number(softcap):
        raise TypeError(f"softcap must be a positive float or None, got {type(softcap).__name__} {softcap!r}")
    if not 0.0 < softcap < float("inf"):
        raise ValueError(f"softcap must be a positive finite float, got {softcap}")
    return float(softcap)


def _check_per_head(name, t, value, shapes, shape_text, like):
    """The checks every per-head argument (sinks, ALiBi slopes) needs: a floating tensor of one
    `value` per query head, of one of `shapes` (described as `shape_text`), on `like`'s device."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be a floating-point tensor of one {value} per query head, got {got}")
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{name} must have shape {shape_text}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like the inputs, got {t.device}")


def check_sinks(sinks, heads, like):
    """sinks: None, or a floating tensor of one logit per query head (`heads`,) on `like`'s
    device. Returns it in float32, the kernels' dtype (autograd casts its gradient back)."""
    if sinks is None:
        return None
    _check_per_head("sinks", sinks, "logit", [(heads,)], f"({heads},) (one logit per query head)", like)
    return sinks.float().contiguous()


def check_alibi_slopes(slopes, batch, heads, like):
    """alibi_slopes: None, or a floating tensor of ALiBi slopes, (heads,) or (batch, heads), on
    `like`'s device. They are constants of the call (no gradient), as in flash-attention.
    Returns them as the kernels take them: float32 (batch, heads), contiguous."""
    if slopes is None:
        return None
    _check_per_head("alibi_slopes", slopes, "slope", [(heads,), (batch, heads)],
                    f"({heads},) or ({batch}, {heads}) (per query head, optionally per batch)", like)
    if slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError("alibi_slopes get no gradient (they are constants of the call): pass them detached")
    return slopes.float().expand(batch, heads).contiguous()


def check_dim(name, dim, t):
    """A dimension index of `t`: an int in [-t.dim(), t.dim()) (IndexError otherwise, like torch)."""
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__} {dim!r}")
    if not -t.dim() <= dim < t.dim():
        raise IndexError(
            f"{name} must be in [{-t.dim()}, {t.dim() - 1}] for a tensor of shape {tuple(t.shape)}, got {dim}"
        )


def check_attention_inputs(q, k, v, attn_mask, enable_gqa=True):
    """Validates (B, H, S, D) inputs; returns the mask prepared for the kernels: None, or a
    tensor expanded (without copying) to (B, Hq, Sq, Sk) with a kernel-readable dtype."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        _check_tensor(name, t, 4)
    B, Hq, Sq, D = q.shape
    _, Hkv, Sk, Dv = v.shape
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"query, key and value must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"query, key and value must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"key and value must have batch size {B} like query, got {k.shape[0]} and {v.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"key must have head_dim {D} like query: expected (B, Hkv, Sk, {D}), got {tuple(k.shape)}")
    if k.shape[1] != Hkv or k.shape[2] != Sk:
        raise ValueError(
            f"key and value must agree in heads and sequence length: key {tuple(k.shape)}, value {tuple(v.shape)}"
        )
    if (Hq % Hkv != 0) if Hkv else Hq != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if Hq != Hkv and not enable_gqa:
        raise ValueError(
            f"query has {Hq} heads but key/value have {Hkv}: pass enable_gqa=True for grouped-query attention"
        )
    return prepare_mask(attn_mask, (B, Hq, Sq, Sk), q, "attn_mask")


def check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """Validates packed inputs: q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv),
    int32 cumulative lengths and the longest lengths. The lengths themselves are checked on CPU
    (on a GPU that would need a host synchronisation; the kernels trust them there)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-d (total tokens, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    Hq, D = q.shape[1:]
    total_k, Hkv = k.shape[:2]
    if k.shape[2] != D:
        raise ValueError(f"k must have head_dim {D} like q: expected (total_k, Hkv, {D}), got {tuple(k.shape)}")
    if tuple(v.shape[:2]) != (total_k, Hkv):
        raise ValueError(f"k and v must agree in rows and heads: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if (Hq % Hkv != 0) if Hkv else Hq != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() == 0:
            got = f"{cu.dtype} {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
            raise ValueError(f"{name} must be a 1-d int32 tensor of B + 1 cumulative lengths, got {got}")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on {q.device} like q, got {cu.device}")
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(
            f"cu_seqlens_k must have as many entries as cu_seqlens_q ({cu_seqlens_q.numel()}), got {cu_seqlens_k.numel()}"
        )
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {type(value).__name__} {value!r}")
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        for name, cu, total, longest, bound in (
            ("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q),
            ("cu_seqlens_k", cu_seqlens_k, total_k, "max_seqlen_k", max_seqlen_k),
        ):
            lengths = cu.diff()
            if cu[0] != 0 or cu[-1] != total:
                raise ValueError(
                    f"{name} must start at 0 and end at {total} (the packed rows), got {int(cu[0])} and {int(cu[-1])}"
                )
            if lengths.numel() and (lengths.min() < 0 or lengths.max() > bound):
                raise ValueError(
                    f"{name} must be non-decreasing with lengths up to {longest}={bound}, got lengths {lengths.tolist()}"
                )


def prepare_mask(mask, shape, like, name):
    """Checks that `mask` broadcasts to `shape` and returns it expanded (a stride-0 view, no
    copy) in a dtype the kernels read: bool, float32 or `like`'s dtype."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like the inputs, got {mask.device}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be bool (True = attend) or floating point (added to the scores), got {mask.dtype}")
    if mask.dim() > len(shape):
        raise ValueError(f"{name} must have at most {len(shape)} dims broadcastable to {tuple(shape)}, got {tuple(mask.shape)}")
    try:
        if torch.broadcast_shapes(mask.shape, shape) != torch.Size(shape):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to {tuple(shape)}") from None
    if mask.is_floating_point() and mask.requires_grad and mask.dtype in (torch.float16, torch.bfloat16):
        # Its gradient is summed over the broadcast dims by the expand below: in float32, then
        # rounded once, as a low-precision sum of many terms would lose digits.
        mask = mask.float()
    elif mask.is_floating_point() and mask.dtype not in (torch.float32, like.dtype):
        mask = mask.to(like.dtype)
    if mask.stride(-1) != 1 and mask.shape[-1] != 1:
        mask = mask.contiguous()
    return mask.expand(shape)


def last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------- fake kernels
# Shapes and dtypes of each op's outputs, for torch.compile / FakeTensor tracing.


def _fake_attn_fwd(q, k, v, mask, scale, window_left=-1, window_right=-1, window_top_left=False, softcap=0.0,
                   dropout_p=0.0, rng_state=None, sinks=None, alibi_slopes=None):
    B, Hq, Sq, _ = q.shape
    return (
        q.new_empty(B, Hq, Sq, v.shape[-1]),
        q.new_empty(B, Hq, Sq, dtype=torch.float32),
        q.new_empty(reference.SOFTMAX_STATS, B, Hq, Sq, dtype=torch.float32),
    )


def _fake_attn_bwd(grad_out, q, k, v, out, softmax_stats, mask, scale, mask_grad, window_left=-1, window_right=-1,
                   window_top_left=False, softcap=0.0, dropout_p=0.0, rng_state=None, alibi_slopes=None):
    B, Hq, Sq, _ = q.shape
    dmask_shape = (B, Hq, Sq, k.shape[2]) if mask_grad else (0,)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), q.new_empty(dmask_shape, dtype=torch.float32)


def _fake_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left=-1,
                     window_right=-1, softcap=0.0, dropout_p=0.0, rng_state=None, sinks=None, alibi_slopes=None):
    total_q, Hq, _ = q.shape
    return (
        q.new_empty(total_q, Hq, v.shape[-1]),
        q.new_empty(Hq, total_q, dtype=torch.float32),
        q.new_empty(reference.SOFTMAX_STATS, Hq, total_q, dtype=torch.float32),
    )


def _fake_varlen_bwd(grad_out, q, k, v, out, softmax_stats, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     scale, window_left=-1, window_right=-1, softcap=0.0, dropout_p=0.0, rng_state=None,
                     alibi_slopes=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fake_softmax_fwd(x, mask, scale, window_left=-1, window_right=-1, window_top_left=False):
    return x.new_empty(x.shape)


def _fake_softmax_bwd(grad_y, y):
    return y.new_empty(y.shape)


def _fake_dropout_keep_mask(rng_state, batch, heads, rows, cols, p):
    return rng_state.new_empty((batch, heads, rows, cols), dtype=torch.bool)


def _fake_attn_fwd_kvcache(q, k_cache, v_cache, cache_seqlens, block_table, scale, window_left=-1, window_right=-1,
                           softcap=0.0, sinks=None, alibi_slopes=None):
    B, Hq, Sq, _ = q.shape
    return q.new_empty(B, Hq, Sq, v_cache.shape[-1]), q.new_empty(B, Hq, Sq, dtype=torch.float32)


# ----------------------------------------------------------------------------- autograd


def _lse_gradient_terms(g_lse, q, k, mask, scale, window, softcap, sinks, alibi_slopes):
    """Extra dq, dk, dmask when the caller differentiates the returned log-sum-exp
    (d lse / d scores = P). Materialises P, so it is only run when lse is part of the loss.
    P is the softmax of these very scores, not exp(scores - lse): an fp32 lse keeps the row
    sum only to |lse| * 2^-24, and the kernel's row max may differ from these scores by an
    ulp, either of which costs P many times PyTorch's accuracy at large logits."""
    scores, k32 = reference.masked_scores(q, k, mask, scale, window, torch.float32, softcap, alibi_slopes)
    probs, _ = reference._safe_softmax(scores, sinks)
    dscores = probs * g_lse.unsqueeze(-1)  # the mask's gradient: it is added after the cap
    dlogits = dscores
    if softcap:  # through the cap: d (c tanh(s / c)) / ds = 1 - tanh(s / c)^2
        logits = torch.matmul(q.float(), k32.transpose(-2, -1)) * scale
        dlogits = dscores * (1 - torch.tanh(logits / softcap).square())
    dq = torch.matmul(dlogits, k32) * scale
    dk = reference.sum_query_groups(torch.matmul(dlogits.transpose(-2, -1), q.float()) * scale, k.shape[1])
    return dq, dk, dscores


def _reference_backward(ctx, recompute, inputs, n_inputs, grad_out, grad_lse):
    """An op's backward through the reference recomputed under autograd: for double backward
    (the fused backward kernels have no derivative of their own) and, for packed calls, a
    differentiated lse. inputs: {op input number: tensor} of the differentiable inputs;
    recompute(*inputs.values()) -> (out, lse). Returns one entry per op input (n_inputs)."""
    wanted = [i for i, t in inputs.items() if t is not None and ctx.needs_input_grad[i]]
    create_graph = torch.is_grad_enabled()  # double backward: the gradients are differentiable
    with torch.enable_grad():
        out, lse = recompute(*inputs.values())
        pairs = [(t, g) for t, g in ((out, grad_out), (lse, grad_lse)) if g is not None]
        grads = torch.autograd.grad(
            [t for t, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
            create_graph=create_graph, allow_unused=True,
        )
    result = [None] * n_inputs
    for i, grad in zip(wanted, grads):
        result[i] = torch.zeros_like(inputs[i]) if grad is None else grad
    return tuple(result)


def _sink_gradient(sinks, lse, delta, grad_lse, head_dim):
    """d loss / d sinks. Sink h is one more logit in each row of head h, seen with probability
    p0 = exp(sink - lse) and carrying no value, so its dS is p0 * (grad_lse - delta), delta =
    rowsum(grad_out * out) as in every row's backward; summed over the head's rows. lse, delta
    and grad_lse share a layout whose dim `head_dim` is the head."""
    shape = [1] * lse.dim()
    shape[head_dim] = -1
    p0 = torch.exp(sinks.view(shape) - lse.masked_fill(lse.isneginf(), float("inf")))  # 0 in empty rows
    dscore = -delta if grad_lse is None else grad_lse - delta
    return (p0 * dscore).sum([d for d in range(lse.dim()) if d != head_dim])


def _row_delta(grad_out, out):
    """rowsum(grad_out * out) in float32 (zeros where grad_out was not given)."""
    if grad_out is None:
        return torch.zeros(out.shape[:-1], dtype=torch.float32, device=out.device)
    return (grad_out.float() * out.float()).sum(-1)


# q, k, v, mask, scale, window_left, window_right, window_top_left, softcap, dropout_p, rng_state, sinks,
# alibi_slopes
_ATTN_FWD_INPUTS = 13
_ATTN_SINKS = 11
# q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right, softcap,
# dropout_p, rng_state, sinks, alibi_slopes
_VARLEN_FWD_INPUTS = 15
_VARLEN_SINKS = 13


class OpFamily:
    """The six ops of one kernel family with autograd attached."""

    def __init__(self, prefix, register_fakes):
        ops = ("attn_fwd", "attn_bwd", "softmax_fwd", "softmax_bwd", "varlen_fwd", "varlen_bwd")
        names = [f"fastattn::{prefix}{op}" for op in ops]
        if register_fakes:
            fakes = (_fake_attn_fwd, _fake_attn_bwd, _fake_softmax_fwd, _fake_softmax_bwd, _fake_varlen_fwd, _fake_varlen_bwd)
            for name, fake in zip(names, fakes):
                torch.library.register_fake(name)(fake)
        packet = torch.ops.fastattn
        (self.attn_fwd, self.attn_bwd, self.softmax_fwd, self.softmax_bwd, self.varlen_fwd, self.varlen_bwd) = (
            getattr(packet, name.split("::")[1]).default for name in names
        )
        torch.library.register_autograd(names[0], self._attention_backward, setup_context=self._attention_setup)
        torch.library.register_autograd(names[2], self._softmax_backward, setup_context=self._softmax_setup)
        torch.library.register_autograd(names[4], self._varlen_backward, setup_context=self._varlen_setup)

    @staticmethod
    def _attention_setup(ctx, inputs, output):
        (q, k, v, mask, scale, window_left, window_right, window_top_left, softcap, dropout_p, rng_state, sinks,
         alibi_slopes) = inputs
        out, lse, softmax_stats = output
        # rng_state is kept, not a mask: the backward regenerates the forward's keep decisions.
        ctx.save_for_backward(q, k, v, mask, out, softmax_stats, rng_state, sinks, lse, alibi_slopes)
        ctx.scale, ctx.softcap, ctx.dropout_p = scale, softcap, dropout_p
        ctx.window = reference.Window(window_left, window_right, window_top_left)
        ctx.set_materialize_grads(False)

    def _attention_backward(self, ctx, grad_out, grad_lse, grad_softmax_stats):
        q, k, v, mask, out, softmax_stats, rng_state, sinks, lse, alibi_slopes = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the backward must itself be differentiable
            def recompute(q, k, v, mask, sinks):
                return reference.attention(q, k, v, mask, ctx.scale, ctx.window, ctx.dropout_p, rng_state=rng_state,
                                           softcap=ctx.softcap, sinks=sinks, alibi_slopes=alibi_slopes)

            inputs = {0: q, 1: k, 2: v, 3: mask, _ATTN_SINKS: sinks}
            return _reference_backward(ctx, recompute, inputs, _ATTN_FWD_INPUTS, grad_out, grad_lse)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[_ATTN_SINKS]:
            dsinks = _sink_gradient(sinks, lse, _row_delta(grad_out, out), grad_lse, head_dim=1)
        mask_grad = ctx.needs_input_grad[3]
        if grad_out is None:  # only the lse was used
            grad_out = torch.zeros_like(out)
        dq, dk, dv, dmask = self.attn_bwd(
            last_dim_contiguous(grad_out), q, k, v, out, softmax_stats, mask, ctx.scale, mask_grad, *ctx.window,
            ctx.softcap, ctx.dropout_p, rng_state, alibi_slopes,
        )
        if grad_lse is not None:
            dq_lse, dk_lse, dmask_lse = _lse_gradient_terms(grad_lse, q, k, mask, ctx.scale, ctx.window, ctx.softcap,
                                                            sinks, alibi_slopes)
            dq, dk = dq + dq_lse.to(dq.dtype), dk + dk_lse.to(dk.dtype)
            if mask_grad:
                dmask = dmask + dmask_lse
        grads = [dq, dk, dv, dmask.to(mask.dtype) if mask_grad else None] + [None] * (_ATTN_FWD_INPUTS - 4)
        grads[_ATTN_SINKS] = dsinks
        return tuple(grads[: len(ctx.needs_input_grad)])  # one per input given (defaults may be left out)

    @staticmethod
    def _varlen_setup(ctx, inputs, output):
        (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right, softcap,
         dropout_p, rng_state, sinks, alibi_slopes) = inputs
        out, lse, softmax_stats = output
        ctx.save_for_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, out, softmax_stats, rng_state, sinks, lse,
                              alibi_slopes)
        ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.scale, ctx.softcap = max_seqlen_q, max_seqlen_k, scale, softcap
        ctx.dropout_p = dropout_p
        ctx.window = reference.Window(window_left, window_right)
        ctx.set_materialize_grads(False)

    def _varlen_backward(self, ctx, grad_out, grad_lse, grad_softmax_stats):
        q, k, v, cu_seqlens_q, cu_seqlens_k, out, softmax_stats, rng_state, sinks, lse, alibi_slopes = ctx.saved_tensors
        if torch.is_grad_enabled() or grad_lse is not None:
            def recompute(q, k, v, sinks):
                return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, ctx.scale, ctx.window,
                                                  ctx.dropout_p, rng_state=rng_state, softcap=ctx.softcap, sinks=sinks,
                                                  alibi_slopes=alibi_slopes)

            inputs = {0: q, 1: k, 2: v, _VARLEN_SINKS: sinks}
            return _reference_backward(ctx, recompute, inputs, _VARLEN_FWD_INPUTS, grad_out, grad_lse)
        if grad_out is None:  # neither output was used
            return (None,) * _VARLEN_FWD_INPUTS
        dq, dk, dv = self.varlen_bwd(
            last_dim_contiguous(grad_out), q, k, v, out, softmax_stats, cu_seqlens_q, cu_seqlens_k,
            ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.scale, ctx.window.left, ctx.window.right, ctx.softcap,
            ctx.dropout_p, rng_state, alibi_slopes,
        )
        grads = [dq, dk, dv] + [None] * (_VARLEN_FWD_INPUTS - 3)
        if sinks is not None and ctx.needs_input_grad[_VARLEN_SINKS]:  # out (total_q, Hq, Dv), lse (Hq, total_q)
            grads[_VARLEN_SINKS] = _sink_gradient(sinks, lse, _row_delta(grad_out, out).t(), None, head_dim=0)
        return tuple(grads[: len(ctx.needs_input_grad)])

    @staticmethod
    def _softmax_setup(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.scale = inputs[2]

    def _softmax_backward(self, ctx, grad_y):
        (y,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the same formula in differentiable ops
            y32 = y.float()
            grad_y32 = grad_y.float()
            grad_scores = (y32 * (grad_y32 - (grad_y32 * y32).sum(-1, keepdim=True))).to(y.dtype)
        else:
            grad_scores = self.softmax_bwd(last_dim_contiguous(grad_y), y)  # d loss / d (scale*x + mask)
        grad_x = grad_scores * ctx.scale if ctx.needs_input_grad[0] else None
        grad_mask = grad_scores if ctx.needs_input_grad[1] else None
        return grad_x, grad_mask, None, None, None, None  # scale and the window take none


NATIVE_OPS = OpFamily("", register_fakes=True) if _C is not None else None
if _C is not None:
    torch.library.register_fake("fastattn::dropout_keep_mask")(_fake_dropout_keep_mask)
    torch.library.register_fake("fastattn::attn_fwd_kvcache")(_fake_attn_fwd_kvcache)
TRITON_OPS = OpFamily("triton_", register_fakes=False) if TRITON_IMPORT_ERROR is None else None
