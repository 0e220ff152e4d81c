"""What a launcher leaves in its log dir, written once for every backend and never overwritten by another launcher.

    <log dir>/launches/<time>-<host>-<pid>.json   one file per launch: backend, grid, --var, overrides, run root,
                                                 resources, and run id -> job id (data steps: folder -> job id)
    <log dir>/failures/<job>-<restart>.json       one decision per failure of a job life (ditscale.launch.task
                                                 writes Slurm's; the other backends the same fields)

Any number of launchers that share a log dir each write their own file; readers merge them (the newest record of a
run wins), so no record is lost. The grid remembers how it was launched: `--status`, `--collect` and `report`
given no overrides or vars use those of the newest launch of the grid (`remembered`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from ditscale.io import storage

LAUNCHES, FAILURES = "launches", "failures"


def _read_json_files(folder: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return sorted(out, key=lambda r: r.get("time", 0))


def write_launch(log_dir: Path | str, record: dict[str, Any]) -> Path:
    """Record one launch (a file of its own: concurrent launchers never overwrite each other)."""
    now = time.time()
    name = f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-{socket.gethostname()}-{os.getpid()}.json"
    path = Path(log_dir) / LAUNCHES / name
    storage.write_text(str(path), json.dumps({**record, "time": now}, indent=1, default=str))
    return path


def launches(log_dir: Path | str | None) -> list[dict[str, Any]]:
    """Every launch recorded in the log dir, oldest first."""
    return _read_json_files(Path(log_dir) / LAUNCHES) if log_dir else []


def jobs(log_dir: Path | str | None) -> dict[str, dict[str, Any]]:
    """run id -> {"job_id", "time", "log_dir"} of the newest launch that submitted it (all launches merged)."""
    out: dict[str, dict[str, Any]] = {}
    for rec in launches(log_dir):
        steps = rec.get("steps") or {}
        for rid, job in (rec.get("runs") or {}).items():
            out[rid] = {"job_id": job, "time": rec.get("time"), "log_dir": str(log_dir), "steps": steps.get(rid)}
    return out


def data_jobs(log_dir: Path | str | None) -> dict[str, dict[str, Any]]:
    """data folder -> {"job_id", "step"} of the newest launch that submitted a step for it."""
    out: dict[str, dict[str, Any]] = {}
    for rec in launches(log_dir):
        out.update(rec.get("data") or {})
    return out


def remembered(log_dir: Path | str | None, grid_file: str) -> dict[str, Any] | None:
    """The newest launch of this grid in the log dir: its vars, overrides, run root and resources."""
    grid = str(Path(grid_file).resolve())
    for rec in reversed(launches(log_dir)):
        if rec.get("grid") == grid:
            return rec
    return None


# --- failures -----------------------------------------------------------------------------------------------
def failures(log_dir: Path | str | None, job_id: str | None = None) -> list[dict[str, Any]]:
    """The failure decisions recorded in the log dir (of one job, or all), oldest first."""
    recs = _read_json_files(Path(log_dir) / FAILURES) if log_dir else []
    return [r for r in recs if job_id is None or r.get("job") == job_id]


def write_failure(log_dir: Path | str, job: str, run: str, reason: str, action: str, **extra: Any) -> None:
    """One failure record (a launcher's own process, a Ray run, a data step): the same fields as Slurm's."""
    rec = {"job": job, "run": run, "action": action, "reason": reason[:2000], "host": socket.gethostname()}
    path = Path(log_dir) / FAILURES / f"{job}-{int(time.time() * 1000)}.json"
    storage.write_text(str(path), json.dumps({**rec, **extra, "time": time.time()}, indent=1))


def last_error_line(text: str | None) -> str | None:
    """The line of a log that says why a process failed: ditscale's own `error: ...` line (a user error), else the
    last exception line with a message ('ConfigError: ...'; torchrun's ChildFailedError only wraps one), else the
    last line that says error, else None."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error: "):
            return ln[:300]
    for ln in reversed(lines):
        head, _, msg = ln.partition(": ")
        name = head.rsplit(".", 1)[-1]
        if msg and " " not in head and name.endswith(("Error", "Exception")) and name != "ChildFailedError":
            return f"{name}: {msg}"[:300]
    for ln in reversed(lines):
        if "error" in ln.lower():
            return ln[:300]
    return None


def exit_text(rc: int | None) -> str:
    """'exit code 1', 'killed by SIGKILL' (a negative returncode), 'exit code 137 (SIGKILL)'."""
    import signal

    if rc is None:
        return "no exit code"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    if rc > 128:
        try:
            return f"exit code {rc} ({signal.Signals(rc - 128).name})"
        except ValueError:
            pass
    return f"exit code {rc}"
