"""A description of this installation: versions and which backends work here."""
import importlib.metadata
import platform

import torch

from . import dispatch, ops
from .capabilities import CAPABILITIES
from ._version import __version__


def info():
    """Versions, compiled CUDA architectures and each backend's status, as a dict."""
    try:  # from the package metadata: importing triton only to read its version takes seconds
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    return {
        "fastattn": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "compiled_cuda_archs": (ops._C.cuda_archs or None) if ops._C is not None else None,
        "backends": dispatch.backends(),
        "capabilities": {name: caps.as_dict() for name, caps in CAPABILITIES.items()},
    }
