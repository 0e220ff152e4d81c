"""Ray launcher: each run of a grid is a Ray Train TorchTrainer with the run's number of workers.

RayBackend (ditscale.launch.backend). Ray Train starts the workers and places them; each worker starts the trainer
as a child process, `python -m ditscale train --config ...`, with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT of its place in the group (a port of its own, chosen by rank 0 and shared over Ray Train's group), so
the trainer is stopped by the same protocol as under every other launcher: signals. Finished runs (final.json) and
runs another launcher claimed are skipped; the driver claims each run it trains and ends the claim when the run
ends (with its error); a failed worker group is restarted up to max_failures times and resumes from the run dir.
Works against a local cluster (`ray start --head`), an on-premises one, or KubeRay (ray://HOST:10001).

Faults, and what the driver does about them:
- an address that does not answer: a LaunchError naming it within `connect_timeout_s` (a TCP probe first, then
  Ray's own GCS connect timeout), never Ray's endless retries;
- capacity: a run whose workers x resources per worker can never fit the cluster's nodes is refused before any
  run starts (also by --dry-run); the driver never starts more runs at once than the cluster holds; a run that
  fits but finds the cluster busy waits at most `resource_wait_s` (Ray Train's worker-group start timeout, with
  a bounded number of controller retries), then fails with a named error;
- the cluster is lost (head stopped): the GCS stops answering the driver's probes (GcsWatch) or a run fails with
  the GCS gone; no further run is started, ClusterLostError names the address and the runs;
- metrics: a run with metrics on publishes each rank's exporter under `<storage>/targets/` (file_sd), on the Ray
  node's address; a busy port falls back to a free one (trainer), so concurrent runs never clash;
- SIGTERM to a worker (or to its trainer): the worker passes it to its trainer process, which checkpoints at the end
  of its step; the worker then fails on purpose and Ray Train restarts the group, which resumes from that
  checkpoint; a worker that dies takes its trainer with it (PR_SET_PDEATHSIG);
- a killed driver: Ray Train's detached PlacementGroupCleaner outlives it when the cluster has no state API
  (no dashboard); the next driver removes those of dead ditscale drivers, and a driver that ends (normally, by an
  error or by SIGTERM) removes its own.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditscale.config import config_from_dict
from ditscale.errors import LaunchError
from ditscale.grid import RunSpec
from ditscale.io.rundir import RunDir
from ditscale.launch import claim as C
from ditscale.launch import records
from ditscale.launch.backend import Backend, Capabilities, status
from ditscale.launch.common import Plan, results_dir
from ditscale.launch.local import _die_with_parent
from ditscale.launch.prepare import check_ready, command_env, run_step
from ditscale.launch.rows import View

log = logging.getLogger("ditscale.launch")
TARGETS = "targets"
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train V2: one attempt to place the workers


@dataclass
class RayOptions:
    address: str | None = "auto"
    workers_per_run: int | None = None  # default: the run's nodes x tasks per node
    min_workers: int | None = None  # start (and continue) on fewer workers, down to this many (Ray Train elastic)
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # default: the run's cpus_per_task
    max_concurrent: int = 1  # runs trained at the same time
    max_failures: int = 3  # worker-group restarts per run (each resumes from the run dir)
    storage: Path = Path("ray_results")  # Ray Train's own bookkeeping (our checkpoints live in the run dir)
    connect_timeout_s: float = 30.0  # an unreachable --address fails within this
    resource_wait_s: float = 600.0  # a run that fits the cluster waits at most this long for free resources


class ClusterLostError(LaunchError):
    """The Ray cluster went away while the grid ran (the head stopped, the network failed)."""

    def __init__(self, message: str, results: dict[str, dict[str, Any]]):
        super().__init__(message)
        self.results = results


# --- connecting ---------------------------------------------------------------------------------------------
def _host_port(address: str) -> tuple[str, int] | None:
    addr = address.split("://", 1)[-1].rstrip("/")
    host, _, port = addr.rpartition(":")
    return (host.strip("[]"), int(port)) if host and port.isdigit() else None


def resolve_address(address: str | None) -> str | None:
    """What `auto` means here: RAY_ADDRESS, else the local head Ray last started (None: start a local Ray)."""
    if address not in (None, "", "auto"):
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            return canonicalize_bootstrap_address("auto") or "auto"
        except (ConnectionError, ImportError, ValueError, OSError):
            return "auto"
    return None


def probe(address: str, timeout_s: float = 5.0) -> str | None:
    """Why a TCP connection to the address fails (None: it answers)."""
    hp = _host_port(address)
    if hp is None:
        return None
    try:
        socket.create_connection(hp, timeout=timeout_s).close()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def connect(address: str | None, timeout_s: float = 30.0) -> str:
    """Join the Ray cluster at address (None: a local one in this process); returns its GCS address. An address
    that does not answer raises LaunchError naming it within timeout_s, instead of Ray's endless retries."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    target = resolve_address(address)
    if target == "auto":
        raise LaunchError(
            "--address auto: no running Ray cluster found (start one with `ray start --head`, or set "
            "RAY_ADDRESS / --address HOST:PORT)"
        )
    if target is None:  # a Ray of our own in this process: nothing remote to wait for
        ray.init(log_to_driver=True, configure_logging=False)
        return ray.get_runtime_context().gcs_address
    why = probe(target, timeout_s=min(5.0, timeout_s))
    if why:
        raise LaunchError(f"--address {target}: cannot reach a Ray cluster there ({why})")
    # Ray's own connect: bounded by its GCS timeout (default 60 s, retried forever in some paths); keep ours.
    os.environ.setdefault("RAY_py_gcs_connect_timeout_s", str(max(5, int(timeout_s * 2 / 3))))
    os.environ.setdefault("RAY_gcs_rpc_server_connect_timeout_s", "5")
    done: dict[str, BaseException | None] = {}

    def init() -> None:
        try:
            ray.init(address=target, log_to_driver=True, configure_logging=False)
            done["error"] = None
        except BaseException as e:
            done["error"] = e

    t = threading.Thread(target=init, name="ditscale-ray-connect", daemon=True)
    quiet = logging.getLogger("ray._private.worker")  # "SIGTERM handler is not set ... not the main thread": ours is
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        t.start()
        t.join(timeout_s)
    finally:
        quiet.setLevel(level)
    if t.is_alive():
        raise LaunchError(f"--address {target}: no answer from a Ray cluster there within {timeout_s:.0f} s")
    if done.get("error") is not None:
        e = done["error"]
        raise LaunchError(f"--address {target}: cannot connect to a Ray cluster: {type(e).__name__}: {e}") from None
    try:
        gcs = ray.get_runtime_context().gcs_address
    except Exception:
        return target
    remove_stale_actors()
    return gcs


def alive(gcs_address: str | None, settle_s: float = 0.0) -> bool:
    """Whether the cluster's GCS answers. With settle_s, keep probing for that long and say lost as soon as a probe
    fails: a run that failed because its node crashed may see the error a moment before the GCS goes."""
    if gcs_address is None:
        return True
    deadline = time.monotonic() + settle_s
    while True:
        if probe(gcs_address, timeout_s=3.0) is not None:
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.5)


# --- leftovers of drivers -----------------------------------------------------------------------------------
_CLEANER = "PlacementGroupCleaner"


def _ditscale_job(job: dict) -> bool:
    return "ray_grid" in str(job.get("Entrypoint", "")) or "ditscale" in str(job.get("Entrypoint", ""))


def _kill_cleaners(job_ids: set[str]) -> int:
    """Kill the live PlacementGroupCleaner actors of these jobs (their placement groups died with the job). By
    actor id through the GCS (KillActorViaGcs): ray.kill needs a handle, which only the creator has."""
    import grpc
    import ray
    from ray._private import state
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    stale = [
        aid
        for aid, a in state.actors().items()
        if a.get("ActorClassName") == _CLEANER and a.get("State") != "DEAD" and a.get("JobID") in job_ids
    ]
    if not stale:
        return 0
    with grpc.insecure_channel(ray.get_runtime_context().gcs_address) as channel:
        stub = gcs_service_pb2_grpc.ActorInfoGcsServiceStub(channel)
        for aid in stale:
            req = gcs_service_pb2.KillActorViaGcsRequest(actor_id=bytes.fromhex(aid), force_kill=True, no_restart=True)
            stub.KillActorViaGcs(req, timeout=10)
    return len(stale)


def remove_stale_actors() -> None:
    """Ray Train's PlacementGroupCleaner is detached and, on a cluster without the state API (no dashboard),
    outlives a driver that was killed (~200 MB each). Remove those of dead ditscale drivers."""
    try:
        from ray._private import state

        dead = {j["JobID"] for j in state.jobs() if j.get("IsDead") and _ditscale_job(j)}
        n = _kill_cleaners(dead) if dead else 0
    except Exception as e:
        log.debug("could not look for leftovers of earlier drivers: %s", e)
        return
    if n:
        log.info("removed %d leftover %s actor(s) of earlier (killed) drivers", n, _CLEANER)


def remove_own_actors() -> None:
    """This driver's detached leftovers, before it disconnects (normal end, an error, SIGTERM)."""
    import ray

    if not ray.is_initialized():
        return
    try:
        _kill_cleaners({ray.get_runtime_context().get_job_id()})
    except Exception as e:
        log.debug("could not remove this driver's %s actors: %s", _CLEANER, e)


# --- capacity -----------------------------------------------------------------------------------------------
def workers_of(run: RunSpec, opts: RayOptions) -> tuple[int, dict[str, float]]:
    """(workers a run needs to start, resources per worker): with --min-workers, the fewest it may run on."""
    cpus = opts.cpus_per_worker if opts.cpus_per_worker is not None else run.resources.get("cpus_per_task", 1)
    per = {"CPU": float(cpus)}
    if opts.use_gpu:
        per["GPU"] = 1.0
    most = int(opts.workers_per_run or run.num_tasks)
    return (min(most, opts.min_workers) if opts.min_workers else most), per


def worker_range(run: RunSpec, opts: RayOptions) -> int | tuple[int, int]:
    """Ray Train's num_workers: a number, or (min, max) when the run may continue on fewer (--min-workers)."""
    most = int(opts.workers_per_run or run.num_tasks)
    least = workers_of(run, opts)[0]
    return (least, most) if least < most else most


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of each live node of the connected cluster."""
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def fits(demands: list[dict[str, float]], nodes: list[dict[str, float]]) -> bool:
    """Whether every bundle (one per worker) finds a node with room, placed greedily, biggest first."""
    free = [dict(n) for n in nodes]
    for d in sorted(demands, key=lambda d: -sum(d.values())):
        for n in free:
            if all(n.get(k, 0.0) + 1e-9 >= v for k, v in d.items()):
                for k, v in d.items():
                    n[k] = n.get(k, 0.0) - v
                break
        else:
            return False
    return True


def _describe(nodes: list[dict[str, float]]) -> str:
    cpu, gpu = sum(n.get("CPU", 0) for n in nodes), sum(n.get("GPU", 0) for n in nodes)
    return f"{len(nodes)} node(s), {cpu:g} CPU, {gpu:g} GPU in all"


def check_capacity(runs: list[RunSpec], opts: RayOptions, nodes: list[dict[str, float]]) -> None:
    """A run whose workers can never fit the cluster's nodes is a LaunchError (every such run named)."""
    problems = []
    for r in runs:
        n, per = workers_of(r, opts)
        if not fits([per] * n, nodes):
            want = ", ".join(f"{k} {v:g}" for k, v in per.items())
            problems.append(
                f"run {r.id!r}: {n} workers x {{{want}}} can never fit the Ray cluster "
                f"({_describe(nodes)}); use fewer --workers-per-run or a bigger cluster"
            )
    if len(problems) == 1:
        raise LaunchError(problems[0])
    if problems:
        raise LaunchError(f"{len(problems)} runs can never fit the Ray cluster:\n  " + "\n  ".join(problems))


class Ledger:
    """What this driver's running runs hold: a run starts only when it fits next to them, so that the grid never
    queues behind itself inside Ray (where a wait is bounded and would fail the run)."""

    def __init__(self, nodes: list[dict[str, float]]):
        self.nodes = nodes
        self.held: dict[str, list[dict[str, float]]] = {}
        self.cond = threading.Condition()

    def acquire(self, run_id: str, demands: list[dict[str, float]], stop: threading.Event) -> bool:
        with self.cond:
            while not fits([d for ds in self.held.values() for d in ds] + demands, self.nodes):
                if stop.is_set():
                    return False
                self.cond.wait(1.0)
            self.held[run_id] = demands
            return True

    def release(self, run_id: str) -> None:
        with self.cond:
            self.held.pop(run_id, None)
            self.cond.notify_all()


# --- the trainer --------------------------------------------------------------------------------------------
def _scalar_metrics(metrics: Any) -> dict[str, float | int | str | bool]:
    if not isinstance(metrics, dict):
        return {}
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool | int | str) or (isinstance(v, float) and math.isfinite(v)):
            out[str(k)] = v
    return out


class WorkerStopped(RuntimeError):
    """A worker's trainer stopped before the end (a stop signal): it checkpointed; Ray Train restarts the group."""


_SIGTERM = threading.Event()  # set in a Ray worker process when it receives SIGTERM


def _forward_sigterm() -> None:
    """Runs on the worker actor's main thread (the only one that may install signal handlers)."""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: _SIGTERM.set())


def _shared_port(rank: int) -> int:
    """A free port on rank 0's node for the trainers' own rendezvous, shared over Ray Train's process group."""
    import torch.distributed as dist

    port = [0]
    if rank == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            port[0] = s.getsockname()[1]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(port, src=0)
    return int(port[0])


def trainer_env(run_id: str, ctx, port: int) -> dict[str, str]:
    """The environment of a worker's trainer process: its place in the group (ditscale.distenv reads these)."""

    env = command_env()
    env.update(
        RANK=str(ctx.get_world_rank()),
        WORLD_SIZE=str(ctx.get_world_size()),
        LOCAL_RANK=str(ctx.get_local_rank()),
        LOCAL_WORLD_SIZE=str(ctx.get_local_world_size()),
        MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        MASTER_PORT=str(port),
    )
    return env


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train per-worker function: run this rank's trainer as a child process, then report (every rank)."""
    import subprocess
    import sys
    import tempfile

    import ray.train
    import yaml

    run_id = loop_config["run_id"]
    cfg = config_from_dict(loop_config["config"], origin=f"(run {run_id!r})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    rundir = RunDir(cfg.run.dir)
    tag = rundir.latest_tag()
    what = f"resuming from checkpoint {tag}" if tag else "starting"
    log.info("run %s: %s (rank %d of %d)", run_id, what, rank, ctx.get_world_size())
    try:
        actor = ray.get_runtime_context().current_actor
        ray.get(actor.execute.remote(_forward_sigterm), timeout=30)
    except Exception as e:
        log.warning("SIGTERM to this worker is not passed to its trainer: %s: %s", type(e).__name__, e)
    env = trainer_env(run_id, ctx, _shared_port(rank))
    env.setdefault("DITSCALE_METRICS_HOST", ray.util.get_node_ip_address())  # file_sd: this node's address
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=f"ditscale-{run_id}-", delete=False) as f:
        yaml.safe_dump(loop_config["config"], f, sort_keys=False)
    cmd = [sys.executable, "-u", "-m", "ditscale", "train", "--config", f.name]
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
    signalled = False
    try:
        while proc.poll() is None:
            if _SIGTERM.wait(0.5) and not signalled:
                proc.send_signal(15)  # the stop protocol: SIGTERM, checkpoint at the end of the step
                signalled = True
    finally:
        if proc.poll() is None:
            proc.kill()
        os.unlink(f.name)
    rc = proc.returncode
    finished = rundir.is_done(cfg.train.steps)
    if not finished:
        last = rundir.last_record() or {}
        where = f"at step {last.get('step')} (checkpoint {rundir.latest_tag()})"
        if rc == 0 or signalled:
            why = "SIGTERM" if signalled else "a stop signal to its trainer"
            raise WorkerStopped(f"run {run_id}: rank {rank} stopped by {why} {where}; the restarted group resumes")
        raise RuntimeError(f"run {run_id}: rank {rank}: the trainer failed ({records.exit_text(rc)}) {where}")
    report: dict[str, Any] = {"finished": finished}
    if rank == 0:
        report.update(_scalar_metrics(rundir.final() or {}))
    ray.train.report(report)


def run_config(run: RunSpec, opts: RayOptions) -> dict[str, Any]:
    """The run's config for its workers: with metrics on, every rank publishes a file_sd target."""
    cfg = run.config_dict()
    log_cfg = cfg.get("log", {})
    if log_cfg.get("metrics_port") and "prometheus" in log_cfg.get("loggers", []) and not log_cfg.get("file_sd"):
        storage = str(opts.storage)
        log_cfg["file_sd"] = (
            f"{storage.rstrip('/')}/{TARGETS}" if "://" in storage else str(Path(storage).absolute() / TARGETS)
        )
    return cfg


def start_timeout_s(opts: RayOptions) -> float:
    return float(os.environ.get(START_TIMEOUT_ENV) or min(60.0, max(5.0, opts.resource_wait_s)))


def make_trainer(run: RunSpec, opts: RayOptions):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    per = workers_of(run, opts)[1]
    workers = worker_range(run, opts)
    failure = FailureConfig(max_failures=opts.max_failures)
    if hasattr(failure, "controller_failure_limit"):  # Ray Train V2: bound the wait for resources
        failure.controller_failure_limit = max(0, math.ceil(opts.resource_wait_s / start_timeout_s(opts)) - 1)
    if isinstance(workers, tuple) and not hasattr(failure, "controller_failure_limit"):
        raise LaunchError("--min-workers needs Ray Train V2 (elastic worker groups): RAY_TRAIN_V2_ENABLED=1")
    return TorchTrainer(
        train_worker,
        train_loop_config={"run_id": run.id, "config": run_config(run, opts)},
        scaling_config=ScalingConfig(  # use_gpu adds the GPU of each worker
            num_workers=workers, use_gpu=opts.use_gpu, resources_per_worker={"CPU": per["CPU"]}
        ),
        torch_config=TorchConfig(backend="nccl" if opts.use_gpu else "gloo"),
        run_config=RunConfig(name=run.id, storage_path=str(Path(opts.storage).absolute()), failure_config=failure),
    )


def prepare_on_ray(plan: Plan) -> dict[str, str]:
    """Run the grid's missing data steps as Ray tasks before any run starts: the build, then the subsets side by
    side; each through ditscale.launch.prepare.run_step (its `python -m ditscale data ...` command, under the data
    folder's lease, skipped once its output verifies). Step name -> 'built' or 'ready'."""
    dp = plan.data
    if dp is None or not dp.todo:
        return {}
    import ray

    cpus = max(1, min(int(dp.recipe.resources["cpus"]), int(ray.cluster_resources().get("CPU", 1))))
    task = ray.remote(num_cpus=cpus, max_retries=0)(run_step)
    out: dict[str, str] = {}
    for wave in ([s for s in dp.todo if s.kind == "build"], [s for s in dp.todo if s.kind != "build"]):
        refs = {s.name: (s, task.remote(s)) for s in wave}
        failed = []
        for name, (step, ref) in refs.items():
            print(f"data {name}: {step.shell} (Ray task)", flush=True)
            try:
                out[name] = ray.get(ref)
            except Exception as e:
                failed.append(f"  {name}: {type(e).__name__}: {e}")
        if failed:
            raise LaunchError("data preparation failed on Ray:\n" + "\n".join(failed))
    return out


def _one_line(e: BaseException) -> str:
    """An exception in one line: Ray Train's errors run over many (a header, then the worker's traceback)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if len(lines) > 1:
        return f"{type(e).__name__}: {lines[0]} ... {lines[-1]}"[:500]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]


def _wait_error(run: RunSpec, opts: RayOptions, e: BaseException) -> str | None:
    """A named error for a run that never got its workers (Ray Train's start timeouts used up)."""
    text = f"{type(e).__name__}: {e}"
    if not any(k in text for k in ("WorkerGroupStartupTimeout", "startup timed out", "worker group to start")):
        return None
    n, per = workers_of(run, opts)
    want = ", ".join(f"{k} {v:g}" for k, v in per.items())
    try:
        import ray

        free = ", ".join(f"{k} {v:g}" for k, v in ray.available_resources().items() if k in ("CPU", "GPU"))
    except Exception:
        free = "unknown"
    return (
        f"waited {opts.resource_wait_s:.0f} s (--resource-wait) for {n} workers x {{{want}}} to become free "
        f"on the Ray cluster (free now: {free}); not started: rerun when the cluster has room"
    )


class GcsWatch:
    """Whether the cluster is still there, from the driver's side: a TCP probe of the GCS every `every_s`; lost
    after `misses` probes in a row fail (a few seconds: before Ray's own reaction, which is to end the driver
    process once the GCS has been gone for 60 s, or at once when its node's raylet went with the head)."""

    def __init__(self, gcs: str | None, every_s: float = 1.5, misses: int = 3):
        self.gcs, self.every_s, self.misses = gcs, every_s, misses
        self.failed, self.next = 0, time.monotonic() + every_s

    def lost(self) -> bool:
        if self.gcs is None or time.monotonic() < self.next:
            return self.failed >= self.misses
        self.next = time.monotonic() + self.every_s
        self.failed = 0 if probe(self.gcs, timeout_s=min(3.0, self.every_s)) is None else self.failed + 1
        return self.failed >= self.misses


def _run_all(runs: list[RunSpec], one, k: int, lost: threading.Event, watch: GcsWatch) -> dict[str, dict[str, Any]]:
    """one(run) for every run, k at a time, on daemon threads: the main thread only waits (in short joins) and
    watches the cluster, so SIGTERM / Ctrl-C end the driver at once, and so does the loss of the cluster, without
    waiting for fit() calls that would return late or never."""
    todo: queue.Queue = queue.Queue()
    for r in runs:
        todo.put(r)
    out: dict[str, dict[str, Any]] = {}

    def worker() -> None:
        while True:
            try:
                r = todo.get_nowait()
            except queue.Empty:
                return
            rid, res = one(r)
            out[rid] = res

    threads = [threading.Thread(target=worker, name=f"ditscale-run-{i}", daemon=True) for i in range(max(1, k))]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive() and not lost.is_set():
            t.join(0.5)
            if watch.lost():
                log.error("the Ray cluster at %s does not answer any more", watch.gcs)
                lost.set()
    return {r.id: out[r.id] for r in runs if r.id in out}


def train_runs(plan: Plan, todo: list[RunSpec], opts: RayOptions, claims: dict[str, C.Claim]) -> dict[str, dict]:
    """Train the claimed runs; return run id -> {'finished', 'error', metrics...}. Each run's claim ends with it.

    Raises LaunchError before anything starts (unreachable address, a run that can never fit) and
    ClusterLostError (with the results so far) when the cluster goes away."""
    if plan.data is not None:
        check_ready(plan.data)  # before connecting: missing data without its source, conflicts
    gcs = connect(opts.address, opts.connect_timeout_s)
    nodes = cluster_nodes()
    check_capacity(todo, opts, nodes)
    prepare_on_ray(plan)
    os.environ.setdefault(START_TIMEOUT_ENV, str(start_timeout_s(opts)))
    ledger, lost = Ledger(nodes), threading.Event()

    def one(run: RunSpec) -> tuple[str, dict[str, Any]]:
        rid, res = _one(run)
        if not res.get("lost"):
            C.end(claims[rid], finished=bool(res.get("finished")), why=res.get("error"))
        return rid, res

    def _one(run: RunSpec) -> tuple[str, dict[str, Any]]:
        n, per = workers_of(run, opts)
        if lost.is_set() or not ledger.acquire(run.id, [per] * n, lost):
            return run.id, {"finished": False, "error": "not started: the Ray cluster was lost"}
        try:
            if lost.is_set():
                return run.id, {"finished": False, "error": "not started: the Ray cluster was lost"}
            log.info("run %s: training on Ray", run.id)
            C.update(claims[run.id], job=f"ray driver pid {os.getpid()}", started=time.time())
            try:
                result = make_trainer(run, opts).fit()
            except Exception as e:
                if not alive(gcs, settle_s=15.0):
                    lost.set()
                    log.error("run %s: the Ray cluster at %s was lost (%s)", run.id, gcs, type(e).__name__)
                    return run.id, {"finished": False, "error": f"the Ray cluster at {gcs} was lost", "lost": True}
                why = _wait_error(run, opts, e) or _one_line(e)
                log.error("run %s failed: %s", run.id, why)
                return run.id, {"finished": False, "error": why}
            metrics = dict(result.metrics or {})
            err = getattr(result, "error", None)
            if err:
                metrics["error"] = _one_line(err)
            metrics["finished"] = RunDir(run.run_dir).is_done(run.config.train.steps)
            return run.id, metrics
        finally:
            ledger.release(run.id)

    try:
        out = _run_all(todo, one, opts.max_concurrent, lost, GcsWatch(gcs))
    finally:
        if not lost.is_set() and alive(gcs):
            remove_own_actors()
    if lost.is_set():
        hit = [rid for rid, m in out.items() if m.get("lost")] or [r.id for r in todo if r.id in ledger.held]
        during = ", ".join(hit) or "?"
        raise ClusterLostError(
            f"lost the Ray cluster at {gcs} during run(s) {during}; their checkpoints are in the "
            "run dirs: rerun the command once the cluster is back",
            out,
        )
    return out


EXIT_CLUSTER_LOST = 3  # 1: runs did not finish, 2: a user error (nothing started)


class RayBackend(Backend):
    """Run a grid of ditscale trainings on a Ray cluster: each run a Ray Train TorchTrainer.

    Same grid files, claims, skip/resume semantics and status table as the Slurm, local and Kubernetes launchers:
    finished runs (final.json) and runs another launcher claimed are skipped, a run whose workers fail is restarted and
    resumes from its latest checkpoint, and re-running the command trains only what is missing. Works with a local
    cluster (`ray start --head`), an on-premises cluster, or KubeRay on Kubernetes (ray://HOST:10001). The driver
    blocks until the grid is done.

      python launchers/ray_grid.py --address auto --grid configs/grids/celeba32.yaml --workers-per-run 8 --gpus
      python launchers/ray_grid.py --grid configs/grids/celeba32.yaml --status
      python launchers/ray_grid.py --grid configs/grids/celeba32.yaml --collect

    Exit codes: 0 every run finished, 1 some runs did not finish, 2 nothing started (a bad grid, an unreachable
    address, a run that can never fit the cluster), 3 the Ray cluster was lost (the status table is printed).
    """

    name = "ray"
    caps = Capabilities("train", blocking=True, requeue=True, data_as_jobs=False, node_range=True)
    status_help = "show each run's state (run dirs, claims)"

    @classmethod
    def add_arguments(cls, p) -> None:
        p.add_argument(
            "--address",
            default="auto",
            help="Ray cluster: auto (RAY_ADDRESS or the local head), HOST:PORT, or ray://HOST:10001 (default: auto)",
        )
        p.add_argument("--workers-per-run", type=int, help="Ray Train workers per run (default: the grid's tasks)")
        p.add_argument(
            "--min-workers",
            type=int,
            help="start and continue on fewer workers, down to this many (elastic; the trainer takes any world size "
            "whose processes x micro_batch divide the global batch)",
        )
        p.add_argument("--gpus", action="store_true", help="one GPU per worker (NCCL); default: CPU workers (gloo)")
        p.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker (default: the grid's)")
        p.add_argument("--max-concurrent", type=int, default=1, help="runs trained at the same time (default: 1)")
        p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts per run (default: 3)")
        p.add_argument("--storage", help="Ray Train bookkeeping and file_sd targets (default: <runs parent>/_ray)")
        p.add_argument(
            "--connect-timeout",
            type=float,
            default=30,
            metavar="SECONDS",
            help="give up on an --address that does not answer after this long (30)",
        )
        p.add_argument(
            "--resource-wait",
            type=float,
            default=600,
            metavar="SECONDS",
            help="how long a run that fits the cluster may wait for busy resources before it fails (600)",
        )

    @classmethod
    def from_args(cls, args, plan: Plan) -> RayBackend:
        import signal
        import sys

        # SIGTERM ends the driver at once, through its clean-up (Ray's exit hooks, this driver's leftover actors)
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        base = results_dir(plan.runs, plan.name)
        b = cls(
            RayOptions(
                address=None if args.address in ("", "local") else args.address,
                workers_per_run=args.workers_per_run,
                min_workers=args.min_workers,
                use_gpu=args.gpus,
                cpus_per_worker=args.cpus_per_worker,
                max_concurrent=args.max_concurrent,
                max_failures=args.max_failures,
                storage=Path(args.storage or base / "_ray"),
                connect_timeout_s=args.connect_timeout,
                resource_wait_s=args.resource_wait,
            )
        )
        b.log_dir_ = Path(args.log_dir or base / "_ray").absolute()
        return b

    @property
    def log_dir(self) -> Path | None:
        return getattr(self, "log_dir_", None)

    def check(self, plan: Plan, todo: list[RunSpec], dry_run: bool) -> list[str]:
        if not dry_run:
            return []  # checked in start(), once connected
        try:
            connect(self.opts.address, self.opts.connect_timeout_s)
            check_capacity(todo, self.opts, cluster_nodes())
        except LaunchError as e:
            if "can never fit" in str(e):
                raise
            print(f"(capacity not checked: {e})")
        return []

    def describe_run(self, r: RunSpec) -> str:
        w = worker_range(r, self.opts)
        return f"workers={w if isinstance(w, int) else f'{w[0]}-{w[1]}'} gpu={self.opts.use_gpu}"

    def data_how(self, plan: Plan) -> dict[str, str]:
        return {s.name: "Ray task before the runs" + (", after build" if s.needs else "") for s in plan.data.todo}

    def details(self, plan: Plan, todo: list[RunSpec]) -> list[str]:
        return [f"\n{len(todo)} to train on Ray ({self.opts.address or 'local'})"]

    def start(self, plan: Plan, todo: list[RunSpec], claims: dict[str, C.Claim]) -> dict[str, Any]:
        try:
            return train_runs(plan, todo, self.opts, claims)
        except ClusterLostError as e:
            print(status(self, plan), flush=True)
            print(f"error: {e}", flush=True, file=__import__("sys").stderr)
            os._exit(EXIT_CLUSTER_LOST)  # nothing more to say to a dead cluster (Ray's exit hooks would wait on it)
        except BaseException:
            for cl in claims.values():  # nothing trained: the runs are free again
                if not cl.ended:
                    C.end(cl, why="the driver stopped")
            raise

    def finish(self, plan: Plan, result: dict) -> int:
        import sys

        print(status(self, plan))
        failed = [rid for rid, m in result.items() if not m.get("finished")]
        if failed:
            errors = "".join(f"\n  {rid}: {result[rid]['error']}" for rid in failed if result[rid].get("error"))
            print(f"error: {len(failed)} run(s) did not finish: {', '.join(failed)}{errors}", file=sys.stderr)
            return 1
        return 0

    def views(self, runs: list[RunSpec], claims: dict[str, C.Claim | None]) -> dict[str, View]:
        out = {}
        for r in runs:
            cl = claims.get(r.id)
            if cl is None or cl.data.get("backend") != "ray":
                continue
            d = cl.data
            if d.get("ended"):
                out[r.id] = View("ended on Ray", why=d.get("why"), failed=bool(d.get("why")) and not d.get("finished"))
            elif C.process_alive(d) is False:
                out[r.id] = View(f"driver pid {d.get('pid')} gone")
            else:
                out[r.id] = View(d.get("job") or "claimed by a Ray driver", live=True, running=bool(d.get("job")),
                                 started=d.get("started"))  # fmt: skip
        return out
