"""`python -m fastattn bench` and the scripts in benchmarks/: arguments and the run itself."""
import argparse
import sys

import torch

from . import report, suites
from .engine import run_cases


def add_bench_arguments(parser, fixed_suites=None, default_out="bench_out"):
    """Adds the bench options to `parser`. With `fixed_suites` (a list, or {device: list}),
    there is no --suite option and those suites run (the benchmarks/ scripts). default_out
    may name the device as {device}."""
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="where to run (default: cuda if available, else cpu)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer, smaller shapes (a minute or two on 2 CPU cores)")
    parser.add_argument("--out", default=None, metavar="DIR", help=f"output folder (default: {default_out})")
    parser.set_defaults(default_out=default_out)
    if fixed_suites is None:
        described = "; ".join(f"{name}: {text}" for name, text in suites.DESCRIPTIONS.items())
        parser.add_argument(
            "--suite",
            nargs="+",
            choices=tuple(suites.SUITES),
            default=list(suites.DEFAULT_SUITES),
            metavar="NAME",
            help=f"suites to run (default: all but targets). {described}",
        )
    else:
        parser.set_defaults(suite=fixed_suites)
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


def run_and_report(cases, device, out_dir, timing, scale, suite_names, progress=True, targets=()):
    """Runs `cases`, prints the table and the `targets` (report.Target) checked against the
    results, writes JSON, CSV and plots into out_dir. Returns the exit code: 0, or 1 if an
    implementation failed (an unmet target is a measurement, not a failure). Scripts with
    their own cases (models) call this directly."""
    unavailable = suites.unavailable(device)
    for impl, reason in unavailable.items():
        print(f"not benchmarked: {impl}: {reason}")
    live = report.LiveRows(cases, device)
    results = run_cases(cases, device, timing, progress=progress, format_group=live.format_group)
    print()
    print(report.format_table(results))
    meta = report.run_metadata(device, scale, suite_names, unavailable)
    meta["roofline"] = report.roofline(results)
    if meta["roofline"]:
        print(report.format_roofline(meta["roofline"]))
    if targets:
        meta["targets"] = report.check_targets(targets, results)
        print(report.format_targets(meta["targets"]))
    paths = report.write_outputs(out_dir, results, meta)
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
    names = list(dict.fromkeys(args.suite[device] if isinstance(args.suite, dict) else args.suite))
    for name, reason in suites.unsupported(names, device).items():
        print(f"not benchmarked: suite {name} on {device}: {reason}")
        names.remove(name)
    if not names:
        return 0
    cases = suites.build(names, device, scale)
    out_dir = args.out or args.default_out.format(device=device)
    targets = suites.targets(names, device, scale)
    return run_and_report(cases, device, out_dir, suites.TIMING[scale], scale, names, args.progress, targets)


def main(argv=None, fixed_suites=None, description="fastattn benchmarks", default_out="bench_out"):
    """Entry point of the benchmarks/ scripts."""
    parser = argparse.ArgumentParser(description=description)
    add_bench_arguments(parser, fixed_suites, default_out)
    return run_bench(parser.parse_args(argv))
