"""attention_with_kvcache against a per-row reference: contiguous and paged caches (blocks in
shuffled order), rows of different lengths, appends that cross block boundaries, chunked
prefill (several new tokens), GQA, causal or not, on every backend that runs here; the
backends with a KV-cache kernel (capability "kv_cache") with pages on both sides of a key
tile, split-KV and slots past a row's end poisoned."""
import itertools

import pytest
import torch

import fastattn
from fastattn import dispatch, reference
from fastattn.capabilities import CAPABILITIES

from tolerance import assert_within_baseline

BACKENDS = [name for name in ("cpu", "triton", "reference") if dispatch.backends()[name]["usable"]]
KV_CACHE_BACKENDS = [name for name in BACKENDS if "kv_cache" in CAPABILITIES[name].features]


def _cases(*axes, triton_default):
    """Every combination of BACKENDS and the axes (each a list of tuples of parameters),
    flattened. The interpreted Triton kernels take seconds a call: their combinations for
    which triton_default(*params) is false run in the slow run only."""
    for backend, *parts in itertools.product(BACKENDS, *axes):
        params = tuple(x for part in parts for x in part)
        if backend == "triton" and not triton_default(*params):
            yield pytest.param(backend, *params, marks=pytest.mark.slow)
        else:
            yield (backend, *params)


def _per_row_reference(q, keys, values, lengths, causal, dtype, upcast, window=None, softcap=0.0, alibi_slopes=None,
                       sinks=None):
    """Row by row: attention of q[b] to the first lengths[b] keys, bottom-right causal (or
    the given window), ALiBi's distances from the row's own diagonal."""
    rule = window or (reference.CAUSAL if causal else reference.UNBOUNDED)
    outs = []
    for b, length in enumerate(lengths):
        k, v = keys[b : b + 1, :, :length].to(dtype), values[b : b + 1, :, :length].to(dtype)
        outs.append(reference.attention(q[b : b + 1].to(dtype), k, v, window=rule, upcast=upcast, softcap=softcap,
                                        alibi_slopes=alibi_slopes, sinks=sinks)[0])
    return torch.cat(outs)


def _make_case(B, Hq, Hkv, Sq, D, dtype, seqlens, paged, block_size=8, capacity=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(B, Hkv, capacity, D, generator=g).to(dtype), torch.randn(B, Hkv, capacity, D, generator=g).to(dtype)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    new = torch.randn(B, Hkv, Sq, D, generator=g).to(dtype), torch.randn(B, Hkv, Sq, D, generator=g).to(dtype)
    if not paged:
        return q, [r.clone() for r in rows], None, new, rows
    blocks_per_row = capacity // block_size
    order = torch.randperm(B * blocks_per_row, generator=g)  # rows' blocks scattered in the pool
    table = order.view(B, blocks_per_row).to(torch.int32)
    pools = []
    for r in rows:
        pool = torch.full((B * blocks_per_row, Hkv, block_size, D), float("nan"), dtype=dtype)
        pool[table.flatten().long()] = r.view(B, Hkv, blocks_per_row, block_size, D).transpose(1, 2).flatten(0, 1)
        pools.append(pool)
    return q, pools, table, new, rows


# Page sizes: none (contiguous), 8 (tiles straddle pages: packed), 32 (tiles follow pages).
@pytest.mark.parametrize(
    "backend, page, Sq, causal, dtype",
    _cases([(None,), (8,), (32,)], [(1, True), (5, True), (5, False), (37, True)],  # 37: a prefill chunk
           [(torch.float32,), (torch.bfloat16,)],
           triton_default=lambda page, Sq, causal, dtype: page != 32 and (dtype == torch.float32 or Sq == 1)),
)
def test_matches_the_per_row_reference(backend, page, Sq, causal, dtype):
    seqlens = [0, 7, 16, 30]  # an empty row, a row whose append crosses block boundaries, ...
    q, (k_cache, v_cache), table, (k_new, v_new), (k_rows, v_rows) = _make_case(
        4, 4, 2, Sq, 16, dtype, seqlens, page is not None, block_size=page or 8, capacity=96
    )
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32)
    out = fastattn.attention_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=cache_seqlens, k_new=k_new, v_new=v_new, block_table=table,
        causal=causal, backend=backend,
    )
    # The rows as they should be after the append.
    for b, start in enumerate(seqlens):
        k_rows[b, :, start : start + Sq], v_rows[b, :, start : start + Sq] = k_new[b], v_new[b]
    lengths = [s + Sq for s in seqlens]
    expected = _per_row_reference(q, k_rows, v_rows, lengths, causal, torch.float64, True)
    baseline = _per_row_reference(q, k_rows, v_rows, lengths, causal, dtype, False)
    assert_within_baseline("out", out, expected, baseline)
    # The cache now holds the appended entries where the rows say.
    if table is None:
        stored = k_cache
    else:
        stored = k_cache[table.long()].transpose(1, 2).flatten(2, 3)
    for b, length in enumerate(lengths):
        assert torch.equal(stored[b, :, :length], k_rows[b, :, :length])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page", [None, 8])
@pytest.mark.parametrize("Sq", [1, 6])
def test_window_and_softcap_follow_each_row(backend, page, Sq):
    """A causal sliding window of 5 keys ending at each row's own last key, and a softcap."""
    seqlens = [0, 3, 16, 30]
    q, (k_cache, v_cache), table, (k_new, v_new), (k_rows, v_rows) = _make_case(
        4, 4, 2, Sq, 16, torch.float32, seqlens, page is not None, block_size=page or 8, capacity=48, seed=3
    )
    out = fastattn.attention_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=torch.tensor(seqlens, dtype=torch.int32), k_new=k_new, v_new=v_new,
        block_table=table, window=(4, None), softcap=3.0, backend=backend,
    )
    for b, start in enumerate(seqlens):
        k_rows[b, :, start : start + Sq], v_rows[b, :, start : start + Sq] = k_new[b], v_new[b]
    lengths = [s + Sq for s in seqlens]
    rule = reference.Window(4, 0)
    expected = _per_row_reference(q, k_rows, v_rows, lengths, True, torch.float64, True, rule, 3.0)
    baseline = _per_row_reference(q, k_rows, v_rows, lengths, True, torch.float32, False, rule, 3.0)
    assert_within_baseline("out", out, expected, baseline)


@pytest.mark.parametrize(
    "backend, page, Sq, causal, B, seqlens, capacity",
    _cases([(None,), (8,)], [(1, True), (6, False)], [(4, [0, 3, 16, 30], 48), (1, [550], 560)],
           triton_default=lambda page, Sq, causal, B, seqlens, capacity: B > 1 or page is None),
)
def test_alibi_follows_each_row(backend, page, Sq, causal, B, seqlens, capacity):
    """ALiBi's distances measured from each row's own last key: rows of different lengths, and
    one long row alone (whose keys the CPU splits across threads)."""
    q, (k_cache, v_cache), table, (k_new, v_new), (k_rows, v_rows) = _make_case(
        B, 4, 2, Sq, 16, torch.float32, seqlens, page is not None, block_size=page or 8, capacity=capacity, seed=5
    )
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0])
    out = fastattn.attention_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=torch.tensor(seqlens, dtype=torch.int32), k_new=k_new, v_new=v_new,
        block_table=table, causal=causal, alibi_slopes=slopes, backend=backend,
    )
    for b, start in enumerate(seqlens):
        k_rows[b, :, start : start + Sq], v_rows[b, :, start : start + Sq] = k_new[b], v_new[b]
    lengths = [s + Sq for s in seqlens]
    expected = _per_row_reference(q, k_rows, v_rows, lengths, causal, torch.float64, True, alibi_slopes=slopes)
    baseline = _per_row_reference(q, k_rows, v_rows, lengths, causal, torch.float32, False, alibi_slopes=slopes)
    assert_within_baseline("out", out, expected, baseline)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_new_tokens_attends_to_the_cache_only(backend):
    q, (k_cache, v_cache), table, _, (k_rows, v_rows) = _make_case(2, 4, 4, 1, 8, torch.float32, None, True)
    seqlens = [3, 25]
    out, lse = fastattn.attention_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=torch.tensor(seqlens, dtype=torch.int32), block_table=table,
        return_lse=True, backend=backend,
    )
    expected = _per_row_reference(q, k_rows, v_rows, seqlens, True, torch.float64, True)
    baseline = _per_row_reference(q, k_rows, v_rows, seqlens, True, torch.float32, False)
    assert_within_baseline("out", out, expected, baseline)
    assert lse.shape == (2, 4, 1) and torch.isfinite(lse).all()


@pytest.mark.parametrize("backend", KV_CACHE_BACKENDS)
@pytest.mark.parametrize("page", [None, 8, 32])
@pytest.mark.parametrize("Sq", [1, 40])
def test_kv_cache_kernels_never_read_past_a_rows_end(backend, page, Sq):
    # The slots past each row's end hold NaN: the kernels stop at the row's length.
    q, (k_cache, v_cache), table, _, (k_rows, v_rows) = _make_case(
        2, 2, 1, Sq, 16, torch.float32, None, page is not None, block_size=page or 8, capacity=64
    )
    seqlens = [45, 50]
    for b, length in enumerate(seqlens):
        positions = torch.arange(length, 64)
        if table is None:
            k_cache[b, :, positions] = v_cache[b, :, positions] = float("nan")
        else:
            pages, offsets = table[b, positions // page].long(), positions % page
            k_cache.transpose(1, 2)[pages, offsets] = v_cache.transpose(1, 2)[pages, offsets] = float("nan")
    out = fastattn.attention_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=torch.tensor(seqlens, dtype=torch.int32), block_table=table, backend=backend
    )
    expected = _per_row_reference(q, k_rows, v_rows, seqlens, True, torch.float64, True)
    baseline = _per_row_reference(q, k_rows, v_rows, seqlens, True, torch.float32, False)
    assert_within_baseline("out", out, expected, baseline)


def _appended_rows(k_rows, v_rows, k_new, v_new, seqlens):
    """The rows as they should be after appending k_new / v_new at each row's length."""
    Sq = k_new.shape[2]
    for b, start in enumerate(seqlens):
        k_rows[b, :, start : start + Sq], v_rows[b, :, start : start + Sq] = k_new[b], v_new[b]
    return [start + Sq for start in seqlens]


# Pages smaller than, as large as and larger than the interpreted Triton kernel's 16-key tiles.
@pytest.mark.parametrize("backend", KV_CACHE_BACKENDS)
@pytest.mark.parametrize("page", [None, 4, 16, 64])
@pytest.mark.parametrize(
    "Hq, Hkv, Sq, dtype, seqlens, options",
    [
        (6, 2, 1, torch.bfloat16, [0, 61, 127, 17], {}),  # decode, GQA group of 3, an empty row
        (4, 4, 7, torch.float16, [1, 50, 0, 121], {"causal": False, "softcap": 2.0}),  # speculative chunk, MHA
        (8, 1, 3, torch.float32, [125], {"window": (40, None), "sinks": True, "alibi": True}),  # MQA, one row: split
    ],
    ids=["decode-gqa3", "chunk-mha", "mqa-split"],
)
def test_kv_cache_kernels_against_the_per_row_reference(backend, page, Hq, Hkv, Sq, dtype, seqlens, options):
    B = len(seqlens)
    q, (k_cache, v_cache), table, (k_new, v_new), (k_rows, v_rows) = _make_case(
        B, Hq, Hkv, Sq, 32, dtype, seqlens, page is not None, block_size=page or 8, capacity=128, seed=11
    )
    causal, softcap, window = options.get("causal", True), options.get("softcap", 0.0), options.get("window")
    g = torch.Generator().manual_seed(2)
    sinks = torch.randn(Hq, generator=g) if options.get("sinks") else None
    slopes = torch.rand(Hq, generator=g) if options.get("alibi") else None
    out = fastattn.attention_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=torch.tensor(seqlens, dtype=torch.int32), k_new=k_new, v_new=v_new,
        block_table=table, causal=causal, window=window, softcap=softcap or None, sinks=sinks, alibi_slopes=slopes,
        backend=backend,
    )
    lengths = _appended_rows(k_rows, v_rows, k_new, v_new, seqlens)
    rule = reference.Window(window[0], 0) if window else None
    expected, baseline = (
        _per_row_reference(q, k_rows, v_rows, lengths, causal, rows_dtype, upcast, rule, softcap, slopes, sinks)
        for rows_dtype, upcast in ((torch.float64, True), (dtype, False))
    )
    assert_within_baseline("out", out, expected, baseline)


@pytest.mark.skipif("triton" not in KV_CACHE_BACKENDS, reason="the Triton backend does not run here")
@pytest.mark.parametrize("page", [None, 8])
def test_triton_split_kv_merges_deterministically(monkeypatch, page):
    """A device of many SMs splits one row's keys across programs: the merge by log-sum-exp
    gives the unsplit result (out and lse) and the same bits on every call."""
    from fastattn.triton import configs

    seqlens = [100]
    q, (k_cache, v_cache), table, _, (k_rows, v_rows) = _make_case(
        1, 4, 2, 2, 32, torch.float32, seqlens, page is not None, block_size=page or 8, capacity=128, seed=4
    )
    sinks = torch.randn(4)

    def run():
        return fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor(seqlens, dtype=torch.int32),
                                               block_table=table, sinks=sinks, return_lse=True, backend="triton")

    chosen = []
    splits = configs.kvcache_splits
    monkeypatch.setattr(configs, "kvcache_splits", lambda *args: chosen.append(splits(*args)) or chosen[-1])
    monkeypatch.setattr(configs, "INTERPRET_SMS", 1)
    whole = run()
    monkeypatch.setattr(configs, "INTERPRET_SMS", 64)
    split, again = run(), run()
    # 8 splits (one per 16-key block of the 128-key room) share the row's 7 blocks (100 keys):
    # one split gets none and merges as empty.
    assert chosen == [1, 8, 8]
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-6)
    assert torch.equal(split[0], again[0]) and torch.equal(split[1], again[1])
    expected = _per_row_reference(q, k_rows, v_rows, seqlens, True, torch.float64, True, sinks=sinks)
    baseline = _per_row_reference(q, k_rows, v_rows, seqlens, True, torch.float32, False, sinks=sinks)
    assert_within_baseline("out", split[0], expected, baseline)


@pytest.mark.skipif("triton" not in KV_CACHE_BACKENDS, reason="the Triton backend does not run here")
def test_triton_kv_cache_op_checks():
    q, (k_cache, v_cache), table, _, _ = _make_case(2, 4, 2, 1, 16, torch.float32, None, True)
    lengths = torch.tensor([3, 30], dtype=torch.int32)
    op = torch.ops.fastattn.triton_attn_fwd_kvcache.default
    torch.library.opcheck(op, (q, k_cache, v_cache, lengths, table, 0.25, -1, 0, 0.0, None, torch.rand(2, 4)))
    with pytest.raises(ValueError, match="cache_seqlens must be an int32 tensor"):
        op(q, k_cache, v_cache, lengths.long(), table, 0.25)
    with pytest.raises(ValueError, match="block_table must be an int32 tensor"):
        op(q, k_cache, v_cache, lengths, table[:1], 0.25)
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(2, 4\)"):
        op(q, k_cache, v_cache, lengths, table, 0.25, alibi_slopes=torch.rand(4))


def test_bad_inputs_name_the_argument():
    q, (k_cache, v_cache), table, (k_new, v_new), _ = _make_case(2, 4, 2, 3, 8, torch.float32, None, True)
    lengths = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="cache_seqlens must be an int32 tensor of shape"):
        fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths.long(), block_table=table)
    with pytest.raises(ValueError, match="block_table must be an int32 tensor"):
        fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, block_table=table.long())
    with pytest.raises(ValueError, match="k_new and v_new must be given together"):
        fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, k_new=k_new, block_table=table)
    with pytest.raises(ValueError, match=r"k_new must have shape \(2, 2, 3, 8\)"):
        fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, k_new=k_new[:, :, :1],
                                        v_new=v_new, block_table=table)
    with pytest.raises(ValueError, match=r"must stay within \[0, 40\]"):
        fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([1, 38], dtype=torch.int32),
                                        k_new=k_new, v_new=v_new, block_table=table)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lengths_past_the_room_raise(backend):
    """Without new tokens the KV-cache ops check the lengths themselves (the masked path in Python)."""
    q, (k_cache, v_cache), table, _, _ = _make_case(2, 4, 2, 1, 8, torch.float32, None, True)
    for lengths in ([1, 41], [-1, 3]):
        with pytest.raises((ValueError, RuntimeError), match=r"cache_seqlens.* must .*\[0, 40\]"):
            fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor(lengths, dtype=torch.int32),
                                            block_table=table, backend=backend)


def test_decoding_step_compiles_without_graph_breaks():
    q, (k_cache, v_cache), table, (k_new, v_new), _ = _make_case(2, 4, 2, 1, 8, torch.float32, None, True)
    step = torch.compile(fastattn.attention_with_kvcache, fullgraph=True)
    lengths = torch.tensor([4, 9], dtype=torch.int32)
    eager_cache = k_cache.clone(), v_cache.clone()
    out = step(q, k_cache, v_cache, cache_seqlens=lengths, k_new=k_new, v_new=v_new, block_table=table)
    expected = fastattn.attention_with_kvcache(q, *eager_cache, cache_seqlens=lengths, k_new=k_new, v_new=v_new,
                                               block_table=table)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(k_cache, eager_cache[0], equal_nan=True)


def test_continuous_batching_example_matches_eager():
    pytest.importorskip("transformers")
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "generate_paged.py")
    spec = importlib.util.spec_from_file_location("generate_paged", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(), "paged continuous batching generated other tokens than eager"
