"""Ring attention (fastattn.distributed) against one process on the whole sequence: per-rank
memory and time of causal forward+backward (zigzag layout).

    python benchmarks/ring.py [--memory-seq-len 32768] [--memory-ranks 4]
                              [--time-seq-len 16384] [--time-ranks 2] [--threads 2]
                              [--batch 1] [--heads 8] [--head-dim 64] [--repeats 3] [--out FILE]

Every figure comes from freshly spawned processes (gloo for the ranks); the one-process
baseline runs fastattn.attention on the whole sequence with --threads threads, each rank
runs ring_attention on its shard with one thread.

Memory (Linux): each process runs a small warm-up, then makes glibc serve large allocations
by mmap so that resident memory follows the live tensors (fastattn.benchmark.measure), and
measures its resident memory against what was resident before the inputs were made:
  activations  held after the forward: the inputs, output and lse the backward needs (on a
               rank: its shards); what a training step keeps per attention layer
  peak         the most during making the inputs, forward and backward (adds grad_out, the
               gradients, the blocks in transit and the float32 accumulators)
The ring's figure is the largest over its ranks.

Time: the median over --repeats of one forward+backward after a warm-up; for the ring, the
ranks start together after a barrier and a repeat takes as long as its slowest rank.

Prints a table with the targets and writes JSON (default benchmarks/results/ring.json).
"""
import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastattn  # noqa: E402
import fastattn.distributed as cp  # noqa: E402
from fastattn.benchmark import measure, report  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ring.json")
MIB = 2**20
WARMUP_SHARD_LEN = 1024
# (figure, ring / one-process ratio it must not exceed)
TARGETS = {"activations": 0.3, "time": 1.4}


def _attention_step(args, ranks, seq_len):
    """Makes this process's inputs; returns (inputs, forward) for whole-sequence or ring runs."""
    shape = (args.batch, args.heads, seq_len // ranks, args.head_dim)
    inputs = [torch.randn(shape, requires_grad=True) for _ in range(3)]
    if ranks == 1:
        return inputs, lambda: fastattn.attention(*inputs, causal=True)
    return inputs, lambda: cp.ring_attention(*inputs, causal=True, layout="zigzag")


def _forward_backward(args, ranks, seq_len):
    _, forward = _attention_step(args, ranks, seq_len)
    out = forward()
    out.backward(torch.randn_like(out))


def _measure_memory(args, ranks):
    held = {}

    def make_inputs_and_forward():
        held["inputs"], forward = _attention_step(args, ranks, args.memory_seq_len)
        held["out"] = forward()

    activations, forward_peak = measure.cpu_memory_deltas(make_inputs_and_forward)
    _, backward_peak = measure.cpu_memory_deltas(lambda: held["out"].backward(torch.randn_like(held["out"])))
    return {"activations": activations, "peak": max(forward_peak, activations + backward_peak)}


def _measure_time(args, ranks):
    seconds = []
    for _ in range(args.repeats):
        _, forward = _attention_step(args, ranks, args.time_seq_len)
        if ranks > 1:
            dist.barrier()
        start = time.perf_counter()
        out = forward()
        out.backward(torch.randn_like(out))
        seconds.append(time.perf_counter() - start)
    if ranks > 1:  # a repeat lasts as long as its slowest rank
        slowest = torch.tensor(seconds, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        seconds = slowest.tolist()
    return {"time": statistics.median(seconds) * 1e3}


def _worker(rank, ranks, port, kind, args, report_dir):
    torch.set_num_threads(args.threads if ranks == 1 else 1)
    if ranks > 1:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=ranks)
    torch.manual_seed(rank)
    if kind == "memory":  # before the warm-up allocates: memory freed under glibc's defaults stays mapped
        measure.exact_cpu_peaks()
    _forward_backward(args, ranks, WARMUP_SHARD_LEN * ranks)  # also touches the code pages the run needs
    figures = _measure_memory(args, ranks) if kind == "memory" else _measure_time(args, ranks)
    with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
        json.dump(figures, f)
    if ranks > 1:
        dist.destroy_process_group()


def run(kind, ranks, args):
    """Figures of one measurement in `ranks` fresh processes: per figure, the largest over ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as report_dir:
        mp.spawn(_worker, args=(ranks, port, kind, args, report_dir), nprocs=ranks)
        per_rank = []
        for rank in range(ranks):
            with open(os.path.join(report_dir, f"rank{rank}.json")) as f:
                per_rank.append(json.load(f))
    return {name: max(figures[name] for figures in per_rank) for name in per_rank[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-seq-len", type=int, default=32768)
    parser.add_argument("--memory-ranks", type=int, default=4)
    parser.add_argument("--time-seq-len", type=int, default=16384)
    parser.add_argument("--time-ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads of the one-process baseline")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    measurements = (("memory", args.memory_seq_len, args.memory_ranks), ("time", args.time_seq_len, args.time_ranks))
    for kind, seq_len, ranks in measurements:
        if seq_len % (2 * ranks) != 0:
            parser.error(f"--{kind}-seq-len must be divisible by 2 * --{kind}-ranks = {2 * ranks} (zigzag), got {seq_len}")

    rows = []
    for kind, seq_len, ranks in measurements:
        whole, ring = run(kind, 1, args), run(kind, ranks, args)
        for figure in whole:
            rows.append({
                "figure": figure, "seq_len": seq_len, "ranks": ranks,
                "one_process": whole[figure], "ring_per_rank": ring[figure],
                "ratio": ring[figure] / whole[figure], "target_ratio": TARGETS.get(figure),
            })

    print(f"ring attention, causal zigzag fwd+bwd, B={args.batch} H={args.heads} D={args.head_dim} float32; "
          f"one process: {args.threads} threads, ranks: 1 thread each")
    print(f"{'figure':<12} {'seq':>6} {'ranks':>5} {'one process':>12} {'ring (worst rank)':>18} {'ratio':>6}  target")
    for row in rows:
        unit, divisor = ("ms", 1) if row["figure"] == "time" else ("MiB", MIB)
        target = row["target_ratio"]
        verdict = "-" if target is None else f"<= {target}: {'met' if row['ratio'] <= target else 'NOT met'}"
        one_process, ring = row["one_process"] / divisor, row["ring_per_rank"] / divisor
        print(f"{row['figure']:<12} {row['seq_len']:>6} {row['ranks']:>5} {one_process:>8.0f} {unit:<3}"
              f" {ring:>14.0f} {unit:<3} {row['ratio']:>6.2f}  {verdict}")

    settings = {name: value for name, value in vars(args).items() if name != "out"}  # no machine paths
    record = {"command": report.command_line(), "settings": settings, "rows": rows}
    record.update(report.environment("cpu"))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
