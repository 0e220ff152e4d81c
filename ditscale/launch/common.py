"""Planning shared by the launchers: expand the grid, validate every run, split finished from pending."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import ditscale
from ditscale.errors import LaunchError
from ditscale.grid import RunSpec, check_model_vs_data, expand, raise_problems
from ditscale.grid import check_data as check_grid_data
from ditscale.io.rundir import DONE, RowReader
from ditscale.launch import claim as C
from ditscale.launch import records
from ditscale.launch.prepare import plan_data

log = logging.getLogger("ditscale.launch")

DEFAULT_GRID = "configs/grids/celeba32.yaml"  # relative to the checkout that holds the ditscale package


def checkout_root() -> Path:
    """The folder holding the ditscale package: the checkout (run from it, or an editable install)."""

    return Path(ditscale.__file__).resolve().parents[1]


def resolve_grid(grid: str | None) -> tuple[str, bool]:
    """(grid file, is it the default). A path is taken as given (absolute, or from the working directory), else
    from the checkout; a bare name ('celeba32') is configs/grids/<name>.yaml. None: the default grid, from the
    checkout that holds the ditscale package (whatever the working directory)."""
    root = checkout_root()
    if grid is None:
        p = root / DEFAULT_GRID
        if p.is_file():
            return str(p), True
        raise LaunchError(
            f"the default grid {DEFAULT_GRID} is not in {root} (ditscale installed without its "
            "checkout?): give --grid FILE"
        )
    p = Path(grid).expanduser()
    tries = [p] if p.is_absolute() else [p, root / p]
    if len(p.parts) == 1 and p.suffix not in (".yaml", ".yml"):
        tries += [Path("configs/grids") / f"{grid}.yaml", root / "configs" / "grids" / f"{grid}.yaml"]
    for t in tries:
        if t.is_file():
            return str(t), False
    looked = ", ".join(dict.fromkeys(str(t) for t in tries))
    raise LaunchError(f"grid file {grid!r} not found (looked at {looked})")


@dataclass
class Plan:
    grid_file: str
    runs: list[RunSpec]
    done: list[RunSpec] = field(default_factory=list)
    todo: list[RunSpec] = field(default_factory=list)
    data: object | None = None  # ditscale.launch.prepare.DataPlan when the grid has a data recipe
    default_grid: bool = False
    statuses: dict = field(default_factory=dict)  # run id -> RunStatus (what the run dir says now)
    claims: dict = field(default_factory=dict)  # run id -> its newest claim (ditscale.launch.claim), unfinished runs
    problems: list[str] = field(default_factory=list)  # model-vs-data mismatches found while planning
    launch: dict = field(default_factory=dict)  # how the grid was launched: vars, overrides, run root, resources

    @property
    def name(self) -> str:
        return self.runs[0].grid if self.runs else Path(self.grid_file).stem

    def header(self) -> str:
        """The plan's first line: the grid (saying when it is the default one) and its runs."""
        default = ", the default grid: --grid FILE picks another" if self.default_grid else ""
        return f"grid {self.name!r} ({self.grid_file}{default}): {len(self.runs)} runs, {len(self.done)} finished"


def split_done(plan: Plan, workers: int = 16) -> None:
    """plan.done / plan.todo / plan.statuses / plan.claims from the run dirs: one listing per folder of run dirs on
    object storage, then only the files that matter (final.json of finished runs, the claims of unfinished ones),
    read in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    reader = RowReader([r.run_dir for r in plan.runs], workers=workers)
    statuses = reader.statuses({r.run_dir: r.config.train.steps for r in plan.runs})
    plan.statuses = {r.id: statuses[r.run_dir] for r in plan.runs}
    plan.done = [r for r in plan.runs if plan.statuses[r.id].state == DONE]
    plan.todo = [r for r in plan.runs if plan.statuses[r.id].state != DONE]
    gens = {}
    for r in plan.todo:
        names = [n for n, _ in reader.siblings(r.run_dir)]
        gens[r.id] = C.parse_listing(names).get(r.run_dir.rsplit("/", 1)[-1], (0, False))
    # an ended claim frees its run (the listing says so); only claims in flight are read, to ask their backend
    plan.claims = {r.id: C.Claim(r.run_dir, g, {}, True) for r in plan.todo if (g := gens[r.id][0]) and gens[r.id][1]}
    flight = [r for r in plan.todo if gens[r.id][0] and not gens[r.id][1]]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(flight) or 1))) as pool:
        got = list(pool.map(lambda r: C.read(r.run_dir, gens[r.id][0]), flight))
    for r, c in zip(flight, got, strict=True):
        # gone meanwhile (ended or replaced): the next claim attempt reads it again
        plan.claims[r.id] = c if c is not None else C.Claim(r.run_dir, gens[r.id][0], {"backend": "?"})


def plan_grid(
    grid_file: str,
    *,
    vars: dict | None = None,
    run_root: str | None = None,
    overrides: list[str] | None = None,
    resources: dict | None = None,
    check_data: bool = True,
    read_state: bool = True,
) -> Plan:
    """Expand and validate a grid (config schema, window specs, data URLs, model against data) and split done from
    to-do runs.

    resources (e.g. {"nodes": 2, "gpus_per_node": 8, "timeout_min": 60}) override every run's resources.
    Raises LaunchError naming the run and the key before anything is submitted.
    """
    problems: list[str] = []  # every bad run in one error: config, window spec, data
    runs = expand(grid_file, vars=vars, run_root=run_root, overrides=overrides, problems=problems)
    for r in runs:
        r.resources.update({k: v for k, v in (resources or {}).items() if v is not None})
    if check_data:  # a recipe's outputs are left to its data plan (below)
        check_grid_data(runs, problems=problems)
        check_model_vs_data(runs, problems=problems)
    raise_problems(problems)
    p = Plan(str(grid_file), runs)
    p.launch = {
        "grid": str(Path(grid_file).resolve()),
        "vars": dict(vars or {}),
        "overrides": list(overrides or []),
        "run_root": run_root,
        "resources": {k: v for k, v in (resources or {}).items() if v is not None},
    }
    if read_state:  # --status and --collect read the run dirs their own way
        split_done(p)
    else:
        p.todo = list(runs)
    if check_data:
        recipe = runs[0].recipe if runs else None
        if recipe is not None:  # the recipe's outputs are checked (and prepared) by its data plan
            p.data = plan_data(recipe, p.todo)
    return p


def results_dir(runs: list[RunSpec], default_name: str) -> Path:
    """Where a grid's results table and launcher logs go: the common parent of its (local) run dirs."""
    local = [r.run_dir for r in runs if "://" not in r.run_dir]
    if local:
        return Path(os.path.commonpath([str(Path(d).parent) for d in local]))
    return Path("results") / default_name


def expand_as_launched(grid_file: str, run_root: str | None = None) -> list[RunSpec]:
    """The runs of a grid as its newest launch set them (--var, overrides, --run-root recorded in the launch records
    of its default log dirs, <runs parent>/_<backend>); the grid file's own defaults when it was never launched.
    Used by `report --grid GRID.yaml` and `python -m ditscale grid --status`."""

    runs = expand(grid_file, run_root=run_root)
    base = results_dir(runs, Path(grid_file).stem)
    recs = [r for b in ("slurm", "local", "ray", "k8s") if (r := records.remembered(base / f"_{b}", grid_file))]
    if not recs:
        return runs
    rec = max(recs, key=lambda r: r.get("time", 0))
    return expand(
        grid_file,
        vars=rec.get("vars"),
        run_root=run_root or rec.get("run_root"),
        overrides=rec.get("overrides"),
    )
