"""One claim per run (issue #22 item 1): any number of launchers, of any backends and log dirs, started at the same
moment on the same grid, submit each run once.

- the claim itself: threads racing for one run on disk and on the S3 server (moto honours If-None-Match: *): one
  winner; a dead claim is taken over by exactly one of the racers; the claim is the run's launch record;
- 4 slurm_grid.py launchers with 4 log dirs started at once on the REAL Slurm cluster: each run is one array task,
  every claim names its job, and each launch record keeps its own runs (merged, never overwritten);
- Slurm and the local launcher together: the runs are split between them, never doubled; the local launcher
  skips runs with a queued Slurm job.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ditscale.launch import claim as C
from ditscale.launch import records
from tests.waits import wait_for

ROOT = Path(__file__).resolve().parents[1]
IDLE = ["--setup", "sleep 600"]  # the array tasks hold their place without training (claims are what is tested)

GRID = """
name: race
config:
  model: {variant: DiT-T/2, input_size: 8, in_channels: 1, num_classes: 10, windows: "3x2@head"}
  data: {train: "DATA/manifest.json", shuffle_buffer: 50, flip: false}
  train: {steps: 2000, global_batch: 8, micro_batch: 8, zero_stage: 0, precision: fp32}
  checkpoint: {every: 1000, keep: 1}
  log: {every: 10, sample_every: 0, metrics_port: 0, progress: false}
resources: {nodes: 1, gpus_per_node: 0, tasks_per_node: 1, cpus_per_task: 1, timeout_min: 20}
axes:
  seed: {key: run.seed, values: [0, 1, 2, 3], prefix: s}
"""


def _race(run_dir: str, n: int = 8, alive=lambda c: True) -> list[tuple[bool, C.Claim | None]]:
    out: list = []
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait()
        out.append(C.try_claim(run_dir, {"backend": "local", "who": i}, alive))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("where", ["disk", "s3"])
def test_one_winner_and_one_take_over(where, tmp_path, request):
    root = str(tmp_path) if where == "disk" else request.getfixturevalue("s3_server").bucket() + "/runs"
    run_dir = f"{root}/r0"
    got = _race(run_dir)
    winners = [c for ok, c in got if ok]
    assert len(winners) == 1 and winners[0].gen == 1
    assert {c.gen for ok, c in got if not ok} == {1}  # the losers were told who holds it
    cur = C.current([run_dir])[run_dir]
    assert cur.data["who"] == winners[0].data["who"] and cur.data["host"] and cur.data["pid"] == os.getpid()
    C.end(cur, rc=0)  # its job ended: the next launchers race for generation 2, and again one wins
    got = _race(run_dir)
    assert [c.gen for ok, c in got if ok] == [2]
    names = os.listdir(root) if where == "disk" else [p.rsplit("/", 1)[-1] for p in _ls(root)]
    assert [n for n in names if ".claim-" in n] == ["r0.claim-000002.json"]  # older generations removed
    # a live claim is never taken over; one whose job cannot be checked from here counts as live
    assert _race(run_dir, 2, alive=lambda c: None) and C.current([run_dir])[run_dir].gen == 2


def _ls(url: str) -> list[str]:
    from ditscale.io import storage

    return storage.listdir(url)


def launcher(name: str, *args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "launchers" / f"{name}_grid.py"), *map(str, args)], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _grid(tmp_path: Path, digits: Path) -> Path:
    p = tmp_path / "race.yaml"
    p.write_text(GRID.replace("DATA", str(digits)))
    return p


def _array_tasks(cluster) -> list[str]:
    return cluster.run("squeue", "-h", "-r", "-o", "%i").stdout.split()


@pytest.mark.slow
@pytest.mark.slurm
def test_four_slurm_launchers_at_once_submit_each_run_once(slurm_cluster, digits8_dir, tmp_path):
    grid, runs = _grid(tmp_path, digits8_dir), tmp_path / "runs"
    procs = [launcher("slurm", "--partition", "gpu", "--grid", grid, "--run-root", runs, "--log-dir",
                      tmp_path / f"log{i}", *IDLE) for i in range(4)]  # fmt: skip
    outs = [p.communicate(timeout=300)[0] for p in procs]
    try:
        assert all(p.returncode == 0 for p in procs), "\n".join(outs)
        tasks = _array_tasks(slurm_cluster)
        claims = C.current([str(runs / f"race-s{i}") for i in range(4)])
        jobs = {d: c.data["job"] for d, c in claims.items()}
        assert len(tasks) == 4 and sorted(jobs.values()) == sorted(tasks), (tasks, jobs, outs)
        # each launcher's record holds the runs it submitted; merged they are the grid, each once
        merged = [rid for i in range(4) for rid in records.jobs(tmp_path / f"log{i}")]
        assert sorted(merged) == [f"race-s{i}" for i in range(4)], merged
        for i in range(4):
            for rid, rec in records.jobs(tmp_path / f"log{i}").items():
                assert jobs[str(runs / rid)] == rec["job_id"]
        assert sum(o.count("skip race-s") for o in outs) == 12, outs  # each run skipped by the 3 that lost it
        # a fifth launcher, later: nothing to submit, every run claimed by a queued or running job
        again = launcher("slurm", "--partition", "gpu", "--grid", grid, "--run-root", runs)
        out = again.communicate(timeout=300)[0]
        assert "nothing to submit (0 finished, 4 queued or running)" in out, out
        st = subprocess.run([sys.executable, str(ROOT / "launchers" / "slurm_grid.py"), "--grid", grid, "--run-root",
                             runs, "--status"], capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
        assert all(f"job {t}" in st.stdout for t in tasks), st.stdout
    finally:
        slurm_cluster.run("scancel", "--user", os.environ.get("USER") or "root", check=False)
        wait_for("the queue to drain", lambda: not _array_tasks(slurm_cluster), 120, slurm_cluster)


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_and_local_launchers_at_once(slurm_cluster, digits8_dir, tmp_path):
    """Two Slurm launchers and two local ones on one grid at the same moment: every run is claimed once, by one of
    them; the local launchers skip the runs whose Slurm job is queued."""
    grid, runs = _grid(tmp_path, digits8_dir), tmp_path / "runs"
    common = ["--grid", grid, "--run-root", runs]
    procs = [launcher("slurm", "--partition", "gpu", *common, "--log-dir", tmp_path / f"s{i}", *IDLE) for i in range(2)]
    procs += [launcher("local", *common, "--log-dir", tmp_path / f"l{i}", "--parallel", "4") for i in range(2)]
    try:
        for p in procs[:2]:
            p.communicate(timeout=300)
        dirs = [str(runs / f"race-s{i}") for i in range(4)]
        claims = wait_for("every run claimed", lambda: (c := C.current(dirs)) and all(c.values()) and c, 300)
        by = {d: c.data["backend"] for d, c in claims.items()}
        slurm_runs = [d for d, b in by.items() if b == "slurm"]
        assert set(by.values()) <= {"slurm", "local"} and all(c.gen == 1 for c in claims.values()), claims
        assert len(_array_tasks(slurm_cluster)) == len(slurm_runs)
    finally:
        for p in procs[2:]:
            p.terminate()  # the local runs checkpoint and stop
        outs = [p.communicate(timeout=300)[0] for p in procs[2:]]
        slurm_cluster.run("scancel", "--user", os.environ.get("USER") or "root", check=False)
    local_started = [ln for o in outs for ln in o.splitlines() if ": starting (pid" in ln]
    assert len(local_started) == 4 - len(slurm_runs), outs
    skipped = {ln.split()[1].rstrip(":") for o in outs for ln in o.splitlines() if ln.startswith("skip race-s")}
    assert {str(runs / s) for s in skipped} | {d for d in dirs if by[d] == "local"} == set(dirs)


def test_a_diverged_run_is_shown_and_never_started_again(digits8_dir, tmp_path):
    """A run whose final.json says diverged is not started again by a launcher (its trainer would refuse the same
    settings): the dry run and the launch say why; nothing is claimed or started."""
    import json

    grid, runs = _grid(tmp_path, digits8_dir), tmp_path / "runs"
    for i in range(4):
        d = runs / f"race-s{i}"
        d.mkdir(parents=True)
        rec = {"step": 2000, "finished": True, "loss": 0.1} if i else {"step": 7, "finished": False, "diverged": True}
        (d / "final.json").write_text(json.dumps(rec))
    cmd = [sys.executable, str(ROOT / "launchers" / "local_grid.py"), "--grid", str(grid), "--run-root", str(runs)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dry = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, env=env, timeout=300)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "race-s0" in dry.stdout and "skip: diverged at step 7" in dry.stdout, dry.stdout
    assert "0 to train" in dry.stdout, dry.stdout
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "skip race-s0: diverged at step 7" in run.stdout and "nothing to train" in run.stdout, run.stdout
    assert sorted(p.name for p in (runs / "race-s0").iterdir()) == ["final.json"]  # not claimed, not touched
    assert not any(runs.glob("*.claim*")), sorted(p.name for p in runs.iterdir())
