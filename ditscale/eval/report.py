"""`python -m ditscale report --grid DIR|GRID.yaml`: the study's tables and plots from the run dirs.

- training: one row per run (state, step, final loss), the loss against step of every run from its
  metrics.jsonl (one PNG per variant, a panel per N, a colour per window configuration, a line style per seed),
  and each run's newest sample grid (samples/step_*.png), side by side per window configuration;
- PSNR gap against N per window configuration (mean +- std over seeds/shuffles),
- the FID tables (Inception, classifier and pixel features, whichever were measured) with the relative change
  against global attention (same variant and N),
- the placement comparison (head / mix / tail for each local preset),
- attention locality per block (mean attention distance in tokens),
- the two-model test when pair.json files are present.
Writes `report.md` and PNGs into --out (default: DIR/report, or reports/<grid name> for a grid file).

A configuration is the window spec plus every other grid axis that varies (e.g. `global nodes=2`): tables and
plots keep configurations apart (colour per configuration, line style per seed or N, markers on every line so a
one-point series shows), and each metric has one number format (FORMATS) wherever it appears.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ditscale.errors import ConfigError, WindowSpecError
from ditscale.eval import common
from ditscale.io import storage
from ditscale.io.rundir import SAMPLES, RunDir, format_starts
from ditscale.launch.common import expand_as_launched
from ditscale.model.windows import PLACEMENTS, placement_of
from ditscale.results import eval_results

log = logging.getLogger("ditscale.report")
DIGITS = 2  # decimals of every PSNR, PSNR gap and FID value in the tables (cosine similarities: 3)
FID_METRICS = {  # eval file stem -> what its FID is called in the report
    "fid": "FID (Inception)",
    "fid_classifier": "classifier FID (features of a classifier trained on the dataset)",
    "fid_pixels": "pixel FID (pixels as features)",
}
MARKERS = "osD^v<>ph*"


@dataclass
class RunInfo:
    id: str
    run_dir: str
    variant: str
    windows: str
    seed: int
    n: int | None
    evals: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, Any] = field(default_factory=dict)  # the grid's axis values of this run (grid files only)

    @property
    def config(self) -> str:
        """The window spec plus the other axes that set this run apart (`global nodes=2`)."""
        extra = _extra_axes(self)
        return f"{self.windows} {extra}" if extra else self.windows


# ---------------------------------------------------------------------------------------------- discovery
def _read_evals(run_dir: str) -> dict[str, Any]:
    return eval_results(run_dir)


def _n_of(evals: dict, values: dict, train_url: str) -> int | None:
    for key in ("n", "N", "data_size", "size"):
        if isinstance(values.get(key), (int, float)):
            return int(values[key])
    for ev in evals.values():
        n = ev.get("n_train") if isinstance(ev, dict) else None
        if isinstance(n, int):
            return n
    if train_url:
        try:
            return int(common.manifest_of(train_url).get("num_samples"))
        except Exception:
            return None
    return None


def discover(grid: str) -> tuple[list[RunInfo], str]:
    """The runs of a grid file or of a directory of run dirs (any folder holding config.yaml), and a name."""
    p = Path(grid)
    runs: list[RunInfo] = []
    if p.is_file():
        for r in expand_as_launched(str(p)):  # as launched: the --var, overrides and run root of its newest launch
            evals = _read_evals(r.run_dir)
            c = r.config
            runs.append(
                RunInfo(
                    r.id,
                    r.run_dir,
                    c.model.variant,
                    c.model.windows,
                    c.run.seed,
                    _n_of(evals, r.values, c.data.train),
                    evals,
                    dict(r.values),
                )
            )
        return runs, p.stem
    for run_dir, text in _run_dirs_below(grid):
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError:
            continue
        model, run, data = tree.get("model", {}), tree.get("run", {}), tree.get("data", {})
        evals = _read_evals(run_dir)
        runs.append(
            RunInfo(
                run.get("name") or storage.basename(run_dir),
                run_dir,
                model.get("variant", "?"),
                str(model.get("windows", "global")),
                int(run.get("seed", 0)),
                _n_of(evals, {}, data.get("train", "")),
                evals,
            )
        )
    return runs, storage.basename(grid)


def _run_dirs_below(root: str) -> list[tuple[str, str]]:
    """(run dir, its config.yaml) of every run dir at most 4 levels below a folder: a local path or any URL the
    launchers write to (s3://bucket/runs: one listing, then the configs read in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    if storage.is_local(root) and not Path(storage.local_path(root)).is_dir():
        raise ConfigError(f"--grid {root!r}: expected a directory of run dirs (local or a URL) or a grid file")
    rels = [f for f in storage.find(root) if f.endswith("config.yaml") and f.split("/")[-1] == "config.yaml"]
    rels = sorted(f for f in rels if len(f.split("/")) <= 4 and "/checkpoints/" not in f"/{f}")
    if not rels and storage.is_url(root) and not storage.listdir(root):
        raise ConfigError(f"--grid {root!r}: nothing there (expected a folder of run dirs or a grid file)")
    dirs = [storage.dirname(storage.join(root, f)) if storage.is_url(root) else str(Path(root) / f).rsplit("/", 1)[0]
            for f in rels]  # fmt: skip
    with ThreadPoolExecutor(max_workers=16) as pool:
        texts = list(pool.map(lambda f: storage.read_text(storage.join(root, f)) or "", rels))
    return list(zip(dirs, texts, strict=True))


# ---------------------------------------------------------------------------------------------- training
def read_loss_curve(run_dir: str) -> list[tuple[int, float]]:
    """(step, loss) of every logged step in {run_dir}/metrics.jsonl (local or s3://), in step order.

    A torn last line (the run is writing) and non-finite losses are skipped; a step logged twice keeps its last
    value."""
    by_step: dict[int, float] = {}
    for rec in RunDir(run_dir).records():
        step, loss = rec.get("step"), rec.get("loss")
        if isinstance(step, int) and isinstance(loss, (int, float)) and math.isfinite(loss):
            by_step[step] = float(loss)
    return sorted(by_step.items())


def read_final(run_dir: str) -> dict | None:
    """final.json of a finished run, or of one that stopped on a non-finite loss (its record says diverged)."""
    return RunDir(run_dir).ended()


def newest_sample_grid(run_dir: str) -> str | None:
    """The URL of the run's newest samples/step_XXXXXXXX.png, or None."""
    rd = RunDir(run_dir)
    names = [n for n in rd.listdir(SAMPLES) if n.endswith(".png")]
    return rd.path(f"{SAMPLES}/{max(names)}") if names else None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_") or "run"


def _extra_axes(r: RunInfo) -> str:
    """Axis values that are not the variant, windows, N or seed (e.g. nodes=2), for labels."""
    known = {str(r.variant), str(r.windows), str(r.n), str(r.seed)}
    return " ".join(f"{k}={v}" for k, v in r.axes.items() if str(v) not in known)


def runs_table(runs: list[RunInfo], curves: dict[str, list], finals: dict[str, dict | None]) -> str:
    rows = []
    for r in sorted(runs, key=lambda r: (r.variant, r.n or 0, r.windows != "global", r.windows, r.seed, r.id)):
        curve, final = curves.get(r.id) or [], finals.get(r.id)
        step = final.get("step") if final else (curve[-1][0] if curve else None)
        loss = final.get("loss") if final else (curve[-1][1] if curve else None)
        if final:  # a diverged run's final.json records its last finite step, not a finished run
            state = "diverged" if final.get("diverged") else ("done" if final.get("finished", True) else "stopped")
        else:
            state = "started" if curve else "pending"
        rows.append(
            [
                r.id,
                r.variant,
                r.windows,
                _n_label(r.n),
                str(r.seed),
                _extra_axes(r),
                state,
                "" if step is None else str(step),
                f"{loss:.4f}" if isinstance(loss, (int, float)) and math.isfinite(loss) else "",
                format_starts(RunDir(r.run_dir).starts()),
            ]
        )
    header = ["run", "variant", "windows", "N", "seed", "other axes", "state", "step", "loss", "trained on"]
    return _md_table(header, rows)


def plot_loss_curves(runs: list[RunInfo], curves: dict[str, list], path: str, variant: str) -> str | None:
    """Loss against step of every run of one variant: a panel per N, a colour per windows, a style per seed."""
    mine = [r for r in runs if r.variant == variant and curves.get(r.id)]
    if not mine:
        return None
    plt = _plt()
    ns = sorted({r.n for r in mine}, key=lambda n: -1 if n is None else n)
    cs = _windows_order(r.config for r in runs)
    seeds = sorted({r.seed for r in runs})
    fig, axes = plt.subplots(1, len(ns), figsize=(5.2 * len(ns), 3.8), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], ns, strict=True):
        for r in sorted((r for r in mine if r.n == n), key=lambda r: (cs.index(r.config), r.seed, r.id)):
            steps, losses = zip(*curves[r.id], strict=True)
            label = " ".join(x for x in (r.config, f"s{r.seed}" if len(seeds) > 1 else "") if x)
            ax.plot(
                steps,
                losses,
                lw=0.9,
                label=label,
                markevery=max(1, len(steps) // 8),
                markersize=3,
                **_style(cs.index(r.config), seeds.index(r.seed)),
            )
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{variant}, {_n_label(n)}")
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
        ax.legend(fontsize=6, ncol=2 if len(ax.get_lines()) > 8 else 1)
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    return common.save_figure(fig, path)


def copy_sample_grids(runs: list[RunInfo], out: str) -> dict[str, str]:
    """Copy each run's newest sample grid to {out}/samples/<run>.png; returns run id -> path relative to out."""
    copied = {}
    for r in runs:
        src = newest_sample_grid(r.run_dir)
        if src is None:
            continue
        rel = f"samples/{_slug(r.id)}.png"
        storage.write_bytes(common.join(out, rel), storage.read_bytes(src))
        copied[r.id] = rel
    return copied


def samples_table(runs: list[RunInfo], grids: dict[str, str]) -> str:
    """Newest sample grids: a row per (variant, N, seed, other axes), a column per window configuration."""
    if not grids:
        return ""
    shown = [r for r in runs if r.id in grids]
    ws = _windows_order(r.windows for r in shown)
    rows_by: dict[tuple, dict[str, str]] = {}
    for r in shown:
        key = (r.variant, -1 if r.n is None else r.n, r.seed, _extra_axes(r))
        rows_by.setdefault(key, {})[r.windows] = f"![{r.id}]({grids[r.id]})"
    rows = []
    for (v, n, seed, extra), cells in sorted(rows_by.items()):
        head = f"{v} {_n_label(None if n == -1 else n)} s{seed}" + (f" {extra}" if extra else "")
        rows.append([head] + [cells.get(w, "") for w in ws])
    return _md_table(["run"] + ws, rows)


# ---------------------------------------------------------------------------------------------- aggregation
def _mean_std(vals: list[float]) -> tuple[float, float, int]:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan"), 0
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd, len(vals)


def _style(colour: int, style: int) -> dict:
    """Matplotlib keywords: a colour and marker per configuration, a line style per seed (or N)."""
    return {
        "color": f"C{colour % 10}",
        "marker": MARKERS[colour % len(MARKERS)],
        "ls": ["-", "--", ":", "-."][style % 4],
    }


def _fmt(ms: tuple[float, float, int], digits: int = DIGITS) -> str:
    m, sd, k = ms
    if k == 0:
        return ""
    return f"{m:.{digits}f}" if k == 1 else f"{m:.{digits}f} ± {sd:.{digits}f} ({k})"


def _windows_order(ws) -> list[str]:
    """Configurations with global attention first (one per setting of the other axes), then the rest, sorted."""
    ws = sorted(set(ws))
    return [w for w in ws if _is_global(w)] + [w for w in ws if not _is_global(w)]


def _is_global(config: str) -> bool:
    return config.split(" ", 1)[0] == "global"


def _baseline(config: str) -> str:
    """The global-attention configuration a configuration is compared with: same other axes."""
    rest = config.split(" ", 1)[1:]
    return " ".join(["global", *rest])


def _n_label(n) -> str:
    if n is None:
        return "N=?"
    e = math.log10(n) if n > 0 else 0
    return f"N=1e{int(e)}" if n >= 1000 and float(e).is_integer() else f"N={n}"


def gather(runs: list[RunInfo], metric: str, key: str) -> dict[tuple, list[float]]:
    """{(variant, configuration, n): [value per run]} of evals[metric][key]."""
    out: dict[tuple, list[float]] = {}
    for r in runs:
        ev = r.evals.get(metric)
        if isinstance(ev, dict) and isinstance(ev.get(key), (int, float)):
            out.setdefault((r.variant, r.config, r.n), []).append(float(ev[key]))
    return out


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def psnr_table(runs: list[RunInfo]) -> tuple[str, dict]:
    gap, tr, te = (
        gather(runs, "psnr_gap", "avg_gap"),
        gather(runs, "psnr_gap", "avg_train_psnr"),
        gather(runs, "psnr_gap", "avg_test_psnr"),
    )
    if not gap:
        return "", {}
    variants = sorted({k[0] for k in gap})
    ns = sorted({k[2] for k in gap}, key=lambda n: -1 if n is None else n)
    parts = []
    for v in variants:
        ws = _windows_order(k[1] for k in gap if k[0] == v)
        rows = [[w] + [_fmt(_mean_std(gap.get((v, w, n), []))) for n in ns] for w in ws]
        parts.append(
            f"**{v}**: average PSNR gap (dB, train − test; lower = better generalisation)\n\n"
            + _md_table(["windows"] + [_n_label(n) for n in ns], rows)
        )
        rows = [
            [w]
            + [
                f"{_fmt(_mean_std(tr.get((v, w, n), [])))} / {_fmt(_mean_std(te.get((v, w, n), [])))}"
                if (v, w, n) in tr
                else ""
                for n in ns
            ]
            for w in ws
        ]
        parts.append(
            f"**{v}**: average train / test PSNR (dB)\n\n" + _md_table(["windows"] + [_n_label(n) for n in ns], rows)
        )
    return "\n\n".join(parts), gap


def fid_table(runs: list[RunInfo], metric: str = "fid") -> tuple[str, dict, str]:
    """The FID of one feature network (FID_METRICS) per configuration, with the change against global."""
    label = FID_METRICS[metric]
    fid = gather(runs, metric, "fid")
    if not fid:
        return "", {}, label
    ws = _windows_order(k[1] for k in fid)
    keys = sorted({(k[0], k[2]) for k in fid}, key=lambda x: (x[0], -1 if x[1] is None else x[1]))
    rows = []
    for v, n in keys:
        row = [v, _n_label(n)]
        for w in ws:
            base = _mean_std(fid.get((v, _baseline(w), n), []))[0]
            m = _mean_std(fid.get((v, w, n), []))
            cell = _fmt(m)
            if cell and not _is_global(w) and math.isfinite(base) and base > 0:
                cell += f" ({(m[0] - base) / base * 100:+.1f}%)"
            row.append(cell)
        rows.append(row)
    return (
        f"{label}; relative change against global attention in brackets\n\n" + _md_table(["variant", "N"] + ws, rows),
        fid,
        label,
    )


def _placed(windows: str) -> tuple[str, str] | None:
    """(preset, placement) of a window spec written with a placement; None for one without (or one the parser
    refuses: a run dir written by another version has no place in the comparison)."""
    try:
        return placement_of(windows)
    except WindowSpecError:
        return None


def placement_table(gap: dict, fid: dict) -> str:
    placed: dict[tuple[str, str], list[str]] = {}  # (preset, placement) -> the window specs written that way
    for w in sorted({k[1] for k in list(gap) + list(fid)}):
        if (p := _placed(w)) is not None:
            placed.setdefault(p, []).append(w)
    presets = sorted({pre for pre, _ in placed})
    if not presets:
        return ""

    def cell(table: dict, v: str, pre: str, pl: str, n) -> str:
        return _fmt(_mean_std([x for w in placed.get((pre, pl), []) for x in table.get((v, w, n), [])]))

    keys = sorted({(k[0], k[2]) for k in list(gap) + list(fid)}, key=lambda x: (x[0], -1 if x[1] is None else x[1]))
    rows = []
    for v, n in keys:
        for name, table in (("PSNR gap", gap), ("FID", fid)):
            if not any(k[0] == v and k[2] == n for k in table):
                continue
            row = [v, _n_label(n), name, _fmt(_mean_std(table.get((v, "global", n), [])))]
            for pre in presets:
                row += [cell(table, v, pre, pl, n) for pl in PLACEMENTS]
            rows.append(row)
    header = ["variant", "N", "metric", "global"] + [f"{pre}@{pl}" for pre in presets for pl in PLACEMENTS]
    return _md_table(header, rows)


def _by_seed(runs: list[RunInfo], metric: str, key: str) -> dict[tuple, dict[int, float]]:
    """{(variant, configuration, n): {seed: value}} of evals[metric][key]."""
    out: dict[tuple, dict[int, float]] = {}
    for r in runs:
        ev = r.evals.get(metric)
        if isinstance(ev, dict) and isinstance(ev.get(key), (int, float)) and math.isfinite(ev[key]):
            out.setdefault((r.variant, r.config, r.n), {})[r.seed] = float(ev[key])
    return out


def _spread(vals: list[float], digits: int = DIGITS) -> str:
    """'mean ± std [min..max]' (sample std); one value alone as it is."""
    m, sd, k = _mean_std(vals)
    if k == 0:
        return ""
    if k == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {sd:.{digits}f} [{min(vals):.{digits}f}..{max(vals):.{digits}f}]"


def spread_table(runs: list[RunInfo]) -> str:
    """Per configuration (variant, configuration, N) over its seeds/shuffles: mean ± std [min..max] of the PSNR
    gap, the test PSNR and each FID measured, each with its difference to global attention paired by seed (the
    same data shuffle), and the share of class-conditional samples the classifier assigns to their class."""
    gap = _by_seed(runs, "psnr_gap", "avg_gap")
    if not gap:
        return ""
    test = _by_seed(runs, "psnr_gap", "avg_test_psnr")
    fids = [(m, _by_seed(runs, m, "fid")) for m in FID_METRICS]
    fids = [(m, t) for m, t in fids if t]
    acc = _by_seed(runs, "fid_classifier", "sample_accuracy")
    keys = sorted(
        gap, key=lambda k: (k[0], -1 if k[2] is None else k[2], _windows_order(k[1] for k in gap).index(k[1]), k[1])
    )

    def paired(table: dict, v: str, w: str, n, better: str) -> str:
        """This configuration minus global, per seed (same data shuffle), and how often it is lower/higher."""
        mine, base = table.get((v, w, n), {}), table.get((v, _baseline(w), n), {})
        d = [mine[s] - base[s] for s in sorted(mine) if s in base] if not _is_global(w) else []
        if not d:
            return ""
        count = sum(x < 0 for x in d) if better == "lower" else sum(x > 0 for x in d)
        return f"{_spread(d)} ({count}/{len(d)} {better})"

    rows = []
    for v, w, n in keys:
        row = [
            v,
            _n_label(n),
            w,
            str(len(gap[(v, w, n)])),
            _spread(list(gap[(v, w, n)].values())),
            paired(gap, v, w, n, "lower"),
            _spread(list(test.get((v, w, n), {}).values())),
            paired(test, v, w, n, "higher"),
        ]
        for _m, table in fids:
            row += [_spread(list(table.get((v, w, n), {}).values())), paired(table, v, w, n, "lower")]
        if acc:
            vals = list(acc.get((v, w, n), {}).values())
            row.append(f"{100 * sum(vals) / len(vals):.1f}%" if vals else "")
        rows.append(row)
    names = {"fid": "FID", "fid_classifier": "classifier FID", "fid_pixels": "pixel FID"}
    header = [
        "variant",
        "N",
        "windows",
        "runs",
        "PSNR gap (dB)",
        "gap − global (dB)",
        "test PSNR (dB)",
        "test PSNR − global (dB)",
    ]
    for m, _t in fids:
        header += [names[m], f"{names[m]} − global"]
    if acc:
        header.append("samples classified as drawn")
    return (
        "mean ± sample std [min..max] over the runs of each configuration (seeds / data shuffles); the "
        '"− global" columns subtract the global run trained on the same shuffle\n\n' + _md_table(header, rows)
    )


def locality_table(runs: list[RunInfo]) -> tuple[str, dict]:
    groups: dict[tuple, list[list[float]]] = {}
    uniform = None
    for r in runs:
        ev = r.evals.get("locality")
        if not isinstance(ev, dict) or not ev.get("blocks"):
            continue
        groups.setdefault((r.variant, r.config, r.n), []).append([b["mean_distance"] for b in ev["blocks"]])
        uniform = ev.get("uniform", {}).get("mean_distance", uniform)
    if not groups:
        return "", {}
    depth = max(len(v[0]) for v in groups.values())
    rows = []
    means = {}
    order = _windows_order(k[1] for k in groups)
    for key in sorted(groups, key=lambda k: (k[0], -1 if k[2] is None else k[2], order.index(k[1]))):
        per_block = [_mean_std([d[b] for d in groups[key] if b < len(d)])[0] for b in range(depth)]
        means[key] = per_block
        rows.append([key[0], key[1], _n_label(key[2])] + [f"{x:.2f}" if math.isfinite(x) else "" for x in per_block])
    note = f" (uniform attention: {uniform:.2f})" if uniform is not None else ""
    return (
        "Mean attention distance per block, in tokens"
        + note
        + "\n\n"
        + _md_table(["variant", "windows", "N"] + [f"b{b}" for b in range(depth)], rows)
    ), means


def pair_table(runs: list[RunInfo]) -> str:
    seen, rows = set(), []
    for r in runs:
        ev = r.evals.get("pair")
        if not isinstance(ev, dict) or tuple(ev.get("runs", [])) in seen:
            continue
        seen.add(tuple(ev["runs"]))
        rows.append(
            [
                r.variant,
                r.windows,
                str(ev.get("n_train")),
                f"{ev['paired_similarity']['mean']:.3f}",
                f"{ev['nearest_train_similarity']['mean']:.3f}",
                str(ev.get("samples")),
            ]
        )
    if not rows:
        return ""
    return _md_table(["variant", "windows", "N (A, B)", "paired cos sim", "nearest-train cos sim", "samples"], rows)


# ---------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_gap_vs_n(gap: dict, path: str) -> str | None:
    """Average PSNR gap against N: mean ± std per configuration (colour, marker), line style per variant."""
    keys = [k for k in gap if k[2]]
    if not keys:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    cs = _windows_order(k[1] for k in keys)
    variants = sorted({k[0] for k in keys})
    for v in variants:
        for w in _windows_order(k[1] for k in keys if k[0] == v):
            ns = sorted(k[2] for k in keys if k[0] == v and k[1] == w)
            ms = [_mean_std(gap[(v, w, n)]) for n in ns]
            label = f"{v} {w}" if len(variants) > 1 else w
            ax.errorbar(
                ns,
                [m[0] for m in ms],
                yerr=[m[1] for m in ms],
                capsize=3,
                label=label,
                **_style(cs.index(w), variants.index(v)),
            )
    ax.set_xscale("log")
    ax.set_xlabel("training-set size N")
    ax.set_ylabel("average PSNR gap (dB)")
    ax.axhline(0, color="gray", lw=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return common.save_figure(fig, path)


def plot_curves(runs: list[RunInfo], path: str) -> str | None:
    """Against the input timestep t, per (configuration, N), mean over its seeds: train (solid) and held-out
    (dashed) PSNR; the held-out PSNR minus that of global attention on the same shuffle (mean ± std of the paired
    differences; the raw held-out PSNR when no configuration has a global baseline); and the PSNR gap (mean ± std).
    A colour and marker per configuration, a line style per N."""
    groups: dict[tuple, dict[int, dict]] = {}
    for r in runs:
        ev = r.evals.get("psnr_gap")
        if isinstance(ev, dict) and ev.get("timesteps"):
            groups.setdefault((r.variant, r.config, r.n), {})[r.seed] = ev
    if not groups:
        return None
    import numpy as np

    plt = _plt()
    cs = _windows_order(k[1] for k in groups)
    ns = sorted({k[2] for k in groups}, key=lambda n: -1 if n is None else n)
    paired = any(not _is_global(k[1]) and (k[0], _baseline(k[1]), k[2]) in groups for k in groups)
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 3.8))

    def draw(ax, ts, vals, st, ls, label, band=True):
        mean = vals.mean(0)
        every = max(1, len(ts) // 8)
        ax.plot(ts, mean, color=st["color"], marker=st["marker"], ls=ls, markevery=every, ms=3, lw=1, label=label)
        if band and len(vals) > 1:
            sd = vals.std(0, ddof=1)
            ax.fill_between(ts, mean - sd, mean + sd, color=st["color"], alpha=0.15, lw=0)

    for (v, w, n), by_seed in sorted(groups.items(), key=lambda kv: (cs.index(kv[0][1]), ns.index(kv[0][2]))):
        ts = next(iter(by_seed.values()))["timesteps"]
        evs = {s: e for s, e in by_seed.items() if e["timesteps"] == ts}
        label = f"{w} {_n_label(n)}" if len(ns) > 1 else w
        st = _style(cs.index(w), ns.index(n))
        draw(a, ts, np.array([e["train_psnr"] for e in evs.values()]), st, st["ls"], f"{label} train", band=False)
        draw(a, ts, np.array([e["test_psnr"] for e in evs.values()]), st, "--", f"{label} test", band=False)
        draw(c, ts, np.array([e["gap"] for e in evs.values()]), st, st["ls"], label)
        if not paired:
            draw(b, ts, np.array([e["test_psnr"] for e in evs.values()]), st, st["ls"], label)
            continue
        base = groups.get((v, _baseline(w), n), {})
        diffs = [
            np.array(e["test_psnr"]) - np.array(base[s]["test_psnr"])
            for s, e in evs.items()
            if s in base and base[s]["timesteps"] == ts
        ]
        if diffs:
            draw(b, ts, np.array(diffs), st, st["ls"], label)
    a.set_title("train (solid) and held-out (dashed) PSNR")
    a.set_ylabel("PSNR of one-step x0 estimate (dB)")
    if paired:
        b.set_title("held-out PSNR − global's, paired by shuffle")
        b.set_ylabel("test PSNR − global (dB)")
        b.axhline(0, color="gray", lw=0.5)
    else:
        b.set_title("held-out PSNR, mean ± std over shuffles")
        b.set_ylabel("test PSNR (dB)")
    c.set_title("PSNR gap, mean ± std over shuffles")
    c.set_ylabel("PSNR gap, train − test (dB)")
    c.axhline(0, color="gray", lw=0.5)
    for ax in (a, b, c):
        ax.set_xlabel("input diffusion step t")
    a.legend(fontsize=6, ncol=2)
    b.legend(fontsize=7)
    c.legend(fontsize=7)
    fig.tight_layout()
    return common.save_figure(fig, path)


def plot_bars(table: dict, ylabel: str, path: str) -> str | None:
    if not table:
        return None
    plt = _plt()
    ns = sorted({k[2] for k in table}, key=lambda n: -1 if n is None else n)
    ws = _windows_order(k[1] for k in table)
    cs = _windows_order(k[1] for k in table)
    fig, axes = plt.subplots(1, len(ns), figsize=(max(4, 1 + 0.6 * len(ws)) * len(ns), 3.4), squeeze=False)
    for ax, n in zip(axes[0], ns, strict=True):
        ms = [_mean_std([x for k, v in table.items() if k[1] == w and k[2] == n for x in v]) for w in ws]
        ax.bar(
            range(len(ws)),
            [m[0] for m in ms],
            yerr=[m[1] for m in ms],
            capsize=3,
            color=[f"C{cs.index(w) % 10}" for w in ws],
        )
        ax.set_xticks(range(len(ws)), ws, rotation=45, ha="right", fontsize=8)
        ax.set_title(_n_label(n))
        ax.set_ylabel(ylabel)
    fig.tight_layout()
    return common.save_figure(fig, path)


def plot_paired(runs: list[RunInfo], path: str) -> str | None:
    """The PSNR gap of every run, per N: windows on the x axis, one line per seed (data shuffle), so that the
    paired structure (which configuration is lower on the same shuffle) is visible next to the spread."""
    by = _by_seed(runs, "psnr_gap", "avg_gap")
    groups = sorted({(k[0], k[2]) for k in by}, key=lambda x: (x[0], -1 if x[1] is None else x[1]))
    groups = [g for g in groups if any(len(v) > 1 for k, v in by.items() if (k[0], k[2]) == g)]  # several seeds
    if not groups:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    for ax, (v, n) in zip(axes[0], groups, strict=True):
        ws = _windows_order(k[1] for k in by if (k[0], k[2]) == (v, n))
        seeds = sorted({s for w in ws for s in by.get((v, w, n), {})})
        for i, seed in enumerate(seeds):
            pts = [(j, by[(v, w, n)][seed]) for j, w in enumerate(ws) if seed in by.get((v, w, n), {})]
            ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", alpha=0.7, label=f"seed {seed}"
            )
        means = [_mean_std(list(by.get((v, w, n), {}).values()))[0] for w in ws]
        ax.plot(range(len(ws)), means, marker="_", markersize=24, ls="none", color="black", label="mean")
        ax.set_xticks(range(len(ws)), ws, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{v} {_n_label(n)}")
        ax.set_ylabel("average PSNR gap (dB)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return common.save_figure(fig, path)


def plot_locality(means: dict, uniform_note: bool, path: str) -> str | None:
    """Mean attention distance per block: a colour and marker per configuration, a line style per N."""
    if not means:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    cs = _windows_order(k[1] for k in means)
    ns = sorted({k[2] for k in means}, key=lambda n: -1 if n is None else n)
    for (v, w, n), per in means.items():
        ax.plot(range(len(per)), per, label=f"{v} {w} {_n_label(n)}", **_style(cs.index(w), ns.index(n)))
    ax.set_xlabel("block")
    ax.set_ylabel("mean attention distance (tokens)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return common.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- report
def build_report(runs: list[RunInfo], out: str, title: str) -> str:
    md = [
        f"# {title}",
        "",
        f"{len(runs)} runs; numbers are means over runs with the same variant, windows and N "
        "(± sample std and the run count when there are several).",
        "",
    ]
    curves = {r.id: read_loss_curve(r.run_dir) for r in runs}
    finals = {r.id: read_final(r.run_dir) for r in runs}
    md += ["## Training", "", runs_table(runs, curves, finals), ""]
    for v in sorted({r.variant for r in runs}):
        name = f"loss_{_slug(v)}.png"
        if plot_loss_curves(runs, curves, common.join(out, name), v):
            md += [f"![training loss against step, {v}]({name})", ""]
    grids = copy_sample_grids(runs, out)
    if grids:
        md += ["Newest sample grid of each run (EMA weights):", "", samples_table(runs, grids), ""]
    psnr_md, gap = psnr_table(runs)
    fid_tables = [(m, *fid_table(runs, m)) for m in FID_METRICS]
    fid_tables = [t for t in fid_tables if t[1]]
    fid = fid_tables[0][2] if fid_tables else {}
    loc_md, loc_means = locality_table(runs)
    figs = []
    if psnr_md:
        md += ["## PSNR gap against N", "", psnr_md, ""]
        if plot_gap_vs_n(gap, common.join(out, "psnr_gap_vs_n.png")):
            md += ["![PSNR gap against N](psnr_gap_vs_n.png)", ""]
            figs.append("psnr_gap_vs_n.png")
        if plot_curves(runs, common.join(out, "psnr_curves.png")):
            md += ["![train and test PSNR against t](psnr_curves.png)", ""]
        if plot_bars(gap, "average PSNR gap (dB)", common.join(out, "psnr_gap_bars.png")):
            md += ["![PSNR gap per window configuration](psnr_gap_bars.png)", ""]
    for metric, fid_md, table, label in fid_tables:
        md += [f"## {label[0].upper() + label[1:]}", "", fid_md, ""]
        png = f"{metric}.png"
        if plot_bars(table, label.split(" (")[0], common.join(out, png)):
            md += [f"![{label.split(' (')[0]} per window configuration]({png})", ""]
    pl = placement_table(gap, fid)
    if pl:
        md += ["## Placement (head / mix / tail)", "", pl, ""]
    sp = spread_table(runs)
    if sp:
        md += ["## Per configuration: mean, spread, paired difference to global", "", sp, ""]
        if plot_paired(runs, common.join(out, "psnr_gap_paired.png")):
            md += ["![PSNR gap of every run, one line per data shuffle](psnr_gap_paired.png)", ""]
    if loc_md:
        md += ["## Attention locality per block", "", loc_md, ""]
        if plot_locality(loc_means, True, common.join(out, "locality.png")):
            md += ["![mean attention distance per block](locality.png)", ""]
    pr = pair_table(runs)
    if pr:
        md += ["## Two-model test", "", pr, ""]
    missing = [r.id for r in runs if not r.evals]
    if missing:
        md += ["## Runs without evaluation results", "", ", ".join(missing), ""]
    text = "\n".join(md)
    storage.write_text(common.join(out, "report.md"), text)
    return text


def report(grids: list[str] | str, out: str | None = None, title: str | None = None) -> str:
    """Discover the runs of one or more grid files / folders of run dirs, build the report; the report.md URL."""
    grids = [grids] if isinstance(grids, str) else list(grids)
    runs, names = [], []
    for g in grids:
        found, name = discover(g)
        runs += found
        names.append(name)
    name = "+".join(names)
    if not runs:
        raise ConfigError(f"--grid {' '.join(grids)}: no runs found (no config.yaml below it)")
    first = grids[0]
    is_folder = storage.is_url(first) or Path(first).is_dir()
    out = out or (storage.join(first, "report") if is_folder else str(Path("reports") / name))
    build_report(runs, out, title or f"Study report: {name}")
    log.info("wrote %s (%d runs)", common.join(out, "report.md"), len(runs))
    return common.join(out, "report.md")
