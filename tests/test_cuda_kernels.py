"""CUDA C++ kernels (csrc/cuda/) against the float64 reference, the tolerance rule of docs/design.md.

Skipped unless a CUDA device is present and fastattn._C was built with CUDA. The ops are
called directly (torch.ops.fastattn.*) so that these tests exercise the CUDA kernels only.
"""
import math
import os
import sys

import pytest
import torch

from fastattn import philox, reference
from fastattn.capabilities import CAPABILITIES
from fastattn.reference import CAUSAL, CAUSAL_TOP_LEFT, UNBOUNDED, Window

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tolerance import assert_within_baseline  # noqa: E402


def _cuda_build_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        from fastattn import _C
    except ImportError as e:
        return f"fastattn._C not importable: {e}"
    if not getattr(_C, "with_cuda", False):
        return "fastattn._C was built without CUDA"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::attn_fwd", "CUDA"):
        return "no CUDA kernels registered for fastattn ops"
    if torch.cuda.get_device_capability()[0] < 8:
        return "the CUDA kernels need compute capability >= 8.0"
    return None


SKIP_REASON = _cuda_build_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))]
DEVICE = "cuda"
OPS = torch.ops.fastattn


def _poison_allocator():
    """Fills freed cached blocks with NaN so that outputs the kernels forget to write show up."""
    junk = torch.full((64 * 1024 * 1024,), float("nan"), device=DEVICE)
    del junk


def _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, strided):
    """Random q, k, v; `strided` gives (B, S, H, D) storage seen through a transpose."""
    def make(H, S):
        if strided:
            return torch.randn(B, S, H, D, device=DEVICE, dtype=dtype).transpose(1, 2)
        return torch.randn(B, H, S, D, device=DEVICE, dtype=dtype)

    return make(Hq, Sq), make(Hkv, Sk), make(Hkv, Sk)


def _mask(kind, B, Hq, Sq, Sk, dtype):
    """A mask expanded to (B, Hq, Sq, Sk) (broadcast dims keep stride 0), or None."""
    shape = (B, Hq, Sq, Sk)
    if kind is None:
        return None
    if kind == "bool":  # full random mask, every row keeps key 0
        m = torch.rand(shape, device=DEVICE) > 0.3
        m[..., 0] = True
        return m
    if kind == "padding_bool":  # key padding (B, 1, 1, Sk); batch 0 sees nothing at all
        lengths = torch.randint(1, Sk + 1, (B,), device=DEVICE)
        lengths[0] = 0
        m = torch.arange(Sk, device=DEVICE)[None, :] < lengths[:, None]
        return m[:, None, None, :].expand(shape)
    if kind == "additive":  # per-head bias in q's dtype, broadcast over batch, some -inf
        bias = torch.randn(1, Hq, Sq, Sk, device=DEVICE).to(dtype)
        bias[..., 1::3] = float("-inf")
        bias[..., 0] = 0
        return bias.expand(shape)
    if kind == "additive_f32_row":  # float32 bias shared by all rows (last dims broadcast)
        return torch.randn(B, 1, 1, Sk, device=DEVICE).expand(shape)
    raise ValueError(kind)


def _attention(q, k, v, mask, scale, causal, z, softcap):
    """Attention with an extra additive zero tensor `z` whose gradient is dS (dmask)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(scores.dtype)
    scores = reference._masked_scores(scores, mask, causal, softcap) + z
    probs, lse = reference._safe_softmax(scores)
    return torch.matmul(probs, v), lse.float()


def _run_reference(q, k, v, mask, scale, causal, grad_out, dtype, softcap=0.0):
    """(out, lse, dq, dk, dv, dmask) of `_attention` computed in `dtype` from the same inputs."""
    inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    z = torch.zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2], device=DEVICE, dtype=dtype,
                    requires_grad=True)
    out, lse = _attention(*inputs, mask, scale, causal, z, softcap)
    out.backward(grad_out.to(dtype))
    return (out.detach(), lse.detach(), *(t.grad for t in inputs), z.grad)


# (B, Hq, Hkv, Sq, Sk, D, window, mask kind, dtype, strided, softcap)
ATTENTION_CASES = [
    (2, 4, 4, 128, 128, 64, UNBOUNDED, None, torch.float16, False, 0.0),
    (2, 4, 2, 113, 203, 40, UNBOUNDED, None, torch.bfloat16, True, 0.0),
    (1, 2, 1, 1, 1, 32, UNBOUNDED, None, torch.float16, False, 0.0),
    (2, 2, 2, 1023, 1024, 128, CAUSAL_TOP_LEFT, None, torch.bfloat16, False, 0.0),
    (1, 4, 1, 512, 256, 96, CAUSAL_TOP_LEFT, "bool", torch.float16, True, 0.0),
    (2, 2, 1, 203, 113, 80, CAUSAL, None, torch.float16, False, 0.0),
    (1, 3, 3, 256, 512, 128, CAUSAL, "additive", torch.float16, False, 0.0),
    (3, 2, 2, 77, 300, 64, UNBOUNDED, "padding_bool", torch.bfloat16, True, 0.0),
    (2, 4, 2, 130, 190, 128, UNBOUNDED, "additive_f32_row", torch.bfloat16, False, 0.0),
    (1, 2, 2, 200, 333, 256, UNBOUNDED, None, torch.float16, False, 0.0),
    (1, 2, 1, 257, 257, 256, CAUSAL, "bool", torch.bfloat16, True, 0.0),
    (2, 8, 1, 64, 64, 32, CAUSAL_TOP_LEFT, "additive", torch.bfloat16, False, 0.0),
    # Sliding windows (key blocks outside skipped), two-sided, rows left empty, softcap.
    (1, 4, 2, 300, 300, 64, Window(40, 0), None, torch.float16, False, 0.0),
    (2, 2, 1, 150, 260, 128, Window(30, 20), "padding_bool", torch.bfloat16, True, 0.0),
    (1, 2, 2, 200, 90, 64, Window(8, 0), "additive", torch.float16, False, 0.0),
    (1, 4, 2, 256, 256, 64, CAUSAL, None, torch.bfloat16, False, 30.0),
    (2, 2, 1, 128, 333, 128, Window(50, -1), None, torch.float16, False, 5.0),
    (1, 2, 1, 100, 100, 256, Window(16, 0), "bool", torch.bfloat16, False, 0.0),
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "-".join(map(str, c)))
def test_attention_matches_reference(case):
    B, Hq, Hkv, Sq, Sk, D, causal, kind, dtype, strided, softcap = case
    torch.manual_seed(ATTENTION_CASES.index(case))
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, strided)
    mask = _mask(kind, B, Hq, Sq, Sk, dtype)
    scale = 1.0 / math.sqrt(D)
    grad_out = torch.randn(B, Hq, Sq, D, device=DEVICE, dtype=dtype)
    with_backward = D <= 128

    _poison_allocator()
    out, lse, stats = OPS.attn_fwd(q, k, v, mask, scale, *causal, softcap)
    ref = _run_reference(q, k, v, mask, scale, causal, grad_out, torch.float64, softcap)
    base = _run_reference(q, k, v, mask, scale, causal, grad_out, dtype, softcap)

    assert out.dtype == dtype and out.shape == (B, Hq, Sq, D)
    assert_within_baseline("out", out, ref[0], base[0])
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, Sq)
    empty = torch.isneginf(ref[1])
    assert torch.equal(torch.isneginf(lse), empty), "lse: -inf rows differ from the reference"
    assert_within_baseline("lse", lse[~empty], ref[1][~empty].float(), base[1][~empty])
    if empty.any():
        assert out[empty].abs().max() == 0, "rows that see no key must be zeros"
    if not with_backward:
        return

    _poison_allocator()
    mask_grad = kind is not None and mask.dtype != torch.bool
    dq, dk, dv, dmask = OPS.attn_bwd(grad_out, q, k, v, out, stats, mask, scale, mask_grad, *causal, softcap)
    for name, got, r, b in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[2:5], base[2:5]):
        assert got.is_contiguous() and got.dtype == dtype, name
        assert_within_baseline(name, got, r, b)
    if mask_grad:
        assert dmask.dtype == torch.float32 and dmask.shape == (B, Hq, Sq, Sk)
        assert_within_baseline("dmask", dmask, ref[5], base[5].float())
    else:
        assert dmask.shape == (0,)
    if empty.any():
        assert dq[empty].abs().max() == 0, "rows that see no key must get zero dq"


def test_dmask_without_mask_is_ds():
    """mask_grad=True with no mask still returns dS, the gradient w.r.t. the scores."""
    torch.manual_seed(1)
    B, H, Sq, Sk, D = 1, 2, 70, 90, 64
    q, k, v = _qkv(B, H, H, Sq, Sk, D, torch.float16, False)
    grad_out = torch.randn(B, H, Sq, D, device=DEVICE, dtype=torch.float16)
    out, lse, stats = OPS.attn_fwd(q, k, v, None, 0.125, *CAUSAL_TOP_LEFT)
    dmask = OPS.attn_bwd(grad_out, q, k, v, out, stats, None, 0.125, True, *CAUSAL_TOP_LEFT)[3]
    ref = _run_reference(q, k, v, None, 0.125, CAUSAL_TOP_LEFT, grad_out, torch.float64)
    base = _run_reference(q, k, v, None, 0.125, CAUSAL_TOP_LEFT, grad_out, torch.float16)
    assert_within_baseline("dmask", dmask, ref[5], base[5].float())


def test_key_padding_skips_hidden_blocks():
    """Key blocks hidden for every row must be skipped, not read: NaN there cannot leak.
    Keys from 128 on are hidden, a multiple of every key block the kernels use."""
    torch.manual_seed(2)
    B, H, Sq, Sk, D = 2, 2, 100, 320, 64
    q, k, v = _qkv(B, H, H, Sq, Sk, D, torch.bfloat16, False)
    k[:, :, 128:] = float("nan")
    v[:, :, 128:] = float("nan")
    mask = (torch.arange(Sk, device=DEVICE) < 128)[None, None, None, :].expand(B, H, Sq, Sk)
    out, lse, stats = OPS.attn_fwd(q, k, v, mask, 0.125, *UNBOUNDED)
    grad_out = torch.randn_like(out)
    dq, dk, dv, _ = OPS.attn_bwd(grad_out, q, k, v, out, stats, mask, 0.125, False, *UNBOUNDED)
    kk, vv = k[:, :, :128], v[:, :, :128]
    ref = _run_reference(q, kk, vv, None, 0.125, UNBOUNDED, grad_out, torch.float64)
    base = _run_reference(q, kk, vv, None, 0.125, UNBOUNDED, grad_out, torch.bfloat16)
    assert_within_baseline("out", out, ref[0], base[0])
    assert_within_baseline("dq", dq, ref[2], base[2])
    assert_within_baseline("dk", dk[:, :, :128], ref[3], base[3])
    assert dk[:, :, 128:].abs().max() == 0 and dv[:, :, 128:].abs().max() == 0


def test_rows_that_see_nothing_are_zero():
    """Bottom-right causal with Sq > Sk: the first Sq - Sk rows see no key."""
    torch.manual_seed(3)
    B, H, Sq, Sk, D = 1, 2, 150, 40, 64
    q, k, v = _qkv(B, H, H, Sq, Sk, D, torch.float16, False)
    out, lse, stats = OPS.attn_fwd(q, k, v, None, 0.125, *CAUSAL)
    dq, dk, dv, _ = OPS.attn_bwd(torch.ones_like(out), q, k, v, out, stats, None, 0.125, False,
                                 *CAUSAL)
    hidden = Sq - Sk
    assert torch.isneginf(lse[:, :, :hidden]).all() and torch.isfinite(lse[:, :, hidden:]).all()
    assert out[:, :, :hidden].abs().max() == 0 and dq[:, :, :hidden].abs().max() == 0
    for t in (out, dq, dk, dv):
        assert not torch.isnan(t).any()


def test_backward_is_deterministic():
    torch.manual_seed(4)
    q, k, v = _qkv(2, 8, 2, 300, 300, 128, torch.bfloat16, False)
    out, lse, stats = OPS.attn_fwd(q, k, v, None, 0.09, *CAUSAL_TOP_LEFT)
    grad_out = torch.randn_like(out)
    first = OPS.attn_bwd(grad_out, q, k, v, out, stats, None, 0.09, False, *CAUSAL_TOP_LEFT)
    second = OPS.attn_bwd(grad_out, q, k, v, out, stats, None, 0.09, False, *CAUSAL_TOP_LEFT)
    for a, b in zip(first[:3], second[:3]):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- dropout


def _rng_state(seed, offset):
    return torch.tensor([seed, offset], device=DEVICE, dtype=torch.int64)


@pytest.mark.parametrize("Sq, D, window", [(100, 64, UNBOUNDED), (37, 128, CAUSAL), (130, 32, Window(20, 5)),
                                           (70, 96, CAUSAL_TOP_LEFT), (64, 256, UNBOUNDED)])
@pytest.mark.parametrize("p", [0.1, 0.6])
def test_dropout_keep_pattern_is_philox_bit_for_bit(Sq, D, window, p):
    """q = 0 and v = identity (Sk = D): out row i is the dropped probability row, 1 / (n (1 - p))
    where kept (n: the keys row i sees) and exactly 0 where fastattn.philox.keep_mask drops."""
    B, Hq, Hkv, Sk = 2, 4, 2, D
    q = torch.zeros(B, Hq, Sq, D, device=DEVICE, dtype=torch.float16)
    k = torch.randn(B, Hkv, Sk, D, device=DEVICE, dtype=torch.float16)
    v = torch.eye(Sk, device=DEVICE, dtype=torch.float16).expand(B, Hkv, Sk, D)
    state = _rng_state(0x123456789ABC, 77)
    out, _, _ = OPS.attn_fwd(q, k, v, None, D ** -0.5, *window, 0.0, p, state)
    visible = reference.window_visibility(Sq, Sk, window, DEVICE)
    kept = philox.keep_mask(state, (B, Hq, Sq, Sk), p) & visible
    assert torch.equal(out != 0, kept)
    seen = visible.sum(-1, keepdim=True).clamp(min=1).expand(B, Hq, Sq, Sk)
    torch.testing.assert_close(out[kept].float(), (1.0 / (seen * (1 - p)))[kept].float(), rtol=1e-3, atol=0)


@pytest.mark.parametrize("D", [32, 64, 128])
def test_dropout_backward_keep_pattern_is_philox_bit_for_bit(D):
    """The dK/dV kernel's decisions: with q = 0, v = identity and grad_out row i = e_i, dV[j, i]
    is the dropped probability of (i, j), nonzero exactly where keep_mask keeps it."""
    B, H, Sq, Sk, p = 2, 3, D - 5, D, 0.3
    q = torch.zeros(B, H, Sq, D, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(B, H, Sk, D, device=DEVICE, dtype=torch.bfloat16)
    v = torch.eye(Sk, device=DEVICE, dtype=torch.bfloat16).expand(B, H, Sk, D)
    grad_out = torch.eye(Sq, D, device=DEVICE, dtype=torch.bfloat16).expand(B, H, Sq, D)
    state = _rng_state(31337, 2**32 - 1)
    out, _, stats = OPS.attn_fwd(q, k, v, None, 0.1, -1, -1, False, 0.0, p, state)
    _, _, dv, _ = OPS.attn_bwd(grad_out, q, k, v, out, stats, None, 0.1, False, -1, -1, False, 0.0, p, state)
    assert torch.equal(dv[:, :, :, :Sq].transpose(-2, -1) != 0, philox.keep_mask(state, (B, H, Sq, Sk), p))


def _check_against_reference(kernel_fwd, kernel_bwd, reference_fn, q, k, v, mask=None):
    """kernel_fwd() -> (out, lse, stats) and, up to the backward's head dims, kernel_bwd(grad_out,
    out, stats, mask_grad) -> gradients, against reference_fn(q, k, v, mask) -> (out, lse) in
    float64 within twice the same in q's dtype: out, lse (the same rows -inf, their output zeros),
    dq, dk, dv and, for an additive mask, dmask."""
    dtype, D = q.dtype, q.shape[-1]
    with_backward = D <= CAPABILITIES["cuda"].max_head_dim_bwd
    mask_grad = mask is not None and mask.dtype != torch.bool
    grad_out = torch.randn_like(q)

    def run_reference(to_dtype):
        leaves = [t.detach().to(to_dtype).requires_grad_() for t in (q, k, v)]
        m = mask
        if mask_grad:
            m = mask.detach().to(to_dtype).contiguous().requires_grad_()
            leaves.append(m)
        o, lse = reference_fn(*leaves[:3], m)
        return o, lse, torch.autograd.grad(o, leaves, grad_out.to(to_dtype)) if with_backward else None

    _poison_allocator()
    out, lse, stats = kernel_fwd()
    (ref_out, ref_lse, ref_grads), (base_out, base_lse, base_grads) = run_reference(torch.float64), run_reference(dtype)
    assert_within_baseline("out", out, ref_out, base_out)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "lse: -inf rows differ from the reference"
    assert_within_baseline("lse", lse[~empty], ref_lse[~empty].float(), base_lse[~empty])
    if empty.any():
        rows = out.transpose(0, 1) if out.dim() == 3 else out  # packed out is (total, H, D), lse (H, total)
        assert rows[empty].abs().max() == 0, "rows that see no key must be zeros"
    if not with_backward:
        return
    _poison_allocator()
    grads = kernel_bwd(grad_out, out, stats, mask_grad)
    names = ("dq", "dk", "dv", "dmask") if mask_grad else ("dq", "dk", "dv")
    for name, got, ref, base in zip(names, grads, ref_grads, base_grads):
        assert not torch.isnan(got).any(), f"{name} has NaN"
        assert_within_baseline(name, got, ref, base.to(got.dtype))


def _check_options_against_reference(q, k, v, mask, scale, window, softcap=0.0, dropout_p=0.0, rng_state=None,
                                     sinks=None, alibi_slopes=None):
    """attn_fwd / attn_bwd with these options against reference.attention (_check_against_reference)."""
    def kernel_fwd():
        return OPS.attn_fwd(q, k, v, mask, scale, *window, softcap, dropout_p, rng_state, sinks, alibi_slopes)

    def kernel_bwd(grad_out, out, stats, mask_grad):
        grads = OPS.attn_bwd(grad_out, q, k, v, out, stats, mask, scale, mask_grad, *window, softcap, dropout_p,
                             rng_state, alibi_slopes)
        return grads if mask_grad else grads[:3]

    def reference_fn(q, k, v, m):
        return reference.attention(q, k, v, m, scale, window, dropout_p, upcast=False, rng_state=rng_state,
                                   softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes)

    _check_against_reference(kernel_fwd, kernel_bwd, reference_fn, q, k, v, mask)


# (B, Hq, Hkv, Sq, Sk, D, window, mask kind, dtype, softcap); head dim 256 runs the forward only
DROPOUT_CASES = [
    (2, 4, 2, 113, 203, 64, UNBOUNDED, None, torch.float16, 0.0),
    (1, 2, 1, 203, 113, 128, CAUSAL, None, torch.bfloat16, 0.0),
    (2, 2, 2, 150, 260, 96, Window(30, 20), "padding_bool", torch.bfloat16, 0.0),
    (1, 3, 3, 100, 130, 32, CAUSAL_TOP_LEFT, "additive", torch.float16, 0.0),
    (1, 4, 2, 256, 256, 64, CAUSAL, None, torch.bfloat16, 30.0),
    (1, 2, 1, 77, 90, 256, UNBOUNDED, "bool", torch.float16, 0.0),
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_dropout_matches_reference(case):
    """Output, lse (the undropped softmax's) and gradients against the reference dropping the same
    scores under the same rng_state."""
    B, Hq, Hkv, Sq, Sk, D, window, kind, dtype, softcap = case
    torch.manual_seed(Sq * Sk + D)
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, False)
    mask = _mask(kind, B, Hq, Sq, Sk, dtype)
    state = _rng_state(2**40 + 12345, 99)
    _check_options_against_reference(q, k, v, mask, D ** -0.5, window, softcap, 0.2, state)


def test_dropout_reads_rng_state_on_the_device():
    """A captured CUDA graph replays with the (seed, offset) the state tensor holds at replay: the
    kernels read it from device memory, so no value is baked into the launch."""
    torch.manual_seed(6)
    q, k, v = _qkv(1, 2, 2, 96, 96, 64, torch.float16, False)
    state = _rng_state(1, 0)

    def forward():
        return OPS.attn_fwd(q, k, v, None, 0.125, -1, -1, False, 0.0, 0.5, state)[0]

    forward()  # warm-up: kernel attributes are set outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = forward()
    replays = []
    for seed in (5, 6):
        state.copy_(torch.tensor([seed, 9]))
        graph.replay()
        assert torch.equal(captured, forward())
        replays.append(captured.clone())
    assert not torch.equal(*replays)


def test_dropout_argument_errors():
    q = torch.randn(1, 2, 16, 64, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="rng_state must be given when dropout_p > 0"):
        OPS.attn_fwd(q, q, q, None, 0.125, -1, -1, False, 0.0, 0.1, None)
    with pytest.raises(ValueError, match="rng_state must be a contiguous int64"):
        OPS.attn_fwd(q, q, q, None, 0.125, -1, -1, False, 0.0, 0.1, torch.tensor([1.0, 2.0], device=DEVICE))
    with pytest.raises(ValueError, match="dropout_p must be in"):
        OPS.attn_fwd(q, q, q, None, 0.125, -1, -1, False, 0.0, 1.5, _rng_state(1, 2))


def test_unsupported_inputs_raise_clear_errors():
    q = torch.randn(1, 2, 16, 64, device=DEVICE, dtype=torch.float16)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        OPS.attn_fwd(q.float(), q.float(), q.float(), None, 0.125)
    big = torch.randn(1, 2, 16, 264, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="head dim"):
        OPS.attn_fwd(big, big, big, None, 0.125)
    wide = torch.randn(1, 2, 16, 256, device=DEVICE, dtype=torch.float16)
    out, lse, stats = OPS.attn_fwd(wide, wide, wide, None, 0.0625)
    with pytest.raises(ValueError, match="head dim"):
        OPS.attn_bwd(out, wide, wide, wide, out, stats, None, 0.0625, False)
    with pytest.raises(ValueError, match="scale"):
        OPS.attn_fwd(q, q, q, None, 0.0)
    with pytest.raises(ValueError, match="mask"):
        OPS.attn_fwd(q, q, q, torch.ones(1, 2, 16, 15, device=DEVICE, dtype=torch.bool), 0.1)


def test_dispatch_reasons_follow_the_capability_table():
    from fastattn import dispatch

    def reason(t):
        return dispatch.attention_reason("cuda", t, t, t, None, None)

    q = torch.randn(1, 2, 16, 64, device=DEVICE, dtype=torch.float16)
    assert reason(q) is None
    assert "float16, bfloat16" in reason(q.float())
    odd = torch.randn(1, 2, 16, 36, device=DEVICE, dtype=torch.float16)
    assert "multiples of 8" in reason(odd)
    wide = torch.randn(1, 2, 16, 256, device=DEVICE, dtype=torch.float16, requires_grad=True)
    assert "backward takes head dims up to 128" in reason(wide)
    with torch.no_grad():
        assert reason(wide) is None


# ------------------------------------------------------------------ ALiBi, softcap under a mask


def _alibi_slopes(B, Hq):
    """(B, Hq) float32 slopes, each batch its own: BLOOM's geometric slopes 2^(-8 (h + 1) / Hq)
    times b + 1, with every third head 0 (no bias there)."""
    heads = torch.arange(Hq, dtype=torch.float32)
    bloom = torch.exp2(-8.0 * (heads + 1) / Hq) * (heads % 3 != 2)
    return torch.stack([bloom * (b + 1) for b in range(B)]).to(DEVICE)


# (B, Hq, Hkv, Sq, Sk, D, window, mask kind, dtype, softcap, sinks, dropout_p); head dim 256: forward only
ALIBI_CASES = [
    (2, 4, 2, 113, 203, 64, UNBOUNDED, None, torch.float16, 0.0, False, 0.0),  # alone, GQA, both sides
    (1, 4, 4, 300, 300, 128, CAUSAL, None, torch.bfloat16, 0.0, False, 0.0),
    (2, 2, 1, 203, 113, 96, Window(30, 20), None, torch.float16, 0.0, False, 0.0),  # window, Sq > Sk
    (1, 3, 3, 150, 190, 128, CAUSAL_TOP_LEFT, "additive", torch.bfloat16, 0.0, False, 0.0),  # top-left diagonal
    (3, 2, 2, 77, 300, 64, UNBOUNDED, "padding_bool", torch.bfloat16, 20.0, False, 0.0),  # cap, mask, empty batch
    (1, 4, 2, 256, 256, 32, CAUSAL, None, torch.float16, 30.0, True, 0.0),  # cap, sinks
    (2, 4, 2, 130, 190, 64, CAUSAL, "bool", torch.float16, 0.0, True, 0.2),  # sinks, dropout
    (1, 2, 2, 100, 130, 128, UNBOUNDED, "additive", torch.float16, 0.0, False, 0.2),  # dropout, dmask
    (1, 2, 1, 200, 90, 256, Window(8, 0), None, torch.bfloat16, 0.0, False, 0.0),  # rows that see nothing
    (1, 2, 1, 120, 100, 256, CAUSAL, "additive", torch.float16, 15.0, False, 0.0),
]


@pytest.mark.parametrize("case", ALIBI_CASES, ids=lambda c: "-".join(map(str, c)))
def test_alibi_matches_reference(case):
    B, Hq, Hkv, Sq, Sk, D, window, kind, dtype, softcap, with_sinks, p = case
    torch.manual_seed(Sq * Sk + D + B)
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, False)
    mask = _mask(kind, B, Hq, Sq, Sk, dtype)
    sinks = torch.randn(Hq, device=DEVICE) if with_sinks else None
    state = _rng_state(777, 5) if p else None
    _check_options_against_reference(q, k, v, mask, D ** -0.5, window, softcap, p, state, sinks, _alibi_slopes(B, Hq))


def test_alibi_bias_is_the_documented_formula():
    """Zero scores and v = identity: out row i is softmax_j(-slope * |i + Sk - Sq - j|), exactly
    the bias's distribution, per batch and head."""
    B, H, Sq, Sk, D = 2, 3, 5, 16, 16
    q = torch.zeros(B, H, Sq, D, device=DEVICE, dtype=torch.float16)
    v = torch.eye(Sk, device=DEVICE, dtype=torch.float16).expand(B, H, Sk, D)
    slopes = _alibi_slopes(B, H)
    out = OPS.attn_fwd(q, v, v, None, 0.125, -1, -1, False, 0.0, 0.0, None, None, slopes)[0]
    distance = (torch.arange(Sq, device=DEVICE)[:, None] + Sk - Sq - torch.arange(Sk, device=DEVICE)).abs()
    expected = torch.softmax(-slopes[:, :, None, None] * distance, dim=-1)
    torch.testing.assert_close(out.float(), expected, rtol=2e-3, atol=1e-3)


# (B, Hq, Hkv, Sq, Sk, D, window, mask kind, dtype, softcap, dropout_p); head dim 256: forward only
SOFTCAP_MASK_CASES = [
    (3, 4, 2, 150, 260, 64, CAUSAL, "padding_bool", torch.float16, 20.0, 0.0),  # key padding, an empty batch
    (1, 3, 3, 200, 333, 128, UNBOUNDED, "additive", torch.bfloat16, 5.0, 0.0),  # -inf entries, dmask
    (2, 2, 1, 128, 128, 96, Window(40, 0), "bool", torch.float16, 10.0, 0.0),
    (2, 2, 2, 90, 77, 32, UNBOUNDED, "additive_f32_row", torch.bfloat16, 3.0, 0.0),
    (1, 2, 2, 100, 130, 64, CAUSAL_TOP_LEFT, "additive", torch.bfloat16, 10.0, 0.2),  # dropout
    (1, 2, 1, 120, 100, 256, CAUSAL, "padding_bool", torch.float16, 15.0, 0.0),
]


@pytest.mark.parametrize("case", SOFTCAP_MASK_CASES, ids=lambda c: "-".join(map(str, c)))
def test_softcap_under_a_mask_matches_reference(case):
    """The cap acts on the scaled scores before the mask; dmask is dS after the cap, dq and dk
    get dS times the cap's slope."""
    B, Hq, Hkv, Sq, Sk, D, window, kind, dtype, softcap, p = case
    torch.manual_seed(Sq * Sk + D + 1)
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, False)
    q = q * 4  # scores beyond the cap: the cap and its slope matter
    mask = _mask(kind, B, Hq, Sq, Sk, dtype)
    state = _rng_state(99, 3) if p else None
    _check_options_against_reference(q, k, v, mask, D ** -0.5, window, softcap, p, state)


def test_alibi_slopes_argument_errors():
    q = torch.randn(2, 4, 16, 64, device=DEVICE, dtype=torch.float16)
    good = torch.ones(2, 4, device=DEVICE)
    for bad in (torch.ones(4, device=DEVICE), torch.ones(2, 4, device=DEVICE, dtype=torch.float16),
                torch.ones(4, 2, device=DEVICE).t()):
        with pytest.raises(ValueError, match=r"alibi_slopes must be a contiguous float32 tensor of shape \[2, 4\]"):
            OPS.attn_fwd(q, q, q, None, 0.125, -1, -1, False, 0.0, 0.0, None, None, bad)
    with pytest.raises(ValueError, match="alibi_slopes must be a CUDA tensor"):
        OPS.attn_fwd(q, q, q, None, 0.125, -1, -1, False, 0.0, 0.0, None, None, good.cpu())
    out, _, stats = OPS.attn_fwd(q, q, q, None, 0.125, -1, -1, False, 0.0, 0.0, None, None, good)
    with pytest.raises(ValueError, match="alibi_slopes must be a contiguous float32"):
        OPS.attn_bwd(out, q, q, q, out, stats, None, 0.125, False, -1, -1, False, 0.0, 0.0, None, good[:1])


# ----------------------------------------------------------------------- packed sequences

# (lengths_q, lengths_k, Hq, Hkv, D, window, dtype, softcap, dropout_p, sinks, alibi); head dim 256: forward only
VARLEN_CASES = [
    ([37, 0, 130, 5, 64], [50, 3, 130, 0, 70], 4, 2, 64, UNBOUNDED, torch.float16, 0.0, 0.0, False, False),
    ([300, 1, 77], [300, 200, 90], 8, 2, 128, CAUSAL, torch.bfloat16, 0.0, 0.0, False, False),
    ([65, 129, 0], [200, 64, 0], 2, 1, 96, Window(30, 10), torch.float16, 5.0, 0.0, True, True),
    ([100, 0, 33], [120, 10, 33], 4, 4, 32, CAUSAL, torch.bfloat16, 0.0, 0.2, False, True),
    ([90, 150], [90, 150], 2, 2, 256, CAUSAL, torch.float16, 0.0, 0.0, True, False),
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_varlen_matches_reference(case):
    """Packed sequences (empty ones included, GQA) against reference.varlen_attention: each
    sequence is its own batch (window bottom-right within it, dropout's batch b, ALiBi's row b)."""
    lengths_q, lengths_k, Hq, Hkv, D, window, dtype, softcap, p, with_sinks, with_alibi = case
    torch.manual_seed(sum(lengths_q) + D)
    cu_q, cu_k = (torch.tensor([0] + n, device=DEVICE).cumsum(0).to(torch.int32) for n in (lengths_q, lengths_k))
    q = torch.randn(sum(lengths_q), Hq, D, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(sum(lengths_k), Hkv, D, device=DEVICE, dtype=dtype) for _ in range(2))
    max_q, max_k, scale = max(lengths_q), max(lengths_k), D ** -0.5
    sinks = torch.randn(Hq, device=DEVICE) if with_sinks else None
    slopes = _alibi_slopes(len(lengths_q), Hq) if with_alibi else None
    state = _rng_state(4242, 17) if p else None
    left, right = window.left, window.right

    def kernel_fwd():
        return OPS.varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, p, state, sinks, slopes)

    def kernel_bwd(grad_out, out, stats, mask_grad):
        return OPS.varlen_bwd(grad_out, q, k, v, out, stats, cu_q, cu_k, max_q, max_k, scale, left, right, softcap,
                              p, state, slopes)

    def reference_fn(q, k, v, mask):
        return reference.varlen_attention(q, k, v, cu_q, cu_k, scale, window, p, upcast=False, rng_state=state,
                                          softcap=softcap, sinks=sinks, alibi_slopes=slopes)

    _check_against_reference(kernel_fwd, kernel_bwd, reference_fn, q, k, v)


def test_varlen_argument_errors():
    q = torch.randn(10, 2, 64, device=DEVICE, dtype=torch.float16)
    cu = torch.tensor([0, 4, 10], device=DEVICE, dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q must be a contiguous int32"):
        OPS.varlen_fwd(q, q, q, cu.long(), cu, 6, 6, 0.125)
    with pytest.raises(ValueError, match="cu_seqlens_k must be a CUDA tensor"):
        OPS.varlen_fwd(q, q, q, cu, cu.cpu(), 6, 6, 0.125)
    with pytest.raises(ValueError, match="same length"):
        OPS.varlen_fwd(q, q, q, cu, cu[:2], 6, 6, 0.125)
    with pytest.raises(ValueError, match=r"q must be 3-d \(total, H, D\)"):
        OPS.varlen_fwd(q[None], q, q, cu, cu, 6, 6, 0.125)
    with pytest.raises(ValueError, match="alibi_slopes must be a contiguous float32 tensor of shape \\[2, 2\\]"):
        OPS.varlen_fwd(q, q, q, cu, cu, 6, 6, 0.125, -1, -1, 0.0, 0.0, None, None, torch.ones(2, device=DEVICE))


# ------------------------------------------------------------------------------- softmax

# (B, H, R, C, dtype, mask kind, causal, strided x)
SOFTMAX_CASES = [
    (2, 3, 5, 1, torch.float32, None, UNBOUNDED, False),
    (2, 3, 17, 17, torch.float16, "bool", CAUSAL_TOP_LEFT, False),
    (1, 4, 33, 128, torch.bfloat16, "additive", UNBOUNDED, True),
    (2, 2, 64, 1000, torch.float16, "padding_bool", CAUSAL, False),
    (1, 2, 40, 2048, torch.bfloat16, None, CAUSAL_TOP_LEFT, False),
    (1, 2, 9, 3001, torch.float32, "additive_f32_row", UNBOUNDED, False),
    (1, 1, 8, 8192, torch.float16, "bool", CAUSAL, False),
    (2, 2, 24, 777, torch.float32, "bool", CAUSAL_TOP_LEFT, True),
    (2, 3, 50, 300, torch.float16, "padding_bool", Window(20, 3), False),  # sliding windows
    (1, 2, 40, 3000, torch.bfloat16, None, Window(-1, 5, True), True),
]


@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=lambda c: "-".join(map(str, c)))
def test_softmax_matches_reference(case):
    B, H, R, C, dtype, kind, causal, strided = case
    torch.manual_seed(SOFTMAX_CASES.index(case))
    if strided:  # rows padded in storage: x is a view with a row stride > C
        x = torch.randn(B, H, R, C + 8, device=DEVICE, dtype=dtype)[..., :C]
    else:
        x = torch.randn(B, H, R, C, device=DEVICE, dtype=dtype)
    mask = _mask(kind, B, H, R, C, dtype)
    scale = 0.7
    _poison_allocator()
    y = OPS.softmax_fwd(x, mask, scale, *causal)
    ref64 = reference.softmax(x.double(), mask, scale, causal)
    # Low-precision baseline: the softmax of the dtype-rounded scores, in the dtype.
    base = reference.softmax(x, mask, scale, causal)
    assert y.dtype == dtype and y.shape == x.shape
    assert_within_baseline("y", y, ref64, base)
    if kind == "padding_bool":
        assert y[0].abs().max() == 0, "rows with nothing visible must be zeros"

    grad_y = torch.randn_like(y)
    _poison_allocator()
    dx = OPS.softmax_bwd(grad_y, y)
    y64 = y.double()
    ref_dx = y64 * (grad_y.double() - (grad_y.double() * y64).sum(-1, keepdim=True))
    base_dx = y * (grad_y - (grad_y * y).sum(-1, keepdim=True))
    assert_within_baseline("dx", dx, ref_dx, base_dx)


# ----------------------------------------------------------------------- KV-cache decoding

def _kvcache_case(lengths, Hq, Hkv, Sq, D, dtype, block_size, seed):
    """q (B, Hq, Sq, D), the rows' keys and values (B, Hkv, capacity, D) and a cache holding
    them: contiguous (block_size None) or pages of block_size in shuffled order within a pool
    that also holds pages no row owns. Every slot past a row's length is NaN, like the unowned
    pages: the kernel must stop at each row's end. Returns q, keys, values, k_cache, v_cache,
    block_table (None when contiguous)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    B, step = len(lengths), block_size or 1
    capacity = -(-(max(lengths) + 29) // step) * step  # room past the longest row
    q = torch.randn(B, Hq, Sq, D, generator=g, device=DEVICE).to(dtype)
    keys, values = (torch.randn(B, Hkv, capacity, D, generator=g, device=DEVICE).to(dtype) for _ in range(2))
    stored = []
    for rows in (keys, values):
        rows = rows.clone()
        for b, length in enumerate(lengths):
            rows[b, :, length:] = float("nan")
        stored.append(rows)
    if block_size is None:
        return q, keys, values, *stored, None
    per_row, unowned = capacity // block_size, 3
    table = torch.randperm(B * per_row + unowned, generator=g, device=DEVICE)[: B * per_row].view(B, per_row)
    pools = []
    for rows in stored:
        pool = torch.full((B * per_row + unowned, Hkv, block_size, D), float("nan"), device=DEVICE, dtype=dtype)
        pool[table.flatten()] = rows.view(B, Hkv, per_row, block_size, D).transpose(1, 2).flatten(0, 1)
        pools.append(pool)
    return q, keys, values, *pools, table.to(torch.int32)


def _kvcache_reference(q, keys, values, lengths, window, softcap, sinks, slopes, dtype, upcast):
    """Row by row: q[b] against the first lengths[b] keys, the window bottom-right within the row."""
    outs, lses = [], []
    for b, length in enumerate(lengths):
        out, lse = reference.attention(
            q[b : b + 1].to(dtype), keys[b : b + 1, :, :length].to(dtype), values[b : b + 1, :, :length].to(dtype),
            None, q.shape[-1] ** -0.5, window, upcast=upcast, softcap=softcap, sinks=sinks,
            alibi_slopes=None if slopes is None else slopes[b : b + 1],
        )
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _run_kvcache(q, k_cache, v_cache, lengths, table, window, softcap, sinks, slopes):
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    return OPS.attn_fwd_kvcache(q, k_cache, v_cache, seqlens, table, q.shape[-1] ** -0.5, *window[:2], softcap, sinks,
                                slopes)


# (lengths, Hq, Hkv, Sq, D, dtype, block size, window, softcap, sinks, alibi). The kernel's key
# tiles are 64 keys (32 at head dim 256) and its chunks 256: pages of 8 and 16 split tiles, 256
# hold several; lengths cross tiles, chunks and pages, and 0 is a row that sees nothing.
KVCACHE_CASES = [
    ([0, 1, 300, 1000], 8, 2, 1, 128, torch.float16, None, CAUSAL, 0.0, False, False),  # decode, GQA 4
    ([17, 0, 700], 8, 2, 1, 128, torch.bfloat16, 16, CAUSAL, 0.0, True, False),  # sinks: the empty row's lse
    ([300, 513], 4, 4, 5, 64, torch.float16, 256, UNBOUNDED, 0.0, False, False),  # MHA, not causal
    ([250, 90, 3], 8, 1, 3, 96, torch.bfloat16, 8, Window(40, 0), 20.0, True, True),  # MQA: 24 rows, 2 CTAs
    ([1200], 16, 2, 7, 256, torch.float16, 32, CAUSAL, 30.0, True, False),  # head dim 256
    ([33, 64], 4, 2, 2, 40, torch.bfloat16, None, Window(5, 3), 0.0, False, True),  # head dim 40, future keys
    ([200, 57], 4, 2, 37, 64, torch.float16, 16, CAUSAL, 0.0, False, True),  # chunked prefill: 37 new queries
    ([4096, 1, 2500], 32, 8, 1, 128, torch.bfloat16, 64, CAUSAL, 0.0, False, False),  # long rows
    ([5000], 4, 1, 1, 32, torch.float16, None, Window(700, 0), 0.0, True, False),  # one row: split-KV
]


@pytest.mark.parametrize("case", KVCACHE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_kvcache_matches_reference(case):
    lengths, Hq, Hkv, Sq, D, dtype, block_size, window, softcap, with_sinks, with_alibi = case
    seed = KVCACHE_CASES.index(case)
    q, keys, values, k_cache, v_cache, table = _kvcache_case(lengths, Hq, Hkv, Sq, D, dtype, block_size, seed)
    torch.manual_seed(seed)
    sinks = torch.randn(Hq, device=DEVICE) if with_sinks else None
    slopes = _alibi_slopes(len(lengths), Hq) if with_alibi else None
    _poison_allocator()
    out, lse = _run_kvcache(q, k_cache, v_cache, lengths, table, window, softcap, sinks, slopes)
    ref_out, ref_lse = _kvcache_reference(q, keys, values, lengths, window, softcap, sinks, slopes, torch.float64, True)
    base_out, base_lse = _kvcache_reference(q, keys, values, lengths, window, softcap, sinks, slopes, dtype, False)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_within_baseline("out", out, ref_out, base_out)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "lse: -inf rows differ from the reference"
    assert not torch.isnan(lse).any()
    assert_within_baseline("lse", lse[~empty], ref_lse[~empty].float(), base_lse[~empty])
    if 0 in lengths:  # the empty row: zeros, lse -inf or the head's sink
        row = lengths.index(0)
        assert out[row].abs().max() == 0
        expected = sinks.view(Hq, 1).expand(Hq, Sq) if sinks is not None else torch.full((Hq, Sq), float("-inf"))
        torch.testing.assert_close(lse[row].cpu(), expected.cpu())


@pytest.mark.parametrize("dtype, block_size", [(torch.float16, None), (torch.bfloat16, 16)])
def test_kvcache_split_kv_changes_no_bit(dtype, block_size):
    """The split count follows from how many CTAs fill the device (kvcache_splits in
    csrc/cuda/decode.cu): one cache row alone is split across the SMs, the same row among
    enough others (B * Hkv CTAs >= SMs) is not. The kernel computes every 256-key chunk alike
    and folds the chunks in order, itself or in the combine kernel, so both give the row's out
    and lse bit for bit, and a repeated call the same bits. Testing through two batch shapes
    needs no way to force the split count into the op."""
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    Hq, Hkv, Sq, D, length = 8, 2, 2, 128, 3000
    q, keys, values, k_cache, v_cache, table = _kvcache_case([length], Hq, Hkv, Sq, D, dtype, block_size, 7)
    torch.manual_seed(7)
    sinks, slopes = torch.randn(Hq, device=DEVICE), _alibi_slopes(1, Hq)
    options = (Window(900, 0), 25.0, sinks)
    alone = _run_kvcache(q, k_cache, v_cache, [length], table, *options, slopes)
    again = _run_kvcache(q, k_cache, v_cache, [length], table, *options, slopes)
    B = -(-sms // Hkv)  # B * Hkv CTAs fill the device: no split
    batched = _run_kvcache(
        q.expand(B, -1, -1, -1), k_cache if table is not None else k_cache.expand(B, -1, -1, -1),
        v_cache if table is not None else v_cache.expand(B, -1, -1, -1), [length] * B,
        None if table is None else table.expand(B, -1).contiguous(), *options, slopes.expand(B, -1).contiguous(),
    )
    for split, whole, repeat in zip(alone, batched, again):
        assert torch.equal(split[0], whole[0]) and torch.equal(split, repeat)
        assert torch.equal(whole[B - 1], whole[0])
    ref_out, _ = _kvcache_reference(q, keys, values, [length], options[0], 25.0, sinks, slopes, torch.float64, True)
    base_out, _ = _kvcache_reference(q, keys, values, [length], options[0], 25.0, sinks, slopes, dtype, False)
    assert_within_baseline("out", alone[0], ref_out, base_out)


def test_kvcache_argument_errors():
    q, _, _, k_cache, v_cache, table = _kvcache_case([10, 20], 4, 2, 1, 64, torch.float16, 16, 0)
    seqlens = torch.tensor([10, 20], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="cache_seqlens must be a contiguous int32 tensor of shape"):
        OPS.attn_fwd_kvcache(q, k_cache, v_cache, seqlens.long(), table, 0.125)
    with pytest.raises(ValueError, match="block_table must be a contiguous int32 tensor of shape"):
        OPS.attn_fwd_kvcache(q, k_cache, v_cache, seqlens, table.long(), 0.125)
    with pytest.raises(TypeError, match="k_cache has dtype"):
        OPS.attn_fwd_kvcache(q, k_cache.bfloat16(), v_cache, seqlens, table, 0.125)
    with pytest.raises(ValueError, match="v_cache must have k_cache's shape"):
        OPS.attn_fwd_kvcache(q, k_cache, v_cache[:, :, :8], seqlens, table, 0.125)
    with pytest.raises(ValueError, match="a contiguous k_cache must have q's batch size"):
        OPS.attn_fwd_kvcache(q, k_cache, v_cache, seqlens, None, 0.125)
    with pytest.raises(ValueError, match="cache_seqlens must be a CUDA tensor"):
        OPS.attn_fwd_kvcache(q, k_cache, v_cache, seqlens.cpu(), table, 0.125)


def test_kvcache_opcheck():
    torch.manual_seed(9)
    q = torch.randn(2, 4, 2, 64, device=DEVICE, dtype=torch.float16)
    k_pages, v_pages = (torch.randn(40, 2, 16, 64, device=DEVICE, dtype=torch.float16) for _ in range(2))
    table = torch.randperm(40, device=DEVICE).view(2, 20).to(torch.int32)
    seqlens = torch.tensor([10, 300], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(OPS.attn_fwd_kvcache.default,
                          (q, k_pages, v_pages, seqlens, table, 0.125, -1, 0, 0.0, torch.randn(4, device=DEVICE), None))
