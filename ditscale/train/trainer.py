"""The Trainer: parts built from the config's sections, and the loop that calls them.

Read `Trainer.train()` top to bottom: each iteration takes this rank's micro-batches for one step, asks every rank
whether to go on (`stop.poll`), runs `train_step()`, then lets each part act if its time has come (log, sample
grid, checkpoint). Each part owns its timing and state:
    model, diffusion, loader     cfg.model.build(), diffusion_from_config(cfg), cfg.data.loader()
    engine, ema                  DeepSpeed ZeRO (train/engine.py), the fp32 EMA copy (train/ema.py)
    checkpointer                 save every checkpoint.every steps, keep, resume (train/checkpoint.py)
    log                          the logging window and the loggers (train/loggers.py)
    samples                      sample grids (train/sampling.py)
    stop                         signals, launcher death, the per-step agreement of ranks (train/stop.py)
    lease                        the run dir's lock, held by rank 0 (io/lock.py)

Exact resume: every source of randomness is either seeded per rank and checkpointed (python/numpy/torch global
RNG, which the model's label dropout uses; the generator that draws timesteps and noise; the loader's position)
or isolated from training (sample grids fork the RNG). A resumed run reproduces the uninterrupted run's losses
exactly on CPU with a fixed seed.
"""

from __future__ import annotations

import logging
import os
import random
import time

import numpy as np
import torch

from ditscale import distenv
from ditscale.config import Config, config_changes, dump_config, format_changes
from ditscale.diffusion import diffusion_from_config
from ditscale.errors import ConfigError, DataError, DitscaleError, RunLockedError
from ditscale.io.rundir import RunDir, step_of
from ditscale.train import engine as eng
from ditscale.train import stop as stopping
from ditscale.train.checkpoint import Checkpointer
from ditscale.train.step import diffusion_loss, model_fn

log = logging.getLogger("ditscale.train")


# --- checks that must fail before anything heavy starts ---------------------------------------------------------
def validate(cfg: Config, world_size: int) -> dict:
    """Config checks that need the model registry or the data: the manifest, and every shard it names exists
    (one listing, not downloads). Returns the manifest."""
    from ditscale.data import missing_shards, read_manifest
    from ditscale.model import check_variant_windows

    m = cfg.model
    check_variant_windows(m.variant, m.windows)
    try:  # builds the module on the meta device (no memory): input size against patch size, strict_windows
        with torch.device("meta"):
            m.build()
    except DitscaleError:
        raise
    except Exception as e:  # a model that cannot be built on the meta device is validated later, for real
        log.debug("meta-device model check skipped: %s", e)
    eng.grad_accumulation(cfg, world_size)
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


class Trainer:
    def __init__(
        self,
        cfg: Config,
        denv: distenv.DistEnv,
        device: torch.device,
        rundir: RunDir,
        manifest: dict,
        allow_config_change: bool = False,
    ):
        self.cfg, self.denv, self.device, self.rundir = cfg, denv, device, rundir
        self.lease = None
        self.stop = stopping.StopSignal(denv.world_size, on_exit=self._release_lease)
        self._claim_run_dir(allow_config_change)
        try:
            self._build_parts(manifest)
        except BaseException:
            self.close()  # never keep the lock of a trainer that could not start
            raise

    def _build_parts(self, manifest: dict) -> None:
        cfg, denv, device, rundir = self.cfg, self.denv, self.device, self.rundir
        rank, world = denv.rank, denv.world_size
        t = cfg.train
        self.precision = eng.resolve_precision(cfg)
        eng.set_tf32(t.tf32)
        self.accum = eng.grad_accumulation(cfg, world)
        # Model: identical initial weights on every rank; the EMA starts as a copy.
        from ditscale.train.ema import EMA

        torch.manual_seed(cfg.run.seed)
        model = cfg.model.build().to(device)
        self.ema = EMA(model, t.ema_decay, device=device)
        if t.activation_checkpointing:
            eng.apply_activation_checkpointing(model)
        self.engine, self.optimizer, _ = eng.build_engine(cfg, model, world)
        self.model_fn = model_fn(self.engine, self.precision, device)
        self.diffusion = diffusion_from_config(cfg)  # every diffusion.* key and model.learn_sigma
        self.loader = cfg.data.loader(batch_size=t.micro_batch, rank=rank, world_size=world, seed=cfg.run.seed)
        # Per-rank randomness: label dropout uses the global RNG; timesteps and noise use `gen`.
        rank_seed = cfg.run.seed * world + rank
        random.seed(rank_seed)
        np.random.seed(rank_seed)
        torch.manual_seed(rank_seed)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(rank_seed)

        meta = {
            "world_size": world,
            "zero_stage": t.zero_stage,
            "precision": self.precision,
            "config": cfg.model_dump(mode="json"),
        }
        self.checkpointer = Checkpointer(
            rundir,
            cfg,
            denv,
            engine=self.engine,
            ema=self.ema,
            loader=self.loader,
            generator=self.gen,
            meta=meta,
            agree=self._all_ok,
        )
        self.step = self.checkpointer.resume()
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
        from ditscale.train.loggers import TrainLog
        from ditscale.train.sampling import SampleGrids

        labels, info = _labels(cfg, manifest, rank), _run_info(cfg, manifest)
        self.log = TrainLog(cfg, denv, rundir, device, labels, self.step, info)
        self.samples = SampleGrids(cfg, rundir, enabled=denv.is_main)
        self.delay = float(os.environ.get("DITSCALE_TEST_STEP_DELAY", "0"))  # tests only: time to scrape or signal

    # --- the run dir: one writer, no silent config drift -------------------------------------------------------
    def _claim_run_dir(self, allow_config_change: bool) -> None:
        """Rank 0 takes the run dir's lock and checks the config against the run's; every rank gets the outcome."""
        import torch.distributed as dist

        cfg, rundir = self.cfg, self.rundir
        error = None
        if self.denv.is_main:
            try:
                self.lease = rundir.lease(cfg.run.lease_seconds).acquire()
                self._check_config(allow_config_change)
                rundir.clean_leftovers()
            except DitscaleError as e:
                error = (type(e).__name__, str(e))
        box = [error]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            self._release_lease()
            kind, msg = box[0]
            raise (RunLockedError if kind == "RunLockedError" else ConfigError)(msg)
        if rundir.remote and self.denv.local_rank == 0 and not self.denv.is_main:
            import shutil

            shutil.rmtree(rundir.staging_dir(), ignore_errors=True)  # this node's leftovers of a dead writer
        dist.barrier()

    def _check_config(self, allow: bool) -> None:
        rundir, cfg = self.rundir, self.cfg
        saved = rundir.saved_config()
        tag = rundir.latest_tag()
        step = step_of(tag) if tag else 0
        new = cfg.model_dump(mode="json")
        if saved is None:
            rundir.record_config(dump_config(cfg), step, {}, "created", **self._where())
            return
        trained, free = config_changes(saved, new)
        if trained and not allow:
            raise ConfigError(
                f"run dir {rundir} was trained with a different config; resuming would mislabel it. Changed: "
                f"{format_changes(trained)}. Start a new run dir, or pass --allow-config-change to continue with "
                "the new values (recorded in config_history.jsonl with the step they took effect)"
            )
        if trained:
            log.warning("resuming %s at step %d with a changed config: %s", rundir, step, format_changes(trained))
        event = "changed" if trained else "resumed"
        rundir.record_config(dump_config(cfg), step, {**trained, **free}, event, **self._where())

    def _where(self) -> dict:
        """What this start runs on, for the run's history: processes, nodes, ZeRO stage."""
        d = self.denv
        nodes = -(-d.world_size // max(d.local_world_size, 1))
        return {"world_size": d.world_size, "nodes": nodes, "zero_stage": self.cfg.train.zero_stage}

    def _release_lease(self) -> None:
        if self.lease is not None:
            self.lease.release()

    def _all_ok(self, ok: bool) -> bool:
        return not self.stop.poll(data_error=not ok).data_error

    # --- the loop -----------------------------------------------------------------------------------------------
    def train(self) -> dict:
        steps = self.cfg.train.steps
        data = iter(self.loader)
        self.stop.install()
        while self.step < steps:
            loader_state = self.loader.state_dict()  # the position after the last finished step
            t0 = time.perf_counter()
            batches, error = self._next_batches(data)
            wait = time.perf_counter() - t0
            verdict = self.stop.poll(data_error=error is not None, lock_lost=bool(self.lease and self.lease.lost))
            if verdict.any:
                return self._end_early(verdict, error, loader_state)
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler steps inside)
            loss = self.train_step(batches)
            self.step += 1
            self.log.after_step(self.step, loss, time.perf_counter() - t0, wait, lr, self.engine, self.loader)
            path = self.samples.maybe_sample(self.step, self.ema.model)
            if path is not None:
                self.log.image(self.step, "samples", path)
            self._maybe_checkpoint(self.step)
            if self.delay:
                time.sleep(self.delay)
        return self._finish()

    def _next_batches(self, data) -> tuple[list, BaseException | None]:
        """This rank's `accum` micro-batches of the next step. An error is returned, not raised: the other ranks
        must hear of it (stop.poll) before anyone leaves, or they would wait in a collective forever."""
        batches = []
        try:
            for _ in range(self.accum):
                batches.append(next(data))
        except Exception as e:
            log.error("rank %d: reading the next batch failed: %s: %s", self.denv.rank, type(e).__name__, e)
            return batches, e
        return batches, None

    def train_step(self, batches: list) -> torch.Tensor:
        """One optimizer step: forward/backward of each micro-batch, DeepSpeed steps at the boundary, EMA.
        Returns the step's mean loss as a device tensor (no host sync)."""
        total = None
        for x, y in batches:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss = diffusion_loss(self.model_fn, self.diffusion, x, y, generator=self.gen)
            self.engine.backward(loss)
            self.engine.step()
            total = loss.detach() if total is None else total + loss.detach()
        self.ema.update(self.engine.module, zero3=self.cfg.train.zero_stage == 3)
        return total / len(batches)

    def _maybe_checkpoint(self, step: int, loader_state: dict | None = None, force: bool = False) -> None:
        if not self.checkpointer.due(step, force):
            return
        t0 = time.perf_counter()
        self.checkpointer.save(step, loader_state if loader_state is not None else self.loader.state_dict())
        self.log.metrics.checkpoint_time.observe(time.perf_counter() - t0)
        self.log.sync()

    def _end_early(self, verdict: stopping.Verdict, error: BaseException | None, loader_state: dict) -> dict:
        if verdict.lock_lost:  # another trainer owns the run dir now: write nothing more
            msg = f"run dir {self.rundir}: another trainer took over the lock; stopped at step {self.step}"
            raise RunLockedError(msg)
        self.log.flush(self.step, self.engine, self.loader)
        self._maybe_checkpoint(self.step, loader_state, force=self.step > 0)
        if verdict.data_error:
            if error is not None:
                raise DataError(f"stopped at step {self.step} (checkpoint saved): {type(error).__name__}: {error}")
            raise DataError(f"stopped at step {self.step} (checkpoint saved): another rank could not read its data")
        reason = self.stop.reason() or "a stop request on another rank"
        if self.denv.is_main:
            log.warning("stopped by %s after step %d; checkpoint saved, rerun to resume", reason, self.step)
        return {"step": self.step, "finished": False, "interrupted": reason, "checkpoint": self.checkpointer.last_saved}

    def _finish(self) -> dict:
        self._maybe_checkpoint(self.step, force=True)
        last = self.log.last or self.rundir.last_record() or {}
        result = {
            "step": self.step,
            "loss": last.get("loss", float("nan")),
            "images_per_second": last.get("images_per_second", 0.0),
            "finished": True,
            "checkpoint": f"step_{self.step:08d}",
            "run": self.cfg.run.name,
            "variant": self.cfg.model.variant,
            "windows": self.cfg.model.windows,
            "world_size": self.denv.world_size,
            "zero_stage": self.cfg.train.zero_stage,
        }
        if self.denv.is_main:
            self.log.sync()
            self.rundir.write_final(result)
            log.info(
                "finished: step %d, loss %.4f, %.1f images/s; run dir %s",
                self.step,
                result["loss"],
                result["images_per_second"],
                self.rundir,
            )
        return result

    def close(self) -> None:
        """Stop the parts; a part that fails to close (a store that is down) is logged, never masks the error
        that ended the run."""
        for part in ("stop", "log"):
            try:
                if hasattr(self, part):
                    getattr(self, part).close()
            except Exception as e:
                log.warning("closing the trainer's %s failed: %s", part, e)
        self._release_lease()


__all__ = ["Trainer", "run_training", "validate"]
