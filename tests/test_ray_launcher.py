"""launchers/ray_grid.py against a REAL local Ray cluster (`ray start --head`, tests/plugins/ray.py).

The two-run digits grid: one run with 1 Ray Train worker, one with 2 workers (gloo process group set up by
TorchTrainer, ZeRO-2 across the two workers), trained at the same time (--max-concurrent 2) with metrics on:
each rank publishes its own exporter as a file_sd target (no port clash); the 2-worker run's rank 0 gets SIGTERM,
checkpoints at the end of its step and the restarted group resumes from it (each worker runs its trainer as a child
process and stops it with signals, as every launcher does). Then skip-on-rerun, raised steps,
--status and --collect.
"""

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from ditscale.io.rundir import RunDir
from tests.ports import free_port
from tests.waits import wait_for

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "configs" / "grids" / "digits-test.yaml"
LAUNCHER = ROOT / "launchers" / "ray_grid.py"
pytestmark = [pytest.mark.slow, pytest.mark.ray]
RUNS = ("digits-t2-3x2@head-nodes1", "digits-t2-3x2@head-nodes2")


@pytest.fixture(scope="module")
def digits_data(digits8_dir):
    return digits8_dir


def launcher(*args, timeout=420, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout,
        cwd=ROOT,
    )  # fmt: skip


def test_ray_bad_input_and_dry_run(digits_data, tmp_path):
    r = launcher("--grid", GRID, "--var", "data_root=/nonexistent/digits", "--run-root", tmp_path, "--dry-run")
    assert r.returncode == 2
    assert "run 'digits-t2-3x2@head-nodes1': data.train '/nonexistent/digits/manifest.json'" in r.stderr
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there: the plan is printed, capacity not checked
    r = launcher("--grid", GRID, "--var", f"data_root={digits_data}", "--run-root", tmp_path, "--dry-run",
                 "--address", closed)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "digits-t2-3x2@head-nodes2" in r.stdout and "workers=2" in r.stdout
    assert f"(capacity not checked: --address {closed}: cannot reach a Ray cluster there" in r.stdout
    assert "dry run: nothing started" in r.stdout


def _targets(d: Path) -> dict[str, str]:
    """file_sd files (<run>-rank<r>-<run_id>.json) -> "host:port" of the exporter each names, keyed <run>-rank<r>."""
    out = {}
    for f in d.glob("*.json") if d.is_dir() else ():
        try:
            out[f.stem.rsplit("-", 1)[0]] = json.loads(f.read_text())[0]["targets"][0]
        except (OSError, ValueError, LookupError):
            continue
    return out


def test_ray_grid_end_to_end(ray_cluster, digits_data, tmp_path):
    runs_root = tmp_path / "runs"
    common = ["--grid", GRID, "--var", f"data_root={digits_data}", "--run-root", runs_root]
    overrides = ["train.steps=60", "checkpoint.every=4", "log.every=2", f"log.metrics_port={free_port()}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DITSCALE_TEST_STEP_DELAY="0.3")
    cmd = [sys.executable, str(LAUNCHER), "--address", ray_cluster.address, *map(str, common), "--max-failures",
           "1", "--max-concurrent", "2", *overrides]  # fmt: skip
    out = tmp_path / "launcher.out"
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        # both runs at once on one node: every rank has its own exporter, published as a file_sd target
        targets_dir = runs_root / "_ray" / "targets"
        want = {f"{RUNS[0]}-rank0", f"{RUNS[1]}-rank0", f"{RUNS[1]}-rank1"}
        # (each rank's trainer is a process of its own: a second interpreter start per rank on a loaded machine)
        targets = wait_for("3 file_sd targets", lambda: (t := _targets(targets_dir)).keys() == want and t, 600, proc)
        assert len(set(targets.values())) == 3, targets
        for name, hostport in targets.items():
            run = name.rsplit("-rank", 1)[0]
            body = urllib.request.urlopen(f"http://{hostport}/metrics", timeout=10).read().decode()
            assert f'run="{run}"' in body and "ditscale_train_step" in body, (name, body[:300])

        # SIGTERM to rank 0 of the 2-worker run (the lock's holder): checkpoint at the end of its step, resume
        two = runs_root / RUNS[1]
        wait_for("a logged step", lambda: (two / "metrics.jsonl").exists(), 120, proc)
        holder = RunDir(str(two)).holder()
        os.kill(holder.pid, signal.SIGTERM)
        proc.wait(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.read_text(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    assert "SIGTERM: will checkpoint at the end of this step and exit" in text
    assert f"{RUNS[1]}: rank 0 stopped by " in text and " at step " in text  # its trainer got SIGTERM
    assert f"run {RUNS[1]}: resuming from checkpoint step_" in text
    for name, world in ((RUNS[0], 1), (RUNS[1], 2)):
        final = json.loads((runs_root / name / "final.json").read_text())
        assert final["step"] == 60 and final["world_size"] == world and final["finished"] is True
    assert "2 runs: 2 done" in text
    wait_for("finished ranks to remove their targets", lambda: not _targets(targets_dir), 180)

    r = launcher("--address", ray_cluster.address, *common, *overrides)
    assert r.returncode == 0 and "nothing to train (2 finished" in r.stdout
    r = launcher("--address", ray_cluster.address, *common, *overrides[1:], "train.steps=64", "--dry-run")
    assert r.returncode == 0 and "0 finished" in r.stdout, r.stdout
    assert sum(ln.startswith("  digits") and " train " in ln for ln in r.stdout.splitlines()) == 2, r.stdout

    col = launcher(*common, *overrides, "--collect")
    assert col.returncode == 0, col.stderr
    table = json.loads((runs_root / "results.json").read_text())
    assert [row["state"] for row in table] == ["done", "done"] and [row["step"] for row in table] == [60, 60]
    assert "| digits-t2-3x2@head-nodes1 | done | 60 |" in col.stdout
