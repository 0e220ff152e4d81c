"""Slurm launcher: one submitit job array per resource shape, one array task per run, requeue on preemption.

`submit(plan, opts)` checks the partition, groups the runs that are not finished (and not already queued) by
their resources, and submits one array per group with TrainTask (ditscale.launch.task). The submission is
recorded in `<log dir>/jobs.json` (run id -> Slurm job id), which `--status` joins with `squeue`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditscale import results
from ditscale.errors import LaunchError
from ditscale.grid import RunSpec
from ditscale.io.rundir import PENDING, STARTED, RunDir
from ditscale.launch.common import Plan

log = logging.getLogger("ditscale.launch")
LIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
               "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "PREEMPTED"}  # fmt: skip


@dataclass
class SlurmOptions:
    partition: str | None  # None: --status and --collect only
    log_dir: Path
    account: str | None = None
    qos: str | None = None
    array_parallelism: int = 64
    max_num_timeout: int = 3
    signal_delay_s: int = 120
    constraint: str | None = None
    exclude: str | None = None
    setup: list[str] | None = None  # shell lines run before srun (module load, conda activate, ...)
    prepare_partition: str | None = None  # where data-preparation (CPU) jobs run; default: partition


def _slurm_cmd(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    if not shutil.which(cmd[0]):
        raise LaunchError(f"{cmd[0]!r} not found on PATH: run the Slurm launcher on a Slurm login node")
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


def partitions() -> list[str]:
    r = _slurm_cmd("sinfo", "-h", "-o", "%R")
    if r.returncode != 0:
        detail = (r.stderr.strip().splitlines() or [""])[-1]
        raise LaunchError(f"sinfo failed (is slurmctld reachable? is SLURM_CONF right?): {detail}")
    return sorted({p.strip() for p in r.stdout.split() if p.strip()})


def check_partition(partition: str, gpus_per_node: int = 0) -> None:
    """Raise LaunchError when the partition does not exist (or has no GPU gres while GPUs are asked for)."""
    known = partitions()
    if partition not in known:
        raise LaunchError(f"--partition {partition!r}: unknown Slurm partition (known: {', '.join(known) or 'none'})")
    if gpus_per_node > 0:
        r = _slurm_cmd("sinfo", "-h", "-p", partition, "-o", "%G")
        gres = r.stdout.strip()
        if r.returncode == 0 and "gpu" not in gres:
            raise LaunchError(
                f"--partition {partition!r}: its nodes have no GPU gres ({gres or 'none'}) but the runs ask for "
                f"{gpus_per_node} GPU(s) per node (use --gpus-per-node 0 for CPU runs)"
            )


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
    }
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


def _executor(params: dict[str, Any], opts: SlurmOptions):
    import submitit

    ex = submitit.SlurmExecutor(folder=str(opts.log_dir / "%j"), max_num_timeout=opts.max_num_timeout)
    ex.update_parameters(**params)
    return ex


def sbatch_preview(params: dict[str, Any], n: int, opts: SlurmOptions) -> str:
    """The #SBATCH header submitit would write for an array of n runs."""
    from submitit.slurm.slurm import _make_sbatch_string

    ex = _executor(params, opts)
    p = dict(ex.parameters)
    if n > 1:
        p["map_count"] = n
    text = _make_sbatch_string(command=ex._submitit_command_str, folder=str(opts.log_dir / "%j"), **p)
    return "\n".join(line for line in text.splitlines() if line.startswith("#SBATCH"))


# --- job records --------------------------------------------------------------------------------------------
def _jobs_file(opts: SlurmOptions) -> Path:
    return opts.log_dir / "jobs.json"


def load_jobs(log_dir: Path) -> dict[str, dict[str, Any]]:
    f = Path(log_dir) / "jobs.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return {}


def _save_jobs(opts: SlurmOptions, jobs: dict[str, dict[str, Any]]) -> None:
    f = _jobs_file(opts)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(jobs, indent=2, sort_keys=True))
    os.replace(tmp, f)


def squeue_states() -> dict[str, str]:
    """Slurm job id (array tasks as '12_3') -> state, for this user's queued and running jobs."""
    user = os.environ.get("USER") or __import__("getpass").getuser()
    r = _slurm_cmd("squeue", "-h", "-r", "-u", user, "-o", "%i|%T")
    if r.returncode != 0:
        raise LaunchError(f"squeue failed: {r.stderr.strip()}")
    out = {}
    for line in r.stdout.splitlines():
        if "|" in line:
            jid, state = line.strip().split("|", 1)
            out[jid] = state
    return out


def scheduler_view(runs: list[RunSpec], log_dir: Path) -> dict[str, str]:
    """run id -> 'RUNNING job 12_0' for runs whose recorded job is still known to squeue."""
    jobs = load_jobs(log_dir)
    try:
        live = squeue_states()
    except LaunchError:
        live = {}
    view = {}
    for r in runs:
        rec = jobs.get(r.id)
        if not rec:
            continue
        state = live.get(rec["job_id"])
        view[r.id] = f"{state} job {rec['job_id']}" if state else f"ended job {rec['job_id']}"
    return view


# --- submit -------------------------------------------------------------------------------------------------
def format_plan(plan: Plan, opts: SlurmOptions, queued: dict[str, str]) -> str:
    todo = [r for r in plan.todo if r.id not in queued]
    lines = [f"{plan.header()}, {len(plan.todo) - len(todo)} already queued, {len(todo)} to submit"]
    if plan.data is not None:
        from ditscale.launch.slurm_prepare import format_preparation

        lines += ["", format_preparation(plan, opts, bool(todo)), ""]
    for r in plan.runs:
        what = "done" if r in plan.done else (f"queued ({queued[r.id]})" if r.id in queued else "submit")
        lines.append(
            f"  {r.id:<40} {what:<22} nodes={r.resources['nodes']} tasks/node={r.tasks_per_node} "
            f"gpus/node={r.resources['gpus_per_node']} time={r.resources['timeout_min']}min  {r.run_dir}"
        )
    after = ["<data jobs>"] if todo and plan.data is not None and plan.data.todo else []
    for i, (params, group) in enumerate(group_runs(todo, opts)):
        lines.append(f"\njob array {i}: {len(group)} run(s): {', '.join(r.id for r in group)}")
        lines.append(sbatch_preview(_after(params, after), len(group), opts))
    lines.append(f"\nsubmitit logs: {opts.log_dir}")
    return "\n".join(lines)


def _after(params: dict[str, Any], jobs: list[str]) -> dict[str, Any]:
    from ditscale.launch.slurm_prepare import with_dependency

    return with_dependency(params, jobs)


def queued_runs(plan: Plan, opts: SlurmOptions) -> dict[str, str]:
    """Runs of this grid whose recorded Slurm job is still pending or running (never submitted twice)."""
    jobs = load_jobs(opts.log_dir)
    if not jobs:
        return {}
    live = squeue_states()
    out = {}
    for r in plan.todo:
        rec = jobs.get(r.id)
        if rec and live.get(rec["job_id"]) in LIVE_STATES:
            out[r.id] = f"{live[rec['job_id']]} job {rec['job_id']}"
    return out


def submit(plan: Plan, opts: SlurmOptions, *, dry_run: bool = False) -> dict[str, str]:
    """Submit the plan's unfinished runs; return run id -> job id. With dry_run, print the plan only."""
    gpus = max((int(r.resources.get("gpus_per_node") or 0) for r in plan.runs), default=0)
    queued: dict[str, str] = {}
    try:
        partitions()
        reachable = True
    except LaunchError as e:
        if not dry_run:
            raise
        print(f"(partition not checked: {e})")
        reachable = False
    if reachable:
        check_partition(opts.partition, gpus)
        queued = queued_runs(plan, opts)
    if dry_run:
        print(format_plan(plan, opts, queued))
        print("\ndry run: nothing submitted")
        return {}
    todo = [r for r in plan.todo if r.id not in queued]
    for r in plan.done:
        log.info("skip %s: finished", r.id)
    for rid, what in queued.items():
        log.info("skip %s: %s", rid, what)
    if not todo:
        print(f"grid {plan.name!r}: nothing to submit ({len(plan.done)} finished, {len(queued)} queued)")
        return {}
    from ditscale.launch.slurm_prepare import submit_preparation, with_dependency
    from ditscale.launch.task import TrainTask

    opts.log_dir.mkdir(parents=True, exist_ok=True)
    after = submit_preparation(plan, opts)  # the data jobs the training arrays wait for (afterok)
    jobs = load_jobs(opts.log_dir)
    submitted: dict[str, str] = {}
    for params, group in group_runs(todo, opts):
        ex = _executor(with_dependency(params, after), opts)
        use_gpus = int(params.get("gpus_per_node") or 0) > 0
        task = TrainTask(use_gpus=use_gpus)
        handles = ex.map_array(task, [r.id for r in group], [r.config_dict() for r in group])
        for r, h in zip(group, handles, strict=True):
            submitted[r.id] = h.job_id
            jobs[r.id] = {"job_id": h.job_id, "submitted": time.time(), "log_dir": str(opts.log_dir)}
        _save_jobs(opts, jobs)
        print(f"submitted job array {handles[0].job_id.split('_')[0]}: {len(group)} run(s)", flush=True)
    for rid, jid in submitted.items():
        print(f"  {rid:<40} job {jid}")
    return submitted


def status(plan: Plan, opts: SlurmOptions) -> str:
    """Each run's state from its run dir joined with squeue; a run whose job ended without final.json is
    'failed' (no checkpoint: look at the submitit log) or 'resumable' (rerun the launcher to resume it)."""
    rows = results.run_states(plan.runs, scheduler_view(plan.runs, opts.log_dir))
    jobs = load_jobs(opts.log_dir)
    for row in rows:
        if row["scheduler"].startswith("ended") and row["state"] in (PENDING, STARTED):
            row["state"] = "failed"
            jid = jobs[row["run"]]["job_id"]
            row["checkpoint"] = f"see {opts.log_dir}/{jid}/{jid}_0_log.err"
    return results.format_status(rows)


def _done(run: RunSpec) -> bool:
    return RunDir(run.run_dir).is_done(run.config.train.steps)


def wait(plan: Plan, opts: SlurmOptions, poll_s: float = 5.0, timeout_s: float | None = None) -> bool:
    """Block until every run is finished or has no live Slurm job; True when all finished."""
    start = time.monotonic()
    while True:
        jobs = load_jobs(opts.log_dir)
        live = squeue_states()
        waiting = [
            r.id
            for r in plan.runs
            if not _done(r) and live.get(jobs.get(r.id, {}).get("job_id", "")) in LIVE_STATES
        ]
        if not waiting:
            return all(_done(r) for r in plan.runs)
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            return False
        print(f"waiting for {len(waiting)} run(s): {', '.join(waiting)}", file=sys.stderr, flush=True)
        time.sleep(poll_s)
