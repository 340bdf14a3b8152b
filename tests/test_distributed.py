"""Ring attention (fastattn.distributed) against attention over the whole sequence in one
process: float64 reference as ground truth, the low-precision PyTorch baseline in the ring's
dtype (tests/tolerance.py). Spawning processes costs seconds, so one spawn of 4 ranks (gloo)
runs every check twice: on all 4 ranks, then on 2 ranks, in two process groups {0, 1} and
{2, 3} at once (so ranks are also mapped from a group to the world). Each rank reports its
checks to a file; the tests below read those reports check by check."""
import dataclasses
import datetime
import functools
import json
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastattn
from fastattn import functional, reference, use_backend
from fastattn.distributed import merge_partial, ring_attention, shard, unshard
from fastattn.reference import CAUSAL, UNBOUNDED
from tolerance import assert_within_baseline

WORLD_SIZE = 4
RING_SIZES = (4, 2)
SPAWN_TIMEOUT_S = 240
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    causal: bool
    layout: str
    dtype: torch.dtype
    heads: tuple  # (Hq, Hkv)
    shard_len: int  # the whole sequence is world_size * shard_len
    head_dim: int = 32
    batch: int = 1
    scale: float = None
    backend: str = None
    seed: int = 0


CASES = [
    Case("zigzag_fp32", False, "zigzag", torch.float32, (2, 2), 16, seed=1),
    Case("zigzag_causal_fp32_gqa", True, "zigzag", torch.float32, (4, 2), 26, head_dim=40, batch=2, seed=2),
    Case("contiguous_causal_fp32_mqa", True, "contiguous", torch.float32, (4, 1), 27, head_dim=64, seed=3),
    Case("contiguous_fp32", False, "contiguous", torch.float32, (2, 2), 9, scale=0.3, seed=4),
    Case("zigzag_causal_bf16_gqa", True, "zigzag", torch.bfloat16, (4, 2), 32, seed=5),
    Case("contiguous_causal_bf16", True, "contiguous", torch.bfloat16, (2, 2), 20, head_dim=64, seed=6),
    Case("zigzag_bf16_gqa", False, "zigzag", torch.bfloat16, (6, 2), 12, seed=7),
    Case(
        "zigzag_causal_fp64_reference", True, "zigzag", torch.float64, (2, 1), 10,
        scale=0.2, backend="reference", seed=8,
    ),
]


def _attention_with_grads(q, k, v, grad_out, case, dtype, upcast):
    """Single-process reference attention on the whole sequence: out, lse, (dq, dk, dv)."""
    inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    causal = CAUSAL if case.causal else UNBOUNDED
    out, lse = reference.attention(*inputs, None, case.scale, causal, upcast=upcast)
    grads = torch.autograd.grad(out, inputs, grad_out.to(dtype))
    return out, lse, grads


def _ring_with_grads(q, k, v, grad_out, case, group):
    """Ring attention on this rank's shards; returns the whole out, lse, (dq, dk, dv)."""
    layout = case.layout
    shards = [shard(t.to(case.dtype), 2, group, layout).detach().requires_grad_() for t in (q, k, v)]
    options = dict(group=group, causal=case.causal, scale=case.scale, layout=layout)
    out, lse = ring_attention(*shards, **options, return_lse=True)
    out.backward(shard(grad_out.to(case.dtype), 2, group, layout))
    whole = [unshard(t, 2, group, layout) for t in [out, lse.unsqueeze(-1)] + [s.grad for s in shards]]
    return whole[0], whole[1].squeeze(-1), tuple(whole[2:])


def _inputs(case, world_size):
    generator = torch.Generator().manual_seed(case.seed)
    hq, hkv = case.heads
    seq = world_size * case.shard_len
    shapes = [(case.batch, hq, seq, case.head_dim)] + [(case.batch, hkv, seq, case.head_dim)] * 2
    shapes.append(shapes[0])  # grad_out
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


def _check_case(case, group):
    q, k, v, grad_out = _inputs(case, dist.get_world_size(group))
    ref = _attention_with_grads(q, k, v, grad_out, case, torch.float64, upcast=True)
    base = _attention_with_grads(q, k, v, grad_out, case, case.dtype, upcast=False)
    with use_backend(case.backend):  # None: automatic dispatch
        ring = _ring_with_grads(q, k, v, grad_out, case, group)
    for name, got, expected, baseline in zip(("out", "lse"), ring[:2], ref[:2], base[:2]):
        assert_within_baseline(name, got, expected, baseline)
    for name, got, expected, baseline in zip(("dq", "dk", "dv"), ring[2], ref[2], base[2]):
        assert_within_baseline(name, got, expected, baseline)


def _check_odd_zigzag_shard_raises(group):
    q = torch.randn(1, 2, 7, 16)
    message = f"sequence length must be even.*divisible by {2 * dist.get_world_size(group)}.*got a shard of 7"
    with pytest.raises(ValueError, match=message):
        ring_attention(q, q, q, group=group, causal=True)
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention(q, q, q, group=group, layout="striped")
    with pytest.raises(ValueError, match=r"x.shape\[2\] must be even for layout='zigzag'"):
        unshard(q, 2, group)


def _check_shard_not_divisible_raises(group):
    ranks = dist.get_world_size(group)
    x = torch.randn(1, 2, 2 * ranks + 1, 16)
    with pytest.raises(ValueError, match=rf"x.shape\[2\].*divisible by {2 * ranks} for layout='zigzag'"):
        shard(x, 2, group)
    with pytest.raises(ValueError, match=rf"divisible by {ranks} for layout='contiguous'.*got {2 * ranks + 1}"):
        shard(x, 2, group, layout="contiguous")


def _check_deterministic(group):
    case = CASES[1]
    q, k, v, grad_out = _inputs(case, dist.get_world_size(group))
    first, second = (_ring_with_grads(q, k, v, grad_out, case, group) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first[:2] + first[2], second[:2] + second[2]))


OTHER_CHECKS = {
    "odd_zigzag_shard_raises": _check_odd_zigzag_shard_raises,
    "shard_not_divisible_raises": _check_shard_not_divisible_raises,
    "deterministic": _check_deterministic,
}


def _worker(rank, port, report_dir):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=COLLECTIVE_TIMEOUT)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank takes part in creating both
    checks = {case.name: functools.partial(_check_case, case) for case in CASES} | OTHER_CHECKS
    report = {}
    for group in (None, pairs[rank // 2]):
        ring_size = dist.get_world_size(group)
        for name, check in checks.items():
            try:
                check(group)
                report[f"{ring_size}/{name}"] = None
            except Exception:
                report[f"{ring_size}/{name}"] = traceback.format_exc()
    dist.destroy_process_group()
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Runs every check on the spawned ranks; {rank: {"ring size/check": None or traceback}}."""
    report_dir = tmp_path_factory.mktemp("ring")
    context = mp.spawn(_worker, args=(_free_port(), str(report_dir)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{WORLD_SIZE} ranks did not finish within {SPAWN_TIMEOUT_S} s")
    reports = {}
    for rank in range(WORLD_SIZE):
        with open(os.path.join(report_dir, f"rank{rank}.json")) as f:
            reports[rank] = json.load(f)
    return reports


@pytest.mark.parametrize("check", [case.name for case in CASES] + list(OTHER_CHECKS))
@pytest.mark.parametrize("ring_size", RING_SIZES)
def test_ring_attention_matches_whole_sequence(reports, ring_size, check):
    key = f"{ring_size}/{check}"
    failures = {rank: report[key] for rank, report in reports.items() if report[key]}
    assert not failures, "\n".join(f"rank {rank}:\n{trace}" for rank, trace in failures.items())


def test_merge_of_blocks_equals_whole_rows_and_empty_rows_stay_zero():
    generator = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=generator) for _ in range(3))
    visible = torch.ones(6, 6, dtype=torch.bool)
    visible[0] = False  # row 0 sees no key in either block
    visible[1, :3] = False  # row 1 sees keys of the second block only
    whole, whole_lse = reference.attention(q, k, v, visible)
    out = torch.zeros(1, 2, 6, 8)
    lse = torch.full((1, 2, 6), float("-inf"))
    for keys in (slice(0, 3), slice(3, 6)):
        block_out, block_lse = reference.attention(q, k[:, :, keys], v[:, :, keys], visible[:, keys])
        merge_partial(out, lse, block_out, block_lse)
    assert not out.isnan().any()
    assert torch.equal(out[:, :, 0], torch.zeros(1, 2, 8)) and torch.isneginf(lse[:, :, 0]).all()
    torch.testing.assert_close(out, whole)
    torch.testing.assert_close(lse, whole_lse)



USABLE_CPU_BACKENDS = [name for name in ("cpu", "triton", "reference") if fastattn.backends()[name]["usable"]]


@pytest.mark.parametrize("backend", USABLE_CPU_BACKENDS)
def test_block_ops_over_two_key_blocks_equal_attention_over_all_keys(backend):
    """What each ring step relies on: merged block forwards give the whole rows' out and lse;
    block backwards given those give dq (summed over the blocks) and each block's dk, dv."""
    generator = torch.Generator().manual_seed(12)
    q = torch.randn(2, 4, 20, 16, generator=generator, requires_grad=True)
    k, v = (torch.randn(2, 2, 30, 16, generator=generator, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(2, 4, 20, 16, generator=generator)
    scale = 0.3
    whole, whole_lse = fastattn.attention(q, k, v, scale=scale, return_lse=True, backend=backend)
    dq, dk, dv = torch.autograd.grad(whole, (q, k, v), grad_out)
    q, k, v, whole = q.detach(), k.detach(), v.detach(), whole.detach()
    block = functional.block_ops(q, k, v, scale, backend)
    blocks = (slice(0, 13), slice(13, 30))
    out, lse = torch.zeros(2, 4, 20, 16), torch.full((2, 4, 20), float("-inf"))
    for keys in blocks:
        merge_partial(out, lse, *block.forward(q, k[:, :, keys], v[:, :, keys], False))
    torch.testing.assert_close(out, whole)
    torch.testing.assert_close(lse, whole_lse)
    grads = [block.backward(grad_out, q, k[:, :, keys], v[:, :, keys], whole, whole_lse, False) for keys in blocks]
    torch.testing.assert_close(grads[0][0] + grads[1][0], dq)
    torch.testing.assert_close(torch.cat([grads[0][1], grads[1][1]], 2), dk)
    torch.testing.assert_close(torch.cat([grads[0][2], grads[1][2]], 2), dv)
