"""ALiBi (a per-head linear bias -slope * |i' - j| on the scores, as in BLOOM and MPT) on every
backend that runs here, against the float64 reference with the rule of docs/design.md:
outputs, lse and the gradients of q, k and v. Alone and with causal, windows, masks, softcap,
sinks and dropout; padded, packed and few-query (decode) paths (the KV cache: tests/test_kvcache.py); per-batch slopes,
argument checks, opcheck and torch.compile."""
import math

import pytest
import torch

import fastattn
from fastattn import ops, reference
from test_window import backend  # noqa: F401 (fixture: every backend here, the cpu one per instruction set)
from tolerance import assert_within_baseline


def bloom_slopes(heads):
    """BLOOM's slopes: a geometric sequence 2^(-8 / n), 2^(-16 / n), ... for n heads (n a power
    of two here)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])


def _check_against_reference(run_kernel, run_reference, tensors):
    """run_kernel(*leaves) and run_reference(*leaves, upcast) -> (out, lse). Checks out, lse and
    the gradients of every leaf (loss: out . g) with the rule: kernel vs float64, within twice
    the low-precision run."""
    results = []
    for which in ("kernel", "ref", "base"):
        dtype = torch.float64 if which == "ref" else None
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]
        out, lse = run_kernel(*leaves) if which == "kernel" else run_reference(*leaves, which == "ref")
        results.append((out, lse, leaves))
    g = torch.randn_like(results[0][0], dtype=torch.float32)
    grads = [torch.autograd.grad((out.double() * g.double()).sum(), leaves) for out, _, leaves in results]
    (out, lse, _), (ref_out, ref_lse, _), (base_out, base_lse, _) = results
    assert_within_baseline("out", out, ref_out, base_out)
    assert_within_baseline("lse", lse, ref_lse, base_lse.float())
    for name, got, expected, baseline in zip(("dq", "dk", "dv"), *grads):
        assert_within_baseline(name, got, expected, baseline)
    return out, lse


def _padded(B, Hq, Hkv, Sq, Sk, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    return q, k, v


# (B, Hq, Hkv, Sq, Sk, D, dtype, per-batch slopes, padding mask, causal, window, softcap, sinks)
CASES = [
    (2, 4, 2, 77, 77, 32, torch.float32, False, False, True, None, None, False),  # causal, GQA (BLOOM)
    (2, 2, 2, 40, 130, 64, torch.bfloat16, True, True, False, None, None, False),  # both sides of the diagonal
    (1, 2, 1, 90, 50, 32, torch.float32, False, False, False, (4, 0), 3.0, True),  # empty rows, cap, sinks
    (1, 4, 1, 2, 300, 48, torch.float16, False, True, True, (60, None), None, False),  # few queries (decode)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[3]}x{c[4]}-{str(c[6])[6:]}-b{int(c[7])}-pad{int(c[8])}")
@pytest.mark.interpreted_triton_keeps(case=CASES[1:])
def test_alibi_against_reference(backend, case):
    B, Hq, Hkv, Sq, Sk, D, dtype, per_batch, padding, causal, window, softcap, with_sinks = case
    q, k, v = _padded(B, Hq, Hkv, Sq, Sk, D, dtype, seed=Sq + Sk)
    slopes = bloom_slopes(Hq)
    if per_batch:  # each batch its own slopes (some 0: no bias in that head)
        slopes = torch.stack([slopes * (b + 1) * (torch.arange(Hq) % 3 != 2) for b in range(B)])
    mask = (torch.arange(Sk) < Sk - 17).view(1, 1, 1, Sk) if padding else None
    sinks = torch.randn(Hq) if with_sinks else None
    rule = ops.window_rule(causal, window)

    def kernel(q, k, v):
        return fastattn.attention(q, k, v, attn_mask=mask, causal=causal, window=window, softcap=softcap, sinks=sinks,
                                  alibi_slopes=slopes, return_lse=True, backend=backend)

    def ref(q, k, v, upcast):
        return reference.attention(q, k, v, mask, None, rule, upcast=upcast, softcap=softcap or 0.0, sinks=sinks,
                                   alibi_slopes=slopes)

    out, _ = _check_against_reference(kernel, ref, (q, k, v))
    if window is not None and Sq > Sk:  # rows that see no key: zeros, never NaN
        assert (out[:, :, : Sq - Sk - window[0]] == 0).all()


def test_alibi_bias_formula():
    """The documented formula on one small case, written out: -slope * |i + Sk - Sq - j|."""
    q = torch.zeros(1, 1, 2, 4)  # zero scores: the bias alone decides the probabilities
    k = torch.zeros(1, 1, 3, 4)
    v = torch.eye(3).view(1, 1, 3, 3)
    slope = 0.5
    out = fastattn.attention(q, k, v, alibi_slopes=torch.tensor([slope]), backend="cpu")
    for i, diagonal in enumerate((1, 2)):  # query i sits on key i + Sk - Sq
        weights = torch.tensor([math.exp(-slope * abs(diagonal - j)) for j in range(3)])
        assert torch.allclose(out[0, 0, i], weights / weights.sum(), atol=1e-6)


def test_matches_bloom_alibi_under_the_causal_rule():
    """BLOOM adds slope * j (its build_alibi_tensor, here for 12 heads: not a power of two) to
    every query's scores; under the causal rule that differs from -slope * |i - j| by a
    constant per row, which softmax ignores: fastattn with BLOOM's own slopes gives BLOOM's
    attention."""
    modeling_bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    B, H, S, D = 2, 12, 40, 32
    bloom_bias = modeling_bloom.build_alibi_tensor(torch.ones(B, S, dtype=torch.long), H, torch.float64).view(B, H, 1, S)
    slopes = bloom_bias[0, :, 0, 1].float()  # key position 1: the slope itself
    q, k, v = _padded(B, H, H, S, S, D, torch.float32, seed=23)
    causal = reference.window_visibility(S, S, reference.CAUSAL, "cpu")
    bloom_mask = bloom_bias.masked_fill(~causal, float("-inf"))
    out = fastattn.attention(q, k, v, causal=True, alibi_slopes=slopes, backend="cpu")
    expected, _ = reference.attention(q.double(), k.double(), v.double(), bloom_mask, None)
    baseline, _ = reference.attention(q, k, v, bloom_mask.float(), None, upcast=False)
    assert_within_baseline("out", out, expected, baseline)


def test_alibi_with_additive_mask_and_dropout(backend):
    """The bias joins an additive mask (whose gradient is unchanged by it) and dropout's
    decisions, which are the fused kernels' own Philox bits (the reference reproduces them)."""
    if backend == "reference":
        pytest.skip("the reference is the ground truth here")
    q, k, v = _padded(1, 2, 2, 33, 45, 32, torch.float32, seed=3)
    mask = torch.randn(1, 2, 33, 45)
    slopes = bloom_slopes(2)
    rng_state = torch.tensor([1234, 8], dtype=torch.int64)

    def kernel(q, k, v, mask):
        out, lse, _ = fastattn.functional._ops_for(backend).attn_fwd(q, k, v, mask.expand(1, 2, 33, 45), 0.2, -1, -1,
                                                                      False, 0.0, 0.3, rng_state, None,
                                                                      slopes.expand(1, 2).contiguous())
        return out, lse

    def ref(q, k, v, mask, upcast):
        return reference.attention(q, k, v, mask, 0.2, dropout_p=0.3, upcast=upcast, rng_state=rng_state,
                                   alibi_slopes=slopes)

    results = []
    for which in ("kernel", "ref", "base"):
        dtype = torch.float64 if which == "ref" else None
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v, mask)]
        out, _ = kernel(*leaves) if which == "kernel" else ref(*leaves, which == "ref")
        results.append((out, torch.autograd.grad(out.double().square().sum(), leaves)))
    (out, grads), (ref_out, ref_grads), (base_out, base_grads) = results
    assert_within_baseline("out", out, ref_out, base_out)
    for name, got, expected, baseline in zip(("dq", "dk", "dv", "dmask"), grads, ref_grads, base_grads):
        assert_within_baseline(name, got, expected, baseline)


def test_varlen_with_alibi(backend):
    g = torch.Generator().manual_seed(5)
    lengths_q, lengths_k = [37, 0, 64, 5], [50, 3, 64, 5]
    cu_q = torch.tensor([0] + lengths_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lengths_k).cumsum(0).to(torch.int32)
    Hq, Hkv, D = 4, 2, 32
    q = torch.randn(int(cu_q[-1]), Hq, D, generator=g)
    k, v = (torch.randn(int(cu_k[-1]), Hkv, D, generator=g) for _ in range(2))
    slopes = torch.rand(4, Hq, generator=g)  # per sequence

    def kernel(q, k, v):
        return fastattn.varlen_attention(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), alibi_slopes=slopes,
                                         return_lse=True, backend=backend)

    def ref(q, k, v, upcast):
        return reference.varlen_attention(q, k, v, cu_q, cu_k, None, upcast=upcast, alibi_slopes=slopes)

    _check_against_reference(kernel, ref, (q, k, v))


def test_zero_slopes_change_nothing(backend):
    q, k, v = _padded(1, 2, 2, 20, 30, 32, torch.float32, seed=7)
    plain = fastattn.attention(q, k, v, causal=True, return_lse=True, backend=backend)
    biased = fastattn.attention(q, k, v, causal=True, alibi_slopes=torch.zeros(2), return_lse=True, backend=backend)
    assert torch.equal(plain[0], biased[0]) and torch.equal(plain[1], biased[1])


@pytest.mark.parametrize(
    "slopes, error, message",
    [
        (torch.zeros(3), ValueError, r"alibi_slopes must have shape \(4,\) or \(2, 4\)"),
        (torch.zeros(4, dtype=torch.int64), TypeError, "alibi_slopes must be a floating-point tensor"),
        ([0.0] * 4, TypeError, "alibi_slopes must be a floating-point tensor"),
        (torch.zeros(1, 4), ValueError, r"alibi_slopes must have shape \(4,\) or \(2, 4\)"),
        (torch.zeros(4, requires_grad=True), ValueError, "alibi_slopes get no gradient"),
    ],
)
def test_bad_alibi_slopes_raise_clear_errors(slopes, error, message):
    q = k = v = torch.randn(2, 4, 8, 16)
    with pytest.raises(error, match=message):
        fastattn.attention(q, k, v, alibi_slopes=slopes)


def test_opcheck_and_compile_with_alibi():
    q, k, v = _padded(2, 2, 1, 16, 24, 32, torch.float32, seed=17)
    slopes = bloom_slopes(2).expand(2, 2).contiguous()
    torch.library.opcheck(ops.NATIVE_OPS.attn_fwd, (q, k, v, None, 0.2, -1, 0, False, 0.0, 0.0, None, None, slopes))
    cu = torch.tensor([0, 16, 32], dtype=torch.int32)
    packed = [t.transpose(1, 2).flatten(0, 1).contiguous() for t in (q, k[:, :, :16], v[:, :, :16])]
    torch.library.opcheck(ops.NATIVE_OPS.varlen_fwd,
                          (*packed, cu, cu, 16, 16, 0.2, -1, 0, 0.0, 0.0, None, None, slopes))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def run(q, k, v):
        return fastattn.attention(q, k, v, causal=True, alibi_slopes=slopes, backend="cpu")

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    out.sum().backward()
    expected = [t.clone().requires_grad_() for t in (q, k, v)]
    run(*expected).sum().backward()
    assert torch.allclose(out, run(q, k, v))
    for got, want in zip(leaves, expected):
        assert torch.allclose(got.grad, want.grad, atol=1e-6)
