"""The capability table (fastattn/capabilities.py) against what the kernels really do: at
each backend's limits the kernels run, past them dispatch names the limit and the kernel
itself refuses, so the table and the kernels cannot drift apart."""
import pytest
import torch

import fastattn
from fastattn import dispatch
from fastattn.capabilities import CAPABILITIES

FUSED = [name for name in ("cpu", "triton") if dispatch.backends()[name]["usable"]]
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _qkv(d, dv, dtype, requires_grad=False):
    g = torch.Generator().manual_seed(d + dv)
    q, k = (torch.randn(1, 2, 3, d, generator=g).to(dtype).requires_grad_(requires_grad) for _ in range(2))
    return q, k, torch.randn(1, 2, 3, dv, generator=g).to(dtype).requires_grad_(requires_grad)


def _raw_forward(backend):
    return torch.ops.fastattn.triton_attn_fwd if backend == "triton" else torch.ops.fastattn.attn_fwd


@pytest.mark.parametrize("backend", FUSED)
def test_head_dim_limits_agree_with_the_kernels(backend):
    caps = CAPABILITIES[backend]
    limit, step = caps.max_head_dim_fwd, caps.head_dim_multiple
    q, k, v = _qkv(limit, limit, torch.float32)
    assert dispatch.attention_reason(backend, q, k, v, None, None) is None
    out = fastattn.attention(q, k, v, backend=backend)
    assert out.shape == (1, 2, 3, limit) and torch.isfinite(out).all()

    q, k, v = _qkv(limit + step, limit + step, torch.float32)
    assert f"up to {limit}" in dispatch.attention_reason(backend, q, k, v, None, None)
    with pytest.raises((RuntimeError, ValueError), match="head dim"):
        _raw_forward(backend)(q, k, v, None, 0.1, 0)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_dtypes_agree_with_dispatch(backend, dtype):
    caps = CAPABILITIES[backend]
    q, k, v = _qkv(8, 8, dtype)
    reason = dispatch.attention_reason(backend, q, k, v, None, None)
    assert (reason is None) == (dtype in caps.attention_dtypes), reason
    softmax_reason = dispatch.softmax_reason(backend, q, None)
    assert (softmax_reason is None) == (dtype in caps.softmax_dtypes), softmax_reason
    if reason is not None:
        with pytest.raises(ValueError, match=f"backend '{backend}' cannot run this call"):
            fastattn.attention(q, k, v, backend=backend)


def test_backward_limit_is_read_only_when_a_gradient_is_needed():
    caps = CAPABILITIES["cuda"] if "cuda" in CAPABILITIES else None
    if caps is None or caps.max_head_dim_bwd >= caps.max_head_dim_fwd:
        pytest.skip("needs a backend whose backward takes fewer head dims than its forward")
    d = caps.max_head_dim_fwd
    q, k, v = _qkv(d, d, caps.attention_dtypes[0], requires_grad=True)
    assert f"backward takes head dims up to {caps.max_head_dim_bwd}" in caps.attention_reason("cuda", q, v, need_grad=True)
    assert caps.attention_reason("cuda", q, v, need_grad=False) is None


def test_info_reports_every_table():
    reported = fastattn.info()["capabilities"]
    assert set(reported) == set(CAPABILITIES)
    for name, caps in CAPABILITIES.items():
        assert reported[name] == caps.as_dict()
        assert {"gqa", "mask", "causal", "lse", "backward"} <= set(reported[name]["features"])


def _kv_cache_op_registered(name):
    """Whether `name`'s KV-cache op exists here: the C++ op's kernel for the backend's dispatch
    key, or the Triton op (registered wherever Triton can run)."""
    if name in ("cpu", "cuda"):
        return torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::attn_fwd_kvcache", name.upper())
    return name == "triton" and torch._C._dispatch_has_kernel("fastattn::triton_attn_fwd_kvcache")


def test_kv_cache_feature_is_declared_where_the_op_exists():
    for name, caps in CAPABILITIES.items():
        if name == "triton" and fastattn.ops.TRITON_OPS is None:
            continue  # Triton's features are declared without importing triton; its ops are not here
        if name == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::attn_fwd", "CUDA"):
            continue  # every build declares the CUDA kernels' features; only CUDA builds register their ops
        declared = "kv_cache" in caps.features
        registered = _kv_cache_op_registered(name)
        assert declared == registered, f"{name}: kv_cache declared {declared}, op registered {registered}"
