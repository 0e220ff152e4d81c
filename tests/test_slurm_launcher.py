"""launchers/slurm_grid.py against a REAL Slurm cluster (slurmctld + two slurmd nodes, tests/plugins/slurm.py).

The end-to-end test trains the two-run digits grid (DiT-T/2, CPU, gloo, ZeRO-2): one single-node run and one
2-node run (one task per fake node), requeues the 2-node run with `scontrol requeue` once it has a checkpoint,
sends the single-node run a preemption notice (USR2: checkpoint, submitit requeues), checks that both resumed
from their checkpoints, then runs --status and --collect.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ditscale.launch import records
from tests.waits import wait_for

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "configs" / "grids" / "digits-test.yaml"
LAUNCHER = ROOT / "launchers" / "slurm_grid.py"
pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def digits_data(digits8_dir):
    return digits8_dir


def launcher(*args, env=None, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout,
        cwd=ROOT,
    )  # fmt: skip


def _probe_dist():
    """Runs inside a 2-node job: the exported env must give a working gloo process group across the nodes."""
    import torch
    import torch.distributed as dist

    from ditscale.launch.task import export_dist_env

    env = export_dist_env(use_gpus=False)
    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    dist.destroy_process_group()
    return env, os.environ["SLURMD_NODENAME"], t.item()


def test_submitit_two_node_torch_env(slurm_cluster, tmp_path):
    import submitit

    ex = submitit.SlurmExecutor(folder=str(tmp_path / "%j"))
    ex.update_parameters(partition="gpu", nodes=2, ntasks_per_node=1, cpus_per_task=1, time=5)
    job = ex.submit(_probe_dist)
    out = job.results()
    assert len(out) == 2
    assert sorted(node for _, node, _ in out) == ["n1", "n2"]
    assert [env["RANK"] for env, _, _ in out] == ["0", "1"] and {env["WORLD_SIZE"] for env, _, _ in out} == {"2"}
    # n1/n2 do not resolve: the master address comes from the node's Slurm NodeAddr
    assert {env["MASTER_ADDR"] for env, _, _ in out} == {"127.0.0.1"}
    assert [s for _, _, s in out] == [3.0, 3.0]


def _job_state(slurm_cluster, job: str) -> str:
    return slurm_cluster.run("squeue", "-h", "-j", job, "-o", "%T", check=False).stdout.strip()


def _queue(slurm_cluster) -> str:
    return slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.strip()


def test_unknown_partition(slurm_cluster, digits_data, tmp_path):
    r = launcher("--partition", "nope", "--grid", GRID, "--var", f"data_root={digits_data}", "--run-root", tmp_path)
    assert r.returncode == 2
    assert "--partition 'nope': unknown Slurm partition (known: debug, gpu)" in r.stderr
    assert _queue(slurm_cluster) == ""


def test_bad_input_errors_before_submission(slurm_cluster, digits_data, tmp_path):
    common = ["--partition", "gpu", "--grid", GRID, "--run-root", tmp_path]
    r = launcher(*common, "--var", "data_root=/nonexistent/digits")
    assert r.returncode == 2
    assert "run 'digits-t2-3x2@head-nodes1': data.train '/nonexistent/digits/manifest.json'" in r.stderr
    r = launcher(*common, "--var", f"data_root={digits_data}", "model.windows=local*@mix")
    assert r.returncode == 2 and "digits-t2-3x2@head-nodes1" in r.stderr and "model.windows" in r.stderr
    assert _queue(slurm_cluster) == ""
    assert not records.jobs(tmp_path / "_slurm")


def test_dry_run(slurm_cluster, digits_data, tmp_path):
    r = launcher("--partition", "gpu", "--grid", GRID, "--var", f"data_root={digits_data}", "--run-root", tmp_path,
                 "--dry-run", "--time", "0:30:00", "--qos", "normal")  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "2 runs, 0 finished, 0 queued or running elsewhere, 2 to submit" in out
    assert "#SBATCH --nodes=2" in out and "#SBATCH --nodes=1" in out and "#SBATCH --ntasks-per-node=1" in out
    assert "#SBATCH --partition=gpu" in out and "#SBATCH --requeue" in out and "#SBATCH --time=30" in out
    assert "#SBATCH --qos=normal" in out and "dry run: nothing submitted" in out
    assert _queue(slurm_cluster) == ""


def test_grid_end_to_end_with_requeue(slurm_cluster, digits_data, tmp_path):
    runs_root = tmp_path / "runs"
    common = ["--partition", "gpu", "--grid", GRID, "--var", f"data_root={digits_data}", "--run-root", runs_root]
    overrides = ["train.steps=24", "checkpoint.every=4", "log.every=4"]
    # slow the steps down a little so that the requeue lands mid-run (tests only)
    r = launcher(*common, *overrides, env={"DITSCALE_TEST_STEP_DELAY": "0.5"})
    assert r.returncode == 0, r.stderr
    assert "submitted job array" in r.stdout
    jobs = records.jobs(runs_root / "_slurm")
    one, two = runs_root / "digits-t2-3x2@head-nodes1", runs_root / "digits-t2-3x2@head-nodes2"
    job1, job2 = jobs["digits-t2-3x2@head-nodes1"]["job_id"], jobs["digits-t2-3x2@head-nodes2"]["job_id"]

    # preemption notice (USR2, what submitit also gets before the time limit) to the 1-node run, and
    # `scontrol requeue` to the 2-node run, each once it has a checkpoint
    wait_for("a checkpoint of the 1-node run", lambda: (one / "checkpoints" / "latest").exists(), 300, slurm_cluster)
    slurm_cluster.run("scancel", "--signal=USR2", job1)
    wait_for("a checkpoint of the 2-node run", lambda: (two / "checkpoints" / "latest").exists(), 300, slurm_cluster)
    slurm_cluster.run("scontrol", "requeue", job2)
    assert not (one / "final.json").exists() and not (two / "final.json").exists(), "finished before the requeue"
    st = launcher(*common, *overrides, "--status")
    assert st.returncode == 0 and f"job {job2}" in st.stdout and "digits-t2-3x2@head-nodes1" in st.stdout
    for job in (job1, job2):  # Slurm holds a requeued job ~2 minutes (BeginTime); let it start now
        wait_for(f"job {job} requeued", lambda j=job: _job_state(slurm_cluster, j) == "PENDING", 120, slurm_cluster)
        slurm_cluster.start_now(job)

    wait_for("both runs to finish", lambda: (one / "final.json").exists() and (two / "final.json").exists(), 420,
              slurm_cluster)  # fmt: skip
    for run_dir, job, world in ((one, job1, 1), (two, job2, 2)):
        final = json.loads((run_dir / "final.json").read_text())
        assert final["step"] == 24 and final["world_size"] == world and final["finished"] is True
        assert "Restarts=1" in slurm_cluster.run("scontrol", "show", "job", job).stdout
        log = (runs_root / "_slurm" / job / f"{job}_0_log.err").read_text()
        assert f"{run_dir.name}: starting" in log
        assert f"{run_dir.name}: resuming from checkpoint step_" in log
        steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        assert steps[-1] == 24
    log1 = (runs_root / "_slurm" / job1 / f"{job1}_0_log.err").read_text()
    assert "after the time-limit signal" in log1 and "Requeued job" in log1

    # re-running the command submits nothing: both runs are finished
    wait_for("the queue to drain", lambda: _queue(slurm_cluster) == "", 60, slurm_cluster)
    r = launcher(*common, *overrides)
    assert r.returncode == 0 and "nothing to submit (2 finished, 0 queued or running)" in r.stdout

    st = launcher(*common, *overrides, "--status")
    assert st.returncode == 0
    assert "digits-t2-3x2@head-nodes2  done" in st.stdout and "24/24" in st.stdout
    assert "2 runs: 2 done" in st.stdout

    col = launcher(*common, *overrides, "--collect")
    assert col.returncode == 0, col.stderr
    table = json.loads((runs_root / "results.json").read_text())
    assert [row["run"] for row in table] == ["digits-t2-3x2@head-nodes1", "digits-t2-3x2@head-nodes2"]
    assert all(row["state"] == "done" and row["step"] == 24 for row in table)
    assert (runs_root / "results.csv").read_text().startswith("run,state,step,loss")
    assert "| digits-t2-3x2@head-nodes2 | done | 24 |" in col.stdout


def test_dry_run_node_range(slurm_cluster, digits_data, tmp_path):
    """--nodes MIN-MAX: a run may start on fewer nodes than asked (sbatch --nodes=MIN-MAX)."""
    r = launcher("--partition", "gpu", "--grid", GRID, "--var", f"data_root={digits_data}", "--run-root", tmp_path,
                 "--dry-run", "--nodes", "1-2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=1-2" in r.stdout and "nodes=1-2 tasks/node=1" in r.stdout
    r = launcher("--partition", "gpu", "--grid", GRID, "--var", f"data_root={digits_data}", "--run-root", tmp_path,
                 "--dry-run", "--nodes", "3-1")  # fmt: skip
    assert r.returncode == 2 and "--nodes '3-1': expected 1 <= MIN <= MAX" in r.stderr
