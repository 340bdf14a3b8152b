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


def run_bench(args):
    """Runs the suites named in args; prints the table and writes the files. Returns the exit
    code: 0, or 1 if the device is missing or an implementation failed."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("fastattn bench: error: --device cuda needs a CUDA GPU, and none is available here", file=sys.stderr)
        return 1
    scale = "tiny" if args.tiny else "quick" if args.quick else "full"
    names = list(dict.fromkeys(args.suite))
    unavailable = suites.unavailable(device)
    for impl, reason in unavailable.items():
        print(f"not benchmarked: {impl}: {reason}")
    results = run_cases(suites.build(names, device, scale), device, suites.TIMING[scale], progress=args.progress)
    print(report.format_table(results))
    paths = report.write_outputs(args.out, results, report.run_metadata(device, scale, names, unavailable))
    print("wrote " + ", ".join(paths))
    failed = [r for r in results if r.status == "error"]
    for r in failed:
        print(f"error: {r.suite} {r.case} {r.pass_} {r.impl}: {r.note}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None, fixed_suites=None, description="fastattn benchmarks"):
    """Entry point of the benchmarks/ scripts."""
    parser = argparse.ArgumentParser(description=description)
    add_bench_arguments(parser, fixed_suites)
    return run_bench(parser.parse_args(argv))
