"""Triton backend: fused flash attention and masked softmax, forward and backward.

Importing this package registers fastattn::triton_attn_fwd, triton_attn_bwd,
triton_softmax_fwd and triton_softmax_bwd (the schemas of fastattn::attn_fwd etc.) when triton
imports; otherwise AVAILABLE is False and UNAVAILABLE_REASON says why. CPU tensors run
through the Triton interpreter when TRITON_INTERPRET=1 was set before triton was imported.
"""
try:
    import triton  # noqa: F401
except ImportError as _error:
    AVAILABLE = False
    UNAVAILABLE_REASON = f"triton is not installed ({_error})"
    INTERPRET = False

    def supports(q, k, v, mask):
        return UNAVAILABLE_REASON

    def supports_softmax(x, mask):
        return UNAVAILABLE_REASON

else:
    from .ops import INTERPRET, supports, supports_softmax

    AVAILABLE = True
    UNAVAILABLE_REASON = None

__all__ = ["AVAILABLE", "INTERPRET", "UNAVAILABLE_REASON", "supports", "supports_softmax"]
