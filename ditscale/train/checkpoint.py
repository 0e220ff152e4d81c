"""Checkpoints: complete, verified, free of code, and independent of how many processes wrote them.

Layout under the run directory (local path or object-storage URL; the directory itself is ditscale.io.rundir's):

    checkpoints/step_00001000/
        train-RRRRR-CCC.safetensors   the training state, one full tensor per parameter and kind: `param/<name>`
                                      (fp32 master weights), `exp_avg/<name>`, `exp_avg_sq/<name>` (AdamW moments).
                                      Written in parallel, each rank a share of the parameters (RRRRR) in files of
                                      at most 1 GiB (CCC); any number of processes at any ZeRO stage reads them.
        ema.safetensors               the EMA weights: a reference-compatible DiT state dict (export, eval, sample)
        meta.json                     written last: format 2, step, the data position (global samples consumed),
                                      optimizer and scheduler step counts, what wrote it (world size, nodes, ZeRO
                                      stage, precision, lease generation), the config, the tensor index, and every
                                      file with its size and XXH3-128 checksum
    checkpoints/latest                the newest complete tag (DeepSpeed's convention; a hint: see RunDir.latest_tag)

Nothing is pickled: tensors are safetensors, the rest JSON, so loading a checkpoint runs no code. Every load
(resume, export, sample, eval) verifies the files against meta.json first; a checkpoint that fails is named with
the file and what differs, and the newest intact one is used instead (an explicitly asked-for tag fails instead).

A checkpoint is written into a staging dir (node-local for URLs, one per lease generation) and becomes visible
only when complete: renamed into place (local) or uploaded with meta.json last (URL), then `latest` is replaced,
each step behind the lease's fence. A failed save names the path and the OS error, removes its partial files and
leaves the previous checkpoint the newest complete one.

Checkpoints of ditscale before format 2 (DeepSpeed's own files, ema.pt, rank_XXXXX.pt) still resume on the world
size and ZeRO stage that wrote them, loaded without unpickling code (`torch.load(weights_only=True)` with
DeepSpeed's three record classes allowed); `python -m ditscale checkpoint convert` rewrites one as format 2.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ditscale.config import config_from_dict
from ditscale.errors import CheckpointError, DitscaleError, LeaseLostError
from ditscale.io import integrity, storage
from ditscale.io.rundir import CKPT, RunDir, step_of, tag_for
from ditscale.model.checkpoint import load_tensor_file
from ditscale.train.state import KINDS, TrainState

log = logging.getLogger(__name__)

FORMAT = 2
EMA_FILE = "ema.safetensors"
FILE_BYTES = 1 << 30  # a train-state file is cut at 1 GiB: bounded memory while writing, parallel transfers


def train_file(rank: int, chunk: int) -> str:
    return f"train-{rank:05d}-{chunk:03d}.safetensors"


def write_failure(path: Path, exc: BaseException) -> str:
    """Why writing under `path` failed, in OS terms: a write that raised without an errno is probed with a small
    write to the directory, so a full disk is named as such."""
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


def _write_file(path: Path, data: bytes) -> dict:
    """Write bytes durably (fsync) and return their meta.json entry (hashed from the bytes in memory)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return integrity.entry(data)


def owners(sizes: list[int], world_size: int) -> list[int]:
    """Which rank writes each parameter: the largest first, each to the rank with the least so far."""
    load = [0] * world_size
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = min(range(world_size), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += sizes[i]
    return out


# --- reading a checkpoint back ----------------------------------------------------------------------------------
class Checkpoint:
    """One published checkpoint of a run dir: its meta.json, verified files and tensors (read-only)."""

    def __init__(self, rundir: RunDir, tag: str, meta: dict):
        self.rundir, self.tag, self.meta = rundir, tag, meta
        self.where = f"checkpoint {rundir}/{CKPT}/{tag}"
        self._ema: dict[str, torch.Tensor] | None = None

    @property
    def legacy(self) -> bool:
        return self.meta.get("format") is None

    @property
    def step(self) -> int:
        return int(self.meta.get("step", step_of(self.tag)))

    @classmethod
    def read(cls, rundir: RunDir, tag: str) -> Checkpoint:
        raw = rundir.read_bytes(f"{CKPT}/{tag}/meta.json")
        where = f"checkpoint {rundir}/{CKPT}/{tag}"
        if raw is None:
            raise CheckpointError(f"{where}: meta.json is missing (an incomplete checkpoint)")
        try:
            meta = json.loads(raw)
            if not isinstance(meta, dict) or "config" not in meta:
                raise ValueError("no config in it")
        except ValueError as e:
            raise CheckpointError(f"{where}: meta.json is not a checkpoint's metadata ({e})") from None
        fmt = meta.get("format")
        if fmt is not None and fmt != FORMAT:
            raise CheckpointError(f"{where}: format {fmt} is newer than this ditscale reads ({FORMAT}): upgrade")
        return cls(rundir, tag, meta)

    def local_dir(self) -> Path:
        """A local directory holding the checkpoint's files (downloaded once for URL run dirs)."""
        return self.rundir.checkpoint_local(self.tag)

    def verify(self, local: Path | None = None) -> None:
        """Every file meta.json lists has its size and checksum (CheckpointError naming the first that does not)."""
        files = self.meta.get("files")
        if self.legacy or files is None:
            return
        local = local or self.local_dir()
        for name, want in files.items():
            integrity.check_file(self.where, local / name, want)

    def read_file(self, name: str) -> bytes:
        """One file's bytes, verified against meta.json (for readers that need one file, e.g. the EMA)."""
        want = (self.meta.get("files") or {}).get(name)
        data = self.rundir.read_bytes(f"{CKPT}/{self.tag}/{name}")
        if want is not None:
            integrity.check(self.where, name, None if data is None else integrity.entry(data), want)
        if data is None:
            raise CheckpointError(f"{self.where} has no {name}")
        return data

    def ema_state(self) -> dict[str, torch.Tensor]:
        """The EMA weights (this one file read and verified)."""
        if self._ema is None:
            if self.legacy:
                self._ema = load_tensor_file("ema.pt", self.read_file("ema.pt"), source=f"{self.where}/ema.pt")
            else:
                self._ema = load_safetensors(self.read_file(EMA_FILE))
        return self._ema

    def raw_state(self) -> dict[str, torch.Tensor]:
        """The trained (non-EMA) fp32 weights, from the train-state files; the frozen buffers of the state dict
        (DiT's fixed pos_embed) are the EMA file's."""
        if self.legacy:
            raise CheckpointError(
                f"{self.where} is in the layout of an older ditscale: convert it first (python -m ditscale "
                f"checkpoint convert {self.rundir}) to read its raw weights, or use its EMA weights"
            )
        local = self.local_dir()
        self.verify(local)
        out = dict(self.ema_state())
        for key, name in self.meta["tensors"].items():
            if key.startswith("param/"):
                with safe_open(str(local / name), framework="pt") as f:
                    out[key[len("param/") :]] = f.get_tensor(key)
        return out


def newest_intact(rundir: RunDir, check: Callable[[Checkpoint], object] | None = None):
    """(the newest checkpoint that reads and passes `check` (default: every file verified), why each newer one was
    skipped). Readers that need one file check only that one (`lambda ck: ck.ema_state()`)."""
    check = check or (lambda ck: ck.verify())
    skipped: list[str] = []
    for tag in reversed(rundir.complete_tags()):
        try:
            ck = Checkpoint.read(rundir, tag)
            check(ck)
            return ck, skipped
        except DitscaleError as e:
            skipped.append(str(e))
            log.error("%s; skipping it", e)
    return None, skipped


def load_checkpoint(rundir: RunDir, tag: str | None = None, check: Callable[[Checkpoint], object] | None = None):
    """A run's checkpoint: `tag` (checked, or a named error), else the newest intact one."""
    check = check or (lambda ck: ck.verify())
    if tag is not None:
        ck = Checkpoint.read(rundir, tag)
        check(ck)
        return ck
    ck, skipped = newest_intact(rundir, check)
    if ck is None:
        why = f": {'; '.join(skipped)}" if skipped else ""
        raise CheckpointError(f"run {rundir}: no intact checkpoint under {rundir}/{CKPT}{why}")
    return ck


# --- the trainer's part ---------------------------------------------------------------------------------------
class Checkpointer:
    """Saves every `every` steps (and at the end or on a stop), keeps `keep`, resumes.

    Collective: every rank calls resume() and save(); `agree(ok)` is an all-reduce that tells every rank whether
    all of them succeeded (so one rank's failure never leaves the others waiting in a barrier).
    """

    def __init__(
        self,
        rundir: RunDir,
        denv,
        *,
        every: int,
        keep: int,
        last_step: int,
        engine,
        ema,
        loader,
        scheduler,
        lr_factor: Callable[[int], float],
        meta: dict,
        agree,
        gen: int | None,
    ):
        self.rundir, self.denv = rundir, denv
        self.every, self.keep, self.last_step = every, keep, last_step
        self.engine, self.ema, self.loader, self.scheduler, self.lr_factor = engine, ema, loader, scheduler, lr_factor
        self.state = TrainState(engine)
        self.meta = meta
        self.agree: Callable[[bool], bool] = agree
        self.gen = gen
        self.last_saved: int | None = None

    # -- resume --------------------------------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the newest intact checkpoint into engine, EMA, scheduler and loader; its step (0: none)."""
        import torch.distributed as dist

        t0 = time.perf_counter()
        box: list = [None, None]
        if self.denv.rank == 0:
            ck, skipped = newest_intact(self.rundir)
            if ck is None and skipped:
                box[1] = f"run {self.rundir}: no intact checkpoint: " + "; ".join(skipped)
            elif ck is not None:
                box[0] = (ck.tag, ck.meta)
                if skipped:
                    log.warning("resuming from %s, the newest intact checkpoint", ck.where)
        dist.broadcast_object_list(box, src=0)
        if box[1]:
            raise CheckpointError(box[1])
        if box[0] is None:
            return 0
        ck = Checkpoint(self.rundir, *box[0])
        if ck.legacy:
            return self._resume_legacy(ck)
        if self.rundir.remote and self.denv.local_rank == 0 and self.denv.rank != 0:
            ck.verify()  # this node's download
        dist.barrier()
        t_verified = time.perf_counter()
        self._check_shapes(ck)
        local = ck.local_dir()
        files: dict[str, object] = {}

        def get(kind: str, name: str) -> torch.Tensor:
            fname = ck.meta["tensors"][f"{kind}/{name}"]
            if fname not in files:
                files[fname] = safe_open(str(local / fname), framework="pt")
            return files[fname].get_tensor(f"{kind}/{name}")

        opt = ck.meta.get("optimizer", {})
        self.state.load(get, int(opt.get("steps", 0)))
        files.clear()
        self.ema.load_state_dict(ck.ema_state())
        self._set_schedule(int(opt.get("scheduler_steps", opt.get("steps", 0))))
        self.loader.load_state_dict(ck.meta["data"])
        self.last_saved = ck.step
        if self.denv.rank == 0:
            m = ck.meta
            log.info(
                "resumed from %s (written by %s processes at ZeRO-%s) in %.2f s: found and verified in %.2f s, "
                "loaded in %.2f s",
                ck.where,
                m.get("world_size"),
                m.get("zero_stage"),
                time.perf_counter() - t0,
                t_verified - t0,
                time.perf_counter() - t_verified,
            )
        return ck.step

    def _check_shapes(self, ck: Checkpoint) -> None:
        want = ck.meta.get("shapes", {})
        have = self.state.shapes()
        bad = [f"{n}: {want.get(n)} in the checkpoint, {s} here" for n, s in have.items() if want.get(n) != s]
        bad += [f"{n}: only in the checkpoint" for n in want if n not in have]
        if bad:
            raise CheckpointError(f"{ck.where} does not fit this model: {'; '.join(bad[:5])}")

    def _set_schedule(self, steps: int) -> None:
        """The scheduler at `steps` optimizer steps, with the lr the config gives for that step (not the saved
        lr: an accepted change of optim.lr or warm-up is what the next step uses)."""
        if self.scheduler is None:
            return
        self.scheduler.last_epoch = steps
        lrs = []
        for group in self.scheduler.optimizer.param_groups:
            group["lr"] = group.get("initial_lr", group["lr"]) * self.lr_factor(steps)
            lrs.append(group["lr"])
        self.scheduler._last_lr = lrs

    def _resume_legacy(self, ck: Checkpoint) -> int:
        """A format-1 checkpoint (DeepSpeed's files): only on the world size and ZeRO stage that wrote it."""
        m = ck.meta
        if m.get("world_size") != self.denv.world_size or m.get("zero_stage") != self.state_stage:
            raise CheckpointError(
                f"{ck.where} was written by an older ditscale on {m.get('world_size')} processes at ZeRO-"
                f"{m.get('zero_stage')}; that layout resumes only there (this run: {self.denv.world_size} "
                f"processes, ZeRO-{self.state_stage}). Convert it once with `python -m ditscale checkpoint "
                f"convert {self.rundir}` (or resume once on {m.get('world_size')} processes at ZeRO-"
                f"{m.get('zero_stage')}: the next checkpoint is in the new layout, which resumes anywhere)"
            )
        import torch.distributed as dist

        if self.denv.local_rank == 0:
            self.rundir.checkpoint_local(ck.tag)
        dist.barrier()
        path = self.rundir.checkpoint_local(ck.tag, download=False)
        self.engine.checkpoint_engine = SafeCheckpointEngine()
        load_path, _ = self.engine.load_checkpoint(
            str(path.parent), tag=ck.tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise CheckpointError(f"{ck.where}: DeepSpeed could not load it")
        self.ema.load_state_dict(ck.ema_state())
        steps = ck.step
        self._set_schedule(steps)
        self.loader.load_state_dict({"version": 2, "samples": steps * self.loader.schedule.B})
        # (see the warning below: the per-rank data positions of the older layout have no global equivalent)
        samples = steps * self.loader.schedule.B
        log.warning("%s: resumed from an older ditscale's layout; data continues in the global order", ck.where)
        log.info("data position after the older layout: sample %d", samples)
        self.last_saved = steps
        return steps

    @property
    def state_stage(self) -> int:
        return int(self.meta.get("zero_stage", 0))

    # -- save ----------------------------------------------------------------------------------------------------
    def due(self, step: int, force: bool = False) -> bool:
        """Whether step `step` should be saved: every `every` steps, the last step, or `force` (a stop), unless it
        is saved already."""
        if self.last_saved == step:
            return False
        return force or step % self.every == 0 or step >= self.last_step

    def save(self, step: int, data_state: dict, fence_ok: Callable[[], bool] = lambda: True) -> str:
        """Write, then publish, checkpoint `step`. Raises CheckpointError naming the path and the OS error.
        `fence_ok()` (rank 0: the lease is still provably held) is agreed before anything becomes visible."""
        import torch.distributed as dist

        tag, rank, local_rank, world = tag_for(step), self.denv.rank, self.denv.local_rank, self.denv.world_size
        stage = self.rundir.staging_dir(self.gen)
        if local_rank == 0:
            shutil.rmtree(stage / tag, ignore_errors=True)
            (stage / tag).mkdir(parents=True, exist_ok=True)
        dist.barrier()
        t0 = time.perf_counter()
        errors: list[str] = []
        mine = self._write_shares(stage / tag, rank, world, errors)  # collective: never raises on one rank only
        if rank == 0 and not errors:
            try:
                ema = {k: v.contiguous() for k, v in self.ema.state_dict().items()}
                mine["files"][EMA_FILE] = _write_file(stage / tag / EMA_FILE, save_safetensors(ema))
            except Exception as e:  # disk full, permissions: reported with the path, below
                errors.append(write_failure(stage / tag, e))
        error = errors[0] if errors else None
        self._settle(error, stage, tag, "writing")
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        if self.rundir.remote:
            self._fence(fence_ok, stage, tag, "uploaded")
            try:
                if local_rank == 0:  # every node uploads what its ranks wrote (names never collide between ranks)
                    storage.put_tree(str(stage / tag), self.rundir.path(f"{CKPT}/{tag}"))
            except DitscaleError as e:
                error = str(e)
            self._settle(error, stage, tag, "uploading")
        self._fence(fence_ok, stage, tag, "published")
        if rank == 0:
            meta = self._meta(step, tag, data_state, gathered)
            self._publish(tag, stage, meta)
        dist.barrier()
        if self.rundir.remote and local_rank == 0:
            shutil.rmtree(stage / tag, ignore_errors=True)
        self.last_saved = step
        if rank == 0:
            log.info("checkpoint %s/%s/%s (%.1fs)", self.rundir, CKPT, tag, time.perf_counter() - t0)
        return tag

    def _write_shares(self, where: Path, rank: int, world: int, errors: list[str]) -> dict:
        """Assemble every parameter (collective, one at a time) and write this rank's share in <= 1 GiB files.
        A failed write is appended to `errors` and the assembly goes on, so no rank leaves the others waiting."""
        sizes = [p.ds_numel if hasattr(p, "ds_numel") else p.numel() for _, p in self.state.params]
        owner = owners(sizes, world)
        files: dict[str, dict] = {}
        tensors: dict[str, str] = {}
        batch: dict[str, torch.Tensor] = {}
        nbytes, chunk = 0, 0

        def flush() -> None:
            nonlocal batch, nbytes, chunk
            if batch and not errors:
                name = train_file(rank, chunk)
                try:
                    files[name] = _write_file(where / name, save_safetensors(batch))
                except Exception as e:  # disk full, permissions: reported with the path
                    errors.append(write_failure(where, e))
                tensors.update(dict.fromkeys(batch, name))
            batch, nbytes, chunk = {}, 0, chunk + 1

        for i, (name, full) in enumerate(self.state.tensors()):
            if owner[i] != rank:
                continue
            for kind in KINDS:
                batch[f"{kind}/{name}"] = full[kind]
                nbytes += full[kind].numel() * full[kind].element_size()
            if nbytes >= FILE_BYTES:
                flush()
        flush()
        return {"files": files, "tensors": tensors}

    def _meta(self, step: int, tag: str, data_state: dict, gathered: list) -> dict:
        files, tensors = {}, {}
        for part in gathered:
            files.update(part["files"])
            tensors.update(part["tensors"])
        d = self.denv
        return {
            **self.meta,
            "format": FORMAT,
            "step": step,
            "tag": tag,
            "time": time.time(),
            "data": data_state,
            "samples": data_state.get("samples"),
            "optimizer": {"steps": self.state.optimizer_steps(), "scheduler_steps": self._scheduler_steps()},
            "world_size": d.world_size,
            "nodes": math.ceil(d.world_size / max(d.local_world_size, 1)),
            "lease_gen": self.gen,
            "shapes": self.state.shapes(),
            "tensors": tensors,
            "files": files,
        }

    def _scheduler_steps(self) -> int:
        return int(self.scheduler.last_epoch) if self.scheduler is not None else 0

    def _fence(self, fence_ok: Callable[[], bool], stage: Path, tag: str, what: str) -> None:
        """Every rank learns whether rank 0 still provably holds the lease; if not, nothing more is written."""
        if self.agree(fence_ok()):
            return
        self._drop(stage, tag)
        raise LeaseLostError(
            f"checkpoint {self.rundir}/{CKPT}/{tag}: not {what}: this trainer can no longer prove it holds the run's "
            "lease; it writes nothing more"
        )

    def _drop(self, stage: Path, tag: str) -> None:
        if self.denv.local_rank == 0:
            shutil.rmtree(stage / tag, ignore_errors=True)

    def _settle(self, error: str | None, stage: Path, tag: str, what: str) -> None:
        """All ranks agree on success; on any failure the partial checkpoint is removed and every rank raises."""
        if self.agree(error is None):
            return
        self._drop(stage, tag)
        where = f"{self.rundir}/{CKPT}/{tag}"
        prev = tag_for(self.last_saved) if self.last_saved else None
        keep = f"; the newest complete checkpoint is still {prev}" if prev else ""
        raise CheckpointError(f"checkpoint {where}: {what} failed: {error or 'on another rank'}{keep}")

    def _publish(self, tag: str, stage: Path, meta: dict) -> None:
        """Rank 0: meta.json last, then `latest`, then pruning; each behind the lease's fence."""
        rd = self.rundir
        body = json.dumps(meta, indent=1).encode()
        if rd.remote:
            rd.write_bytes(f"{CKPT}/{tag}/meta.json", body)
        else:
            storage.write_bytes(str(stage / tag / "meta.json"), body)
            final = rd.local / CKPT / tag
            rd.guard(f"publish {CKPT}/{tag}")
            if final.exists():  # the same step saved again (a resume that stopped at once): replace it
                shutil.rmtree(final)
            (stage / tag).rename(final)
            storage.fsync_dir(str(rd.local / CKPT))
        rd.publish_latest(tag)
        # Keep this one and the keep-1 newest before it. Newer tags than this one are left alone: a resume that
        # skipped them (damaged) will write over them as it reaches their steps.
        older = [t for t in rd.complete_tags() if step_of(t) < step_of(tag)]
        for old in older[: max(0, len(older) - (self.keep - 1))]:
            rd.rmtree(f"{CKPT}/{old}")
            log.info("removed old checkpoint %s", old)


class SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine for reading format-1 checkpoints without running code: torch.load with
    weights_only=True, allowing only the three plain record classes DeepSpeed's ZeRO files hold."""

    def __new__(cls):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        class _Safe(TorchCheckpointEngine):
            def load(self, path: str, map_location=None):
                from deepspeed.runtime.fp16.loss_scaler import LossScaler
                from deepspeed.runtime.zero.config import ZeroStageEnum
                from deepspeed.utils.tensor_fragment import fragment_address

                return load_tensor_file(path, allow=(LossScaler, ZeroStageEnum, fragment_address))

        return _Safe()


# --- reading checkpoints back (eval, export, sample: no DeepSpeed needed) --------------------------------------
def load_config_of(rundir: RunDir, tag: str | None = None):
    """(Config, tag, meta) of a run's newest intact checkpoint (or `tag`, verified)."""

    ck = load_checkpoint(rundir, tag, check=lambda c: None)  # its meta.json only: it reads
    return config_from_dict(ck.meta["config"], origin=f"{ck.where}/meta.json"), ck.tag, ck.meta


def load_state_for_eval(run_dir: str, ema: bool = True, tag: str | None = None):
    """(cfg, state_dict, tag): the EMA (or raw) weights of a run's checkpoint, on CPU, verified."""

    rundir = RunDir(run_dir)
    if not rundir.exists(""):
        raise CheckpointError(f"run directory {run_dir!r} does not exist")
    ck = load_checkpoint(rundir, tag, check=(lambda c: c.ema_state()) if ema else None)
    cfg = config_from_dict(ck.meta["config"], origin=f"{ck.where}/meta.json")
    return cfg, ck.ema_state() if ema else ck.raw_state(), ck.tag


def load_for_eval(run_dir: str, ema: bool = True, tag: str | None = None):
    """(cfg, model): the run's DiT with its EMA (or raw) weights, on CPU, in eval mode. Raises CheckpointError
    when the run has no intact checkpoint."""
    cfg, state, tag = load_state_for_eval(run_dir, ema=ema, tag=tag)
    model = cfg.model.build()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {run_dir}/{CKPT}/{tag} does not match {cfg.model.variant}: "
            f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )
    return cfg, model.eval()


__all__ = [
    "Checkpoint",
    "Checkpointer",
    "load_checkpoint",
    "load_config_of",
    "load_for_eval",
    "load_state_for_eval",
    "newest_intact",
    "step_of",
    "tag_for",
]
