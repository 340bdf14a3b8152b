"""Hugging Face transformers integration: `attn_implementation="fastattn"`.

    import fastattn.integrations.transformers as fa_hf
    fa_hf.register()
    model = AutoModel.from_pretrained(path, attn_implementation="fastattn")

Every attention layer of models that go through transformers' AttentionInterface (BERT-like
encoders, GPT-2/Llama-like decoders with KV caches, BART/T5-like encoder-decoders,
cross-attention, GQA, T5's additive position bias) then runs on fastattn, with results equal
to "eager" and "sdpa" except on query rows that see no key at all (padding rows of
left-padded batches), which are zeros instead of an average over masked keys.

Packed batches (padding-free training: several sequences end to end in a row, as
`DataCollatorWithFlattening` makes them) run on `fastattn.varlen_attention`, each sequence
attending only to itself, instead of on the dense block-diagonal mask transformers builds for
them: when the `cu_seq_lens_q/k`, `max_length_q/k` kwargs arrive, or when `position_ids`
restart inside a row and the mask (if any) already separates the sequences there.

Queries against a cache (decoding steps, and prefill into a static cache, whose keys are all of
its preallocated slots) read only the filled part of each row. On CPU tensors, outside
torch.compile, the mask transformers builds is read on the host (no device to synchronise):
when it is the causal rule over each row's first keys (no padding), the call runs on
`attention_with_kvcache` with those per-row lengths and no mask; otherwise (left padding) the
keys past the last one any row sees are cut off and the rest keeps the mask. Elsewhere the
dense mask runs as is, and the kernels skip the key blocks it hides.
"""
import weakref

import torch

from ..functional import varlen_attention
from ..kvcache import attention_with_kvcache
from ..nn.attention import attend

NAME = "fastattn"


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function interface. query (B, Hq, Sq, D), key/value
    (B, Hkv, Sk, D); attention_mask None, bool (True = attend, from the "sdpa" mask builder
    registered with this function) or additive float (older transformers, custom 4-d masks);
    kwargs may carry is_causal, position_bias (T5), softcap (Gemma 2: applied by the kernel),
    s_aux (gpt-oss's attention sinks, one logit per query head: applied by the kernel) and
    sliding_window (Mistral, Gemma 2: applied by the kernel, which then skips the key
    blocks outside it, when no mask comes; a mask from transformers already holds the window).
    Returns ((B, Sq, Hq, D), None): like "sdpa", no attention weights.
    """
    if kwargs.get("head_mask") is not None:
        raise ValueError(f"attn_implementation='{NAME}' does not support head_mask; use 'eager' for this model")
    sinks = kwargs.get("s_aux")
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    dropout_p = dropout if module.training else 0.0
    packed = _packed_sequences(query, key, attention_mask, kwargs)
    if packed is not None:
        return _packed_attention(query, key, value, packed, bool(is_causal), scaling, dropout_p,
                                 kwargs.get("softcap"), sinks), None
    mask = attention_mask
    if mask is not None and mask.shape[-1] != kv_len:  # older transformers pass masks longer than the cache
        mask = mask[..., :kv_len]
    position_bias = kwargs.get("position_bias")
    if _reads_cache(query, key, value, mask, bool(is_causal), dropout_p, position_bias, sinks, kwargs):
        return _cached_attention(query, key, value, mask, scaling, kwargs.get("softcap"), sinks), None
    # Without a mask, causal layers use SDPA's rule (top-left, as transformers expects);
    # a single query needs no causal mask.
    causal = bool(is_causal) and mask is None and q_len > 1
    if causal and kv_len > q_len:  # keys past the queries (empty static-cache slots) are never seen
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    if position_bias is not None:  # T5: the learned bias is an additive mask, with its gradient
        if mask is None:
            mask = position_bias
        elif mask.dtype == torch.bool:
            mask = torch.where(mask, position_bias, float("-inf"))
        else:
            mask = position_bias + mask
    # transformers' sliding window, as its flash-attention path reads it: keys within
    # sliding_window - 1 of the query on each side (the causal rule or the mask cuts the right
    # side of decoders; encoders such as ModernBERT see both). The kernel's window is aligned
    # bottom-right, which is transformers' alignment when no mask comes (unpadded prompts) or
    # the keys are the queries (a whole prompt: a mask then holds the same window, and the
    # kernel skips the key blocks outside it instead of reading their mask entries).
    sliding_window = kwargs.get("sliding_window")
    window = None
    if sliding_window and (mask is None or q_len == kv_len):
        window = (sliding_window - 1, sliding_window - 1)
    out = attend(query, key, value, mask, causal, scaling, dropout_p, window, kwargs.get("softcap"), sinks)
    return out.transpose(1, 2).contiguous(), None


def _reads_cache(query, key, value, mask, is_causal, dropout_p, position_bias, sinks, kwargs):
    """Whether this call is causal queries against a cache, whose filled part
    `_cached_attention` can find on the host: fewer queries than keys on CPU tensors, a
    boolean (B or 1, 1, Sq, Sk) mask or, for a single query, none; no dropout, gradient,
    position bias or sliding window (sliding caches keep their own layout), not traced."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if not is_causal or q_len >= kv_len or dropout_p > 0.0 or position_bias is not None:
        return False
    if kwargs.get("sliding_window") or query.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, key, value, sinks)):
        return False
    if mask is None:
        return q_len == 1
    return mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1


def _cached_attention(query, key, value, mask, scale, softcap, sinks):
    """Attention of query (B, Hq, Sq, D) against the first keys of each row of key/value
    (B, Hkv, Sk, D) that `mask` (bool (B or 1, 1, Sq, Sk), or None: all) lets any query see.
    Row b holds L_b keys, L_b one past the last key its last query sees. When the mask is exactly
    the bottom-right causal rule over those keys, the call runs on `attention_with_kvcache`
    with cache_seqlens L_b; otherwise the keys past max_b L_b are cut off and the mask applies.
    Returns (B, Sq, Hq, D) like attention_forward."""
    batch, kv_len = query.shape[0], key.shape[2]
    if mask is None:
        lengths, longest = torch.full((batch,), kv_len, dtype=torch.int32), kv_len
    else:
        lengths, longest = _filled_keys(mask)
    if lengths is not None:
        out = attention_with_kvcache(query, key, value, cache_seqlens=lengths.expand(batch), scale=scale,
                                     softcap=softcap, sinks=sinks)
    else:
        out = attend(query, key[:, :, :longest], value[:, :, :longest], mask[..., :longest], False, scale, 0.0,
                     None, softcap, sinks)
    return out.transpose(1, 2).contiguous()


_last_filled_keys = None  # (weak reference to a mask, its version, _filled_keys(mask))


def _filled_keys(mask):
    """(lengths, longest) of a boolean (B or 1, 1, Sq, Sk) mask: longest is one past the last
    key any query sees; lengths is int32 (B or 1,), one past the last key each row's last query
    sees, when the mask is exactly the bottom-right causal rule over each row's first lengths
    keys, else None. Remembered for the last mask (unless modified since; inference tensors
    keep no version counter, so theirs are not): transformers hands the same mask to every
    layer of a forward."""
    global _last_filled_keys
    version = None if mask.is_inference() else mask._version
    if _last_filled_keys is not None and version is not None:
        ref, last_version, filled = _last_filled_keys
        if ref() is mask and last_version == version:
            return filled
    q_len, kv_len = mask.shape[2:]
    visible = mask[:, 0]  # (B or 1, Sq, Sk)
    # One past each query's last visible key (0 for a query that sees none).
    ends = torch.where(visible.any(-1), kv_len - visible.flip(-1).to(torch.uint8).argmax(-1), 0)
    lengths = ends[:, -1]
    causal_prefix = torch.arange(kv_len) < (lengths.view(-1, 1) - q_len + 1 + torch.arange(q_len)).unsqueeze(-1)
    filled = (lengths.to(torch.int32) if torch.equal(visible, causal_prefix) else None), int(ends.max())
    _last_filled_keys = weakref.ref(mask), version, filled
    return filled


def _packed_sequences(query, key, mask, kwargs):
    """(cu_seqlens_q, cu_seqlens_k, max_length_q, max_length_k) of the sequences packed into
    the rows of this call, or None when it is not a packed batch. From transformers' flash
    kwargs when given (one row), else from position_ids: a sequence starts at each row start
    and wherever the positions fall back to 0. A mask given along with restarting
    positions must hide from each sequence's first token the token before it, as the mask
    transformers builds for packed inputs does; a padding mask that does not (the positions
    then only restart, the rows are not packed) keeps the dense path, as do a sliding window and
    torch.compile (which then runs on the block-diagonal mask transformers builds)."""
    flash = [kwargs.get(name) for name in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")]
    if all(x is not None for x in flash) and query.shape[0] == 1:
        cu_q, cu_k, max_q, max_k = flash
        return cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)
    position_ids = kwargs.get("position_ids")
    batch, _, length, _ = query.shape
    if position_ids is None or kwargs.get("sliding_window") is not None or key.shape[2] != length or length < 2:
        return None
    if torch.compiler.is_compiling():  # the lengths decide shapes: traced, the dense mask path runs
        return None
    positions = position_ids.expand(batch, length)
    restarts = positions.diff(dim=-1) != 1  # (B, S - 1): token i + 1 starts a sequence
    # Packed sequences restart at position 0; other restarts (the repeated positions of
    # left padding) are not sequence boundaries.
    if not restarts.any() or (positions[:, 1:][restarts] != 0).any():
        return None
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4:
            return None
        rows, cols = restarts.nonzero(as_tuple=True)
        if mask[rows if mask.shape[0] > 1 else 0, 0, cols + 1, cols].any():
            return None
    starts = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=restarts.device), restarts], dim=1)
    bounds = torch.cat([starts.flatten().nonzero().flatten(), starts.new_tensor([batch * length], dtype=torch.int64)])
    cu = bounds.to(torch.int32)
    longest = int(cu.diff().max())
    return cu, cu, longest, longest


def _packed_attention(query, key, value, packed, causal, scale, dropout_p, softcap, sinks):
    """The rows of query (B, Hq, S, D), key and value (B, Hkv, S, D) as packed sequences;
    returns (B, S, Hq, Dv) like attention_forward."""
    batch, heads, length, _ = query.shape
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], t.shape[3]) for t in (query, key, value))
    out = varlen_attention(q, k, v, *packed, causal=causal, scale=scale, dropout_p=dropout_p, softcap=softcap,
                           sinks=sinks)
    return out.view(batch, length, heads, out.shape[-1])


def register(name=NAME):
    """Registers `attention_forward` (and, on transformers >= 4.53, the boolean "sdpa" mask
    builder it expects, which leaves sliding windows over unpadded prompts to the kernel) under
    `name`, so models accept `attn_implementation=name`.
    Returns `name`."""
    try:
        from transformers import AttentionInterface
    except ImportError as error:
        try:  # transformers < 4.50 keeps a plain dict
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        except ImportError:
            raise ImportError("fastattn's transformers integration needs transformers >= 4.48") from error
        ALL_ATTENTION_FUNCTIONS[name] = attention_forward
    else:
        AttentionInterface.register(name, attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # before 4.53 models build additive float masks themselves
        return name
    def mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
             local_size=None, **kwargs):
        """transformers' boolean "sdpa" mask, except for sliding-window layers over unpadded prompts
        with no cache (keys = queries): None, since attention_forward then hands the causal
        window to the kernel, which skips the key blocks outside it instead of reading an
        (S, S) mask."""
        whole_prompt = local_size is not None and q_length == kv_length and q_offset == 0 and kv_offset == 0
        if whole_prompt and not torch.compiler.is_compiling() and (attention_mask is None or bool(attention_mask.all())):
            return None
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                         local_size, **kwargs)

    AttentionMaskInterface.register(name, mask)
    return name
