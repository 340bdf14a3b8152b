"""Context parallelism: ring attention over torch.distributed (gloo on CPU, NCCL on GPU).

    import fastattn.distributed as cp
    q, k, v = (cp.shard(t, dim=2) for t in (q, k, v))        # this rank's part of the sequence
    out = cp.ring_attention(q, k, v, causal=True)             # this rank's part of the output
    whole = cp.unshard(out, dim=2)                            # the whole sequence, on every rank

The sequence dimension is split across the P ranks of a process group. Each rank keeps its
queries and passes its keys/values around the ring: at each of P steps it computes attention
of its queries against the block it holds (any fastattn backend, through functional.block_ops)
while the next block is already in transit, and merges the partial result into its running
output by log-sum-exp. The backward pass sends the blocks around the same ring again, with
their dK/dV accumulators travelling alongside until they reach their owner.

Layouts (how the whole sequence maps to ranks):
  "contiguous"  rank r holds chunk r of P equal chunks.
  "zigzag"      rank r holds chunks r and 2P-1-r of 2P equal chunks, so that under a causal
                mask every rank has the same amount of work (with "contiguous" the last rank
                does P times the work of the first).
"""
import torch
import torch.distributed as dist

from . import functional, ops

LAYOUTS = ("zigzag", "contiguous")
_KV_TAG, _GRAD_TAG = 0, 2  # message tags of the key/value blocks and of their gradients (2 each)


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _chunks_per_rank(layout):
    return 2 if layout == "zigzag" else 1


def _check_shard_length(length, size, layout, name):
    """A zigzag shard is 2 equal chunks: its length must be even."""
    if layout == "zigzag" and length % 2 != 0:
        raise ValueError(
            f"{name} must be even for layout='zigzag' (a shard is 2 of 2P equal chunks, so the whole "
            f"sequence must be divisible by {2 * size}), got a shard of {length}"
        )


def shard(x, dim, group=None, layout="zigzag"):
    """This rank's part of `x` along `dim` (the sequence dimension) under `layout`.
    x.shape[dim] must be divisible by 2P for "zigzag", by P for "contiguous" (P: the group's
    size). No communication: every rank passes the whole `x`."""
    _check_layout(layout)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    parts = size * _chunks_per_rank(layout)
    if x.shape[dim] % parts != 0:
        raise ValueError(
            f"x.shape[{dim}] (the sequence length) must be divisible by {parts} for layout={layout!r} "
            f"over {size} ranks, got {x.shape[dim]}"
        )
    chunks = x.chunk(parts, dim)
    if layout == "zigzag":
        return torch.cat([chunks[rank], chunks[parts - 1 - rank]], dim)
    return chunks[rank]


def unshard(x, dim, group=None, layout="zigzag"):
    """The whole sequence from every rank's shard `x` (all_gather; every rank gets it).
    Not differentiable: for results and checks."""
    _check_layout(layout)
    size = dist.get_world_size(group)
    _check_shard_length(x.shape[dim], size, layout, f"x.shape[{dim}]")
    gathered = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(size)]
    dist.all_gather(gathered, x.contiguous(), group=group)
    if layout == "zigzag":
        halves = [part.chunk(2, dim) for part in gathered]
        return torch.cat([first for first, _ in halves] + [second for _, second in reversed(halves)], dim)
    return torch.cat(gathered, dim)


class _Transfer:
    """Tensors in transit from the previous rank; wait() returns them once they arrived (and
    this rank's own sends have completed, so their buffers may be reused)."""

    def __init__(self, received, works):
        self.received, self.works = received, works

    def wait(self):
        for work in self.works:
            work.wait()
        return self.received


class _Ring:
    """This rank's place in the group: it sends to the next rank and receives from the previous."""

    def __init__(self, group):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next, self.previous = to_global((self.rank + 1) % self.size), to_global((self.rank - 1) % self.size)

    def pass_on(self, tensors, tag):
        """Starts sending `tensors` (contiguous) to the next rank and receiving tensors of the
        same shapes from the previous one, with message tags tag, tag+1, ..."""
        if self.size == 1:
            return _Transfer(tensors, [])
        received = [torch.empty_like(t) for t in tensors]
        p2p = [dist.P2POp(dist.isend, t, self.next, self.group, tag + i) for i, t in enumerate(tensors)]
        p2p += [dist.P2POp(dist.irecv, t, self.previous, self.group, tag + i) for i, t in enumerate(received)]
        return _Transfer(received, dist.batch_isend_irecv(p2p))

    def source(self, step):
        """The rank whose key/value block this rank holds at `step`."""
        return (self.rank - step) % self.size


def _visible_part(layout, causal, rank, source, shard_len):
    """Which of this rank's query rows see which of the keys held by rank `source`, and under
    which rule: (query rows, key rows, causal) as slices of the two shards, or None when no
    query sees any of those keys (the block gets no work).

    In both layouts a shard's positions increase with the whole sequence's, so the shard
    against itself is plain causal attention. Other blocks are fully visible or hidden:
      contiguous: earlier ranks' keys are all visible, later ranks' all hidden.
      zigzag (rank r holds chunks r and 2P-1-r): of an earlier rank s < r, chunk s is seen by
        both query chunks and chunk 2P-1-s (> 2P-1-r) by neither; of a later rank s > r, both
        chunks (s and 2P-1-s, both in (r, 2P-1-r)) are seen by the second query chunk only.
    """
    everything = slice(None)
    if not causal:
        return everything, everything, False
    if source == rank:
        return everything, everything, True
    if layout == "contiguous":
        return (everything, everything, False) if source < rank else None
    chunk = shard_len // 2
    if source < rank:
        return everything, slice(0, chunk), False
    return slice(chunk, None), everything, False


def merge_partial(out, lse, block_out, block_lse):
    """Merges the attention of some rows over one more block of keys (block_out, block_lse)
    into their running result (out and lse, float32 or float64), in place. Each part weighs
    exp(its lse - the merged lse); rows whose merged lse is -inf (no key seen in any part)
    keep out = 0, never NaN."""
    merged = torch.logaddexp(lse, block_lse)
    finite_merged = torch.where(torch.isneginf(merged), torch.zeros_like(merged), merged)
    out.mul_(torch.exp(lse - finite_merged).unsqueeze(-1))
    out.add_(block_out.to(out.dtype) * torch.exp(block_lse - finite_merged).unsqueeze(-1))
    lse.copy_(merged)


def _rows(t, rows):
    return t[:, :, rows]


def _accumulation_dtype(dtype):
    """float32 for the low-precision dtypes and float32 itself; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _ring_forward(q, k, v, ring, causal, scale, layout):
    block = functional.block_ops(q, k, v, scale)
    accumulation = _accumulation_dtype(q.dtype)
    out = q.new_zeros(q.shape[:-1] + v.shape[-1:], dtype=accumulation)
    lse = q.new_full(q.shape[:-1], float("-inf"), dtype=accumulation)
    kv = (k, v)
    for step in range(ring.size):
        transfer = ring.pass_on(kv, _KV_TAG) if step + 1 < ring.size else None
        part = _visible_part(layout, causal, ring.rank, ring.source(step), q.shape[2])
        if part is not None:
            rows, keys, block_causal = part
            partial = block.forward(_rows(q, rows), _rows(kv[0], keys), _rows(kv[1], keys), block_causal)
            merge_partial(_rows(out, rows), _rows(lse, rows), *partial)
            del partial  # freed before the next block's is made
        if transfer is not None:
            kv = transfer.wait()
    return out.to(q.dtype), lse


def _ring_backward(grad_out, q, k, v, out, lse, ring, causal, scale, layout):
    """The forward's ring again: each step adds the held block's share of dq locally and its
    dk, dv to the accumulators that travel with the block back to its owner (float32 for
    low-precision inputs, so the sum over ranks is not rounded at every hop)."""
    block = functional.block_ops(q, k, v, scale)
    accumulation = _accumulation_dtype(q.dtype)
    dq = torch.zeros_like(q, dtype=accumulation)
    kv = (k, v)
    grads_in_transit = None
    for step in range(ring.size):
        transfer = ring.pass_on(kv, _KV_TAG) if step + 1 < ring.size else None
        part = _visible_part(layout, causal, ring.rank, ring.source(step), q.shape[2])
        if part is not None:
            rows, keys, block_causal = part
            block_dq, block_dk, block_dv = block.backward(
                _rows(grad_out, rows), _rows(q, rows), _rows(kv[0], keys), _rows(kv[1], keys),
                _rows(out, rows), _rows(lse, rows), block_causal,
            )
            _rows(dq, rows).add_(block_dq)
        if grads_in_transit is None:  # step 0: the accumulators of this rank's own block start here
            dk, dv = (torch.zeros_like(t, dtype=accumulation) for t in kv)
        else:
            dk, dv = grads_in_transit.wait()
        if part is not None:
            _rows(dk, keys).add_(block_dk)
            _rows(dv, keys).add_(block_dv)
            del block_dq, block_dk, block_dv  # freed before the next block's are made
        grads_in_transit = ring.pass_on((dk, dv), _GRAD_TAG)  # after the last step: to the owner
        if transfer is not None:
            kv = transfer.wait()
    dk, dv = grads_in_transit.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring, causal, scale, layout):
        out, lse = _ring_forward(q, k, v, ring, causal, scale, layout)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.causal, ctx.scale, ctx.layout = ring, causal, scale, layout
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(grad_out, q, k, v, out, lse, ctx.ring, ctx.causal, ctx.scale, ctx.layout)
        return dq, dk, dv, None, None, None, None


def ring_attention(q, k, v, *, group=None, causal=False, scale=None, layout="zigzag", return_lse=False):
    """Attention over a sequence sharded across the ranks of `group` (default: the whole world).

    q (B, Hq, S/P, D), k (B, Hkv, S/P, D), v (B, Hkv, S/P, Dv): this rank's shard of the
    sequence under `layout` (see shard()); Hq a multiple of Hkv (GQA) as in fastattn.attention.
    Returns this rank's shard of attention over the whole sequence, (B, Hq, S/P, Dv), and with
    return_lse=True also its log-sum-exp (B, Hq, S/P), float32 (float64 for float64 inputs);
    the lse carries no gradient.
    causal: query i sees keys j <= i of the whole sequence. scale: default 1/sqrt(D).
    Every rank must call this with
    shards of the same length; for layout="zigzag" that length must be even (the sequence
    divisible by 2P). Deterministic: partial results are merged in a fixed order.
    """
    ops.check_attention_inputs(q, k, v, None)
    _check_layout(layout)
    if k.shape[2] != q.shape[2]:
        raise ValueError(
            f"key and query must be shards of one sequence: equal lengths, got {k.shape[2]} and {q.shape[2]}"
        )
    ring = _Ring(group)
    _check_shard_length(q.shape[2], ring.size, layout, "query's sequence length")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    k, v = k.contiguous(), v.contiguous()  # sent and received as dense buffers
    out, lse = _RingAttention.apply(q, k, v, ring, causal, scale, layout)
    return (out, lse) if return_lse else out
