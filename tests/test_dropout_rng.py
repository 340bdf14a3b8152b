"""The counter-based dropout generator: Philox-4x32-10 known answers, the C++ decisions
(csrc/philox.h) equal to the torch ones (fastattn/philox.py) bit for bit, and the reference's
dropout built on them. Dropout through the public functions on every backend, and its rng
state (seeded, fresh per call, checkpointing, compile): tests/test_dropout.py."""
import pytest
import torch
import torch.utils.checkpoint

import fastattn
from fastattn import philox, reference

# Known-answer tests of Philox-4x32-10 (Random123's kat_vectors): counter, key, output.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    words = philox.philox4x32_10([torch.tensor(c) for c in counter], [torch.tensor(k) for k in key])
    assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (1, 2, 13, 33), (2, 1, 64, 129)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("rng_state", [(0, 0), (0x0123456789ABCDEF, 77), (2**62 - 1, 2**32 - 1)])
def test_compiled_decisions_equal_the_torch_ones(shape, p, rng_state):
    state = torch.tensor(rng_state)
    compiled = torch.ops.fastattn.dropout_keep_mask(state, *shape, p)
    assert compiled.dtype == torch.bool and compiled.shape == shape
    assert torch.equal(compiled, philox.keep_mask(state, shape, p))


def test_keep_fraction_and_independence():
    keep = philox.keep_mask(torch.tensor([12345, 6]), (4, 8, 64, 64), 0.1)
    assert abs(keep.float().mean().item() - 0.9) < 0.01
    other = philox.keep_mask(torch.tensor([12345, 7]), (4, 8, 64, 64), 0.1)  # next offset
    assert abs((keep == other).float().mean().item() - (0.9**2 + 0.1**2)) < 0.01


def test_reference_dropout_applies_the_keep_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64) for _ in range(3))
    state = torch.tensor([99, 3])
    out, _ = reference.attention(q, k, v, dropout_p=0.25, rng_state=state)
    probs = torch.softmax(q @ k.transpose(-1, -2) * 8**-0.5, dim=-1)
    keep = philox.keep_mask(state, (2, 3, 9, 9), 0.25)
    torch.testing.assert_close(out, (probs * keep / 0.75) @ v)
