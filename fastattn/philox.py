"""Philox-4x32-10 in torch operations: the dropout decisions of the fused kernels
(csrc/philox.h), reproduced bit for bit for the reference backend and the tests.

A dropout call draws an rng state `(seed, offset)` (int64 tensor of 2) from torch's generator
for the inputs' device, so torch.manual_seed reproduces a run and consecutive calls differ.
Score (b, h, i, j) of a (B, H, Sq, Sk) attention is kept when word j % 4 of
Philox(counter=(j // 4, i, b * H + h, offset), key=(seed low, seed high)) is >= floor(p * 2^32).
Values are held in int64 tensors; products are split into 16-bit halves so nothing overflows.
"""
import torch

_MASK32 = 0xFFFFFFFF
_MUL = (0xD2511F53, 0xCD9E8D57)
_WEYL = (0x9E3779B9, 0xBB67AE85)
_ROUNDS = 10
_SEED_BOUND = 2**62  # seeds below this stay positive in int64


def _mulhilo(a, multiplier):
    """(high, low) 32-bit words of a * multiplier for 32-bit a (int64 tensor)."""
    low_part = (a & 0xFFFF) * multiplier  # < 2^48
    high_part = (a >> 16) * multiplier  # < 2^48
    middle = ((high_part & 0xFFFF) << 16) + low_part  # < 2^49
    return (high_part >> 16) + (middle >> 32), middle & _MASK32


def philox4x32_10(counter, key):
    """Philox-4x32-10 blocks: counter, a sequence of four int64 tensors (broadcastable, values
    < 2^32), and key, two (tensors or ints, < 2^32). Returns the four output words (int64)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(_ROUNDS):
        hi0, lo0 = _mulhilo(c0, _MUL[0])
        hi1, lo1 = _mulhilo(c2, _MUL[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _WEYL[0]) & _MASK32, (k1 + _WEYL[1]) & _MASK32
    return c0, c1, c2, c3


def draw_rng_state(device):
    """A fresh (seed, offset) for one dropout call, from torch's generator for `device`."""
    return torch.randint(0, _SEED_BOUND, (2,), device=device, dtype=torch.int64) % torch.tensor(
        [_SEED_BOUND, 2**32], device=device
    )


def drop_threshold(p):
    """Words below this are dropped: floor(p * 2^32), as csrc/philox.h computes it."""
    return int(p * 4294967296.0)


def keep_mask(rng_state, shape, p, first_batch=0):
    """Bool (B, H, Sq, Sk): which scores dropout with probability p keeps under `rng_state`,
    for batches first_batch .. first_batch + B - 1 (one sequence of a packed batch at a time)."""
    B, H, Sq, Sk = shape
    device = rng_state.device
    seed, offset = rng_state[0], rng_state[1]
    key = (seed & _MASK32, (seed >> 32) & _MASK32)
    bh = torch.arange(first_batch * H, (first_batch + B) * H, device=device).view(B * H, 1, 1)
    row = torch.arange(Sq, device=device).view(1, Sq, 1)
    key4 = torch.arange((Sk + 3) // 4, device=device).view(1, 1, -1)
    words = philox4x32_10((key4, row, bh, offset.expand(1, 1, 1)), key)
    words = torch.stack(words, dim=-1).flatten(-2)[..., :Sk]  # word j % 4 of block j // 4
    return (words >= drop_threshold(p)).view(B, H, Sq, Sk)
