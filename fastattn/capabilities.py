"""What each backend's kernels accept (dtypes, head dims, features; forward and backward),
declared once and read by dispatch, `info()` and the tests.

The limits come from where they are enforced: the C++ CPU and CUDA constants that
fastattn._C exports (csrc/fastattn.cpp), the Triton launcher's tables
(fastattn/triton/capabilities.py). The reference takes anything.
"""
import dataclasses
from typing import Optional

import torch

from .triton import capabilities as triton_capabilities

# Every backend: GQA, masks (bool or additive, any broadcast), both causal alignments,
# the log-sum-exp output, backward. Beyond these, a backend may declare:
#   kv_cache  an attention op that reads a (paged) KV cache in place and stops at each row's
#             length (the others get the cache through `attention` with a mask)
#   window    sliding windows (attention(window=...)), key blocks outside them skipped
#   softcap   the logit cap c * tanh(s / c) (attention(softcap=...)), forward and backward
#   varlen    packed variable-length sequences (varlen_attention); dispatch skips the others
#   dropout   dropout of the probabilities in the kernels, forward and backward, with the Philox
#             decisions of csrc/philox.h regenerated from the call's rng_state (no stored mask)
#   sinks     attention sinks (attention(sinks=...)): one softmax logit per head with no value
#   alibi     ALiBi's bias -slope * |i' - j| (attention(alibi_slopes=...)), forward and backward
COMMON_FEATURES = frozenset({"gqa", "mask", "mask_grad", "causal", "lse", "backward", "softmax"})


@dataclasses.dataclass(frozen=True)
class Capabilities:
    attention_dtypes: tuple
    softmax_dtypes: tuple
    max_head_dim_fwd: Optional[int]  # None: no limit
    max_head_dim_bwd: Optional[int]
    head_dim_multiple: int = 1
    v_head_dim_may_differ: bool = True
    min_compute_capability: Optional[int] = None  # CUDA only: major * 10 + minor
    features: frozenset = COMMON_FEATURES

    def attention_reason(self, backend, q, v, need_grad):
        """None if head dims and dtype fit, else why not (names the limit and the value)."""
        d, dv = q.shape[-1], v.shape[-1]
        if q.dtype not in self.attention_dtypes:
            return f"the {backend} attention kernels take {_names(self.attention_dtypes)}, got {q.dtype}"
        if not self.v_head_dim_may_differ and dv != d:
            return f"the {backend} attention kernels need v's head dim == q's, got {dv} and {d}"
        if d % self.head_dim_multiple or dv % self.head_dim_multiple:
            return f"the {backend} attention kernels take head dims that are multiples of {self.head_dim_multiple}, got {d} and {dv}"
        for limit, direction in ((self.max_head_dim_fwd, "forward"), (self.max_head_dim_bwd if need_grad else None, "backward")):
            if limit is not None and max(d, dv) > limit:
                return f"the {backend} attention {direction} takes head dims up to {limit}, got {d} and {dv}"
        return None

    def feature_reason(self, backend, needed):
        """None if the kernels have every feature in `needed`, else which they lack."""
        missing = sorted(set(needed) - self.features)
        return f"the {backend} kernels do not support {', '.join(missing)}" if missing else None

    def softmax_reason(self, backend, x):
        if x.dtype not in self.softmax_dtypes:
            return f"the {backend} softmax kernels take {_names(self.softmax_dtypes)}, got {x.dtype}"
        return None

    def as_dict(self):
        """Plain values (dtype names, sorted features) for info() and JSON."""
        return {
            "attention_dtypes": [str(d).removeprefix("torch.") for d in self.attention_dtypes],
            "softmax_dtypes": [str(d).removeprefix("torch.") for d in self.softmax_dtypes],
            "max_head_dim_fwd": self.max_head_dim_fwd,
            "max_head_dim_bwd": self.max_head_dim_bwd,
            "head_dim_multiple": self.head_dim_multiple,
            "v_head_dim_may_differ": self.v_head_dim_may_differ,
            "min_compute_capability": self.min_compute_capability,
            "features": sorted(self.features),
        }


def _names(dtypes):
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def _from_compiled(table):
    """A Capabilities from one entry of fastattn._C.capabilities (dtype names -> dtypes)."""
    fields = {f.name for f in dataclasses.fields(Capabilities)}
    values = {key: value for key, value in table.items() if key in fields}
    for key in ("attention_dtypes", "softmax_dtypes"):
        values[key] = tuple(getattr(torch, name) for name in values[key])
    return Capabilities(**values, features=COMMON_FEATURES | frozenset(table.get("extra_features", ())))


def _table():
    float64 = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    table = {
        "reference": Capabilities(float64, float64, None, None,
                                  features=COMMON_FEATURES | {"window", "softcap", "varlen", "dropout", "sinks", "alibi"}),
        "triton": Capabilities(
            triton_capabilities.DTYPES, triton_capabilities.DTYPES,
            triton_capabilities.MAX_HEAD_DIM, triton_capabilities.MAX_HEAD_DIM,
            features=COMMON_FEATURES | triton_capabilities.FEATURES,
        ),
    }
    try:
        from . import _C
    except ImportError:  # not built: dispatch reports the build error, not these limits
        return table
    for backend in ("cpu", "cuda"):
        table[backend] = _from_compiled(_C.capabilities[backend])
    return table


CAPABILITIES = _table()
