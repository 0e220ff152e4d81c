"""Ray launcher: each run of a grid is a Ray Train TorchTrainer with the run's number of workers.

Ray Train starts the workers, sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT and the torch
process group (gloo on CPU, nccl on GPUs); each worker calls ditscale.train.run_training(cfg), which finds the
distributed state through ditscale.distenv and resumes from the run's latest checkpoint. Finished runs
(final.json) are skipped; a failed worker group is restarted up to max_failures times and resumes from the
run dir. Works against a local cluster (`ray start --head`), an on-premises one, or KubeRay (ray://HOST:10001).
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditscale.errors import LaunchError
from ditscale.grid import RunSpec
from ditscale.io.rundir import RunDir
from ditscale.launch.common import Plan

log = logging.getLogger("ditscale.launch")


@dataclass
class RayOptions:
    address: str | None = "auto"
    workers_per_run: int | None = None  # default: the run's nodes x tasks per node
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # default: the run's cpus_per_task
    max_concurrent: int = 1  # runs trained at the same time
    max_failures: int = 3  # worker-group restarts per run (each resumes from the run dir)
    storage: Path = Path("ray_results")  # Ray Train's own bookkeeping (our checkpoints live in the run dir)


def _scalar_metrics(metrics: Any) -> dict[str, float | int | str | bool]:
    if not isinstance(metrics, dict):
        return {}
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool | int | str) or (isinstance(v, float) and math.isfinite(v)):
            out[str(k)] = v
    return out


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train per-worker function: run the trainer on this rank, then report (every rank reports)."""
    import ray.train

    from ditscale.config import config_from_dict
    from ditscale.train import run_training

    run_id = loop_config["run_id"]
    cfg = config_from_dict(loop_config["config"], origin=f"(run {run_id!r})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx = ray.train.get_context()
    rundir = RunDir(cfg.run.dir)
    tag = rundir.latest_tag()
    what = f"resuming from checkpoint {tag}" if tag else "starting"
    log.info("run %s: %s (rank %d of %d)", run_id, what, ctx.get_world_rank(), ctx.get_world_size())
    metrics = run_training(cfg)
    report = {"finished": rundir.is_done(cfg.train.steps)}
    if ctx.get_world_rank() == 0:
        report.update(_scalar_metrics(metrics))
    ray.train.report(report)


def make_trainer(run: RunSpec, opts: RayOptions):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    workers = opts.workers_per_run or run.num_tasks
    cpus = opts.cpus_per_worker if opts.cpus_per_worker is not None else run.resources.get("cpus_per_task", 1)
    return TorchTrainer(
        train_worker,
        train_loop_config={"run_id": run.id, "config": run.config_dict()},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=opts.use_gpu, resources_per_worker={"CPU": cpus}),
        torch_config=TorchConfig(backend="nccl" if opts.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run.id,
            storage_path=str(Path(opts.storage).absolute()),
            failure_config=FailureConfig(max_failures=opts.max_failures),
        ),
    )


def connect(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    except ConnectionError as e:
        raise LaunchError(f"--address {address!r}: cannot connect to a Ray cluster: {e}") from None


def format_plan(plan: Plan, opts: RayOptions) -> str:
    lines = [f"{plan.header()}, {len(plan.todo)} to train on Ray ({opts.address or 'local'})"]
    if plan.data is not None:
        from ditscale.launch.prepare import format_data_plan

        how = {s.name: "Ray task before the runs" + (", after build" if s.needs else "") for s in plan.data.todo}
        lines += ["", format_data_plan(plan.data, how), ""]
    for r in plan.runs:
        workers = opts.workers_per_run or r.num_tasks
        what = "done" if r in plan.done else "train"
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
            except Exception as e:  # noqa: BLE001 - a task's error arrives wrapped; name the step
                failed.append(f"  {name}: {type(e).__name__}: {e}")
        if failed:
            raise LaunchError("data preparation failed on Ray:\n" + "\n".join(failed))
    return out


def run_grid(plan: Plan, opts: RayOptions, *, dry_run: bool = False) -> dict[str, dict[str, Any]]:
    """Train every unfinished run of the plan; return run id -> {'finished', 'error', metrics...}."""
    if dry_run:
        print(format_plan(plan, opts))
        print("\ndry run: nothing started")
        return {}
    for r in plan.done:
        log.info("skip %s: finished", r.id)
    if not plan.todo:
        print(f"grid {plan.name!r}: nothing to train ({len(plan.done)} finished)")
        return {}
    if plan.data is not None:
        from ditscale.launch.prepare import check_ready

        check_ready(plan.data)  # before connecting: missing data without its source, conflicts
    connect(opts.address)
    prepare_on_ray(plan)

    def one(run: RunSpec) -> tuple[str, dict[str, Any]]:
        log.info("run %s: training on Ray", run.id)
        try:
            result = make_trainer(run, opts).fit()
        except Exception as e:  # noqa: BLE001 - one failed run must not stop the grid
            log.error("run %s failed: %s: %s", run.id, type(e).__name__, e)
            return run.id, {"finished": False, "error": f"{type(e).__name__}: {e}"}
        metrics = dict(result.metrics or {})
        err = getattr(result, "error", None)
        if err:
            metrics["error"] = f"{type(err).__name__}: {err}"
        metrics["finished"] = RunDir(run.run_dir).is_done(run.config.train.steps)
        return run.id, metrics

    if opts.max_concurrent > 1:
        with ThreadPoolExecutor(max_workers=opts.max_concurrent) as pool:
            out = dict(pool.map(one, plan.todo))
    else:
        out = dict(one(r) for r in plan.todo)
    return out
