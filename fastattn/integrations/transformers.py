"""Hugging Face transformers integration: `attn_implementation="fastattn"`.

    import fastattn.integrations.transformers as fa_hf
    fa_hf.register()
    model = AutoModel.from_pretrained(path, attn_implementation="fastattn")

Every attention layer of models that go through transformers' AttentionInterface (BERT-like
encoders, GPT-2/Llama-like decoders with KV caches, BART/T5-like encoder-decoders,
cross-attention, GQA, T5's additive position bias) then runs on fastattn, with results equal
to "eager" and "sdpa" except on query rows that see no key at all (padding rows of
left-padded batches), which are zeros instead of an average over masked keys.
"""
import torch

from ..nn.attention import attend

NAME = "fastattn"


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function interface. query (B, Hq, Sq, D), key/value
    (B, Hkv, Sk, D); attention_mask None, bool (True = attend, from the "sdpa" mask builder
    registered with this function) or additive float (older transformers, custom 4-d masks);
    kwargs may carry is_causal, position_bias (T5), softcap (Gemma 2: applied by the kernel)
    and sliding_window (Mistral, Gemma 2: applied by the kernel, which then skips the key
    blocks outside it, when no mask comes; a mask from transformers already holds the window).
    Returns ((B, Sq, Hq, D), None): like "sdpa", no attention weights.
    """
    for name in ("s_aux", "head_mask"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='{NAME}' does not support {name}; use 'eager' for this model")
    q_len, kv_len = query.shape[2], key.shape[2]
    mask = attention_mask
    if mask is not None and mask.shape[-1] != kv_len:  # older transformers pass masks longer than the cache
        mask = mask[..., :kv_len]
    position_bias = kwargs.get("position_bias")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
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
    # transformers' sliding window: key kv_idx > q_idx - sliding_window, i.e. left = sliding_window - 1.
    # Only without a mask are the keys known to end at the last query (bottom-right alignment).
    sliding_window = kwargs.get("sliding_window")
    window = (sliding_window - 1, None) if sliding_window and mask is None else None
    out = attend(query, key, value, mask, causal, scaling, dropout if module.training else 0.0, window,
                 kwargs.get("softcap"))
    return out.transpose(1, 2).contiguous(), None


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
