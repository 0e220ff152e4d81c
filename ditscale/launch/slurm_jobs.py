"""Talking to Slurm: the launcher's options, time limits, partitions and what their nodes have (sinfo), the submitit
executor and its #SBATCH preview, and the queue (squeue). Used by the grid launcher (ditscale.launch.slurm) and its
data-preparation jobs (ditscale.launch.slurm_prepare)."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditscale.errors import LaunchError
from ditscale.grid import RunSpec, raise_problems

LIVE_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "RESIZING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
    "PREEMPTED",
}


@dataclass
class SlurmOptions:
    partition: str | None  # None: --status and --collect only
    log_dir: Path
    account: str | None = None
    qos: str | None = None
    array_parallelism: int = 64
    max_num_timeout: int = 3
    signal_delay_s: int = 120
    constraint: str | None = None
    exclude: str | None = None
    setup: list[str] | None = None  # shell lines run before srun (module load, conda activate, ...)
    max_failures: int = 3  # requeues after a failure (a rank, a node, the network), per job
    stall_after_s: float = 600.0  # --status: a running job without a new step for this long is "stalled"
    min_train_s: float = 600.0  # warn when a job life leaves less training time than this
    prepare_partition: str | None = None  # where data-preparation (CPU) jobs run; default: partition


# --- time limits ----------------------------------------------------------------------------------------------
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time(text: str | int | None, option: str = "--time") -> int | None:
    """A Slurm time limit in whole minutes (seconds round up). Slurm's formats: minutes, MM:SS, HH:MM:SS,
    D-HH, D-HH:MM, D-HH:MM:SS. Raises LaunchError naming the option and the value otherwise."""
    if text is None or isinstance(text, int):
        return text
    m = _TIME.match(str(text).strip())
    if not m:
        raise LaunchError(
            f"{option} {text!r}: not a Slurm time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)"
        )
    days, a, b, c = m.groups()
    if days is None and b is None:  # M
        h, mins, secs = 0, int(a), 0
    elif days is None:  # M:S | H:M:S
        h, mins, secs = (0, int(a), int(b)) if c is None else (int(a), int(b), int(c))
    else:  # D-H | D-H:M | D-H:M:S
        h, mins, secs = int(a), int(b or 0), int(c or 0)
    total = (int(days or 0) * 24 + h) * 60 + mins + math.ceil(secs / 60)
    if total < 1:
        raise LaunchError(f"{option} {text!r}: the time limit must be at least one minute")
    return total


def _slurm_cmd(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    if not shutil.which(cmd[0]):
        raise LaunchError(f"{cmd[0]!r} not found on PATH: run the Slurm launcher on a Slurm login node")
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


def partitions() -> list[str]:
    r = _slurm_cmd("sinfo", "-h", "-o", "%R")
    if r.returncode != 0:
        detail = (r.stderr.strip().splitlines() or [""])[-1]
        raise LaunchError(f"sinfo failed (is slurmctld reachable? is SLURM_CONF right?): {detail}")
    return sorted({p.strip() for p in r.stdout.split() if p.strip()})


def check_partition(partition: str, gpus_per_node: int = 0) -> None:
    """Raise LaunchError when the partition does not exist (or has no GPU gres while GPUs are asked for)."""
    known = partitions()
    if partition not in known:
        raise LaunchError(f"--partition {partition!r}: unknown Slurm partition (known: {', '.join(known) or 'none'})")
    if gpus_per_node > 0:
        nodes = partition_nodes(partition)
        if nodes and not any(n["gpus"] for n in nodes):
            gres = ", ".join(sorted({n["gres"] for n in nodes}))
            raise LaunchError(
                f"--partition {partition!r}: its nodes have no GPU gres ({gres or 'none'}) but the runs ask for "
                f"{gpus_per_node} GPU(s) per node (use --gpus-per-node 0 for CPU runs)"
            )


def _gpu_count(gres: str) -> int:
    """GPUs in a node's gres string: 'gpu:2', 'gpu:a100:4(S:0-1)', 'gpu:2,shard:8' -> 2, 4, 2; '(null)' -> 0."""
    total = 0
    for item in re.split(r",(?![^(]*\))", gres or ""):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def partition_nodes(partition: str) -> list[dict[str, Any]]:
    """The nodes of a partition as sinfo reports them: name, CPUs, memory (MB), gres, GPUs, state."""
    r = _slurm_cmd("sinfo", "-h", "-N", "-p", partition, "-o", "%N|%c|%m|%G|%t")
    if r.returncode != 0:
        raise LaunchError(f"sinfo -p {partition} failed: {r.stderr.strip()}")
    nodes: dict[str, dict[str, Any]] = {}
    for line in r.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5:
            continue
        name, cpus, mem, gres, state = parts
        nodes[name] = {
            "name": name,
            "cpus": int(cpus) if cpus.isdigit() else 0,
            "mem_mb": int(mem) if mem.isdigit() else 0,
            "gres": gres,
            "gpus": _gpu_count(gres),
            "state": state,
        }
    return list(nodes.values())


def check_resources(runs: list[RunSpec], partition: str) -> None:
    """Every run fits the partition's nodes (node count, GPUs, CPUs and memory per node, from sinfo); else one
    LaunchError naming each run that can never start and what it asks for."""
    nodes = partition_nodes(partition)
    if not nodes:
        return
    most = {k: max(n[k] for n in nodes) for k in ("gpus", "cpus", "mem_mb")}
    inventory = ", ".join(f"{n['name']}: {n['cpus']} CPUs, {n['gres']}" for n in nodes[:4])
    inventory += f", ... ({len(nodes)} nodes)" if len(nodes) > 4 else ""
    problems = []
    for r in runs:
        res, where = r.resources, f"run {r.id!r}"
        gpus, cpus = int(res.get("gpus_per_node") or 0), r.tasks_per_node * int(res.get("cpus_per_task") or 1)
        if int(res["nodes"]) > len(nodes):
            problems.append(
                f"{where}: {res['nodes']} nodes asked (--nodes), partition {partition!r} has {len(nodes)} ({inventory})"
            )
        if gpus > most["gpus"]:
            problems.append(
                f"{where}: {gpus} GPUs per node asked (--gpus-per-node), the nodes of partition "
                f"{partition!r} have at most {most['gpus']} ({inventory})"
            )
        if cpus > most["cpus"]:
            problems.append(
                f"{where}: {cpus} CPUs per node asked ({r.tasks_per_node} tasks x cpus_per_task "
                f"{res.get('cpus_per_task')}), the nodes of partition {partition!r} have at most "
                f"{most['cpus']} ({inventory})"
            )
        if res.get("mem_gb") and most["mem_mb"] and int(res["mem_gb"]) * 1024 > most["mem_mb"]:
            problems.append(
                f"{where}: {res['mem_gb']} GB per node asked (resources.mem_gb), the nodes of "
                f"partition {partition!r} have at most {most['mem_mb'] // 1024} GB"
            )
    if len(problems) > 1:
        raise LaunchError(f"{len(problems)} requests cannot fit partition {partition!r}:\n  " + "\n  ".join(problems))
    raise_problems(problems)


def executor(params: dict[str, Any], opts: SlurmOptions):
    import submitit

    ex = submitit.SlurmExecutor(folder=str(opts.log_dir / "%j"), max_num_timeout=opts.max_num_timeout)
    ex.update_parameters(**params)
    return ex


def sbatch_preview(params: dict[str, Any], n: int, opts: SlurmOptions) -> str:
    """The #SBATCH header submitit would write for an array of n runs."""
    from submitit.slurm.slurm import _make_sbatch_string

    ex = executor(params, opts)
    p = dict(ex.parameters)
    if n > 1:
        p["map_count"] = n
    text = _make_sbatch_string(command=ex._submitit_command_str, folder=str(opts.log_dir / "%j"), **p)
    return "\n".join(line for line in text.splitlines() if line.startswith(("#SBATCH", "srun ")))


def squeue_jobs() -> dict[str, dict[str, Any]]:
    """Slurm job id (array tasks as '12_3') -> {"state", "start" (epoch s or None), "nodes"} for this user's jobs."""
    user = os.environ.get("USER") or __import__("getpass").getuser()
    r = _slurm_cmd("squeue", "-h", "-r", "-u", user, "-o", "%i|%T|%S|%N")
    if r.returncode != 0:
        raise LaunchError(f"squeue failed: {r.stderr.strip()}")
    out = {}
    for line in r.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4:
            continue
        jid, state, start, nodes = parts
        try:
            t = time.mktime(time.strptime(start, "%Y-%m-%dT%H:%M:%S"))
        except ValueError:
            t = None
        out[jid] = {"state": state, "start": t, "nodes": nodes}
    return out


def squeue_states() -> dict[str, str]:
    """Slurm job id (array tasks as '12_3') -> state, for this user's queued and running jobs."""
    return {jid: j["state"] for jid, j in squeue_jobs().items()}
