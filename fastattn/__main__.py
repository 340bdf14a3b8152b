"""Command line: `python -m fastattn info | check | bench`."""
import argparse
import json
import sys

from .benchmark.cli import add_bench_arguments
from .info import info


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastattn", description="fastattn command line")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions and which backends are usable here, and why not")
    commands.add_parser("check", help="self-test every usable backend against the reference")
    bench = commands.add_parser("bench", help="benchmark fastattn against PyTorch: table, JSON, CSV and plots")
    add_bench_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "info":
        print(json.dumps(info(), indent=2))
        return 0
    if args.command == "bench":
        from .benchmark.cli import run_bench

        return run_bench(args)
    from .selfcheck import run_checks

    return 0 if run_checks() else 1


if __name__ == "__main__":
    sys.exit(main())
