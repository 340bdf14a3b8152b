"""Numerical edge cases every attention backend must share with PyTorch: NaN and +inf
propagate as torch propagates them, finite masks stay finite (finfo.min padding), large
logits keep the backward as accurate as PyTorch's, and nearly one-hot rows keep low-precision
forwards within the tolerance rule. CPU kernels are tested in every instruction-set variant
this CPU runs, Triton kernels under the interpreter (small shapes)."""
import math

import pytest
import torch

from fastattn import ops, reference
from tolerance import assert_within_baseline, max_error

ISAS = []
if ops.NATIVE_OPS is not None:  # test_cpu_kernels needs the compiled extension
    from test_cpu_kernels import ISAS, grads_from_given_out  # noqa: F811 (the variants this CPU runs)

BACKENDS = [f"cpu-{isa}" for isa in ISAS]
if ops.TRITON_OPS is not None and not torch.cuda.is_available():
    BACKENDS.append("triton")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.fixture(params=BACKENDS)
def family(request, monkeypatch):
    """The op family (with autograd) of one backend; CPU variants are forced by
    FASTATTN_CPU_ISA."""
    if request.param == "triton":
        return ops.TRITON_OPS
    monkeypatch.setenv("FASTATTN_CPU_ISA", request.param.split("-")[1])
    return ops.NATIVE_OPS


def is_triton(family):
    return family is ops.TRITON_OPS


def attention(family, q, k, v, mask, scale, causal=reference.UNBOUNDED):
    """(out, lse) of a backend's attention op."""
    return family.attn_fwd(q, k, v, mask, scale, *causal)[:2]


def run_with_grads(fn, inputs, grad_out, grad_lse):
    """out, lse and the gradients of sum(out * grad_out) (+ sum(lse * grad_lse)) w.r.t. inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out, lse = fn(*leaves)
    loss = (out.to(grad_out.dtype) * grad_out).sum()
    if grad_lse is not None:
        loss = loss + (lse.to(grad_lse.dtype) * grad_lse).sum()
    loss.backward()
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]


# ----------------------------------------------------------------------------- NaN and +inf
# Rules: a NaN or +inf that torch propagates, propagates; a row that sees no key stays zeros.
# (Sq, Sk): query-lane kernel, few-query kernel, and both with keys split over the threads.
NAN_SHAPES = [(70, 150), (5, 150), (40, 600), (3, 1200)]
POISONS = ["nan_q", "nan_k", "nan_v", "inf_k", "inf_mask", "nan_mask", "inf_scale"]


def poisoned_inputs(poison, Sq, Sk, D=40):
    gen = torch.Generator().manual_seed(Sq * 7 + Sk)
    q, k, v = (torch.randn(1, 1, s, D, generator=gen) for s in (Sq, Sk, Sk))
    mask = torch.randn(1, 1, Sq, Sk, generator=gen)
    scale = D ** -0.5
    if poison == "nan_q":
        q[0, 0, Sq // 2, 3] = math.nan
    elif poison == "nan_k":
        k[0, 0, Sk - 7, 1] = math.nan
    elif poison == "nan_v":
        v[0, 0, Sk // 3, 0] = math.nan
    elif poison == "inf_k":
        k[0, 0, 2] = math.inf
    elif poison == "inf_mask":
        mask[0, 0, Sq - 1, Sk // 2] = math.inf
    elif poison == "nan_mask":  # a key only this NaN entry shows: the row is NaN, not skipped
        mask[0, 0, 0] = -math.inf
        mask[0, 0, 0, Sk - 1] = math.nan
    else:
        scale = math.inf
    return q, k, v, mask, scale


@pytest.mark.parametrize("shape", NAN_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("poison", POISONS)
def test_nan_and_inf_propagate_like_torch(family, poison, shape):
    if is_triton(family) and shape[1] > 200:
        pytest.skip("the Triton kernels have no key split; long rows are slow interpreted")
    q, k, v, mask, scale = poisoned_inputs(poison, *shape)
    out, lse = attention(family, q, k, v, mask, scale)
    base_out, base_lse = reference.attention(q, k, v, mask, scale, upcast=False)
    assert base_out.isnan().any(), "the case must poison torch's result"
    assert torch.equal(out.isnan(), base_out.isnan()), "NaN pattern of out differs from torch"
    assert torch.equal(lse.isnan(), base_lse.isnan()), "NaN pattern of lse differs from torch"


@pytest.mark.parametrize("poison", ["nan_k", "nan_v", "inf_mask"])
def test_nan_and_inf_propagate_to_gradients(family, poison):
    q, k, v, mask, scale = poisoned_inputs(poison, 70, 90)
    grad_out = torch.randn(1, 1, 70, 40, generator=torch.Generator().manual_seed(1))
    got = run_with_grads(lambda q, k, v: attention(family, q, k, v, mask, scale), (q, k, v), grad_out, None)
    base = run_with_grads(lambda q, k, v: reference.attention(q, k, v, mask, scale, upcast=False), (q, k, v),
                          grad_out, None)
    for name, g, b in zip(("dq", "dk", "dv"), got[2:], base[2:]):
        assert torch.equal(g.isnan().any(-1), b.isnan().any(-1)), f"{name}: rows with NaN differ from torch"


def test_rows_without_keys_stay_zero_beside_nan(family):
    """Hiding every key of a row is a masking decision: NaN elsewhere does not reach it."""
    q, k, v, _, scale = poisoned_inputs("nan_k", 70, 90)
    keep = torch.ones(1, 1, 70, 90, dtype=torch.bool)
    keep[0, 0, :10] = False
    out, lse = attention(family, q, k, v, keep, scale)
    assert out[0, 0, :10].abs().max() == 0 and torch.isneginf(lse[0, 0, :10]).all()
    assert out[0, 0, 10:].isnan().any(-1).all()


@pytest.mark.parametrize("cols", [40, 3000])
def test_softmax_nan_propagates(family, cols):
    x = torch.randn(1, 1, 5, cols, generator=torch.Generator().manual_seed(cols))
    keep = torch.ones(1, 1, 5, cols, dtype=torch.bool)
    x[0, 0, 0] = math.nan  # all NaN
    x[0, 0, 1, 5] = math.nan  # one NaN
    keep[0, 0, 2, 1:] = False  # one visible NaN among hidden entries
    x[0, 0, 2, 0] = math.nan
    keep[0, 0, 3] = False  # nothing visible: zeros, NaN or not
    x[0, 0, 3, 7] = math.nan
    keep[0, 0, 4, 9] = False  # a hidden NaN is hidden
    x[0, 0, 4, 9] = math.nan
    y = family.softmax_fwd(x, keep, 1.0)
    expected = reference.softmax(x, keep)
    assert torch.equal(y.isnan(), expected.isnan())
    assert expected[0, 0, :3].isnan().all() and y[0, 0, 3].abs().max() == 0
    assert torch.allclose(y[0, 0, 4], expected[0, 0, 4])


# ----------------------------------------------------------------------------- finfo.min masks
# transformers pads with torch.finfo(dtype).min: a row filled with it sees every key with
# equal, finite, very negative scores, so torch returns the mean of v. Only -inf hides a key.
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("shape", [(70, 150), (5, 150), (3, 1200)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.interpreted_triton_keeps(shape=[(5, 150)])
def test_finfo_min_mask_is_finite(family, dtype, shape):
    Sq, Sk = shape
    if is_triton(family) and Sk > 200:
        pytest.skip("slow interpreted")
    gen = torch.Generator().manual_seed(Sk)
    q, k, v = (torch.randn(1, 2, s, 32, generator=gen).to(dtype) for s in (Sq, Sk, Sk))
    lowest = torch.finfo(dtype).min
    mask = torch.zeros(1, 2, Sq, Sk, dtype=dtype)
    mask[:, :, 1::2, Sk // 2:] = lowest  # padded keys of some rows
    mask[:, 0, ::3] = lowest  # rows that see only padding
    grad_out = torch.randn(1, 2, Sq, 32, generator=gen, dtype=torch.float64)
    got = run_with_grads(lambda q, k, v: attention(family, q, k, v, mask, 0.2), (q, k, v), grad_out.to(dtype), None)
    ref = run_with_grads(lambda q, k, v: reference.attention(q, k, v, mask.double(), 0.2),
                         [t.double() for t in (q, k, v)], grad_out, None)
    base = run_with_grads(lambda q, k, v: reference.attention(q, k, v, mask, 0.2, upcast=False), (q, k, v),
                          grad_out.to(dtype), None)
    for name, g, r, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref, base):
        assert_within_baseline(name, g, r, b)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_softmax_finfo_min_is_finite(family, dtype):
    lowest = torch.finfo(dtype).min
    x = torch.randn(1, 2, 6, 50, generator=torch.Generator().manual_seed(2)).to(dtype)
    mask = torch.zeros(1, 2, 6, 50, dtype=dtype)
    mask[:, :, :3] = lowest
    x[:, :, 4] = lowest  # scores themselves at the padding value
    y = family.softmax_fwd(x, mask, 1.0)
    ref = reference.softmax(x.double(), mask.double())
    base = reference.softmax(x, mask, upcast=False)
    assert_within_baseline("y", y, ref, base)


# ----------------------------------------------------------------------------- large logits
# T5-style scale=1.0 with head dim 128: logits of 1e2..1e3. q and k hold bf16-representable
# values so that PyTorch's fp32 scores are nearly exact and any precision the kernels lose
# (for instance recomputing P from a rounded lse) shows against the baseline.
@pytest.mark.parametrize("logit_scale", [1.0, 16.0, 64.0])
@pytest.mark.parametrize("lse_in_loss", [False, True])
def test_large_logits_fp32(family, logit_scale, lse_in_loss):
    if ops.NATIVE_OPS is None:
        pytest.skip("the exact-gradient baseline lives in test_cpu_kernels, which needs fastattn._C")
    Sq, Sk, D = (24, 40, 128) if is_triton(family) else (70, 150, 128)
    gen = torch.Generator().manual_seed(int(logit_scale) * 2 + lse_in_loss)
    q, k = ((torch.randn(1, 2, s, D, generator=gen) * logit_scale ** 0.5).bfloat16().float() for s in (Sq, Sk))
    v = torch.randn(1, 2, Sk, D, generator=gen)
    assert_grads_within_baseline(family, q, k, v, 1.0, lse_in_loss, gen, min_logit=30 * logit_scale)


def assert_grads_within_baseline(family, q, k, v, scale, lse_in_loss, gen, min_logit):
    """The backend's out, lse and gradients (loss: random weights on out, and on lse when
    lse_in_loss) against float64 under the tolerance rule, for fp32 q, k, v whose largest |lse|
    must exceed min_logit."""
    B, H, Sq, D = q.shape
    grad_out = torch.randn(B, H, Sq, v.shape[-1], generator=gen, dtype=torch.float64)
    grad_lse = torch.randn(B, H, Sq, generator=gen, dtype=torch.float64) if lse_in_loss else None

    def fp32(t):
        return None if t is None else t.float()

    got = run_with_grads(lambda q, k, v: attention(family, q, k, v, None, scale), (q, k, v), fp32(grad_out),
                         fp32(grad_lse))
    ref = run_with_grads(lambda q, k, v: reference.attention(q, k, v, None, scale), [t.double() for t in (q, k, v)],
                         grad_out, grad_lse)
    base = run_with_grads(lambda q, k, v: reference.attention(q, k, v, None, scale, upcast=False), (q, k, v),
                          fp32(grad_out), fp32(grad_lse))
    assert ref[1].abs().max() > min_logit, "the case must have large logits"
    # A fused backward sees only its own rounded output (delta = rowsum(dO * out)); on nearly
    # one-hot rows dP - delta cancels, so the gradients' baseline is the worse of PyTorch's and
    # the exact gradients given that output (plus the exact lse term).
    given = grads_from_given_out(q, k, v, None, scale, reference.UNBOUNDED, grad_out, got[0])[:3]
    if grad_lse is not None:
        lse_term = run_with_grads(lambda q, k, v: reference.attention(q, k, v, None, scale),
                                  [t.double() for t in (q, k, v)], torch.zeros_like(grad_out), grad_lse)[2:]
        given = [g + t.float() for g, t in zip(given, lse_term)]
    assert_within_baseline("out", got[0], ref[0], base[0])
    assert_within_baseline("lse", got[1], ref[1], base[1])
    for name, g, r, b, exact in zip(("dq", "dk", "dv"), got[2:], ref[2:], base[2:], given):
        worse = b if max_error(b, r) >= max_error(exact, r) else exact
        assert_within_baseline(name, g, r, worse)


# ----------------------------------------------------------------------------- rising row max
# Scores that climb key block by key block, by less than and by more than the margin within
# which the CPU forward keeps a row's reference max (8 ln 2), and that fall: every way the
# running max of an online softmax can move between key tiles (a negative step: falling).
@pytest.mark.parametrize("step", [2.0, 48.0, -48.0])
def test_row_max_moving_between_key_tiles(family, step):
    if ops.NATIVE_OPS is None:
        pytest.skip("the exact-gradient baseline lives in test_cpu_kernels, which needs fastattn._C")
    Sq, Sk, D, block = (16, 96, 16, 16) if is_triton(family) else (64, 384, 32, 64)
    gen = torch.Generator().manual_seed(int(step) + 100)
    q, k = (torch.randn(1, 2, s, D, generator=gen) * 0.5 for s in (Sq, Sk))
    q[..., 0] = 1.0
    blocks = torch.arange(Sk) // block
    climbed = blocks if step > 0 else blocks.max() - blocks  # how many steps up each key's score is
    k[..., 0] = abs(step) * climbed.float()
    v = torch.randn(1, 2, Sk, D, generator=gen)
    assert_grads_within_baseline(family, q, k, v, 1.0, True, gen, min_logit=abs(step) * (Sk // block - 1) - 2)


# ----------------------------------------------------------------------------- nearly one-hot rows
# Scores exact in bf16 (small integer q and k) and one key per row lifted far above the rest:
# PyTorch's bf16 result is then nearly exact (the output rounds to the hot value of v), so any
# bias in how a kernel rounds P or the output to bf16 shows.
@pytest.mark.parametrize("seed", [4, 5])
@pytest.mark.parametrize("lift", [16.0, 24.0])
def test_bf16_nearly_one_hot_rows(family, seed, lift):
    gen = torch.Generator().manual_seed(seed)
    Sq, Sk, D = 16, 48, 64
    q, k = (torch.randint(-1, 2, (1, 2, s, D), generator=gen).to(BF16) for s in (Sq, Sk))
    hot = torch.randint(0, Sk, (Sq,), generator=gen)
    mask = torch.zeros(1, 2, Sq, Sk, dtype=BF16)
    mask[:, :, torch.arange(Sq), hot] = lift
    v = torch.randn(1, 2, Sk, D, generator=gen).to(BF16)
    out, _ = attention(family, q, k, v, mask, 0.25)
    ref, _ = reference.attention(q.double(), k.double(), v.double(), mask.double(), 0.25)
    base, _ = reference.attention(q, k, v, mask, 0.25, upcast=False)
    assert_within_baseline("out", out, ref, base)
