"""launchers/slurm_grid.py on the REAL test cluster (tests/plugins/slurm.py) with a grid whose data does not exist
yet: the dry run shows the data jobs; the submission runs the preparation jobs (shard build, then the subset with
its test set) first and the training array after them (afterok); running the same command again submits nothing
new, while the jobs are queued and after the run finished."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ditscale.launch import records
from tests.waits import wait_for

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launchers" / "slurm_grid.py"
pytestmark = [pytest.mark.slow, pytest.mark.slurm]

GRID = """
name: prep
config:
  model: {variant: DiT-T/2, input_size: 8, in_channels: 1, num_classes: 10, windows: "3x2@head"}
  diffusion: {sample_steps: 10}
  data: {shuffle_buffer: 50, flip: false}
  train: {steps: 6, global_batch: 8, micro_batch: 8, zero_stage: 0, precision: fp32, ema_decay: 0.99}
  checkpoint: {every: 3, keep: 1}
  log: {every: 2, sample_every: 0, metrics_port: 0, progress: false}
vars: {data_root: DATA}
resources: {nodes: 1, gpus_per_node: 0, tasks_per_node: 1, cpus_per_task: 1, timeout_min: 20}
axes:
  windows: {key: model.windows, values: ["3x2@head"]}
data:
  source: digits
  root: "{data_root}/digits8"
  resolution: 8
  channels: 1
  sizes: [40]
  resources: {cpus: 1, timeout_min: 10}
"""


def launcher(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(LAUNCHER), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def _job_times(slurm_cluster, job: str) -> tuple[str, str, str]:
    out = slurm_cluster.run("scontrol", "show", "job", "-o", job).stdout
    get = {k: v for k, v in re.findall(r"(\w+)=(\S*)", out)}
    return get.get("JobState", ""), get.get("StartTime", ""), get.get("EndTime", "")


def test_slurm_grid_prepares_missing_data_first(slurm_cluster, tmp_path):
    grid = tmp_path / "prep.yaml"
    grid.write_text(GRID.replace("DATA", str(tmp_path / "data")))
    runs = tmp_path / "runs"
    common = ["--partition", "gpu", "--grid", grid, "--run-root", runs]
    data = tmp_path / "data" / "digits8"

    dry = launcher(*common, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"build   {data / 'full'}" in dry.stdout and "missing -> CPU job" in dry.stdout
    assert "missing -> CPU array task, after the build job" in dry.stdout
    assert "#SBATCH --dependency='afterok:<data jobs>'" in dry.stdout
    assert "#SBATCH --kill-on-invalid-dep=yes" in dry.stdout
    assert not data.exists() and slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.strip() == ""

    r = launcher(*common)
    assert r.returncode == 0, r.stderr
    build_job = re.search(r"data build\s+job (\S+): python -m ditscale data build digits", r.stdout).group(1)
    subset_job = re.search(r"data n40-s0\s+job (\S+): python -m ditscale data subset", r.stdout).group(1)
    train_job = records.jobs(runs / "_slurm")["prep-3x2@head"]["job_id"]
    recs = records.data_jobs(runs / "_slurm")
    assert {v["job_id"] for v in recs.values()} == {build_job, subset_job}

    # the same command while the jobs are queued or running: nothing new
    again = launcher(*common)
    assert again.returncode == 0 and "nothing to submit (0 finished, 1 queued or running)" in again.stdout
    assert records.data_jobs(runs / "_slurm") == recs

    final = runs / "prep-3x2@head" / "final.json"
    wait_for("the run to finish", final.exists, 420, slurm_cluster)
    assert json.loads(final.read_text())["step"] == 6
    assert json.loads((data / "n40-s0" / "manifest.json").read_text())["num_samples"] == 40
    assert (data / "n40-s0" / "test" / "manifest.json").is_file() and (data / "full" / "manifest.json").is_file()
    wait_for("the queue to drain", lambda: slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.strip() == "", 120,
              slurm_cluster)  # fmt: skip
    # order: build, then subset, then training (Slurm's own start/end times)
    states = {j: _job_times(slurm_cluster, j) for j in (build_job, subset_job, train_job)}
    assert all(s[0] == "COMPLETED" for s in states.values()), states
    assert states[build_job][2] <= states[subset_job][1] and states[subset_job][2] <= states[train_job][1], states
    last = launcher(*common)
    assert last.returncode == 0 and "nothing to submit (1 finished, 0 queued or running)" in last.stdout
    assert slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.strip() == ""
    st = launcher("--grid", grid, "--run-root", runs, "--status")  # no --partition needed
    assert st.returncode == 0 and "1 runs: 1 done" in st.stdout
