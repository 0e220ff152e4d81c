"""Shared plumbing for the evaluation commands: loading runs and images, writing results, small checks.

Everything that touches another area (trainer checkpoints, data shards, diffusion) goes through here, so the
metric modules stay plain functions of tensors and models.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from ditscale.data import iter_dataset, read_manifest
from ditscale.diffusion import diffusion_from_config
from ditscale.distenv import detect
from ditscale.errors import DataError
from ditscale.io import storage
from ditscale.io.rundir import EVAL, RunDir
from ditscale.train.checkpoint import load_for_eval

log = logging.getLogger("ditscale.eval")


# ----------------------------------------------------------------------------------------------- paths and I/O
# Every read and write goes through ditscale.io (local paths and object-storage URLs alike).
join = storage.join
exists = storage.exists


def write_json(url: str, obj: Any) -> str:
    storage.write_text(url, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    return url


def read_json(url: str) -> Any:
    return json.loads(storage.read_bytes(url))


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):  # numpy arrays and scalars
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__}")


def save_figure(fig, url: str) -> str:
    """Save a matplotlib figure as PNG to a local path or URL, then close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(url, buf.getvalue())
    return url


def eval_dir(run_dir: str) -> str:
    return RunDir(run_dir).path(EVAL)


def write_result(run_dir: str, metric: str, result: dict) -> str:
    """Write `{run_dir}/eval/<metric>.json` (what `ditscale.results.collect` and `ditscale report` read)."""
    url = join(eval_dir(run_dir), f"{metric}.json")
    write_json(url, result)
    log.info("wrote %s", url)
    return url


# ----------------------------------------------------------------------------------------------- runs and data
def resolve_device(name: str | None = "auto") -> torch.device:
    """ "auto": this rank's GPU when CUDA is available (LOCAL_RANK under torchrun), else the CPU."""
    if name and name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", detect().local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def device_of(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def load_run(run_dir: str, ema: bool = True, tag: str | None = None, device: str | torch.device | None = None):
    """(cfg, model) of a run's checkpoint in eval mode, on `device` (default CPU). CheckpointError when the run
    has no complete checkpoint."""

    cfg, model = load_for_eval(run_dir, ema=ema, tag=tag)
    model.eval()
    if device is not None:
        model.to(device)
    return cfg, model


def make_diffusion(cfg, steps: int | str = ""):
    """The run's diffusion process, optionally respaced to `steps` sampling steps."""

    return diffusion_from_config(cfg, str(steps) if steps else "")


def manifest_of(url: str) -> dict:
    return read_manifest(url)


def check_compatible(model, manifest: dict, url: str) -> None:
    """DataError when the shards' resolution or channels differ from what the model was built for."""
    res = manifest.get("resolution")
    ch = manifest.get("channels")
    if res is not None and int(res) != int(model.input_size):
        raise DataError(
            f"resolution mismatch: shards {url!r} are {res}x{res} but the model takes "
            f"{model.input_size}x{model.input_size} inputs (model.input_size)"
        )
    if ch is not None and int(ch) != int(model.in_channels):
        raise DataError(f"channel mismatch: shards {url!r} have {ch} channels but the model takes {model.in_channels}")


def load_images(url: str, limit: int | None = None, model=None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The first `limit` samples of a shard set in index order: images (K, C, H, W) in [-1, 1], labels, indices."""

    if not url:
        raise DataError("no shard manifest given (set data.train / data.test in the run's config, or pass --test)")
    manifest = manifest_of(url)
    if model is not None:
        check_compatible(model, manifest, url)
    images, labels, indices = [], [], []
    for item in iter_dataset(url):
        img, label, index = item[0], item[1], item[2]
        img = torch.as_tensor(img, dtype=torch.float32)
        images.append(img)
        labels.append(int(label))
        indices.append(int(index))
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise DataError(f"shard set {url!r} holds no samples")
    x = torch.stack(images)
    if model is not None and tuple(x.shape[1:]) != (model.in_channels, model.input_size, model.input_size):
        raise DataError(
            f"images of {url!r} have shape {tuple(x.shape[1:])}, the model expects "
            f"{(model.in_channels, model.input_size, model.input_size)}"
        )
    return x, torch.tensor(labels, dtype=torch.long), indices


def model_labels(model, labels: torch.Tensor) -> torch.Tensor:
    """Labels the model accepts: the class labels, or the null class for an unconditional (1-class) model."""
    n = int(getattr(model, "num_classes", 0) or 0)
    if n <= 1:
        return torch.zeros_like(labels)
    return labels.clamp(0, n - 1)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]."""
    return ((x + 1) / 2).clamp(0, 1)
