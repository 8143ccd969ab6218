"""What the ``prep`` and ``import`` command lines share: INPUT OUTPUT_DIR, ``--workers``, parsing,
usage errors and the closing summary.

Both write a site dataset from a folder they only read, and both answer a usage error with exit
code 2 and a line naming the command.
"""

from __future__ import annotations

import argparse
import os
import sys

from data_prep.prep import EXIT_USAGE


def dataset_parser(prog: str, description: str, input_dest: str, input_help: str) -> argparse.ArgumentParser:
    """A parser with the input folder (positional ``input_dest``, only read) and OUTPUT_DIR."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(input_dest, metavar=input_dest.upper(), help=input_help)
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="site dataset folder to create or update")
    return parser


def add_workers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="worker processes (default: min(4, CPUs))")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """The parsed options, or the exit code to return (0 after ``--help``, 2 for a usage error)."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse prints its own message
        return EXIT_USAGE if exc.code not in (0, None) else 0
    if args.workers < 1:
        return usage_error(parser.prog, "--workers must be at least 1")
    return args


def usage_error(prog: str, problem: object) -> int:
    """Say what is wrong on stderr, naming the command; the usage exit code (2)."""
    print(f"{prog}: {problem}", file=sys.stderr)
    return EXIT_USAGE


def summary(result, quiet: bool) -> int:
    """The summary table and where the dataset is (unless ``quiet``); the command's exit code."""
    if not quiet:
        print(result.table)
        print(f"site dataset written to {result.output_dir}")
    return result.exit_code
