"""The C++ CPU kernels (torch.ops.fastattn.* on CPU tensors) against the float64 reference,
with the rule of docs/design.md: error <= 2 * error of the reference run in the kernel's dtype + eps.
Every instruction-set variant this CPU can run is tested (FASTATTN_CPU_ISA)."""
import math

import pytest
import torch

pytest.importorskip("fastattn._C", reason="the compiled extension is not built")

from fastattn import reference  # noqa: E402
from tolerance import EPS, assert_within_baseline, max_error  # noqa: E402

ops = torch.ops.fastattn
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
NONE, TOP_LEFT, BOTTOM_RIGHT = reference.UNBOUNDED, reference.CAUSAL_TOP_LEFT, reference.CAUSAL


def _isa_available(name):
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTATTN_CPU_ISA", name)
    try:
        x = torch.randn(1, 1, 1, 4)
        ops.softmax_fwd(x, None, 1.0)
        return True
    except RuntimeError:
        return False
    finally:
        mp.undo()


ISAS = [name for name in ("avx512", "avx2", "generic") if _isa_available(name)]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("FASTATTN_CPU_ISA", request.param)
    return request.param


def poison_allocator():
    """Leaves NaN in freed memory so that an output element the kernel forgets to write is
    likely to show up as NaN."""
    junk = torch.full((1 << 22,), float("nan"))
    del junk


def make_qkv(B, Hq, Hkv, Sq, Sk, D, Dv, dtype, transposed):
    """Fresh random q, k, v; transposed=True gives (B, S, H, D) storage seen as (B, H, S, D)."""
    def one(h, s, d):
        if transposed:
            return torch.randn(B, s, h, d, dtype=dtype).transpose(1, 2)
        return torch.randn(B, h, s, d, dtype=dtype)

    return one(Hq, Sq, D), one(Hkv, Sk, D), one(Hkv, Sk, Dv)


def make_mask(kind, B, H, Sq, Sk, dtype):
    """A mask of `kind`, expanded to (B, H, Sq, Sk) (broadcast dims keep stride 0)."""
    shape = (B, H, Sq, Sk)
    if kind is None:
        return None
    if kind == "key_padding":  # (B, 1, 1, Sk); batch 0 sees no key at all
        keep = torch.rand(B, 1, 1, Sk) > 0.3
        keep[0] = False
        return keep.expand(shape)
    if kind == "bool_full":  # some query rows see nothing
        keep = torch.rand(shape) > 0.5
        keep[:, :, ::7] = False
        return keep
    if kind == "bool_query_col":  # (B, 1, Sq, 1): stride 0 along keys too
        keep = torch.rand(B, 1, Sq, 1) > 0.3
        return keep.expand(shape)
    if kind == "add_full":  # additive in q's dtype, with hidden (-inf) entries
        bias = torch.randn(shape, dtype=dtype)
        bias[torch.rand(shape) < 0.2] = float("-inf")
        return bias
    if kind == "add_rows_f32":  # float32 (Sq, Sk) shared by batch and heads
        return torch.randn(Sq, Sk).expand(shape)
    if kind == "add_heads":  # (1, H, Sq, Sk) shared by the batch
        return torch.randn(1, H, Sq, Sk, dtype=dtype).expand(shape)
    raise ValueError(kind)


# (B, Hq, Hkv, Sq, Sk, D, Dv, dtype, causal, mask kind, transposed inputs)
ATTENTION_CASES = [
    (1, 1, 1, 1, 1, 32, 32, F32, NONE, None, False),
    (2, 2, 1, 1, 257, 64, 64, BF16, BOTTOM_RIGHT, "key_padding", False),
    (2, 4, 2, 113, 203, 40, 40, F32, NONE, "bool_full", True),
    (1, 2, 2, 113, 203, 80, 80, F16, TOP_LEFT, None, False),
    (1, 3, 1, 128, 128, 96, 96, F32, BOTTOM_RIGHT, "add_heads", False),
    (2, 2, 2, 512, 256, 128, 128, BF16, NONE, "key_padding", True),
    (1, 2, 1, 512, 256, 256, 256, F32, BOTTOM_RIGHT, None, False),
    (1, 2, 1, 203, 113, 32, 64, F16, BOTTOM_RIGHT, "add_rows_f32", False),  # rows that see nothing
    (2, 4, 4, 128, 128, 64, 64, BF16, TOP_LEFT, "add_full", False),
    (1, 2, 2, 113, 203, 40, 80, F32, TOP_LEFT, "bool_query_col", True),
    (1, 1, 1, 1023, 1024, 64, 64, F32, TOP_LEFT, "key_padding", False),
    # Query blocks narrower than 64 lanes (fwd_block_q): one short block, and several blocks
    # whose last one is partial.
    (1, 4, 2, 40, 300, 64, 64, F32, BOTTOM_RIGHT, "add_full", False),
    (2, 2, 1, 70, 150, 48, 48, BF16, TOP_LEFT, "bool_full", True),
    (1, 2, 2, 150, 97, 64, 64, F32, BOTTOM_RIGHT, "key_padding", False),
    # Threads owning whole kv heads, which walk the keys chunk by chunk (several chunks here).
    (2, 4, 2, 100, 900, 64, 64, F32, BOTTOM_RIGHT, "key_padding", False),
    (1, 2, 2, 70, 1000, 128, 96, BF16, TOP_LEFT, "add_full", True),
    # One or two work items: keys split over the threads, partial outputs merged.
    (1, 1, 1, 100, 700, 64, 64, F32, NONE, "add_full", False),
    (1, 1, 1, 40, 600, 32, 32, BF16, TOP_LEFT, None, True),  # later splits see nothing
    (2, 1, 1, 36, 400, 64, 64, F16, BOTTOM_RIGHT, "key_padding", False),  # batch 0 sees nothing
]


def case_id(case):
    B, Hq, Hkv, Sq, Sk, D, Dv, dtype, causal, mask, transposed = case
    return f"{B}x{Hq}/{Hkv}x{Sq}x{Sk}-d{D}/{Dv}-{str(dtype)[6:]}-c{causal}-{mask}{'-T' if transposed else ''}"


def reference_grads(q, k, v, mask, scale, causal, grad_out, dtype):
    """Reference output, lse and gradients with inputs (and an additive mask) cast to dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    m = mask
    if mask is not None and mask.dtype != torch.bool:
        m = mask.detach().to(dtype if dtype == torch.float64 else mask.dtype).contiguous().requires_grad_()
        leaves.append(m)
    out, lse = reference.attention(*leaves[:3], m, scale, causal)
    out.backward(grad_out.to(dtype))
    return out.detach(), lse.detach(), [t.grad for t in leaves]


def grads_from_given_out(q, k, v, mask, scale, causal, grad_out, out):
    """Exact (float64) gradients of attention given the op's own inputs: a fused backward only
    sees the saved output `out` (rounded to its dtype), and Delta = rowsum(dO * out) inherits
    that rounding, which matters on rows that see few keys. Rounded to q's dtype, this is the
    best any fused backward can do; returns dq, dk, dv and dS (the additive-mask gradient)."""
    q64, do64 = q.double(), grad_out.double()
    scores, k64 = reference.masked_scores(q, k, mask, scale, causal, torch.float64)
    v64 = reference.repeat_to_query_heads(v.double(), q.shape[1])
    probs, _ = reference._safe_softmax(scores)
    ds = probs * (do64 @ v64.transpose(-2, -1) - (do64 * out.double()).sum(-1, keepdim=True))
    dq = ds @ k64 * scale
    dk = reference.sum_query_groups(ds.transpose(-2, -1) @ q64 * scale, k.shape[1])
    dv = reference.sum_query_groups(probs.transpose(-2, -1) @ do64, k.shape[1])
    return [t.to(q.dtype) for t in (dq, dk, dv)] + [ds.to(q.dtype).float()]


def assert_lse_close(lse, ref_lse, base_lse):
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "lse: -inf rows differ"
    finite = torch.isfinite(ref_lse)
    assert_within_baseline("lse", lse[finite], ref_lse[finite], base_lse[finite])


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=case_id)
def test_attention_forward_backward(case, isa):
    B, Hq, Hkv, Sq, Sk, D, Dv, dtype, causal, mask_kind, transposed = case
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, Dv, dtype, transposed)
    mask = make_mask(mask_kind, B, Hq, Sq, Sk, dtype)
    scale = D ** -0.5 * 1.3
    mask_grad = mask is not None and mask.dtype != torch.bool

    poison_allocator()
    out, lse, stats = ops.attn_fwd(q, k, v, mask, scale, *causal)
    grad_out = torch.randn_like(out)
    poison_allocator()
    dq, dk, dv, dmask = ops.attn_bwd(grad_out, q, k, v, out, stats, mask, scale, mask_grad, *causal)

    ref_out, ref_lse, ref_grads = reference_grads(q, k, v, mask, scale, causal, grad_out, torch.float64)
    base_out, base_lse, base_grads = reference_grads(q, k, v, mask, scale, causal, grad_out, dtype)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == (B, Hq, Sq, Dv)
    assert_within_baseline("out", out, ref_out, base_out)
    assert_lse_close(lse, ref_lse, base_lse)
    # Gradients: the baseline is the worse of PyTorch in q's dtype and the exact gradients from
    # the op's own (rounded) inputs, rounded to q's dtype (see grads_from_given_out).
    given = grads_from_given_out(q, k, v, mask, scale, causal, grad_out, out)
    for name, got, ref, base, exact in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, base_grads, given):
        assert got.dtype == dtype and got.is_contiguous()
        worse = base if max_error(base, ref) >= max_error(exact, ref) else exact
        assert_within_baseline(name, got, ref, worse)
    if mask_grad:
        assert dmask.dtype == torch.float32 and dmask.shape == (B, Hq, Sq, Sk)
        # dmask is float32 but computed from inputs in q's dtype: compare like the others.
        base_dmask = base_grads[3].to(dtype).float()
        worse = base_dmask if max_error(base_dmask, ref_grads[3]) >= max_error(given[3], ref_grads[3]) else given[3]
        assert_within_baseline("dmask", dmask, ref_grads[3], worse)
    else:
        assert dmask.shape == (0,)


# Few queries (Sq <= 32: decode, speculative decoding, short prompts): the row-wise forward, all query heads of a kv group per item.
# (B, Hq, Hkv, Sq, Sk, D, Dv, dtype, causal, mask kind, transposed inputs)
DECODE_CASES = [
    (4, 12, 12, 1, 200, 64, 64, F32, NONE, None, False),
    (1, 8, 2, 1, 1500, 128, 128, F32, BOTTOM_RIGHT, None, True),  # GQA, K/V read in place
    (2, 6, 2, 2, 1031, 64, 64, BF16, BOTTOM_RIGHT, "key_padding", False),
    (2, 4, 1, 5, 777, 40, 80, F32, BOTTOM_RIGHT, "add_full", True),  # padded head dims
    (1, 4, 2, 5, 300, 80, 64, F16, TOP_LEFT, "bool_full", False),  # rows that see nothing
    (2, 4, 4, 2, 513, 96, 96, BF16, NONE, "add_heads", True),
    (1, 6, 3, 8, 129, 32, 32, F32, NONE, "bool_query_col", False),
    (1, 4, 2, 16, 700, 64, 64, F32, BOTTOM_RIGHT, "bool_full", False),
    (2, 4, 1, 25, 300, 128, 128, BF16, TOP_LEFT, "add_full", True),
    (1, 4, 2, 32, 700, 64, 64, F32, BOTTOM_RIGHT, "add_heads", False),  # the largest Sq of the path
    (1, 2, 1, 3, 2, 64, 64, F32, BOTTOM_RIGHT, "add_rows_f32", False),  # Sk < Sq: early rows see nothing
    # One (batch, kv head) pair: keys split over the threads, partial outputs merged.
    (1, 4, 1, 1, 1500, 64, 64, F32, NONE, "key_padding", False),  # all -inf in every split
    (1, 2, 1, 3, 1200, 128, 128, BF16, BOTTOM_RIGHT, "add_full", True),
    (2, 1, 1, 5, 900, 64, 32, F16, TOP_LEFT, None, False),  # top-left: later splits see nothing
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=case_id)
def test_attention_forward_few_queries(case, isa):
    B, Hq, Hkv, Sq, Sk, D, Dv, dtype, causal, mask_kind, transposed = case
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Sk, D, Dv, dtype, transposed)
    mask = make_mask(mask_kind, B, Hq, Sq, Sk, dtype)
    scale = D ** -0.5 * 1.3
    poison_allocator()
    out, lse, stats = ops.attn_fwd(q, k, v, mask, scale, *causal)
    leaves64 = [t.double() for t in (q, k, v)]
    mask64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    ref_out, ref_lse = reference.attention(*leaves64, mask64, scale, causal)
    base_out, base_lse = reference.attention(q, k, v, mask, scale, causal, upcast=False)
    assert out.dtype == dtype and out.shape == (B, Hq, Sq, Dv) and not torch.isnan(out).any()
    assert_within_baseline("out", out, ref_out, base_out)
    assert_lse_close(lse, ref_lse, base_lse.float())


def test_rows_without_keys_are_zero(isa):
    """Key-padding that hides every key of batch 0: zeros, lse = -inf, zero grads, no NaN."""
    q, k, v = make_qkv(2, 2, 2, 70, 90, 64, 64, F32, False)
    keep = torch.ones(2, 1, 1, 90, dtype=torch.bool)
    keep[0] = False
    mask = keep.expand(2, 2, 70, 90)
    out, lse, stats = ops.attn_fwd(q, k, v, mask, 0.125)
    dq, dk, dv, _ = ops.attn_bwd(torch.randn_like(out), q, k, v, out, stats, mask, 0.125, False)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    assert torch.isfinite(lse[1]).all() and not out[1].eq(0).all()
    for g in (dq, dk, dv):
        assert torch.equal(g[0], torch.zeros_like(g[0])) and not torch.isnan(g).any()


def test_backward_is_deterministic(isa):
    q, k, v = make_qkv(1, 4, 1, 300, 300, 64, 64, F32, False)  # GQA, key chunks split over threads
    out, lse, stats = ops.attn_fwd(q, k, v, None, 0.125, *reference.CAUSAL_TOP_LEFT)
    grad_out = torch.randn_like(out)
    first = ops.attn_bwd(grad_out, q, k, v, out, stats, None, 0.125, False, *reference.CAUSAL_TOP_LEFT)
    second = ops.attn_bwd(grad_out, q, k, v, out, stats, None, 0.125, False, *reference.CAUSAL_TOP_LEFT)
    for a, b in zip(first[:3], second[:3]):
        assert torch.equal(a, b)


def test_isa_variants_agree():
    """The variants differ only in rounding (all are checked against the reference above)."""
    if len(ISAS) < 2:
        pytest.skip("only one instruction-set variant runs here")
    q, k, v = make_qkv(1, 2, 2, 100, 130, 72, 72, F32, False)
    outs = []
    mp = pytest.MonkeyPatch()
    try:
        for name in ISAS:
            mp.setenv("FASTATTN_CPU_ISA", name)
            outs.append(ops.attn_fwd(q, k, v, None, 0.1, *reference.CAUSAL)[0])
    finally:
        mp.undo()
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-5)


def test_kernel_isa_names_the_variant_that_runs(isa):
    """Benchmarks record it next to their figures (fastattn.benchmark.report.environment)."""
    from fastattn import ops as fastattn_ops

    assert fastattn_ops._C.cpu_kernel_isa() == isa


# ---------------------------------------------------------------- fused softmax
# (B, H, R, C, dtype, causal, mask kind, transposed x)
SOFTMAX_CASES = [
    (2, 3, 17, 33, F32, NONE, None, False),
    (1, 2, 9, 5003, F32, NONE, "key_padding", True),
    (2, 2, 40, 40, BF16, TOP_LEFT, "bool_full", False),
    (1, 1, 5, 6001, F16, BOTTOM_RIGHT, "add_rows_f32", False),
    (1, 2, 64, 300, BF16, NONE, "add_full", True),
    (2, 1, 30, 20, F32, BOTTOM_RIGHT, "bool_query_col", False),  # causal rows that see nothing
]


def softmax_id(case):
    B, H, R, C, dtype, causal, mask, transposed = case
    return f"{B}x{H}x{R}x{C}-{str(dtype)[6:]}-c{causal}-{mask}{'-T' if transposed else ''}"


@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=softmax_id)
def test_softmax_forward_backward(case, isa):
    B, H, R, C, dtype, causal, mask_kind, transposed = case
    x = torch.randn(B, R, H, C, dtype=dtype).transpose(1, 2) if transposed else torch.randn(B, H, R, C, dtype=dtype)
    x = x * 3
    mask = make_mask(mask_kind, B, H, R, C, dtype)
    scale = 0.7
    poison_allocator()
    y = ops.softmax_fwd(x, mask, scale, *causal)
    ref = reference.softmax(x.double(), mask if mask is None or mask.dtype == torch.bool else mask.double(), scale, causal)
    assert y.dtype == dtype and y.shape == x.shape
    assert_within_baseline("y", y, ref, reference.softmax(x, mask, scale, causal))

    grad_y = torch.randn(B, R, H, C, dtype=dtype).transpose(1, 2)  # non-contiguous on purpose
    poison_allocator()
    gx = ops.softmax_bwd(grad_y, y)
    y64, g64 = y.double(), grad_y.double()
    ref_gx = y64 * (g64 - (g64 * y64).sum(-1, keepdim=True))
    y32, g32 = y.float(), grad_y.float()
    base_gx = (y32 * (g32 - (g32 * y32).sum(-1, keepdim=True))).to(dtype)
    assert gx.dtype == dtype
    assert_within_baseline("grad_x", gx, ref_gx, base_gx)


def test_softmax_fully_masked_rows_are_zero(isa):
    x = torch.randn(1, 1, 4, 2000)
    keep = torch.ones(1, 1, 4, 1, dtype=torch.bool)
    keep[0, 0, 1] = False
    y = ops.softmax_fwd(x, keep.expand(1, 1, 4, 2000), 1.0)
    assert torch.equal(y[0, 0, 1], torch.zeros(2000))
    torch.testing.assert_close(y.sum(-1)[0, 0, [0, 2, 3]], torch.ones(3))


# ---------------------------------------------------------------- raw input checks
def test_attention_rejects_bad_inputs():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, 16, F32, False)
    with pytest.raises(RuntimeError, match="q must be 4-d"):
        ops.attn_fwd(q[0], k, v, None, 1.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.attn_fwd(q, k.double(), v, None, 1.0)
    with pytest.raises(RuntimeError, match="softcap must be >= 0"):
        ops.attn_fwd(q, k, v, None, 1.0, softcap=-1.0)
    with pytest.raises(RuntimeError, match="mask must be expanded"):
        ops.attn_fwd(q, k, v, torch.ones(1, 1, 8, 8, dtype=torch.bool), 1.0)
    with pytest.raises(RuntimeError, match="head dim"):
        ops.attn_fwd(q, k[..., :8], v, None, 1.0)
    with pytest.raises(RuntimeError, match="dividing"):
        ops.attn_fwd(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16), None, 1.0)
    with pytest.raises(RuntimeError, match="contiguous last dim"):
        ops.attn_fwd(q.transpose(2, 3), k, v, None, 1.0)
    out, lse, stats = ops.attn_fwd(q, k, v, None, 1.0)
    with pytest.raises(RuntimeError, match="softmax_stats must be"):
        ops.attn_bwd(out, q, k, v, out, stats.double(), None, 1.0, False)


def test_softmax_rejects_bad_inputs():
    with pytest.raises(RuntimeError, match="x must be 4-d"):
        ops.softmax_fwd(torch.randn(3, 4), None, 1.0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ops.softmax_fwd(torch.randn(1, 1, 3, 4).double(), None, 1.0)
    with pytest.raises(RuntimeError, match="grad_y must have y's shape"):
        ops.softmax_bwd(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 5))


def test_eps_table_covers_kernel_dtypes():
    assert all(dt in EPS for dt in (F32, BF16, F16)) and math.isfinite(EPS[F32])


@pytest.mark.parametrize("isa", ISAS)
def test_fma_peak_loop_counts_its_flops(isa, monkeypatch):
    """The benchmark's ceiling: FLOPs are 2 per lane of 12 vector FMAs per iteration per thread."""
    from fastattn import ops

    monkeypatch.setenv("FASTATTN_CPU_ISA", isa)
    per_iteration = ops._C.cpu_fma_peak(1)
    lanes = per_iteration // (2 * 12 * torch.get_num_threads())
    assert per_iteration == 2 * 12 * lanes * torch.get_num_threads() and lanes in (8, 16)
    assert ops._C.cpu_fma_peak(1000) == 1000 * per_iteration
    with pytest.raises(RuntimeError, match="iterations must be >= 0"):
        ops._C.cpu_fma_peak(-1)


@pytest.mark.parametrize("isa", ISAS)
def test_tile_gemm_loop_counts_its_flops(isa, monkeypatch):
    """The GEMM ceiling: one 64 x 64 x 64 tile GEMM (2 * 64^3 FLOPs) per iteration per thread."""
    from fastattn import ops

    monkeypatch.setenv("FASTATTN_CPU_ISA", isa)
    assert ops._C.cpu_tile_gemm_peak(1) == 2 * 64**3 * torch.get_num_threads()
    assert ops._C.cpu_tile_gemm_peak(7) == 7 * ops._C.cpu_tile_gemm_peak(1)
    with pytest.raises(RuntimeError, match="iterations must be >= 0"):
        ops._C.cpu_tile_gemm_peak(-1)
