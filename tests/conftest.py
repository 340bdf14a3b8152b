import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter; the variable must
# be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _runs_triton(item, params):
    """A test case runs Triton: its module tests Triton alone (TRITON_ONLY = True), or its
    parameters name the Triton backend (as "triton" or ("triton", isa))."""
    if getattr(item.module, "TRITON_ONLY", False):
        return True
    return any(v == "triton" or (isinstance(v, tuple) and v[:1] == ("triton",)) for v in params.values())


@pytest.hookimpl(tryfirst=True)  # before `-m 'not slow'` deselects
def pytest_collection_modifyitems(items):
    """Interpreted Triton runs a kernel hundreds of times slower than the CPU backend. A test
    marked `interpreted_triton_keeps(name=[values], ...)` keeps in the default run only the
    interpreted Triton cases whose parameter `name` is one of `values` (every name listed);
    its other Triton cases join the slow run. On a GPU every case runs by default."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    for item in items:
        marker = item.get_closest_marker("interpreted_triton_keeps")
        params = getattr(getattr(item, "callspec", None), "params", {})
        if marker is None or not _runs_triton(item, params):
            continue
        if any(params[name] not in values for name, values in marker.kwargs.items()):
            item.add_marker(pytest.mark.slow)
