"""The test rule of docs/design.md: a kernel's error against a float64 reference may be at most twice
the error of plain PyTorch computing in the kernel's own dtype, plus a small noise floor."""
import torch

EPS = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def max_error(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_baseline(name, out, ref64, baseline):
    """out: the kernel's result; ref64: float64 ground truth; baseline: PyTorch in out's dtype."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in the output"
    err, base = max_error(out, ref64), max_error(baseline, ref64)
    bound = 2 * base + EPS[out.dtype]
    assert err <= bound, f"{name}: max error {err:.3g} > 2 * baseline error {base:.3g} + eps"
