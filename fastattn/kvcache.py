"""Attention against a key/value cache, for generation: `attention_with_kvcache` appends the
new keys and values of each row in place, then lets the new queries attend to everything the
row holds (flash-attention's `flash_attn_with_kvcache` semantics).

The cache is contiguous `(B, Hkv, S_max, D)`, or paged: `(num_blocks, Hkv, block_size, D)`
blocks that an int32 `block_table (B, max_blocks)` assigns to rows, in any order. Row b holds
`cache_seqlens[b]` entries; rows of different lengths share one batch.

Backends whose capabilities list "kv_cache" (the CPU kernels and the CUDA split-KV decode
kernel: fastattn::attn_fwd_kvcache; the Triton one: fastattn::triton_attn_fwd_kvcache; see
`_kvcache_op`) read the
cache in place (pages through the block table) and stop at each row's end. Others
get the cache (gathered from its pages when paged) through `attention` with a boolean mask
of each row's valid keys and the causal rule, which their kernels use to skip the key blocks
past a row's end; there a paged cache is copied once per call, and slots past a row's end
are masked rather than never read, so they must hold finite values (allocate caches with
torch.zeros: a NaN there would reach the output as 0 * NaN). Everything stays on the device
(no host synchronisation, no data-dependent shapes), so it traces under torch.compile and
CUDA graphs. Forward only: with inputs that require grad it runs the differentiable masked
path.
"""
import torch

from . import dispatch, functional, ops, reference
from .capabilities import CAPABILITIES


def _check_cache_inputs(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-d tensor, got {shape}")
    B, Hq, Sq, D = q.shape
    if k_cache.shape[:3] != v_cache.shape[:3] or k_cache.shape[3] != D:
        raise ValueError(
            f"k_cache must be (.., Hkv, S, {D}) and v_cache agree with it in the first three dims, "
            f"got k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (B,):
        got = f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}" if isinstance(cache_seqlens, torch.Tensor) else type(cache_seqlens).__name__
        raise ValueError(f"cache_seqlens must be an int32 tensor of shape ({B},), got {got}")
    if block_table is None:
        if k_cache.shape[0] != B:
            raise ValueError(f"a contiguous k_cache must have batch size {B} like q, got {tuple(k_cache.shape)}")
    elif not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != B:
        got = f"{block_table.dtype} {tuple(block_table.shape)}" if isinstance(block_table, torch.Tensor) else type(block_table).__name__
        raise ValueError(f"block_table must be an int32 tensor of shape ({B}, max_blocks), got {got}")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together")
    if k_new is not None:
        Hkv = k_cache.shape[1]
        for name, new, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
            expected = (B, Hkv, Sq, cache.shape[3])
            if not isinstance(new, torch.Tensor) or tuple(new.shape) != expected:
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise ValueError(f"{name} must have shape {expected} (batch, kv heads, new tokens, head dim), got {got}")
            if new.dtype != cache.dtype:
                raise TypeError(f"{name} must have the cache's dtype {cache.dtype}, got {new.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens), ("block_table", block_table)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} must be on {q.device} like q, got {t.device}")


# The op of each backend whose capabilities list "kv_cache" (schema of fastattn::attn_fwd_kvcache).
_KVCACHE_OPS = {"cpu": "attn_fwd_kvcache", "triton": "triton_attn_fwd_kvcache", "cuda": "attn_fwd_kvcache"}


def _kvcache_op(backend):
    """The KV-cache forward op of `backend`."""
    return getattr(torch.ops.fastattn, _KVCACHE_OPS[backend])


def _capacity(k_cache, block_table):
    """Entries one row can hold."""
    return k_cache.shape[2] if block_table is None else block_table.shape[1] * k_cache.shape[2]


def check_room(cache_seqlens, added, capacity):
    """Raises unless every row's cache_seqlens + added entries fit in its `capacity`."""
    lengths = cache_seqlens.tolist()
    if lengths and (max(lengths) + added > capacity or min(lengths) < 0):
        raise ValueError(
            f"cache_seqlens (+ {added} new tokens) must stay within [0, {capacity}] (the cache's room per row), "
            f"got lengths up to {max(lengths) + added} and down to {min(lengths)}"
        )


def _append(cache, new, positions, block_table):
    """Writes new (B, Hkv, Sq, D) at positions (B, Sq) of each row, in place."""
    # Indexing the cache itself (not a transposed view, which index_put_ would copy whole):
    # the indexed dims come first, so the values are (B, Sq, Hkv, D).
    rows = new.transpose(1, 2)
    if block_table is None:
        batch = torch.arange(new.shape[0], device=new.device).unsqueeze(1)
        cache[batch, :, positions] = rows
    else:
        block_size = cache.shape[2]
        blocks = torch.gather(block_table, 1, (positions // block_size).to(torch.int64)).to(torch.int64)
        cache[blocks, :, positions % block_size] = rows


def _row_view(cache, block_table):
    """The cache as (B, Hkv, capacity, D): the cache itself when contiguous, its blocks
    gathered in table order when paged."""
    if block_table is None:
        return cache
    blocks = cache[block_table.to(torch.int64)]  # (B, max_blocks, Hkv, block_size, D)
    B, nblocks, H, block_size, D = blocks.shape
    return blocks.transpose(1, 2).reshape(B, H, nblocks * block_size, D)


def attention_with_kvcache(
    q, k_cache, v_cache, *, cache_seqlens, k_new=None, v_new=None, block_table=None, causal=True,
    scale=None, return_lse=False, backend=None, window=None, softcap=None, sinks=None, alibi_slopes=None,
):
    """Attention of new queries against a key/value cache, appending new keys and values first.

    q: (B, Hq, Sq, D), Hq a multiple of the cache's kv heads (GQA).
    k_cache, v_cache: (B, Hkv, S_max, D) contiguous, or (num_blocks, Hkv, block_size, D) paged
      with block_table.
    cache_seqlens: int32 (B,), the entries each row holds before this call (not updated here).
    k_new, v_new: optional (B, Hkv, Sq, D), written in place at positions
      [cache_seqlens[b], cache_seqlens[b] + Sq) of row b; the queries then see
      L_b = cache_seqlens[b] + Sq keys (L_b = cache_seqlens[b] without them).
    block_table: int32 (B, max_blocks): row b's position t lives in block
      block_table[b, t // block_size] at offset t % block_size.
    causal: query i sees keys j <= i + L_b - Sq (bottom-right, per row); else every j < L_b.
    window, softcap, sinks, alibi_slopes: as in attention(), the window and ALiBi's distances
      aligned bottom-right within each row (query i sits at position i + L_b - Sq).
    A row must have room: L_b <= S_max (contiguous) or max_blocks * block_size (paged); checked
    for CPU tensors (on a GPU the check would need a host synchronisation).
    Returns out (B, Hq, Sq, Dv) (and lse (B, Hq, Sq) float32 with return_lse).
    """
    _check_cache_inputs(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table)
    ops.check_flag("causal", causal)
    ops.check_flag("return_lse", return_lse)
    rule = ops.window_rule(causal, window)
    softcap = ops.check_softcap(softcap)
    sinks = ops.check_sinks(sinks, q.shape[1], q)
    alibi_slopes = ops.check_alibi_slopes(alibi_slopes, q.shape[0], q.shape[1], q)
    Sq = q.shape[2]
    capacity = _capacity(k_cache, block_table)
    added = Sq if k_new is not None else 0
    lengths = cache_seqlens + added if added else cache_seqlens  # keys each row sees (int32)
    # ALiBi is no feature asked of the backend: the masked path below folds it into its mask.
    chosen = dispatch.choose(
        lambda name: dispatch.attention_reason(name, q, k_cache, v_cache, None, scale, rule, softcap, sinks=sinks),
        q.device, backend,
    )
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, sinks))
    native = "kv_cache" in CAPABILITIES[chosen].features and not needs_grad
    # The KV-cache ops check the lengths of CPU tensors themselves; an append (which would
    # write out of the row) and the masked path (which would see every key) need it here.
    if (added or not native) and q.device.type == "cpu" and not torch.compiler.is_compiling():
        check_room(cache_seqlens, added, capacity)
    if k_new is not None:
        positions = cache_seqlens.to(torch.int64).unsqueeze(1) + torch.arange(Sq, device=q.device)
        _append(k_cache, k_new, positions, block_table)
        _append(v_cache, v_new, positions, block_table)
    if native:
        out, lse = _kvcache_op(chosen)(
            ops.last_dim_contiguous(q), k_cache, v_cache, lengths.contiguous(), block_table,
            float(reference.default_scale(q.shape[-1]) if scale is None else scale),
            *rule[:2], softcap, sinks, alibi_slopes,
        )
        return (out, lse) if return_lse else out
    return _masked_attention(q, k_cache, v_cache, lengths, capacity, block_table, rule, softcap, sinks, alibi_slopes,
                             scale, return_lse, chosen)


def _masked_attention(q, k_cache, v_cache, lengths, capacity, block_table, rule, softcap, sinks, alibi_slopes, scale,
                      return_lse, backend):
    """The cache through `attention`, with a mask of each row's first `lengths` keys and the
    window `rule` aligned to each row's own last key. ALiBi's distances are measured from
    each row's own diagonal too, which `attention` (aligned to the cache's capacity) cannot
    do: they join the mask as an additive (B, Hq, Sq, capacity) bias."""
    Sq = q.shape[2]
    keys = torch.arange(capacity, device=q.device)
    visible = keys < lengths.view(-1, 1, 1)  # (B, 1, capacity)
    diagonal = (lengths.view(-1, 1) - Sq + torch.arange(Sq, device=q.device)).unsqueeze(-1)  # (B, Sq, 1)
    if rule.left >= 0:
        visible = visible & (keys >= diagonal - rule.left)
    if rule.right >= 0:
        visible = visible & (keys <= diagonal + rule.right)
    mask = visible.unsqueeze(1)  # (B, 1, Sq or 1, capacity)
    if alibi_slopes is not None:
        distance = (diagonal - keys).abs().unsqueeze(1)  # (B, 1, Sq, capacity)
        bias = -alibi_slopes.view(*alibi_slopes.shape, 1, 1) * distance
        mask = bias.masked_fill(~mask, float("-inf"))
    k_rows, v_rows = _row_view(k_cache, block_table), _row_view(v_cache, block_table)
    return functional.attention(q, k_rows, v_rows, attn_mask=mask, scale=scale, return_lse=return_lse, backend=backend,
                                softcap=softcap or None, sinks=sinks)
