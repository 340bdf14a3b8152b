"""What the Triton kernels accept. Plain data (imports no triton), so dispatch and info() can
read it wherever triton is missing or not yet imported."""
import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The largest head-dim bucket with launch configurations (configs.ATTN_FWD and the backward
# tables); D and Dv are padded up to a power of two within it.
MAX_HEAD_DIM = 256
# Beyond fastattn.capabilities.COMMON_FEATURES (varlen: triton_varlen_fwd / bwd; dropout: in the
# padded and packed forward and backward kernels; sinks: folded in by the forward kernels; alibi:
# in the shared score helper of the forward and backward kernels; kv_cache: triton_attn_fwd_kvcache,
# the split-KV decode kernel).
FEATURES = frozenset({"window", "softcap", "varlen", "dropout", "sinks", "alibi", "kv_cache"})
