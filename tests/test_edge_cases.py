"""Edge cases of the public API: empty tensors, double backward, torch.func, thread- and
task-local backend forcing, softmax's dim, low-precision mask gradients."""
import asyncio
import threading

import pytest
import torch

import fastattn
from fastattn import dispatch, reference

from tolerance import assert_within_baseline

CPU_BACKENDS = ["cpu", "reference"]


def _inputs(shapes, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_() for shape in shapes]


# ----------------------------------------------------------------------------- empty tensors

EMPTY_SHAPES = {
    # name: (q, k, v) shapes
    "no keys": ((2, 2, 3, 4), (2, 2, 0, 4), (2, 2, 0, 4)),
    "no queries": ((2, 2, 0, 4), (2, 2, 5, 4), (2, 2, 5, 4)),
    "no batch": ((0, 2, 3, 4), (0, 2, 5, 4), (0, 2, 5, 4)),
    "no heads": ((2, 0, 3, 4), (2, 0, 5, 4), (2, 0, 5, 4)),
    "empty head dim": ((2, 2, 3, 0), (2, 2, 5, 0), (2, 2, 5, 4)),
    "empty value dim": ((2, 2, 3, 4), (2, 2, 5, 4), (2, 2, 5, 0)),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", sorted(EMPTY_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_inputs_match_torch(case, backend, dtype):
    if backend == "cpu" and dtype == torch.float64:
        pytest.skip("float64 runs on the reference backend")
    q, k, v = _inputs(EMPTY_SHAPES[case], dtype)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v), allow_unused=True, materialize_grads=True)
    with fastattn.use_backend(backend):
        out, lse = fastattn.attention(q, k, v, return_lse=True)
    assert out.shape == expected.shape and lse.shape == q.shape[:3]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, k, v), expected)
    if k.shape[2] == 0:
        assert torch.isneginf(lse).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True, materialize_grads=True)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_empty_inputs_with_non_unit_last_stride():
    # An empty tensor's strides are arbitrary: one whose last stride is not 1 is still valid.
    q, k, v = (torch.empty_strided((2, 2, 0, 4), (0, 0, 8, 2)) for _ in range(3))
    out = fastattn.attention(q, k, v, backend="cpu")
    assert out.shape == (2, 2, 0, 4)


def test_softmax_of_empty_inputs():
    x = torch.randn(2, 0, 3, 4, 5)
    assert fastattn.softmax(x).shape == x.shape
    rows = torch.randn(3, 0, dtype=torch.float64)
    assert fastattn.softmax(rows).shape == (3, 0)


def test_dropout_one_gives_zeros_like_torch():
    q, k, v = _inputs([(1, 2, 5, 8)] * 3)
    out = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert out.shape == q.shape and not out.abs().sum()


def test_zero_key_heads_need_zero_query_heads():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 0, 3, 4), torch.randn(1, 0, 3, 4)
    with pytest.raises(ValueError, match=r"query heads \(2\) must be a multiple of key/value heads \(0\)"):
        fastattn.attention(q, k, v)


# ----------------------------------------------------------------------------- softmax dim


@pytest.mark.parametrize("dim", [2, -3, 5])
def test_softmax_dim_out_of_range_raises_like_torch(dim):
    x = torch.randn(2, 3)
    with pytest.raises(IndexError, match="dim must be in"):
        fastattn.softmax(x, dim=dim)
    with pytest.raises(IndexError):
        torch.softmax(x, dim=dim)


# ----------------------------------------------------------------------------- higher-order autograd


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("with_lse", [False, True])
def test_double_backward_matches_the_reference(backend, with_lse):
    q, k, v = _inputs([(1, 2, 5, 8), (1, 1, 7, 8), (1, 1, 7, 8)], torch.float64)
    mask = torch.randn(1, 1, 5, 7, dtype=torch.float64, requires_grad=True)

    def second_order(backend, dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, mask)]
        out, lse = fastattn.attention(*inputs[:3], attn_mask=inputs[3], causal=True, return_lse=True, backend=backend)
        loss = out.pow(2).sum() + (lse.pow(2).sum() if with_lse else 0)
        first = torch.autograd.grad(loss, inputs, create_graph=True)
        return torch.autograd.grad(sum(g.pow(2).sum() for g in first), inputs)

    expected = second_order("reference", torch.float64)
    for name, got, ref in zip("qkvm", second_order(backend, torch.float32), expected):
        assert got.abs().sum() > 0, f"d2 loss / d{name}2 is zero"
        # Second derivatives of values ~50 through two float32 passes: a relative bound.
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4, msg=f"d2 loss / d{name}2")


def test_softmax_double_backward():
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 9) > 0.3

    def second_order(fn, dtype):
        xt = x.detach().to(dtype).requires_grad_()
        (g,) = torch.autograd.grad(fn(xt).pow(3).sum(), xt, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), xt)[0]

    expected = second_order(lambda t: reference.softmax(t, mask, 0.5), torch.float64)
    baseline = second_order(lambda t: reference.softmax(t, mask, 0.5, upcast=False), torch.float32)
    got = second_order(lambda t: fastattn.softmax(t, mask=mask, scale=0.5, backend="cpu"), torch.float32)
    assert_within_baseline("softmax d2", got, expected, baseline)


def test_torch_func_grad_and_vmap():
    q, k, v = (t.detach() for t in _inputs([(1, 2, 5, 8)] * 3))

    def loss(q):
        return fastattn.attention(q, k, v, causal=True).pow(2).sum()

    def reference_loss(q):
        return reference.attention(q, k, v, window=reference.CAUSAL)[0].pow(2).sum()

    torch.testing.assert_close(torch.func.grad(loss)(q), torch.func.grad(reference_loss)(q))
    batched = torch.func.vmap(lambda q: fastattn.attention(q, k, v))(q.unsqueeze(0).expand(3, -1, -1, -1, -1))
    torch.testing.assert_close(batched, fastattn.attention(q, k, v).expand(3, -1, -1, -1, -1))
    with pytest.raises(ValueError, match="torch.func transforms"):
        torch.func.grad(lambda q: fastattn.attention(q, k, v, backend="cpu").sum())(q)


# ----------------------------------------------------------------------------- backend forcing


def test_use_backend_is_thread_local():
    # Two threads enter and leave use_backend interleaved; neither leaks into the other or
    # outlives its block.
    a_entered, b_entered, a_left = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with fastattn.use_backend("reference"):
            a_entered.set()
            b_entered.wait()
            seen["a inside"] = dispatch.forced_backend()
        a_left.set()

    def thread_b():
        a_entered.wait()
        seen["b before"] = dispatch.forced_backend()
        with fastattn.use_backend("cpu"):
            b_entered.set()
            a_left.wait()
            seen["b inside"] = dispatch.forced_backend()
        seen["b after"] = dispatch.forced_backend()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a inside": "reference", "b before": None, "b inside": "cpu", "b after": None}
    assert dispatch.forced_backend() is None


def test_use_backend_is_task_local():
    async def force(name, other_entered, entered):
        with fastattn.use_backend(name):
            entered.set()
            await other_entered.wait()
            return dispatch.forced_backend()

    async def main():
        first, second = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(force("cpu", second, first), force("reference", first, second))

    assert asyncio.run(main()) == ["cpu", "reference"]
    assert dispatch.forced_backend() is None


def test_use_backend_is_read_under_compile():
    q = torch.randn(1, 2, 5, 8)
    compiled = torch.compile(lambda q: fastattn.attention(q, q, q), fullgraph=True)
    compiled(q)
    with fastattn.use_backend("triton"), pytest.raises(Exception, match="backend 'triton' cannot run"):
        if dispatch.backends()["triton"]["usable"]:
            pytest.skip("the triton backend runs here; the check needs a backend that cannot")
        compiled(q)


# ----------------------------------------------------------------------------- mask gradients


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_broadcast_mask_gradient_is_summed_in_float32(dtype):
    # A (1, 1, Sq, Sk) bias shared by 4 x 16 (batch, head) pairs: its gradient sums 64 terms.
    shapes = [(4, 16, 33, 64), (4, 16, 47, 64), (4, 16, 47, 64)]
    q, k, v = _inputs(shapes, torch.float64, seed=3)
    bias = torch.randn(1, 1, 33, 47, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grad_out = torch.randn(4, 16, 33, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def mask_grad(fn, dtype):
        b = bias.detach().to(dtype).requires_grad_()
        fn([t.detach().to(dtype) for t in (q, k, v)], b).backward(grad_out.to(dtype))
        return b.grad

    expected = mask_grad(lambda t, b: reference.attention(*t, b)[0], torch.float64)
    baseline = mask_grad(lambda t, b: reference.attention(*t, b, upcast=False)[0], dtype)
    got = mask_grad(lambda t, b: fastattn.attention(*t, attn_mask=b, backend="cpu"), dtype)
    assert got.dtype == dtype
    assert_within_baseline("dmask", got, expected, baseline)
