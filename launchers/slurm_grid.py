#!/usr/bin/env python
"""Launch a grid of ditscale trainings on Slurm: one submitit job array, one array task per run.

Each array task is a multi-node job with one task per GPU; the torch distributed environment comes from
submitit's job environment. Runs are requeued on preemption and on timeout and resume from their latest
checkpoint; runs that already finished (final.json) are skipped, so re-running the same command after a
failure only resubmits what is missing.

The grid's missing data (its `data:` recipe) is prepared first by CPU jobs that the training arrays wait for.

  python launchers/slurm_grid.py --partition gpu --grid celeba32 --var celeba_src=/datasets/celeba --dry-run
  python launchers/slurm_grid.py --partition gpu --grid celeba32 --var celeba_src=/datasets/celeba
  python launchers/slurm_grid.py --grid celeba32 --status
  python launchers/slurm_grid.py --grid celeba32 --collect
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
        prog="launchers/slurm_grid.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--partition",
        help="Slurm partition (checked with sinfo; needed to submit and for --dry-run, not for --status or --collect)",
    )
    p.add_argument("--prepare-partition", help="partition of the data-preparation CPU jobs (default: --partition)")
    p.add_argument("--nodes", type=int, help="nodes per run (default: the grid's resources.nodes)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node = tasks per node (default: the grid's)")
    p.add_argument(
        "--time",
        help="time limit per job in a Slurm format: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS "
        "(default: the grid's timeout_min)",
    )
    p.add_argument("--account", help="Slurm account (sbatch --account)")
    p.add_argument("--qos", help="Slurm QOS (sbatch --qos)")
    p.add_argument("--array-parallelism", type=int, default=64, help="max array tasks running at once (64)")
    p.add_argument("--max-timeouts", type=int, default=3, help="requeues after a time-limit hit per run (3)")
    p.add_argument(
        "--max-failures",
        type=int,
        default=3,
        help="requeues after a failure (a rank crashed, a node or the network was lost) per run (3)",
    )
    p.add_argument("--log-dir", help="submitit logs and jobs.json (default: <runs parent>/_slurm)")
    p.add_argument("--setup", action="append", help="shell line run in the job before srun (repeatable)")
    add_grid_arguments(
        p,
        dry_run_help="print the plan and sbatch parameters; submit nothing",
        status_help="show each run's state (run dir + squeue)",
    )
    p.add_argument("--wait", action="store_true", help="after submitting, wait until every run ends")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ditscale.launch import results_dir
    from ditscale.launch import slurm as slurm_launch

    if not (args.status or args.collect or args.partition):
        mode = "--dry-run" if args.dry_run else "submitting"
        print(f"error: --partition is required for {mode} (sinfo lists the partitions)", file=sys.stderr)
        return 2
    try:
        timeout = slurm_launch.parse_time(args.time)
        resources = {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "timeout_min": timeout}
        plan = plan_from_args(args, resources)
        base = results_dir(plan.runs, plan.name)
        opts = slurm_launch.SlurmOptions(
            partition=args.partition,
            log_dir=Path(args.log_dir or base / "_slurm").absolute(),
            account=args.account,
            qos=args.qos,
            array_parallelism=args.array_parallelism,
            max_num_timeout=args.max_timeouts,
            setup=args.setup,
            max_failures=args.max_failures,
            stall_after_s=args.stall_after,
            prepare_partition=args.prepare_partition,
        )
        if args.status:
            print(slurm_launch.status(plan, opts))
            return 0
        if args.collect:
            collect_and_print(plan, args.results_dir)
            return 0
        slurm_launch.submit(plan, opts, dry_run=args.dry_run)
        if args.wait and not args.dry_run:
            ok = slurm_launch.wait(plan, opts)
            print(slurm_launch.status(plan, opts))
            return 0 if ok else 1
        return 0
    except DitscaleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
