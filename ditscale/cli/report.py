"""`python -m ditscale report --grid DIR|GRID.yaml [...]`: the study's tables and plots (ditscale.eval.report)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--grid",
        required=True,
        nargs="+",
        help="directories of run dirs, or grid files (configs/grids/*.yaml); several are reported together",
    )
    parser.add_argument("--out", default=None, help="output directory for report.md and PNGs")
    parser.add_argument("--title", default=None)


def run(args: argparse.Namespace) -> int:
    from ditscale.eval.report import report  # lazy: torch at start-up

    path = report(args.grid, args.out, args.title)
    print(f"wrote {path}")
    return 0
