"""Timing and peak-memory measurement of benchmark steps (zero-argument callables)."""
import ctypes
import ctypes.util
import dataclasses
import statistics
import time

import torch


@dataclasses.dataclass(frozen=True)
class Timing:
    """How long to time. CPU: at least `min_reps` rounds, more while the rounds so far took
    under `budget_s` seconds per implementation, at most `max_reps`. CUDA: do_bench's warm-up
    and repetition windows (ms), or `max_reps` event-timed runs where Triton is not installed."""

    min_reps: int = 5
    budget_s: float = 1.0
    max_reps: int = 50
    cuda_warmup_ms: int = 25
    cuda_rep_ms: int = 100


def time_cpu(make_steps, timing):
    """Times CPU steps interleaved, round by round, so that load from other processes slows
    them alike; each run gets fresh inputs from its factory, made outside the timed region.
    The caller has warmed each step up. Returns, per factory, (median ms, runs), or the
    exception its step raised (that step is left out of later rounds)."""
    times = [[] for _ in make_steps]
    failures = [None] * len(make_steps)
    rounds = 0
    while rounds < timing.max_reps and (
        rounds < timing.min_reps or sum(map(sum, times)) < timing.budget_s * len(make_steps)
    ):
        if all(failures):
            break
        for i, make_step in enumerate(make_steps):
            if failures[i] is not None:
                continue
            step = make_step()
            try:
                start = time.perf_counter()
                step()
                times[i].append(time.perf_counter() - start)
            except Exception as error:  # reported by the caller against this step only
                failures[i] = error
        rounds += 1
    return [failure or (statistics.median(t) * 1e3, len(t)) for failure, t in zip(failures, times)]


def time_named(steps, timing):
    """Median ms of each of `steps` ({name: CPU step}), warmed up once, then timed interleaved
    by time_cpu on the same inputs."""
    for step in steps.values():
        step()
    results = time_cpu([lambda s=s: s for s in steps.values()], timing)
    return {name: result[0] for name, result in zip(steps, results)}


def time_cuda(step, timing):
    """Median milliseconds of a warmed-up CUDA step and the number of timed runs."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:  # flushes L2 between runs
        times = do_bench(step, warmup=timing.cuda_warmup_ms, rep=timing.cuda_rep_ms, return_mode="all")
        return statistics.median(times), len(times)
    for _ in range(3):
        step()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(timing.max_reps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events), len(events)


def peak_memory(step, device):
    """Bytes by which one run of `step` raises peak memory above what was in use before it
    (inputs excluded, outputs and temporaries included); None where it cannot be measured.
    On CPU, call exact_cpu_peaks() first, after all timing."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return _peak_rss_delta(step)


def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def exact_cpu_peaks():
    """Makes glibc serve every allocation above 64 KiB by its own mmap, unmapped when freed, so
    resident memory follows the live tensors exactly. By default glibc raises that threshold as
    memory is freed and keeps freed blocks for reuse, so peaks would vary by a buffer from run
    to run. Irreversible and it changes allocation speed: call it after all timing."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)


def _proc_status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


def _peak_rss_delta(step):
    deltas = cpu_memory_deltas(step)
    return None if deltas is None else deltas[1]


def cpu_memory_deltas(step):
    """Linux: (resident memory after the step, peak resident memory during it), both minus
    resident memory before it, in bytes; None where /proc cannot be read. Freed heap memory is
    first returned to the OS (malloc_trim) so the step cannot reuse it unseen, and the
    kernel's peak-RSS mark is reset (clear_refs 5) so earlier peaks do not hide this one."""
    try:
        if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
            _LIBC.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status_bytes("VmRSS:")
    except OSError:
        return None
    step()
    return _proc_status_bytes("VmRSS:") - before, max(0, _proc_status_bytes("VmHWM:") - before)
