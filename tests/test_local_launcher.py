"""launchers/local_grid.py: a grid on this machine. Its data does not exist yet: the recipe's steps run first; then
a 1-process run and a 2-process run (torchrun) train side by side; a rerun trains nothing; --status and --collect
read the run dirs; --stop (SIGTERM to the launcher) makes a running run checkpoint and stop, and the next call
resumes it; kill -9 of the
launcher leaves no process behind (torchrun and its ranks get SIGTERM, checkpoint and exit); a run whose trainer
fails shows why in --status."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launchers" / "local_grid.py"
pytestmark = [pytest.mark.slow]

GRID = """
name: loc
config:
  model: {variant: DiT-T/2, input_size: 8, in_channels: 1, num_classes: 10, windows: "3x2@head"}
  diffusion: {sample_steps: 10}
  data: {shuffle_buffer: 50, flip: false}
  train: {steps: 6, global_batch: 8, micro_batch: 4, zero_stage: 0, precision: fp32, ema_decay: 0.99}
  checkpoint: {every: 3, keep: 2}
  log: {every: 1, sample_every: 0, metrics_port: 0, progress: false}
vars: {data_root: DATA}
resources: {nodes: 1, tasks_per_node: 1, cpus_per_task: 1, timeout_min: 20}
axes:
  procs: {key: resources.tasks_per_node, values: [1, 2], prefix: p}
data:
  source: digits
  root: "{data_root}/digits8"
  resolution: 8
  channels: 1
  sizes: [40]
  resources: {cpus: 1}
"""


def launcher(*args, env=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, str(LAUNCHER), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def _grid(tmp_path: Path, text: str = GRID) -> Path:
    p = tmp_path / "loc.yaml"
    p.write_text(text.replace("DATA", str(tmp_path / "data")))
    return p


def test_local_dry_run_and_status_before_anything(tmp_path):
    common = ["--grid", _grid(tmp_path), "--run-root", tmp_path / "runs"]
    r = launcher(*common, "--dry-run", "--parallel", "2")
    assert r.returncode == 0, r.stderr
    full = tmp_path / "data" / "digits8" / "full"
    assert f"build   {full}" in r.stdout and "missing -> prepared here first" in r.stdout
    assert f"python -m ditscale data build digits --out {full} --resolution 8 --channels 1" in r.stdout
    assert "2 to train on this machine, 2 at a time" in r.stdout and "dry run: nothing started" in r.stdout
    assert "python -m torch.distributed.run --standalone --nproc_per_node 2 -m ditscale train --config" in r.stdout
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()
    st = launcher(*common, "--status")
    assert st.returncode == 0 and "2 runs: 2 pending" in st.stdout


def test_local_grid_end_to_end(tmp_path):
    runs = tmp_path / "runs"
    common = ["--grid", _grid(tmp_path), "--run-root", runs]
    r = launcher(*common, "--parallel", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "preparing build:" in r.stdout and "preparing n40-s0:" in r.stdout
    sub = json.loads((tmp_path / "data" / "digits8" / "n40-s0" / "manifest.json").read_text())
    assert sub["num_samples"] == 40 and (tmp_path / "data" / "digits8" / "n40-s0" / "test" / "manifest.json").is_file()
    for name, world in (("loc-p1", 1), ("loc-p2", 2)):
        final = json.loads((runs / name / "final.json").read_text())
        assert final["step"] == 6 and final["world_size"] == world and final["finished"] is True
        assert f"{name}: starting" in r.stdout and f"{name}: done" in r.stdout
        assert (runs / "_local" / f"{name}.log").stat().st_size > 0
    assert "2 runs: 2 done" in r.stdout

    again = launcher(*common, "--parallel", "2")
    assert again.returncode == 0 and "nothing to train (2 finished, 0 queued or running)" in again.stdout
    assert "preparing" not in again.stdout

    col = launcher(*common, "--collect")
    assert col.returncode == 0, col.stderr
    table = json.loads((runs / "results.json").read_text())
    assert [(row["run"], row["state"], row["step"]) for row in table] == [("loc-p1", "done", 6), ("loc-p2", "done", 6)]
    assert "| loc-p2 | done | 6 |" in col.stdout


def test_local_sigterm_checkpoints_and_resumes(tmp_path):
    one = GRID.replace("values: [1, 2]", "values: [1]")
    runs = tmp_path / "runs"
    common = ["--grid", _grid(tmp_path, one), "--run-root", runs, "train.steps=60", "checkpoint.every=50"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DITSCALE_TEST_STEP_DELAY="0.3")
    p = subprocess.Popen([sys.executable, str(LAUNCHER), *map(str, common)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    metrics = runs / "loc-p1" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert p.poll() is None, p.stdout.read()
            time.sleep(0.5)
        assert metrics.exists(), "the run never logged a step"
        stop = launcher(*common, "--stop")  # SIGTERM to the launcher that holds the run's claim
        assert "asked 1 run(s) to checkpoint and stop: loc-p1" in stop.stdout, stop.stdout + stop.stderr
        out, _ = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, out[-3000:]
    assert "SIGTERM: stopping" in out and "loc-p1: stopped at step" in out
    st = launcher(*common, "--status")
    assert "loc-p1  resumable" in st.stdout and "stopped (Ctrl-C/SIGTERM)" in st.stdout
    stopped = int((runs / "loc-p1" / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 2 <= stopped < 50  # the checkpoint written on SIGTERM, not a periodic one

    r = launcher(*common, "--nproc", "2")  # the same command on 2 processes resumes and finishes the run
    assert r.returncode == 0, r.stdout[-3000:]
    assert f"loc-p1: resuming from step_{stopped:08d}" in r.stdout and "loc-p1: done" in r.stdout
    final = json.loads((runs / "loc-p1" / "final.json").read_text())
    assert final["step"] == 60 and final["world_size"] == 2
    starts = [json.loads(x) for x in (runs / "loc-p1" / "config_history.jsonl").read_text().splitlines()]
    assert [(s["step"], s["world_size"]) for s in starts] == [(0, 1), (stopped, 2)]
    # the losses of the same run undisturbed on one process, to float reduction (docs/training.md)
    ref = tmp_path / "ref"
    cfg = runs / "_local" / "loc-p1.yaml"
    cmd = [sys.executable, "-m", "ditscale", "train", "--config", str(cfg), "--run-dir", str(ref)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600, env=env)

    def loss(d):
        return [(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]

    got, want = loss(runs / "loc-p1"), loss(ref)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 61))
    assert all(abs(a - b) <= 1e-4 * abs(b) for (_, a), (_, b) in zip(got, want, strict=True))


def _processes_with(marker: str) -> list[int]:
    """PIDs whose command line contains marker (the run's config file: torchrun and its ranks)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def test_kill_9_of_the_launcher_leaves_no_orphans(tmp_path):
    from tests.waits import wait_for

    two = GRID.replace("values: [1, 2]", "values: [2]")
    runs = tmp_path / "runs"
    common = ["--grid", _grid(tmp_path, two), "--run-root", runs, "train.steps=400", "checkpoint.every=300"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DITSCALE_TEST_STEP_DELAY="0.3")
    p = subprocess.Popen([sys.executable, str(LAUNCHER), *map(str, common)], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    metrics, marker = runs / "loc-p2" / "metrics.jsonl", str(runs / "_local" / "loc-p2.yaml")
    try:
        wait_for("two logged steps", lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 900, p)
        procs = _processes_with(marker)
        assert len(procs) >= 3, procs  # torchrun and its two ranks
        p.kill()  # kill -9: no handler runs in the launcher
        p.wait(timeout=30)
        wait_for("torchrun and its ranks to exit", lambda: not _processes_with(marker), 180)
    finally:
        for pid in _processes_with(marker):  # only if the test failed: stop what it started
            os.kill(pid, signal.SIGKILL)
    # the ranks got SIGTERM through torchrun: a checkpoint at the end of the step, not a periodic one (every 300)
    tag = (runs / "loc-p2" / "checkpoints" / "latest").read_text().strip()
    assert 2 <= int(tag.split("_")[1]) < 300
    st = launcher(*common, "--status")
    assert "loc-p2  resumable" in st.stdout and "gone" in st.stdout, st.stdout


def test_a_failed_run_says_why(tmp_path):
    """A run whose trainer refuses to start on its world size (2 processes x micro_batch 8 do not divide the global
    batch of 8): the row says failed, with the exit code and the trainer's error line, not a pointer to a log."""
    two = GRID.replace("values: [1, 2]", "values: [2]")
    common = ["--grid", _grid(tmp_path, two), "--run-root", tmp_path / "runs", "train.micro_batch=8"]
    r = launcher(*common)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    st = launcher(*common, "--status")
    row = next(ln for ln in st.stdout.splitlines() if ln.startswith("loc-p2 "))
    assert " failed " in row and "exited 1" in row and "exit code 1: " in row and "batch" in row, st.stdout
    assert "see " not in row
