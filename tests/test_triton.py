"""Triton backend: kernels against the float64 reference (the tolerance rule of docs/design.md), op
registration, and compilation for real GPUs. Without a CUDA device the kernels run on CPU
tensors through the Triton interpreter (small shapes keep that quick)."""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():  # must happen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastattn.triton as ftriton  # noqa: E402
from fastattn import philox, reference  # noqa: E402
from fastattn.reference import CAUSAL, CAUSAL_TOP_LEFT, UNBOUNDED  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from tolerance import assert_within_baseline  # noqa: E402

pytestmark = pytest.mark.skipif(not ftriton.AVAILABLE, reason=str(ftriton.UNAVAILABLE_REASON))
TRITON_ONLY = True  # every test here runs Triton (tests/conftest.py)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ftriton.AVAILABLE:
    OPS = torch.ops.fastattn


def _qkv(B, Hq, Hkv, Sq, Sk, D, Dv, dtype, strided):
    """Random q, k, v; `strided` gives (B, S, H, D) storage seen through a transpose, as
    models pass them."""
    def make(H, S, d):
        if strided:
            return torch.randn(B, S, H, d, device=DEVICE, dtype=dtype).transpose(1, 2)
        return torch.randn(B, H, S, d, device=DEVICE, dtype=dtype)

    return make(Hq, Sq, D), make(Hkv, Sk, D), make(Hkv, Sk, Dv)


def _mask(kind, B, Hq, Sq, Sk, dtype):
    """A mask expanded to (B, Hq, Sq, Sk) as the ops receive it."""
    if kind is None:
        return None
    if kind == "bool":
        return torch.rand(B, Hq, Sq, Sk, device=DEVICE) > 0.3
    if kind == "additive":  # per-head broadcast over the batch, with a few hidden keys
        mask = torch.randn(1, Hq, Sq, Sk, device=DEVICE, dtype=dtype)
        mask[..., ::7] = float("-inf")
        return mask.expand(B, Hq, Sq, Sk)
    # key padding (B, 1, 1, Sk): batch 0 sees no key at all, the others a prefix that leaves
    # whole key blocks hidden
    lengths = torch.tensor([0] + [max(1, Sk // (b + 2)) for b in range(1, B)], device=DEVICE)
    visible = torch.arange(Sk, device=DEVICE)[None, :] < lengths[:, None]
    if kind == "padding_bool":
        return visible[:, None, None, :].expand(B, Hq, Sq, Sk)
    bias = torch.zeros(B, Sk, device=DEVICE, dtype=dtype).masked_fill(~visible, float("-inf"))
    return bias[:, None, None, :].expand(B, Hq, Sq, Sk)


# (B, Hq, Hkv, Sq, Sk, D, Dv, causal, mask kind, dtype, strided inputs)
ATTENTION_CASES = [
    (2, 4, 2, 113, 203, 40, 40, UNBOUNDED, None, torch.float32, True),
    (2, 2, 1, 113, 203, 80, 80, CAUSAL, "additive", torch.bfloat16, False),
    (1, 2, 2, 64, 64, 64, 64, CAUSAL_TOP_LEFT, "bool", torch.float32, False),
    (1, 2, 2, 1, 1, 64, 64, UNBOUNDED, None, torch.bfloat16, False),
    (3, 4, 2, 113, 203, 40, 40, UNBOUNDED, "padding_bool", torch.float32, True),
    (2, 2, 2, 113, 203, 64, 40, CAUSAL_TOP_LEFT, "padding_additive", torch.bfloat16, False),
    (1, 2, 1, 203, 113, 80, 64, CAUSAL, None, torch.float16, False),
]


def _case_id(case):
    B, Hq, Hkv, Sq, Sk, D, Dv, causal, kind, dtype, strided = case
    return f"{str(dtype)[6:]}-h{Hq}/{Hkv}-s{Sq}x{Sk}-d{D}x{Dv}-causal{causal}-{kind}{'-strided' if strided else ''}"


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=_case_id)
# The cases of 8 and 12 (batch, head) pairs take 10-14 s each interpreted: slow run only.
@pytest.mark.interpreted_triton_keeps(case=[c for c in ATTENTION_CASES if c[0] * c[1] <= 4])
def test_attention_forward_backward(case):
    B, Hq, Hkv, Sq, Sk, D, Dv, causal, kind, dtype, strided = case
    torch.manual_seed(sum(case[:7]))
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, Dv, dtype, strided)
    mask = _mask(kind, B, Hq, Sq, Sk, dtype)
    mask_grad = mask is not None and mask.is_floating_point()
    scale = D ** -0.5

    out, lse, stats = OPS.triton_attn_fwd(q, k, v, mask, scale, *causal)
    grad_out = torch.randn_like(out)
    dq, dk, dv, dmask = OPS.triton_attn_bwd(grad_out, q, k, v, out, stats, mask, scale, mask_grad, *causal)

    def run_reference(to_dtype):
        leaves = [t.detach().to(to_dtype).requires_grad_() for t in (q, k, v)]
        m = mask
        if mask_grad:  # gradient per element of the expanded mask, as the op returns it
            m = mask.detach().to(to_dtype).contiguous().requires_grad_()
            leaves.append(m)
        # upcast=False: the baseline of docs/design.md computes in the inputs' dtype (float64: the truth)
        o, l = reference.attention(*leaves[:3], m, scale, causal, upcast=False)
        o.backward(grad_out.to(to_dtype))
        return o, l, [t.grad for t in leaves]

    ref_out, ref_lse, ref_grads = run_reference(torch.float64)
    base_out, base_lse, base_grads = run_reference(dtype)
    assert_within_baseline("out", out, ref_out, base_out)
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, Sq)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "lse: -inf rows differ from the reference"
    finite = torch.isfinite(ref_lse)
    assert_within_baseline("lse", lse[finite], ref_lse[finite], base_lse[finite])
    for name, got in zip(("dq", "dk", "dv", "dmask"), (dq, dk, dv, dmask)):
        if name == "dmask" and not mask_grad:
            assert dmask.shape == (0,)
            continue
        ref, base = ref_grads[("dq", "dk", "dv", "dmask").index(name)], base_grads[("dq", "dk", "dv", "dmask").index(name)]
        assert got.is_contiguous(), f"{name} must be contiguous"
        assert_within_baseline(name, got, ref, base.to(got.dtype))
    empty_rows = torch.isneginf(ref_lse)
    if empty_rows.any():  # rows that see no key: zero output and zero dq, never NaN
        assert out[empty_rows].abs().max() == 0 and dq[empty_rows].abs().max() == 0


def test_key_padding_skips_hidden_blocks():
    """Key blocks hidden by a padding mask must not be read: NaN in them cannot leak into the
    results. Keys from 128 on are hidden, a multiple of every BLOCK_N used."""
    torch.manual_seed(0)
    q, k, v = _qkv(2, 2, 1, 40, 300, 32, 32, torch.float32, False)
    k[:, :, 128:] = float("nan")
    v[:, :, 128:] = float("nan")
    mask = (torch.arange(300, device=DEVICE) < 128)[None, None, None, :].expand(2, 2, 40, 300)
    out, lse, stats = OPS.triton_attn_fwd(q, k, v, mask, 0.2, *UNBOUNDED)
    ref_out, _ = reference.attention(q.double(), k[:, :, :128].double(), v[:, :, :128].double(), None, 0.2)
    assert (out.double() - ref_out).abs().max() < 1e-5
    dq, dk, dv, _ = OPS.triton_attn_bwd(torch.ones_like(out), q, k, v, out, stats, mask, 0.2, False, *UNBOUNDED)
    assert torch.isfinite(dq).all() and torch.isfinite(dk[:, :, :128]).all()
    assert dk[:, :, 128:].abs().max() == 0 and dv[:, :, 128:].abs().max() == 0


# (shape (B, H, R, C), mask kind, causal, scale, dtype, strided)
SOFTMAX_CASES = [
    ((2, 3, 17, 300), "padding_bool", UNBOUNDED, 1.0, torch.float32, False),  # rows > one block
    ((2, 2, 33, 77), "additive", CAUSAL, 0.3, torch.bfloat16, True),
    ((1, 2, 40, 24), "bool", CAUSAL_TOP_LEFT, 0.125, torch.float32, False),
    ((1, 1, 5, 129), None, UNBOUNDED, 2.0, torch.float16, False),
]


@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=lambda c: f"{c[0]}-{c[1]}-causal{c[2]}-{str(c[4])[6:]}")
def test_softmax_forward_backward(case):
    (B, H, R, C), kind, causal, scale, dtype, strided = case
    torch.manual_seed(R * C)
    if strided:
        x = torch.randn(B, R, H, C, device=DEVICE, dtype=dtype).transpose(1, 2)
    else:
        x = torch.randn(B, H, R, C, device=DEVICE, dtype=dtype)
    mask = _mask(kind, B, H, R, C, dtype)
    y = OPS.triton_softmax_fwd(x, mask, scale, *causal)
    assert_within_baseline("y", y, reference.softmax(x.double(), mask, scale, causal),
                           reference.softmax(x, mask, scale, causal))
    if kind == "padding_bool":  # batch 0 sees nothing: its rows are zeros
        assert y[0].abs().max() == 0

    grad_y = torch.randn(B, H, R, C, device=DEVICE, dtype=dtype)
    dz = OPS.triton_softmax_bwd(grad_y, y)

    def grad_of_logits(to_dtype):  # d loss / d (scale * x + mask) through plain autograd
        z = (x.to(to_dtype) * scale).detach().requires_grad_()
        reference.softmax(z, mask, 1.0, causal).backward(grad_y.to(to_dtype))
        return z.grad

    assert_within_baseline("dz", dz, grad_of_logits(torch.float64), grad_of_logits(dtype))


def test_empty_and_degenerate_shapes():
    q, k, v = _qkv(1, 2, 1, 5, 0, 16, 16, torch.float32, False)
    out, lse, stats = OPS.triton_attn_fwd(q, k, v, None, 0.25, *UNBOUNDED)
    assert out.abs().max() == 0 and torch.isneginf(lse).all()
    q, k, v = _qkv(1, 2, 1, 0, 7, 16, 16, torch.float32, False)
    out, lse, stats = OPS.triton_attn_fwd(q, k, v, None, 0.25, *UNBOUNDED)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)


def test_argument_errors_name_the_argument():
    q, k, v = _qkv(1, 2, 1, 8, 8, 16, 16, torch.float32, False)
    with pytest.raises(ValueError, match="mask"):
        OPS.triton_attn_fwd(q, k, v, torch.ones(1, 2, 8, 9, dtype=torch.bool, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="softcap"):
        OPS.triton_attn_fwd(q, k, v, None, 1.0, softcap=-1.0)
    with pytest.raises(TypeError, match="k must have dtype"):
        OPS.triton_attn_fwd(q, k.half(), v, None, 1.0)
    with pytest.raises(ValueError, match="head dims"):
        OPS.triton_attn_fwd(*_qkv(1, 1, 1, 2, 2, 320, 320, torch.float32, False), None, 1.0)
    with pytest.raises(ValueError, match="rng_state must be given when dropout_p > 0"):
        OPS.triton_attn_fwd(q, k, v, None, 1.0, dropout_p=0.1)
    with pytest.raises(ValueError, match="rng_state must be an int64"):
        OPS.triton_attn_fwd(q, k, v, None, 1.0, dropout_p=0.1, rng_state=torch.zeros(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="dropout_p must be in"):
        OPS.triton_attn_fwd(q, k, v, None, 1.0, dropout_p=-0.5, rng_state=torch.zeros(2, dtype=torch.int64, device=DEVICE))


def test_dropout_backward_keep_pattern_is_philox_bit_for_bit():
    """The dK/dV kernel's decisions (transposed tiles): with q = 0, v = identity and grad_out row
    i = e_i, dV[j, i] is the dropped probability of (i, j), nonzero exactly where
    fastattn.philox.keep_mask keeps it. (The forward's and dQ's decisions: tests/test_dropout.py.)"""
    B, H, Sq, Sk, p = 2, 3, 27, 40, 0.3
    q = torch.zeros(B, H, Sq, 16, device=DEVICE)
    k = torch.randn(B, H, Sk, 16, device=DEVICE)
    v = torch.eye(Sk, device=DEVICE).expand(B, H, Sk, Sk)
    grad_out = torch.eye(Sq, Sk, device=DEVICE).expand(B, H, Sq, Sk)
    state = torch.tensor([31337, 2**32 - 1], device=DEVICE)
    out, _, stats = OPS.triton_attn_fwd(q, k, v, None, 0.1, dropout_p=p, rng_state=state)
    _, _, dv, _ = OPS.triton_attn_bwd(grad_out, q, k, v, out, stats, None, 0.1, False, dropout_p=p, rng_state=state)
    assert torch.equal(dv[..., :Sq].transpose(-2, -1) != 0, philox.keep_mask(state, (B, H, Sq, Sk), p))


def test_autotune_keys_name_kernel_arguments():
    """On a GPU the kernels are wrapped in autotuners keyed by these names; a key that is not
    an argument of its kernel makes Triton refuse to build the backend (the interpreter, which
    runs the kernels untuned here, would not notice)."""
    from fastattn.triton import configs, kernels

    for kernel in (kernels._attn_fwd_kernel, kernels._attn_bwd_dkdv_kernel, kernels._attn_bwd_dq_kernel):
        assert set(configs.ATTN_KEY) <= set(kernel.arg_names), set(configs.ATTN_KEY) - set(kernel.arg_names)
    for kernel in (kernels._softmax_fwd_kernel, kernels._softmax_bwd_kernel):
        assert set(configs.SOFTMAX_KEY) <= set(kernel.arg_names), set(configs.SOFTMAX_KEY) - set(kernel.arg_names)


def test_supports():
    q, k, v = _qkv(1, 2, 1, 4, 4, 64, 64, torch.bfloat16, False)
    assert ftriton.supports(q, k, v, None) is None
    assert "mask" in ftriton.supports(q, k, v, torch.zeros(1, 2, 4, 4, dtype=torch.int32, device=DEVICE))
    assert ftriton.supports_softmax(q, None) is None


def test_opcheck_all_ops():
    torch.manual_seed(0)
    q, k, v = _qkv(1, 2, 1, 20, 36, 16, 24, torch.float32, True)
    mask = _mask("additive", 1, 2, 20, 36, torch.float32)
    out, lse, stats = OPS.triton_attn_fwd(q, k, v, mask, 0.3, *CAUSAL)
    torch.library.opcheck(OPS.triton_attn_fwd.default, (q, k, v, mask, 0.3, *CAUSAL))
    torch.library.opcheck(OPS.triton_attn_bwd.default,
                          (torch.randn_like(out), q, k, v, out, stats, mask, 0.3, True, 7, 0, False, 2.5))
    x = torch.randn(1, 2, 6, 36, device=DEVICE)
    torch.library.opcheck(OPS.triton_softmax_fwd.default, (x, mask[..., :6, :] > 0, 0.5, *CAUSAL_TOP_LEFT))
    torch.library.opcheck(OPS.triton_softmax_bwd.default, (torch.randn_like(x), torch.softmax(x, -1)))


def _run_python(code, **env):
    full_env = {**os.environ, "PYTHONPATH": ROOT, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=ROOT)


@pytest.mark.skipif(not any(f.startswith("_C") for f in os.listdir(os.path.join(ROOT, "fastattn"))),
                    reason="fastattn._C is not built")
@pytest.mark.parametrize("triton_first", [True, False])
def test_registers_beside_the_compiled_library_in_either_order(triton_first):
    # A stub parent package lets the two modules load in a chosen order without fastattn/__init__.
    imports = ["import fastattn.triton", "import fastattn._C"]
    code = "\n".join([
        "import sys, types, torch",
        f"pkg = types.ModuleType('fastattn'); pkg.__path__ = [{os.path.join(ROOT, 'fastattn')!r}]",
        "sys.modules['fastattn'] = pkg",
        *(imports if triton_first else imports[::-1]),
        "for name in ('attn_fwd', 'triton_attn_fwd', 'triton_attn_bwd', 'triton_softmax_fwd', 'triton_softmax_bwd'):",
        "    getattr(torch.ops.fastattn, name).default",
        "print('ok')",
    ])
    result = _run_python(code, TRITON_INTERPRET="1")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.slow  # about 15 s
def test_kernels_compile_for_gpus():
    """Every kernel compiles to a cubin for sm_90 (Triton's bundled ptxas, no GPU needed)
    within the GPU's shared memory and without register spills."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=ROOT, TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-m", "fastattn.triton.compile_check", "--quick", "--arch", "90"],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
