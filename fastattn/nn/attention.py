"""`MultiheadAttention`: torch.nn.MultiheadAttention computed by fastattn's kernels."""
import torch
import torch.nn.functional as F

from .. import functional
from ..reference import CAUSAL_TOP_LEFT, window_visibility


def attend(q, k, v, mask=None, causal=False, scale=None, dropout_p=0.0, window=None, softcap=None):
    """(B, H, S, D) attention for the layers: the fused kernels (with dropout where the backend
    has it). `causal` is only ever set with Sq == Sk here, where the top-left and bottom-right
    rules agree; window and softcap as in fastattn.attention."""
    return functional.attention(q, k, v, attn_mask=mask, causal=causal, scale=scale, dropout_p=dropout_p,
                                window=window, softcap=softcap)


def _check_mask_dtype(mask, name):
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating point tensor, got {mask.dtype}")


def _as_additive(mask, dtype):
    """torch's convention (bool True = ignore) as an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask


def _merge_masks(attn_mask, key_padding_mask, bsz, num_heads, tgt_len, src_len, dtype):
    """Merges torch-style masks into one fastattn mask broadcastable to (B, H, L, S):
    bool (True = attend) when both are bool, else additive float."""
    masks = []
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (tgt_len, src_len):
                raise ValueError(f"attn_mask must have shape ({tgt_len}, {src_len}), got {tuple(attn_mask.shape)}")
            masks.append(attn_mask.view(1, 1, tgt_len, src_len))
        elif attn_mask.dim() == 3:
            expected = (bsz * num_heads, tgt_len, src_len)
            if tuple(attn_mask.shape) != expected:
                raise ValueError(f"attn_mask must have shape {expected}, got {tuple(attn_mask.shape)}")
            masks.append(attn_mask.view(bsz, num_heads, tgt_len, src_len))
        else:
            raise ValueError(f"attn_mask must be 2-d or 3-d, got {attn_mask.dim()} dims")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (bsz, src_len):
            raise ValueError(
                f"key_padding_mask must have shape ({bsz}, {src_len}), got {tuple(key_padding_mask.shape)}"
            )
        masks.append(key_padding_mask.view(bsz, 1, 1, src_len))
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        keep = ~masks[0]
        return keep if len(masks) == 1 else keep & ~masks[1]
    merged = [_as_additive(m, dtype) for m in masks]
    # Float masks of another precision than q (or float32) are cast as torch's baddbmm would.
    merged = [m if m.dtype in (dtype, torch.float32) else m.to(dtype) for m in merged]
    return merged[0] if len(merged) == 1 else merged[0] + merged[1]


def _pad_keys(mask, extra):
    """Lets queries see the `extra` keys appended by bias_k / add_zero_attn."""
    if mask is None or extra == 0:
        return mask
    shape = tuple(mask.shape[:-1]) + (extra,)
    # True (attend) for bool masks, 0.0 for additive ones.
    fill = mask.new_ones(shape) if mask.dtype == torch.bool else mask.new_zeros(shape)
    return torch.cat([mask, fill], dim=-1)


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for `torch.nn.MultiheadAttention` running on fastattn's kernels.

    Same constructor, parameters (state dicts load both ways), forward signature, defaults
    and mask conventions as torch's module: `key_padding_mask` and bool `attn_mask` use
    True = ignore; float masks are added to the scores; `attn_mask` is (L, S) or
    (N * num_heads, L, S); `is_causal` is a hint that `attn_mask` is causal.

    Differences from torch:
    - `need_weights=True` (torch's default) must materialise the (N, H, L, S) weights, so it
      computes them with fastattn's fused softmax and a plain matmul instead of the fused
      attention kernel: pass `need_weights=False` for speed (the transformer layers do).
    - In training mode with `dropout > 0`, attention drops probabilities with fastattn's
      Philox decisions, inside the fused kernels where the backend has dropout.
    - A query that sees no key returns zeros (and zero weights) instead of NaN.
    """

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be (L, E) or batched 3-d, got shape {tuple(query.shape)}")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"key and value must have query's {query.dim()} dims, got {key.dim()} and {value.dim()}"
            )
        _check_mask_dtype(attn_mask, "attn_mask")
        _check_mask_dtype(key_padding_mask, "key_padding_mask")
        if is_causal and attn_mask is None:
            raise ValueError(
                "is_causal=True needs attn_mask (it is a hint that attn_mask is causal); "
                "see torch.nn.Transformer.generate_square_subsequent_mask"
            )
        is_batched = query.dim() == 3
        self_attention, shared_kv = query is key and key is value, key is value
        # Work batch-first: (N, L, E).
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        bsz, tgt_len, embed_dim = query.shape
        if embed_dim != self.embed_dim:
            raise ValueError(f"query's last dim must be embed_dim={self.embed_dim}, got {embed_dim}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != bsz:
            raise ValueError(
                f"key and value must share query's batch size and one sequence length, got "
                f"{tuple(key.shape)} and {tuple(value.shape)} for query {tuple(query.shape)}"
            )
        src_len = key.shape[1]
        q, k, v = self._in_projection(query, key, value, self_attention, shared_kv)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(bsz, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(bsz, 1, -1)], dim=1)
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = (t.unflatten(-1, (heads, head_dim)).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:
            zeros = k.new_zeros(bsz, heads, 1, head_dim)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
        keys = k.shape[2]

        causal = False
        if is_causal and key_padding_mask is None and not need_weights:
            # torch's rule: trust the hint and drop the mask (top-left causal, as SDPA).
            if keys == tgt_len:
                mask, causal = None, True
            else:
                mask = window_visibility(tgt_len, keys, CAUSAL_TOP_LEFT, q.device)
        else:
            mask = _merge_masks(attn_mask, key_padding_mask, bsz, heads, tgt_len, src_len, q.dtype)
            mask = _pad_keys(mask, keys - src_len)

        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            out, weights = _attention_with_weights(q, k, v, mask, dropout_p)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = attend(q, k, v, mask, causal, None, dropout_p)
        # (N, H, L, D) -> (N, L, E), or (L, N, E) for sequence-first outputs, contiguous as torch's.
        seq_first = is_batched and not self.batch_first
        out = out.permute(2, 0, 1, 3) if seq_first else out.transpose(1, 2)
        out = F.linear(out.flatten(2), self.out_proj.weight, self.out_proj.bias)
        if not is_batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return out, weights

    def _in_projection(self, query, key, value, self_attention, shared_kv):
        """q, k, v projections (N, S, E) with one matmul for self-attention and one for
        key/value when they are the same tensor, as torch does."""
        bias = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        if not self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        elif self_attention:
            return F.linear(query, self.in_proj_weight, bias).chunk(3, dim=-1)
        elif shared_kv:
            w_q, w_kv = self.in_proj_weight.split([self.embed_dim, 2 * self.embed_dim])
            b_kv = None if bias is None else bias[self.embed_dim :]
            return (F.linear(query, w_q, b_q), *F.linear(key, w_kv, b_kv).chunk(2, dim=-1))
        else:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def _attention_with_weights(q, k, v, mask, dropout_p):
    """Attention that also returns the (N, H, L, S) weights (need_weights=True)."""
    scores = torch.matmul(q, k.transpose(-2, -1))
    weights = functional.softmax(scores, mask=mask, scale=q.shape[-1] ** -0.5)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v), weights
