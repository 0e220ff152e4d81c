"""--status tells a hung run from a slow one, the same way under every launcher: a run whose trainer still holds
the lock (its heartbeat thread keeps beating through a hung collective or data read) but logged no step for
--stall-after seconds (or 5 logging intervals, if longer) is "stalled", with the age of its last step.

The hung trainer here is a real lease held by this process (heartbeat thread running) over a run dir whose last
metrics line is old; the launchers' --status run as the user runs them."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ditscale.io.lock import Holder
from ditscale.io.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]

GRID = """
name: hang
config:
  model: {variant: DiT-T/2, input_size: 8, in_channels: 1, num_classes: 10, windows: global}
  data: {train: DATA/none/manifest.json}
  train: {steps: 100, global_batch: 8, micro_batch: 8, zero_stage: 0, precision: fp32}
  log: {every: 2, sample_every: 0, metrics_port: 0, progress: false}
resources: {nodes: 1, tasks_per_node: 1, cpus_per_task: 1, timeout_min: 20}
axes:
  seed: {key: run.seed, values: [0, 1], prefix: s}
"""


def _status(launcher: str, grid: Path, runs: Path, *extra) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "launchers" / launcher), "--grid", str(grid), "--run-root",
                        str(runs), "--status", *extra], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _write_steps(run: RunDir, steps: list[int], when: float, step_time: float = 0.5) -> None:
    lines = [json.dumps({"step": s, "time": when, "step_time": step_time, "loss": 0.5}) for s in steps]
    run.write_text("metrics.jsonl", "\n".join(lines) + "\n")


def _started(run: RunDir, seconds_ago: float):
    """The run's lease, as a trainer that took it `seconds_ago` holds it (its heartbeat thread beats now)."""
    lease = run.lease(120)
    lease.me = Holder(**{**lease.me.__dict__, "since": time.time() - seconds_ago})
    return lease


def _row(out: str, run_id: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(run_id + " "))


def test_stall_rules():
    """RunStatus.stall on its own: which marks count, and how long is too long."""
    from ditscale.io.rundir import DONE, RUNNING, RunStatus

    now = 10_000.0
    holder = Holder("x", "node1", 1, now - 3000, now, 120.0, "")
    st = RunStatus(RUNNING, last={"step": 86, "time": now - 700, "step_time": 1.0}, holder=holder)
    assert st.stall(600, 10, now=now) == "last step 86 11m ago"
    assert st.stall(800, 10, now=now) is None  # not yet too long
    assert st.stall(60, 200, now=now) is None  # 5 logging intervals (1000 s) are longer than 700 s
    started = RunStatus(RUNNING, holder=Holder("x", "node1", 1, now - 900, now, 120.0, ""))
    assert started.stall(600, 10, now=now) == "no step since it started 15m ago"
    # a job restarted after its last step counts from its own start; without a live trainer it says so
    requeued = RunStatus(RUNNING, last={"step": 40, "time": now - 5000, "step_time": 1.0})
    assert requeued.stall(600, 10, started=now - 100, now=now) is None
    assert requeued.stall(600, 10, started=now - 700, now=now) == "no step since it started 11m ago, no live trainer"
    assert RunStatus(DONE, last={"step": 100, "time": 0.0}).stall(1, 1, now=now) is None
    assert RunStatus(RUNNING).stall(1, 1, now=now) is None  # nothing to count from


def test_stall_judged_from_the_steady_step_time():
    """The first logged interval (compilation, warm-up) is slow: it never stretches the threshold (issue #22 item 9).
    A run killed after its first logged step is stalled after --stall-after, not after 5 first-step intervals."""
    from ditscale.io.rundir import RUNNING, STARTED, RunStatus

    now = 10_000.0
    first = {"step": 5, "time": now - 30, "step_time": 26.0}  # the first interval: 26 s per step
    killed = RunStatus(STARTED, last=first, extra={"recent": [first]})
    assert killed.stall(20, 5, started=now - 60, now=now) == "last step 5 30s ago, no live trainer"
    recent = [first] + [{"step": 5 * i, "time": now - 30 + i, "step_time": 0.2} for i in (2, 3, 4)]
    steady = RunStatus(RUNNING, last=recent[-1], extra={"recent": recent})
    assert steady.steady_step_time() == 0.2
    assert steady.stall(20, 5, started=now - 60, now=now + 30) == "last step 20 56s ago, no live trainer"
    slow = [{"step": 5 * i, "time": now, "step_time": 30.0} for i in (1, 2, 3)]  # really slow steps: 5 x 150 s
    assert (
        RunStatus(RUNNING, last=slow[-1], extra={"recent": slow}).stall(20, 5, started=now - 60, now=now + 600) is None
    )
    # nothing logged since this start (a requeued job): counted from the start with --stall-after alone
    old = RunStatus(RUNNING, last=slow[-1], extra={"recent": slow})
    assert old.stall(20, 5, started=now + 100, now=now + 130) == "no step since it started 30s ago, no live trainer"


@pytest.mark.parametrize("launcher", ["local_grid.py", "ray_grid.py"])
def test_status_shows_a_hung_trainer_as_stalled(tmp_path, launcher):
    grid = tmp_path / "hang.yaml"
    grid.write_text(GRID.replace("DATA", str(tmp_path / "data")))
    runs = tmp_path / "runs"
    hung, slow = RunDir(str(runs / "hang-s0")), RunDir(str(runs / "hang-s1"))
    with _started(hung, 1000) as lease_a, _started(slow, 1000) as lease_b:
        assert lease_a.held and lease_b.held
        _write_steps(hung, [2, 4, 6], when=time.time() - 900)  # hung 15 min ago, mid-run
        _write_steps(slow, [2, 4], when=time.time())  # logging as it should
        out = _status(launcher, grid, runs)
        row = _row(out, "hang-s0")
        assert " stalled " in row and "last step 6 15m ago" in row, out
        assert " running " in _row(out, "hang-s1"), out
        assert "1 running, 1 stalled" in out
        # a longer --stall-after: the same hang is not (yet) a stall
        out = _status(launcher, grid, runs, "--stall-after", "1200")
        assert " running " in _row(out, "hang-s0") and "2 running" in out, out
    # the trainers are gone (locks released): resumable or started, never stalled
    out = _status(launcher, grid, runs)
    assert "stalled" not in out and "2 started" in out, out
