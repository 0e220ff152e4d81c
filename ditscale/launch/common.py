"""Planning shared by the launchers: expand the grid, validate every run, split finished from pending."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ditscale import grid as G
from ditscale import results
from ditscale.grid import RunSpec

log = logging.getLogger("ditscale.launch")


@dataclass
class Plan:
    grid_file: str
    runs: list[RunSpec]
    done: list[RunSpec] = field(default_factory=list)
    todo: list[RunSpec] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.runs[0].grid if self.runs else Path(self.grid_file).stem


def plan_grid(
    grid_file: str,
    *,
    vars: dict | None = None,
    run_root: str | None = None,
    overrides: list[str] | None = None,
    resources: dict | None = None,
    check_data: bool = True,
) -> Plan:
    """Expand and validate a grid (config schema, window specs, data URLs) and split done from to-do runs.

    resources (e.g. {"nodes": 2, "gpus_per_node": 8, "timeout_min": 60}) override every run's resources.
    Raises LaunchError naming the run and the key before anything is submitted.
    """
    runs = G.expand(grid_file, vars=vars, run_root=run_root, overrides=overrides)
    for r in runs:
        r.resources.update({k: v for k, v in (resources or {}).items() if v is not None})
    if check_data:
        G.check_data(runs)
    p = Plan(str(grid_file), runs)
    for r in runs:
        (p.done if results.is_done(r.run_dir) else p.todo).append(r)
    return p


def results_dir(runs: list[RunSpec], default_name: str) -> Path:
    """Where a grid's results table and launcher logs go: the common parent of its (local) run dirs."""
    local = [r.run_dir for r in runs if "://" not in r.run_dir]
    if local:
        return Path(os.path.commonpath([str(Path(d).parent) for d in local]))
    return Path("results") / default_name
