"""The training loop. Read `train()` top to bottom: set-up, resume, then one optimizer step per iteration.

Exact resume: every source of randomness is either seeded per rank and checkpointed (python/numpy/torch global
RNG, which the model's label dropout uses; the generator that draws diffusion timesteps and noise; the data
loader's position) or isolated from training (sample grids fork the RNG). A resumed run therefore reproduces the
uninterrupted run's losses exactly on CPU with a fixed seed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time

import numpy as np
import torch

from ditscale import distenv
from ditscale.config import Config, dump_config
from ditscale.errors import ConfigError
from ditscale.train import checkpoint, signals
from ditscale.train import engine as eng
from ditscale.train.rundir import RunDir

log = logging.getLogger("ditscale.train")


# --- checks that must fail before anything heavy starts ---------------------------------------------------------
def validate(cfg: Config, world_size: int) -> dict:
    """Config checks that need the model registry or the data manifest. Returns the manifest."""
    from ditscale.data import read_manifest
    from ditscale.model import DiT_models

    m = cfg.model
    if m.variant not in DiT_models:
        raise ConfigError(f"model.variant {m.variant!r} is not a known DiT variant; known: {', '.join(DiT_models)}")
    try:  # builds the module on the meta device: validates the window spec against the depth, costs no memory
        with torch.device("meta"):
            checkpoint.build_model(cfg)
    except ConfigError:
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
    return manifest


def finished_record(rundir: RunDir, steps: int) -> dict | None:
    raw = rundir.read_text("final.json")
    if raw:
        rec = json.loads(raw)
        if rec.get("finished") and rec.get("step", 0) >= steps:
            return rec
    return None


# --- entry point ------------------------------------------------------------------------------------------------
def run_training(cfg: Config) -> dict:
    denv = distenv.detect()
    eng.setup_process_env(denv)
    rundir = RunDir(cfg.run.dir)
    done = finished_record(rundir, cfg.train.steps)
    if done is not None:
        if denv.is_main:
            log.info("run %s already finished at step %d (final.json); nothing to do", rundir, done["step"])
        return done
    manifest = validate(cfg, denv.world_size)
    import torch.distributed as dist

    owned = not dist.is_initialized()  # a launcher (Ray Train) may have joined the process group already
    device = eng.init_distributed(denv)
    ok = False
    try:
        result = train(cfg, denv, device, rundir, manifest)
        ok = True
        return result
    finally:
        eng.shutdown(ok, destroy=owned)


def _labels(cfg: Config, manifest: dict, rank: int) -> dict[str, str]:
    return {
        "run": cfg.run.name,
        "variant": cfg.model.variant,
        "windows": cfg.model.windows,
        "data_size": str(manifest.get("num_samples", "")),
        "rank": str(rank),
    }


def _model_fn(engine, precision: str, device: torch.device):
    """What the diffusion loss calls: the DeepSpeed engine, under bf16 autocast when training in bf16."""
    if precision != "bf16":
        return engine

    def fn(x, t, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return engine(x, t, **kwargs).float()

    return fn


def train(cfg: Config, denv: distenv.DistEnv, device: torch.device, rundir: RunDir, manifest: dict) -> dict:
    import torch.distributed as dist

    from ditscale.data import make_loader
    from ditscale.diffusion import diffusion_from_config
    from ditscale.observability import JsonlLog, Metrics, Progress, save_grid
    from ditscale.train.ema import EMA
    from ditscale.train.sampling import draw, grid_labels

    rank, world, main = denv.rank, denv.world_size, denv.is_main
    t_cfg = cfg.train
    precision = eng.resolve_precision(cfg)
    eng.set_tf32(t_cfg.tf32)
    accum = eng.grad_accumulation(cfg, world)

    # Model: identical initial weights on every rank; the EMA starts as a copy.
    torch.manual_seed(cfg.run.seed)
    model = checkpoint.build_model(cfg).to(device)
    ema = EMA(model, t_cfg.ema_decay, device=device)
    if t_cfg.activation_checkpointing:
        eng.apply_activation_checkpointing(model)
    engine, optimizer, _ = eng.build_engine(cfg, model, world)
    zero3 = t_cfg.zero_stage == 3
    diffusion = diffusion_from_config(cfg)  # every diffusion.* key (rescale_vb, use_kl, ...) and model.learn_sigma
    model_fn = _model_fn(engine, precision, device)

    # Data and per-rank randomness (label dropout uses the global RNG; timesteps and noise use `gen`).
    loader = make_loader(
        cfg.data.train,
        batch_size=t_cfg.micro_batch,
        rank=rank,
        world_size=world,
        seed=cfg.run.seed,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        flip=cfg.data.flip,
        verify_sha256=cfg.data.verify_sha256,
    )
    rank_seed = cfg.run.seed * world + rank
    random.seed(rank_seed)
    np.random.seed(rank_seed)
    torch.manual_seed(rank_seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(rank_seed)

    # Resume from the newest complete checkpoint in run.dir, if any.
    if denv.local_rank == 0:
        checkpoint.clean_staging(rundir)
    dist.barrier()
    step = checkpoint.resume(
        rundir=rundir, engine=engine, ema=ema, loader=loader, generator=gen, denv=denv, zero_stage=t_cfg.zero_stage
    )
    if main:
        _write_config(rundir, cfg, resumed=step > 0)
        log.info(
            "%s: %s %s, %d processes, ZeRO-%d, %s, global batch %d (micro %d x accum %d), %s at step %d",
            cfg.run.name,
            cfg.model.variant,
            cfg.model.windows,
            world,
            t_cfg.zero_stage,
            precision,
            t_cfg.global_batch,
            t_cfg.micro_batch,
            accum,
            "resumed" if step else "starting",
            step,
        )
    port = cfg.log.metrics_port + denv.local_rank if cfg.log.metrics_port else 0
    metrics = Metrics(_labels(cfg, manifest, rank), port=port)
    jsonl = None
    if main:
        if rundir.remote and step:
            prev = rundir.read_bytes("metrics.jsonl")
            if prev is not None:
                (rundir.local / "metrics.jsonl").write_bytes(prev)
        jsonl = JsonlLog(rundir.local / "metrics.jsonl", truncate_after_step=step)
    progress = Progress(t_cfg.steps, step, main and cfg.log.progress)
    delay = float(os.environ.get("DITSCALE_TEST_STEP_DELAY", "0"))  # tests only: time to scrape or signal
    labels = grid_labels(cfg.model.num_classes)
    meta = {
        "world_size": world,
        "zero_stage": t_cfg.zero_stage,
        "precision": precision,
        "config": cfg.model_dump(mode="json"),
    }

    def save_checkpoint(at: int) -> None:
        t0 = time.perf_counter()
        tag = checkpoint.save(
            rundir=rundir,
            engine=engine,
            ema_state=ema.state_dict() if main else None,
            step=at,
            loader_state=loader.state_dict(),
            generator=gen,
            meta=meta,
            rank=rank,
            local_rank=denv.local_rank,
            keep=cfg.checkpoint.keep,
        )
        metrics.checkpoint_time.observe(time.perf_counter() - t0)
        if main:
            rundir.upload("metrics.jsonl")
            log.info("checkpoint %s/checkpoints/%s (%.1fs)", rundir, tag, time.perf_counter() - t0)

    signals.install()
    data = iter(loader)
    win = {"steps": 0, "loss": 0.0, "time": 0.0, "wait": 0.0}
    last_loss, last_ips, stop, saved_at = float("nan"), 0.0, None, step
    per_rank_samples = t_cfg.micro_batch * accum
    try:
        while step < t_cfg.steps:
            # ---- one optimizer step: `accum` micro-batches, DeepSpeed steps the optimizer at the boundary ----
            t_start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler steps inside)
            wait, loss_sum = 0.0, torch.zeros((), device=device)
            for _ in range(accum):
                t0 = time.perf_counter()
                x, y = next(data)
                wait += time.perf_counter() - t0
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device, generator=gen)
                noise = torch.randn(x.shape, device=device, generator=gen)
                loss = diffusion.training_losses(model_fn, x, t, model_kwargs={"y": y}, noise=noise)["loss"].mean()
                engine.backward(loss)
                engine.step()
                loss_sum += loss.detach().float()
            ema.update(engine.module, zero3=zero3)
            step += 1
            # One tiny all-reduce per step: mean loss over ranks, and whether any rank was asked to stop.
            flag = torch.tensor(float(signals.requested() is not None), device=device)
            stats = torch.stack([loss_sum / accum, flag])
            dist.all_reduce(stats)
            step_loss, stop_now = stats[0].item() / world, stats[1].item() > 0
            dt = time.perf_counter() - t_start

            # ---- bookkeeping ----
            win["steps"] += 1
            win["loss"] += step_loss
            win["time"] += dt
            win["wait"] += wait
            metrics.step.set(step)
            metrics.samples.inc(per_rank_samples)
            metrics.step_time.observe(dt)
            metrics.data_wait.inc(wait)
            if step % cfg.log.every == 0 or step == t_cfg.steps or stop_now:
                gn = engine.get_global_grad_norm()
                n = win["steps"]
                last_loss = win["loss"] / n
                last_ips = n * t_cfg.global_batch / max(win["time"], 1e-9)
                rec = {
                    "step": step,
                    "loss": last_loss,
                    "images_per_second": last_ips,
                    "step_time": win["time"] / n,
                    "data_wait_share": win["wait"] / max(win["time"], 1e-9),
                    "lr": lr,
                    "grad_norm": None if gn is None else float(gn),
                    "samples": step * t_cfg.global_batch,
                    "skipped": int(getattr(loader, "skipped", 0)),
                    "time": time.time(),
                }
                metrics.loss.set(last_loss)
                metrics.images_per_second.set(last_ips)
                metrics.learning_rate.set(lr)
                if gn is not None:
                    metrics.grad_norm.set(float(gn))
                metrics.set_skipped(rec["skipped"])
                metrics.update_gpu_memory()
                if jsonl is not None:
                    jsonl.write(rec)
                progress.update(n, last_loss, last_ips)
                win = {"steps": 0, "loss": 0.0, "time": 0.0, "wait": 0.0}
            if main and cfg.log.sample_every and (step % cfg.log.sample_every == 0 or step == t_cfg.steps):
                rel = f"samples/step_{step:08d}.png"
                images = draw(ema.model, cfg, labels, seed=cfg.run.seed)
                save_grid(images, rundir.local / rel, nrow=4, scale=max(1, 128 // (4 * cfg.model.input_size)))
                rundir.upload(rel)
            if step % cfg.checkpoint.every == 0 or step == t_cfg.steps or stop_now:
                save_checkpoint(step)
                saved_at = step
            if stop_now:
                stop = signals.requested() or "signal on another rank"
                break
            if delay:
                time.sleep(delay)
    finally:
        signals.uninstall()
        progress.close()
        metrics.close()
        if jsonl is not None:
            jsonl.close()

    if stop:
        if main:
            log.warning("stopped by %s after step %d; checkpoint saved, rerun to resume", stop, step)
        return {"step": step, "loss": last_loss, "finished": False, "interrupted": stop, "checkpoint": saved_at}
    result = {
        "step": step,
        "loss": last_loss,
        "images_per_second": last_ips,
        "finished": True,
        "checkpoint": checkpoint.tag_for(saved_at),
        "run": cfg.run.name,
        "variant": cfg.model.variant,
        "windows": cfg.model.windows,
        "world_size": world,
        "zero_stage": t_cfg.zero_stage,
    }
    if main:
        rundir.upload("metrics.jsonl")
        rundir.write_text("final.json", json.dumps(result, indent=1) + "\n")
        log.info("finished: step %d, loss %.4f, %.1f images/s; run dir %s", step, last_loss, last_ips, rundir)
    return result


def _write_config(rundir: RunDir, cfg: Config, resumed: bool) -> None:
    text = dump_config(cfg)
    if resumed:
        import yaml

        old = rundir.read_text("config.yaml")
        if old:
            before, after = _flat(yaml.safe_load(old) or {}), _flat(cfg.model_dump(mode="json"))
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            if changed:
                log.warning("resuming with a changed config: %s", ", ".join(changed))
    rundir.write_text("config.yaml", text)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


__all__ = ["run_training", "train", "validate"]
