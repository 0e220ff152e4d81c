"""The one launch interface: plan -> start -> status -> stop, the same for Slurm, Ray, one machine and Kubernetes.

A backend is one module with one class:

    class MyBackend(Backend):
        name = "mine"
        caps = Capabilities(...)                       # what it can do (below)
        def check(self, plan, todo, dry_run) -> list[str]   # refuse what can never run; return warnings
        def describe_run(self, run) -> str             # one plan line: what the run gets here
        def details(self, plan, todo) -> list[str]     # more of the plan (e.g. #SBATCH lines)
        def start(self, plan, todo, claims) -> dict    # submit / run the claimed runs: run id -> result
        def views(self, runs, claims) -> dict[str, View]    # what its scheduler says about each run's job
        def claim_alive(self, claim) -> bool | None    # does the job that wrote this claim still run?
        def stop(self, runs, claims) -> list[str]      # ask the runs to checkpoint and stop

and a line in BACKENDS. Everything else is written once, here and in the modules it calls: planning (expand,
validate, data checks: ditscale.launch.common), the claim on a run (ditscale.launch.claim), data preparation
(ditscale.launch.prepare), launch and failure records (ditscale.launch.records), status rows, stall rules and
failure reasons (ditscale.launch.rows).
"""

from __future__ import annotations

import importlib
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditscale.grid import RunSpec
from ditscale.io.rundir import DIVERGED, DONE
from ditscale.launch import claim as C
from ditscale.launch import records, rows
from ditscale.launch.common import Plan
from ditscale.launch.prepare import check_ready, check_sources, format_data_plan
from ditscale.launch.rows import View

BACKENDS = {
    "slurm": "ditscale.launch.slurm:SlurmBackend",
    "ray": "ditscale.launch.ray:RayBackend",
    "local": "ditscale.launch.local:LocalBackend",
    "k8s": "ditscale.launch.k8s:K8sBackend",
}


@dataclass(frozen=True)
class Capabilities:
    verb: str  # what start() does to a run: "submit", "train", "render"
    blocking: bool  # start() returns when the runs ended (one machine, Ray) or once they are submitted
    requeue: bool  # the scheduler restarts a preempted or failed run itself
    data_as_jobs: bool  # data steps run as the scheduler's jobs that training depends on (else first, here)
    node_range: bool  # a run may start on fewer nodes or workers than asked (--nodes MIN-MAX, --min-workers)
    claims: bool = True  # start() claims its runs (a renderer that submits nothing claims none)


def load(name: str) -> type[Backend]:
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


class Backend:
    name = "?"
    caps = Capabilities("start", True, False, False, False)
    dry_run_help = "print the plan; start nothing"
    status_help = "show each run's state (run dirs, claims, the scheduler)"

    def __init__(self, opts: Any):
        self.opts = opts

    # --- command line (ditscale.cli.launch) ---------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, p) -> None:
        """The backend's own options."""

    @classmethod
    def check_args(cls, args) -> None:
        """Refuse option combinations before anything is planned (LaunchError)."""

    @classmethod
    def resources(cls, args) -> dict:
        """Resource overrides for every run (e.g. Slurm's --nodes, --time)."""
        return {}

    @classmethod
    def from_args(cls, args, plan: Plan) -> Backend:
        raise NotImplementedError

    def finish(self, plan: Plan, result: dict) -> int:
        """After start(): what to print, and the exit code."""
        return 0

    @property
    def log_dir(self) -> Path | None:
        return getattr(self.opts, "log_dir", None)

    # --- plan ---------------------------------------------------------------------------------------------------
    def check(self, plan: Plan, todo: list[RunSpec], dry_run: bool) -> list[str]:
        return []

    def describe_run(self, run: RunSpec) -> str:
        return f"processes={run.num_tasks}"

    def details(self, plan: Plan, todo: list[RunSpec]) -> list[str]:
        return []

    def data_how(self, plan: Plan) -> dict[str, str]:
        return {s.name: "prepared here first" for s in plan.data.todo} if plan.data is not None else {}

    # --- run ----------------------------------------------------------------------------------------------------
    def start(self, plan: Plan, todo: list[RunSpec], claims: dict[str, C.Claim]) -> dict[str, Any]:
        raise NotImplementedError

    def stop(self, runs: list[RunSpec], claims: dict[str, C.Claim | None]) -> list[str]:
        """Ask the runs this backend's launchers hold to checkpoint and stop: SIGTERM to each launcher (local, Ray
        driver) on this machine, which passes it on to its trainers. The run ids asked."""
        import os
        import signal

        asked = []
        for r in runs:
            cl = claims.get(r.id)
            if cl is not None and not cl.ended and cl.data.get("backend") == self.name and C.process_alive(cl.data):
                os.kill(int(cl.data["pid"]), signal.SIGTERM)
                asked.append(r.id)
        return asked

    # --- status -------------------------------------------------------------------------------------------------
    def views(self, runs: list[RunSpec], claims: dict[str, C.Claim | None]) -> dict[str, View]:
        return {}

    def claim_alive(self, claim: C.Claim) -> bool | None:
        return C.process_alive(claim.data)


# --- who may write a run --------------------------------------------------------------------------------------
class Liveness:
    """Whether a claim's job still runs, asked of the backend that wrote it (Slurm's queue read once)."""

    def __init__(self):
        self._backends: dict[str, Backend] = {}

    def __call__(self, claim: C.Claim) -> bool | None:
        if claim.ended:
            return False
        name = claim.data.get("backend") or "local"
        if name not in self._backends:
            try:
                self._backends[name] = load(name)(None)
            except (KeyError, ImportError):
                return None
        return self._backends[name].claim_alive(claim)


def busy(plan: Plan, alive: Liveness) -> dict[str, str]:
    """Unfinished runs that already have a writer: a live trainer holding the run dir, or a live claim of any
    launcher (any backend, any log dir). run id -> why."""
    out: dict[str, str] = {}
    for r in plan.todo:
        st, cl = plan.statuses.get(r.id), plan.claims.get(r.id)
        if st is not None and st.holder is not None:
            out[r.id] = f"held by a live trainer ({st.holder.describe()})"
        elif cl is not None and not cl.ended:
            live = alive(cl)
            if live is not False:
                out[r.id] = f"claimed by {cl.who()}" + ("" if live else " (cannot check it from here)")
    return out


def format_plan(backend: Backend, plan: Plan, held: dict[str, str], todo: list[RunSpec]) -> str:
    verb = backend.caps.verb
    lines = [f"{plan.header()}, {len(held)} queued or running elsewhere, {len(todo)} to {verb} ({backend.name})"]
    for p in plan.problems:
        lines.append(f"  check: {p}")
    if plan.data is not None:
        lines += ["", format_data_plan(plan.data, backend.data_how(plan)), ""]
    width = max((len(r.id) for r in plan.runs), default=10)
    show = plan.runs if len(plan.runs) <= rows.FULL_TABLE_MAX else [r for r in plan.runs if r.id in held][:20]
    for r in show:
        if r in plan.done:
            what = "done"
        elif r.id in held:
            what = f"skip: {held[r.id]}"
        else:
            what = f"skip: diverged at step {plan.statuses[r.id].step}" if _is_diverged(plan, r.id) else verb
        lines.append(f"  {r.id:<{width}} {what:<8} {backend.describe_run(r)}  {r.run_dir}")
    if len(show) < len(plan.runs):
        lines.append(f"  ... {len(plan.runs)} runs: {len(plan.done)} done, {len(held)} skipped, {len(todo)} to {verb}")
    lines += backend.details(plan, todo)
    return "\n".join(lines)


def claim_runs(backend: Backend, plan: Plan, todo: list[RunSpec], record: dict, alive: Liveness, workers: int = 16):
    """Claim every run (in parallel); (claimed run id -> claim, lost run id -> who holds it)."""

    def one(r: RunSpec):
        rec = {**record, "run": r.id, "steps": r.config.train.steps, "job": None}
        return C.try_claim(r.run_dir, rec, alive, newest=plan.claims.get(r.id))

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo) or 1))) as pool:
        got = list(pool.map(one, todo))
    won, lost = {}, {}
    for r, (ok, cl) in zip(todo, got, strict=True):
        if ok:
            won[r.id] = cl
        else:
            lost[r.id] = f"claimed by {cl.who()}" if cl is not None else "claimed by another launcher"
    return won, lost


def _is_diverged(plan: Plan, rid: str) -> bool:
    st = plan.statuses.get(rid)
    return st is not None and st.state == DIVERGED


def _diverged_why(st) -> str:
    return (
        f"diverged at step {st.step} (a non-finite loss): change a training setting and resume it with "
        "--allow-config-change (docs/training.md)"
    )


def launch(backend: Backend, plan: Plan, *, dry_run: bool = False, launch_record: dict | None = None) -> dict:
    """Plan, check, claim and start (or with dry_run print the plan): the flow every backend shares."""
    alive = Liveness()
    held = busy(plan, alive)
    # A diverged run would diverge again (its trainer refuses the same settings): not started, not retried.
    diverged = {r.id: _diverged_why(plan.statuses[r.id]) for r in plan.todo if _is_diverged(plan, r.id)}
    todo = [r for r in plan.todo if r.id not in held and r.id not in diverged]
    if plan.data is not None:
        check_sources(plan.data)
        if not dry_run and todo:
            check_ready(plan.data)
    for w in backend.check(plan, todo, dry_run):
        print(f"warning: {w}", file=sys.stderr, flush=True)
    if dry_run:
        print(format_plan(backend, plan, held, todo))
        print(f"\ndry run: nothing {'submitted' if backend.caps.verb == 'submit' else 'started'}")
        return {}
    for rid, why in {**held, **diverged}.items():
        print(f"skip {rid}: {why}", flush=True)
    claims: dict[str, C.Claim] = {}
    if todo and backend.caps.claims:
        record = {"backend": backend.name, "log_dir": str(backend.log_dir or ""), **(launch_record or {})}
        claims, lost = claim_runs(backend, plan, todo, record, alive)
        for rid, why in lost.items():
            print(f"skip {rid}: {why}", flush=True)
        held.update(lost)
        todo = [r for r in todo if r.id in claims]
    if not todo:
        print(
            f"grid {plan.name!r}: nothing to {backend.caps.verb} ({len(plan.done)} finished, {len(held)} queued "
            "or running)",
            flush=True,
        )
        return {}
    if backend.log_dir is not None and launch_record is not None:
        steps = {r.id: r.config.train.steps for r in todo}
        records.write_launch(backend.log_dir, {"backend": backend.name, **launch_record, "steps": steps,
                                               "runs": dict.fromkeys(steps)})  # fmt: skip
    return backend.start(plan, todo, claims)


def status(backend: Backend, plan: Plan, stall_after_s: float | None = 600.0, full: bool = False) -> str:
    """The status table of a plan's runs: run dirs (judged against the steps each run was launched with), the
    backend's view of their jobs, stalls and failure reasons."""
    launched = {rid: rec["steps"] for rid, rec in records.jobs(backend.log_dir).items() if rec.get("steps")}
    statuses, claims, reader = rows.read(plan.runs, steps=launched, full=full or len(plan.runs) <= rows.FULL_TABLE_MAX)
    rows.details(reader, plan.runs, statuses, claims, rows.to_detail(plan.runs, statuses, claims, full))
    views = backend.views(plan.runs, claims)
    data_why = data_failures(backend, plan)
    table = rows.make_rows(plan.runs, statuses, views, stall_after_s, data_why)
    return rows.format_rows(table, full=full)


def data_failures(backend: Backend, plan: Plan) -> dict[str, str]:
    """run id -> why the data step it needs failed (from the failure records of data steps in the log dir)."""
    if plan.data is None or backend.log_dir is None:
        return {}
    failed: dict[str, str] = {}
    for rec in records.failures(backend.log_dir):
        if rec.get("step"):
            failed[rec["step"]] = f"data step {rec['step']} failed (job {rec.get('job')}): {rec.get('reason')}"
    if not failed:
        return {}
    out = {}
    for r in plan.runs:
        need = (r.subset or "").split("/")[0]
        why = failed.get(need) or failed.get("build") or failed.get("shards")
        if why and plan.statuses.get(r.id) is not None and plan.statuses[r.id].state != DONE:
            out[r.id] = why
    return out
