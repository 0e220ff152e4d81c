"""The command-line options the grid launchers share (launchers/slurm_grid.py, ray_grid.py, local_grid.py): which
grid, where its runs go, and the plan / status / collect modes. The planning itself is ditscale.launch.common."""

from __future__ import annotations

import argparse
import sys

from ditscale import results
from ditscale.grid import parse_vars
from ditscale.launch.common import DEFAULT_GRID, Plan, plan_grid, resolve_grid, results_dir


def add_grid_arguments(p: argparse.ArgumentParser, *, dry_run_help: str, status_help: str) -> None:
    """The options both launchers share: which grid, where its runs go, and the plan/status/collect modes."""
    p.add_argument(
        "--grid", help=f"grid file, or a name in configs/grids (default: {DEFAULT_GRID} of the ditscale checkout)"
    )
    p.add_argument("--run-root", help="write runs under RUN_ROOT/<run id> instead of the grid's run_dir")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="set a grid template var")
    p.add_argument("--skip-data-check", action="store_true", help="do not check that data URLs can be read")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help=dry_run_help)
    mode.add_argument("--status", action="store_true", help=status_help)
    mode.add_argument("--collect", action="store_true", help="gather final metrics into results.{csv,json,md}")
    p.add_argument("--results-dir", help="where --collect writes (default: <runs parent>)")
    p.add_argument(
        "--stall-after",
        type=float,
        default=600,
        metavar="SECONDS",
        help="--status: call a running run stalled when it logged no step for this long (600)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every run")


def plan_from_args(args: argparse.Namespace, resources: dict | None = None) -> Plan:
    """Expand and validate the grid the shared options name (data URLs are not read for --status/--collect)."""
    check_data = not (args.skip_data_check or args.status or args.collect)
    grid, is_default = resolve_grid(args.grid)
    if is_default:
        print(f"grid: {grid} (the default grid; --grid FILE picks another)", file=sys.stderr, flush=True)
    plan = plan_grid(
        grid,
        vars=parse_vars(args.var),
        run_root=args.run_root,
        overrides=args.overrides,
        resources=resources,
        check_data=check_data,
    )
    plan.default_grid = is_default
    return plan


def collect_and_print(plan: Plan, results_dir_arg: str | None) -> None:
    """--collect: the results table as CSV, JSON and markdown next to the runs; the markdown is printed."""
    table = results.collect(plan.runs)
    paths = results.write_table(table, results_dir_arg or results_dir(plan.runs, plan.name))
    print(results.to_markdown(table))
    print("\nwrote " + ", ".join(str(p) for p in paths))
