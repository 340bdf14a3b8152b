"""Drop-in replacements for torch.nn's attention layers, running on fastattn's kernels.

    import fastattn.nn
    layer = fastattn.nn.TransformerEncoderLayer(512, 8, batch_first=True)  # new model
    model = fastattn.nn.convert(model)  # existing model: swaps torch.nn attention in place
"""
from .attention import MultiheadAttention
from .transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
    convert,
)

__all__ = [
    "MultiheadAttention",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "convert",
]
