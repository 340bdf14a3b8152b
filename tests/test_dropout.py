"""Fused attention dropout on every backend that has it (capability "dropout"): the keep
decisions equal fastattn/philox.py's bit for bit, outputs and gradients follow the float64
reference under the same rng_state (docs/design.md's rule), and the rng state behaves: seeded
runs repeat, consecutive calls differ, checkpointing recomputes the same mask, torch.compile
traces the call whole.

Backends: each CPU instruction-set variant this machine runs (FASTATTN_CPU_ISA), the
reference, and Triton where it runs CPU tensors (interpreted, TRITON_INTERPRET=1, which
conftest.py sets without a GPU); the CUDA kernels' dropout is tested in test_cuda_kernels.py
and test_gpu_api.py."""
import os

import pytest
import torch
import torch.utils.checkpoint

import fastattn
from fastattn import dispatch, ops, philox, reference
from fastattn.capabilities import CAPABILITIES
from tolerance import assert_within_baseline

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


def _has_dropout(name):
    return fastattn.backends()[name]["usable"] and "dropout" in CAPABILITIES[name].features


def _takes_cpu_tensors(name):
    """The tests below pass CPU tensors, which Triton runs only interpreted."""
    return name != "triton" or os.environ.get("TRITON_INTERPRET") == "1"


CPU_BUILT = fastattn.backends()["cpu"]["usable"]
if CPU_BUILT:  # test_cpu_kernels skips itself (and whoever imports it) where fastattn._C is missing
    from test_cpu_kernels import ISAS
else:
    ISAS = []
needs_cpu = pytest.mark.skipif(not CPU_BUILT, reason="fastattn._C (CPU kernels) is not built")

# (backend, FASTATTN_CPU_ISA or None): the kernels with dropout, then every backend (the
# comparisons with the reference run over the first, the rest over both).
FUSED = [("cpu", isa) for isa in ISAS if _has_dropout("cpu")]
FUSED += [("triton", None)] if _has_dropout("triton") and _takes_cpu_tensors("triton") else []
BACKENDS = FUSED + [("reference", None)]


def _use(request, monkeypatch):
    name, isa = request.param
    if isa is not None:
        monkeypatch.setenv("FASTATTN_CPU_ISA", isa)
    return name


def _label(backend):
    return backend[0] if backend[1] is None else f"{backend[0]}-{backend[1]}"


@pytest.fixture(params=BACKENDS, ids=_label)
def backend(request, monkeypatch):
    return _use(request, monkeypatch)


@pytest.fixture(params=FUSED, ids=_label)
def fused_backend(request, monkeypatch):
    return _use(request, monkeypatch)


def _rng_state_after(seed):
    """The rng_state a dropout call draws first after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return philox.draw_rng_state(torch.device("cpu"))


def _visible(Sq, Sk, window):
    return reference.window_visibility(Sq, Sk, window, "cpu")


# ----------------------------------------------------------------------------- keep decisions


@pytest.mark.parametrize("Sq, Sk", [(37, 40), (5, 40), (1, 9), (130, 67)])  # tiles and the few-query kernel
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.interpreted_triton_keeps(Sq=[37, 1])
def test_keep_pattern_is_philox_bit_for_bit(backend, Sq, Sk, causal, p):
    """q = 0 and v = identity: out row i is the dropped probability row, 1 / (n (1 - p)) where
    kept (n: the keys row i sees) and exactly 0 where dropped."""
    B, Hq, Hkv = 2, 4, 2
    q = torch.zeros(B, Hq, Sq, 16)
    k = torch.randn(B, Hkv, Sk, 16)
    v = torch.eye(Sk).expand(B, Hkv, Sk, Sk)
    window = reference.CAUSAL if causal else reference.UNBOUNDED
    torch.manual_seed(3)
    out = fastattn.attention(q, k, v, causal=causal, dropout_p=p, backend=backend)
    state = _rng_state_after(3)
    visible = _visible(Sq, Sk, window)
    kept = philox.keep_mask(state, (B, Hq, Sq, Sk), p) & visible
    assert torch.equal(out != 0, kept)
    seen = visible.sum(-1, keepdim=True).clamp(min=1).expand(B, Hq, Sq, Sk)
    torch.testing.assert_close(out[kept], (1.0 / (seen * (1 - p)))[kept].float(), rtol=1e-6, atol=0)


def test_packed_keep_pattern_numbers_each_sequence_as_a_batch(backend):
    """varlen: sequence b decides as batch b, its queries and keys numbered from 0."""
    lengths_q, lengths_k, Hq, p = [3, 40, 0, 17], [9, 21, 4, 33], 2, 0.3
    cu_q = torch.tensor([0] + lengths_q).cumsum(0).int()
    cu_k = torch.tensor([0] + lengths_k).cumsum(0).int()
    Dv = max(lengths_k)
    q = torch.zeros(int(cu_q[-1]), Hq, 8)
    k = torch.randn(int(cu_k[-1]), 1, 8)
    v = torch.cat([torch.eye(n, Dv) for n in lengths_k]).unsqueeze(1)  # one-hot of the key's position
    torch.manual_seed(4)
    out = fastattn.varlen_attention(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), dropout_p=p,
                                    backend=backend)
    state = _rng_state_after(4)
    for b, (n_q, n_k) in enumerate(zip(lengths_q, lengths_k)):
        rows = out[int(cu_q[b]):int(cu_q[b + 1])].transpose(0, 1)  # (Hq, n_q, Dv)
        keep = philox.keep_mask(state, (1, Hq, n_q, n_k), p, first_batch=b)[0]
        assert torch.equal(rows[..., :n_k] != 0, keep), f"sequence {b}"
        assert not rows[..., n_k:].any()


# ----------------------------------------------------------------------------- against the reference

CASES = {  # B, Hq, Hkv, Sq, Sk, D, Dv, attention() options
    "gqa": (2, 4, 2, 33, 33, 32, 32, {}),
    "causal_sq_ne_sk": (1, 2, 1, 45, 70, 40, 24, {"causal": True}),
    "window": (1, 2, 2, 80, 80, 32, 32, {"window": (7, 3)}),
    "bool_mask": (2, 2, 1, 19, 50, 24, 40, {"attn_mask": "bool"}),
    "float_mask_softcap": (1, 3, 3, 64, 65, 16, 16, {"attn_mask": "float", "softcap": 5.0}),
    "few_queries": (2, 4, 1, 3, 97, 32, 32, {}),
    # Long enough that the CPU backward takes key blocks in groups (too slow for interpreted Triton).
    "long_window": (1, 2, 1, 720, 720, 64, 64, {"window": (100, 30)}),
}


def _options(options, B, Hq, Sq, Sk, dtype):
    """The options with the mask made: bool, or float in dtype and differentiated."""
    options = dict(options)
    g = torch.Generator().manual_seed(9)
    if options.get("attn_mask") == "bool":
        options["attn_mask"] = torch.rand(B, 1, Sq, Sk, generator=g) > 0.3
    elif options.get("attn_mask") == "float":
        options["attn_mask"] = torch.randn(1, Hq, Sq, Sk, generator=g).to(dtype).requires_grad_()
    return options


def _window_of(options):
    return ops.window_rule(options.get("causal", False), options.get("window"))


def _reference_run(inputs, grad_out, options, p, state, dtype, upcast):
    """out and the gradients of `inputs` (q, k, v and a float mask, if any) of the reference
    on inputs cast to dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    mask = leaves[3] if len(leaves) > 3 else options.get("attn_mask")
    out, _ = reference.attention(*leaves[:3], mask, None, _window_of(options), p, upcast, state,
                                 ops.check_softcap(options.get("softcap")))
    return out, torch.autograd.grad(out, leaves, grad_out.to(dtype))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.interpreted_triton_keeps(dtype=[F32], case=[name for name in CASES if name != "long_window"])
def test_forward_and_backward_match_the_reference(fused_backend, case, dtype):
    B, Hq, Hkv, Sq, Sk, D, Dv, options = CASES[case]
    options = _options(options, B, Hq, Sq, Sk, dtype)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, h, s, d, generator=g).to(dtype).requires_grad_()
               for h, s, d in ((Hq, Sq, D), (Hkv, Sk, D), (Hkv, Sk, Dv)))
    grad_out = torch.randn(B, Hq, Sq, Dv, generator=g).to(dtype)
    p = 0.2
    torch.manual_seed(5)
    out = fastattn.attention(q, k, v, dropout_p=p, backend=fused_backend, **options)
    mask = options.get("attn_mask")
    inputs = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
    grads = torch.autograd.grad(out, inputs, grad_out)
    state = _rng_state_after(5)
    ref_out, ref_grads = _reference_run(inputs, grad_out, options, p, state, F64, True)
    base_out, base_grads = _reference_run(inputs, grad_out, options, p, state, dtype, False)
    assert_within_baseline("out", out, ref_out, base_out)
    for name, grad, ref, base in zip(("dq", "dk", "dv", "dmask"), grads, ref_grads, base_grads):
        assert_within_baseline(name, grad, ref, base)


def test_packed_forward_and_backward_match_the_reference(fused_backend):
    lengths_q, lengths_k = [5, 70, 1, 33], [8, 70, 0, 50]
    Hq, Hkv, D, p = 4, 2, 40, 0.25
    cu_q = torch.tensor([0] + lengths_q).cumsum(0).int()
    cu_k = torch.tensor([0] + lengths_k).cumsum(0).int()
    g = torch.Generator().manual_seed(2)
    q = torch.randn(int(cu_q[-1]), Hq, D, generator=g).requires_grad_()
    k, v = (torch.randn(int(cu_k[-1]), Hkv, D, generator=g).requires_grad_() for _ in range(2))
    grad_out = torch.randn(int(cu_q[-1]), Hq, D, generator=g)
    torch.manual_seed(6)
    out = fastattn.varlen_attention(q, k, v, cu_q, cu_k, 70, 70, causal=True, dropout_p=p, backend=fused_backend)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    state = _rng_state_after(6)

    def run(dtype, upcast):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        result, _ = reference.varlen_attention(*leaves, cu_q, cu_k, None, reference.CAUSAL, p, upcast, state)
        return result, torch.autograd.grad(result, leaves, grad_out.to(dtype))

    (ref_out, ref_grads), (base_out, base_grads) = run(F64, True), run(F32, False)
    assert_within_baseline("out", out, ref_out, base_out)
    for name, grad, ref, base in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        assert_within_baseline(name, grad, ref, base)


# ----------------------------------------------------------------------------- the rng state


def _sdpa_dropout(q, k, v, backend):
    return fastattn.attention(q, k, v, dropout_p=0.3, backend=backend)


def test_manual_seed_reproduces_and_calls_differ(backend):
    q = torch.randn(1, 2, 40, 16)
    torch.manual_seed(1)
    first, second = _sdpa_dropout(q, q, q, backend), _sdpa_dropout(q, q, q, backend)
    torch.manual_seed(1)
    assert torch.equal(_sdpa_dropout(q, q, q, backend), first)
    assert not torch.equal(first, second)


def test_checkpointing_recomputes_the_same_mask(backend):
    q = torch.randn(1, 2, 40, 16, requires_grad=True)
    torch.manual_seed(2)
    plain = torch.autograd.grad(_sdpa_dropout(q, q, q, backend).pow(2).sum(), q)[0]
    torch.manual_seed(2)
    out = torch.utils.checkpoint.checkpoint(_sdpa_dropout, q, q, q, backend, use_reentrant=False)
    torch.testing.assert_close(torch.autograd.grad(out.pow(2).sum(), q)[0], plain)


def test_compiles_without_graph_breaks(backend):
    q = torch.randn(1, 2, 40, 16)
    compiled = torch.compile(_sdpa_dropout, fullgraph=True)
    out = compiled(q, q, q, backend)
    assert out.shape == q.shape and not torch.equal(out, compiled(q, q, q, backend))


# ----------------------------------------------------------------------------- ops and dispatch


@needs_cpu
def test_ops_pass_opcheck_with_dropout():
    """The C++ ops with dropout under torch.library.opcheck (schema, fake kernels, autograd)."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 37, 16, generator=g, requires_grad=True) for _ in range(3))
    state = torch.tensor([123456789, 5])
    args = (q, k, v, None, 0.25, -1, 0, False, 0.0, 0.3, state)
    torch.library.opcheck(ops.NATIVE_OPS.attn_fwd, args)
    out, _, stats = ops.NATIVE_OPS.attn_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    torch.library.opcheck(
        ops.NATIVE_OPS.attn_bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, stats, None, 0.25,
                                  False, -1, 0, False, 0.0, 0.3, state)
    )
    cu = torch.tensor([0, 30, 37], dtype=torch.int32)
    packed = [t.detach()[0].transpose(0, 1).contiguous().requires_grad_() for t in (q, k, v)]
    varlen_args = (*packed, cu, cu, 30, 30, 0.25, -1, -1, 0.0, 0.3, state)
    # Not test_aot_dispatch_dynamic on varlen_fwd: see test_varlen.test_opcheck_varlen_ops.
    torch.library.opcheck(ops.NATIVE_OPS.varlen_fwd, varlen_args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out, _, stats = ops.NATIVE_OPS.varlen_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in varlen_args))
    torch.library.opcheck(
        ops.NATIVE_OPS.varlen_bwd, (torch.randn_like(out), *(t.detach() for t in packed), out, stats, cu, cu, 30, 30,
                                    0.25, -1, -1, 0.0, 0.3, state)
    )


@needs_cpu
def test_dropout_needs_rng_state():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="rng_state must be given when dropout_p > 0"):
        ops.NATIVE_OPS.attn_fwd(q, q, q, None, 1.0, -1, -1, False, 0.0, 0.1, None)
    with pytest.raises(ValueError, match="rng_state must be an int64 CPU tensor of 2 elements"):
        ops.NATIVE_OPS.attn_fwd(q, q, q, None, 1.0, -1, -1, False, 0.0, 0.1, torch.tensor([1.0, 2.0]))


def test_dispatch_reads_the_dropout_capability():
    q = torch.randn(1, 1, 4, 8)
    chosen = dispatch.choose(lambda name: dispatch.attention_reason(name, q, q, q, None, None, dropout_p=0.1),
                             q.device)
    assert chosen == ("cpu" if _has_dropout("cpu") else "reference")
    without = [name for name, caps in CAPABILITIES.items() if "dropout" not in caps.features]
    for name in without:
        assert CAPABILITIES[name].feature_reason(name, {"dropout"}) == f"the {name} kernels do not support dropout"


def test_reference_recomputations_drop_the_same_scores(fused_backend):
    """Double backward and a differentiated packed lse recompute through the reference, which
    must drop what the kernel dropped: both against the reference under the same rng_state."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g).requires_grad_() for _ in range(3))

    def double_backward(q, k, v, attend):
        (dq,) = torch.autograd.grad(attend(q, k, v).pow(2).sum(), q, create_graph=True)
        return torch.autograd.grad(dq.sum(), (q, k, v))

    torch.manual_seed(8)
    grads = double_backward(q, k, v, lambda *t: fastattn.attention(*t, dropout_p=0.3, backend=fused_backend))
    state = _rng_state_after(8)

    def reference_double_backward(dtype, upcast):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        return double_backward(*leaves, lambda *t: reference.attention(*t, dropout_p=0.3, upcast=upcast,
                                                                       rng_state=state)[0])

    for name, grad, ref, base in zip(("ddq", "ddk", "ddv"), grads, reference_double_backward(F64, True),
                                     reference_double_backward(F32, False)):
        assert_within_baseline(name, grad, ref, base)

    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    packed = [t.detach()[0].transpose(0, 1).contiguous().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(9)
    out, lse = fastattn.varlen_attention(*packed, cu, cu, 14, 14, dropout_p=0.3, return_lse=True, backend=fused_backend)
    grads = torch.autograd.grad(out.sum() + lse.sum(), packed)
    state = _rng_state_after(9)

    def reference_grads(dtype, upcast):
        leaves = [t.detach().to(dtype).requires_grad_() for t in packed]
        out, lse = reference.varlen_attention(*leaves, cu, cu, None, reference.UNBOUNDED, 0.3, upcast, state)
        return torch.autograd.grad(out.sum() + lse.sum(), leaves)

    for name, grad, ref, base in zip(("dq", "dk", "dv"), grads, reference_grads(F64, True), reference_grads(F32, False)):
        assert_within_baseline(name, grad, ref, base)
