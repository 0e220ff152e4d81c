"""launchers/ray_grid.py under faults, against REAL Ray heads on loopback (tests/plugins/ray.py).

- an address where nothing listens: a named error, nothing started;
- a run that can never fit the cluster (--workers-per-run 8 on 4 CPUs): refused before anything starts, by the
  dry run too; a run that fits but finds the cluster busy: fails after --resource-wait, named;
- a head of its own: the driver is killed (kill -9) mid-run and leaves Ray Train's detached PlacementGroupCleaner;
  the next driver removes it and resumes the run; then the head is stopped: the driver prints the status table,
  says the cluster was lost, exits with 3, and no process of the head survives.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.plugins.ray import RayCluster, start_ray_head
from tests.ports import free_port
from tests.waits import wait_for

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "configs" / "grids" / "digits-test.yaml"
LAUNCHER = ROOT / "launchers" / "ray_grid.py"
pytestmark = [pytest.mark.slow, pytest.mark.ray]
ACTORS = """
import json, sys, ray
ray.init(address=sys.argv[1], configure_logging=False, log_to_driver=False)
from ray._private import state
dead = {j["JobID"] for j in state.jobs() if j.get("IsDead")}
print(json.dumps([[a["ActorClassName"], a["JobID"] in dead] for a in state.actors().values() if a["State"] != "DEAD"]))
"""
BLOCKER = """
import sys, ray
from ray.util.placement_group import placement_group
ray.init(address=sys.argv[1], configure_logging=False, log_to_driver=False)
ray.get(placement_group([{"CPU": float(sys.argv[2])}]).ready())
print("holding", flush=True)
sys.stdin.read()
"""


def _env(**extra) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", **RayCluster.env, **extra)


def launcher(*args, timeout=300):
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *map(str, args)], capture_output=True, text=True, env=_env(), timeout=timeout,
        cwd=ROOT,
    )  # fmt: skip


def _one_run_grid(tmp_path: Path, nodes: int) -> Path:
    text = GRID.read_text().replace("values: [1, 2], prefix: nodes", f"values: [{nodes}], prefix: nodes")
    p = tmp_path / f"digits-{nodes}.yaml"
    p.write_text(text)
    return p


def _live_actors(address: str) -> list[list]:
    r = subprocess.run([sys.executable, "-c", ACTORS, address], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_unreachable_oversized_and_busy(ray_cluster, digits8_dir, tmp_path):
    common = ["--grid", GRID, "--var", f"data_root={digits8_dir}", "--run-root", tmp_path / "runs"]
    closed = f"127.0.0.1:{free_port()}"
    took = {}
    t0 = time.monotonic()
    r = launcher("--address", closed, *common)
    took["unreachable address refused"] = time.monotonic() - t0
    assert r.returncode == 2 and f"error: --address {closed}: cannot reach a Ray cluster there" in r.stderr, r.stderr

    for mode in ([], ["--dry-run"]):
        t0 = time.monotonic()
        r = launcher("--address", ray_cluster.address, *common, "--workers-per-run", "8", *mode)
        took[f"oversized run refused{' (dry run)' if mode else ''}"] = time.monotonic() - t0
        assert r.returncode == 2, r.stderr[-3000:]
        assert "error: 2 runs can never fit the Ray cluster" in r.stderr
        assert "run 'digits-t2-3x2@head-nodes2': 8 workers x {CPU 1} can never fit the Ray cluster (1 node(s), 4 CPU" \
            in r.stderr  # fmt: skip
    assert not (tmp_path / "runs" / "digits-t2-3x2@head-nodes1").exists(), "nothing may start"

    # 3 of the 4 CPUs taken by someone else: the 2-worker run fits the cluster but not now; it waits, boundedly
    blocker = subprocess.Popen([sys.executable, "-c", BLOCKER, ray_cluster.address, "3"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env())  # fmt: skip
    try:
        assert blocker.stdout.readline().strip() == "holding"
        grid = _one_run_grid(tmp_path, 2)
        t0 = time.monotonic()
        r = launcher("--address", ray_cluster.address, "--grid", grid, "--var", f"data_root={digits8_dir}",
                     "--run-root", tmp_path / "busy", "--resource-wait", "5")  # fmt: skip
        took["busy cluster, --resource-wait 5: run failed"] = time.monotonic() - t0
    finally:
        blocker.stdin.close()
        blocker.wait(timeout=60)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "digits-t2-3x2@head-nodes2: waited 5 s (--resource-wait) for 2 workers x {CPU 1} to become free" in r.stderr
    print("\n[faults] " + ", ".join(f"{k}: {v:.1f} s" for k, v in took.items()) + " (whole launcher command)")


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: only picks the interface a route would use
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_killed_driver_and_lost_head(ray_cluster, digits8_dir, tmp_path):
    """(ray_cluster: the session's head is not used here, but its fixture decides whether Ray tests can run.)"""
    head = start_ray_head(num_cpus=2)
    try:
        ip = _non_loopback_ip()
        if ip:  # loopback only: the GCS does not answer on the machine's other address
            with pytest.raises(OSError):
                socket.create_connection((ip, head.port), timeout=3).close()
        grid = _one_run_grid(tmp_path, 1)
        run_dir = tmp_path / "runs" / "digits-t2-3x2@head-nodes1"
        cmd = [sys.executable, str(LAUNCHER), "--address", head.address, "--grid", str(grid), "--var",
               f"data_root={digits8_dir}", "--run-root", str(tmp_path / "runs"), "train.steps=400",
               "checkpoint.every=4", "log.every=2"]  # fmt: skip
        env = _env(DITSCALE_TEST_STEP_DELAY="0.3")

        first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        try:
            wait_for("a checkpoint", lambda: (run_dir / "checkpoints" / "latest").exists(), 300)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
        # the killed driver's job is dead; Ray Train's detached cleaner outlives it on a head without a dashboard
        wait_for("the driver's cleaner orphaned", lambda: ["PlacementGroupCleaner", True] in _live_actors(head.address),
                 60)  # fmt: skip

        out = tmp_path / "second.out"
        with open(out, "w") as f:
            second = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            wait_for(
                "the resumed run", lambda: "resuming from checkpoint step_" in out.read_text(errors="replace"), 300
            )
            assert "removed 1 leftover PlacementGroupCleaner actor(s) of earlier (killed) drivers" in out.read_text()
            assert ["PlacementGroupCleaner", True] not in _live_actors(head.address)
            tag = (run_dir / "checkpoints" / "latest").read_text().strip()
            # (the resumed rank starts its trainer as a process of its own: a second interpreter start under load)
            wait_for("a newer checkpoint", lambda: (run_dir / "checkpoints" / "latest").read_text().strip() != tag, 300)

            ended, gcs_gone = [], []

            def watch_gcs() -> None:
                while not ended:
                    try:
                        socket.create_connection(("127.0.0.1", head.port), timeout=1).close()
                    except OSError:
                        gcs_gone.append(time.monotonic())
                        return
                    time.sleep(0.1)

            watcher = threading.Thread(target=lambda: ended.append((second.wait(), time.monotonic())), daemon=True)
            watcher.start()
            threading.Thread(target=watch_gcs, daemon=True).start()
            t0 = time.monotonic()
            left = head.stop()  # the head goes away mid-run (SIGTERM to all its processes, SIGKILL after 10 s)
            assert not left, f"processes of the head survived: {sorted(left)}"
            watcher.join(timeout=120)
            rc, t_end = ended[0]
            gone = f", {t_end - gcs_gone[0]:.1f} s after its GCS stopped answering" if gcs_gone else ""
            print(f"\n[faults] head stop began; the driver ended {t_end - t0:.1f} s later{gone}")
        finally:
            if second.poll() is None:
                second.kill()
                second.wait()
        text = out.read_text(errors="replace")
        assert rc == 3, text[-5000:]
        assert f"error: lost the Ray cluster at {head.address} during run(s) digits-t2-3x2@head-nodes1" in text
        assert "RUN " in text and "digits-t2-3x2@head-nodes1  " in text and "1 runs: " in text, text[-3000:]
    finally:
        assert not head.stop(), "a process of the head survived"
