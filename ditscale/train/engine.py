"""DeepSpeed set-up: process environment, process group, the DeepSpeed config derived from the train and optim
sections, the engine.

Nothing here knows about diffusion or data; the Trainer (trainer.py) composes it with them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ditscale.cache import project_cache
from ditscale.distenv import DistEnv, free_port
from ditscale.errors import ConfigError

if TYPE_CHECKING:  # the sections build the engine (TrainSection.engine): no import back at run time
    from ditscale.config import OptimSection, TrainSection

log = logging.getLogger(__name__)


def setup_process_env(denv: DistEnv) -> None:
    """Defaults that must be in place before DeepSpeed/torch do heavy work. Never overrides what the user set."""
    cache = project_cache()
    # DeepSpeed JIT-builds its CPU shm_comm op once per extensions dir (~50 s): keep one shared, persistent dir.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    # The JIT build needs ninja on PATH: use the venv's (a deepspeed dependency), also where a system ninja of
    # another version exists (they disagree on .ninja_log, which would rebuild the shared op on every switch).
    venv_bin = str(Path(sys.executable).parent)
    if os.path.exists(os.path.join(venv_bin, "ninja")) and not os.environ.get("PATH", "").startswith(venv_bin):
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    _remove_stale_build_locks(Path(os.environ["TORCH_EXTENSIONS_DIR"]))
    # MKL's conditional numerical reproducibility: the same floats whatever the memory alignment of the inputs
    # (which varies from run to run); exact resume on CPU depends on it. Read at MKL's first call.
    os.environ.setdefault("MKL_CBWR", "AUTO")
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun sets 1; the deepspeed launcher and srun do not
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        n = max(1, cores // max(denv.local_world_size, 1))
        os.environ["OMP_NUM_THREADS"] = str(n)
        torch.set_num_threads(n)


def _remove_stale_build_locks(ext_dir: Path, max_age_s: float = 900.0) -> None:
    """A JIT build killed half-way leaves `<op>/lock` behind, and every later build then waits for it forever.
    A build takes 1-3 minutes; a lock older than `max_age_s` is stale."""
    import time

    for lock in ext_dir.glob("*/lock"):
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                log.warning("removed a stale build lock %s (a build was interrupted)", lock)
        except OSError:
            pass


def init_distributed(denv: DistEnv) -> torch.device:
    """Join the process group (gloo on CPU, nccl on CUDA; a group of one when started alone)."""
    import deepspeed

    if not denv.is_distributed and "MASTER_PORT" not in os.environ:
        denv = dataclasses.replace(denv, master_port=free_port())
    denv.export()
    if torch.cuda.is_available():
        torch.cuda.set_device(denv.local_rank)
        device, backend = torch.device("cuda", denv.local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return device


def shutdown(ok: bool, destroy: bool = True) -> None:
    """Leave the process group cleanly (avoids 'terminate called without an active exception' at exit). A group
    that existed before training (e.g. Ray Train's) is left to its owner: `destroy=False`."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if ok:
        dist.barrier()
    if destroy:
        dist.destroy_process_group()


def resolve_precision(precision: str) -> str:
    """train.precision -> "bf16" or "fp32" (auto: bf16 on CUDA, fp32 on CPU)."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    if precision == "bf16" and not torch.cuda.is_available():
        log.warning("train.precision=bf16 on CPU: DeepSpeed's CPU bf16 path is slow and untested here")
    return precision


def grad_accumulation(train: TrainSection, world_size: int) -> int:
    per_step = train.micro_batch * world_size
    if train.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch={train.global_batch} is not a multiple of train.micro_batch ({train.micro_batch}) "
            f"x {world_size} processes = {per_step}: set train.micro_batch to a divisor of "
            f"{train.global_batch // world_size if train.global_batch % world_size == 0 else 'global_batch / world'}"
        )
    return train.global_batch // per_step


def deepspeed_config(train: TrainSection, optim: OptimSection, world_size: int) -> dict:
    conf = {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": grad_accumulation(train, world_size),
        "gradient_clipping": optim.grad_clip,  # 0 disables (DeepSpeed's own default would be 1.0)
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": resolve_precision(train.precision) == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train.zero_stage in (1, 2):
        conf["zero_optimization"].update(overlap_comm=False, contiguous_gradients=True)
    return conf


def apply_activation_checkpointing(model: torch.nn.Module) -> int:
    """Recompute each transformer block in the backward pass (torch.utils.checkpoint), wrapping from outside:
    the block's forward is replaced on the instance, so parameter names (and state dicts) are unchanged."""
    from torch.utils.checkpoint import checkpoint

    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError("train.activation_checkpointing: the model has no .blocks to checkpoint")
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
    return len(blocks)


def build_engine(train: TrainSection, optim: OptimSection, model: torch.nn.Module, world_size: int):
    """(engine, optimizer, lr_scheduler): AdamW (DiT's lr 1e-4, wd 0) + optional warm-up, wrapped by DeepSpeed."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    opt = optim.optimizer(params, fused=torch.cuda.is_available())
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=opt,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, optim.lr_factor),
        config=deepspeed_config(train, optim, world_size),
    )
    if train.compile:
        engine.compile()
    return engine, optimizer, scheduler


def set_tf32(enabled: bool) -> None:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
