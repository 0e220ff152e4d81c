"""The training task that runs inside each Slurm array task (one process per task, one task per GPU).

It takes the torch distributed environment from submitit's job environment, makes the master address
resolvable, skips runs that already finished, and calls ditscale.train.run_training(cfg), which resumes from
the run's latest checkpoint on its own. Requeue:

- `scontrol requeue` / preemption by Slurm: the trainer gets SIGTERM, checkpoints at the end of the step and
  returns; Slurm starts the job again and the task resumes from checkpoints/latest.
- time limit (submitit's `--signal USR2@delay`): the task asks the trainer to checkpoint (SIGUSR1), and once
  run_training has returned, submitit's own handler requeues the job (Checkpointable: same task, same run,
  at most slurm_max_num_timeout times). When those are used up the task says so in one line and ends; the run
  stays resumable.
- a failure (a rank crashed, a peer or its node was lost, a collective broke): srun runs with
  --kill-on-bad-exit, so the whole step ends as soon as one rank exits abnormally; the first rank that sees the
  failure (or, when no rank could, the job script after srun: `python -m ditscale.cli.after_srun`)
  requeues the job, at most `max_failures` times per job; each decision is one file under
  `<log dir>/failures/`. Errors that would fail again (a config change, another trainer holding the run dir)
  are not retried.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from ditscale.config import config_from_dict
from ditscale.errors import ConfigError, DitscaleError, LaunchError, RunLockedError
from ditscale.io.rundir import RunDir
from ditscale.launch import claim as C
from ditscale.launch import records
from ditscale.train import run_training

log = logging.getLogger("ditscale.launch")
MASTER_ADDR_ENV = "DITSCALE_MASTER_ADDR"
FAILURES = "failures"  # <log dir>/failures/<job id>-<restart>.json: one decision per job life
TARGETS = "targets"  # <log dir>/targets/<run>-rank<r>.json: Prometheus file_sd targets of the running ranks
FINAL_ERRORS = (ConfigError, RunLockedError, LaunchError)  # would fail the same way again: never requeued


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


# --- failures: requeue within a budget, one decision per job life -----------------------------------------------
def job_id_from_env() -> str:
    """This job's id as jobs.json records it: '<array>_<task>' for array tasks, else the job id."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")


def job_state(job_id: str) -> str | None:
    """JobState of a Slurm job (scontrol show job), None when unknown."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    for tok in out.stdout.split():
        if tok.startswith("JobState="):
            return tok.split("=", 1)[1]
    return None


def failure_records(log_dir: str | Path, job_id: str | None = None) -> list[dict]:
    """The failure decisions recorded under <log dir>/failures (of one job, or all), oldest first."""
    d = Path(log_dir) / FAILURES
    out = []
    for f in sorted(d.glob(f"{job_id}-*.json" if job_id else "*.json")) if d.is_dir() else []:
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and (job_id is None or rec.get("job") == job_id):
            out.append(rec)
    return sorted(out, key=lambda r: r.get("time", 0))


def handle_failure(
    log_dir: str | Path, job_id: str, run_id: str, reason: str, max_failures: int, retry: bool = True
) -> str | None:
    """Decide once per job life what a failure means: 'requeued' (while this job has failed at most max_failures
    times), 'gave up', or 'not retried' (an error that would happen again). The first caller (any rank, or the job
    script after srun) wins; later callers get None. Nothing is decided for a job that Slurm is already requeueing
    or cancelling (a requeue, a preemption, scancel, submitit's time-limit requeue)."""
    state = job_state(job_id)
    if state is not None and state != "RUNNING":
        return None
    d = Path(log_dir) / FAILURES
    d.mkdir(parents=True, exist_ok=True)
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    path = d / f"{job_id}-{restart}.json"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    earlier = [r for r in failure_records(log_dir, job_id) if r.get("action") == "requeued"]
    n = len(earlier) + 1
    action = "not retried" if not retry else ("requeued" if n <= max_failures else "gave up")
    rec = {
        "job": job_id,
        "run": run_id,
        "restart": int(restart),
        "failure": n,
        "max_failures": max_failures,
        "action": action,
        "reason": reason[:2000],
        "host": socket.gethostname(),
        "time": time.time(),
    }
    if action == "requeued":
        r = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            rec["action"] = action = "requeue failed"
            rec["reason"] += f"; scontrol requeue: {r.stderr.strip()}"
    with os.fdopen(fd, "w") as f:
        json.dump(rec, f, indent=1)
    if action in ("gave up", "not retried"):
        remove_targets(log_dir, run_id)
    return action


def kill_local_srun() -> list[int]:
    """SIGKILL this job's srun if it runs on this node (the batch node). After a node died, srun waits for tasks
    that will never report; once the job is requeued Slurm stops tracking it (proctrack/linuxproc loses orphans),
    and when it finally gives up it cancels step 0 of the job id, which by then is the next life's step."""
    job = os.environ.get("SLURM_JOB_ID", "")
    killed = []
    for d in Path("/proc").iterdir() if job else ():
        if not d.name.isdigit():
            continue
        try:
            if (d / "comm").read_text().strip() != "srun":
                continue
            if f"SLURM_JOB_ID={job}".encode() not in (d / "environ").read_bytes().split(b"\0"):
                continue
            os.kill(int(d.name), signal.SIGKILL)
            killed.append(int(d.name))
        except (OSError, ValueError):
            continue
    return killed


def remove_targets(log_dir: str | Path, run_id: str) -> None:
    """Drop a run's Prometheus file_sd targets (ranks that died cannot remove their own)."""
    for f in (Path(log_dir) / TARGETS).glob(f"{run_id}-rank*.json"):
        f.unlink(missing_ok=True)


def _run_of_job(log_dir: str | Path, job_id: str) -> str:
    return next((rid for rid, rec in records.jobs(log_dir).items() if rec.get("job_id") == job_id), "?")


def end_claim(run_dir: str, job_id: str, **fields: Any) -> None:
    """The run finished in this job: end its claim (if this job still holds it), so that the next launcher need
    not ask squeue."""

    try:
        cl = C.current([run_dir])[run_dir]
        if cl is not None and str(cl.data.get("job")) == job_id and not cl.ended:
            C.end(cl, **fields)
    except DitscaleError as e:
        log.warning("could not end the claim of %s: %s", run_dir, e)


def after_srun(rc: int, log_dir: str, max_failures: int) -> int:
    """The job script's last step (submitit `teardown`, `python -m ditscale.cli.after_srun`): srun ended with an
    error while the job still runs (no rank could report it, e.g. the only rank was killed): requeue within the
    budget. Prints one line."""
    job = job_id_from_env()
    if rc == 0 or not job:
        return rc
    run = _run_of_job(log_dir, job)
    action = handle_failure(log_dir, job, run, f"srun exited with code {rc}", max_failures)
    if action:
        print(f"ditscale: run {run}: job {job} failed (srun exit code {rc}): {action}", file=sys.stderr, flush=True)
    return rc


# --- the task -------------------------------------------------------------------------------------------------
class TrainTask(submitit.helpers.Checkpointable):
    """Callable submitted once per run: TrainTask(use_gpus, log_dir, max_failures)(run_id, config_dict)."""

    log_dir: str | None = None  # class defaults: tasks pickled by an older launcher lack these attributes
    max_failures: int = 3
    max_timeouts: int | None = None

    def __init__(
        self, use_gpus: bool = False, log_dir: str | None = None, max_failures: int = 3, max_timeouts: int | None = None
    ) -> None:
        self.use_gpus = use_gpus
        self.log_dir = log_dir
        self.max_failures = max_failures
        self.max_timeouts = max_timeouts
        self._timeout_signal = False

    def __call__(self, run_id: str, config: dict[str, Any]) -> dict[str, Any]:
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
        self._install_timeout_forwarding(run_id, submitit_handler)

        try:
            metrics = run_training(cfg)
        except FINAL_ERRORS as e:
            self._failed(run_id, rundir, e, retry=False)
            raise SystemExit(1) from None
        except DitscaleError as e:  # data or storage trouble (a checkpoint was saved): may pass on a retry
            self._failed(run_id, rundir, e, retry=True)
            raise SystemExit(1) from None
        except Exception as e:  # a rank crashed or a peer was lost: the traceback follows in this log
            self._failed(run_id, rundir, e, retry=True)
            raise
        finished = rundir.is_done(cfg.train.steps)
        if finished:
            log.info("run %s: finished at step %s", run_id, metrics.get("step"))
            if os.environ.get("RANK", "0") == "0":
                end_claim(cfg.run.dir, job_id_from_env(), finished=True)
            return {"run": run_id, "finished": True, "metrics": metrics}
        where = f"at step {metrics.get('step')} (checkpoint {rundir.latest_tag() or 'none'})"
        if self._timeout_signal and callable(submitit_handler):
            log.info("run %s: checkpointed %s after the time-limit signal", run_id, where)
            self._requeue_after_timeout(run_id, submitit_handler, where)
        else:
            why = metrics.get("interrupted") or "a stop request"
            log.warning(
                "run %s: stopped by %s %s; it resumes when the job is requeued or the launcher runs again",
                run_id,
                why,
                where,
            )
        raise SystemExit(0)  # not "Job completed successfully": the run is not finished

    def _failed(self, run_id: str, rundir: RunDir, e: BaseException, retry: bool) -> None:
        rank = os.environ.get("RANK", "?")
        what = f"{type(e).__name__}: {e}"
        job = job_id_from_env()
        action = (
            handle_failure(self.log_dir, job, run_id, f"rank {rank}: {what}", self.max_failures, retry)
            if self.log_dir and job
            else None
        )
        if action is not None:
            kill_local_srun()  # the step is over: an srun left waiting would later cancel the requeued job's step
        tag = rundir.latest_tag() or "none"
        if action == "requeued":
            n = len([r for r in failure_records(self.log_dir, job) if r.get("action") == "requeued"])
            log.error(
                "run %s: rank %s failed (%s); failure %d of %d allowed (--max-failures): requeued job %s, "
                "it resumes from checkpoint %s",
                run_id,
                rank,
                what,
                n,
                self.max_failures,
                job,
                tag,
            )
        elif action == "gave up":
            log.error(
                "run %s: rank %s failed (%s); more than %d failures (--max-failures): not requeued; resumable "
                "from checkpoint %s: rerun the launcher",
                run_id,
                rank,
                what,
                self.max_failures,
                tag,
            )
        elif action == "not retried":
            log.error("run %s: not retried: %s", run_id, what)
        else:
            log.error("run %s: rank %s: %s", run_id, rank, what)

    def _requeue_after_timeout(self, run_id: str, submitit_handler: Any, where: str) -> None:
        """submitit requeues the job (rank 0) and exits; when the time-outs are used up it raises instead."""
        try:
            submitit_handler(signal.SIGUSR2, None)  # submitit: checkpoint() -> requeue -> exit (rank 0)
        except submitit.core.utils.UncompletedJobError:
            allowed = "the" if self.max_timeouts is None else f"all {self.max_timeouts}"
            log.warning(
                "run %s: time limit reached and %s requeues for time-outs are used up (--max-timeouts): not "
                "requeued; resumable %s: rerun the launcher (a longer --time needs fewer requeues)",
                run_id,
                allowed,
                where,
            )

    def _install_timeout_forwarding(self, run_id: str, submitit_handler: Any) -> None:
        """USR2 (time limit / preemption notice) -> SIGUSR1 for the trainer, requeue after it returns."""

        def on_usr1_before_trainer(signum, frame):  # the trainer has not installed its handler yet: ignore
            log.info("SIGUSR1 before the trainer started: ignored")

        def on_usr2(signum, frame):
            self._timeout_signal = True
            if signal.getsignal(signal.SIGUSR1) is on_usr1_before_trainer and callable(submitit_handler):
                self._requeue_after_timeout(run_id, submitit_handler, "before training started")
                raise SystemExit(0)  # nothing trained yet
            os.kill(os.getpid(), signal.SIGUSR1)

        signal.signal(signal.SIGUSR1, on_usr1_before_trainer)
        signal.signal(signal.SIGUSR2, on_usr2)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # The trainer already wrote the checkpoint into the run dir; the requeued task resumes from it.
        self._timeout_signal = False
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
