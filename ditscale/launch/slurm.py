"""Slurm launcher: one submitit job array per resource shape, one array task per run, requeue on preemption.

`submit(plan, opts)` checks the partition and what its nodes have (GPUs, CPUs, memory, node count: `sinfo`) and the
time limit against the checkpoint signal's margin, skips runs that already have a writer (a live trainer holding
the run dir, or a queued/running job of any log dir: ditscale.launch.guard), groups the rest by their resources,
and submits one array per group with TrainTask (ditscale.launch.task). The submission is recorded in
`<log dir>/jobs.json` (run id -> Slurm job id) and in each run dir's `launch.json`; `--status` joins them with
`squeue` and shows runs whose ranks stopped making progress as stalled.

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
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from ditscale import results
from ditscale.errors import LaunchError
from ditscale.grid import RunSpec
from ditscale.io.rundir import PENDING, STARTED, RunDir
from ditscale.launch import guard
from ditscale.launch.common import Plan
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
from ditscale.launch.task import TARGETS, failure_records

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


def scheduler_view(runs: list[RunSpec], log_dir: Path, live: dict[str, str] | None = None) -> dict[str, str]:
    """run id -> 'RUNNING job 12_0' (or 'ended job 12_0'), with the failures recorded for that job."""
    jobs = load_jobs(log_dir)
    if live is None:
        try:
            live = squeue_states()
        except LaunchError:
            live = {}
    view = {}
    for r in runs:
        rec = jobs.get(r.id)
        if not rec:
            continue
        jid = rec["job_id"]
        state = live.get(jid)
        view[r.id] = f"{state} job {jid}" if state else f"ended job {jid}"
        fails = [f for f in failure_records(log_dir, jid) if f.get("action") != "not retried"]
        if fails:
            last = fails[-1]["action"]
            view[r.id] += f", {len(fails)} failure{'s' if len(fails) > 1 else ''}" + (
                f" ({last})" if last != "requeued" else ""
            )
    return view


# --- submit -------------------------------------------------------------------------------------------------
def format_plan(plan: Plan, opts: SlurmOptions, queued: dict[str, str]) -> str:
    todo = [r for r in plan.todo if r.id not in queued]
    lines = [f"{plan.header()}, {len(plan.todo) - len(todo)} already queued or running, {len(todo)} to submit"]
    if plan.data is not None:
        from ditscale.launch.slurm_prepare import format_preparation

        lines += ["", format_preparation(plan, opts, bool(todo)), ""]
    for r in plan.runs:
        what = "done" if r in plan.done else (f"skip: {queued[r.id]}" if r.id in queued else "submit")
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


def queued_runs(plan: Plan, opts: SlurmOptions, live: dict[str, str] | None = None) -> dict[str, str]:
    """Runs of this grid that already have a writer, never submitted twice: a live trainer holds the run dir, or a
    job of any log dir (the run dir's launch.json, or this log dir's jobs.json) is still queued or running."""
    live = {jid: st for jid, st in (squeue_states() if live is None else live).items() if st in LIVE_STATES}
    out = guard.busy(plan.todo, live)
    jobs = load_jobs(opts.log_dir)
    for r in plan.todo:
        rec = jobs.get(r.id)
        if r.id not in out and rec and rec["job_id"] in live:
            out[r.id] = f"{live[rec['job_id']]} as Slurm job {rec['job_id']}"
    return out


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
        check_resources(plan.todo, opts.partition)
        queued = queued_runs(plan, opts)
    for w in check_time(plan.todo, opts):
        print(f"warning: {w}", file=sys.stderr, flush=True)
    if dry_run:
        print(format_plan(plan, opts, queued))
        print("\ndry run: nothing submitted")
        return {}
    todo = [r for r in plan.todo if r.id not in queued]
    for r in plan.done:
        log.info("skip %s: finished", r.id)
    for rid, what in queued.items():
        print(f"skip {rid}: {what}", flush=True)
    if not todo:
        print(f"grid {plan.name!r}: nothing to submit ({len(plan.done)} finished, {len(queued)} queued or running)")
        return {}
    from ditscale.launch.slurm_prepare import submit_preparation, with_dependency
    from ditscale.launch.task import TrainTask

    opts.log_dir.mkdir(parents=True, exist_ok=True)
    after = submit_preparation(plan, opts)  # the data jobs the training arrays wait for (afterok)
    jobs = load_jobs(opts.log_dir)
    submitted: dict[str, str] = {}
    for params, group in group_runs(todo, opts):
        ex = executor(with_dependency(params, after), opts)
        use_gpus = int(params.get("gpus_per_node") or 0) > 0
        task = TrainTask(
            use_gpus=use_gpus,
            log_dir=str(opts.log_dir),
            max_failures=opts.max_failures,
            max_timeouts=opts.max_num_timeout,
        )
        handles = _submit_group(ex, task, group, opts)
        for r, h in zip(group, handles, strict=True):
            submitted[r.id] = h.job_id
            jobs[r.id] = {"job_id": h.job_id, "submitted": time.time(), "log_dir": str(opts.log_dir)}
            guard.record(r.run_dir, launcher="slurm", job_id=h.job_id, log_dir=str(opts.log_dir))
        _save_jobs(opts, jobs)
        print(f"submitted job array {handles[0].job_id.split('_')[0]}: {len(group)} run(s)", flush=True)
    for rid, jid in submitted.items():
        print(f"  {rid:<40} job {jid}")
    return submitted


# --- status -------------------------------------------------------------------------------------------------
def stall(run: RunSpec, job: dict[str, Any] | None, opts: SlurmOptions, now: float | None = None) -> str | None:
    """Why a run whose Slurm job is RUNNING counts as stalled (RunStatus.stall, counted from the later of its last
    step and the job's start), or None."""
    if not job or job.get("state") != "RUNNING":
        return None
    st = RunDir(run.run_dir).status(run.config.train.steps)
    return st.stall(opts.stall_after_s, run.config.log.every, started=job.get("start"), now=now)


def status(plan: Plan, opts: SlurmOptions) -> str:
    """Each run's state from its run dir joined with squeue; a run whose job ended without final.json is
    'failed' (no checkpoint: look at the submitit log) or 'resumable' (rerun the launcher to resume it); a run
    whose job runs without progress is 'stalled' with the age of its last step."""
    try:
        live_jobs = squeue_jobs()
    except LaunchError:
        live_jobs = {}
    live = {jid: j["state"] for jid, j in live_jobs.items()}
    rows = results.run_states(plan.runs, scheduler_view(plan.runs, opts.log_dir, live), stall_after_s=None)
    jobs = load_jobs(opts.log_dir)
    by_id = {r.id: r for r in plan.runs}
    for row in rows:
        rec = jobs.get(row["run"])
        if row["scheduler"].startswith("ended") and row["state"] in (PENDING, STARTED):
            row["state"] = "failed"
            jid = rec["job_id"]
            row["checkpoint"] = f"see {opts.log_dir}/{jid}/{jid}_0_log.err"
        elif rec:
            why = stall(by_id[row["run"]], live_jobs.get(rec["job_id"]), opts)
            if why:
                row["state"], row["scheduler"] = "stalled", f"{row['scheduler']}; {why}"
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
            r.id for r in plan.runs if not _done(r) and live.get(jobs.get(r.id, {}).get("job_id", "")) in LIVE_STATES
        ]
        if not waiting:
            return all(_done(r) for r in plan.runs)
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            return False
        print(f"waiting for {len(waiting)} run(s): {', '.join(waiting)}", file=sys.stderr, flush=True)
        time.sleep(poll_s)
