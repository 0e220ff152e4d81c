"""The one place that reads distributed state from the environment.

Whatever started the process (plain python, torchrun, the deepspeed launcher, srun, a Kubernetes Indexed Job,
Ray Train), the trainer calls `detect()` and gets rank, world size, local rank and the master address.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # single | torchrun | slurm | env

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def node_rank(self) -> int:
        return self.rank // max(self.local_world_size, 1)

    def export(self) -> None:
        """Write the torch.distributed env:// variables (what deepspeed.init_distributed reads)."""
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing on `host` listens on right now, picked by the OS ("" checks every interface). Another
    process may take it before the caller binds it: what must never clash (a run's metrics port) falls back again."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """First hostname of a Slurm nodelist such as 'n[1-2],gpu7' -> 'n1' (no scontrol needed)."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    m = re.match(r"^([^\[]+)\[([^\]]+)\]", first)
    if not m:
        return first
    prefix, ranges = m.groups()
    return prefix + ranges.split(",")[0].split("-")[0]


def detect(env: dict[str, str] | None = None) -> DistEnv:
    env = dict(os.environ if env is None else env)
    port = int(env.get("MASTER_PORT", "29500"))
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")))
        lws = int(env.get("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", str(world))))
        source = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env"
        return DistEnv(int(env["RANK"]), world, local, lws, env.get("MASTER_ADDR", "127.0.0.1"), port, source)
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        world = int(env["SLURM_NTASKS"])
        nnodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
        master = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        if "MASTER_PORT" not in env:  # same on every task of the job, different between jobs
            port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 40000
        return DistEnv(
            int(env["SLURM_PROCID"]),
            world,
            int(env.get("SLURM_LOCALID", "0")),
            max(world // max(nnodes, 1), 1),
            master,
            port,
            "slurm",
        )
    return DistEnv()
