"""Grid files: a base config plus axes, expanded into runs with stable, readable ids.

A grid file (configs/grids/*.yaml):

```yaml
name: celeba32                      # grid name: default id prefix and run-dir folder
base: ../demo.yaml                  # optional base config file (relative to the grid file)
config:                             # optional inline config tree, merged over `base`
  model: {variant: DiT-XS/1, input_size: 32}
  train: {steps: 400000, global_batch: 64}
vars: {data_root: data}             # template variables (override: --var data_root=s3://bucket/ditscale)
run_dir: "runs/{grid}/{id}"         # where each run writes (relative paths resolve against the cwd)
id: "{grid}-xs1-{windows}-n{n}-s{shuffle}"   # optional; default: name + one "{prefix}{label}" per axis
resources: {nodes: 1, gpus_per_node: 8, cpus_per_task: 8, mem_gb: 64, timeout_min: 1440}
axes:                               # the runs are the cartesian product, in this order
  windows: {key: model.windows, values: [global, local@head, local*@mix]}
  n: {values: [1000, 10000, 100000], prefix: n}            # a variable only used by `set`
  shuffle: {key: run.seed, values: [0, 1, 2], prefix: s}
  nodes: {key: resources.nodes, values: [1, 2]}            # keys under resources. set the run's resources
  dataset:                                                 # a mapping: value name -> overrides
    celeba: {data.train: "{data_root}/celeba32/n{n}-s{shuffle}/manifest.json"}
set:                                # dotted keys, formatted per run with axis values, vars, grid and id
                                    # (strings in `config` and `base` are formatted the same way)
  checkpoint.every: 5000
data:                               # optional: the recipe of the grid's data (DataRecipe); sets data.train/test
  source: celeba                    # a shards/build.py source (or `manifest: URL` of shards built elsewhere)
  src: "{celeba_src}"               # where it is: --var celeba_src=/datasets/celeba
  root: "{data_root}/celeba32"      # <root>/full, <root>/n<N>-s<seed>/ (+ test/), <root>/pair<N>-s<seed>/
  resolution: 32
  sizes: [1000, 10000, 100000]
  seeds: [0, 1, 2]
  runs: {size: "{n}", seed: "{shuffle}"}   # the subset each run trains on
```

Ids use each axis value's label: numbers that are round powers of ten print as `1e4`, model variants as
`xs1` (DiT-XS/1), other strings as they are with `*` spelled `star` (local*@head -> localstar@head: ids
are directory names, and `*` is a glob character) and `/` replaced by `_`. Every run's config is validated through
ditscale.config (and its window spec against the model depth) before anything is submitted; errors name the
grid file, the run id and the key.
"""

from __future__ import annotations

import itertools
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ditscale.config import Config, _merge, _set_dotted, config_from_dict, parse_overrides, read_config_tree
from ditscale.errors import ConfigError, DitscaleError, LaunchError

DEFAULT_RESOURCES: dict[str, Any] = {
    "nodes": 1,
    "gpus_per_node": 0,  # 0: CPU run (one task per node unless tasks_per_node says otherwise)
    "tasks_per_node": None,  # default: gpus_per_node, or 1 without GPUs
    "cpus_per_task": 1,
    "mem_gb": None,
    "timeout_min": 60,
}
_GRID_KEYS = {"name", "base", "config", "vars", "run_dir", "id", "resources", "axes", "set", "description", "data"}
_ID_OK = re.compile(r"[^A-Za-z0-9@._+=-]")


@dataclass
class RunSpec:
    id: str
    config: Config
    run_dir: str
    resources: dict[str, Any]
    values: dict[str, Any] = field(default_factory=dict)  # axis name -> value of this run
    grid: str = ""
    recipe: DataRecipe | None = None  # the grid's data recipe (shared by its runs), when it has one
    subset: str | None = None  # the recipe's subset this run trains on, e.g. "n1000-s0"

    @property
    def tasks_per_node(self) -> int:
        r = self.resources
        return int(r.get("tasks_per_node") or r.get("gpus_per_node") or 1)

    @property
    def num_tasks(self) -> int:
        return int(self.resources.get("nodes", 1)) * self.tasks_per_node

    def config_dict(self) -> dict:
        return self.config.model_dump(mode="json")


def format_label(value: Any) -> str:
    """Short id-friendly label: 10000 -> '1e4', 'DiT-XS/1' -> 'xs1', 'local*@mix' -> 'localstar@mix'."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and value >= 1000:
        mant, exp = value, 0
        while mant % 10 == 0:
            mant //= 10
            exp += 1
        if exp >= 3 and mant < 10:
            return f"{mant}e{exp}"
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    s = str(value)
    m = re.fullmatch(r"DiT-([A-Za-z]+)/(\d+)", s)
    if m:
        return f"{m.group(1).lower()}{m.group(2)}"
    return _ID_OK.sub("_", s.replace("*", "star").replace("/", "_"))


@dataclass
class _Axis:
    name: str
    key: str | None
    values: list[Any]
    overrides: list[dict] | None  # mapping axis: per value, a dict of dotted overrides
    prefix: str


def _parse_axes(raw: Any, origin: str) -> list[_Axis]:
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise LaunchError(f"{origin}: 'axes' must be a mapping of axis name -> values")
    axes = []
    for name, spec in raw.items():
        where = f"{origin}: axis {name!r}"
        key, prefix, overrides = None, "", None
        if isinstance(spec, list):
            values = spec
        elif isinstance(spec, dict) and "values" in spec:
            unknown = set(spec) - {"values", "key", "prefix"}
            if unknown:
                raise LaunchError(f"{where}: unknown field(s) {sorted(unknown)} (expected values, key, prefix)")
            values, key, prefix = spec["values"], spec.get("key"), str(spec.get("prefix", ""))
        elif isinstance(spec, dict):  # value name -> overrides
            values = list(spec)
            overrides = []
            for v, ov in spec.items():
                if ov is not None and not isinstance(ov, dict):
                    raise LaunchError(f"{where}: value {v!r} must map to a mapping of dotted overrides")
                overrides.append(ov or {})
        else:
            raise LaunchError(f"{where}: expected a list of values, {{values: [...], key: ...}} or a mapping")
        if not isinstance(values, list) or not values:
            raise LaunchError(f"{where}: 'values' must be a non-empty list")
        if key is None and "." in str(name) and overrides is None:
            key = str(name)
        axes.append(_Axis(str(name), key, values, overrides, prefix))
    return axes


def _fmt(template: Any, ctx: dict, where: str) -> Any:
    if isinstance(template, str):
        try:
            return template.format(**ctx)
        except (KeyError, IndexError, ValueError) as e:
            raise LaunchError(f"{where}: cannot format {template!r}: unknown or bad placeholder {e}") from None
    if isinstance(template, list):
        return [_fmt(t, ctx, where) for t in template]
    if isinstance(template, dict):
        return {k: _fmt(v, ctx, where) for k, v in template.items()}
    return template


def load_grid(grid_file: str | Path) -> dict:
    p = Path(grid_file)
    if not p.is_file():
        raise LaunchError(f"grid file {str(p)!r} does not exist")
    try:
        grid = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise LaunchError(f"grid file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(grid, dict):
        raise LaunchError(f"grid file {str(p)!r}: expected a mapping at the top")
    unknown = set(grid) - _GRID_KEYS
    if unknown:
        raise LaunchError(f"grid file {str(p)!r}: unknown key(s) {sorted(unknown)} (expected {sorted(_GRID_KEYS)})")
    return grid


def expand(
    grid_file: str | Path,
    *,
    vars: dict[str, Any] | None = None,
    run_root: str | None = None,
    overrides: list[str] | None = None,
    validate: bool = True,
    problems: list[str] | None = None,
) -> list[RunSpec]:
    """Expand a grid file into its runs (cartesian product of the axes, in file order).

    vars override the grid's template variables; run_root replaces the grid's run_dir with `{run_root}/{id}`;
    overrides are dotted `key=value` applied to every run (after the axes). With validate (default), each run's
    window spec is also checked against its model's depth. Every invalid run is reported in one LaunchError; pass
    a `problems` list to collect them there instead (and get the valid runs back).
    """

    p = Path(grid_file)
    origin = f"grid {str(p)!r}"
    grid = load_grid(p)
    name = str(grid.get("name") or p.stem)
    tree: dict = {}
    if grid.get("base"):
        base = Path(grid["base"])
        base = base if base.is_absolute() else p.parent / base
        try:
            tree = read_config_tree(base)
        except ConfigError as e:
            raise LaunchError(f"{origin}: base: {e}") from None
    inline = grid.get("config") or {}
    if not isinstance(inline, dict):
        raise LaunchError(f"{origin}: 'config' must be a mapping of config sections")
    tree = _merge(tree, inline)
    gvars = dict(grid.get("vars") or {})
    gvars.update(vars or {})
    resources0 = dict(DEFAULT_RESOURCES)
    res_raw = grid.get("resources") or {}
    bad = set(res_raw) - set(DEFAULT_RESOURCES)
    if bad:
        raise LaunchError(f"{origin}: unknown resources key(s) {sorted(bad)} (expected {sorted(DEFAULT_RESOURCES)})")
    resources0.update(res_raw)
    axes = _parse_axes(grid.get("axes"), origin)
    sets = grid.get("set") or {}
    if not isinstance(sets, dict):
        raise LaunchError(f"{origin}: 'set' must be a mapping of dotted config keys -> values")
    try:
        extra = parse_overrides(overrides)
    except ConfigError as e:
        raise LaunchError(f"{origin}: {e}") from None
    recipe = parse_recipe(grid["data"], gvars, str(p), name) if grid.get("data") is not None else None
    id_template = grid.get("id") or "-".join(["{grid}"] + [f"{a.prefix}{{{a.name}}}" for a in axes])
    # --run-root is a path taken as given: its braces are not placeholders
    literal_root = run_root.rstrip("/").replace("{", "{{").replace("}", "}}") if run_root else None
    run_dir_template = f"{literal_root}/{{id}}" if literal_root else grid.get("run_dir", "runs/{grid}/{id}")

    runs: list[RunSpec] = []
    seen: dict[str, dict] = {}
    bad: list[str] = []  # every invalid run is reported, not only the first
    for combo in itertools.product(*[range(len(a.values)) for a in axes]):
        try:
            values = {a.name: a.values[i] for a, i in zip(axes, combo, strict=True)}
            labels = {a.name: format_label(a.values[i]) for a, i in zip(axes, combo, strict=True)}
            ctx_values = {**gvars, "grid": name, **values}
            run_id = _fmt(id_template, {**gvars, "grid": name, **labels}, f"{origin}: id")
            where = f"{origin}: run {run_id!r}"
            if run_id in seen:
                raise LaunchError(f"{where}: duplicate run id (values {values} and {seen[run_id]}); make 'id' unique")
            seen[run_id] = values
            ctx = {**ctx_values, "id": run_id}
            run_tree = _fmt(tree, ctx, f"{where}: config")  # a new tree: _fmt rebuilds every dict and list
            resources = dict(resources0)
            dotted: list[tuple[str, Any]] = []
            for a, i in zip(axes, combo, strict=True):
                if a.overrides is not None:
                    dotted += list(a.overrides[i].items())
                elif a.key:
                    dotted.append((a.key, a.values[i]))
            dotted += list(sets.items())
            if recipe is not None:
                for key, _ in dotted:
                    if key in ("data.train", "data.test"):
                        raise LaunchError(
                            f"{where}: {key} is derived from the grid's data recipe (data.runs picks "
                            f"each run's subset); remove {key} from 'set' and 'axes'"
                        )
            for key, value in dotted:
                value = _fmt(value, ctx, f"{where}: key {key!r}")
                if key.startswith("resources."):
                    rkey = key.split(".", 1)[1]
                    if rkey not in DEFAULT_RESOURCES:
                        raise LaunchError(f"{where}: unknown key {key!r} (resources: {sorted(DEFAULT_RESOURCES)})")
                    resources[rkey] = value
                else:
                    try:
                        _set_dotted(run_tree, key, value)
                    except ConfigError as e:
                        raise LaunchError(f"{where}: {e}") from None
            subset = None
            if recipe is not None:
                sub, role = recipe.select_for(ctx, where)
                _set_dotted(run_tree, "data.train", recipe.train_url(sub, role))
                _set_dotted(run_tree, "data.test", recipe.test_url(sub))
                subset = sub.name + (f"/{role}" if role else "")
            run_tree = _merge(run_tree, extra)
            run_dir = str(_fmt(run_dir_template, ctx, f"{where}: run_dir"))
            if "://" not in run_dir:
                run_dir = str(Path(run_dir).absolute())
            _set_dotted(run_tree, "run.dir", run_dir)
            _set_dotted(run_tree, "run.name", run_id)
            try:
                cfg = config_from_dict(run_tree, origin=f"({where})")
            except ConfigError as e:
                raise LaunchError(f"{where}: {e}") from None
            for rkey in ("nodes", "cpus_per_task", "timeout_min"):
                if not isinstance(resources.get(rkey), int) or resources[rkey] < 1:
                    raise LaunchError(f"{where}: resources.{rkey} must be a positive integer (got {resources[rkey]!r})")
        except LaunchError as e:
            bad.append(str(e).removeprefix(f"{origin}: "))
            continue
        runs.append(RunSpec(run_id, cfg, run_dir, resources, values, name, recipe, subset))
    if validate:
        runs = check_models(runs, problems=bad)
    _report(bad, problems, origin)
    return runs


def raise_problems(problems: list[str], origin: str = "") -> None:
    """One LaunchError naming every invalid run (one line each; repeated lines once)."""
    problems = list(dict.fromkeys(problems))
    where = f"{origin}: " if origin else ""
    if len(problems) == 1:
        raise LaunchError(where + problems[0])
    if problems:
        raise LaunchError(f"{where}{len(problems)} problems in the grid:\n  " + "\n  ".join(problems))


def _report(bad: list[str], problems: list[str] | None, origin: str = "") -> None:
    """Raise for the bad runs now, or hand them to the caller that collects every problem (`problems`)."""
    if problems is None:
        raise_problems(bad, origin)
    else:
        problems += bad


def check_models(runs: list[RunSpec], problems: list[str] | None = None) -> list[RunSpec]:
    """Each run's model variant exists, its window spec fits the model depth (the model package's one check) and
    the model builds at its size (cheap: on the meta device). Returns the valid runs; the others are reported
    together (or appended to `problems`)."""
    try:
        import torch

        from ditscale.model import DiT_models, check_variant_windows  # lazy: torch at import (launchers' start-up)
    except ImportError:  # model package not available: the trainer validates at start
        return runs
    builds: dict[str, str | None] = {}  # variant@size: why it cannot be built, or None
    ok, bad = [], []
    for r in runs:
        m = r.config.model
        where = f"run {r.id!r}"
        try:
            check_variant_windows(m.variant, m.windows)
        except DitscaleError as e:
            bad.append(f"{where}: {e}")
            continue
        key = f"{m.variant}@{m.input_size}x{m.in_channels}"
        if key not in builds:
            builds[key] = None
            try:
                with torch.device("meta"):
                    DiT_models[m.variant](input_size=m.input_size, in_channels=m.in_channels, num_classes=1)
            except DitscaleError as e:
                builds[key] = f"model: {e}"
            except Exception as e:
                builds[key] = f"model.variant {m.variant!r} with input_size {m.input_size}: {e}"
        if builds[key]:
            bad.append(f"{where}: {builds[key]}")
            continue
        ok.append(r)
    _report(bad, problems)
    return ok


def check_data(runs: list[RunSpec], problems: list[str] | None = None) -> list[RunSpec]:
    """Every run's data.train (and data.test when set) manifest can be read. Errors name the run and the key; every
    bad run is reported together (or appended to `problems`). Returns the runs whose data can be read."""
    seen: dict[str, str | None] = {}
    ok, bad = [], []
    for r in runs:
        made = r.recipe.outputs() if r.recipe is not None else set()  # checked by the recipe's data plan
        errors = []
        for key in ("train", "test"):
            url = getattr(r.config.data, key)
            if (not url and key == "test") or url in made:
                continue
            if not url:
                errors.append(f"run {r.id!r}: data.train is empty (expected a manifest.json URL)")
                continue
            if url not in seen:
                seen[url] = _manifest_problem(url)
                if seen[url]:
                    errors.append(f"run {r.id!r}: data.{key} {url!r} cannot be read: {seen[url]}")
            elif seen[url]:
                errors.append(f"run {r.id!r}: data.{key} {url!r} cannot be read (as above)")
        bad += errors
        if not errors:
            ok.append(r)
    _report(bad, problems)
    return ok


def check_model_vs_data(runs: list[RunSpec], problems: list[str] | None = None) -> list[RunSpec]:
    """Each run's model fits its data: channels, image (or latent) size and classes of the training manifest (or
    of the grid's data recipe, for data it has not built yet), and a held-out test set that says the same. What the
    trainer would refuse at its start is named here, before anything is submitted (every bad run together)."""
    from ditscale.data import read_manifest  # lazy: torch at import

    cache: dict[str, dict | None] = {}

    def manifest(url: str) -> dict | None:
        if url not in cache:
            try:
                cache[url] = read_manifest(url)
            except Exception:  # unreadable data is check_data's (or the recipe's) to name
                cache[url] = None
        return cache[url]

    ok, bad = [], []
    for r in runs:
        m, where = r.config.model, f"run {r.id!r}"
        errors = []
        made = r.recipe.outputs() if r.recipe is not None else set()
        for key in ("train", "test"):
            url = getattr(r.config.data, key)
            if not url:
                continue
            have = manifest(url) if url not in made or r.recipe is None else None
            if have is None and r.recipe is not None and url in made:
                full = manifest(r.recipe.full_manifest) if r.recipe.manifest is None else manifest(r.recipe.manifest)
                have = {"channels": r.recipe.channels, "resolution": r.recipe.resolution, "kind": "pixels"}
                have["num_classes"] = (full or {}).get("num_classes", 0)
            if not have:
                continue
            kind = have.get("kind", "pixels")
            if kind != r.config.data.kind:
                errors.append(f"{where}: data.kind={r.config.data.kind!r} but data.{key} {url} holds {kind!r}")
            if have.get("channels") not in (None, m.in_channels):
                errors.append(f"{where}: model.in_channels={m.in_channels} but data.{key} {url} has "
                              f"{have['channels']} channels")  # fmt: skip
            if have.get("resolution") not in (None, m.input_size):
                errors.append(f"{where}: model.input_size={m.input_size} but data.{key} {url} has size "
                              f"{have['resolution']}")  # fmt: skip
            if (have.get("num_classes") or 0) > m.num_classes:
                errors.append(f"{where}: model.num_classes={m.num_classes} but data.{key} {url} has "
                              f"{have['num_classes']} classes")  # fmt: skip
        bad += errors
        if not errors:
            ok.append(r)
    _report(bad, problems)
    return ok


def _manifest_problem(url: str) -> str | None:
    from ditscale.data import read_manifest  # lazy: torch at import

    try:
        read_manifest(url)
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def summarize(runs: list[RunSpec]) -> str:
    """A plain table of runs: id, resources, run dir."""
    rows = [("RUN", "NODES", "TASKS", "GPUS/NODE", "TIME(min)", "RUN DIR")]
    for r in runs:
        res = r.resources
        rows.append(
            (r.id, str(res["nodes"]), str(r.num_tasks), str(res["gpus_per_node"]), str(res["timeout_min"]), r.run_dir)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def parse_vars(items: list[str]) -> dict:
    """--var NAME=VALUE items -> {NAME: value} (values parsed as YAML)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise LaunchError(f"--var {item!r}: expected NAME=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v) if v else ""
    return out


# --- the data recipe ------------------------------------------------------------------------------------------
RECIPE_KEYS = {
    "source",
    "src",
    "manifest",
    "root",
    "resolution",
    "channels",
    "build",
    "sizes",
    "seeds",
    "pairs",
    "test_size",
    "runs",
    "resources",
}
BUILD_OPTIONS = {
    "format": "--format",
    "workers": "--workers",
    "shard_size": "--shard-size",
    "png_level": "--png-level",
    "class_folders": "--class-folders",
    "limit": "--limit",
}
PREP_RESOURCES: dict[str, Any] = {"cpus": 4, "mem_gb": None, "timeout_min": 240}
PAIR_ROLES = ("s1", "s2")


@dataclass(frozen=True)
class Subset:
    """One study subset of the recipe: N images drawn with a seed (or a disjoint pair of N each)."""

    size: int
    seed: int
    pair: bool = False

    @property
    def name(self) -> str:
        return f"{'pair' if self.pair else 'n'}{self.size}-s{self.seed}"


@dataclass
class DataRecipe:
    """How a grid's data is made: the full shard set of a source, its study subsets and their held-out test set.

    Layout under `root`: `full/` (the source's shards; `manifest` names prebuilt ones instead), `n<N>-s<seed>/`
    for each subset (its held-out test set in `.../test/`, the same images for every N and seed) and
    `pair<N>-s<seed>/{s1,s2}/` for disjoint pairs. The runs' data.train and data.test are derived from it.
    """

    grid_file: str
    root: str
    source: str | None
    src: str | None  # the source's location; None when not given
    src_vars: list[str]  # the --var names that give it
    manifest: str | None  # prebuilt full shards: no build step
    resolution: int | None
    channels: int
    build: dict[str, Any]
    subsets: list[Subset]
    test_size: int
    select: dict[str, Any]  # data.runs: templates picking each run's subset
    resources: dict[str, Any]

    @property
    def full_dir(self) -> str:
        return _join(self.root, "full")

    @property
    def full_manifest(self) -> str:
        return self.manifest or _join(self.full_dir, "manifest.json")

    def subset_dir(self, sub: Subset) -> str:
        return _join(self.root, sub.name)

    def train_url(self, sub: Subset, role: str | None = None) -> str:
        return _join(self.subset_dir(sub), *([role] if role else []), "manifest.json")

    def test_url(self, sub: Subset) -> str:
        return _join(self.subset_dir(sub), "test", "manifest.json")

    def outputs(self) -> set[str]:
        """Every manifest the recipe writes (the full set's, each subset's and test set's)."""
        out = {self.full_manifest}
        for sub in self.subsets:
            out |= {self.train_url(sub, r) for r in (PAIR_ROLES if sub.pair else (None,))} | {self.test_url(sub)}
        return out

    def src_placeholder(self) -> str:
        return f"<{self.src_vars[0]}>" if self.src_vars else "<path of the dataset>"

    def build_command(self) -> list[str]:
        """`python -m ditscale data build ...` for the full shard set (the src placeholder when not given)."""
        cmd = ["python", "-m", "ditscale", "data", "build", str(self.source)]
        if self.source != "digits":
            cmd += ["--src", self.src or self.src_placeholder()]
        cmd += ["--out", self.full_dir, "--resolution", str(self.resolution), "--channels", str(self.channels)]
        for key, flag in BUILD_OPTIONS.items():
            value = self.build.get(key)
            if key == "class_folders":
                cmd += [flag] if value else []
            elif value is not None:
                cmd += [flag, str(value)]
        return cmd + ["--no-progress"]

    def subset_command(self, sub: Subset) -> list[str]:
        cmd = [
            "python",
            "-m",
            "ditscale",
            "data",
            "subset",
            "--manifest",
            self.full_manifest,
            "--size",
            str(sub.size),
            "--seed",
            str(sub.seed),
            "--out",
            self.subset_dir(sub),
            "--test-size",
            str(self.test_size),
        ]
        return cmd + (["--pair"] if sub.pair else [])

    def select_for(self, ctx: dict, where: str) -> tuple[Subset, str | None]:
        """The subset (and pair role) a run trains on, from data.runs formatted with the run's values."""
        got = {k: _fmt(v, ctx, f"{where}: data.runs.{k}") for k, v in self.select.items()}
        role = got.get("pair")
        role = None if role in (None, "", "None") else str(role)
        if role is not None and role not in PAIR_ROLES:
            raise LaunchError(f"{where}: data.runs.pair is {role!r} (expected one of {', '.join(PAIR_ROLES)})")
        try:
            size, seed = int(float(got.get("size"))), int(float(got.get("seed", 0)))
        except (TypeError, ValueError):
            raise LaunchError(
                f"{where}: data.runs: size {got.get('size')!r} / seed {got.get('seed')!r} are not integers"
            ) from None
        sub = Subset(size, seed, role is not None)
        if sub not in self.subsets:
            have = ", ".join(s.name for s in self.subsets)
            raise LaunchError(
                f"{where}: data.runs picks subset {sub.name!r}, which the recipe does not make "
                f"(data.sizes/seeds/pairs give: {have})"
            )
        return sub, role


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _absolute(url: str) -> str:
    return url if "://" in url else str(Path(url).absolute())


def _int_list(raw: Any, where: str, minimum: int) -> list[int]:
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise LaunchError(f"{where}: expected a non-empty list of integers >= {minimum}")
    out = []
    for v in raw:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise LaunchError(f"{where}: {v!r} is not an integer >= {minimum}")
        out.append(v)
    return out


def _src_of(template: Any, gvars: dict, where: str) -> tuple[str | None, list[str]]:
    """The source location and the vars that give it; None when a var it names is unset or empty."""
    if template in (None, ""):
        return None, []
    if not isinstance(template, str):
        raise LaunchError(f'{where}: expected a path or URL (e.g. "{{celeba_src}}", given with --var)')
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    if any(gvars.get(n) in (None, "") for n in names):
        return None, names
    return _absolute(_fmt(template, gvars, where)), names


def parse_recipe(raw: Any, gvars: dict, grid_file: str, grid_name: str) -> DataRecipe:
    """The grid's `data:` recipe, validated; errors name the grid file and the key."""
    origin = f"grid {grid_file!r}"
    if not isinstance(raw, dict):
        raise LaunchError(f"{origin}: 'data' must be a mapping (source, root, resolution, sizes, seeds, ...)")
    unknown = set(raw) - RECIPE_KEYS
    if unknown:
        raise LaunchError(
            f"{origin}: unknown key(s) {sorted('data.' + k for k in unknown)} "
            f"(expected data.{', data.'.join(sorted(RECIPE_KEYS))})"
        )
    ctx = {**gvars, "grid": grid_name}
    source, manifest = raw.get("source"), raw.get("manifest")
    if (source is None) == (manifest is None):
        raise LaunchError(
            f"{origin}: data: give either data.source (a dataset to build shards from) or "
            "data.manifest (prebuilt shards), not both or neither"
        )
    if source is not None:
        from ditscale.data.sources import SOURCES  # lazy: torch at import

        if source not in SOURCES:
            raise LaunchError(f"{origin}: data.source {source!r} is unknown (expected one of {', '.join(SOURCES)})")
    src, src_vars = _src_of(raw.get("src"), gvars, f"{origin}: data.src")
    if source not in (None, "digits") and "src" not in raw:
        raise LaunchError(
            f'{origin}: data.src is missing: where the {source} dataset is, e.g. "{{{source}_src}}" '
            f"given with --var {source}_src=/datasets/{source}"
        )
    if manifest is not None:
        manifest = _absolute(str(_fmt(manifest, ctx, f"{origin}: data.manifest")))
    root = raw.get("root")
    if not isinstance(root, str) or not root:
        raise LaunchError(
            f'{origin}: data.root is missing: the folder or URL the recipe writes to, e.g. "{{data_root}}/celeba32"'
        )
    root = _absolute(str(_fmt(root, ctx, f"{origin}: data.root")).rstrip("/"))
    resolution = raw.get("resolution")
    if source is not None and (not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1):
        raise LaunchError(f"{origin}: data.resolution must be a positive integer (got {resolution!r})")
    channels = raw.get("channels", 3)
    if channels not in (1, 3):
        raise LaunchError(f"{origin}: data.channels must be 1 or 3 (got {channels!r})")
    build = raw.get("build") or {}
    if not isinstance(build, dict) or set(build) - set(BUILD_OPTIONS):
        raise LaunchError(f"{origin}: data.build must be a mapping of {', '.join(sorted(BUILD_OPTIONS))}")
    sizes = _int_list(raw.get("sizes"), f"{origin}: data.sizes", 1)
    seeds = _int_list(raw.get("seeds", [0]), f"{origin}: data.seeds", 0)
    subsets = [Subset(n, s) for n in sizes for s in seeds]
    pairs = raw.get("pairs") or []
    if isinstance(pairs, dict):
        extra = set(pairs) - {"sizes", "seeds"}
        if extra:
            raise LaunchError(f"{origin}: data.pairs: unknown key(s) {sorted(extra)} (expected sizes, seeds)")
        p_sizes = _int_list(pairs.get("sizes"), f"{origin}: data.pairs.sizes", 1)
        p_seeds = _int_list(pairs.get("seeds", [0]), f"{origin}: data.pairs.seeds", 0)
    else:
        p_sizes, p_seeds = (_int_list(pairs, f"{origin}: data.pairs", 1) if pairs else []), [0]
    subsets += [Subset(n, s, True) for n in p_sizes for s in p_seeds]
    test_size = raw.get("test_size", 10_000)
    if not isinstance(test_size, int) or isinstance(test_size, bool) or test_size < 1:
        raise LaunchError(f"{origin}: data.test_size must be a positive integer (got {test_size!r})")
    select = raw.get("runs")
    if select is None:
        if len(subsets) != 1:
            raise LaunchError(
                f"{origin}: data.runs is missing: which subset each run trains on, e.g. "
                '{size: "{n}", seed: "{shuffle}"} (the recipe makes several)'
            )
        select = {"size": subsets[0].size, "seed": subsets[0].seed}
    if not isinstance(select, dict) or "size" not in select or set(select) - {"size", "seed", "pair"}:
        raise LaunchError(
            f"{origin}: data.runs must be a mapping with size (and seed, pair), "
            'e.g. {size: "{n}", seed: "{shuffle}"}'
        )
    resources = dict(PREP_RESOURCES)
    res = raw.get("resources") or {}
    if not isinstance(res, dict) or set(res) - set(PREP_RESOURCES):
        raise LaunchError(f"{origin}: data.resources must be a mapping of {', '.join(PREP_RESOURCES)}")
    resources.update(res)
    for key in ("cpus", "timeout_min"):
        if not isinstance(resources[key], int) or resources[key] < 1:
            raise LaunchError(f"{origin}: data.resources.{key} must be a positive integer (got {resources[key]!r})")
    return DataRecipe(
        grid_file,
        root,
        source,
        src,
        src_vars,
        manifest,
        resolution,
        channels,
        dict(build),
        subsets,
        test_size,
        dict(select),
        resources,
    )
