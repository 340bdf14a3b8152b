"""The public API on CUDA tensors, end to end: automatic dispatch, autograd, torch.compile, the
KV cache, softmax and transformers models, with each GPU backend (test_cuda_kernels.py and
test_triton.py test the ops themselves). Skipped without a CUDA device."""
import os
import sys

import pytest
import torch

import fastattn
from fastattn import dispatch, philox, reference
from fastattn.capabilities import CAPABILITIES

sys.path.insert(0, os.path.dirname(__file__))
from tolerance import assert_within_baseline  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

GPU_BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(not dispatch.backends().get(name, {}).get("usable"),
                                                reason=f"{name} backend not usable"))
    for name in ("cuda", "triton")
]


def _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, padded_length):
    """q, k, v (requiring grad) and, with padded_length, a mask under which batch row 1 sees
    only its first padded_length keys."""
    q = torch.randn(B, Hq, Sq, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, Sk, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Sk, D, device="cuda", dtype=dtype, requires_grad=True)
    mask = None
    if padded_length:
        lengths = torch.tensor([Sk, padded_length], device="cuda")
        mask = (torch.arange(Sk, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]
    return q, k, v, mask


def _reference_and_baseline(q, k, v, mask, window, grad_out, softcap=0.0, dropout_p=0.0, rng_state=None,
                            sinks=None, alibi_slopes=None):
    """float64 truth and PyTorch in the inputs' dtype: outputs and (dq, dk, dv), then dsinks
    when sinks are given (float32 in the baseline, as the kernels take them)."""
    results = []
    for dtype in (torch.float64, q.dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        if sinks is not None:
            leaves.append(sinks.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_())
        out, _ = reference.attention(*leaves[:3], mask, None, window, dropout_p, upcast=False, rng_state=rng_state,
                                     softcap=softcap, sinks=leaves[3] if sinks is not None else None,
                                     alibi_slopes=alibi_slopes)
        out.backward(grad_out.to(dtype))
        results.append((out, [t.grad for t in leaves]))
    return results


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal,padded", [(False, True), (True, False), (True, True)])
def test_attention_autograd_matches_reference(backend, dtype, causal, padded):
    torch.manual_seed(0)
    q, k, v, mask = _inputs(2, 8, 2, 300, 300, 128, dtype, 170 if padded else None)
    out = fastattn.attention(q, k, v, attn_mask=mask, causal=causal, backend=backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    (ref_out, ref_grads), (base_out, base_grads) = _reference_and_baseline(
        q, k, v, mask, reference.CAUSAL if causal else reference.UNBOUNDED, grad_out)
    assert_within_baseline("out", out, ref_out, base_out)
    for name, got, ref, base in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), ref_grads, base_grads):
        assert_within_baseline(name, got, ref, base)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window,softcap,padded", [((64, None), None, True), ((40, 10), 20.0, False),
                                                   (None, 5.0, False), ((64, None), 20.0, True), (None, 5.0, True)])
def test_window_and_softcap_autograd_match_reference(backend, dtype, window, softcap, padded):
    torch.manual_seed(2)
    q, k, v, mask = _inputs(2, 4, 2, 200, 333, 64, dtype, 250 if padded else None)
    out = fastattn.attention(q, k, v, attn_mask=mask, causal=True, window=window, softcap=softcap, backend=backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    left, _ = fastattn.ops.check_window(window)
    (ref_out, ref_grads), (base_out, base_grads) = _reference_and_baseline(
        q, k, v, mask, reference.Window(left, 0), grad_out, softcap or 0.0)
    assert_within_baseline("out", out, ref_out, base_out)
    for name, got, ref, base in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), ref_grads, base_grads):
        assert_within_baseline(name, got, ref, base)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal,padded,window", [(True, False, None), (False, True, None), (True, False, (40, None))])
def test_sinks_autograd_match_reference(backend, dtype, causal, padded, window):
    torch.manual_seed(4)
    q, k, v, mask = _inputs(2, 8, 2, 200, 260, 64, dtype, 150 if padded else None)
    sinks = (torch.randn(8, device="cuda") * 2).requires_grad_()
    out = fastattn.attention(q, k, v, attn_mask=mask, causal=causal, window=window, sinks=sinks, backend=backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    rule = fastattn.ops.window_rule(causal, window)
    (ref_out, ref_grads), (base_out, base_grads) = _reference_and_baseline(q, k, v, mask, rule, grad_out, sinks=sinks)
    assert_within_baseline("out", out, ref_out, base_out)
    got = (q.grad, k.grad, v.grad, sinks.grad)
    for name, grad, ref, base in zip(("dq", "dk", "dv", "dsinks"), got, ref_grads, base_grads):
        assert_within_baseline(name, grad, ref, base)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal,padded", [(False, True), (True, False)])
def test_dropout_autograd_matches_reference(backend, dtype, causal, padded):
    """attention(dropout_p=...) draws its rng_state from the CUDA generator: re-seeding and drawing
    gives the state the reference then drops the same scores with."""
    torch.manual_seed(4)
    q, k, v, mask = _inputs(2, 8, 2, 300, 277, 128, dtype, 170 if padded else None)
    grad_out = torch.randn(2, 8, 300, 128, device="cuda", dtype=dtype)
    torch.manual_seed(11)
    out = fastattn.attention(q, k, v, attn_mask=mask, causal=causal, dropout_p=0.15, backend=backend)
    out.backward(grad_out)
    torch.manual_seed(11)
    state = philox.draw_rng_state(q.device)
    (ref_out, ref_grads), (base_out, base_grads) = _reference_and_baseline(
        q, k, v, mask, reference.CAUSAL if causal else reference.UNBOUNDED, grad_out, dropout_p=0.15, rng_state=state)
    assert_within_baseline("out", out, ref_out, base_out)
    for name, got, ref, base in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), ref_grads, base_grads):
        assert_within_baseline(name, got, ref, base)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_dropout_compiles_fullgraph_and_seeds_reproduce(backend):
    torch._dynamo.reset()
    q = torch.randn(1, 4, 200, 64, device="cuda", dtype=torch.bfloat16)

    def call(q):
        return fastattn.attention(q, q, q, causal=True, dropout_p=0.3, backend=backend)

    compiled = torch.compile(call, fullgraph=True)
    torch.manual_seed(8)
    first, second = compiled(q), compiled(q)
    torch.manual_seed(8)
    assert torch.equal(compiled(q), first)
    assert not torch.equal(first, second)


@pytest.mark.skipif(not dispatch.backends().get("cuda", {}).get("usable"), reason="cuda backend not usable")
def test_cuda_backend_takes_softcap_under_a_mask_and_alibi():
    q = torch.randn(1, 2, 16, 64, device="cuda", dtype=torch.float16)
    mask = torch.ones(1, 1, 16, 16, device="cuda", dtype=torch.bool)
    slopes = torch.ones(2, device="cuda")
    assert dispatch.attention_reason("cuda", q, q, q, mask, None, softcap=5.0, alibi_slopes=slopes) is None


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal,padded,softcap,window", [(True, False, None, None), (False, True, None, None),
                                                          (True, True, 20.0, (50, None))])
def test_alibi_autograd_matches_reference(backend, dtype, causal, padded, softcap, window):
    if "alibi" not in CAPABILITIES[backend].features:
        pytest.skip(f"the {backend} backend has no alibi")
    torch.manual_seed(6)
    q, k, v, mask = _inputs(2, 8, 2, 200, 260, 64, dtype, 150 if padded else None)
    slopes = torch.exp2(-torch.arange(1, 9, device="cuda", dtype=torch.float32)) * torch.tensor([[1.0], [3.0]], device="cuda")
    out = fastattn.attention(q, k, v, attn_mask=mask, causal=causal, window=window, softcap=softcap,
                             alibi_slopes=slopes, backend=backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    rule = fastattn.ops.window_rule(causal, window)
    (ref_out, ref_grads), (base_out, base_grads) = _reference_and_baseline(
        q, k, v, mask, rule, grad_out, softcap or 0.0, alibi_slopes=slopes)
    assert_within_baseline("out", out, ref_out, base_out)
    for name, got, ref, base in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), ref_grads, base_grads):
        assert_within_baseline(name, got, ref, base)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal,window,with_alibi", [(True, None, False), (False, (40, 8), True)])
def test_varlen_autograd_matches_reference(backend, dtype, causal, window, with_alibi):
    """varlen_attention with an empty sequence and GQA: outputs and gradients against the reference."""
    if "alibi" not in CAPABILITIES[backend].features and with_alibi:
        pytest.skip(f"the {backend} backend has no alibi")
    torch.manual_seed(7)
    lengths_q, lengths_k = [120, 0, 257, 31], [100, 9, 257, 64]
    cu_q, cu_k = (torch.tensor([0] + n, device="cuda").cumsum(0).to(torch.int32) for n in (lengths_q, lengths_k))
    q = torch.randn(sum(lengths_q), 8, 64, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(sum(lengths_k), 2, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    slopes = torch.rand(4, 8, device="cuda") if with_alibi else None
    out = fastattn.varlen_attention(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=causal, window=window,
                                    alibi_slopes=slopes, backend=backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    rule = fastattn.ops.window_rule(causal, window)
    results = []
    for to_dtype in (torch.float64, dtype):
        leaves = [t.detach().to(to_dtype).requires_grad_() for t in (q, k, v)]
        ref, _ = reference.varlen_attention(*leaves, cu_q, cu_k, None, rule, upcast=False, alibi_slopes=slopes)
        results.append((ref, torch.autograd.grad(ref, leaves, grad_out.to(to_dtype))))
    (ref_out, ref_grads), (base_out, base_grads) = results
    assert_within_baseline("out", out, ref_out, base_out)
    for name, got, ref, base in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), ref_grads, base_grads):
        assert_within_baseline(name, got, ref, base)


def test_automatic_dispatch_runs_a_fused_gpu_kernel():
    q = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.float16)
    chosen = dispatch.choose(lambda name: dispatch.attention_reason(name, q, q, q, None, None), q.device)
    assert chosen in ("cuda", "triton"), dispatch.backends()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compiled_fullgraph_forward_and_backward_equal_eager(backend):
    torch._dynamo.reset()
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def step(q, k, v):
        return fastattn.attention(q, k, v, causal=True, backend=backend).float().square().sum()

    eager_loss = step(q, k, v)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    compiled_loss = torch.compile(step, fullgraph=True)(q, k, v)
    compiled_grads = torch.autograd.grad(compiled_loss, (q, k, v))
    torch.testing.assert_close(compiled_loss, eager_loss)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("paged", [False, True])
def test_kv_cache_decoding_matches_reference(paged):
    torch.manual_seed(2)
    B, Hq, Hkv, D, block = 3, 8, 2, 64, 16
    lengths = torch.tensor([5, 40, 77], dtype=torch.int32, device="cuda")
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.float16)
    k_new, v_new = (torch.randn(B, Hkv, 1, D, device="cuda", dtype=torch.float16) for _ in range(2))
    capacity = 96
    keys = torch.randn(B, Hkv, capacity, D, device="cuda", dtype=torch.float16)
    values = torch.randn(B, Hkv, capacity, D, device="cuda", dtype=torch.float16)
    if paged:  # row b's blocks in shuffled order inside one pool
        per_row = capacity // block
        order = torch.randperm(B * per_row, device="cuda")
        block_table = order.view(B, per_row).to(torch.int32)
        k_cache = torch.empty(B * per_row, Hkv, block, D, device="cuda", dtype=torch.float16)
        v_cache = torch.empty_like(k_cache)
        for b in range(B):
            for i in range(per_row):
                k_cache[block_table[b, i]] = keys[b, :, i * block:(i + 1) * block]
                v_cache[block_table[b, i]] = values[b, :, i * block:(i + 1) * block]
    else:
        block_table, k_cache, v_cache = None, keys.clone(), values.clone()
    out = fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, k_new=k_new, v_new=v_new,
                                          block_table=block_table)
    for b in range(B):
        n = int(lengths[b])
        k_row = torch.cat([keys[b:b + 1, :, :n], k_new[b:b + 1]], 2)
        v_row = torch.cat([values[b:b + 1, :, :n], v_new[b:b + 1]], 2)
        ref, _ = reference.attention(q[b:b + 1].double(), k_row.double(), v_row.double(), None, None)
        base, _ = reference.attention(q[b:b + 1], k_row, v_row, None, None, upcast=False)
        assert_within_baseline(f"row {b}", out[b:b + 1], ref, base)


def _paged_rows(rows, block_table, block):
    """A pool of pages (NaN where no row's page lies) holding rows (B, Hkv, S, D) as block_table says."""
    B, Hkv, S, D = rows.shape
    pool = torch.full((int(block_table.max()) + 2, Hkv, block, D), float("nan"), device="cuda", dtype=rows.dtype)
    pool[block_table.flatten().long()] = rows.view(B, Hkv, S // block, block, D).transpose(1, 2).flatten(0, 1)
    return pool


# (Hq, Hkv, Sq new tokens, D, dtype, block size, causal): MHA, GQA, MQA; decode and chunks;
# pages smaller and larger than the CUDA kernel's 64-key tiles.
KV_APPEND_CASES = [
    (8, 8, 1, 64, torch.float16, None, True),
    (8, 2, 1, 128, torch.bfloat16, 16, True),
    (16, 1, 4, 128, torch.float16, 128, True),
    (6, 2, 9, 96, torch.bfloat16, 8, False),
]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", KV_APPEND_CASES, ids=lambda c: "-".join(map(str, c)))
def test_kv_cache_appends_then_attends_on_each_gpu_backend(backend, case):
    """attention_with_kvcache with k_new / v_new crossing block boundaries, rows of different
    lengths (one empty), slots past every row's end NaN: each row against the reference."""
    Hq, Hkv, Sq, D, dtype, block, causal = case
    torch.manual_seed(KV_APPEND_CASES.index(case))
    lengths = [0, 13, 250, 31]  # + Sq new tokens each; 13 + 4 and 250 + 9 cross pages
    B, capacity = len(lengths), 384
    keys, values = (torch.randn(B, Hkv, capacity, D, device="cuda", dtype=dtype) for _ in range(2))
    for rows in (keys, values):
        for b, length in enumerate(lengths):
            rows[b, :, length:] = float("nan")
    q = torch.randn(B, Hq, Sq, D, device="cuda", dtype=dtype)
    k_new, v_new = (torch.randn(B, Hkv, Sq, D, device="cuda", dtype=dtype) for _ in range(2))
    if block is None:
        block_table, k_cache, v_cache = None, keys.clone(), values.clone()
    else:
        block_table = torch.randperm(B * capacity // block, device="cuda").view(B, -1).to(torch.int32)
        k_cache, v_cache = _paged_rows(keys, block_table, block), _paged_rows(values, block_table, block)
    out, lse = fastattn.attention_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=torch.tensor(lengths, dtype=torch.int32, device="cuda"), k_new=k_new,
        v_new=v_new, block_table=block_table, causal=causal, return_lse=True, backend=backend,
    )
    window = reference.CAUSAL if causal else reference.UNBOUNDED
    for b, length in enumerate(lengths):
        k_row = torch.cat([keys[b:b + 1, :, :length], k_new[b:b + 1]], 2)
        v_row = torch.cat([values[b:b + 1, :, :length], v_new[b:b + 1]], 2)
        ref, ref_lse = reference.attention(q[b:b + 1].double(), k_row.double(), v_row.double(), None, None, window)
        base, base_lse = reference.attention(q[b:b + 1], k_row, v_row, None, None, window, upcast=False)
        assert_within_baseline(f"row {b}", out[b:b + 1], ref, base)
        assert_within_baseline(f"row {b} lse", lse[b:b + 1], ref_lse.float(), base_lse)


@pytest.mark.skipif(not dispatch.backends().get("cuda", {}).get("usable"), reason="cuda backend not usable")
def test_cuda_kv_cache_decoding_replays_in_a_cuda_graph_and_compiles():
    """The lengths and block table are read on the device: a captured decode step replayed after
    they change in place follows them, and torch.compile(fullgraph=True) traces the call."""
    torch.manual_seed(5)
    B, Hq, Hkv, D, block, per_row = 2, 8, 2, 128, 16, 40
    k_cache, v_cache = (torch.randn(B * per_row, Hkv, block, D, device="cuda", dtype=torch.float16) for _ in range(2))
    block_table = torch.randperm(B * per_row, device="cuda").view(B, per_row).to(torch.int32)
    lengths = torch.tensor([100, 7], dtype=torch.int32, device="cuda")
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.float16)

    def step():
        return fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, block_table=block_table,
                                               backend="cuda")

    step()  # warm up outside the capture (allocator, one-time attribute setup)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    lengths.copy_(torch.tensor([600, 333], dtype=torch.int32))
    block_table.copy_(block_table.flip(1))
    graph.replay()
    eager = step()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(), eager)


def test_softmax_matches_torch():
    torch.manual_seed(3)
    x = torch.randn(2, 4, 100, 3000, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(2, 1, 1, 3000, device="cuda") > 0.2
    y = fastattn.softmax(x, mask, 0.5)
    ref = reference.softmax(x.double(), mask, 0.5)
    base = reference.softmax(x, mask, 0.5, upcast=False)
    assert_within_baseline("softmax", y, ref, base)


def test_transformers_decoder_on_gpu_matches_eager():
    transformers = pytest.importorskip("transformers")
    from fastattn.integrations import transformers as fa_hf

    fa_hf.register()
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=1, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(4)
    eager = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").cuda().eval()
    fast = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="fastattn").cuda().eval()
    fast.load_state_dict(eager.state_dict())
    ids = torch.randint(2, 96, (2, 24), device="cuda")
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :9] = 0  # left padding
    ids = ids.masked_fill(attention_mask == 0, 0)
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=attention_mask).logits
        got = fast(input_ids=ids, attention_mask=attention_mask).logits
    valid = attention_mask.bool()
    # float32 models: Triton's and cuBLAS's float32 dots may use TF32, so compare loosely
    torch.testing.assert_close(got[valid], want[valid], atol=2e-2, rtol=2e-2)
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager_tokens = eager.generate(input_ids=ids, attention_mask=attention_mask, **kwargs)
        fast_tokens = fast.generate(input_ids=ids, attention_mask=attention_mask, **kwargs)
    agree = (eager_tokens == fast_tokens).float().mean().item()
    assert agree > 0.9, f"greedy tokens agree on only {agree:.0%} of positions"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_varlen_on_the_gpu(dtype):
    """Packed sequences on CUDA tensors: automatic dispatch picks Triton (first for CUDA tensors,
    as for attention), forward and backward within the rule of the float64 reference."""
    if not dispatch.backends()["triton"]["usable"]:
        pytest.skip("triton backend not usable")
    torch.manual_seed(0)
    lengths = [300, 0, 1, 129, 64]
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), 8, 128, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(int(cu[-1]), 2, 128, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(int(cu[-1]), 2, 128, device="cuda", dtype=dtype, requires_grad=True)
    assert dispatch.choose(lambda name: dispatch.varlen_reason(name, q, k, v), q.device) == "triton"
    out = fastattn.varlen_attention(q, k, v, cu, cu, 300, 300, causal=True)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    results = []
    for compute in (torch.float64, dtype):
        leaves = [t.detach().to(compute).requires_grad_() for t in (q, k, v)]
        ref, _ = reference.varlen_attention(*leaves, cu, cu, None, reference.CAUSAL, upcast=False)
        ref.backward(grad_out.to(compute))
        results.append((ref, [t.grad for t in leaves]))
    (ref_out, ref_grads), (base_out, base_grads) = results
    assert_within_baseline("out", out, ref_out, base_out)
    for name, got, ref, base in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), ref_grads, base_grads):
        assert_within_baseline(name, got, ref, base)
