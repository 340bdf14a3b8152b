"""Transformer layers and containers of torch.nn whose attention runs on fastattn.

Each class subclasses its torch.nn counterpart (same constructor, parameter names and
state dict) and swaps the inner `torch.nn.MultiheadAttention` modules for
`fastattn.nn.MultiheadAttention` in place. torch's fast paths (the fused native encoder
layer and nested tensors), which would bypass that attention, are never taken.
"""
import warnings

import torch

from .attention import MultiheadAttention

# torch.nn class -> fastattn.nn class; filled below, used by convert().
_REPLACEMENTS = {torch.nn.MultiheadAttention: MultiheadAttention}


def convert(model):
    """Makes every torch.nn.MultiheadAttention, TransformerEncoderLayer,
    TransformerDecoderLayer, TransformerEncoder, TransformerDecoder and Transformer inside
    `model` (itself included) run on fastattn, in place, keeping weights, buffers, hooks and
    module identity; returns `model`.

    Only modules whose type is exactly the torch.nn class are converted (their class is
    switched to the fastattn subclass, which adds no state). Subclasses of those classes
    defined elsewhere keep their own code, but their inner attention modules are converted.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        replacement = _REPLACEMENTS.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
            if isinstance(module, torch.nn.TransformerEncoder):
                module.use_nested_tensor = False
    return model


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """Drop-in for `torch.nn.TransformerEncoderLayer` (same arguments) with fastattn
    self-attention. Masks may be bool (True = ignore) or additive float, as in torch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        convert(self.self_attn)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        # torch's non-fast path; masks go to the attention unconverted so bool masks stay bool.
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """Drop-in for `torch.nn.TransformerDecoderLayer` (same arguments) with fastattn self-
    and cross-attention (torch's forward has no fast path, so it is reused as is)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        convert(self.self_attn)
        convert(self.multihead_attn)


class TransformerEncoder(torch.nn.TransformerEncoder):
    """Drop-in for `torch.nn.TransformerEncoder`; converts the layers it clones. Nested
    tensors are never used (`enable_nested_tensor` is accepted and ignored): padding is
    handled by masks inside the attention kernels."""

    def __init__(self, encoder_layer, num_layers, norm=None, enable_nested_tensor=True, mask_check=True):
        super().__init__(encoder_layer, num_layers, norm=norm, enable_nested_tensor=False, mask_check=mask_check)
        convert(self)


class TransformerDecoder(torch.nn.TransformerDecoder):
    """Drop-in for `torch.nn.TransformerDecoder`; converts the layers it clones."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        convert(self)


class Transformer(torch.nn.Transformer):
    """Drop-in for `torch.nn.Transformer` (same arguments) built from fastattn layers."""

    def __init__(self, *args, **kwargs):
        with warnings.catch_warnings():
            # torch's note that its nested-tensor fast path is off: irrelevant once converted.
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            super().__init__(*args, **kwargs)
        convert(self)


_REPLACEMENTS.update(
    {
        torch.nn.TransformerEncoderLayer: TransformerEncoderLayer,
        torch.nn.TransformerDecoderLayer: TransformerDecoderLayer,
        torch.nn.TransformerEncoder: TransformerEncoder,
        torch.nn.TransformerDecoder: TransformerDecoder,
        torch.nn.Transformer: Transformer,
    }
)
