"""torch.library.opcheck on the compiled ops, torch.compile(fullgraph=True) on the public
functions, and gradcheck of the fused backward in float64."""
import pytest
import torch

import fastattn
from fastattn import ops, reference

needs_cpu_kernels = pytest.mark.skipif(
    not fastattn.backends()["cpu"]["usable"], reason="fastattn._C (CPU kernels) is not built"
)


def _attention_samples(dtype=torch.float32):
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 9, 13, 32
    q = torch.randn(B, Hq, Sq, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, Sk, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Sk, D, dtype=dtype, requires_grad=True)
    padding = (torch.rand(B, 1, 1, Sk) > 0.3).expand(B, Hq, Sq, Sk)
    bias = torch.randn(1, Hq, Sq, Sk, dtype=dtype, requires_grad=True)
    yield (q, k, v, None, 0.2, *reference.UNBOUNDED, 0.0)
    yield (q, k, v, padding, 0.2, *reference.CAUSAL, 0.0)
    yield (q, k, v, bias.expand(B, Hq, Sq, Sk), 0.2, *reference.CAUSAL_TOP_LEFT, 0.0)
    yield (q, k, v, bias.expand(B, Hq, Sq, Sk), 0.2, 3, 1, False, 1.5)  # window and softcap


@needs_cpu_kernels
def test_opcheck_attention_ops():
    for args in _attention_samples():
        torch.library.opcheck(ops.NATIVE_OPS.attn_fwd, args)
        q, k, v, mask, scale, *rule = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        out, lse, stats = ops.NATIVE_OPS.attn_fwd(q, k, v, mask, scale, *rule)
        mask_grad = mask is not None and mask.is_floating_point()
        torch.library.opcheck(
            ops.NATIVE_OPS.attn_bwd, (torch.randn_like(out), q, k, v, out, stats, mask, scale, mask_grad, *rule)
        )


@needs_cpu_kernels
def test_opcheck_softmax_ops():
    x = torch.randn(2, 3, 5, 70, requires_grad=True)
    mask = (torch.rand(2, 1, 1, 70) > 0.5).expand(x.shape)
    for args in ((x, None, 0.5), (x, mask, 1.0, *reference.CAUSAL), (x, mask, 1.0, 4, 2, True)):
        torch.library.opcheck(ops.NATIVE_OPS.softmax_fwd, args)
    y = ops.NATIVE_OPS.softmax_fwd(x.detach(), mask, 1.0, *reference.CAUSAL)
    torch.library.opcheck(ops.NATIVE_OPS.softmax_bwd, (torch.randn_like(y), y))


@needs_cpu_kernels
def test_opcheck_kvcache_and_dropout_ops():
    q = torch.randn(2, 4, 3, 16)
    pages = torch.randn(6, 2, 8, 16), torch.randn(6, 2, 8, 16)
    table = torch.tensor([[4, 0, 2], [1, 5, 3]], dtype=torch.int32)
    lengths = torch.tensor([5, 24], dtype=torch.int32)
    torch.library.opcheck(torch.ops.fastattn.attn_fwd_kvcache.default, (q, *pages, lengths, table, 0.25, -1, 0))
    contiguous = torch.randn(2, 2, 24, 16), torch.randn(2, 2, 24, 16)
    torch.library.opcheck(torch.ops.fastattn.attn_fwd_kvcache.default, (q, *contiguous, lengths, None, 0.25, 5, -1, 1.5))
    torch.library.opcheck(torch.ops.fastattn.dropout_keep_mask.default, (torch.tensor([3, 4]), 2, 3, 5, 9, 0.2))


def _model_step(q, k, v, padding, bias):
    out = fastattn.attention(q, k, v, attn_mask=padding, causal=True)
    out = out + fastattn.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    probs = fastattn.softmax(q @ q.transpose(-1, -2), mask=padding[..., :1, : q.shape[2]], scale=0.1)
    return (out.sum() + probs.sum()) * 1.0


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if fastattn.backends()[b]["usable"]])
def test_compile_fullgraph_forward_and_backward(backend):
    torch._dynamo.reset()
    q = torch.randn(2, 4, 11, 32, requires_grad=True)
    k = torch.randn(2, 2, 11, 32, requires_grad=True)
    v = torch.randn(2, 2, 11, 32, requires_grad=True)
    padding = torch.rand(2, 1, 1, 11) > 0.2
    bias = torch.randn(1, 4, 11, 11, requires_grad=True)
    inputs = (q, k, v, bias)
    with fastattn.use_backend(backend):
        compiled = torch.compile(_model_step, fullgraph=True)
        got = compiled(q, k, v, padding, bias)
        got_grads = torch.autograd.grad(got, inputs)
        expected = _model_step(q, k, v, padding, bias)
        expected_grads = torch.autograd.grad(expected, inputs)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


FUSED_CPU_BACKENDS = [b for b in ("cpu", "triton") if fastattn.backends()[b]["usable"]]
# Without a GPU the Triton kernels run interpreted, and the full Jacobian (one evaluation per
# input element) takes minutes: the default run checks a random projection of it (fast_mode),
# which any wrong backward formula fails just the same, and the slow run the full Jacobian.
FUSED_GRADCHECKS = [
    pytest.param(backend, fast_mode, id=f"{backend}{'-fast' if fast_mode else ''}",
                 marks=[pytest.mark.slow] if backend == "triton" and not fast_mode else [])
    for backend in FUSED_CPU_BACKENDS
    for fast_mode in ((False, True) if backend == "triton" else (False,))
]


def _gradcheck_attention_and_softmax(backend, dtype, eps, tol, fast_mode=False):
    torch.manual_seed(0)
    q = torch.randn(1, 2, 5, 8, dtype=dtype, requires_grad=True)
    k = torch.randn(1, 1, 7, 8, dtype=dtype, requires_grad=True)
    v = torch.randn(1, 1, 7, 8, dtype=dtype, requires_grad=True)
    bias = torch.randn(1, 2, 1, 7, dtype=dtype, requires_grad=True)
    padding = torch.tensor([True] * 5 + [False] * 2)

    def attention(q, k, v, bias):  # output and lse, GQA, additive mask gradient, both causal rules
        out, lse = fastattn.attention(q, k, v, attn_mask=bias, causal=True, return_lse=True, backend=backend)
        with fastattn.use_backend(backend):
            sdpa = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=padding, is_causal=True, enable_gqa=True)
        return out, lse, sdpa

    def softmax(x, bias):
        return fastattn.softmax(x, mask=bias, scale=0.7, causal=True, backend=backend)

    check = dict(eps=eps, atol=tol, rtol=tol, fast_mode=fast_mode)
    assert torch.autograd.gradcheck(attention, (q, k, v, bias), **check)
    x = torch.randn(1, 2, 5, 7, dtype=dtype, requires_grad=True)
    assert torch.autograd.gradcheck(softmax, (x, bias), **check)


def test_gradcheck_reference_float64():
    _gradcheck_attention_and_softmax("reference", torch.float64, eps=1e-6, tol=1e-6)


@pytest.mark.parametrize("backend, fast_mode", FUSED_GRADCHECKS)
@pytest.mark.filterwarnings("ignore:Input #")
def test_gradcheck_fused_backward_float32(backend, fast_mode):
    # The fused kernels compute in float32 (no float64 path), so finite differences use a
    # large step: float32 rounding then contributes ~1e-5 and the O(eps^2) truncation ~1e-4,
    # well below the tolerance, while any error in the backward formulas shows as O(1).
    _gradcheck_attention_and_softmax(backend, torch.float32, eps=1e-2, tol=2e-3, fast_mode=fast_mode)
