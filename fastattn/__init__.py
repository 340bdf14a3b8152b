"""fastattn: fused attention and masked-softmax kernels for PyTorch.

    import fastattn
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)   # drop-in for SDPA
    out, lse = fastattn.attention(q, k, v, causal=True, return_lse=True)  # bottom-right causal, GQA
    probs = fastattn.softmax(scores, mask=mask, scale=0.125)               # fused masked softmax
    out = fastattn.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k)  # packed sequences
    out = fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths,
                                         k_new=k, v_new=v)                 # decoding with a KV cache
    out = fastattn.distributed.ring_attention(q, k, v, causal=True)        # sequence sharded over ranks
"""
from . import nn
from ._version import __version__
from .dispatch import BACKENDS, backends, use_backend
from .functional import attention, scaled_dot_product_attention, softmax, varlen_attention
from .info import info
from .kvcache import attention_with_kvcache


def register_transformers(name="fastattn"):
    """Registers `attn_implementation=name` with Hugging Face transformers (imported only now)."""
    from .integrations.transformers import register

    return register(name)


def __getattr__(name):
    """`fastattn.distributed` (context parallelism) is imported on first use."""
    if name == "distributed":
        import importlib

        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    "BACKENDS",
    "attention",
    "attention_with_kvcache",
    "backends",
    "distributed",
    "info",
    "nn",
    "register_transformers",
    "scaled_dot_product_attention",
    "softmax",
    "use_backend",
    "varlen_attention",
]
