"""Launchers use elastic resume (issue #21 item 5), against the REAL 2-node Slurm of tests/plugins/slurm.py: a run
trains on 2 nodes and loses node n2 (its slurmd, slurmstepd and task killed, the node marked down); the job is
requeued and would wait for two nodes; cancelled and launched again with `--nodes 1-2`, the run
starts on the one node left (a range starts on what is free) and finishes with the losses of the undisturbed run
(to float reduction); the run's history records the world sizes. Slurm 22.05 gives a range the fewest nodes that
fit, so a job is not grown to two nodes by the range itself. (The local launcher's --nproc change is in
tests/test_local_launcher.py; Ray's --min-workers is described in docs/launchers.md.)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ditscale.launch import records
from tests.test_slurm_faults import RUN2, _run_procs, _two_node_grid, launcher
from tests.waits import wait_for

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def test_a_requeued_run_continues_on_the_nodes_left(slurm_cluster, digits8_dir, tmp_path):
    grid = _two_node_grid(tmp_path)
    runs, log_dir = tmp_path / "runs", tmp_path / "runs" / "_slurm"
    run_dir = runs / RUN2
    common = ["--partition", "gpu", "--grid", grid, "--var", f"data_root={digits8_dir}", "--run-root", runs]
    steps = ["train.steps=40", "checkpoint.every=4", "log.every=1"]
    r = launcher(*common, *steps, "--nodes", "2", env={"DITSCALE_TEST_STEP_DELAY": "0.5"})
    assert r.returncode == 0, r.stderr
    job = records.jobs(log_dir)[RUN2]["job_id"]
    wait_for("both ranks", lambda: _run_procs(slurm_cluster, job).keys() == {"n1", "n2"}, 300, slurm_cluster)
    wait_for("a checkpoint", lambda: (run_dir / "checkpoints" / "latest").exists(), 300, slurm_cluster)
    try:
        assert slurm_cluster.kill_node("n2"), "no process of the job ran on n2"
        # the controller learns the node is gone (as it would after SlurmdTimeout): the requeue may not wait for it
        slurm_cluster.run("scontrol", "update", "nodename=n2", "state=down", "reason=ditscale-test")
        # requeued: by the controller (the node is down) or by the surviving rank's failure record, whichever first
        wait_for("the requeued job pending", lambda: slurm_cluster.run("squeue", "-h", "-j", job, "-o", "%T")
                 .stdout.strip() == "PENDING", 300, slurm_cluster)  # fmt: skip
        slurm_cluster.run("scancel", job)  # it asks for two nodes; one is left
        wait_for("the job gone", lambda: not slurm_cluster.run("squeue", "-h", "-j", job, check=False).stdout.strip(),
                 120, slurm_cluster)  # fmt: skip
        r = launcher(*common, *steps, "--nodes", "1-2")
        assert r.returncode == 0, r.stderr
        job2 = records.jobs(log_dir)[RUN2]["job_id"]
        assert job2 != job, "the run was not submitted again"
        err_file = log_dir / job2 / f"{job2}_0_log.err"
        resumed = wait_for("the resumed trainer", lambda: re.search(r"(\d+) processes, .* resumed at step (\d+)",
                           err_file.read_text() if err_file.exists() else ""), 300, slurm_cluster)  # fmt: skip
        assert resumed.group(1) == "1"  # on the one node left
        wait_for("the run to finish", lambda: (run_dir / "final.json").exists(), 600, slurm_cluster)
    finally:
        slurm_cluster.start_node("n2")
        slurm_cluster.run("scontrol", "update", "nodename=n2", "state=resume", check=False)
    final = json.loads((run_dir / "final.json").read_text())
    assert final["step"] == 40 and final["world_size"] == 1
    starts = [json.loads(x) for x in (run_dir / "config_history.jsonl").read_text().splitlines()]
    at = int(resumed.group(2))
    assert [(s["step"], s["world_size"], s["nodes"]) for s in starts] == [(0, 2, 2), (at, 1, 1)]
    st = launcher(*common, "train.steps=40", "--status", "--all")
    assert "2x ZeRO-2 on 2 nodes from 0, 1x ZeRO-2 from" in st.stdout, st.stdout
    # the same run undisturbed, on one process: the same losses, to float reduction
    ref = tmp_path / "ref"
    cmd = [sys.executable, "-m", "ditscale", "train", "--config", str(run_dir / "config.yaml"), "--run-dir", str(ref)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    got, want = losses(run_dir), losses(ref)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 41))
    assert all(abs(a - b) <= 1e-4 * abs(b) for (_, a), (_, b) in zip(got, want, strict=True))
