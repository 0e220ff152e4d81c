"""One writer per run, whichever launcher or log dir started it.

Before a launcher submits a run it asks the run dir itself, not only its own bookkeeping:
- a live trainer holds the run dir's lock (`lock.json`, ditscale.io.lock): the run is training now;
- `launch.json` in the run dir names the Slurm job that was submitted for it (written by every Slurm submission,
  whatever its `--log-dir`): while squeue still lists that job (pending, running, requeued), the run is taken.

`busy()` returns run id -> the reason a run must not be submitted again; launchers skip those runs and say why.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from ditscale.errors import DitscaleError
from ditscale.io.rundir import RunDir

LAUNCH = "launch.json"  # the scheduler job last submitted for this run (launchers only; the trainer ignores it)


def record(run_dir: str, **fields: Any) -> None:
    """Write the run's launch record: {"launcher": "slurm", "job_id": "123_4", "log_dir": ..., "time", "host"}."""
    RunDir(run_dir).write_json(LAUNCH, {**fields, "time": time.time(), "host": socket.gethostname()})


def read(run_dir: str) -> dict | None:
    rec = RunDir(run_dir).read_json(LAUNCH)
    return rec if isinstance(rec, dict) else None


def busy(runs: list, live_jobs: dict[str, str] | None = None) -> dict[str, str]:
    """Runs that already have a writer: run id -> why ("held by a live trainer: ...", "RUNNING as Slurm job ...").

    live_jobs maps Slurm job ids to their squeue state (None: Slurm is not consulted)."""
    out: dict[str, str] = {}
    for r in runs:
        rd = RunDir(r.run_dir)
        try:
            holder = rd.holder()
            rec = read(r.run_dir) if live_jobs else None
        except DitscaleError as e:  # an unreachable run dir: the trainer would fail the same way; say so
            out[r.id] = f"run dir {r.run_dir} cannot be read: {e}"
            continue
        if holder is not None:
            out[r.id] = f"held by a live trainer ({holder.describe()})"
        elif rec and rec.get("launcher") == "slurm" and (live_jobs or {}).get(str(rec.get("job_id"))):
            job = rec["job_id"]
            out[r.id] = f"{live_jobs[str(job)]} as Slurm job {job} (log dir {rec.get('log_dir', '?')})"
    return out
