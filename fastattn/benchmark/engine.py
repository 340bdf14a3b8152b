"""The benchmark engine: a Case (one input configuration) holds the implementations to
compare; run_cases times each of them, forward and forward+backward, and returns Result records.

Anything can be benchmarked this way (an op, a layer, a whole model): a case only needs a
function making fresh random inputs and, per implementation, a function of those inputs
returning one output tensor.
"""
import dataclasses
import gc
import sys
import warnings
from typing import Callable, Optional

import torch

from .measure import Timing, exact_cpu_peaks, peak_memory, time_cpu, time_cuda

FWD, FWD_BWD = "fwd", "fwd+bwd"
PASSES = (FWD, FWD_BWD)


@dataclasses.dataclass
class Impl:
    """One implementation of a case.

    fn(inputs) -> output tensor, where inputs is the dict returned by Case.make_inputs.
    declines: exception types by which it refuses inputs it does not support (SDPA's
      RuntimeError "no available kernel", fastattn's ValueError for a forced backend): the
      result is then "skipped" with the message; any other exception is an "error".
    params: tensors besides the inputs that the backward pass differentiates (a model's weights).
    """

    name: str
    fn: Callable
    declines: tuple = ()
    params: tuple = ()


@dataclasses.dataclass
class Case:
    """One input configuration of a suite and the implementations compared on it.

    make_inputs(requires_grad) -> dict of fresh random tensors (never zeros); the tensors with
      requires_grad set are differentiated in the fwd+bwd pass.
    params: description copied into every record (shape, dtype, mask, causal...).
    baseline: name of the implementation speedups are relative to; on CUDA, where SDPA has
      several kernels ("sdpa-flash", ...), the fastest implementation named baseline-* counts.
    x, series: where the case goes in the plots (x: sequence length; one subplot per series).
    flops, bytes: {pass: work} for the throughput column (FLOP/s, or GB/s for memory-bound ops).
    timing: its own Timing instead of the run's (a case too slow to time more than once).
    """

    suite: str
    label: str
    params: dict
    make_inputs: Callable
    impls: list
    baseline: str
    x: int
    series: str = ""
    flops: Optional[dict] = None
    bytes: Optional[dict] = None
    passes: tuple = PASSES
    timing: Optional[Timing] = None


@dataclasses.dataclass
class Result:
    """One measurement (or the reason there is none: status "skipped" or "error")."""

    suite: str
    case: str
    pass_: str
    impl: str
    device: str
    status: str
    x: int
    series: str
    params: dict
    ms: Optional[float] = None
    reps: Optional[int] = None
    flops: Optional[int] = None
    throughput: Optional[float] = None
    unit: Optional[str] = None
    baseline: Optional[str] = None
    speedup: Optional[float] = None
    peak_mem_bytes: Optional[int] = None
    note: Optional[str] = None

    def to_dict(self):
        record = dataclasses.asdict(self)
        record["pass"] = record.pop("pass_")
        return record


def attention_flops(batch, heads_q, seq_q, seq_k, head_dim, head_dim_v=None, causal=False):
    """{pass: FLOPs} of attention: forward 2*B*H*Sq*Sk*(D + Dv) (= 4*B*H*Sq*Sk*D), halved for
    causal square attention; backward 2.5x forward, so forward+backward 3.5x."""
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    forward = 2 * batch * heads_q * seq_q * seq_k * (head_dim + head_dim_v)
    if causal and seq_q == seq_k:
        forward //= 2
    return {FWD: forward, FWD_BWD: int(3.5 * forward)}


def _leaves(inputs, impl):
    return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad] + list(impl.params)


def _step_factory(case, impl, pass_):
    """make_step() -> a zero-argument step over fresh inputs, running `pass_` once."""
    if pass_ == FWD:

        def make_step():
            inputs = case.make_inputs(False)

            def step():
                with torch.no_grad():
                    impl.fn(inputs)

            return step

        return make_step

    # The output gradient is random too. Its shape is learned from the first (warm-up) step,
    # which draws it itself; later steps get theirs drawn outside the timed region.
    output = {}

    def make_step():
        inputs = case.make_inputs(True)
        leaves = _leaves(inputs, impl)
        grad = torch.randn(**output) if output else None

        def step():
            out = impl.fn(inputs)
            output.update(size=out.shape, dtype=out.dtype, device=out.device)
            # allow_unused: a case's inputs may serve several impls (an fp32 twin of each tensor)
            torch.autograd.grad(out, leaves, torch.randn_like(out) if grad is None else grad, allow_unused=True)

        return step

    return make_step


def _record_failure(result, impl, error, device):
    if isinstance(error, torch.OutOfMemoryError):
        result.status, result.note = "skipped", "out of memory"
    else:  # reported in the table and the JSON; an "error" fails the run
        result.status = "skipped" if isinstance(error, impl.declines) else "error"
        first_line = (str(error).strip().splitlines() or [""])[0]
        result.note = f"{type(error).__name__}: {first_line}"
    gc.collect()  # the traceback's frames held tensors: free them for the next runs
    if device == "cuda":
        torch.cuda.empty_cache()


def _set_work(result, case, pass_, device):
    """FLOPs and throughput (FLOP/s, or GB/s for a case that counts bytes) of a timed result."""
    work = (case.flops or case.bytes or {}).get(pass_)
    if work is None:
        return
    if case.flops is not None:
        result.flops = work
        result.unit = "TFLOP/s" if device == "cuda" else "GFLOP/s"
    else:
        result.unit = "GB/s"
    result.throughput = work / (result.ms * 1e-3) / (1e12 if result.unit == "TFLOP/s" else 1e9)


def measure_group(case, pass_, device, timing):
    """Times every implementation of a case for one pass (on CPU interleaved, round by round).
    Returns the Results and, for those that ran, (result, step factory) for the memory pass."""
    results = [
        Result(case.suite, case.label, pass_, impl.name, device, "ok", case.x, case.series, dict(case.params))
        for impl in case.impls
    ]
    timing = case.timing or timing
    ready = []
    for result, impl in zip(results, case.impls):
        make_step = _step_factory(case, impl, pass_)
        try:
            with warnings.catch_warnings():
                if impl.declines:  # SDPA warns why a kernel declined before raising
                    warnings.simplefilter("ignore")
                make_step()()  # warm-up; also where unsupported inputs are refused
        except Exception as error:
            _record_failure(result, impl, error, device)
            continue
        ready.append((result, impl, make_step))
    if device == "cuda":
        timings = []
        for _, _, make_step in ready:
            try:
                timings.append(time_cuda(make_step(), timing))
            except Exception as error:
                timings.append(error)
    else:
        timings = time_cpu([make_step for _, _, make_step in ready], timing)
    ran = []
    for (result, impl, make_step), timed in zip(ready, timings):
        if isinstance(timed, Exception):
            _record_failure(result, impl, timed, device)
            continue
        result.ms, result.reps = timed
        _set_work(result, case, pass_, device)
        ran.append((result, make_step))
    _set_speedups(results, case.baseline)
    return results, ran


def _set_speedups(results, baseline):
    """Speedup of each result over the fastest baseline implementation of its case and pass."""
    timed = [r for r in results if r.ms is not None and (r.impl == baseline or r.impl.startswith(baseline + "-"))]
    if not timed:
        return
    best = min(timed, key=lambda r: r.ms)
    for r in results:
        if r.ms is not None:
            r.baseline, r.speedup = best.impl, best.ms / r.ms


class _Progress:
    """tqdm on stderr when installed, else a plain counter."""

    def __init__(self, total, enabled):
        self.total, self.done, self.enabled = total, 0, enabled
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True)

    def update(self, description, count=1):
        self.done += count
        if self.bar is not None:
            self.bar.set_description_str(description)
            self.bar.update(count)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {description}", file=sys.stderr, flush=True)

    def write(self, lines):
        """Prints lines to stdout without breaking the bar (tqdm redraws it below them)."""
        for line in lines:
            if self.bar is not None:
                self.bar.write(line, file=sys.stdout)
            else:
                print(line, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_cases(cases, device, timing=Timing(), progress=True, format_group=None):
    """Measures every implementation of every case, each pass; returns the Results in order.
    All timing comes first, then one more run of each step measures its peak memory.
    format_group(results of one case and pass) -> lines printed as soon as they are measured."""
    bar = _Progress(sum(len(case.impls) * len(case.passes) for case in cases), progress)
    results, ran = [], []
    try:
        for case in cases:
            for pass_ in case.passes:
                group, group_ran = measure_group(case, pass_, device, timing)
                results += group
                ran += group_ran
                if format_group is not None:
                    bar.write(format_group(group))
                bar.update(f"{case.suite} {case.label} {pass_}", len(group))
    finally:
        bar.close()
    if device == "cpu":
        exact_cpu_peaks()
    for result, make_step in ran:
        try:
            result.peak_mem_bytes = peak_memory(make_step(), device)
        except torch.OutOfMemoryError:
            result.note = "out of memory in the memory measurement run"
    return results
