"""A real Slurm cluster for tests: munged, slurmctld and two slurmd "nodes" (n1, n2) with fake GPU gres.

Everything lives in a fresh temp dir (config, state, spool, logs, munge socket); the config is passed to every
client through the SLURM_CONF environment variable, so nothing under /etc is touched and no /etc/hosts entry is
needed (n1 and n2 point at NodeAddr=127.0.0.1). Ports are picked free at start. The daemons run in the foreground
as children of the test process and are stopped by PID (SIGTERM, then SIGKILL for survivors).

Needs root (slurmd runs jobs as the submitting user and SlurmUser=root) and Debian's `slurm-wlm` and `munge`;
skips with the reason otherwise. Use the session fixture `slurm_cluster`; run `python tests/plugins/slurm.py` to
start a cluster by hand (prints the SLURM_CONF to export, Ctrl-C stops it).
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.ports import free_port

NODES = ("n1", "n2")
GPUS_PER_NODE = 2
CPUS_PER_NODE = 2
PARTITIONS = ("gpu", "debug")


def _stop(procs: list[subprocess.Popen], wait_s: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    env: dict[str, str]  # environment for clients: SLURM_CONF set
    nodes: tuple[str, ...] = NODES
    partitions: tuple[str, ...] = PARTITIONS
    gpus_per_node: int = GPUS_PER_NODE
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, check=check, timeout=timeout, capture_output=True, text=True)

    def start_now(self, job: str, timeout: float = 120) -> None:
        """Skip Slurm's hold on a requeued job (Reason=BeginTime, ~2 minutes): set its start time to now, again
        while the requeue is still settling, until the job no longer waits for its begin time."""
        deadline = time.monotonic() + timeout
        while True:
            self.run("scontrol", "update", f"jobid={job}", "starttime=now", check=False)
            r = self.run("squeue", "-h", "-j", job, "-o", "%T|%r", check=False)
            state, _, reason = r.stdout.strip().partition("|")
            if state != "PENDING" or reason != "BeginTime" or time.monotonic() > deadline:
                return
            time.sleep(1)

    def logs(self) -> str:
        out = []
        for f in sorted(self.log_dir.glob("*.log")):
            out.append(f"==> {f.name} <==\n" + "\n".join(f.read_text(errors="replace").splitlines()[-40:]))
        return "\n".join(out)

    def job_pids(self) -> set[int]:
        """Processes started for this cluster (slurmstepd, srun, job tasks): their environment names our conf."""
        marker = f"SLURM_CONF={self.conf}".encode()
        own = {os.getpid()} | {p.pid for p in self.procs}
        pids = set()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) in own:
                continue
            try:
                if marker in (d / "environ").read_bytes().split(b"\0"):
                    pids.add(int(d.name))
            except OSError:
                continue
        return pids

    def node_pids(self, node: str) -> tuple[subprocess.Popen | None, set[int]]:
        """The slurmd of a node and the job processes running on it (tasks and their slurmstepd)."""
        slurmd = next((p for p in self.procs if p.poll() is None and p.args[:4] == ["slurmd", "-D", "-N", node]), None)
        tasks = set()
        for pid in self.job_pids():
            try:
                env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"SLURMD_NODENAME={node}".encode() in env:
                tasks.add(pid)
        stepds = set()
        for pid in tasks:  # the slurmstepd of each task is its parent
            try:
                ppid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if (Path("/proc") / str(ppid) / "cmdline").read_bytes().startswith(b"slurmstepd"):
                    stepds.add(ppid)
            except (OSError, ValueError, IndexError):
                continue
        return slurmd, tasks | stepds

    def kill_node(self, node: str) -> set[int]:
        """A node dies: SIGKILL its slurmd, then every slurmstepd and task of it. Returns the job pids killed."""
        slurmd, pids = self.node_pids(node)
        if slurmd is not None:
            slurmd.kill()
            slurmd.wait(timeout=10)
            self.procs.remove(slurmd)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def start_node(self, node: str) -> None:
        """The node comes back: a fresh slurmd for it (ReturnToService=2 returns it to service)."""
        log = open(self.log_dir / "daemons.out", "ab")
        self.procs.append(subprocess.Popen(["slurmd", "-D", "-N", node, "-f", str(self.conf)], env=self.env,
                                           stdout=log, stderr=log))  # fmt: skip

    def stop(self) -> None:
        """Cancel every job, stop the daemons, then stop any job process left behind (SIGTERM, then SIGKILL)."""
        if any(p.poll() is None for p in self.procs):
            self.run("scancel", "--full", "--user", pwd.getpwuid(os.getuid()).pw_name, check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                r = self.run("squeue", "-h", "-o", "%i", check=False)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.5)
        _stop(list(reversed(self.procs)))
        self.procs.clear()
        left = self.job_pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if sig == signal.SIGTERM and left:
                time.sleep(3)
                left = self.job_pids()


def _write_conf(root: Path, munge_socket: Path) -> Path:
    host = socket.gethostname()
    ctl_port, *node_ports = (free_port() for _ in range(1 + len(NODES)))
    lines = [
        "ClusterName=ditscale-test",
        f"SlurmctldHost={host}(127.0.0.1)",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool-%n",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd-%n.log",
        f"SlurmctldPort={ctl_port}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "MailProg=/bin/true",
        "JobRequeue=1",
        "KillWait=30",
        "MinJobAge=600",
        "SchedulerParameters=sched_interval=2",
        "GresTypes=gpu",
        # job ids differ between sessions, so job-id-seeded MASTER_PORTs (submitit) do not repeat on one machine
        f"FirstJobId={random.randint(1000, 60000)}",
    ]
    for name, port in zip(NODES, node_ports, strict=True):
        lines.append(
            f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={CPUS_PER_NODE} "
            f"RealMemory=8000 Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN"
        )
    nodes = ",".join(NODES)
    lines.append(f"PartitionName=gpu Nodes={nodes} Default=YES MaxTime=INFINITE State=UP")
    lines.append(f"PartitionName=debug Nodes={nodes} MaxTime=INFINITE State=UP")
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    last = GPUS_PER_NODE - 1
    (root / "gres.conf").write_text(f"NodeName=n[1-{len(NODES)}] Name=gpu File={root}/fakegpu/nvidia[0-{last}]\n")
    return conf


def _wait_for(what: str, check, timeout: float, cluster: SlurmCluster | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    detail = cluster.logs() if cluster else ""
    raise RuntimeError(f"slurm test cluster: timed out waiting for {what}\n{detail}")


def start_cluster(root: Path | None = None) -> SlurmCluster:
    """Start munged, slurmctld and one slurmd per fake node; return once every node is idle."""
    root = Path(root or tempfile.mkdtemp(prefix="ditscale-slurm-", dir="/tmp"))
    os.chmod(root, 0o755)  # munged (user munge) must traverse it
    for d in ("state", "log", "fakegpu", "munge", *(f"spool-{n}" for n in NODES)):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(GPUS_PER_NODE):  # gres files must be character devices: same major/minor as /dev/null
        dev = root / "fakegpu" / f"nvidia{i}"
        if not dev.exists():
            os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))
    munge_dir = root / "munge"
    munge_uid = pwd.getpwnam("munge")
    os.chown(munge_dir, munge_uid.pw_uid, munge_uid.pw_gid)
    os.chmod(munge_dir, 0o755)
    munge_socket = munge_dir / "munge.socket"
    conf = _write_conf(root, munge_socket)
    env = dict(os.environ, SLURM_CONF=str(conf))
    cluster = SlurmCluster(root=root, conf=conf, env=env)
    try:
        munged = subprocess.Popen(
            [
                "munged", "-F", f"--socket={munge_socket}", f"--pid-file={munge_dir}/munged.pid",
                f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed",
            ],
            user="munge", stdout=subprocess.DEVNULL, stderr=open(root / "log" / "munged.log", "ab"),
        )  # fmt: skip
        cluster.procs.append(munged)
        _wait_for("munged socket", munge_socket.exists, 15, cluster)
        log = open(root / "log" / "daemons.out", "ab")
        cluster.procs.append(subprocess.Popen(["slurmctld", "-D", "-f", str(conf)], env=env, stdout=log, stderr=log))
        for n in NODES:
            cluster.procs.append(
                subprocess.Popen(["slurmd", "-D", "-N", n, "-f", str(conf)], env=env, stdout=log, stderr=log)
            )

        def all_idle() -> bool:
            for p in cluster.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"slurm test cluster: {p.args[0]} exited rc={p.returncode}\n{cluster.logs()}")
            r = cluster.run("sinfo", "-h", "-N", "-p", "gpu", "-o", "%N %t", check=False)
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            return r.returncode == 0 and all(states.get(n) == "idle" for n in NODES)

        _wait_for("sinfo: n1 and n2 idle", all_idle, 60, cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _skip_reason() -> str | None:
    for binary in ("slurmctld", "slurmd", "munged", "sbatch"):
        if not shutil.which(binary) and not Path("/usr/sbin", binary).exists():
            return f"{binary} not installed (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the Slurm test cluster needs root (slurmd runs jobs as the submitting user)"
    if not Path("/etc/munge/munge.key").exists():
        return "/etc/munge/munge.key missing (apt-get install munge creates it)"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running 2-node Slurm cluster; sets SLURM_CONF in os.environ for the session (clients and subprocesses)."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    if "PATH" in os.environ and "/usr/sbin" not in os.environ["PATH"].split(":"):
        os.environ["PATH"] += ":/usr/sbin"
    cluster = start_cluster()
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        shutil.rmtree(cluster.root, ignore_errors=True)


if __name__ == "__main__":
    c = start_cluster()
    print(f"export SLURM_CONF={c.conf}    # logs in {c.log_dir}; Ctrl-C stops the cluster")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
