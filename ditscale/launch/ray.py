"""Ray launcher: each run of a grid is a Ray Train TorchTrainer with the run's number of workers.

Ray Train starts the workers, sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT and the torch
process group (gloo on CPU, nccl on GPUs); each worker calls ditscale.train.run_training(cfg), which finds the
distributed state through ditscale.distenv and resumes from the run's latest checkpoint. Finished runs
(final.json) and runs that already have a writer (ditscale.launch.guard) are skipped; a failed worker group is
restarted up to max_failures times and resumes from the run dir. Works against a local cluster (`ray start
--head`), an on-premises one, or KubeRay (ray://HOST:10001).

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
- SIGTERM to a worker: the worker's actor thread forwards it to the trainer (ditscale.train.stop.request), which
  checkpoints at the end of its step; the worker then fails on purpose and Ray Train restarts the group, which
  resumes from that checkpoint;
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditscale.errors import LaunchError
from ditscale.grid import RunSpec
from ditscale.io.rundir import RunDir
from ditscale.launch import guard
from ditscale.launch.common import Plan

log = logging.getLogger("ditscale.launch")
TARGETS = "targets"
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train V2: one attempt to place the workers


@dataclass
class RayOptions:
    address: str | None = "auto"
    workers_per_run: int | None = None  # default: the run's nodes x tasks per node
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
    """(workers, resources per worker) of a run."""
    cpus = opts.cpus_per_worker if opts.cpus_per_worker is not None else run.resources.get("cpus_per_task", 1)
    per = {"CPU": float(cpus)}
    if opts.use_gpu:
        per["GPU"] = 1.0
    return int(opts.workers_per_run or run.num_tasks), per


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
    """A worker was stopped by SIGTERM: it checkpointed; Ray Train restarts the group, which resumes."""


_SIGTERM = threading.Event()  # set in a Ray worker process when it receives SIGTERM


def _forward_sigterm() -> None:
    """Runs on the worker actor's main thread (the only one that may install signal handlers)."""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: _SIGTERM.set())


def _install_sigterm_forwarding() -> Callable[[], None]:
    """SIGTERM to this worker -> ditscale.train.stop.request, repeated until the trainer has seen it (a request
    made while the trainer starts would be reset by its start). Returns the function that ends the forwarding."""
    import ray

    from ditscale.train import stop

    done = threading.Event()
    try:
        actor = ray.get_runtime_context().current_actor
        ray.get(actor.execute.remote(_forward_sigterm), timeout=30)
    except Exception as e:
        log.warning("SIGTERM is not forwarded to the trainer: %s: %s", type(e).__name__, e)
        return done.set

    def forward() -> None:
        while not done.is_set():
            if _SIGTERM.wait(0.5) and stop.requested() is None:
                stop.request("SIGTERM")

    threading.Thread(target=forward, name="ditscale-sigterm", daemon=True).start()
    return done.set


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train per-worker function: run the trainer on this rank, then report (every rank reports)."""
    import ray.train

    from ditscale.config import config_from_dict
    from ditscale.train import run_training

    run_id = loop_config["run_id"]
    cfg = config_from_dict(loop_config["config"], origin=f"(run {run_id!r})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("DITSCALE_METRICS_HOST", ray.util.get_node_ip_address())  # file_sd: this node's address
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    rundir = RunDir(cfg.run.dir)
    tag = rundir.latest_tag()
    what = f"resuming from checkpoint {tag}" if tag else "starting"
    log.info("run %s: %s (rank %d of %d)", run_id, what, rank, ctx.get_world_size())
    end_forwarding = _install_sigterm_forwarding()
    try:
        metrics = run_training(cfg)
    finally:
        end_forwarding()
    finished = rundir.is_done(cfg.train.steps)
    if not finished and _SIGTERM.is_set():
        where = f"at step {metrics.get('step')} (checkpoint {rundir.latest_tag()})"
        raise WorkerStopped(f"run {run_id}: rank {rank} stopped by SIGTERM {where}; the restarted group resumes")
    report = {"finished": finished}
    if rank == 0:
        report.update(_scalar_metrics(metrics))
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

    workers, per = workers_of(run, opts)
    failure = FailureConfig(max_failures=opts.max_failures)
    if hasattr(failure, "controller_failure_limit"):  # Ray Train V2: bound the wait for resources
        failure.controller_failure_limit = max(0, math.ceil(opts.resource_wait_s / start_timeout_s(opts)) - 1)
    return TorchTrainer(
        train_worker,
        train_loop_config={"run_id": run.id, "config": run_config(run, opts)},
        scaling_config=ScalingConfig(  # use_gpu adds the GPU of each worker
            num_workers=workers, use_gpu=opts.use_gpu, resources_per_worker={"CPU": per["CPU"]}
        ),
        torch_config=TorchConfig(backend="nccl" if opts.use_gpu else "gloo"),
        run_config=RunConfig(name=run.id, storage_path=str(Path(opts.storage).absolute()), failure_config=failure),
    )


def format_plan(plan: Plan, opts: RayOptions, busy: dict[str, str] | None = None) -> str:
    busy = busy or {}
    todo = [r for r in plan.todo if r.id not in busy]
    lines = [f"{plan.header()}, {len(busy)} already running, {len(todo)} to train on Ray ({opts.address or 'local'})"]
    if plan.data is not None:
        from ditscale.launch.prepare import format_data_plan

        how = {s.name: "Ray task before the runs" + (", after build" if s.needs else "") for s in plan.data.todo}
        lines += ["", format_data_plan(plan.data, how), ""]
    for r in plan.runs:
        workers = opts.workers_per_run or r.num_tasks
        what = "done" if r in plan.done else (f"skip: {busy[r.id]}" if r.id in busy else "train")
        lines.append(f"  {r.id:<40} {what:<6} workers={workers} gpu={opts.use_gpu}  {r.run_dir}")
    return "\n".join(lines)


def prepare_on_ray(plan: Plan) -> dict[str, str]:
    """Run the grid's missing data steps as Ray tasks before any run starts: the build, then the subsets side by
    side; each through ditscale.launch.prepare.run_step (its `python -m ditscale data ...` command, under the data
    folder's lease, skipped once its output verifies). Step name -> 'built' or 'ready'."""
    dp = plan.data
    if dp is None or not dp.todo:
        return {}
    import ray

    from ditscale.launch.prepare import run_step

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


def _busy(runs: list[RunSpec]) -> dict[str, str]:
    """Runs with a writer already: a live trainer, or a queued/running Slurm job (when Slurm is here)."""
    import shutil

    live = None
    if shutil.which("squeue"):
        from ditscale.launch import slurm_jobs as slurm

        try:
            live = {j: s for j, s in slurm.squeue_states().items() if s in slurm.LIVE_STATES}
        except LaunchError:
            live = None
    return guard.busy(runs, live)


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


def run_grid(plan: Plan, opts: RayOptions, *, dry_run: bool = False) -> dict[str, dict[str, Any]]:
    """Train every unfinished run of the plan; return run id -> {'finished', 'error', metrics...}.

    Raises LaunchError before anything starts (unreachable address, a run that can never fit) and
    ClusterLostError (with the results so far) when the cluster goes away."""
    if dry_run:
        busy = _busy(plan.todo)
        try:
            connect(opts.address, opts.connect_timeout_s)
            check_capacity([r for r in plan.todo if r.id not in busy], opts, cluster_nodes())
        except LaunchError as e:
            if "can never fit" in str(e):
                raise
            print(f"(capacity not checked: {e})")
        print(format_plan(plan, opts, busy))
        print("\ndry run: nothing started")
        return {}
    for r in plan.done:
        log.info("skip %s: finished", r.id)
    busy = _busy(plan.todo)
    for rid, why in busy.items():
        print(f"skip {rid}: {why}", flush=True)
    todo = [r for r in plan.todo if r.id not in busy]
    if not todo:
        print(f"grid {plan.name!r}: nothing to train ({len(plan.done)} finished, {len(busy)} running elsewhere)")
        return {}
    if plan.data is not None:
        from ditscale.launch.prepare import check_ready

        check_ready(plan.data)  # before connecting: missing data without its source, conflicts
    gcs = connect(opts.address, opts.connect_timeout_s)
    nodes = cluster_nodes()
    check_capacity(todo, opts, nodes)
    prepare_on_ray(plan)
    os.environ.setdefault(START_TIMEOUT_ENV, str(start_timeout_s(opts)))
    ledger, lost = Ledger(nodes), threading.Event()

    def one(run: RunSpec) -> tuple[str, dict[str, Any]]:
        n, per = workers_of(run, opts)
        if lost.is_set() or not ledger.acquire(run.id, [per] * n, lost):
            return run.id, {"finished": False, "error": "not started: the Ray cluster was lost"}
        try:
            if lost.is_set():
                return run.id, {"finished": False, "error": "not started: the Ray cluster was lost"}
            log.info("run %s: training on Ray", run.id)
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
