"""The training task that runs inside each Slurm array task (one process per task, one task per GPU).

It takes the torch distributed environment from submitit's job environment, makes the master address
resolvable, skips runs that already finished, and calls ditscale.train.run_training(cfg), which resumes from
the run's latest checkpoint on its own. Requeue:

- `scontrol requeue` / preemption by Slurm: the trainer gets SIGTERM, checkpoints at the end of the step and
  returns; Slurm starts the job again and the task resumes from checkpoints/latest.
- time limit (submitit's `--signal USR2@delay`): the task asks the trainer to checkpoint (SIGUSR1), and once
  run_training has returned, submitit's own handler requeues the job (Checkpointable: same task, same run,
  at most slurm_max_num_timeout times).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
from typing import Any

import submitit

from ditscale.errors import LaunchError
from ditscale.io.rundir import RunDir

log = logging.getLogger("ditscale.launch")
MASTER_ADDR_ENV = "DITSCALE_MASTER_ADDR"


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
        return True
    except OSError:
        return False


def _slurm_node_addr(node: str) -> str | None:
    """NodeAddr of a Slurm node (`scontrol show node -o NODE`), e.g. 127.0.0.1 for the fake test nodes."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", "-o", node], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for tok in out.split():
        if tok.startswith("NodeAddr="):
            return tok.split("=", 1)[1] or None
    return None


def resolve_master_addr(host: str, num_nodes: int = 1) -> str:
    """A master address every rank can connect to.

    DITSCALE_MASTER_ADDR wins; a hostname that resolves is kept; else the node's Slurm NodeAddr (nodes whose
    names are not in DNS, e.g. the fake nodes n1, n2 of the test cluster); else 127.0.0.1 for a single node.
    """
    override = os.environ.get(MASTER_ADDR_ENV)
    if override:
        return override
    if _resolves(host):
        return host
    addr = _slurm_node_addr(host)
    if addr and _resolves(addr):
        return addr
    if num_nodes <= 1:
        return "127.0.0.1"
    raise LaunchError(
        f"master node {host!r} does not resolve and Slurm reports no NodeAddr for it; "
        f"set {MASTER_ADDR_ENV} to an address every node can reach"
    )


def export_dist_env(use_gpus: bool) -> dict[str, str]:
    """Export RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the job environment."""
    dist = submitit.helpers.TorchDistributedEnvironment()
    dist.export(set_cuda_visible_devices=use_gpus, overwrite=True)
    job = submitit.JobEnvironment()
    if dist.world_size == 1:  # a group of one: the trainer picks a free port (job-id-seeded ports can collide)
        os.environ.pop("MASTER_PORT", None)
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        return {k: os.environ.get(k, "") for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    os.environ["MASTER_ADDR"] = resolve_master_addr(dist.master_addr, job.num_nodes)
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: os.environ[k] for k in keys}


class TrainTask(submitit.helpers.Checkpointable):
    """Callable submitted once per run: TrainTask(use_gpus)(run_id, config_dict)."""

    def __init__(self, use_gpus: bool = False) -> None:
        self.use_gpus = use_gpus
        self._timeout_signal = False

    def __call__(self, run_id: str, config: dict[str, Any]) -> dict[str, Any]:
        from ditscale.config import config_from_dict

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        cfg = config_from_dict(config, origin=f"(run {run_id!r})")
        rundir = RunDir(cfg.run.dir)
        if rundir.is_done(cfg.train.steps):
            log.info("run %s: already finished (%s/final.json), nothing to do", run_id, cfg.run.dir)
            return {"run": run_id, "finished": True, "skipped": True}
        env = export_dist_env(self.use_gpus)
        job = submitit.JobEnvironment()
        tag = rundir.latest_tag()
        if tag:
            rank = env["RANK"]
            log.info("run %s: resuming from checkpoint %s (job %s, rank %s)", run_id, tag, job.job_id, rank)
        else:
            log.info("run %s: starting (job %s, rank %s)", run_id, job.job_id, env["RANK"])
        log.info("run %s: distributed env %s", run_id, env)
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        self._install_timeout_forwarding(submitit_handler)

        from ditscale.train import run_training

        metrics = run_training(cfg)
        finished = rundir.is_done(cfg.train.steps)
        if not finished and self._timeout_signal and callable(submitit_handler):
            log.info("run %s: checkpointed after the time-limit signal; requeueing", run_id)
            submitit_handler(signal.SIGUSR2, None)  # submitit: checkpoint() -> requeue -> exit (rank 0)
        log.info("run %s: run_training returned (finished=%s)", run_id, finished)
        return {"run": run_id, "finished": finished, "metrics": metrics}

    def _install_timeout_forwarding(self, submitit_handler: Any) -> None:
        """USR2 (time limit / preemption notice) -> SIGUSR1 for the trainer, requeue after it returns."""

        def on_usr1_before_trainer(signum, frame):  # the trainer has not installed its handler yet: ignore
            log.info("SIGUSR1 before the trainer started: ignored")

        def on_usr2(signum, frame):
            self._timeout_signal = True
            if signal.getsignal(signal.SIGUSR1) is on_usr1_before_trainer and callable(submitit_handler):
                submitit_handler(signum, frame)  # nothing trained yet: requeue right away
                return
            os.kill(os.getpid(), signal.SIGUSR1)

        signal.signal(signal.SIGUSR1, on_usr1_before_trainer)
        signal.signal(signal.SIGUSR2, on_usr2)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # The trainer already wrote the checkpoint into the run dir; the requeued task resumes from it.
        self._timeout_signal = False
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
