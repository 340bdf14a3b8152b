"""`python -m fastattn bench` and the scripts in benchmarks/: arguments and the run itself."""
import argparse
import sys

import torch

from . import report, suites
from .engine import run_cases


def add_bench_arguments(parser, fixed_suites=None):
    """Adds the bench options to `parser`. With `fixed_suites`, there is no --suite option and
    those suites run (the benchmarks/ scripts)."""
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="where to run (default: cuda if available, else cpu)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer, smaller shapes (a minute or two on 2 CPU cores)")
    parser.add_argument("--out", default="bench_out", metavar="DIR", help="output folder (default: %(default)s)")
    if fixed_suites is None:
        described = "; ".join(f"{name}: {text}" for name, text in suites.DESCRIPTIONS.items())
        parser.add_argument(
            "--suite",
            nargs="+",
            choices=tuple(suites.SUITES),
            default=list(suites.SUITES),
            metavar="NAME",
            help=f"suites to run (default: all). {described}",
        )
    else:
        parser.set_defaults(suite=list(fixed_suites))
    # Tiny shapes that run in seconds: for the tests of this command, not for measurements.
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def resolve_device(requested):
    """The device to benchmark ("cpu"/"cuda"), or None with a message if CUDA is asked for
    without a GPU."""
    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("fastattn bench: error: --device cuda needs a CUDA GPU, and none is available here", file=sys.stderr)
        return None
    return device


def run_and_report(cases, device, out_dir, timing, scale, suite_names, progress=True):
    """Runs `cases`, prints the table, writes JSON, CSV and plots into out_dir. Returns the
    exit code: 0, or 1 if an implementation failed. Scripts with their own cases (models)
    call this directly."""
    unavailable = suites.unavailable(device)
    for impl, reason in unavailable.items():
        print(f"not benchmarked: {impl}: {reason}")
    results = run_cases(cases, device, timing, progress=progress)
    print(report.format_table(results))
    paths = report.write_outputs(out_dir, results, report.run_metadata(device, scale, suite_names, unavailable))
    print("wrote " + ", ".join(paths))
    failed = [r for r in results if r.status == "error"]
    for r in failed:
        print(f"error: {r.suite} {r.case} {r.pass_} {r.impl}: {r.note}", file=sys.stderr)
    return 1 if failed else 0


def run_bench(args):
    """Runs the suites named in args (parsed with add_bench_arguments). Returns the exit code:
    0, or 1 if the device is missing or an implementation failed."""
    device = resolve_device(args.device)
    if device is None:
        return 1
    scale = "tiny" if args.tiny else "quick" if args.quick else "full"
    names = list(dict.fromkeys(args.suite))
    cases = suites.build(names, device, scale)
    return run_and_report(cases, device, args.out, suites.TIMING[scale], scale, names, args.progress)


def main(argv=None, fixed_suites=None, description="fastattn benchmarks"):
    """Entry point of the benchmarks/ scripts."""
    parser = argparse.ArgumentParser(description=description)
    add_bench_arguments(parser, fixed_suites)
    return run_bench(parser.parse_args(argv))
