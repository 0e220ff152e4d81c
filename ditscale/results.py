"""The results table of a grid, read from the run dirs (shared by every launcher).

Per run: its state (from the run dir: final.json -> done; checkpoints/latest -> interrupted/resumable;
metrics.jsonl -> running or failed; nothing -> pending), the final metrics (final.json, else the last
metrics.jsonl line), and evaluation numbers from `{run.dir}/eval/*.json` when present (flattened as
`<file stem>.<key>`). Written as CSV, JSON and markdown.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# states, from least to most advanced
PENDING, STARTED, RESUMABLE, DONE = "pending", "started", "resumable", "done"
_BASE_COLUMNS = ["run", "state", "step", "loss", "images_per_second"]


def _fs(url: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/")


def _read_text(fs, path: str) -> str | None:
    try:
        with fs.open(path, "r") as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return None


def _last_json_line(fs, path: str) -> dict | None:
    text = _read_text(fs, path)
    if not text:
        return None
    for line in reversed(text.splitlines()):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line while the run writes
        if isinstance(rec, dict):
            return rec
    return None


def run_state(run_dir: str) -> dict[str, Any]:
    """{'state', 'step', 'checkpoint', 'final', 'last'} of one run dir (local path or URL)."""
    fs, root = _fs(run_dir)
    out: dict[str, Any] = {"state": PENDING, "step": None, "checkpoint": None, "final": None, "last": None}
    final_text = _read_text(fs, f"{root}/final.json")
    if final_text:
        try:
            out["final"] = json.loads(final_text)
        except json.JSONDecodeError:
            out["final"] = None
    out["last"] = _last_json_line(fs, f"{root}/metrics.jsonl")
    tag = _read_text(fs, f"{root}/checkpoints/latest")
    out["checkpoint"] = tag.strip() if tag else None
    if out["final"] is not None:
        out["state"] = DONE
        out["step"] = out["final"].get("step")
    elif out["checkpoint"]:
        out["state"] = RESUMABLE
    elif out["last"] is not None or fs.exists(f"{root}/config.yaml"):
        out["state"] = STARTED
    if out["step"] is None and out["last"]:
        out["step"] = out["last"].get("step")
    if out["step"] is None and out["checkpoint"]:
        digits = "".join(c for c in out["checkpoint"] if c.isdigit())
        out["step"] = int(digits) if digits else None
    return out


def is_done(run_dir: str) -> bool:
    fs, root = _fs(run_dir)
    return fs.exists(f"{root}/final.json")


def run_states(runs: Iterable, scheduler: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per run: id, state, step, total steps, checkpoint, plus the scheduler's state when known.

    scheduler maps run id -> a launcher's view (e.g. 'RUNNING 12_0', 'PENDING 12_1'); it wins over the run
    dir for runs not done yet.
    """
    rows = []
    for r in runs:
        st = run_state(r.run_dir)
        rows.append(
            {
                "run": r.id,
                "state": st["state"],
                "step": st["step"],
                "steps": r.config.train.steps,
                "checkpoint": st["checkpoint"],
                "scheduler": (scheduler or {}).get(r.id, ""),
                "loss": (st["final"] or st["last"] or {}).get("loss"),
                "run_dir": r.run_dir,
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


def _eval_metrics(run_dir: str) -> dict[str, Any]:
    fs, root = _fs(run_dir)
    out: dict[str, Any] = {}
    try:
        files = sorted(f for f in fs.ls(f"{root}/eval", detail=False) if str(f).endswith(".json"))
    except (FileNotFoundError, NotADirectoryError, OSError):
        return out
    for f in files:
        text = _read_text(fs, f)
        try:
            data = json.loads(text) if text else None
        except json.JSONDecodeError:
            continue
        _flatten(Path(f).stem, data, out)
    return out


def collect(runs: Iterable) -> list[dict[str, Any]]:
    """The results table: one dict per run (axis values, state, final metrics, eval metrics)."""
    table = []
    for r in runs:
        st = run_state(r.run_dir)
        row: dict[str, Any] = {"run": r.id, "state": st["state"]}
        for k, v in r.values.items():
            row[f"axis.{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
        row["variant"] = r.config.model.variant
        row["windows"] = r.config.model.windows
        src = st["final"] or st["last"] or {}
        row["step"] = st["step"]
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


def to_markdown(table: list[dict[str, Any]]) -> str:
    cols = [c for c in columns(table) if c != "run_dir"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in table:
        lines.append("| " + " | ".join(_cell(row.get(c)).replace("|", "\\|") for c in cols) + " |")
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
