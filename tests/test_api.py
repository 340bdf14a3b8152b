"""The public functions on every backend usable on CPU tensors: SDPA parity, semantics,
masks, gradients, dispatch and errors."""
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference
from fastattn.capabilities import CAPABILITIES
from tolerance import assert_within_baseline

CPU_BACKENDS = [name for name in ("cpu", "triton", "reference") if fastattn.backends()[name]["usable"]]


def rand(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


def check_against_reference(backend, q, k, v, mask=None, causal=False, scale=None, check_grad=True):
    """Runs fastattn.attention on `backend` and the float64 / same-dtype references, and
    applies the tolerance rule to the output and every input gradient."""
    inputs = [t.detach().clone().requires_grad_(check_grad) for t in (q, k, v)]
    if mask is not None and mask.is_floating_point():
        inputs.append(mask.detach().clone().requires_grad_(check_grad))
        mask_arg = inputs[-1]
    else:
        mask_arg = mask
    out = fastattn.attention(*inputs[:3], attn_mask=mask_arg, causal=causal, scale=scale, backend=backend)
    code = reference.CAUSAL if causal else reference.UNBOUNDED
    ref_inputs = [t.detach().double().requires_grad_(check_grad) for t in inputs]
    ref_mask = ref_inputs[3] if len(ref_inputs) > 3 else mask
    ref, _ = reference.attention(*ref_inputs[:3], ref_mask, scale, code)
    base_inputs = [t.detach().clone().requires_grad_(check_grad) for t in inputs]
    base_mask = base_inputs[3] if len(base_inputs) > 3 else mask
    base, _ = reference.attention(*base_inputs[:3], base_mask, scale, code, upcast=False)
    assert_within_baseline("out", out, ref, base)
    if not check_grad:
        return
    grad_out = torch.randn_like(out)
    names = ["dq", "dk", "dv", "dmask"][: len(inputs)]
    for name, g, g_ref, g_base in zip(
        names,
        _grads(out, inputs, grad_out),
        _grads(ref, ref_inputs, grad_out.double()),
        _grads(base, base_inputs, grad_out),
    ):
        assert_within_baseline(name, g, g_ref, g_base)


# ----------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "B,Hq,Hkv,Sq,Sk,D",
    [(2, 2, 2, 1, 1, 32), (1, 2, 1, 1, 57, 40), (2, 4, 2, 37, 61, 64), (1, 2, 2, 64, 64, 80)],
)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_reference(backend, B, Hq, Hkv, Sq, Sk, D, causal):
    check_against_reference(backend, rand(B, Hq, Sq, D), rand(B, Hkv, Sk, D), rand(B, Hkv, Sk, D), causal=causal)


MASK_SHAPES = [(1, 1, 1, "Sk"), ("B", 1, 1, "Sk"), ("B", "H", "Sq", "Sk"), (1, "H", "Sq", "Sk"), ("Sq", "Sk"), ("Sk",)]


def _mask_shape(spec, B, H, Sq, Sk):
    sizes = {"B": B, "H": H, "Sq": Sq, "Sk": Sk}
    return tuple(sizes.get(s, s) for s in spec)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("spec", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks_of_every_broadcast_shape(backend, spec, kind):
    B, H, Sq, Sk, D = 2, 2, 19, 45, 32
    shape = _mask_shape(spec, B, H, Sq, Sk)
    if kind == "bool":
        mask = torch.rand(shape) > 0.3
    else:
        mask = torch.randn(shape) * 2
    check_against_reference(backend, rand(B, H, Sq, D), rand(B, H, Sk, D), rand(B, H, Sk, D), mask=mask)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_key_padding_with_fully_masked_rows_gives_zeros(backend):
    B, H, Sq, Sk, D = 3, 2, 24, 40, 32
    lengths = torch.tensor([40, 13, 0])  # the last sequence has no key at all
    key_padding = (torch.arange(Sk) < lengths[:, None]).view(B, 1, 1, Sk)
    q, k, v = (rand(B, H, s, D, requires_grad=True) for s in (Sq, Sk, Sk))
    out, lse = fastattn.attention(q, k, v, attn_mask=key_padding, return_lse=True, backend=backend)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.isneginf(lse[2]).all() and torch.isfinite(lse[:2]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[2], torch.zeros_like(q.grad[2]))
    check_against_reference(backend, q, k, v, mask=key_padding)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_causal_alignment_bottom_right_and_top_left(backend):
    B, H, Sq, Sk, D = 1, 2, 5, 9, 32
    q, k, v = rand(B, H, Sq, D), rand(B, H, Sk, D), rand(B, H, Sk, D)
    bottom_right = torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)
    top_left = torch.ones(Sq, Sk, dtype=torch.bool).tril()
    torch.testing.assert_close(
        fastattn.attention(q, k, v, causal=True, backend=backend),
        fastattn.attention(q, k, v, attn_mask=bottom_right, backend=backend),
    )
    with fastattn.use_backend(backend):
        torch.testing.assert_close(
            fastattn.scaled_dot_product_attention(q, k, v, is_causal=True),
            F.scaled_dot_product_attention(q, k, v, attn_mask=top_left),
        )
    # More queries than keys: the first Sq - Sk rows see nothing under bottom-right alignment.
    out = fastattn.attention(k, q, q, causal=True, backend=backend)
    assert torch.equal(out[:, :, : Sk - Sq], torch.zeros_like(out[:, :, : Sk - Sq]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lse_matches_logsumexp_and_its_gradient(backend):
    q, k, v = rand(2, 2, 17, 32), rand(2, 2, 23, 32), rand(2, 2, 23, 32)
    out, lse = fastattn.attention(q, k, v, return_lse=True, scale=0.3, backend=backend)
    expected = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) * 0.3, dim=-1)
    torch.testing.assert_close(lse.double(), expected, atol=1e-4, rtol=1e-5)
    inputs = [t.clone().requires_grad_() for t in (q, k)]
    _, lse = fastattn.attention(*inputs, v, return_lse=True, scale=0.3, backend=backend)
    weights = torch.randn_like(lse)
    got = torch.autograd.grad((lse * weights).sum(), inputs)
    ref_inputs = [t.double().requires_grad_() for t in (q, k)]
    ref = torch.logsumexp(ref_inputs[0] @ ref_inputs[1].transpose(-1, -2) * 0.3, dim=-1)
    expected = torch.autograd.grad((ref * weights.double()).sum(), ref_inputs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_transposed_views_from_a_model(backend):
    B, S, H, D = 2, 21, 4, 32
    qkv = rand(B, S, 3, H, D)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D) views
    assert not q.is_contiguous()
    check_against_reference(backend, q, k, v, causal=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    mask = torch.rand(2, 1, 1, 50) > 0.2
    check_against_reference(
        backend, rand(2, 4, 33, 64, dtype=dtype), rand(2, 2, 50, 64, dtype=dtype), rand(2, 2, 50, 64, dtype=dtype),
        mask=mask,
    )


# ----------------------------------------------------------------------------- SDPA drop-in


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask", "float_mask", "scale", "gqa", "3d"])
def test_sdpa_drop_in_matches_torch(backend, case):
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 4, 29, 29, 40
    kwargs = {}
    if case == "causal":
        kwargs["is_causal"] = True
    elif case == "bool_mask":
        kwargs["attn_mask"] = torch.rand(Sq, Sk) > 0.1
    elif case == "float_mask":
        kwargs["attn_mask"] = torch.randn(B, 1, Sq, Sk)
    elif case == "scale":
        kwargs["scale"] = 0.05
    elif case == "gqa":
        Hkv, kwargs["enable_gqa"] = 2, True
    q, k, v = rand(B, Hq, Sq, D), rand(B, Hkv, Sk, D), rand(B, Hkv, Sk, D)
    if case == "3d":
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    with fastattn.use_backend(backend):
        out = fastattn.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **kwargs), atol=2e-5, rtol=1e-4)


DROPOUT_BACKENDS = [name for name in CPU_BACKENDS if "dropout" in CAPABILITIES[name].features]


def test_sdpa_dropout_scales_kept_values():
    torch.manual_seed(0)
    q, k = rand(1, 1, 64, 16), rand(1, 1, 64, 16)
    v = torch.ones(1, 1, 64, 16)
    for forced in (None, *DROPOUT_BACKENDS):  # automatic, and each backend with fused dropout forced
        with fastattn.use_backend(forced) if forced else contextlib.nullcontext():
            out = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        # each output is (sum of kept probabilities) / (1 - p): not all equal to 1, mean near 1
        assert not torch.allclose(out, torch.ones_like(out))
        assert abs(out.mean().item() - 1.0) < 0.2


# ----------------------------------------------------------------------------- softmax


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cols", [1, 7, 300, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_matches_reference(backend, cols, dtype):
    x = rand(2, 3, 4, cols, dtype=dtype, requires_grad=True)
    mask = torch.rand(2, 1, 1, cols) > 0.3
    y = fastattn.softmax(x, mask=mask, scale=0.7, backend=backend)
    x64 = x.detach().double().requires_grad_()
    ref = reference.softmax(x64, mask, 0.7)
    x_base = x.detach().clone().requires_grad_()
    base = reference.softmax(x_base, mask, 0.7, upcast=False)
    assert_within_baseline("softmax", y, ref, base)
    grad_y = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, x, grad_y)
    (g_ref,) = torch.autograd.grad(ref, x64, grad_y.double())
    (g_base,) = torch.autograd.grad(base, x_base, grad_y)
    assert_within_baseline("softmax dx", g, g_ref, g_base)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softmax_causal_additive_mask_grad_and_dim(backend):
    x = rand(3, 6, 9, requires_grad=True)
    bias = rand(6, 9, requires_grad=True)
    y = fastattn.softmax(x, mask=bias, causal=True, backend=backend)
    x64, bias64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    ref = reference.softmax(x64, bias64, 1.0, reference.CAUSAL)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    grad_y = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, bias), grad_y)
    expected = torch.autograd.grad(ref, (x64, bias64), grad_y.double())
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, atol=1e-5, rtol=1e-5)
    # softmax along a middle dim equals moving that dim last
    torch.testing.assert_close(
        fastattn.softmax(x, dim=1, backend=backend), torch.softmax(x, dim=1), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softmax_fully_masked_rows_are_zero(backend):
    x = rand(2, 5, 8, requires_grad=True)
    mask = torch.ones(2, 5, 8, dtype=torch.bool)
    mask[1, 2] = False
    y = fastattn.softmax(x, mask=mask, backend=backend)
    assert torch.equal(y[1, 2], torch.zeros(8))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------- dispatch


def test_backends_report_reasons():
    status = fastattn.backends()
    assert set(status) == set(fastattn.BACKENDS)
    assert status["reference"]["usable"]
    for name, entry in status.items():
        assert entry["usable"] == (entry["reason"] is None), name
    if not torch.cuda.is_available():
        assert not status["cuda"]["usable"] and status["cuda"]["reason"]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_cpu_only_import_leaves_triton_unimported_and_says_so():
    """Where the Triton kernels cannot run (no CUDA device, no TRITON_INTERPRET), importing
    fastattn does not load triton or inductor, and info() still reports both truthfully."""
    code = (
        "import json, sys, fastattn\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] == 'triton' or m.startswith('torch._inductor')]\n"
        "print(json.dumps({'loaded': loaded, 'info': fastattn.info()}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["loaded"] == []
    assert report["info"]["triton"] == importlib.metadata.version("triton")
    triton_status = report["info"]["backends"]["triton"]
    assert not triton_status["usable"] and "TRITON_INTERPRET=1" in triton_status["reason"]


def test_forced_backend_that_cannot_run_raises():
    q = rand(1, 1, 4, 8)
    with pytest.raises(ValueError, match="backend 'cuda' cannot run this call"):
        fastattn.attention(q, q, q, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastattn.attention(q, q, q, backend="gpu")


def test_environment_variable_forces_backend(monkeypatch):
    q = rand(1, 1, 4, 8)
    monkeypatch.setenv("FASTATTN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend 'cuda' cannot run this call"):
        fastattn.attention(q, q, q)
    monkeypatch.setenv("FASTATTN_BACKEND", "reference")
    torch.testing.assert_close(fastattn.attention(q, q, q), reference.attention(q, q, q)[0])


@pytest.mark.skipif(not fastattn.backends()["cpu"]["usable"], reason="fastattn._C (CPU kernels) is not built")
def test_cpu_tensors_dispatch_to_the_cpu_kernel_by_default(monkeypatch):
    calls = []
    monkeypatch.setattr(reference, "attention", lambda *a, **k: calls.append(a))
    q = rand(1, 2, 8, 32)
    assert fastattn.attention(q, q, q).shape == q.shape
    assert calls == []  # the reference never ran


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: (rand(2, 8, 4), rand(2, 8, 4), rand(2, 8, 4), None), ValueError, "query must be 4-d"),
        (lambda: (rand(1, 2, 8, 4), rand(2, 2, 8, 4), rand(2, 2, 8, 4), None), ValueError, "batch size 1"),
        (lambda: (rand(1, 2, 8, 4), rand(1, 2, 8, 5), rand(1, 2, 8, 4), None), ValueError, "head_dim 4"),
        (lambda: (rand(1, 2, 8, 4), rand(1, 2, 9, 4), rand(1, 2, 8, 4), None), ValueError, "agree in heads and sequence"),
        (lambda: (rand(1, 3, 8, 4), rand(1, 2, 8, 4), rand(1, 2, 8, 4), None), ValueError, "multiple of key/value heads"),
        (lambda: (rand(1, 2, 8, 4), rand(1, 2, 8, 4, dtype=torch.float16), rand(1, 2, 8, 4), None), TypeError, "share a dtype"),
        (lambda: (rand(1, 2, 8, 4), rand(1, 2, 8, 4), rand(1, 2, 8, 4), torch.ones(3, 8, dtype=torch.bool)), ValueError, "does not broadcast to"),
        (lambda: (rand(1, 2, 8, 4), rand(1, 2, 8, 4), rand(1, 2, 8, 4), torch.ones(1, 8, dtype=torch.int64)), TypeError, "attn_mask must be bool"),
        (lambda: (torch.ones(1, 2, 8, 4, dtype=torch.int32),) * 3 + (None,), TypeError, "query must be float16"),
        (lambda: ([1.0], rand(1, 2, 8, 4), rand(1, 2, 8, 4), None), TypeError, "query must be a torch.Tensor"),
    ],
)
def test_bad_input_names_the_argument(make, error, message):
    q, k, v, mask = make()
    with pytest.raises(error, match=message):
        fastattn.attention(q, k, v, attn_mask=mask)


def test_sdpa_gqa_needs_enable_gqa_and_dropout_range():
    q, kv = rand(1, 4, 8, 16), rand(1, 2, 8, 16)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        fastattn.scaled_dot_product_attention(q, kv, kv)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        fastattn.scaled_dot_product_attention(q, q, q, dropout_p=1.5)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda q: fastattn.attention(q, q, q, scale="a"), TypeError, r"scale must be a float or None .*got str 'a'"),
        (lambda q: fastattn.attention(q, q, q, causal="yes"), TypeError, "causal must be True or False, got str"),
        (lambda q: fastattn.attention(q, q, q, return_lse=1), TypeError, "return_lse must be True or False, got int 1"),
        (lambda q: fastattn.scaled_dot_product_attention(q, q, q, scale=torch.tensor(0.1)), TypeError,
         "scale must be a float or None .*got Tensor"),
        (lambda q: fastattn.scaled_dot_product_attention(q, q, q, dropout_p="0.1"), TypeError,
         r"dropout_p must be a float in \[0, 1\], got str '0.1'"),
        (lambda q: fastattn.scaled_dot_product_attention(q, q, q, dropout_p=True), TypeError,
         "dropout_p must be a float"),
        (lambda q: fastattn.scaled_dot_product_attention(q, q, q, is_causal=None), TypeError,
         "is_causal must be True or False, got NoneType"),
        (lambda q: fastattn.scaled_dot_product_attention(q, q, q, enable_gqa="no"), TypeError,
         "enable_gqa must be True or False"),
        (lambda q: fastattn.softmax(q, scale=None), TypeError, "scale must be a float, got NoneType None"),
        (lambda q: fastattn.softmax(q, causal=1), TypeError, "causal must be True or False, got int 1"),
        (lambda q: fastattn.softmax(q, dim=1.0), TypeError, "dim must be an int, got float 1.0"),
        (lambda q: fastattn.softmax(q, dim=4), IndexError, r"dim must be in \[-4, 3\] .* got 4"),
    ],
)
def test_bad_scalar_arguments_name_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call(rand(1, 2, 8, 4))


def test_scalar_arguments_take_any_real_number():
    q = rand(1, 2, 8, 4)
    expected = fastattn.attention(q, q, q, scale=2.0)
    torch.testing.assert_close(fastattn.attention(q, q, q, scale=2), expected)  # an int scale
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, q, q, scale=2, dropout_p=0), expected)


def test_softmax_errors():
    with pytest.raises(TypeError, match="x must be floating point"):
        fastattn.softmax(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="mask of shape"):
        fastattn.softmax(rand(2, 5), mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal=True needs"):
        fastattn.softmax(rand(2, 5), causal=True, dim=0)
