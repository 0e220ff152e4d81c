"""launchers/ray_grid.py on a REAL local Ray cluster (tests/plugins/ray.py) with a grid whose data does not exist
yet: the dry run names the data steps; the run prepares them as Ray tasks (shard build, then the subset with its
test set), then trains; the same command again prepares and trains nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launchers" / "ray_grid.py"
pytestmark = [pytest.mark.slow, pytest.mark.ray]

GRID = """
name: rprep
config:
  model: {variant: DiT-T/2, input_size: 8, in_channels: 1, num_classes: 10, windows: "3x2@head"}
  diffusion: {sample_steps: 10}
  data: {shuffle_buffer: 50, flip: false}
  train: {steps: 4, global_batch: 8, micro_batch: 8, zero_stage: 0, precision: fp32, ema_decay: 0.99}
  checkpoint: {every: 2, keep: 1}
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
  resources: {cpus: 8}   # more than the test cluster has: capped at its CPUs
"""


def launcher(*args, timeout=420):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(LAUNCHER), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def test_ray_grid_prepares_missing_data_first(ray_cluster, tmp_path):
    grid = tmp_path / "rprep.yaml"
    grid.write_text(GRID.replace("DATA", str(tmp_path / "data")))
    runs = tmp_path / "runs"
    common = ["--address", ray_cluster.address, "--grid", grid, "--run-root", runs]
    data = tmp_path / "data" / "digits8"

    dry = launcher(*common, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "missing -> Ray task before the runs\n" in dry.stdout  # the build
    assert "missing -> Ray task before the runs, after build" in dry.stdout  # the subset
    assert not data.exists()

    r = launcher(*common)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "data build: python -m ditscale data build digits" in r.stdout and "data n40-s0: python -m" in r.stdout
    assert json.loads((data / "n40-s0" / "manifest.json").read_text())["num_samples"] == 40
    assert json.loads((runs / "rprep-3x2@head" / "final.json").read_text())["step"] == 4

    again = launcher(*common)
    assert again.returncode == 0 and "nothing to train (1 finished, 0 queued or running)" in again.stdout
    assert "data build" not in again.stdout
