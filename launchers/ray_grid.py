#!/usr/bin/env python
"""Run a grid of ditscale trainings on a Ray cluster: each run a Ray Train TorchTrainer.

Same grid files, skip/resume semantics and results table as launchers/slurm_grid.py: finished runs
(final.json) are skipped, a run whose workers fail is restarted and resumes from its latest checkpoint, and
re-running the command trains only what is missing. Works with a local cluster (`ray start --head`), an
on-premises cluster, or KubeRay on Kubernetes (ray://HOST:10001). The driver blocks until the grid is done.

  python launchers/ray_grid.py --address auto --grid configs/grids/celeba32.yaml --workers-per-run 8 --gpus
  python launchers/ray_grid.py --grid configs/grids/celeba32.yaml --status
  python launchers/ray_grid.py --grid configs/grids/celeba32.yaml --collect

Exit codes: 0 every run finished, 1 some runs did not finish, 2 nothing started (a bad grid, an unreachable
address, a run that can never fit the cluster), 3 the Ray cluster was lost (the status table is printed).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ditscale.cli.launch import add_grid_arguments, collect_and_print, plan_from_args
from ditscale.errors import DitscaleError

EXIT_CLUSTER_LOST = 3  # 1: runs did not finish, 2: a user error (nothing started)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launchers/ray_grid.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--address",
        default="auto",
        help="Ray cluster: auto (RAY_ADDRESS or the local head), HOST:PORT, or ray://HOST:10001 (default: auto)",
    )
    p.add_argument("--workers-per-run", type=int, help="Ray Train workers per run (default: the grid's tasks)")
    p.add_argument("--gpus", action="store_true", help="one GPU per worker (NCCL); default: CPU workers (gloo)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker (default: the grid's)")
    p.add_argument("--max-concurrent", type=int, default=1, help="runs trained at the same time (default: 1)")
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts per run (default: 3)")
    p.add_argument("--storage", help="Ray Train bookkeeping and file_sd targets (default: <runs parent>/_ray)")
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=30,
        metavar="SECONDS",
        help="give up on an --address that does not answer after this long (30)",
    )
    p.add_argument(
        "--resource-wait",
        type=float,
        default=600,
        metavar="SECONDS",
        help="how long a run that fits the cluster may wait for busy resources before it fails (600)",
    )
    add_grid_arguments(
        p, dry_run_help="print the plan; start nothing", status_help="show each run's state (from the run dirs)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM ends the driver at once, through its clean-up (Ray's exit hooks, this driver's leftover actors)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    from ditscale import results
    from ditscale.launch import ray as ray_launch
    from ditscale.launch import results_dir

    try:
        plan = plan_from_args(args)
        base = results_dir(plan.runs, plan.name)
        if args.status:
            print(results.format_status(results.run_states(plan.runs, stall_after_s=args.stall_after)))
            return 0
        if args.collect:
            collect_and_print(plan, args.results_dir)
            return 0
        opts = ray_launch.RayOptions(
            address=None if args.address in ("", "local") else args.address,
            workers_per_run=args.workers_per_run,
            use_gpu=args.gpus,
            cpus_per_worker=args.cpus_per_worker,
            max_concurrent=args.max_concurrent,
            max_failures=args.max_failures,
            storage=Path(args.storage or base / "_ray"),
            connect_timeout_s=args.connect_timeout,
            resource_wait_s=args.resource_wait,
        )
        try:
            out = ray_launch.run_grid(plan, opts, dry_run=args.dry_run)
        except ray_launch.ClusterLostError as e:
            print(results.format_status(results.run_states(plan.runs)), flush=True)
            print(f"error: {e}", file=sys.stderr, flush=True)
            os._exit(EXIT_CLUSTER_LOST)  # nothing more to say to a dead cluster (Ray's exit hooks would wait on it)
        if args.dry_run:
            return 0
        print(results.format_status(results.run_states(plan.runs)))
        failed = [rid for rid, m in out.items() if not m.get("finished")]
        if failed:
            errors = "".join(f"\n  {rid}: {out[rid]['error']}" for rid in failed if out[rid].get("error"))
            print(f"error: {len(failed)} run(s) did not finish: {', '.join(failed)}{errors}", file=sys.stderr)
            return 1
        return 0
    except DitscaleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
