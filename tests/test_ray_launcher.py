"""launchers/ray_grid.py against a REAL local Ray cluster (`ray start --head`, tests/plugins/ray.py).

The two-run digits grid: one run with 1 Ray Train worker, one with 2 workers (gloo process group set up by
TorchTrainer, ZeRO-2 across the two workers); then skip-on-rerun, --status and --collect.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "configs" / "grids" / "digits-test.yaml"
LAUNCHER = ROOT / "launchers" / "ray_grid.py"
pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def digits_data(digits8_dir):
    return digits8_dir


def launcher(*args, timeout=420):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout,
        cwd=ROOT,
    )  # fmt: skip


def test_ray_bad_input_and_dry_run(digits_data, tmp_path):
    r = launcher("--grid", GRID, "--var", "data_root=/nonexistent/digits", "--run-root", tmp_path, "--dry-run")
    assert r.returncode == 2
    assert "run 'digits-t2-3x2@head-nodes1': data.train '/nonexistent/digits/manifest.json'" in r.stderr
    r = launcher("--grid", GRID, "--var", f"data_root={digits_data}", "--run-root", tmp_path, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "digits-t2-3x2@head-nodes2" in r.stdout and "workers=2" in r.stdout
    assert "dry run: nothing started" in r.stdout


def test_ray_grid_end_to_end(ray_cluster, digits_data, tmp_path):
    runs_root = tmp_path / "runs"
    common = ["--grid", GRID, "--var", f"data_root={digits_data}", "--run-root", runs_root]
    overrides = ["train.steps=8", "checkpoint.every=4", "log.every=4"]
    r = launcher("--address", ray_cluster.address, *common, "--max-failures", "1", *overrides)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    for name, world in (("digits-t2-3x2@head-nodes1", 1), ("digits-t2-3x2@head-nodes2", 2)):
        final = json.loads((runs_root / name / "final.json").read_text())
        assert final["step"] == 8 and final["world_size"] == world and final["finished"] is True
    assert "2 runs: 2 done" in r.stdout

    r = launcher("--address", ray_cluster.address, *common, *overrides)
    assert r.returncode == 0 and "nothing to train (2 finished)" in r.stdout

    col = launcher(*common, *overrides, "--collect")
    assert col.returncode == 0, col.stderr
    table = json.loads((runs_root / "results.json").read_text())
    assert [row["state"] for row in table] == ["done", "done"] and [row["step"] for row in table] == [8, 8]
    assert "| digits-t2-3x2@head-nodes1 | done | 8 |" in col.stdout
