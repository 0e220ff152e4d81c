"""The results table of a grid, read from the run dirs (shared by every launcher).

Per run: its state (ditscale.io.rundir.RunDir.status: done, running, resumable, started, pending), the final
metrics (final.json, else the last metrics.jsonl line), and evaluation numbers from `{run.dir}/eval/*.json` when
present (flattened as `<file stem>.<key>`). Written as CSV and JSON (every field) and markdown (the columns a
researcher compares: the axes that vary, the run's state and loss, and the study's headline metrics).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ditscale.io.rundir import EVAL, RUNNING, RunDir

_BASE_COLUMNS = ["run", "state", "step", "loss", "images_per_second"]


def run_states(
    runs: Iterable, scheduler: dict[str, str] | None = None, stall_after_s: float | None = 600.0
) -> list[dict[str, Any]]:
    """One row per run: id, state, step, total steps, checkpoint, plus the scheduler's state when known.

    The state is the run dir's own (ditscale.io.rundir.RunDir.status: done, running, resumable, started,
    pending), or 'stalled' for a running run that logged no step for `stall_after_s` (RunStatus.stall; None: not
    checked); scheduler maps run id -> a launcher's view (e.g. 'RUNNING 12_0', 'PENDING 12_1').
    """
    rows = []
    for r in runs:
        st = RunDir(r.run_dir).status(r.config.train.steps)
        state, view = st.state, (scheduler or {}).get(r.id, "")
        why = st.stall(stall_after_s, r.config.log.every) if stall_after_s is not None and state == RUNNING else None
        if why:
            state, view = "stalled", "; ".join(v for v in (view, why) if v)
        rows.append(
            {
                "run": r.id,
                "state": state,
                "step": st.step,
                "steps": r.config.train.steps,
                "checkpoint": st.checkpoint,
                "scheduler": view,
                "loss": (st.final or st.last or {}).get("loss"),
                "run_dir": r.run_dir,
                "holder": st.holder.describe() if st.holder else "",
                "last_step_age": st.last_step_age,
            }
        )
    return rows


def format_status(rows: list[dict[str, Any]]) -> str:
    header = ("RUN", "STATE", "STEP", "SCHEDULER", "LOSS", "CHECKPOINT")
    lines = [header]
    for row in rows:
        step = "-" if row["step"] is None else f"{row['step']}/{row['steps']}"
        loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"
        lines.append((row["run"], row["state"], step, row["scheduler"] or "-", loss, row["checkpoint"] or "-"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"{text}\n\n{len(rows)} runs: {summary}"


def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        out[prefix] = obj
    # lists (curves, per-sample values) stay in the eval files


def eval_results(run_dir: str) -> dict[str, Any]:
    """{metric: parsed JSON} of a run's eval/*.json (unreadable files are skipped)."""
    rd = RunDir(run_dir)
    out: dict[str, Any] = {}
    for name in rd.listdir(EVAL):
        if name.endswith(".json"):
            data = rd.read_json(f"{EVAL}/{name}")
            if data is not None:
                out[name[: -len(".json")]] = data
    return out


def _eval_metrics(run_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stem, data in eval_results(run_dir).items():
        _flatten(stem, data, out)
    return out


def collect(runs: Iterable) -> list[dict[str, Any]]:
    """The results table: one dict per run (axis values, state, final metrics, eval metrics)."""
    table = []
    for r in runs:
        st = RunDir(r.run_dir).status(r.config.train.steps)
        row: dict[str, Any] = {"run": r.id, "state": st.state}
        for k, v in r.values.items():
            row[f"axis.{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
        row["variant"] = r.config.model.variant
        row["windows"] = r.config.model.windows
        src = st.final or st.last or {}
        row["step"] = st.step
        for k, v in src.items():
            if k not in ("step", "finished") and isinstance(v, (int, float, str, bool)):
                row[k] = v
        row.update(_eval_metrics(r.run_dir))
        row["run_dir"] = r.run_dir
        table.append(row)
    return table


def columns(table: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in table:
        for k in row:
            if k not in cols:
                cols.append(k)
    front = [c for c in _BASE_COLUMNS if c in cols] + [c for c in cols if c.startswith("axis.")]
    tail = [c for c in cols if c not in front and c != "run_dir"] + (["run_dir"] if "run_dir" in cols else [])
    return front + tail


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def to_csv(table: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns(table), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in table:
        w.writerow({k: _cell(v) for k, v in row.items()})
    return buf.getvalue()


def to_json(table: list[dict[str, Any]]) -> str:
    return json.dumps(table, indent=2, default=str)


# The markdown table's metric columns, in order, with a header and one number format each (CSV/JSON keep all).
COMPARED: dict[str, tuple[str, str]] = {
    "loss": ("loss", "{:.4f}"),
    "psnr_gap.avg_gap": ("PSNR gap (dB)", "{:.2f}"),
    "psnr_gap.avg_train_psnr": ("train PSNR (dB)", "{:.2f}"),
    "psnr_gap.avg_test_psnr": ("test PSNR (dB)", "{:.2f}"),
    "fid.fid": ("FID", "{:.2f}"),
    "fid_classifier.fid": ("classifier FID", "{:.2f}"),
    "fid_classifier.sample_accuracy": ("samples classified as drawn", "{:.1%}"),
    "fid_pixels.fid": ("pixel FID", "{:.2f}"),
    "pair.paired_similarity.mean": ("paired cos sim", "{:.3f}"),
    "pair.nearest_train_similarity.mean": ("nearest-train cos sim", "{:.3f}"),
}


def _compared_cell(v: Any, fmt: str) -> str:
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else _cell(v)


def to_markdown(table: list[dict[str, Any]]) -> str:
    """The compared columns: run, state, step, the axes whose values differ between runs (variant and windows
    too when they do), then the COMPARED metrics present; a line below names the fields left to results.csv."""
    all_cols = columns(table)
    varies = [
        c
        for c in all_cols
        if (c.startswith("axis.") or c in ("variant", "windows")) and len({json.dumps(r.get(c)) for r in table}) > 1
    ]
    if "windows" in varies and any(r.get("axis.windows") == r.get("windows") for r in table):
        varies.remove("windows")  # the same values as an axis column
    metrics = [c for c in COMPARED if any(c in r for r in table)]
    cols = ["run", "state", "step"] + varies + metrics
    header = [COMPARED[c][0] if c in COMPARED else c.removeprefix("axis.") for c in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in table:
        cells = [_compared_cell(row.get(c), COMPARED[c][1]) if c in COMPARED else _cell(row.get(c)) for c in cols]
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    rest = [c for c in all_cols if c not in cols and c != "run_dir"]
    if rest:
        lines += ["", f"{len(rest)} more fields per run in results.csv / results.json."]
    return "\n".join(lines)


def write_table(table: list[dict[str, Any]], out_dir: str | Path, stem: str = "results") -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, fn in (("csv", to_csv), ("json", to_json), ("md", to_markdown)):
        p = out / f"{stem}.{ext}"
        p.write_text(fn(table) + ("" if ext == "csv" else "\n"))
        paths.append(p)
    return paths
