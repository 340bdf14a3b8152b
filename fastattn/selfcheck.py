"""`python -m fastattn check`: a quick self-test of every usable backend against the
reference, on random inputs, forward and backward, with a pass/fail line per backend."""
import torch

from . import dispatch, functional, reference

# (B, Hq, Hkv, Sq, Sk, D, mask kind, causal): odd sizes, GQA, masks and both causal rules.
CASES = [
    (2, 4, 2, 37, 53, 64, "padding", True),
    (1, 2, 2, 1, 70, 40, "additive", False),
    (2, 2, 1, 64, 64, 128, None, True),
]


def _mask(kind, B, H, Sq, Sk, device):
    if kind == "padding":
        lengths = torch.randint(1, Sk + 1, (B,), device=device)
        return (torch.arange(Sk, device=device) < lengths[:, None]).view(B, 1, 1, Sk)
    if kind == "additive":
        return torch.randn(1, H, Sq, Sk, device=device)
    return None


def _max_error(got, expected):
    return (got.double() - expected.double()).abs().max().item()


def check_backend(backend, device, tolerance=2e-3):
    """Largest error of `backend` against the float64 reference over CASES (output, dq, dk,
    dv, softmax and its gradient)."""
    worst = 0.0
    for B, Hq, Hkv, Sq, Sk, D, kind, causal in CASES:
        q = torch.randn(B, Hq, Sq, D, device=device, requires_grad=True)
        k = torch.randn(B, Hkv, Sk, D, device=device, requires_grad=True)
        v = torch.randn(B, Hkv, Sk, D, device=device, requires_grad=True)
        mask = _mask(kind, B, Hq, Sq, Sk, device)
        out = functional.attention(q, k, v, attn_mask=mask, causal=causal, backend=backend)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
        window = reference.CAUSAL if causal else reference.UNBOUNDED
        ref, _ = reference.attention(*ref_inputs, mask, None, window)
        ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.double())
        worst = max(worst, _max_error(out, ref), *(_max_error(g, r) for g, r in zip(grads, ref_grads)))
        scores = torch.randn(B, Hq, Sq, Sk, device=device)
        probs = functional.softmax(scores, mask=mask, scale=0.5, backend=backend)
        worst = max(worst, _max_error(probs, reference.softmax(scores.double(), mask, 0.5)))
    return worst, worst <= tolerance


def run_checks(print_fn=print):
    """Checks every usable backend; returns True when all pass."""
    all_passed = True
    for name, entry in dispatch.backends().items():
        if not entry["usable"]:
            print_fn(f"{name:10s} SKIP  {entry['reason']}")
            continue
        device = "cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu"
        try:
            worst, passed = check_backend(name, device)
            detail = f"max error {worst:.2e} on {device}"
        except Exception as error:  # a crashing backend is a failed check, reported, not raised
            passed, detail = False, f"{type(error).__name__}: {error}"
        all_passed &= passed
        print_fn(f"{name:10s} {'PASS' if passed else 'FAIL'}  {detail}")
    return all_passed
