"""Data preparation on Slurm: a grid's missing data steps become CPU jobs that its training arrays wait for.

The build step is one job; the subsets (each with its held-out test set) are one array that starts after it
(afterok); every training array of the submission gets `--dependency=afterok:<those jobs>` and
`--kill-on-invalid-dep=yes`, so a failed data job cancels the training instead of leaving it pending forever.
Each job runs ditscale.launch.prepare.run_step: the step's `python -m ditscale data ...` command under the data
folder's lease, skipped when its output already verifies; a failure is recorded in the log dir (the step, its job
and its error: shown by --status on the step and on the runs that need it). Submitted steps are recorded in the
launch records of the log dir (data folder -> job id): while such a job is pending or running, a new submission
depends on it instead of submitting the step again. Each training run waits only for the step it trains on, so a
failed subset cancels only the runs that need it.
"""

from __future__ import annotations

from typing import Any

from ditscale.errors import LaunchError
from ditscale.launch import records
from ditscale.launch.common import Plan
from ditscale.launch.prepare import check_ready, format_data_plan, run_step_job
from ditscale.launch.slurm_jobs import LIVE_STATES, SlurmOptions, executor, sbatch_preview, squeue_states


def prepare_parameters(plan: Plan, opts: SlurmOptions) -> dict[str, Any]:
    """sbatch parameters of the data-preparation jobs: one CPU task with the recipe's resources."""
    res = plan.data.recipe.resources
    params: dict[str, Any] = {
        "partition": opts.prepare_partition or opts.partition,
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": int(res["cpus"]),
        "time": int(res["timeout_min"]),
        "job_name": f"ditscale-{plan.name}-data",
        "array_parallelism": opts.array_parallelism,
    }
    if res.get("mem_gb"):
        params["mem"] = f"{int(res['mem_gb'])}G"
    for key in ("account", "qos", "setup"):
        if getattr(opts, key):
            params[key] = getattr(opts, key)
    return params


def with_dependency(params: dict[str, Any], after: list[str]) -> dict[str, Any]:
    """params that start only once every job in `after` succeeded (and are cancelled if one fails)."""
    if not after:
        return params
    extra = dict(params.get("additional_parameters") or {}, kill_on_invalid_dep="yes")
    return dict(params, dependency="afterok:" + ":".join(after), additional_parameters=extra)


def queued_preparation(plan: Plan, opts: SlurmOptions, live: dict[str, str]) -> dict[str, str]:
    """Missing data steps whose job (submitted earlier) is still pending or running: step name -> job id."""

    recs = records.data_jobs(opts.log_dir)
    out = {}
    for step in plan.data.todo if plan.data is not None else []:
        jid = (recs.get(step.out) or {}).get("job_id")
        if jid and live.get(jid) in LIVE_STATES:
            out[step.name] = jid
    return out


def format_preparation(plan: Plan, opts: SlurmOptions, submitting: bool) -> str:
    """The data section of the plan: each step, what prepares it (a CPU job now, or one already queued)."""
    try:
        live = squeue_states()
    except LaunchError:  # no Slurm here: a dry run still shows the plan
        live = {}
    dp = plan.data
    queued = queued_preparation(plan, opts, live)
    build = any(s.kind == "build" for s in dp.todo)
    how = {}
    for s in dp.todo:
        if s.name in queued:
            how[s.name] = f"queued: job {queued[s.name]}"
        elif not submitting:
            how[s.name] = "nothing to submit"
        else:
            after = ", after the build job" if build else ""
            how[s.name] = "CPU job" if s.kind == "build" else f"CPU array task{after}"
    text = format_data_plan(dp, how)
    if not submitting or dp.blocked:
        return text
    params = prepare_parameters(plan, opts)
    new_build = [s for s in dp.todo if s.kind == "build" and s.name not in queued]
    rest = [s for s in dp.todo if s.kind != "build" and s.name not in queued]
    if new_build:
        text += "\n\ndata job: build\n" + sbatch_preview(params, 1, opts)
    if rest:
        after = ["<build job>"] if new_build else ([queued["build"]] if "build" in queued else [])
        names = ", ".join(s.name for s in rest)
        text += f"\n\ndata job array: {len(rest)} step(s): {names}\n"
        text += sbatch_preview(with_dependency(params, after), len(rest), opts)
    return text


def submit_preparation(plan: Plan, opts: SlurmOptions) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Submit the missing data steps the unfinished runs need as CPU jobs (the build first, then one array of
    subsets after it). Returns (step name -> the job that prepares it, including steps queued by an earlier call;
    data folder -> {"job_id", "step", "command"} of the steps submitted now, for the launch record).

    Each job runs ditscale.launch.prepare.run_step: the step's `python -m ditscale data ...` command under the data
    folder's lease, so two submissions that race never build the same data twice."""
    dp = plan.data
    if dp is None or not dp.todo:
        return {}, {}
    check_ready(dp)  # before anything is submitted: conflicts, or missing data without its source
    jobs = dict(queued_preparation(plan, opts, squeue_states()))
    recs: dict[str, dict[str, Any]] = {}
    params = prepare_parameters(plan, opts)
    log_dir = str(opts.log_dir)

    def record(step, jid: str) -> None:
        recs[step.out] = {"job_id": jid, "step": step.name, "command": step.shell}
        jobs[step.name] = jid
        print(f"  data {step.name:<20} job {jid}: {step.shell}", flush=True)

    for step in (s for s in dp.todo if s.kind == "build" and s.name not in jobs):
        record(step, executor(params, opts).submit(run_step_job, step, log_dir).job_id)
    rest = [s for s in dp.todo if s.kind != "build" and s.name not in jobs]
    if rest:
        ex = executor(with_dependency(params, [jobs["build"]] if "build" in jobs else []), opts)
        for step, h in zip(rest, ex.map_array(run_step_job, rest, [log_dir] * len(rest)), strict=True):
            record(step, h.job_id)
    return jobs, recs


def needs(run, jobs: dict[str, str]) -> list[str]:
    """The data job a training run waits for: its own subset's (which waits for the build); none when its subset is
    ready. A failed subset job cancels only the runs that train on it."""
    step = (run.subset or "").split("/")[0]
    return [jobs[step]] if step in jobs else []
