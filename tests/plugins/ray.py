"""A real local Ray cluster for tests: `ray start --head` on loopback with a unique --temp-dir.

Loopback: `ray start` turns --node-ip-address=127.0.0.1 into the host's address, unless Ray's single-machine mode
is on (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the default on macOS and Windows): then every server of the head
(GCS, raylet, agents, client server) binds 127.0.0.1 only.

Every process the head spawned (gcs_server, raylet, dashboard agents, workers, ...) is found by the temp dir in
its command line, by the GCS port it was given (the Ray client server, re-parented to init, names neither the
temp dir nor a parent of ours), or by descent from such a process, and stopped by PID at the end: SIGTERM, a grace
period, then SIGKILL for survivors (`ray stop` matches by process name and could hit other clusters). Skips when
Ray is not installed (it is an extra: pip install 'ditscale[ray]').

Clients of a loopback head must be in the same mode (else they turn 127.0.0.1 into the host's address, where
nothing listens): `ray_cluster` sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in os.environ for the session, and
`RayCluster.env` holds it for subprocesses.

Fixtures: `ray_cluster` (session; yields an object with `.address` "127.0.0.1:PORT") and `ray_local` (session;
in-process `ray.init` for unit tests that need no separate cluster). `start_ray_head()` starts another head, e.g.
one that a test stops on purpose.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ports import free_port


def _ray_bin() -> str | None:
    cand = Path(sys.executable).with_name("ray")
    return str(cand) if cand.exists() else shutil.which("ray")


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) for every process we can read."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def cluster_pids(marker: str, roots: set[int] | None = None, pattern: str | None = None) -> set[int]:
    """PIDs whose command line contains marker (or matches the regex pattern), plus all their descendants (and
    those of roots)."""
    table = _proc_table()
    me = os.getpid()
    rx = re.compile(pattern) if pattern else None
    pids = {p for p, (_, cmd) in table.items() if p != me and (marker in cmd or (rx and rx.search(cmd)))}
    pids |= roots or set()
    changed = True
    while changed:
        changed = False
        for p, (ppid, _) in table.items():
            if ppid in pids and p not in pids and p != me:
                pids.add(p)
                changed = True
    return {p for p in pids if p in table}


def stop_pids(pids: set[int], grace_s: float = 10.0) -> set[int]:
    """SIGTERM every pid, wait up to grace_s, SIGKILL the survivors. Returns the pids that had to be killed."""
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if _alive(p)}
        time.sleep(0.2)
    for p in alive:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return alive


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":  # a zombie child of ours: reap it
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


@dataclass
class RayCluster:
    address: str
    temp_dir: Path
    pids: set[int]

    # what a client of this loopback head needs; no token auth (Ray enables it when ~/.ray/auth_token exists, which
    # any local ray.init() on the machine writes, and then a head and its clients can disagree)
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def processes(self) -> set[int]:
        """Every live process of this cluster (see the module docstring)."""
        return cluster_pids(str(self.temp_dir), self.pids, pattern=rf"--(?:gcs-)?address=\S+:{self.port}(?:\s|$)")

    def stop(self) -> set[int]:
        """Stop every process of the cluster; returns those still alive afterwards (should be none)."""
        stop_pids(self.processes())
        deadline = time.monotonic() + 10  # a SIGKILLed process takes a moment to go (its memory is freed first)
        while (left := {p for p in self.processes() if _alive(p)}) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left


def start_ray_head(num_cpus: int = 4) -> RayCluster:
    ray = _ray_bin()
    temp_dir = Path(tempfile.mkdtemp(prefix="dsray-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    port = free_port()
    cmd = [
        ray, "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
        "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--include-dashboard=false",
        "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
        f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
    ]  # fmt: skip
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **RayCluster.env)  # loopback only, no token auth
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # workers use this venv's python
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    cluster = RayCluster(f"127.0.0.1:{port}", temp_dir, set())
    cluster.pids = cluster.processes()
    if proc.returncode != 0:
        cluster.stop()
        raise RuntimeError(f"ray start --head failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return cluster


@pytest.fixture(scope="session")
def ray_cluster():
    """A `ray start --head` cluster on loopback (4 logical CPUs); stopped by PID afterwards."""
    try:
        import ray  # noqa: F401
    except ImportError:
        pytest.skip("ray not installed (pip install 'ditscale[ray]')")
    if not _ray_bin():
        pytest.skip("the `ray` command is not installed")
    cluster = start_ray_head()
    old = {k: os.environ.get(k) for k in RayCluster.env}
    os.environ.update(RayCluster.env)
    try:
        yield cluster
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        left = cluster.stop()
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
        assert not left, f"processes of the Ray test cluster survived SIGKILL: {sorted(left)}"


@pytest.fixture(scope="session")
def ray_local():
    """In-process `ray.init` (2 CPUs, no dashboard) for unit tests; ray.shutdown() at the end."""
    try:
        import ray
    except ImportError:
        pytest.skip("ray not installed (pip install 'ditscale[ray]')")
    temp_dir = tempfile.mkdtemp(prefix="dsray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        stop_pids(cluster_pids(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
