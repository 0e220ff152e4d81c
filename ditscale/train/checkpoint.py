"""Checkpoints: atomic, complete (model, EMA, optimizer, scheduler, step, loader position, RNG of every rank).

Layout under the run directory (local path or object-storage URL):

    checkpoints/step_00001000/
        mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed engine files (model, optimizer, scheduler)
        ema.pt                                          EMA weights, a reference-compatible DiT state dict
        rank_00000.pt, rank_00001.pt, ...               per rank: RNG states and the data loader's position
        meta.json                                       written last: step, world size, ZeRO stage, config
    checkpoints/latest                                  the newest complete tag, written after the directory

A checkpoint is written into `checkpoints/.staging/<tag>` (node-local for URLs) and becomes visible only when
complete: renamed into place (local) or uploaded with meta.json last (URL), then `latest` is replaced atomically.
A directory without meta.json is never taken; on start the newest complete checkpoint is resumed.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditscale.errors import CheckpointError
from ditscale.train.rundir import RunDir, staging_root

log = logging.getLogger(__name__)

CKPT = "checkpoints"
STAGING = ".staging"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.split("_", 1)[1])


def complete_tags(rundir: RunDir) -> list[str]:
    tags = [t for t in rundir.listdir(CKPT) if t.startswith("step_") and t[5:].isdigit()]
    return sorted((t for t in tags if rundir.exists(f"{CKPT}/{t}/meta.json")), key=step_of)


def latest_tag(rundir: RunDir) -> str | None:
    """The newest complete checkpoint: `latest` if it names a complete one, else the highest complete step."""
    tags = complete_tags(rundir)
    pointer = (rundir.read_text(f"{CKPT}/latest") or "").strip()
    if pointer in tags and step_of(pointer) >= step_of(tags[-1]):
        return pointer
    return tags[-1] if tags else None


# --- random state -----------------------------------------------------------------------------------------------
def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


# --- save -------------------------------------------------------------------------------------------------------
def _stage_dir(rundir: RunDir) -> Path:
    # Local run dir: staging inside it (same filesystem -> atomic rename). URL: node-local mirror.
    return (rundir.local if not rundir.remote else staging_root() / rundir.local.name) / CKPT / STAGING


def save(
    *,
    rundir: RunDir,
    engine,
    ema_state: dict[str, torch.Tensor] | None,
    step: int,
    loader_state: dict,
    generator: torch.Generator,
    meta: dict,
    rank: int,
    local_rank: int,
    keep: int,
) -> str:
    """Collective: every rank calls it. Returns the tag."""
    import torch.distributed as dist

    tag = tag_for(step)
    stage = _stage_dir(rundir)
    if local_rank == 0:
        shutil.rmtree(stage / tag, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(stage), tag=tag, client_state={"step": step}, save_latest=False)
    torch.save(
        {"step": step, "rank": rank, "rng": rng_state(generator), "loader": loader_state},
        stage / tag / f"rank_{rank:05d}.pt",
    )
    if rank == 0 and ema_state is not None:
        torch.save(ema_state, stage / tag / "ema.pt")
    dist.barrier()
    if rundir.remote:
        if local_rank == 0:  # every node uploads what its ranks wrote (names never collide between ranks)
            rundir.upload_tree(stage / tag, f"{CKPT}/{tag}", skip=("meta.json",))
        dist.barrier()
    if rank == 0:
        body = json.dumps({**meta, "step": step, "tag": tag, "time": time.time()}, indent=1).encode()
        if rundir.remote:
            rundir.write_bytes(f"{CKPT}/{tag}/meta.json", body)
        else:
            (stage / tag / "meta.json").write_bytes(body)
            final = rundir.local / CKPT / tag
            if final.exists():  # the same step saved again (e.g. after a resume): replace it
                shutil.rmtree(final)
            (stage / tag).rename(final)
        rundir.write_text(f"{CKPT}/latest", tag)
        _prune(rundir, keep)
    dist.barrier()
    if rundir.remote and local_rank == 0:
        shutil.rmtree(stage / tag, ignore_errors=True)
    return tag


def _prune(rundir: RunDir, keep: int) -> None:
    tags = complete_tags(rundir)
    for old in tags[:-keep]:
        rundir.rmtree(f"{CKPT}/{old}")
        log.info("removed old checkpoint %s", old)


def clean_staging(rundir: RunDir) -> None:
    """Remove half-written checkpoints left by a killed run (rank 0, before training starts)."""
    shutil.rmtree(_stage_dir(rundir), ignore_errors=True)


# --- load -------------------------------------------------------------------------------------------------------
def local_copy(rundir: RunDir, tag: str, *, download: bool = True) -> Path:
    """A local directory holding checkpoint `tag` (downloaded for URL run dirs)."""
    if not rundir.remote:
        return rundir.local / CKPT / tag
    dest = staging_root() / rundir.local.name / "download" / tag
    if download and not (dest / "meta.json").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        rundir.download_tree(f"{CKPT}/{tag}", dest)
    return dest


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: meta.json missing or unreadable ({e})") from None


def resume(*, rundir: RunDir, engine, ema, loader, generator: torch.Generator, denv, zero_stage: int) -> int:
    """Collective. Loads the newest complete checkpoint into engine/EMA/loader/RNG; returns its step (0: none)."""
    import torch.distributed as dist

    box = [latest_tag(rundir) if denv.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    tag = box[0]
    if tag is None:
        return 0
    if denv.local_rank == 0:
        local_copy(rundir, tag)
    dist.barrier()
    path = local_copy(rundir, tag, download=False)
    meta = read_meta(path)
    if meta.get("world_size") != denv.world_size:
        raise CheckpointError(
            f"checkpoint {rundir}/{CKPT}/{tag} was written by {meta.get('world_size')} processes, this run has "
            f"{denv.world_size}: resume with the same number of processes (or start a new run.dir)"
        )
    if meta.get("zero_stage") != zero_stage:
        raise CheckpointError(
            f"checkpoint {rundir}/{CKPT}/{tag} was written with train.zero_stage={meta.get('zero_stage')}, "
            f"the config says {zero_stage}"
        )
    load_path, _ = engine.load_checkpoint(
        str(path.parent), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"checkpoint {rundir}/{CKPT}/{tag}: DeepSpeed could not load it")
    if ema is not None:
        ema.load_state_dict(torch.load(path / "ema.pt", map_location="cpu", weights_only=True))
    extra = torch.load(path / f"rank_{denv.rank:05d}.pt", map_location="cpu", weights_only=False)
    loader.load_state_dict(extra["loader"])
    set_rng_state(extra["rng"], generator)
    return int(meta["step"])


def load_config_of(rundir: RunDir, tag: str | None = None):
    """(Config, tag) of a run's newest complete checkpoint (or `tag`)."""
    from ditscale.config import config_from_dict

    tag = tag or latest_tag(rundir)
    if tag is None:
        raise CheckpointError(f"run {rundir}: no complete checkpoint under {rundir}/{CKPT}")
    raw = rundir.read_text(f"{CKPT}/{tag}/meta.json")
    if raw is None:
        raise CheckpointError(f"run {rundir}: checkpoint {tag} is missing or incomplete (no meta.json)")
    meta = json.loads(raw)
    return config_from_dict(meta["config"], origin=f"{rundir}/{CKPT}/{tag}/meta.json"), tag, meta


def _consolidated_model_state(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    """The trained (non-EMA) weights, fp32, from the DeepSpeed files of one checkpoint."""
    if meta.get("zero_stage", 0) == 0:
        files = sorted(path.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise CheckpointError(f"checkpoint {path}: no mp_rank_*_model_states.pt")
        sd = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
        return {k: v.float() for k, v in sd.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)


def load_state_for_eval(run_dir: str, ema: bool = True, tag: str | None = None):
    """(cfg, state_dict, tag): the EMA (or raw) weights of a run's checkpoint, on CPU."""
    rundir = RunDir(run_dir)
    cfg, tag, meta = load_config_of(rundir, tag)
    if ema:
        raw = rundir.read_bytes(f"{CKPT}/{tag}/ema.pt")
        if raw is None:
            raise CheckpointError(f"checkpoint {rundir}/{CKPT}/{tag} has no ema.pt")
        import io

        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    else:
        path = local_copy(rundir, tag)
        state = _consolidated_model_state(path, meta)
    return cfg, state, tag


def build_model(cfg):
    from ditscale.model import create_model

    m = cfg.model
    return create_model(
        m.variant,
        input_size=m.input_size,
        in_channels=m.in_channels,
        num_classes=m.num_classes,
        learn_sigma=m.learn_sigma,
        class_dropout_prob=m.class_dropout_prob,
        windows=m.windows,
        attention_backend=m.attention_backend,
        strict_windows=m.strict_windows,
    )


def load_for_eval(run_dir: str, ema: bool = True, tag: str | None = None):
    """(cfg, model): the run's DiT with its EMA (or raw) weights, on CPU, in eval mode. No DeepSpeed needed
    for EMA weights. Raises CheckpointError when the run has no complete checkpoint."""
    cfg, state, tag = load_state_for_eval(run_dir, ema=ema, tag=tag)
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {run_dir}/{CKPT}/{tag} does not match {cfg.model.variant}: "
            f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )
    return cfg, model.eval()
