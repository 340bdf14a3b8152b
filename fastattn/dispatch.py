"""Which backend runs a call, and why the others can't.

Backends, in the order automatic dispatch tries them:
  cuda       CUDA C++ kernels (fastattn._C built with CUDA), CUDA tensors
  triton     Triton kernels, CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, and
             only when forced: the interpreter is for testing, not speed)
  cpu        C++ CPU kernels (fastattn._C), CPU tensors
  reference  pure PyTorch, anything (materialises the score matrix)
A backend can be forced per call (`backend=`), for a block of code (`use_backend(name)`), or
for the process (environment variable FASTATTN_BACKEND). A forced backend that cannot run a
call raises a ValueError saying why, instead of silently running another.
"""
import contextlib
import contextvars
import os
import threading

import torch

from . import cuda_support, ops
from .capabilities import CAPABILITIES
from .reference import UNBOUNDED

BACKENDS = ("cuda", "triton", "cpu", "reference")
# Order for CUDA tensors, from H200 measurements (bf16, benchmarks/results/gpu_h200_attention.json):
# Triton is faster than the CUDA C++ kernels in all but one case measured: without a mask its
# forward is 1.15-1.9x theirs and its backward 1.3-1.7x (0.89x at D 64, S 512 causal); with a
# key-padding mask 4.1-5.3x forward and 3.2-3.6x backward. The CUDA kernels stay second for
# what Triton cannot take. SDPA's cuDNN kernel is faster still without a mask
# (Triton reaches 0.6-0.75x of its forward), but with a padding mask Triton is 1.6-1.8x it.
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}

# The backend forced by use_backend(), local to each thread and asyncio task.
_forced_backend = contextvars.ContextVar("fastattn_forced_backend", default=None)
# The same value per thread, for torch.compile: dynamo cannot read a ContextVar but reads (and
# guards on) thread-local attributes, so a compiled function recompiles when it changes.
_forced_in_thread = threading.local()


@contextlib.contextmanager
def use_backend(name):
    """Forces `name` for every fastattn call in this block, in this thread or asyncio task
    only (other threads and tasks keep their own choice)."""
    check_backend_name(name, "use_backend")
    token = _forced_backend.set(name)
    previous_in_thread = getattr(_forced_in_thread, "name", None)
    _forced_in_thread.name = name
    try:
        yield
    finally:
        _forced_backend.reset(token)
        _forced_in_thread.name = previous_in_thread


def forced_backend():
    """The backend use_backend() forces here, or None."""
    if torch.compiler.is_compiling():
        return getattr(_forced_in_thread, "name", None)
    return _forced_backend.get()


def check_backend_name(name, argument="backend"):
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS} or None, got {name!r}")


def _triton_interpreted():
    # What Triton decided when it was imported; the variable may have changed since.
    return ops.triton_backend.INTERPRET


def _has_kernel(dispatch_key):
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::attn_fwd", dispatch_key)


def _probe_build_status():
    """{backend: None if built and importable here, else the reason it is not}."""
    status = {"reference": None, "cpu": ops.C_IMPORT_ERROR, "triton": ops.TRITON_IMPORT_ERROR}
    if ops._C is not None and not _has_kernel("CPU"):
        status["cpu"] = "fastattn._C has no CPU kernels registered"
    if ops._C is None:
        status["cuda"] = ops.C_IMPORT_ERROR
    elif not ops._C.with_cuda or not _has_kernel("CUDA"):
        status["cuda"] = "fastattn._C was built without CUDA (no CUDA torch or nvcc at build time)"
    elif not torch.cuda.is_available():
        status["cuda"] = "no CUDA device is available"
    else:
        status["cuda"] = None
    if status["triton"] is None and not torch.cuda.is_available() and not _triton_interpreted():
        status["triton"] = ops.triton_backend.NO_DEVICE_REASON
    return status


# Probed once at import: torch.compile then reads a constant instead of tracing the probes.
_BUILD_STATUS = _probe_build_status()


def build_status():
    return _BUILD_STATUS


def _device_reason(backend, device):
    if backend == "cpu" and device.type != "cpu":
        return f"the cpu backend takes CPU tensors, got {device.type}"
    if backend == "cuda" and device.type != "cuda":
        return f"the cuda backend takes CUDA tensors, got {device.type}"
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and _triton_interpreted()):
        return f"the triton backend takes CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), got {device.type}"
    return None


def _under_functorch(t):
    # torch.func transforms wrap their inputs; dynamo cannot trace the check (and compiled
    # code is not run under a transform), so it is skipped while compiling.
    return not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(t)


def _common_reason(backend, t):
    """Why `backend` cannot take tensors like `t` at all (build, device, a torch.func
    transform), or None; dtypes and head dims are the capability table's."""
    if backend == "reference":
        return None
    reason = build_status()[backend] or _device_reason(backend, t.device)
    if reason is None and _under_functorch(t):
        reason = "torch.func transforms (grad, vmap, jacrev, ...) run on the reference backend: the fused ops have no functorch rules"
    return reason


def attention_reason(backend, q, k, v, mask, scale, window=UNBOUNDED, softcap=0.0, dropout_p=0.0, sinks=None,
                     alibi_slopes=None):
    """None if `backend` can run this attention call, else why not."""
    reason = _common_reason(backend, q)
    if reason is not None:
        return reason
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, mask, sinks))
    reason = _table_reason(backend, q, v, need_grad, window, softcap, dropout_p, sinks, alibi_slopes)
    if reason is not None:
        return reason
    if backend == "triton":
        return ops.triton_backend.supports(q, k, v, mask)
    if backend == "cuda":
        return cuda_support.supports(q, k, v, mask, scale=scale)
    return None


def _table_reason(backend, q, v, need_grad, window, softcap, dropout_p, sinks, alibi_slopes):
    """What the capability table says of an attention call: dtypes, head dims (forward, and
    backward when gradients are wanted) and the features its window (beyond causal), softcap,
    dropout, sinks and ALiBi need."""
    needed = {"window"} if window[:2] not in ((-1, -1), (-1, 0)) else set()
    needed |= {"softcap"} if softcap else set()
    needed |= {"dropout"} if dropout_p > 0.0 else set()
    needed |= {"sinks"} if sinks is not None else set()
    needed |= {"alibi"} if alibi_slopes is not None else set()
    caps = CAPABILITIES[backend]
    return caps.attention_reason(backend, q, v, need_grad) or caps.feature_reason(backend, needed)


def varlen_reason(backend, q, k, v, scale=None, window=UNBOUNDED, softcap=0.0, dropout_p=0.0, sinks=None,
                  alibi_slopes=None):
    """None if `backend` can run this packed (varlen) attention call, else why not."""
    reason = _common_reason(backend, q)
    if reason is not None:
        return reason
    if "varlen" not in CAPABILITIES[backend].features:
        return f"the {backend} backend does not run packed (varlen) sequences"
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks))
    reason = _table_reason(backend, q, v, need_grad, window, softcap, dropout_p, sinks, alibi_slopes)
    if reason is None and backend == "triton":
        return ops.triton_backend.supports(q, k, v, None)
    if reason is None and backend == "cuda":
        return cuda_support.supports(q, k, v, scale=scale, packed=True)
    return reason


def softmax_reason(backend, x, mask):
    """None if `backend` can run this fused softmax call, else why not."""
    reason = _common_reason(backend, x) or CAPABILITIES[backend].softmax_reason(backend, x)
    if reason is not None:
        return reason
    if backend == "triton":
        return ops.triton_backend.supports_softmax(x, mask)
    if backend == "cuda":
        return cuda_support.supports_softmax(x, mask)
    return None


def requested_backend(backend):
    """The backend the caller forced, if any: argument, then use_backend(), then FASTATTN_BACKEND."""
    check_backend_name(backend)
    name = backend or forced_backend() or os.environ.get("FASTATTN_BACKEND") or None
    check_backend_name(name, "FASTATTN_BACKEND")
    return name


def choose(reason_for, device, backend=None):
    """Picks the backend for one call. `reason_for(name)` returns None when `name` can run it."""
    forced = requested_backend(backend)
    if forced is not None:
        reason = reason_for(forced)
        if reason is not None:
            raise ValueError(f"backend {forced!r} cannot run this call: {reason}")
        return forced
    for name in AUTO_ORDER.get(device.type, ("reference",)):
        if reason_for(name) is None:
            return name
    return "reference"


def backends():
    """{backend: {"usable": bool, "reason": why not or None}} for this machine."""
    return {name: {"usable": reason is None, "reason": reason} for name, reason in build_status().items()}
