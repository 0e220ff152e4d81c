"""Checkpoints: atomic, complete (model, EMA, optimizer, scheduler, step, loader position, RNG of every rank).

Layout under the run directory (local path or object-storage URL; the directory itself is ditscale.io.rundir's):

    checkpoints/step_00001000/
        mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed engine files (model, optimizer, scheduler)
        ema.pt                                          EMA weights, a reference-compatible DiT state dict
        rank_00000.pt, rank_00001.pt, ...               per rank: RNG states and the data loader's position
        meta.json                                       written last: step, world size, ZeRO stage, config
    checkpoints/latest                                  the newest complete tag (DeepSpeed's convention)
    checkpoints/zero_to_fp32.py, zero_to_torch.py       DeepSpeed's own recovery scripts, beside the tags

A checkpoint is written into the staging dir (node-local for URLs) and becomes visible only when complete:
renamed into place (local) or uploaded with meta.json last (URL), then `latest` is replaced. A directory without
meta.json is never taken; a failed save (disk full, store down beyond the retry budget) names the path and the
OS error, removes its partial files and leaves the previous checkpoint the newest complete one.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditscale.errors import CheckpointError, DitscaleError
from ditscale.io import storage
from ditscale.io.rundir import CKPT, RunDir, step_of, tag_for

log = logging.getLogger(__name__)

RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


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


def write_failure(path: Path, exc: BaseException) -> str:
    """Why writing under `path` failed, in OS terms: torch.save reports a full disk as 'basic_ios::clear' or
    'inline_container.cc', so when the exception carries no errno the directory is probed with a small write."""
    if isinstance(exc, OSError) and exc.errno:
        return f"{storage.describe(exc)} ({exc.filename or path})"
    probe = path / f".probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return f"{e.strerror or os.strerror(e.errno or errno.EIO)} ({path}); {type(exc).__name__}: {exc}"
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return f"{type(exc).__name__}: {exc}"


# --- the trainer's part ---------------------------------------------------------------------------------------
class Checkpointer:
    """Saves every `checkpoint.every` steps (and at the end or on a stop), keeps `checkpoint.keep`, resumes.

    Collective: every rank calls resume() and save(); `agree(ok)` is an all-reduce that tells every rank whether
    all of them succeeded (so one rank's failure never leaves the others waiting in a barrier).
    """

    def __init__(self, rundir: RunDir, cfg, denv, *, engine, ema, loader, generator, meta: dict, agree):
        self.rundir, self.cfg, self.denv = rundir, cfg, denv
        self.engine, self.ema, self.loader, self.generator = engine, ema, loader, generator
        self.meta = meta
        self.agree: Callable[[bool], bool] = agree
        self.every, self.keep = cfg.checkpoint.every, cfg.checkpoint.keep
        self.last_saved: int | None = None

    # -- resume --------------------------------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the newest complete checkpoint into engine, EMA, loader and RNG; its step (0: none)."""
        import torch.distributed as dist

        box = [self.rundir.latest_tag() if self.denv.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        tag = box[0]
        if tag is None:
            return 0
        if self.denv.local_rank == 0:
            self.rundir.checkpoint_local(tag)
        dist.barrier()
        path = self.rundir.checkpoint_local(tag, download=False)
        meta = read_meta(path)
        where = f"checkpoint {self.rundir}/{CKPT}/{tag}"
        if meta.get("world_size") != self.denv.world_size:
            raise CheckpointError(
                f"{where} was written by {meta.get('world_size')} processes, this run has {self.denv.world_size}: "
                "resume with the same number of processes (or start a new run.dir)"
            )
        if meta.get("zero_stage") != self.cfg.train.zero_stage:
            raise CheckpointError(
                f"{where} was written with train.zero_stage={meta.get('zero_stage')}, the config says "
                f"{self.cfg.train.zero_stage}"
            )
        load_path, _ = self.engine.load_checkpoint(
            str(path.parent), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise CheckpointError(f"{where}: DeepSpeed could not load it")
        self.ema.load_state_dict(torch.load(path / "ema.pt", map_location="cpu", weights_only=True))
        extra = torch.load(path / f"rank_{self.denv.rank:05d}.pt", map_location="cpu", weights_only=False)
        self.loader.load_state_dict(extra["loader"])
        set_rng_state(extra["rng"], self.generator)
        self.last_saved = int(meta["step"])
        return self.last_saved

    # -- save ----------------------------------------------------------------------------------------------------
    def due(self, step: int, force: bool = False) -> bool:
        """Whether step `step` should be saved: every `checkpoint.every` steps, the last step, or `force` (a stop),
        unless it is saved already."""
        if self.last_saved == step:
            return False
        return force or step % self.every == 0 or step >= self.cfg.train.steps

    def save(self, step: int, loader_state: dict) -> str:
        """Write, then publish, checkpoint `step`. Raises CheckpointError naming the path and the OS error."""
        import torch.distributed as dist

        tag, rank, local_rank = tag_for(step), self.denv.rank, self.denv.local_rank
        stage = self.rundir.staging_dir()
        if local_rank == 0:
            shutil.rmtree(stage / tag, ignore_errors=True)
        dist.barrier()
        t0 = time.perf_counter()
        error: str | None = None
        try:
            self.engine.save_checkpoint(str(stage), tag=tag, client_state={"step": step}, save_latest=False)
            rng = rng_state(self.generator)
            state = {"step": step, "rank": rank, "rng": rng, "loader": loader_state}
            torch.save(state, stage / tag / f"rank_{rank:05d}.pt")
            if rank == 0:
                torch.save(self.ema.state_dict(), stage / tag / "ema.pt")
        except Exception as e:
            error = write_failure(stage / tag, e)
        self._settle(error, stage, tag, "writing")
        if self.rundir.remote:
            try:
                if local_rank == 0:  # every node uploads what its ranks wrote (names never collide between ranks)
                    self.rundir.upload_tree(stage / tag, f"{CKPT}/{tag}", skip=("meta.json",))
            except DitscaleError as e:
                error = str(e)
            self._settle(error, stage, tag, "uploading")
        if rank == 0:
            self._publish(step, tag, stage)
        dist.barrier()
        if self.rundir.remote and local_rank == 0:
            shutil.rmtree(stage / tag, ignore_errors=True)
        self.last_saved = step
        if rank == 0:
            log.info("checkpoint %s/%s/%s (%.1fs)", self.rundir, CKPT, tag, time.perf_counter() - t0)
        return tag

    def _settle(self, error: str | None, stage: Path, tag: str, what: str) -> None:
        """All ranks agree on success; on any failure the partial checkpoint is removed and every rank raises."""
        if self.agree(error is None):
            return
        if self.denv.local_rank == 0:
            shutil.rmtree(stage / tag, ignore_errors=True)
        where = f"{self.rundir}/{CKPT}/{tag}"
        prev = tag_for(self.last_saved) if self.last_saved else None
        keep = f"; the newest complete checkpoint is still {prev}" if prev else ""
        raise CheckpointError(f"checkpoint {where}: {what} failed: {error or 'on another rank'}{keep}")

    def _publish(self, step: int, tag: str, stage: Path) -> None:
        """Rank 0: meta.json last, then `latest`, DeepSpeed's scripts beside the tags, and pruning."""
        rd = self.rundir
        body = json.dumps({**self.meta, "step": step, "tag": tag, "time": time.time()}, indent=1).encode()
        if rd.remote:
            rd.write_bytes(f"{CKPT}/{tag}/meta.json", body)
        else:
            storage.write_bytes(str(stage / tag / "meta.json"), body)
            final = rd.local / CKPT / tag
            if final.exists():  # the same step saved again (a resume that stopped at once): replace it
                shutil.rmtree(final)
            (stage / tag).rename(final)
            storage.fsync_dir(str(rd.local / CKPT))
        rd.publish_latest(tag)
        for script in RECOVERY_SCRIPTS:
            src = stage / script
            if src.is_file():
                storage.put_file(str(src), rd.path(f"{CKPT}/{script}"))
                src.unlink()
        for old in rd.complete_tags()[: -self.keep]:
            rd.rmtree(f"{CKPT}/{old}")
            log.info("removed old checkpoint %s", old)


# --- reading checkpoints back (eval, export, sample: no DeepSpeed needed for EMA weights) ----------------------
def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: meta.json missing or unreadable ({e})") from None


def load_config_of(rundir: RunDir, tag: str | None = None):
    """(Config, tag, meta) of a run's newest complete checkpoint (or `tag`)."""
    from ditscale.config import config_from_dict

    tag = tag or rundir.latest_tag()
    if tag is None:
        raise CheckpointError(f"run {rundir}: no complete checkpoint under {rundir}/{CKPT}")
    meta = rundir.read_json(f"{CKPT}/{tag}/meta.json")
    if not isinstance(meta, dict):
        raise CheckpointError(f"run {rundir}: checkpoint {tag} is missing or incomplete (no readable meta.json)")
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
    if not rundir.exists(""):
        raise CheckpointError(f"run directory {run_dir!r} does not exist")
    cfg, tag, meta = load_config_of(rundir, tag)
    if ema:
        raw = rundir.read_bytes(f"{CKPT}/{tag}/ema.pt")
        if raw is None:
            raise CheckpointError(f"checkpoint {rundir}/{CKPT}/{tag} has no ema.pt")
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    else:
        state = _consolidated_model_state(rundir.checkpoint_local(tag), meta)
    return cfg, state, tag


def load_for_eval(run_dir: str, ema: bool = True, tag: str | None = None):
    """(cfg, model): the run's DiT with its EMA (or raw) weights, on CPU, in eval mode. Raises CheckpointError
    when the run has no complete checkpoint."""
    cfg, state, tag = load_state_for_eval(run_dir, ema=ema, tag=tag)
    model = cfg.model.build()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {run_dir}/{CKPT}/{tag} does not match {cfg.model.variant}: "
            f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )
    return cfg, model.eval()


__all__ = ["Checkpointer", "load_config_of", "load_for_eval", "load_state_for_eval", "step_of", "tag_for"]
