"""Attention sinks (one learned logit per query head that joins every row's softmax and carries
no value, as in gpt-oss) on every backend that runs here, against the float64 reference with
the rule of docs/design.md: outputs, lse and the gradients of q, k, v and the sinks. Padded,
packed, KV-cache and split-key (decode) paths, rows that see no key, the lse gradient,
argument checks, opcheck and torch.compile."""
import pytest
import torch

import fastattn
from fastattn import ops, reference
from test_cpu_kernels import ISAS
from test_window import backend  # noqa: F401 (fixture: every backend here, the cpu one per instruction set)
from tolerance import assert_within_baseline


def _leaves(tensors, dtype):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _check_against_reference(run_kernel, run_reference, tensors, sinks, lse_in_loss=False):
    """run_kernel(*leaves) and run_reference(*leaves, upcast) -> (out, lse), leaves being
    `tensors` then the sinks. Checks out, lse and every gradient (loss: out . g, plus lse . h
    when lse_in_loss) with the rule: kernel vs float64, within twice the low-precision run."""
    results = []
    for which in ("kernel", "ref", "base"):
        dtype = torch.float64 if which == "ref" else None
        leaves = _leaves(tensors, dtype) + _leaves([sinks], dtype if which == "ref" else torch.float32)
        out, lse = run_kernel(*leaves) if which == "kernel" else run_reference(*leaves, which == "ref")
        results.append((out, lse, leaves))
    g = torch.randn_like(results[0][0], dtype=torch.float32)
    h = torch.randn_like(results[0][1])
    grads = []
    for out, lse, leaves in results:
        loss = (out.double() * g.double()).sum()
        if lse_in_loss:
            loss = loss + (lse.double() * h.double()).sum()
        grads.append(torch.autograd.grad(loss, leaves))
    (out, lse, _), (ref_out, ref_lse, _), (base_out, base_lse, _) = results
    assert_within_baseline("out", out, ref_out, base_out)
    assert_within_baseline("lse", lse, ref_lse, base_lse.float())
    names = ["dq", "dk", "dv"][: len(tensors)] + ["dsinks"]
    for name, got, expected, baseline in zip(names, *grads):
        assert_within_baseline(name, got, expected, baseline)
    return out, lse


def _padded(B, Hq, Hkv, Sq, Sk, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    k = (torch.randn(B, Hkv, Sk, D, generator=g) * 1.5).to(dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    sinks = torch.randn(Hq, generator=g) * 2  # some sinks dominate their rows, some hardly count
    return q, k, v, sinks


# (B, Hq, Hkv, Sq, Sk, D, dtype, padding mask, causal, window, softcap)
CASES = [
    (2, 4, 2, 77, 77, 32, torch.float32, False, True, None, None),  # causal, GQA
    (1, 2, 2, 40, 130, 64, torch.bfloat16, True, False, None, None),  # key padding, Sq < Sk
    (1, 2, 1, 90, 50, 32, torch.float32, False, False, (4, 0), 3.0),  # early rows see only the sink
    (1, 4, 1, 2, 300, 48, torch.float32, True, True, (60, None), None),  # few queries (decode kernel)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[3]}x{c[4]}-{str(c[6])[6:]}-pad{int(c[7])}-w{c[9]}")
@pytest.mark.interpreted_triton_keeps(case=CASES[1:])
def test_sinks_against_reference(backend, case):
    B, Hq, Hkv, Sq, Sk, D, dtype, padding, causal, window, softcap = case
    q, k, v, sinks = _padded(B, Hq, Hkv, Sq, Sk, D, dtype, seed=Sq + Sk)
    mask = (torch.arange(Sk) < Sk - 17).view(1, 1, 1, Sk) if padding else None
    rule = ops.window_rule(causal, window)

    def kernel(q, k, v, sinks):
        return fastattn.attention(q, k, v, attn_mask=mask, causal=causal, window=window, softcap=softcap, sinks=sinks,
                                  return_lse=True, backend=backend)

    def ref(q, k, v, sinks, upcast):
        return reference.attention(q, k, v, mask, None, rule, upcast=upcast, softcap=softcap or 0.0, sinks=sinks)

    out, lse = _check_against_reference(kernel, ref, (q, k, v), sinks)
    if window is not None and Sq > Sk:  # rows that see no key: zeros, and the sink alone in the lse
        empty = Sq - Sk - window[0]
        assert (out[:, :, :empty] == 0).all()
        assert torch.equal(lse[:, :, :empty], sinks.view(1, Hq, 1).expand(B, Hq, empty))


def test_lse_gradient_with_sinks(backend):
    q, k, v, sinks = _padded(1, 2, 1, 33, 45, 32, torch.float32, seed=3)

    def kernel(q, k, v, sinks):
        return fastattn.attention(q, k, v, causal=True, sinks=sinks, return_lse=True, backend=backend)

    def ref(q, k, v, sinks, upcast):
        return reference.attention(q, k, v, None, None, reference.CAUSAL, upcast=upcast, sinks=sinks)

    _check_against_reference(kernel, ref, (q, k, v), sinks, lse_in_loss=True)


def test_varlen_with_sinks(backend):
    g = torch.Generator().manual_seed(5)
    lengths = [37, 0, 64, 5]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    total, Hq, Hkv, D = int(cu[-1]), 4, 2, 32
    q, k, v = (torch.randn(total, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    sinks = torch.randn(Hq, generator=g)

    def kernel(q, k, v, sinks):
        return fastattn.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), causal=True, sinks=sinks,
                                         return_lse=True, backend=backend)

    def ref(q, k, v, sinks, upcast):
        return reference.varlen_attention(q, k, v, cu, cu, None, reference.CAUSAL, upcast=upcast, sinks=sinks)

    _check_against_reference(kernel, ref, (q, k, v), sinks)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_with_sinks_across_key_splits(isa, paged, monkeypatch):
    """One row against a long cache splits its keys across threads; the merge of the splits
    must count the sink once. Rows of different lengths, one of them empty."""
    monkeypatch.setenv("FASTATTN_CPU_ISA", isa)
    g = torch.Generator().manual_seed(11)
    B, Hq, Hkv, D, room, block = 3, 4, 2, 64, 2048, 64
    q = torch.randn(B, Hq, 1, D, generator=g)
    k_rows, v_rows = (torch.randn(B, Hkv, room, D, generator=g) for _ in range(2))
    lengths = torch.tensor([room, 700, 0], dtype=torch.int32)
    sinks = torch.randn(Hq, generator=g)
    if paged:  # the rows' blocks in shuffled order
        order = torch.randperm(B * room // block, generator=g)
        table = order.view(B, room // block).to(torch.int32)
        k_cache, v_cache = (torch.empty(B * room // block, Hkv, block, D) for _ in range(2))
        for cache, rows in ((k_cache, k_rows), (v_cache, v_rows)):
            cache[order] = rows.unflatten(2, (room // block, block)).transpose(1, 2).flatten(0, 1)
    else:
        table, k_cache, v_cache = None, k_rows, v_rows
    out, lse = fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, block_table=table,
                                               sinks=sinks, return_lse=True, backend="cpu")
    visible = (torch.arange(room) < lengths.view(-1, 1)).view(B, 1, 1, room)
    ref_out, ref_lse = reference.attention(q.double(), k_rows.double(), v_rows.double(), visible, None,
                                           sinks=sinks.double())
    base_out, base_lse = reference.attention(q, k_rows, v_rows, visible, None, upcast=False, sinks=sinks)
    assert_within_baseline("out", out, ref_out, base_out)
    assert_within_baseline("lse", lse, ref_lse, base_lse)
    assert (out[2] == 0).all() and torch.equal(lse[2, :, 0], sinks)


def test_no_keys_gives_zeros_and_the_sink(backend):
    q = torch.randn(2, 3, 4, 16)
    k = v = torch.randn(2, 1, 0, 16)
    sinks = torch.randn(3)
    out, lse = fastattn.attention(q, k, v, sinks=sinks, return_lse=True, backend=backend)
    assert (out == 0).all()
    assert torch.equal(lse, sinks.view(1, 3, 1).expand(2, 3, 4))


def test_sink_of_minus_infinity_changes_nothing(backend):
    q, k, v, _ = _padded(1, 2, 2, 20, 30, 32, torch.float32, seed=7)
    sinks = torch.full((2,), float("-inf"))
    plain = fastattn.attention(q, k, v, causal=True, return_lse=True, backend=backend)
    sunk = fastattn.attention(q, k, v, causal=True, sinks=sinks, return_lse=True, backend=backend)
    assert torch.equal(plain[0], sunk[0]) and torch.equal(plain[1], sunk[1])


def test_double_backward_with_sinks():
    q, k, v, sinks = _padded(1, 2, 1, 6, 9, 8, torch.float64, seed=13)
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    sinks.requires_grad_()
    out = fastattn.attention(q, k, v, sinks=sinks, backend="cpu")
    (dsinks,) = torch.autograd.grad(out.square().sum(), sinks, create_graph=True)
    (ddq,) = torch.autograd.grad(dsinks.sum(), q)
    q64, k64, v64, s64 = (t.detach().double().requires_grad_() for t in (q, k, v, sinks))
    out64, _ = reference.attention(q64, k64, v64, sinks=s64)
    (ds64,) = torch.autograd.grad(out64.square().sum(), s64, create_graph=True)
    (ddq64,) = torch.autograd.grad(ds64.sum(), q64)
    assert torch.allclose(dsinks.double(), ds64, atol=1e-5) and torch.allclose(ddq.double(), ddq64, atol=1e-5)


@pytest.mark.parametrize(
    "sinks, error, message",
    [
        (torch.zeros(3), ValueError, r"sinks must have shape \(4,\)"),
        (torch.zeros(4, dtype=torch.int64), TypeError, "sinks must be a floating-point tensor"),
        ([0.0] * 4, TypeError, "sinks must be a floating-point tensor"),
        (torch.zeros(1, 4), ValueError, r"sinks must have shape \(4,\)"),
    ],
)
def test_bad_sinks_raise_clear_errors(sinks, error, message):
    q = k = v = torch.randn(1, 4, 8, 16)
    with pytest.raises(error, match=message):
        fastattn.attention(q, k, v, sinks=sinks)


def test_sinks_gradient_in_low_precision_parameter():
    """A bfloat16 sink parameter (as models keep them) gets a bfloat16 gradient."""
    q = k = v = torch.randn(1, 2, 8, 16)
    sinks = torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)
    fastattn.attention(q, k, v, sinks=sinks, backend="cpu").sum().backward()
    assert sinks.grad.dtype == torch.bfloat16 and torch.isfinite(sinks.grad).all()


def test_opcheck_and_compile_with_sinks():
    q, k, v, sinks = _padded(1, 2, 1, 16, 24, 32, torch.float32, seed=17)
    torch.library.opcheck(ops.NATIVE_OPS.attn_fwd, (q, k, v, None, 0.2, -1, 0, False, 0.0, 0.0, None, sinks))
    cu = torch.tensor([0, 16], dtype=torch.int32)
    packed = [t[0].transpose(0, 1).contiguous() for t in (q, k[:, :, :16], v[:, :, :16])]
    torch.library.opcheck(ops.NATIVE_OPS.varlen_fwd, (*packed, cu, cu, 16, 16, 0.2, -1, 0, 0.0, 0.0, None, sinks))
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]

    def run(q, k, v, sinks):
        return fastattn.attention(q, k, v, causal=True, sinks=sinks, backend="cpu")

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    out.sum().backward()
    expected = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    run(*expected).sum().backward()
    assert torch.allclose(out, run(q, k, v, sinks))
    for got, want in zip(leaves, expected):
        assert torch.allclose(got.grad, want.grad, atol=1e-6)
