"""One command line for every launch backend: `python launchers/<backend>_grid.py ...` and
`python -m ditscale launch BACKEND ...` are the same program.

The options every backend shares (which grid, where its runs go, --var, overrides, --dry-run / --status /
--collect) are here; each backend adds its own (`Backend.add_arguments`) and builds its options from them
(`Backend.from_args`). The flow itself is ditscale.launch.backend.launch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ditscale import results
from ditscale.errors import DitscaleError
from ditscale.grid import parse_vars
from ditscale.launch import records, rows
from ditscale.launch.backend import BACKENDS, launch, load, status
from ditscale.launch.common import DEFAULT_GRID, Plan, plan_grid, resolve_grid, results_dir


def add_grid_arguments(p: argparse.ArgumentParser, *, dry_run_help: str, status_help: str) -> None:
    """The options every launcher shares: which grid, where its runs go, and the plan/status/collect modes."""
    p.add_argument(
        "--grid", help=f"grid file, or a name in configs/grids (default: {DEFAULT_GRID} of the ditscale checkout)"
    )
    p.add_argument("--run-root", help="write runs under RUN_ROOT/<run id> instead of the grid's run_dir")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="set a grid template var")
    p.add_argument("--skip-data-check", action="store_true", help="do not check that data URLs can be read")
    p.add_argument("--log-dir", help="launch records and logs (default: <runs parent>/_<backend>)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help=dry_run_help)
    mode.add_argument("--status", action="store_true", help=status_help)
    mode.add_argument("--collect", action="store_true", help="gather final metrics into results.{csv,json,md}")
    mode.add_argument("--stop", action="store_true", help="ask the grid's running runs to checkpoint and stop")
    p.add_argument("--results-dir", help="where --collect writes (default: <runs parent>)")
    p.add_argument("--all", action="store_true", help="--status: every row, also of a large grid")
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
    reading = any(getattr(args, m, False) for m in ("status", "collect", "stop"))
    check_data = not (args.skip_data_check or reading)
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
        read_state=not reading,
    )
    plan.default_grid = is_default
    return plan


def as_launched(plan: Plan, args: argparse.Namespace, log_dir: Path | None) -> Plan:
    """--status / --collect given no --var and no overrides: the grid as its newest launch in the log dir set it
    (the steps a run was launched with also come from its claim: ditscale.launch.rows)."""

    if args.var or args.overrides:
        return plan
    rec = records.remembered(log_dir, plan.grid_file)
    if not rec or not (rec.get("vars") or rec.get("overrides")):
        return plan
    print(f"(as launched: {' '.join([*(f'--var {k}={v}' for k, v in rec['vars'].items()), *rec['overrides']])})")
    again = plan_grid(
        plan.grid_file,
        vars=rec.get("vars"),
        run_root=args.run_root or rec.get("run_root"),
        overrides=rec.get("overrides"),
        resources=rec.get("resources"),
        check_data=False,
        read_state=False,
    )
    again.default_grid = plan.default_grid
    return again


def collect_and_print(plan: Plan, results_dir_arg: str | None) -> None:
    """--collect: the results table as CSV, JSON and markdown next to the runs; the markdown is printed."""
    table = results.collect(plan.runs)
    paths = results.write_table(table, results_dir_arg or results_dir(plan.runs, plan.name))
    print(results.to_markdown(table))
    print("\nwrote " + ", ".join(str(p) for p in paths))


def build_parser(name: str, prog: str, doc: str | None) -> argparse.ArgumentParser:
    backend = load(name)
    doc = doc or backend.__doc__ or ""
    head, _, tail = doc.partition("\n\n")
    p = argparse.ArgumentParser(prog=prog, description=head, epilog=tail or None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    backend.add_arguments(p)
    add_grid_arguments(p, dry_run_help=backend.dry_run_help, status_help=backend.status_help)
    return p


def quiet_libraries() -> None:
    """Status of a thousand runs on S3 must not print a thousand botocore lines."""
    for name in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(name: str, argv: list[str] | None = None, prog: str | None = None, doc: str | None = None) -> int:
    """The launcher of backend `name`: parse, plan, then status / collect / dry run / start. Exit codes: 0 ok,
    2 a user error (nothing started); the backend may add its own (ray: 1 runs did not finish, 3 cluster lost)."""

    args = build_parser(name, prog or f"launchers/{name}_grid.py", doc).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    cls = load(name)
    try:
        cls.check_args(args)
        plan = plan_from_args(args, cls.resources(args))
        backend = cls.from_args(args, plan)
        if args.status or args.collect:
            plan = as_launched(plan, args, backend.log_dir)
        if args.stop:
            _, claims, _ = rows.read(plan.runs)
            asked = backend.stop(plan.runs, claims)
            print(f"asked {len(asked)} run(s) to checkpoint and stop: {', '.join(asked) or '-'}")
            return 0
        if args.status:
            print(status(backend, plan, args.stall_after, full=args.all))
            return 0
        if args.collect:
            collect_and_print(plan, args.results_dir)
            return 0
        if args.dry_run:
            launch(backend, plan, dry_run=True)
            return 0
        return backend.finish(plan, launch(backend, plan, launch_record=plan.launch))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except DitscaleError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


# --- python -m ditscale launch BACKEND ... ------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("backend", choices=sorted(BACKENDS), help="where the grid runs")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the backend's launcher options (--help lists them)")


def run(args: argparse.Namespace) -> int:
    return main(args.backend, args.rest, prog=f"python -m ditscale launch {args.backend}")
