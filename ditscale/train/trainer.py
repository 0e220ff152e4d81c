"""The Trainer: parts built from the config's sections, and the loop that calls them.

Read `Trainer.train()` top to bottom: each iteration takes this rank's micro-batches for one step, asks every rank
whether to go on (`stop.poll`), runs `train_step()`, then lets each part act if its time has come (log, sample
grid, checkpoint). Each part is built from its own section and owns its timing and state:
    model, diffusion, loader     cfg.model.build(), cfg.diffusion.build(learn_sigma), cfg.data.loader(...)
    engine, ema                  cfg.train.engine(model, cfg.optim, world) (DeepSpeed ZeRO), the fp32 EMA copy
    checkpointer                 save every checkpoint.every steps, keep, resume (train/checkpoint.py)
    log                          the logging window and the loggers (train/loggers.py)
    samples                      sample grids (train/sampling.py)
    stop                         signals, launcher death, the per-step agreement of ranks (train/stop.py)
    nonfinite                    NaN/inf loss or gradient norm: stop (diverged) or skip (train/nonfinite.py)
    lease                        the run dir's lease, held by rank 0: the fence of every write (io/lock.py)

Exact resume on any world size: the sample order and each sample's timestep, noise, label drop and flip come
from the seed and the sample's global position (data/stream.py, train/step.py), and a checkpoint holds full
per-parameter state (train/state.py), so a run resumed on any number of processes at any ZeRO stage continues
with the losses of the uninterrupted run (exactly on CPU at the same world size; to float reduction otherwise).
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch

from ditscale import distenv
from ditscale.config import Config, config_changes, dump_config, fixed_changes, format_changes
from ditscale.data import missing_shards, read_manifest
from ditscale.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DitscaleError,
    DivergedError,
    LeaseLostError,
    RunLockedError,
)
from ditscale.io.rundir import RunDir
from ditscale.model import check_variant_windows
from ditscale.train import engine as eng
from ditscale.train import stop as stopping
from ditscale.train.checkpoint import Checkpointer
from ditscale.train.ema import EMA
from ditscale.train.loggers import RunValues
from ditscale.train.nonfinite import NonFinite
from ditscale.train.sampling import SampleGrids
from ditscale.train.step import diffusion_loss, model_fn, sample_randomness

log = logging.getLogger("ditscale.train")


# --- checks that must fail before anything heavy starts ---------------------------------------------------------
def validate(cfg: Config, world_size: int) -> dict:
    """Config checks that need the model registry or the data: the manifest, and every shard it names exists
    (one listing, not downloads). Returns the manifest."""

    m = cfg.model
    check_variant_windows(m.variant, m.windows)
    try:  # builds the module on the meta device (no memory): input size against patch size, strict_windows
        with torch.device("meta"):
            m.build()
    except DitscaleError:
        raise
    except Exception as e:  # a model that cannot be built on the meta device is validated later, for real
        log.debug("meta-device model check skipped: %s", e)
    eng.grad_accumulation(cfg.train, world_size)
    if not cfg.data.train:
        raise ConfigError("data.train: a manifest.json URL of the training shards is required")
    manifest = read_manifest(cfg.data.train)
    kind = manifest.get("kind", "pixels")
    if kind != cfg.data.kind:
        raise ConfigError(f"data.kind={cfg.data.kind!r} but {cfg.data.train} holds {kind!r}")
    if manifest.get("channels") not in (None, m.in_channels):
        raise ConfigError(f"model.in_channels={m.in_channels} but {cfg.data.train} has {manifest['channels']} channels")
    size = manifest.get("resolution")  # pixels: image side; latents: latent side
    if size is not None and size != m.input_size:
        raise ConfigError(f"model.input_size={m.input_size} but {cfg.data.train} has size {size}")
    if manifest.get("num_classes", 0) > m.num_classes:
        raise ConfigError(
            f"model.num_classes={m.num_classes} but {cfg.data.train} has {manifest['num_classes']} classes"
        )
    gone = missing_shards(manifest)
    if gone:
        more = f" and {len(gone) - 3} more" if len(gone) > 3 else ""
        raise DataError(
            f"data.train {cfg.data.train}: {len(gone)} of {len(manifest['shards'])} shards are missing: "
            f"{', '.join(gone[:3])}{more}"
        )
    return manifest


# --- entry point ------------------------------------------------------------------------------------------------
def run_training(cfg: Config, allow_config_change: bool = False) -> dict:
    """Train (or resume) the run of `cfg`; the final metrics (final.json), or the interrupted run's summary."""
    import torch.distributed as dist

    denv = distenv.detect()
    eng.setup_process_env(denv)
    rundir = RunDir(cfg.run.dir)
    if rundir.is_done(cfg.train.steps):
        done = rundir.final()
        if denv.is_main:
            log.info("run %s already finished at step %d (final.json); nothing to do", rundir, done["step"])
        return done
    manifest = validate(cfg, denv.world_size)
    owned = not dist.is_initialized()  # a launcher (Ray Train) may have joined the process group already
    device = eng.init_distributed(denv)
    trainer, ok = None, False
    try:
        trainer = Trainer(cfg, denv, device, rundir, manifest, allow_config_change=allow_config_change)
        result = trainer.train()
        ok = True
        return result
    finally:
        if trainer is not None:
            trainer.close()
        eng.shutdown(ok, destroy=owned)


def run_conversion(cfg: Config) -> str:
    """Rewrite the newest checkpoint of an older ditscale's layout (format 1) as format 2, in place. Run it on
    the world size and ZeRO stage that wrote it (`python -m ditscale checkpoint convert` starts those
    processes on this machine). The tag of the rewritten checkpoint."""
    denv = distenv.detect()
    eng.setup_process_env(denv)
    rundir = RunDir(cfg.run.dir)
    manifest = validate(cfg, denv.world_size)
    device = eng.init_distributed(denv)
    trainer, ok = None, False
    try:
        trainer = Trainer(cfg, denv, device, rundir, manifest, event="converted")
        if trainer.step == 0:
            raise CheckpointError(f"run {rundir}: no checkpoint to convert")
        tag = trainer.checkpointer.save(trainer.step, trainer.loader.state_dict(), fence_ok=trainer._fence_ok)
        ok = True
        return tag
    finally:
        if trainer is not None:
            trainer.close()
        eng.shutdown(ok)


def _labels(cfg: Config, manifest: dict, rank: int) -> dict[str, str]:
    """The labels of every series this rank exports: run_id tells runs apart (one per run dir), run names them."""
    return {
        "run_id": RunDir(cfg.run.dir).run_id,
        "run": cfg.run.name,
        "variant": cfg.model.variant,
        "windows": cfg.model.windows,
        "data_size": str(manifest.get("num_samples", "")),
        "rank": str(rank),
    }


def _run_info(cfg: Config, manifest: dict) -> dict[str, str]:
    """ditscale_run_info's extra labels: dataset = the shards' source and image side (celeba32), seed."""
    source = manifest.get("source") or ""
    side = manifest.get("image_resolution", manifest.get("resolution"))
    return {"dataset": f"{source}{side}" if source and side else source, "seed": str(cfg.run.seed)}


def _test_hook(name: str) -> set[int]:
    """Tests only: steps at which to act (DITSCALE_TEST_<NAME>=3,5)."""
    raw = os.environ.get(f"DITSCALE_TEST_{name}", "")
    return {int(s) for s in raw.split(",") if s.strip()}


class _optimizer_step_skipped:
    """The engine steps (its counters, the accumulation boundary, zeroed gradients) but the optimizer does not."""

    def __init__(self, optimizer):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)

    def __enter__(self):
        self.step = self.optimizer.step
        self.optimizer.step = lambda *a, **k: None

    def __exit__(self, *exc):
        self.optimizer.step = self.step


class Trainer:
    def __init__(
        self,
        cfg: Config,
        denv: distenv.DistEnv,
        device: torch.device,
        rundir: RunDir,
        manifest: dict,
        allow_config_change: bool = False,
        event: str | None = None,
    ):
        self.cfg, self.denv, self.device, self.rundir = cfg, denv, device, rundir
        self.event = event  # what the history calls this start, when not created/resumed/changed
        self.lease = None
        self.stop = stopping.StopSignal(denv.world_size, on_exit=self._release_lease)
        self.start = self._claim_run_dir(allow_config_change)
        try:
            self._build_parts(manifest)
            self._record_start()
        except BaseException:
            self.close()  # never keep the lease of a trainer that could not start
            raise

    def _build_parts(self, manifest: dict) -> None:
        cfg, denv, device, rundir = self.cfg, self.denv, self.device, self.rundir
        world, t = denv.world_size, cfg.train
        self.precision = eng.resolve_precision(t.precision)
        eng.set_tf32(t.tf32)
        self.accum = eng.grad_accumulation(t, world)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank; the EMA starts as a copy
        model = cfg.model.build().to(device)
        self.ema = EMA(model, t.ema_decay, device=device)
        if t.activation_checkpointing:
            eng.apply_activation_checkpointing(model)
        self.engine, self.optimizer, self.scheduler = t.engine(model, cfg.optim, world)
        self.model_fn = model_fn(self.engine, self.precision, device)
        self.diffusion = cfg.diffusion.build(cfg.model.learn_sigma)
        self.loader = cfg.data.loader(
            micro_batch=t.micro_batch, global_batch=t.global_batch, rank=denv.rank, world_size=world, seed=cfg.run.seed
        )
        self.nonfinite = NonFinite(t.nonfinite, t.max_skipped_steps, device, world)
        meta = {"zero_stage": t.zero_stage, "precision": self.precision, "config": cfg.model_dump(mode="json")}
        self.checkpointer = Checkpointer(
            rundir,
            denv,
            every=cfg.checkpoint.every,
            keep=cfg.checkpoint.keep,
            last_step=t.steps,
            engine=self.engine,
            ema=self.ema,
            loader=self.loader,
            scheduler=self.scheduler,
            lr_factor=cfg.optim.lr_factor,
            meta=meta,
            agree=self._all_ok,
            gen=self.gen,
        )
        self.step = self.checkpointer.resume()
        if os.environ.get("DITSCALE_TEST_DUMP_STATE") and self.step:  # tests only: the state as resumed
            self._dump_state(os.environ["DITSCALE_TEST_DUMP_STATE"])
        if denv.is_main:
            log.info(
                "%s: %s %s, %d processes, ZeRO-%d, %s, global batch %d (micro %d x accum %d), %s at step %d",
                cfg.run.name,
                cfg.model.variant,
                cfg.model.windows,
                world,
                t.zero_stage,
                self.precision,
                t.global_batch,
                t.micro_batch,
                self.accum,
                "resumed" if self.step else "starting",
                self.step,
            )

        labels, info = _labels(cfg, manifest, denv.rank), _run_info(cfg, manifest)
        run = RunValues(cfg.run.name, t.steps, t.global_batch, cfg.model_dump(mode="json"))
        self.log = cfg.log.build(run, denv, rundir, device, labels, self.step, info=info, tokens={"gen": self.gen})
        self.samples = SampleGrids(cfg, rundir, enabled=denv.is_main)
        self.delay = float(os.environ.get("DITSCALE_TEST_STEP_DELAY", "0"))  # tests only: time to scrape or signal
        points = ("step", "log", "sample", "checkpoint", "publish")
        self.pause_at = {k: _test_hook(f"PAUSE_{k.upper()}") for k in points}
        self.nan_at = _test_hook("NONFINITE_AT")
        self.record_to = os.environ.get("DITSCALE_TEST_RECORD_SAMPLES", "")

    # --- the run dir: one writer, no silent config drift -------------------------------------------------------
    def _claim_run_dir(self, allow_config_change: bool) -> dict:
        """Rank 0 takes the run dir's lease, attaches it as the fence of every write, and decides what this
        start does to the run's config (nothing is written yet: a refused start leaves the run dir as it was).
        Every rank gets the outcome and the lease generation (the fencing token)."""
        import torch.distributed as dist

        cfg, rundir = self.cfg, self.rundir
        error, start, gen = None, None, None
        if self.denv.is_main:
            try:
                self.lease = rundir.lease(cfg.run.lease_seconds).acquire()
                rundir.attach(self.lease)
                gen = self.lease.gen
                start = self._config_decision(allow_config_change)
                rundir.clean_leftovers()
            except DitscaleError as e:
                error = (type(e).__name__, str(e))
        box = [error, start, gen]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            self._release_lease()
            kind, msg = box[0]
            raise {"RunLockedError": RunLockedError, "DivergedError": DivergedError}.get(kind, ConfigError)(msg)
        self.gen = box[2]
        if rundir.remote and self.denv.local_rank == 0 and not self.denv.is_main:
            import shutil

            shutil.rmtree(rundir.staging_dir(), ignore_errors=True)  # this node's leftovers of a dead writer
        dist.barrier()
        return box[1]

    def _config_decision(self, allow: bool) -> dict:
        """What this start records (event, changes), or a ConfigError / DivergedError that refuses it."""
        rundir, cfg = self.rundir, self.cfg
        saved = rundir.saved_config()
        new = cfg.model_dump(mode="json")
        if saved is None:
            return {"event": "created", "changes": {}}
        trained, free = config_changes(saved, new)
        fixed = fixed_changes(trained)
        if fixed:
            raise ConfigError(
                f"run dir {rundir}: {format_changes(fixed)} cannot change on resume (the checkpoint's parameters "
                "have other shapes), not even with --allow-config-change: start a new run dir"
            )
        if trained and not allow:
            raise ConfigError(
                f"run dir {rundir} was trained with a different config; resuming would mislabel it. Changed: "
                f"{format_changes(trained)}. Start a new run dir, or pass --allow-config-change to continue with "
                "the new values (applied from the next step, recorded in config_history.jsonl with that step)"
            )
        final = rundir.read_json("final.json")
        if isinstance(final, dict) and final.get("diverged") and not trained:
            raise DivergedError(
                f"run dir {rundir} diverged at step {final.get('step')} ({final.get('error')}); resuming with the "
                "same config would diverge again. Change what caused it (e.g. optim.lr) with --allow-config-change "
                "to resume from the checkpoint before that step"
            )
        if trained:
            log.warning("resuming %s with a changed config: %s", rundir, format_changes(trained))
        return {"event": "changed" if trained else "resumed", "changes": {**trained, **free}}

    def _record_start(self) -> None:
        """Written only once this start has resumed: config.yaml, and the history line with where it runs."""
        if not self.denv.is_main:
            return
        d = self.denv
        where = {
            "world_size": d.world_size,
            "nodes": math.ceil(d.world_size / max(d.local_world_size, 1)),
            "zero_stage": self.cfg.train.zero_stage,
            "gen": self.gen,
        }
        ev = self.start
        event = self.event or ev["event"]
        self.rundir.record_config(dump_config(self.cfg), self.step, ev["changes"], event, **where)
        if ev["event"] != "created":
            final = self.rundir.read_json("final.json")
            if isinstance(final, dict) and final.get("diverged"):
                self.rundir.remove("final.json")  # resumed past a divergence with a changed config

    def _release_lease(self) -> None:
        if self.lease is not None:
            self.lease.release()

    def _all_ok(self, ok: bool) -> bool:
        return not self.stop.poll(data_error=not ok).data_error

    def _lease_doubt(self) -> bool:
        """Rank 0's lease can no longer be proven (every rank hears it through stop.poll)."""
        return self.lease is not None and not self.lease.provable()

    def _dump_state(self, path: str) -> None:
        """Tests only: every parameter's full state right after the resume (collective), as safetensors."""
        from safetensors.torch import save_file

        out = {f"{k}/{n}": v for n, full in self.checkpointer.state.tensors() for k, v in full.items()}
        if self.denv.is_main:
            out["optimizer/steps"] = torch.tensor([self.checkpointer.state.optimizer_steps()])
            save_file(out, path)

    def _record(self, batches: list) -> None:
        """Tests only: the global element ids and dataset indices this rank trains on at the next step."""
        import json

        ids = [i for _, _, b in batches for i in b.tolist()]
        with open(f"{self.record_to}.rank{self.denv.rank}", "a") as f:
            f.write(json.dumps({"step": self.step + 1, "ids": ids, "indices": self.recorded}) + "\n")

    def _pause(self, point: str) -> None:
        """Tests only: stop this process (SIGSTOP) at a named point of a step, to test a paused holder."""
        if self.step in self.pause_at.get(point, ()) and self.denv.is_main:
            import signal

            self.pause_at[point].discard(self.step)
            log.warning("test hook: pausing at %s of step %d", point, self.step)
            os.kill(os.getpid(), signal.SIGSTOP)

    # --- the loop -----------------------------------------------------------------------------------------------
    def train(self) -> dict:
        steps = self.cfg.train.steps
        data = iter(self.loader)
        self.stop.install()
        while self.step < steps:
            data_state = self.loader.state_dict()  # the position after the last finished step
            t0 = time.perf_counter()
            batches, error = self._next_batches(data)
            wait = time.perf_counter() - t0
            verdict = self.stop.poll(data_error=error is not None, lock_lost=self._lease_doubt())
            if verdict.any:
                return self._end_early(verdict, error, data_state)
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler steps inside)
            self._pause("step")
            loss, applied = self.train_step(batches)
            self.step += 1
            if not self._judge(loss, applied):
                loss = None  # a skipped step: not in the logged loss
            if self._due_out(self.step):
                self._check_finite()
            self._pause("log")
            self.log.after_step(self.step, loss, time.perf_counter() - t0, wait, lr, self.engine, self.loader)
            self._pause("sample")
            path = self.samples.maybe_sample(self.step, self.ema.model)
            if path is not None:
                self.log.image(self.step, "samples", path)
            self._maybe_checkpoint(self.step)
            if self.delay:
                time.sleep(self.delay)
        return self._finish()

    def _next_batches(self, data) -> tuple[list, BaseException | None]:
        """This rank's `accum` micro-batches of the next step, each (x, y, element ids). An error is returned, not
        raised: the other ranks must hear of it (stop.poll) before anyone leaves, or they would wait in a
        collective forever."""
        batches = []
        self.recorded = []
        try:
            for _ in range(self.accum):
                x, y = next(data)
                batches.append((x, y, self.loader.last_ids))
                self.recorded += self.loader.last_indices.tolist() if self.record_to else []
        except Exception as e:
            log.error("rank %d: reading the next batch failed: %s: %s", self.denv.rank, type(e).__name__, e)
            return batches, e
        if self.record_to:
            self._record(batches)
        return batches, None

    def train_step(self, batches: list) -> tuple[torch.Tensor, bool]:
        """One optimizer step: forward/backward of each micro-batch, DeepSpeed steps at the boundary, EMA.
        Returns the step's mean loss as a device tensor (no host sync) and whether the update was applied."""
        cfg, total = self.cfg, None
        drop_prob = cfg.model.class_dropout_prob
        zero0 = cfg.train.zero_stage == 0 and cfg.train.nonfinite == "skip"
        dropped = False
        for i, (x, y, ids) in enumerate(batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            t, drop, noise = sample_randomness(
                ids, cfg.run.seed, tuple(x.shape[1:]), self.diffusion.num_timesteps, drop_prob, self.device
            )
            loss = diffusion_loss(self.model_fn, self.diffusion, x, y, t=t, noise=noise, drop=drop)
            if self.step + 1 in self.nan_at and i == 0:  # tests only: a non-finite loss at this step
                loss = loss * float("nan")
            self.engine.backward(loss)
            if zero0 and i == len(batches) - 1:
                dropped = self._nonfinite_grads()
            if dropped:
                with _optimizer_step_skipped(self.optimizer):
                    self.engine.step()
            else:
                self.engine.step()
            total = loss.detach() if total is None else total + loss.detach()
        applied = not dropped and self.engine.was_step_applied()
        if applied:
            self.ema.update(self.engine.module, zero3=cfg.train.zero_stage == 3)
        return total / len(batches), applied

    def _nonfinite_grads(self) -> bool:
        """ZeRO-0 in skip mode has no DeepSpeed overflow check: whether any rank's gradients are not finite (then
        the engine steps without the optimizer's update). Collective; reads back one flag."""
        import torch.distributed as dist

        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        bad = torch.stack([~torch.isfinite(p.grad).all() for p in params]).any().float().cpu().reshape(1)
        if self.denv.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item() > 0)

    def _judge(self, loss: torch.Tensor, applied: bool) -> bool:
        """Watch the step for NaN/inf; False when it was skipped (skip mode)."""
        nf = self.nonfinite
        if self.cfg.train.nonfinite == "stop":
            nf.watch(self.step, loss, self.engine.get_global_grad_norm())
            return True
        if not nf.skipped(loss, applied):
            return True
        log.warning(
            "step %d: non-finite loss or gradients, update skipped (%d in a row, %d in all)",
            self.step,
            nf.skipped_in_row,
            nf.skipped_total,
        )
        if nf.too_many:
            self._diverged(
                self.step,
                f"{nf.skipped_in_row} non-finite steps in a row (train.max_skipped_steps="
                f"{self.cfg.train.max_skipped_steps})",
            )
        return False

    def _due_out(self, step: int) -> bool:
        """Whether anything of this step leaves the process (a log record, a sample grid, a checkpoint)."""
        return self.log.should_log(step) or self.samples.due(step) or self.checkpointer.due(step)

    def _check_finite(self) -> None:
        if self.cfg.train.nonfinite != "stop":
            return
        bad = self.nonfinite.diverged_at()
        if bad is not None:
            self._diverged(bad, "the loss or gradient norm is NaN or infinite")

    def _diverged(self, step: int, why: str) -> None:
        """Record the run as diverged at `step` (rank 0, behind the fence) and stop: nothing of it is saved."""
        last_good = self.checkpointer.last_saved
        msg = f"run {self.rundir} diverged at step {step}: {why} (train.nonfinite={self.cfg.train.nonfinite})"
        if self.denv.is_main:
            self.rundir.write_final(
                {
                    "step": step,
                    "finished": False,
                    "diverged": True,
                    "error": why,
                    "checkpoint": None if last_good is None else f"step_{last_good:08d}",
                    "run": self.cfg.run.name,
                    "gen": self.gen,
                }
            )
            log.error("%s; the newest checkpoint (step %s) predates it", msg, last_good)
        raise DivergedError(msg + (f"; checkpoints up to step {last_good} are intact" if last_good else ""))

    def _maybe_checkpoint(self, step: int, data_state: dict | None = None, force: bool = False) -> None:
        if not self.checkpointer.due(step, force):
            return
        t0 = time.perf_counter()
        self._pause("checkpoint")
        self.checkpointer.save(
            step, data_state if data_state is not None else self.loader.state_dict(), fence_ok=self._fence_ok
        )
        self.log.metrics.checkpoint_time.observe(time.perf_counter() - t0)
        self.log.sync()

    def _fence_ok(self) -> bool:
        self._pause("publish")
        return self.lease is None or self.lease.provable()

    def _end_early(self, verdict: stopping.Verdict, error: BaseException | None, data_state: dict) -> dict:
        if verdict.lock_lost:  # another trainer owns the run dir now, or this one cannot prove it: write nothing
            why = self.lease.lost_why if self.lease is not None else "on rank 0"
            raise LeaseLostError(
                f"run dir {self.rundir}: lease lost ({why}); stopped after step {self.step}, writing nothing more"
            )
        self._check_finite()
        self.log.flush(self.step, self.engine, self.loader)
        self._maybe_checkpoint(self.step, data_state, force=self.step > 0)
        if verdict.data_error:
            if error is not None:
                raise DataError(f"stopped at step {self.step} (checkpoint saved): {type(error).__name__}: {error}")
            raise DataError(f"stopped at step {self.step} (checkpoint saved): another rank could not read its data")
        reason = self.stop.reason() or "a stop request on another rank"
        if self.denv.is_main:
            log.warning("stopped by %s after step %d; checkpoint saved, rerun to resume", reason, self.step)
        return {"step": self.step, "finished": False, "interrupted": reason, "checkpoint": self.checkpointer.last_saved}

    def _finish(self) -> dict:
        self._check_finite()
        self._maybe_checkpoint(self.step, force=True)
        last = self.log.last or self.rundir.last_record() or {}
        result = {
            "step": self.step,
            "loss": last.get("loss"),
            "images_per_second": last.get("images_per_second", 0.0),
            "finished": True,
            "checkpoint": f"step_{self.step:08d}",
            "run": self.cfg.run.name,
            "variant": self.cfg.model.variant,
            "windows": self.cfg.model.windows,
            "world_size": self.denv.world_size,
            "zero_stage": self.cfg.train.zero_stage,
            "skipped_steps": self.nonfinite.skipped_total,
            "gen": self.gen,
        }
        if self.denv.is_main:
            self.log.sync()
            self.rundir.write_final(result)
            log.info(
                "finished: step %d, loss %s, %.1f images/s; run dir %s",
                self.step,
                result["loss"],
                result["images_per_second"],
                self.rundir,
            )
        return result

    def close(self) -> None:
        """Stop the parts; a part that fails to close (a store that is down, a lost lease) is logged, never masks
        the error that ended the run."""
        for part in ("stop", "log"):
            try:
                if hasattr(self, part):
                    getattr(self, part).close()
            except Exception as e:
                log.warning("closing the trainer's %s failed: %s", part, e)
        self._release_lease()


__all__ = ["Trainer", "run_conversion", "run_training", "validate"]
