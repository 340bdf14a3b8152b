"""Triton backend: fused flash attention and masked softmax, forward and backward.

The kernels can run only on a CUDA device, or on CPU tensors through the Triton interpreter
(TRITON_INTERPRET set before fastattn, and so triton, is imported). Importing triton and the parts of torch its
launchers need (inductor, dynamo) adds seconds, so this package loads them only in those two
cases; elsewhere it answers from whether triton is installed and leaves it unimported.

When loaded, fastattn::triton_attn_fwd, triton_attn_bwd, triton_softmax_fwd,
triton_softmax_bwd, triton_varlen_fwd, triton_varlen_bwd and triton_attn_fwd_kvcache (the
schemas of fastattn::attn_fwd etc.) are registered and AVAILABLE is
True; otherwise UNAVAILABLE_REASON says why.
"""
import importlib.util
import os

import torch

INTERPRET = False
NO_DEVICE_REASON = (
    "no CUDA device (set TRITON_INTERPRET=1 before importing fastattn to run the kernels interpreted on CPU)"
)


def _unavailable(reason):
    def why_not(*args):
        return reason

    return False, reason, why_not, why_not


if importlib.util.find_spec("triton") is None:
    AVAILABLE, UNAVAILABLE_REASON, supports, supports_softmax = _unavailable("triton is not installed")
elif not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET")):
    AVAILABLE, UNAVAILABLE_REASON, supports, supports_softmax = _unavailable(NO_DEVICE_REASON)
else:
    try:
        from .ops import INTERPRET, supports, supports_softmax
    except ImportError as error:
        AVAILABLE, UNAVAILABLE_REASON, supports, supports_softmax = _unavailable(
            f"triton is installed but does not import ({error})"
        )
    else:
        AVAILABLE, UNAVAILABLE_REASON = True, None

__all__ = ["AVAILABLE", "INTERPRET", "NO_DEVICE_REASON", "UNAVAILABLE_REASON", "supports", "supports_softmax"]
