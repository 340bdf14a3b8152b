"""fastattn.varlen_attention (packed variable-length sequences) on every backend that runs
here against the float64 reference, with the rule of docs/design.md; the reference itself
against a block-diagonal mask over the whole packed batch; argument checks, dispatch, dropout,
opcheck and torch.compile."""
import pytest
import torch

import fastattn
from fastattn import dispatch, philox, reference
from fastattn.capabilities import CAPABILITIES
from test_cpu_kernels import ISAS, grads_from_given_out, poison_allocator
from tolerance import assert_within_baseline, max_error

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
USABLE = [b for b in ("cpu", "triton") if dispatch.backends()[b]["usable"]]
# (backend, CPU instruction set) pairs: every ISA for the C++ kernels, Triton interpreted.
KERNELS = [("cpu", isa) for isa in ISAS if "cpu" in USABLE] + [("triton", None)] * ("triton" in USABLE)


def packed(lengths_q, lengths_k, Hq, Hkv, D, Dv, dtype, seed):
    """Random packed q, k, v and the int32 cumulative lengths of the given sequences."""
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0] + lengths_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + lengths_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), Hq, D, generator=g).to(dtype)
    k = torch.randn(int(cu_k[-1]), Hkv, D, generator=g).to(dtype)
    v = torch.randn(int(cu_k[-1]), Hkv, Dv, generator=g).to(dtype)
    return q, k, v, cu_q, cu_k


def per_sequence(fn, cu_q, cu_k, query_tensors, key_tensors):
    """fn applied to each sequence's (1, H, S, D) views of the query-shaped then the key-shaped
    tensors; each of fn's (1, H, S, D) results packed back to (rows, H, D), sequence by sequence."""
    parts = []
    for b in range(cu_q.numel() - 1):
        qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        views = [t[qs].transpose(0, 1).unsqueeze(0) for t in query_tensors]
        views += [t[ks].transpose(0, 1).unsqueeze(0) for t in key_tensors]
        parts.append([r[0].transpose(0, 1) for r in fn(*views)])
    return [torch.cat(group) for group in zip(*parts)]


def reference_grads(q, k, v, cu_q, cu_k, scale, causal, grad_out, dtype):
    """Reference out, lse and gradients with the inputs cast to dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = reference.varlen_attention(*leaves, cu_q, cu_k, scale, causal, upcast=dtype == torch.float64)
    out.backward(grad_out.to(dtype))
    return out.detach(), lse.detach(), [t.grad for t in leaves]


def check_against_reference(out, lse, grads, q, k, v, cu_q, cu_k, scale, causal, grad_out):
    """out, lse and (dq, dk, dv) of a kernel against the float64 reference (docs/design.md)."""
    dtype = q.dtype
    ref_out, ref_lse, ref_grads = reference_grads(q, k, v, cu_q, cu_k, scale, causal, grad_out, torch.float64)
    base_out, base_lse, base_grads = reference_grads(q, k, v, cu_q, cu_k, scale, causal, grad_out, dtype)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_within_baseline("out", out, ref_out, base_out)
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[1], q.shape[0])
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "lse: -inf rows differ"
    finite = torch.isfinite(ref_lse)
    assert_within_baseline("lse", lse[finite], ref_lse[finite], base_lse[finite])
    # As in the padded tests: the baseline is the worse of PyTorch in q's dtype and the exact
    # gradients from the kernel's own rounded output.
    given = per_sequence(
        lambda q_, go, o, k_, v_: grads_from_given_out(q_, k_, v_, None, scale, causal, go, o)[:3],
        cu_q, cu_k, [q, grad_out, out], [k, v],
    )
    for name, got, ref, base, exact in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads, given):
        assert got.dtype == dtype and got.shape == ref.shape
        worse = base if max_error(base, ref) >= max_error(exact, ref) else exact
        assert_within_baseline(name, got, ref, worse)


def run_kernel(backend, isa, monkeypatch, q, k, v, cu_q, cu_k, scale, causal):
    """out, lse and gradients of varlen_attention forced onto `backend` (the fused backward)."""
    if isa is not None:
        monkeypatch.setenv("FASTATTN_CPU_ISA", isa)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    max_q, max_k = int(cu_q.diff().max()), int(cu_k.diff().max())
    poison_allocator()
    out, lse = fastattn.varlen_attention(*leaves, cu_q, cu_k, max_q, max_k, causal=causal == reference.CAUSAL,
                                         scale=scale, return_lse=True, backend=backend)
    grad_out = torch.randn_like(out)
    poison_allocator()
    out.backward(grad_out)
    return out.detach(), lse, [t.grad for t in leaves], grad_out


# (query lengths, key lengths, Hq, Hkv, D, Dv, dtype, causal): lengths 0 and 1, Sq != Sk per
# sequence (both ways: causal rows that see nothing), GQA, odd head dims, few-query sequences.
CASES = [
    ([5, 0, 1, 70, 33], [9, 4, 1, 70, 0], 4, 2, 32, 32, F32, True),
    ([130, 7, 64], [100, 40, 64], 2, 2, 40, 40, F32, False),
    ([20, 1, 0, 9], [31, 3, 5, 9], 6, 2, 64, 64, BF16, True),  # all <= 32 queries: the row-wise forward
    ([77, 16], [140, 1], 3, 1, 80, 64, F16, True),
    ([1, 200], [1, 97], 2, 1, 64, 64, F32, True),  # keys split across threads
]


def case_id(case):
    lq, lk, Hq, Hkv, D, Dv, dtype, causal = case
    return f"{len(lq)}seq-{Hq}/{Hkv}-d{D}/{Dv}-{str(dtype)[6:]}{'-causal' if causal else ''}"


@pytest.mark.parametrize("backend, isa", KERNELS, ids=lambda x: str(x))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_varlen_against_reference(backend, isa, case, monkeypatch):
    lengths_q, lengths_k, Hq, Hkv, D, Dv, dtype, causal = case
    if backend == "triton" and max(lengths_q + lengths_k) > 100:
        pytest.skip("long sequences take minutes under the Triton interpreter")
    q, k, v, cu_q, cu_k = packed(lengths_q, lengths_k, Hq, Hkv, D, Dv, dtype, seed=len(lengths_q) + D)
    rule = reference.CAUSAL if causal else reference.UNBOUNDED
    scale = D ** -0.5 * 1.3
    out, lse, grads, grad_out = run_kernel(backend, isa, monkeypatch, q, k, v, cu_q, cu_k, scale, rule)
    check_against_reference(out, lse, grads, q, k, v, cu_q, cu_k, scale, rule, grad_out)


@pytest.mark.parametrize("backend, isa", KERNELS, ids=lambda x: str(x))
@pytest.mark.parametrize("causal, window, softcap", [(False, (3, 1), 2.0), (True, (4, None), 0.0)])
def test_varlen_with_window_and_softcap(backend, isa, causal, window, softcap, monkeypatch):
    """The window is aligned bottom-right within each sequence, and the cap applies before it;
    sequences with more queries than keys leave rows empty."""
    if isa is not None:
        monkeypatch.setenv("FASTATTN_CPU_ISA", isa)
    q, k, v, cu_q, cu_k = packed([9, 0, 14, 3], [12, 5, 6, 3], 4, 2, 32, 32, F32, seed=11)
    rule = reference.Window(window[0], 0 if causal else window[1])
    grad_out = torch.randn(q.shape[0], 4, 32, generator=torch.Generator().manual_seed(12))

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad_out.to(dtype))
        return [out] + [t.grad for t in leaves]

    got = run(lambda *t: fastattn.varlen_attention(*t, cu_q, cu_k, 14, 12, causal=causal, window=window,
                                                   softcap=softcap or None, backend=backend), F32)
    for upcast, dtype in ((True, torch.float64), (False, F32)):
        result = run(lambda *t: reference.varlen_attention(*t, cu_q, cu_k, None, rule, upcast=upcast,
                                                           softcap=softcap)[0], dtype)
        if upcast:
            expected = result
        else:
            baseline = result
    for name, g, e, b in zip(("out", "dq", "dk", "dv"), got, expected, baseline):
        assert_within_baseline(name, g, e, b)


def test_reference_equals_a_block_diagonal_mask():
    """The reference's per-sequence loop against one attention over the whole packed batch
    with a mask that keeps each query to its own sequence's keys (bottom-right causal)."""
    q, k, v, cu_q, cu_k = packed([3, 0, 6, 2], [5, 2, 6, 0], 4, 2, 16, 16, torch.float64, seed=1)
    seq_q = torch.repeat_interleave(torch.arange(4), cu_q.diff().long())
    seq_k = torch.repeat_interleave(torch.arange(4), cu_k.diff().long())
    pos_q = torch.arange(q.shape[0]) - cu_q[seq_q]  # position within the sequence
    pos_k = torch.arange(k.shape[0]) - cu_k[seq_k]
    offset = (cu_k.diff() - cu_q.diff())[seq_q]  # Sk - Sq of each query's sequence
    same = seq_q[:, None] == seq_k[None, :]
    causal = pos_k[None, :] <= pos_q[:, None] + offset[:, None]
    for is_causal, keep in ((False, same), (True, same & causal)):
        out, lse = reference.varlen_attention(q, k, v, cu_q, cu_k, 0.3, reference.CAUSAL if is_causal else reference.UNBOUNDED)
        dense, dense_lse = reference.attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], keep, 0.3
        )
        torch.testing.assert_close(out, dense[0].transpose(0, 1))
        torch.testing.assert_close(lse, dense_lse[0])


def test_dispatch_and_capabilities():
    q, k, v, cu_q, cu_k = packed([4, 6], [4, 6], 2, 2, 16, 16, F32, seed=2)
    assert "varlen" in CAPABILITIES["reference"].features
    expected = "cpu" if "cpu" in USABLE else "reference"
    assert dispatch.choose(lambda name: dispatch.varlen_reason(name, q, k, v), q.device) == expected
    out = fastattn.varlen_attention(q, k, v, cu_q, cu_k, 6, 6, backend="reference")
    assert out.shape == (10, 2, 16)


def test_cuda_backend_takes_packed_sequences(monkeypatch):
    """The CUDA kernels declare packed sequences, and dispatch asks cuda_support whether they
    can read these tensors in the packed layout (past the build and device checks, which fail
    first on a machine without a GPU: the tensors' device is then the reason)."""
    if "cuda" not in CAPABILITIES:
        pytest.skip("fastattn._C is not built")
    assert "varlen" in CAPABILITIES["cuda"].features
    monkeypatch.setattr(dispatch, "_common_reason", lambda backend, t: None)
    q, k, v, _, _ = packed([4], [4], 2, 2, 16, 16, F16, seed=3)
    assert dispatch.varlen_reason("cuda", q, k, v) == "the cuda backend takes CUDA tensors, got cpu"


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(q=torch.randn(1, 5, 2, 16)), ValueError, "q must be 3-d"),
        (dict(cu_seqlens_q=torch.tensor([0, 4, 10])), ValueError, "cu_seqlens_q must be a 1-d int32 tensor"),
        (dict(cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32)), ValueError, "cu_seqlens_k must have as many"),
        (dict(cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, "cu_seqlens_q must start at 0 and end at 10"),
        (dict(cu_seqlens_k=torch.tensor([0, 8, 10], dtype=torch.int32)), ValueError, "lengths up to max_seqlen_k=7"),
        (dict(cu_seqlens_k=torch.tensor([0, 11, 10], dtype=torch.int32)), ValueError, "cu_seqlens_k must be non-decreasing"),
        (dict(max_seqlen_q=5), ValueError, "lengths up to max_seqlen_q=5"),
        (dict(max_seqlen_q=-1), ValueError, "max_seqlen_q must be an int >= 0"),
        (dict(max_seqlen_k=7.0), ValueError, "max_seqlen_k must be an int >= 0"),
        (dict(k=torch.randn(10, 3, 16), v=torch.randn(10, 3, 16)), ValueError, r"q heads \(2\) must be a multiple of k/v heads \(3\)"),
        (dict(v=torch.randn(9, 1, 16)), ValueError, "k and v must agree in rows and heads"),
        (dict(causal=1), TypeError, "causal must be True or False"),
        (dict(dropout_p=1.5), ValueError, "dropout_p must be in"),
    ],
)
def test_bad_arguments_name_the_argument(change, error, message):
    q, k, v, cu_q, cu_k = packed([4, 6], [3, 7], 2, 1, 16, 16, F32, seed=4)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=6, max_seqlen_k=7)
    args.update(change)
    kwargs = {name: args.pop(name) for name in ("causal", "dropout_p") if name in args}
    with pytest.raises(error, match=message):
        fastattn.varlen_attention(*args.values(), **kwargs)


def test_dropout_decides_like_the_padded_batch():
    """Packed dropout numbers sequence b as batch b: the same keep decisions, and so the same
    rows, as the padded batch with a key-padding mask under one rng state (float64: the
    reference; the kernels' packed decisions: tests/test_dropout.py)."""
    lengths = [5, 2, 7]
    q, k, v, cu_q, cu_k = packed(lengths, lengths, 2, 2, 16, 16, torch.float64, seed=5)
    torch.manual_seed(11)
    out = fastattn.varlen_attention(q, k, v, cu_q, cu_k, 7, 7, causal=True, dropout_p=0.4)
    torch.manual_seed(11)
    rng_state = philox.draw_rng_state(q.device)
    B, S = len(lengths), max(lengths)
    padded = [torch.zeros(B, 2, S, 16, dtype=torch.float64) for _ in range(3)]
    for b, n in enumerate(lengths):
        for dst, src in zip(padded, (q, k, v)):
            dst[b, :, :n] = src[int(cu_q[b]):int(cu_q[b + 1])].transpose(0, 1)
    keys = (torch.arange(S) < torch.tensor(lengths)[:, None]).view(B, 1, 1, S)
    dense, _ = reference.attention(*padded, keys, 0.25, reference.CAUSAL_TOP_LEFT, 0.4, rng_state=rng_state)
    expected = torch.cat([dense[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)])
    torch.testing.assert_close(out, expected)
    plain = fastattn.varlen_attention(q, k, v, cu_q, cu_k, 7, 7, causal=True)
    assert not torch.allclose(out, plain)


@pytest.mark.skipif("cpu" not in USABLE, reason="fastattn._C (CPU kernels) is not built")
def test_opcheck_varlen_ops():
    q, k, v, cu_q, cu_k = packed([3, 0, 9], [5, 2, 4], 4, 2, 16, 16, F32, seed=6)
    for t in (q, k, v):
        t.requires_grad_()
    # Not test_aot_dispatch_dynamic on the forward: it traces the backward with grad enabled,
    # where the differentiable (double-backward) path runs the reference one sequence at a
    # time, reading the lengths on the host, which dynamic-shape tracing cannot. Compiled
    # training takes the fused backward (test_compile_fullgraph_forward_and_backward).
    forward_checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    for window in ((-1, -1), (-1, 0), (2, 1)):  # unbounded, causal, a sliding window
        args = (q, k, v, cu_q, cu_k, 9, 5, 0.25, *window)
        torch.library.opcheck(torch.ops.fastattn.varlen_fwd.default, args, test_utils=forward_checks)
        out, lse, stats = torch.ops.fastattn.varlen_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        torch.library.opcheck(
            torch.ops.fastattn.varlen_bwd.default,
            (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, stats, cu_q, cu_k, 9, 5, 0.25, *window),
        )


def _packed_step(q, k, v, cu_q, cu_k):
    out = fastattn.varlen_attention(q, k, v, cu_q, cu_k, 9, 8, causal=True)
    return (out * out).sum()


@pytest.mark.skipif("cpu" not in USABLE, reason="fastattn._C (CPU kernels) is not built")
def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    q, k, v, cu_q, cu_k = packed([3, 9, 1], [8, 2, 5], 4, 2, 16, 16, F32, seed=7)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    compiled = torch.compile(_packed_step, fullgraph=True)
    got = compiled(*inputs, cu_q, cu_k)
    got_grads = torch.autograd.grad(got, inputs)
    expected = _packed_step(*inputs, cu_q, cu_k)
    expected_grads = torch.autograd.grad(expected, inputs)
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", USABLE + ["reference"])
def test_lse_gradient_and_double_backward(backend):
    """A differentiated lse and create_graph=True take the reference's differentiable path."""
    q, k, v, cu_q, cu_k = packed([4, 0, 6], [5, 3, 6], 2, 1, 8, 8, F32, seed=8)
    inputs = [t.double().requires_grad_() for t in (q, k, v)]

    def f(*tensors):
        out, lse = fastattn.varlen_attention(*(t.float() for t in tensors), cu_q, cu_k, 6, 6, causal=True,
                                             return_lse=True, backend=backend)
        return out, lse.masked_fill(torch.isneginf(lse), 0.0)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-3, atol=2e-3, rtol=2e-3, fast_mode=True)
    out, _ = f(*inputs)
    (grad,) = torch.autograd.grad(out.square().sum(), inputs[0], create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), inputs[1])
    ref_inputs = [t.detach().requires_grad_() for t in inputs]
    ref_out, _ = reference.varlen_attention(*ref_inputs, cu_q, cu_k, 8 ** -0.5, reference.CAUSAL)
    (ref_grad,) = torch.autograd.grad(ref_out.square().sum(), ref_inputs[0], create_graph=True)
    (ref_second,) = torch.autograd.grad(ref_grad.sum(), ref_inputs[1])
    torch.testing.assert_close(second, ref_second, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("backend", USABLE + ["reference"])
def test_strided_inputs_give_the_contiguous_results(backend):
    """Packed views with other strides (heads-major storage, a slice of a wider buffer) are
    read in place and give exactly the contiguous inputs' results, gradients included."""
    q, k, v, cu_q, cu_k = packed([7, 0, 20], [9, 3, 20], 4, 2, 32, 32, F32, seed=9)
    strided = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in (q, k)]
    strided.append(torch.cat([v, torch.randn_like(v)], dim=-1)[..., :32])
    assert not any(t.is_contiguous() for t in strided)
    results = []
    for inputs in ((q, k, v), strided):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out, lse = fastattn.varlen_attention(*leaves, cu_q, cu_k, 20, 20, causal=True, return_lse=True, backend=backend)
        out.backward(torch.ones_like(out))
        results.append([out, lse] + [t.grad for t in leaves])
    for got, expected in zip(*results):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", USABLE + ["reference"])
def test_no_sequences_and_no_keys(backend):
    """No sequences at all, and sequences without keys: empty results, or zeros with lse -inf
    and zero gradients."""
    empty = torch.zeros(0, 2, 8)
    cu = torch.zeros(1, dtype=torch.int32)
    out, lse = fastattn.varlen_attention(empty, empty, empty, cu, cu, 0, 0, return_lse=True, backend=backend)
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0)
    q = torch.randn(5, 2, 8, requires_grad=True)
    k = torch.zeros(0, 1, 8, requires_grad=True)
    cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    out, lse = fastattn.varlen_attention(q, k, k, cu_q, cu_k, 3, 0, return_lse=True, backend=backend)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(5, 2, 8)) and torch.isneginf(lse).all()
    assert torch.equal(q.grad, torch.zeros_like(q))
