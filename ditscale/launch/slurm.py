"""Slurm launcher: one submitit job array per resource shape, one array task per run, requeue on preemption.

SlurmBackend (ditscale.launch.backend) checks the partition and what its nodes have (GPUs, CPUs, memory, node
count: `sinfo`) and the time limit against the checkpoint signal's margin, groups the claimed runs by their
resources and the data job they wait for, and submits one array per group with TrainTask (ditscale.launch.task).
Each run's claim names its array task (the claim is live while squeue lists the job); the launch is recorded in
`<log dir>/launches/`; `--status` joins the claims with `squeue` and the failure records. `--nodes MIN-MAX` lets a
run start on fewer nodes than asked (sbatch --nodes=MIN-MAX; the trainer takes any world size that divides the
batch).

Faults: every step runs under `srun --kill-on-bad-exit=1` (one rank exiting abnormally ends the whole step at
once), and a failed job is requeued from the task or the job script, at most `max_failures` times per job
(ditscale.launch.task). Runs with metrics on publish each rank's exporter under `<log dir>/targets/` for
Prometheus' file_sd (trainer: log.file_sd).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ditscale.errors import LaunchError
from ditscale.grid import RunSpec
from ditscale.io.rundir import RunDir
from ditscale.launch import claim as C
from ditscale.launch import records
from ditscale.launch.backend import Backend, Capabilities, status
from ditscale.launch.common import Plan, results_dir
from ditscale.launch.rows import View
from ditscale.launch.slurm_jobs import (  # noqa: F401 - the launcher's API
    LIVE_STATES,
    SlurmOptions,
    check_partition,
    check_resources,
    executor,
    parse_time,
    partition_nodes,
    partitions,
    sbatch_preview,
    squeue_jobs,
    squeue_states,
)
from ditscale.launch.slurm_prepare import format_preparation, needs, submit_preparation, with_dependency
from ditscale.launch.task import TARGETS, TrainTask

log = logging.getLogger("ditscale.launch")


def check_time(runs: list[RunSpec], opts: SlurmOptions) -> list[str]:
    """Each job life trains from its start until the checkpoint signal, `signal_delay_s` before the time limit.
    Raises LaunchError when that leaves nothing; returns warnings when it leaves less than `min_train_s`."""
    warnings, errors = [], []
    for minutes in sorted({int(r.resources["timeout_min"]) for r in runs}):
        ids = [r.id for r in runs if int(r.resources["timeout_min"]) == minutes]
        who = f"{len(ids)} run(s)" if len(ids) > 3 else ", ".join(ids)
        train_s = minutes * 60 - opts.signal_delay_s
        if train_s <= 0:
            errors.append(
                f"--time {minutes} min ({who}): the checkpoint signal comes {opts.signal_delay_s} s "
                "before the limit, which leaves no time to train"
            )
        elif train_s < opts.min_train_s:
            advice = math.ceil((opts.min_train_s + opts.signal_delay_s) / 60)
            warnings.append(
                f"--time {minutes} min ({who}) leaves about {train_s / 60:.0f} min of training per job "
                f"life (start-up included; the checkpoint signal comes {opts.signal_delay_s} s before "
                f"the limit): expect a requeue every few minutes; --time {advice} or more is "
                "better"
            )
    if errors:
        raise LaunchError("; ".join(errors))
    return warnings


def teardown_lines(opts: SlurmOptions) -> list[str]:
    """The job script's last lines, after srun: a failed step that no rank could report is requeued there."""
    cmd = [
        sys.executable,
        "-m",
        "ditscale.cli.after_srun",
        "--log-dir",
        str(opts.log_dir),
        "--max-failures",
        str(opts.max_failures),
    ]
    return [
        f'ditscale_rc=$?; if [ "$ditscale_rc" -ne 0 ]; then {shlex.join(cmd)} --rc "$ditscale_rc"; fi; '
        'exit "$ditscale_rc"'
    ]


def executor_parameters(run: RunSpec, opts: SlurmOptions) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for a run's resources (one task per GPU; CPU runs: tasks_per_node)."""
    res = run.resources
    params: dict[str, Any] = {
        "partition": opts.partition,
        "nodes": int(res["nodes"]),
        "ntasks_per_node": run.tasks_per_node,
        "cpus_per_task": int(res["cpus_per_task"]),
        "time": int(res["timeout_min"]),
        "job_name": f"ditscale-{run.grid}",
        "array_parallelism": opts.array_parallelism,
        "signal_delay_s": opts.signal_delay_s,
        "additional_parameters": {"requeue": True},
        "srun_args": ["--kill-on-bad-exit=1"],  # one rank exiting abnormally ends the step: no half-dead jobs
        "teardown": teardown_lines(opts),
    }
    if res.get("nodes_min"):  # sbatch's range; submitit counts its result files by an int, so it keeps the max
        params["additional_parameters"]["nodes"] = f"{res['nodes_min']}-{res['nodes']}"
    if int(res.get("gpus_per_node") or 0) > 0:
        params["gpus_per_node"] = int(res["gpus_per_node"])
    if res.get("mem_gb"):
        params["mem"] = f"{int(res['mem_gb'])}G"
    for key in ("account", "qos", "constraint", "exclude", "setup"):
        if getattr(opts, key):
            params[key] = getattr(opts, key)
    return params


def group_runs(runs: list[RunSpec], opts: SlurmOptions) -> list[tuple[dict[str, Any], list[RunSpec]]]:
    """Runs with identical sbatch parameters share one job array."""
    groups: dict[str, tuple[dict[str, Any], list[RunSpec]]] = {}
    for r in runs:
        params = executor_parameters(r, opts)
        key = json.dumps(params, sort_keys=True, default=str)
        groups.setdefault(key, (params, []))[1].append(r)
    return list(groups.values())


def with_file_sd(run: RunSpec, opts: SlurmOptions) -> dict[str, Any]:
    """The run's config for its job: with metrics on, every rank publishes its exporter as a Prometheus file_sd
    target under <log dir>/targets (removed when the rank ends)."""
    cfg = run.config_dict()
    log_cfg = cfg.get("log", {})
    if log_cfg.get("metrics_port") and "prometheus" in log_cfg.get("loggers", []) and not log_cfg.get("file_sd"):
        log_cfg["file_sd"] = str(opts.log_dir / TARGETS)
    return cfg


def _submit_group(ex, task, group: list[RunSpec], opts: SlurmOptions):
    """map_array with sbatch's complaint turned into a LaunchError and submitit's leftovers removed."""
    import submitit

    before = set(opts.log_dir.iterdir()) if opts.log_dir.is_dir() else set()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return ex.map_array(task, [r.id for r in group], [with_file_sd(r, opts) for r in group])
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError, OSError) as e:
        for leftover in set(opts.log_dir.iterdir()) - before:  # the job pickles and script of the refused array
            if leftover.is_file() and (leftover.suffix == ".pkl" or leftover.name.startswith(".submission_file")):
                leftover.unlink(missing_ok=True)
        detail = (str(e).strip() or err.getvalue().strip()).splitlines()
        ids = ", ".join(r.id for r in group)
        why = detail[-1] if detail else type(e).__name__
        raise LaunchError(f"sbatch refused the job array of {ids}: {why}") from None


# --- the backend --------------------------------------------------------------------------------------------
def parse_nodes(text: str | None) -> tuple[int | None, int | None]:
    """--nodes N or MIN-MAX -> (min or None, max)."""
    if text is None:
        return None, None
    lo, sep, hi = str(text).partition("-")
    try:
        lo_n, hi_n = int(lo), int(hi if sep else lo)
    except ValueError:
        raise LaunchError(f"--nodes {text!r}: expected a number of nodes or MIN-MAX (e.g. 2-4)") from None
    if not 1 <= lo_n <= hi_n:
        raise LaunchError(f"--nodes {text!r}: expected 1 <= MIN <= MAX")
    return (lo_n if hi else None), hi_n


class SlurmBackend(Backend):
    """Launch a grid of ditscale trainings on Slurm: submitit job arrays, one array task per run.

    Each array task is a multi-node job with one task per GPU; the torch distributed environment comes from submitit's
    job environment. Runs are requeued on preemption, on timeout and after failures (--max-failures) and resume from
    their latest checkpoint; finished runs are skipped and so are runs another launcher claimed (any backend, any log
    dir), so re-running the same command only submits what is missing. The grid's missing data is prepared first by
    CPU jobs that each run's array task waits for.

      python launchers/slurm_grid.py --partition gpu --grid celeba32 --var celeba_src=/datasets/celeba --dry-run
      python launchers/slurm_grid.py --partition gpu --grid celeba32 --var celeba_src=/datasets/celeba
      python launchers/slurm_grid.py --grid celeba32 --status
      python launchers/slurm_grid.py --grid celeba32 --collect
    """

    name = "slurm"
    caps = Capabilities("submit", blocking=False, requeue=True, data_as_jobs=True, node_range=True)
    dry_run_help = "print the plan and sbatch parameters; submit nothing"
    status_help = "show each run's state (run dir + claims + squeue + failure records)"

    def __init__(self, opts: SlurmOptions | None):
        super().__init__(opts)
        self._queue: dict[str, dict[str, Any]] | None = None

    # --- command line ---------------------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, p) -> None:
        p.add_argument(
            "--partition",
            help="Slurm partition (checked with sinfo; needed to submit and for --dry-run, not for --status)",
        )
        p.add_argument("--prepare-partition", help="partition of the data-preparation CPU jobs (default: --partition)")
        p.add_argument("--nodes", help="nodes per run, N or MIN-MAX (start on fewer; default: the grid's)")
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
        p.add_argument("--setup", action="append", help="shell line run in the job before srun (repeatable)")
        p.add_argument("--wait", action="store_true", help="after submitting, wait until every run ends")

    @classmethod
    def check_args(cls, args) -> None:
        if not (args.status or args.collect or args.partition):
            mode = "--dry-run" if args.dry_run else "submitting"
            raise LaunchError(f"--partition is required for {mode} (sinfo lists the partitions)")

    @classmethod
    def resources(cls, args) -> dict:
        lo, hi = parse_nodes(args.nodes)
        return {"nodes": hi, "nodes_min": lo, "gpus_per_node": args.gpus_per_node, "timeout_min": parse_time(args.time)}

    @classmethod
    def from_args(cls, args, plan: Plan) -> SlurmBackend:
        base = results_dir(plan.runs, plan.name)
        return cls(
            SlurmOptions(
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
        ).with_wait(args.wait)

    def with_wait(self, wait: bool) -> SlurmBackend:
        self.wait_after = wait
        return self

    # --- the queue ------------------------------------------------------------------------------------------
    def queue(self) -> dict[str, dict[str, Any]] | None:
        """squeue once per launcher call (None: Slurm cannot be asked here)."""
        if self._queue is None:
            try:
                self._queue = squeue_jobs()
            except (LaunchError, OSError, subprocess.SubprocessError):
                return None
        return self._queue

    def claim_alive(self, claim: C.Claim) -> bool | None:
        job = claim.data.get("job")
        if not job:  # claimed, not submitted yet: alive while its launcher is
            return C.process_alive(claim.data)
        q = self.queue()
        if q is None:
            return None
        return q.get(str(job), {}).get("state") in LIVE_STATES

    # --- plan -----------------------------------------------------------------------------------------------
    def check(self, plan: Plan, todo: list[RunSpec], dry_run: bool) -> list[str]:
        gpus = max((int(r.resources.get("gpus_per_node") or 0) for r in plan.runs), default=0)
        try:
            partitions()
        except LaunchError as e:
            if not dry_run:
                raise
            print(f"(partition not checked: {e})")
        else:
            check_partition(self.opts.partition, gpus)
            check_resources(todo, self.opts.partition)
        return check_time(todo, self.opts)

    def describe_run(self, r: RunSpec) -> str:
        res = r.resources
        nodes = f"{res['nodes_min']}-{res['nodes']}" if res.get("nodes_min") else res["nodes"]
        return (
            f"nodes={nodes} tasks/node={r.tasks_per_node} gpus/node={res['gpus_per_node']} time={res['timeout_min']}min"
        )

    def data_how(self, plan: Plan) -> dict[str, str]:
        return {}

    def details(self, plan: Plan, todo: list[RunSpec]) -> list[str]:
        lines = []
        if plan.data is not None:
            lines += ["", format_preparation(plan, self.opts, bool(todo))]
        after = ["<data jobs>"] if todo and plan.data is not None and plan.data.todo else []
        for i, (params, group) in enumerate(group_runs(todo, self.opts)):
            lines.append(f"\njob array {i}: {len(group)} run(s): {', '.join(r.id for r in group[:20])}")

            lines.append(sbatch_preview(with_dependency(params, after), len(group), self.opts))
        lines.append(f"\nsubmitit logs and launch records: {self.opts.log_dir}")
        return lines

    # --- start ----------------------------------------------------------------------------------------------
    def start(self, plan: Plan, todo: list[RunSpec], claims: dict[str, C.Claim]) -> dict[str, Any]:
        opts = self.opts
        opts.log_dir.mkdir(parents=True, exist_ok=True)
        submitted: dict[str, str] = {}
        data_recs: dict[str, Any] = {}
        try:
            data_jobs, data_recs = submit_preparation(plan, opts)  # the data jobs training waits for (afterok)
            groups: dict[str, tuple[dict[str, Any], list[RunSpec]]] = {}
            for params, group in group_runs(todo, opts):
                for r in group:  # one array per resource shape and data job: a failed subset cancels its runs only
                    deps = needs(r, data_jobs)
                    key = json.dumps([params, deps], sort_keys=True, default=str)
                    groups.setdefault(key, (with_dependency(params, deps), []))[1].append(r)
            for params, group in groups.values():
                use_gpus = int(params.get("gpus_per_node") or 0) > 0
                task = TrainTask(use_gpus=use_gpus, log_dir=str(opts.log_dir), max_failures=opts.max_failures,
                                 max_timeouts=opts.max_num_timeout)  # fmt: skip
                handles = _submit_group(executor(params, opts), task, group, opts)
                for r, h in zip(group, handles, strict=True):
                    submitted[r.id] = h.job_id
                    C.update(claims[r.id], job=h.job_id)
                print(f"submitted job array {handles[0].job_id.split('_')[0]}: {len(group)} run(s)", flush=True)
        finally:
            for rid, cl in claims.items():  # claimed but not submitted (sbatch refused): free again
                if rid not in submitted:
                    C.end(cl, why="not submitted")
            steps = {r.id: r.config.train.steps for r in todo if r.id in submitted}
            records.write_launch(opts.log_dir, {"backend": self.name, **plan.launch, "runs": submitted,
                                                "steps": steps, "data": data_recs})  # fmt: skip
        for rid, jid in submitted.items():
            print(f"  {rid:<40} job {jid}")
        return submitted

    def finish(self, plan: Plan, result: dict) -> int:
        if not getattr(self, "wait_after", False):
            return 0

        ok = wait(plan, self)
        print(status(self, plan, self.opts.stall_after_s))
        return 0 if ok else 1

    def stop(self, runs: list[RunSpec], claims: dict[str, C.Claim | None]) -> list[str]:
        """scancel --signal=TERM: the trainer checkpoints at the end of its step and the job ends."""
        jobs = [str(c.data["job"]) for r in runs if (c := claims.get(r.id)) is not None and c.data.get("job")]
        if jobs:
            subprocess.run(["scancel", "--signal=TERM", "--full", *jobs], capture_output=True, timeout=60)
        return jobs

    # --- status ---------------------------------------------------------------------------------------------
    def views(self, runs: list[RunSpec], claims: dict[str, C.Claim | None]) -> dict[str, View]:
        """Per run: its job (from its claim, else this log dir's records) joined with squeue and the failure
        records; the last error line of a job that ended without finishing."""
        q = self.queue() or {}
        logged = records.jobs(self.opts.log_dir if self.opts else None)
        out: dict[str, View] = {}
        for r in runs:
            cl = claims.get(r.id)
            if cl is not None and cl.data.get("backend") == "slurm" and cl.data.get("job"):
                job, log_dir = str(cl.data["job"]), cl.data.get("log_dir") or str(self.opts.log_dir)
            elif r.id in logged and logged[r.id].get("job_id"):
                job, log_dir = str(logged[r.id]["job_id"]), str(self.opts.log_dir)
            else:
                if cl is not None and cl.data.get("backend") not in (None, "slurm") and not cl.ended:
                    out[r.id] = View(f"claimed by {cl.data.get('backend')}", live=True)
                continue
            info = q.get(job)
            state = (info or {}).get("state")
            live = state in LIVE_STATES
            v = View(f"{state} job {job}" if info else f"ended job {job}", live=live, running=state == "RUNNING",
                     started=(info or {}).get("start"))  # fmt: skip
            fails = [f for f in records.failures(log_dir, job)]
            counted = [f for f in fails if f.get("action") != "not retried"]
            if counted:
                last = counted[-1]["action"]
                v.text += f", {len(counted)} failure{'s' if len(counted) > 1 else ''}" + (
                    f" ({last})" if last != "requeued" else ""
                )
            if not live:
                final = [f for f in fails if f.get("action") in ("gave up", "not retried", "requeue failed")]
                if final:
                    v.why, v.failed = final[-1].get("reason"), True
                elif fails:
                    v.why = fails[-1].get("reason")
                else:
                    err = Path(log_dir) / job / f"{job}_0_log.err"
                    line = (
                        records.last_error_line(err.read_text(errors="replace")[-200_000:]) if err.is_file() else None
                    )
                    if line:
                        v.why, v.failed = line, True
            out[r.id] = v
        return out


def wait(plan: Plan, backend: SlurmBackend, poll_s: float = 5.0, timeout_s: float | None = None) -> bool:
    """Block until every run is finished or has no live Slurm job; True when all finished."""

    start = time.monotonic()
    while True:
        backend._queue = None
        claims = C.current([r.run_dir for r in plan.runs])
        done = {r.id for r in plan.runs if RunDir(r.run_dir).is_done(r.config.train.steps)}
        waiting = [r.id for r in plan.runs if r.id not in done and (c := claims.get(r.run_dir)) is not None
                   and not c.ended and backend.claim_alive(c)]  # fmt: skip
        if not waiting:
            return len(done) == len(plan.runs)
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            return False
        print(f"waiting for {len(waiting)} run(s): {', '.join(waiting[:10])}", file=sys.stderr, flush=True)
        time.sleep(poll_s)
