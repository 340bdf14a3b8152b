"""Sliding windows and the logit softcap through the public functions, on every backend usable
on CPU tensors (every CPU instruction set), against the float64 reference with the rule of
docs/design.md: error <= 2 * error of the reference run in the input dtype + eps, for the
output, the log-sum-exp and every gradient."""
import math

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.info import info
from fastattn.capabilities import CAPABILITIES
from tolerance import assert_within_baseline

CPU_BACKENDS = [name for name in ("cpu", "triton", "reference") if fastattn.backends()[name]["usable"]]
FUSED_BACKENDS = [name for name in CPU_BACKENDS if name != "reference"]
ISAS = ("avx512", "avx2", "generic")


def _isa_runs(name):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTATTN_CPU_ISA", name)
        try:
            fastattn.attention(*(torch.randn(1, 1, 2, 8) for _ in range(3)), backend="cpu")
            return True
        except (RuntimeError, ValueError):
            return False


# Each backend, and the cpu backend once per instruction set this CPU runs.
VARIANTS = [("cpu", isa) for isa in ISAS if "cpu" in CPU_BACKENDS and _isa_runs(isa)]
VARIANTS += [(name, None) for name in CPU_BACKENDS if name != "cpu"]


@pytest.fixture(params=VARIANTS, ids=lambda v: v[0] + (f"-{v[1]}" if v[1] else ""))
def backend(request, monkeypatch):
    name, isa = request.param
    if isa:
        monkeypatch.setenv("FASTATTN_CPU_ISA", isa)
    return name


def _mask(kind, B, Hq, Sq, Sk, dtype):
    if kind == "padding":  # key padding: later keys of the second batch hidden
        lengths = torch.tensor([Sk, max(1, Sk // 2)][:B])
        return (torch.arange(Sk) < lengths.view(-1, 1)).view(B, 1, 1, Sk)
    if kind == "additive":
        return torch.randn(B, Hq, Sq, Sk, dtype=dtype)
    return None


def _run(backend, q, k, v, mask, causal, window, softcap):
    """Output, lse and gradients (q, k, v and a float mask) of fastattn.attention on `backend`
    and of the reference in float64 and in the inputs' dtype."""
    results = []
    for which in ("kernel", "ref", "base"):
        dtype = torch.float64 if which == "ref" else None
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
        m = mask
        if mask is not None and mask.is_floating_point():
            m = mask.detach().to(dtype or mask.dtype).requires_grad_()
            leaves.append(m)
        if which == "kernel":
            out, lse = fastattn.attention(*leaves[:3], attn_mask=m, causal=causal, window=window, softcap=softcap,
                                          return_lse=True, backend=backend)
        else:
            left, right = fastattn.ops.check_window(window)
            rule = reference.Window(left, 0 if causal else right)
            out, lse = reference.attention(*leaves[:3], m, None, rule, upcast=which == "ref", softcap=softcap or 0.0)
        results.append((out, lse, leaves))
    grad_out = torch.randn_like(results[0][0])
    grads = [torch.autograd.grad(out, leaves, grad_out.to(out.dtype)) for out, _, leaves in results]
    return results, grads


def _check(backend, q, k, v, mask=None, causal=False, window=None, softcap=None):
    (kernel, ref, base), grads = _run(backend, q, k, v, mask, causal, window, softcap)
    assert_within_baseline("out", kernel[0], ref[0], base[0])
    assert torch.equal(torch.isneginf(kernel[1]), torch.isneginf(ref[1])), "lse: -inf rows differ"
    finite = torch.isfinite(ref[1])
    assert_within_baseline("lse", kernel[1][finite], ref[1][finite], base[1][finite].float())
    for name, got, expected, baseline in zip(("dq", "dk", "dv", "dmask"), *grads):
        assert_within_baseline(name, got, expected, baseline)
    return kernel[0]


# (B, Hq, Hkv, Sq, Sk, D, dtype, mask kind, causal, window, softcap)
CASES = [
    (1, 2, 1, 100, 100, 32, torch.float32, None, True, (16, None), None),  # causal sliding window, GQA
    (2, 2, 2, 70, 150, 40, torch.float32, "padding", False, (20, 10), None),  # two-sided, Sq < Sk
    (1, 2, 1, 150, 60, 32, torch.float32, None, False, (5, 0), None),  # Sq > Sk: early rows see nothing
    (1, 4, 2, 80, 80, 64, torch.bfloat16, "additive", True, (0, None), None),  # each row sees one key
    (2, 2, 1, 64, 96, 32, torch.float32, None, False, (None, 7), None),  # bounded on the right only
    (1, 2, 2, 90, 90, 32, torch.float32, None, True, None, 2.5),  # softcap, causal
    (2, 2, 1, 50, 77, 48, torch.bfloat16, "additive", False, None, 1.0),  # softcap under an additive mask
    (1, 4, 2, 70, 120, 32, torch.float32, "padding", True, (30, None), 5.0),  # everything at once
    (1, 4, 1, 3, 200, 64, torch.float32, "padding", True, (40, None), 3.0),  # few queries (decode kernel)
    (2, 2, 2, 12, 90, 32, torch.bfloat16, None, False, (3, 2), None),  # few queries, some see nothing
    # Long enough that the CPU backward takes key blocks in groups, each seen by other query blocks.
    (1, 2, 1, 800, 800, 64, torch.float32, "padding", True, (100, None), 4.0),
]


def _case_id(case):
    B, Hq, Hkv, Sq, Sk, D, dtype, mask, causal, window, softcap = case
    return f"{Sq}x{Sk}-D{D}-{str(dtype)[6:]}-{mask}-causal{int(causal)}-w{window}-cap{softcap}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.interpreted_triton_keeps(case=[c for c in CASES if c[3] * c[4] < 70 * 120])
def test_window_and_softcap_against_reference(backend, case):
    B, Hq, Hkv, Sq, Sk, D, dtype, mask_kind, causal, window, softcap = case
    if backend == "triton" and dtype == torch.bfloat16 and Sq * Sk > 5000:
        pytest.skip("the Triton interpreter is slow: bfloat16 on the small cases only")
    torch.manual_seed(Sq * 1000 + Sk)
    q = torch.randn(B, Hq, Sq, D, dtype=dtype)
    k = torch.randn(B, Hkv, Sk, D, dtype=dtype) * 2  # large logits, so the cap matters
    v = torch.randn(B, Hkv, Sk, D, dtype=dtype)
    out = _check(backend, q, k, v, _mask(mask_kind, B, Hq, Sq, Sk, dtype), causal, window, softcap)
    if window is not None and case[3] > case[4]:
        assert (out[:, :, : Sq - Sk - window[0]] == 0).all(), "rows that see no key must be zeros"


@pytest.mark.parametrize("name", FUSED_BACKENDS)
@pytest.mark.parametrize("sq", [4, 64])  # few-query and block kernels
def test_keys_outside_the_window_are_never_read(name, sq):
    """Keys in blocks no query's window reaches hold NaN: a kernel that loaded them would
    multiply their values by P = 0 and return NaN."""
    torch.manual_seed(sq)
    sk, hidden = 1024, 896  # the window shows keys >= 1024 - sq - 32 > 896 to every query
    q = torch.randn(1, 2, sq, 32, requires_grad=True)
    k, v = (torch.randn(1, 1, sk, 32) for _ in range(2))
    k[:, :, :hidden] = float("nan")
    v[:, :, :hidden] = float("nan")
    k.requires_grad_(), v.requires_grad_()
    out = fastattn.attention(q, k, v, causal=True, window=(32, None), softcap=4.0, backend=name)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    ref = reference.attention(q.double(), k[:, :, hidden:].double(), v[:, :, hidden:].double(), None, None,
                              reference.Window(32, 0), softcap=4.0)[0]
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert torch.isfinite(dq).all()
    assert (dk[:, :, :hidden] == 0).all() and (dv[:, :, :hidden] == 0).all()


@pytest.mark.parametrize("window", [(3, 0), (None, 2), (0, 0), (5, 5)])
def test_softmax_window(backend, window):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 37, 150, requires_grad=True)
    mask = torch.rand(2, 1, 1, 150) > 0.2
    y = fastattn.softmax(x, mask=mask, scale=0.7, window=window, backend=backend)
    left, right = fastattn.ops.check_window(window)
    x64 = x.detach().double().requires_grad_()
    ref = reference.softmax(x64, mask, 0.7, reference.Window(left, right))
    base = reference.softmax(x.detach(), mask, 0.7, reference.Window(left, right), upcast=False)
    assert_within_baseline("y", y, ref, base)
    grad_y = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad_y)
    (gx64,) = torch.autograd.grad(ref, x64, grad_y.double())
    x32 = x.detach().requires_grad_()
    (gbase,) = torch.autograd.grad(reference.softmax(x32, mask, 0.7, reference.Window(left, right), upcast=False),
                                   x32, grad_y)
    assert_within_baseline("dx", gx, gx64, gbase)


def test_window_semantics():
    """The issue's rule, spelled out: query i sees key j iff i' - left <= j <= i' + right with
    i' = i + Sk - Sq; causal sets right = 0."""
    sq, sk = 5, 9
    seen = reference.window_visibility(sq, sk, reference.Window(2, 1), "cpu")
    for i in range(sq):
        for j in range(sk):
            assert bool(seen[i, j]) == (i + 4 - 2 <= j <= i + 4 + 1)
    q, k, v = torch.randn(1, 1, sq, 8), torch.randn(1, 1, sk, 8), torch.randn(1, 1, sk, 8)
    causal = fastattn.attention(q, k, v, causal=True, window=(2, 3))
    assert torch.equal(causal, fastattn.attention(q, k, v, window=(2, 0)))
    assert torch.equal(fastattn.attention(q, k, v, window=(-1, -5)), fastattn.attention(q, k, v))


def test_softcap_matches_tanh_of_scores():
    q, k, v = torch.randn(1, 2, 7, 16), torch.randn(1, 2, 9, 16) * 4, torch.randn(1, 2, 9, 16)
    scores = (q @ k.transpose(-1, -2)) * 0.25
    expected = torch.softmax(3.0 * torch.tanh(scores / 3.0), -1) @ v
    torch.testing.assert_close(fastattn.attention(q, k, v, scale=0.25, softcap=3.0), expected, atol=2e-6, rtol=1e-5)


def test_bad_window_and_softcap_name_the_argument():
    q = k = v = torch.randn(1, 1, 4, 8)
    for bad, error in (((1, 2, 3), TypeError), (5, TypeError), ((1.5, None), TypeError), ((True, 0), TypeError)):
        with pytest.raises(error, match="window"):
            fastattn.attention(q, k, v, window=bad)
    for bad, error in ((0.0, ValueError), (-2.0, ValueError), (math.inf, ValueError), ("3", TypeError)):
        with pytest.raises(error, match="softcap"):
            fastattn.attention(q, k, v, softcap=bad)
    with pytest.raises(ValueError, match="window"):
        fastattn.softmax(torch.randn(3, 4), window=(1, 1), dim=0)


def test_capability_table_lists_window_and_softcap():
    for name, caps in CAPABILITIES.items():
        assert {"window", "softcap"} <= caps.features, name
    listed = info()["capabilities"]
    assert all({"window", "softcap"} <= set(entry["features"]) for entry in listed.values())
