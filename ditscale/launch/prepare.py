"""Data preparation of a grid: the steps its data recipe implies, what already exists, and running what is missing.

A grid's `data:` recipe (ditscale.grid.DataRecipe) says how its data is made; `plan_data` turns it into steps:

    build      <root>/full                the source's shards     python -m ditscale data build SOURCE --src ...
    n<N>-s<S>  <root>/n<N>-s<S> (+ test/) a subset, its test set  python -m ditscale data subset --manifest ...
    pair<N>-s<S> <root>/pair<N>-s<S>/{s1,s2,test}                 python -m ditscale data subset ... --pair

Each step knows the exact command a user would type, the manifests it writes, and its state: `ready` (every
manifest exists, reads back, lists no missing shard and matches the recipe), `missing`, or `conflict` (something
else is there: never overwritten, the user decides). A ready step is never run again.

`run_step` runs one step under a lease in its output folder (`<out>/_prepare.lock.<gen>.json`, ditscale.io.lock): two
launchers that need the same data (two grids sharing a data root, a rerun while a job prepares) never build it
twice: the second waits for the first, then finds the data ready. Every executor runs steps through it: the Slurm
launcher as CPU jobs (the training arrays depend on them, afterok), the Ray launcher as tasks, the local executor
as processes.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ditscale
from ditscale.errors import DataError, DitscaleError, LaunchError, RunLockedError, StorageError
from ditscale.grid import DataRecipe, RunSpec, Subset
from ditscale.io import storage
from ditscale.io.lock import Lease
from ditscale.launch import records

log = logging.getLogger("ditscale.launch")

READY, MISSING, CONFLICT = "ready", "missing", "conflict"
LOCK_NAME = "_prepare.lock.json"
LEASE_S = 60.0


@dataclass
class Step:
    name: str  # "build", "n1000-s0", "pair10-s0"
    kind: str  # "build", "subset", or "external" (data.manifest: shards built elsewhere, never run here)
    out: str  # the folder it writes
    manifests: list[str]  # what it writes, verified
    command: list[str]  # argv, starting with "python"
    expect: dict[str, Any] = field(default_factory=dict)  # what its first manifest must say
    needs: list[str] = field(default_factory=list)  # steps that must be ready first
    state: str = MISSING
    problem: str | None = None  # why it is not ready
    needed: bool = True  # False: missing, but no unfinished run trains on it
    runnable: bool = True  # False: the source's location is not given

    @property
    def shell(self) -> str:
        return shlex.join(self.command)


@dataclass
class DataPlan:
    recipe: DataRecipe
    steps: list[Step]

    @property
    def todo(self) -> list[Step]:
        """Steps to run, in order (the build first)."""
        return [s for s in self.steps if s.state == MISSING and s.needed]

    @property
    def conflicts(self) -> list[Step]:
        return [s for s in self.steps if s.state == CONFLICT and s.needed]

    @property
    def blocked(self) -> list[Step]:
        """Missing steps that cannot run (the source is not given), and the steps that need them."""
        stuck = {s.name for s in self.todo if not s.runnable}
        return [s for s in self.todo if s.name in stuck or set(s.needs) & stuck]


def _subset_step(recipe: DataRecipe, sub: Subset) -> Step:
    out = recipe.subset_dir(sub)
    roles = ["s1", "s2"] if sub.pair else [None]
    manifests = [recipe.train_url(sub, r) for r in roles] + [recipe.test_url(sub)]
    expect = {"subset.size": sub.size, "subset.seed": sub.seed}
    if recipe.resolution:
        expect["resolution"] = recipe.resolution
    return Step(sub.name, "subset", out, manifests, recipe.subset_command(sub), expect)


def _build_step(recipe: DataRecipe) -> Step:
    expect = {"source": recipe.source, "resolution": recipe.resolution, "channels": recipe.channels}
    step = Step("build", "build", recipe.full_dir, [recipe.full_manifest], recipe.build_command(), expect)
    step.runnable = recipe.source == "digits" or recipe.src is not None
    return step


def _get(m: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        m = m.get(part) if isinstance(m, dict) else None
    return m


def verify(step: Step) -> tuple[str, str | None]:
    """(state, problem) of a step's outputs: ready, missing (nothing there yet) or conflict (something else)."""
    from ditscale.data import missing_shards, read_manifest  # lazy: torch at import (launchers' start-up)

    for i, url in enumerate(step.manifests):
        try:
            m = read_manifest(url)
        except StorageError as e:
            if "does not exist" in str(e):
                return MISSING, f"{url} does not exist"
            raise  # the store cannot be reached: not a state of the data
        except DataError as e:
            return CONFLICT, f"{url} cannot be used: {e}"
        gone = missing_shards(m)
        if gone:
            return CONFLICT, f"{url} lists {len(gone)} shard(s) that do not exist, e.g. {gone[0]}"
        if i == 0:
            for key, want in step.expect.items():
                have = _get(m, key)
                if have != want:
                    return CONFLICT, f"{url} has {key}={have!r} but the recipe asks for {want!r}"
    return READY, None


def plan_data(recipe: DataRecipe, runs: list[RunSpec] | None = None, *, check: bool = True) -> DataPlan:
    """The recipe's steps with their states. `runs`: the unfinished runs; a missing subset that none of them
    trains on is listed but not prepared. `check=False` skips reading the storage (states stay 'missing')."""
    subsets = [_subset_step(recipe, s) for s in recipe.subsets]
    wanted = None if runs is None else {(r.subset or "").split("/")[0] for r in runs}
    for st in subsets:
        if check:
            st.state, st.problem = verify(st)
        st.needed = wanted is None or st.name in wanted
    # the step the subsets are cut from: the shard build, or shards built elsewhere (checked, never built here)
    if recipe.manifest is None:
        head = _build_step(recipe)
    else:
        head = Step(
            "shards",
            "external",
            storage.dirname(recipe.manifest),
            [recipe.manifest],
            [
                "python",
                "-m",
                "ditscale",
                "data",
                "build",
                "SOURCE",
                "--src",
                "<dataset>",
                "--out",
                storage.dirname(recipe.manifest),
                "--resolution",
                "N",
            ],
            runnable=False,
        )
    if check:
        head.state, head.problem = verify(head)
    head.needed = any(s.state != READY and s.needed for s in subsets)
    if head.state != READY:
        for st in subsets:
            st.needs = [head.name]
    return DataPlan(recipe, [head, *subsets])


# --- printing and errors ----------------------------------------------------------------------------------------
def describe(recipe: DataRecipe) -> str:
    what = (
        f"{recipe.source} at {recipe.resolution}x{recipe.resolution}, {recipe.channels} channel(s)"
        if recipe.manifest is None
        else f"prebuilt shards {recipe.manifest}"
    )
    return (
        f"data recipe of {recipe.grid_file}: {what} -> {recipe.root}; {len(recipe.subsets)} subset(s), "
        f"held-out test set of at most {recipe.test_size}"
    )


def format_data_plan(dp: DataPlan, how: dict[str, str] | None = None) -> str:
    """The data section of a launcher's plan: each step, its state and what will prepare it, with the command."""
    how = how or {}
    lines = [describe(dp.recipe)]
    width = max(len(s.name) for s in dp.steps)
    owidth = max(len(s.out) for s in dp.steps)
    for s in dp.steps:
        if s.state == READY:
            state = "ready"
        elif s.state == CONFLICT:
            state = f"CONFLICT: {s.problem}"
        elif not s.needed:
            state = "missing, not needed (no unfinished run uses it)"
        elif s in dp.blocked:
            state = "MISSING, cannot be built: " + (
                "shards built elsewhere (data.manifest)"
                if s.kind == "external"
                else f"give the source with --var {dp.recipe.src_vars[0]}=PATH"
                if not s.runnable and dp.recipe.src_vars
                else "data.src is not given"
                if not s.runnable
                else f"needs {s.needs[0]}"
            )
        else:
            state = "missing -> " + how.get(s.name, "will be prepared")
        lines.append(f"  {s.name:<{width}}  {s.out:<{owidth}}  {state}")
        if s.state != READY and s.needed and s.kind != "external":
            lines.append(f"  {'':<{width}}    {s.shell}")
    r = dp.recipe
    if any(not s.runnable for s in dp.blocked) and r.manifest is None:
        give = f"--var {r.src_vars[0]}=PATH" if r.src_vars else "data.src in the grid file"
        lines.append(
            f"the {r.source} source's location is not given: the data cannot be prepared until {give} is "
            f"given ({r.src_placeholder()} above: where the {r.source} dataset is)"
        )
    return "\n".join(lines)


def check_sources(dp: DataPlan) -> None:
    """Every source path the missing steps read exists (data.src: a folder for `folder` and the dataset kinds that
    read one): checked at submit and in --dry-run, named with the --var that gives it, before anything runs."""

    r = dp.recipe
    if r.manifest is not None or r.src is None or r.source == "digits":
        return
    if not any(s.kind == "build" and s.needed for s in dp.todo):
        return
    give = f" (--var {r.src_vars[0]})" if r.src_vars else ""
    if storage.is_local(r.src):
        path = storage.local_path(r.src)
        if not os.path.exists(path):
            raise LaunchError(f"grid {r.grid_file!r}: data.src {r.src}{give} does not exist (where the {r.source} "
                              "dataset is)")  # fmt: skip
        if r.source == "folder" and not os.path.isdir(path):
            raise LaunchError(f"grid {r.grid_file!r}: data.src {r.src}{give}: expected a directory of images")
    elif not storage.exists(r.src) and not storage.listdir(r.src):
        raise LaunchError(f"grid {r.grid_file!r}: data.src {r.src}{give} does not exist")


def check_ready(dp: DataPlan) -> None:
    """Raise LaunchError when the plan cannot be carried out: a conflicting output, or missing data that cannot be
    built because the source is not given (naming each missing path and the command that builds it)."""
    if dp.conflicts:
        items = "\n".join(f"  {s.name}: {s.problem}" for s in dp.conflicts)
        raise LaunchError(
            f"grid {dp.recipe.grid_file!r}: prepared data does not match the recipe (it is never "
            f"overwritten: remove it, or point data.root elsewhere with --var):\n{items}"
        )
    blocked = dp.blocked
    if not blocked:
        return
    r = dp.recipe
    if r.manifest is not None:
        items = "\n".join("  missing " + ", ".join(s.manifests) for s in blocked)
        why = "shards built elsewhere: build them with python -m ditscale data build, or fix data.manifest"
        raise LaunchError(f"grid {r.grid_file!r}: data.manifest {r.manifest} does not exist ({why}):\n{items}")
    give = f"--var {r.src_vars[0]}=PATH" if r.src_vars else "data.src in the grid file"
    lines = [f"grid {r.grid_file!r}: data is missing and the {r.source} source's location is not given ({give}):"]
    for s in blocked:
        lines.append("  missing " + ", ".join(s.manifests))
        lines.append("    build: " + s.shell)
    lines.append(
        f"give {give} and the launcher prepares it, or run the commands above "
        f"({r.src_placeholder()}: where the {r.source} dataset is)"
    )
    raise LaunchError("\n".join(lines))


# --- running a step ----------------------------------------------------------------------------------------------
def _package_root() -> str:
    return str(Path(ditscale.__file__).resolve().parents[1])


def command_env() -> dict[str, str]:
    """The environment of a step's command: `python -m ditscale` finds this package even from a checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    return env


def run_step(step: Step, *, log_file: str | None = None, poll_s: float = 2.0) -> str:
    """Run one step unless its outputs verify; 'ready' (already there, nothing run) or 'built'.

    Under the step's lease: a step another launcher is running is waited for, then verified, not run again."""

    lease = Lease(storage.join(step.out, LOCK_NAME), LEASE_S, what="data folder", keep=False)
    waited = False
    while True:
        state, problem = verify(step)
        if state == READY:
            if waited:
                log.info("data %s: prepared by another launcher meanwhile", step.name)
            return READY
        if state == CONFLICT:
            raise DataError(f"data step {step.name}: {problem}")
        try:
            lease.acquire()
            break
        except RunLockedError as e:
            if not waited:
                log.info("data %s: another launcher is preparing it (%s); waiting", step.name, e)
            waited = True
            time.sleep(poll_s)
    try:
        state, problem = verify(step)
        if state == READY:
            return READY
        argv = [sys.executable, *step.command[1:]] if step.command[0] == "python" else list(step.command)
        log.info("data %s: %s", step.name, step.shell)
        out = open(log_file, "ab") if log_file else None
        try:
            rc = subprocess.call(argv, env=command_env(), stdout=out, stderr=subprocess.STDOUT if out else None)
        finally:
            if out:
                out.close()
        if rc != 0:
            where = f"; see {log_file}" if log_file else ""
            raise DataError(f"data step {step.name} failed (exit code {rc}): {step.shell}{where}")
        state, problem = verify(step)
        if state != READY:
            raise DataError(f"data step {step.name} ran but its output does not verify: {problem}")
        return "built"
    finally:
        lease.release()


def run_step_job(step: Step, log_dir: str | None = None) -> str:
    """The function a Slurm preparation job runs (submitit pickles it with its step). A failure is recorded in the
    log dir (ditscale.launch.records) so that --status names the step, its job and its error."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_step(step)
    except Exception as e:
        if log_dir:
            from ditscale.launch.task import job_id_from_env  # lazy: submitit at import (launchers' start-up)

            records.write_failure(log_dir, job_id_from_env() or "?", "", _one_line(e), "failed", step=step.name)
        raise


def _one_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]


def prepare_locally(dp: DataPlan, *, parallel: int = 1, log_dir: Path | None = None) -> dict[str, str]:
    """Run the plan's missing steps on this machine (the build first, then up to `parallel` subsets at a time);
    step name -> 'built' or 'ready'. Raises LaunchError naming every step that failed."""
    check_ready(dp)
    todo = dp.todo
    if not todo:
        return {}
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)

    def one(step: Step) -> tuple[str, str]:
        log_file = str(log_dir / f"prepare-{step.name}.log") if log_dir is not None else None
        print(f"preparing {step.name}: {step.shell}" + (f"  (log: {log_file})" if log_file else ""), flush=True)
        try:
            return step.name, run_step(step, log_file=log_file)
        except DitscaleError as e:
            return step.name, f"failed: {e}"

    out: dict[str, str] = {}
    first = [s for s in todo if s.kind == "build"]
    rest = [s for s in todo if s.kind != "build"]
    out.update(one(s) for s in first)
    if not any(v.startswith("failed") for v in out.values()):
        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            out.update(pool.map(one, rest))
    failed = {k: v for k, v in out.items() if v.startswith("failed")}
    if failed:
        raise LaunchError("data preparation failed:\n" + "\n".join(f"  {k}: {v[8:]}" for k, v in failed.items()))
    return out
