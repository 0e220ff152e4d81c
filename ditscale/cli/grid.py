"""`python -m ditscale grid FILE`: expand a grid file and show its runs (nothing is submitted).

With --status, also each run's state from its run dir; with --collect, the results table.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("grid", help="grid file, or a name in configs/grids (e.g. celeba32)")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="override a grid template var")
    p.add_argument("--run-root", help="write runs under RUN_ROOT/<run id> instead of the grid's run_dir")
    p.add_argument(
        "--check-data",
        action="store_true",
        help="also check that every data URL can be read (for a data recipe: show what exists and what is missing)",
    )
    p.add_argument("--json", action="store_true", help="print the runs as JSON (id, run_dir, resources, config)")
    p.add_argument("--status", action="store_true", help="show each run's state from its run dir")
    p.add_argument("--collect", metavar="OUT", help="write results.{csv,json,md} into OUT and print the markdown")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every run")


def run(args: argparse.Namespace) -> int:
    # lazy: pydantic and fsspec at start-up
    from ditscale import results
    from ditscale.grid import check_data, expand, parse_vars, summarize
    from ditscale.launch.common import resolve_grid

    runs = expand(
        resolve_grid(args.grid)[0], vars=parse_vars(args.var), run_root=args.run_root, overrides=args.overrides
    )
    if args.check_data:
        check_data(runs)
        if runs and runs[0].recipe is not None:  # the recipe's outputs: what exists, what the launchers would build
            from ditscale.launch.prepare import format_data_plan, plan_data  # lazy: pydantic at start-up

            print(format_data_plan(plan_data(runs[0].recipe)) + "\n")
    if args.json:
        out = [
            {"id": r.id, "run_dir": r.run_dir, "resources": r.resources, "values": r.values, "config": r.config_dict()}
            for r in runs
        ]
        print(json.dumps(out, indent=2, default=str))
    elif args.status:  # the launchers' status rows, without a scheduler: what the run dirs and claims say
        # lazy: pydantic and fsspec at start-up
        from ditscale.launch.backend import Backend, status
        from ditscale.launch.common import Plan

        print(status(Backend(None), Plan(args.grid, runs)))
    elif args.collect:
        table = results.collect(runs)
        paths = results.write_table(table, args.collect)
        print(results.to_markdown(table))
        print("\nwrote " + ", ".join(str(p) for p in paths))
    else:
        print(summarize(runs))
        print(f"\n{len(runs)} runs in grid {runs[0].grid if runs else args.grid!r}")
    return 0
