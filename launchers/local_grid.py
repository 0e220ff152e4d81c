#!/usr/bin/env python
"""Run a grid of ditscale trainings on this machine: N runs at a time, each its own `python -m ditscale train`.

The same grid files, data preparation, skip/resume semantics, --status and --collect as launchers/slurm_grid.py
and launchers/ray_grid.py: the grid's missing data is prepared first, finished runs (final.json) are skipped,
an interrupted run resumes from its latest checkpoint, and re-running the command trains only what is missing.
Ctrl-C (or SIGTERM) makes every running run checkpoint and exit; a second Ctrl-C kills them.

  python launchers/local_grid.py --grid configs/grids/digits-placement.yaml --parallel 2 --dry-run
  python launchers/local_grid.py --grid configs/grids/digits-placement.yaml --parallel 2
  python launchers/local_grid.py --grid configs/grids/digits-placement.yaml --status
  python launchers/local_grid.py --grid configs/grids/digits-placement.yaml --collect
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ditscale.cli.launch import add_grid_arguments, collect_and_print, plan_from_args
from ditscale.errors import DitscaleError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launchers/local_grid.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-j", "--parallel", type=int, default=1, help="runs trained at the same time (default: 1)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS per process (default: the grid's cpus_per_task)")
    p.add_argument("--log-dir", help="run logs and configs (default: <runs parent>/_local)")
    add_grid_arguments(
        p,
        dry_run_help="print the plan (data steps, runs, commands); start nothing",
        status_help="show each run's state (from the run dirs)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ditscale.launch import local as local_launch
    from ditscale.launch import results_dir

    try:
        plan = plan_from_args(args)
        base = results_dir(plan.runs, plan.name)
        opts = local_launch.LocalOptions(
            log_dir=Path(args.log_dir or base / "_local").absolute(),
            parallel=args.parallel,
            threads=args.threads,
            stall_after_s=args.stall_after,
        )
        if args.status:
            print(local_launch.status(plan, opts))
            return 0
        if args.collect:
            collect_and_print(plan, args.results_dir)
            return 0
        if args.dry_run:
            local_launch.run_grid(plan, opts, dry_run=True)
            return 0
        ex = local_launch.LocalExecutor(plan, opts)
        out = ex.run()
        print()
        print(local_launch.status(plan, opts))
        if ex.interrupts:
            return 130
        failed = [rid for rid, m in out.items() if not m.get("finished")]
        if failed:
            print(f"error: {len(failed)} run(s) did not finish: {', '.join(failed)}", file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except DitscaleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
