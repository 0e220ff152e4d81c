"""Loading official facebookresearch/DiT checkpoints (and ditscale exports) into a DiT, with clear errors.

Nothing read here runs code: `.pt` files go through `load_tensor_file` (torch.load with weights_only=True: tensors,
plain containers and numbers, plus only the classes a caller allow-lists), safetensors files hold tensors only.
"""

from __future__ import annotations

import io
import os
import types
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ditscale.errors import CheckpointError
from ditscale.model.windows import format_windows

# The state-dict entry a windowed export carries (the block windows, 0 = global): a strict load into a model with
# other windows, the reference DiT included, fails instead of silently computing another model.
WINDOWS_KEY = "ditscale_windows"

_PREFIXES = ("module.", "_orig_mod.")


# What a facebookresearch/DiT checkpoint holds besides tensors and plain containers: train.py saves {"model", "ema",
# "opt", "args"} with `args` an argparse.Namespace. It is read as a types.SimpleNamespace (attributes only): the one
# name allow-listed for reference checkpoints.
REFERENCE_GLOBALS = ((types.SimpleNamespace, "argparse.Namespace"),)


def load_tensor_file(
    path: str | os.PathLike, data: bytes | None = None, *, allow: Iterable = (), source: str | None = None
) -> Any:
    """torch.load(weights_only=True) of the file `path` (or of its bytes `data`, read by the caller), `allow` the
    only classes allow-listed beyond tensors and plain containers (classes, or (class, "module.Name") to read the
    pickled name as that class). A pickle that would run code or build other objects is refused before anything in
    it runs: CheckpointError naming the file (`source`, default `path`); so is a damaged file."""
    source = source or str(path)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(io.BytesIO(data) if data is not None else path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{source}: file not found") from None
    except Exception as e:
        raise refused(source, e) from None


def refused(source: str | os.PathLike, exc: BaseException) -> CheckpointError:
    """The error for a weights file torch.load(weights_only=True) would not load: it names the file and says why."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError):
        lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
        detail = next((x for x in lines if "GLOBAL" in x or "Unsupported" in x), lines[-1] if lines else "")
        # torch's advice to allow-list what the file asks for is dropped: that is how code would get in
        detail = detail.split(" Please use")[0].removeprefix("WeightsUnpickler error: ").rstrip(".")
        return CheckpointError(
            f"{source}: refused: it holds code or objects that are not tensors (or is not a tensors file at all); "
            f"nothing in it was run ({detail}). Only tensors and plain containers are loaded from weights files"
        )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return CheckpointError(f"{source}: cannot read it as a weights file ({type(exc).__name__}: {first})")


def extract_state_dict(obj, source: str = "checkpoint", prefer: str = "ema") -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded checkpoint object.

    Accepts a raw state dict (the released DiT-XL-2-256x256.pt files) or a training checkpoint with "ema" and/or
    "model" keys (facebookresearch/DiT train.py writes {"model", "ema", "opt", "args"}); `prefer` picks which of the
    two when both are present. Strips "module." (DDP) and "_orig_mod." (torch.compile) prefixes.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{source}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    sd = obj
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        order = [prefer] + [k for k in ("ema", "model", "state_dict") if k != prefer]
        for key in order:
            if isinstance(obj.get(key), Mapping):
                sd = obj[key]
                break
        else:
            raise CheckpointError(
                f"{source}: no model weights found; expected a raw state dict or a dict with an 'ema' or 'model' "
                f"entry, got keys {sorted(map(str, obj))[:10]}"
            )
    out = {}
    for name, value in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if name.startswith(p):
                    name, changed = name[len(p) :], True
        out[name] = value
    return out


def load_reference_state_dict(model: torch.nn.Module, sd_or_path, *, source: str | None = None, prefer: str = "ema"):
    """Load an official DiT state dict (or a path to one) with strict=True semantics and a readable error.

    Raises CheckpointError listing missing, unexpected and shape-mismatched keys (with both shapes) instead of
    torch's generic message. Returns the model.
    """
    if isinstance(sd_or_path, str | os.PathLike):
        source = source or str(sd_or_path)
        if not os.path.exists(sd_or_path):
            raise CheckpointError(f"{source}: checkpoint file not found")
        obj = load_tensor_file(sd_or_path, allow=REFERENCE_GLOBALS, source=source)
    else:
        obj = sd_or_path
    source = source or "state dict"
    sd = extract_state_dict(obj, source, prefer)
    others = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise CheckpointError(f"{source}: entries that are not tensors: {others[:8]} (expected a state dict)")
    sd = _check_windows_marker(model, sd, source)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        desc = _describe(model)
        parts = [f"{source} does not match the model{desc}:"]
        groups = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        for title, items in groups:
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
                parts.append(f"{len(items)} {title}: {shown}")
        raise CheckpointError("\n  ".join(parts))
    model.load_state_dict(sd, strict=True)
    return model


def _check_windows_marker(model, sd: dict, source: str) -> dict:
    """A windowed export carries `ditscale_windows` (ditscale.model.export): the model must have those windows."""

    if WINDOWS_KEY not in sd:
        return sd
    sd = dict(sd)
    trained = [None if int(k) == 0 else int(k) for k in sd.pop(WINDOWS_KEY).tolist()]
    own = list(getattr(model, "windows", None) or [])
    if own != trained:
        raise CheckpointError(
            f"{source}: these weights are a windowed model ({WINDOWS_KEY}: {format_windows(trained)!r}) but the model "
            f"has windows {format_windows(own) if own else 'none'!r}; load them with ditscale.model.load_exported, "
            f"or build the model with windows={format_windows(trained)!r} (delete '{WINDOWS_KEY}' from the state "
            "dict only to use the weights with other windows on purpose)"
        )
    return sd


def _describe(model) -> str:
    fields = ("input_size", "patch_size", "in_channels", "depth", "num_classes", "learn_sigma")
    if all(hasattr(model, f) for f in fields):
        hidden = model.pos_embed.shape[-1] if hasattr(model, "pos_embed") else "?"
        return (
            f" (DiT depth {model.depth}, hidden {hidden}, patch {model.patch_size}, input {model.input_size}, "
            f"in_channels {model.in_channels}, num_classes {model.num_classes}, learn_sigma {model.learn_sigma})"
        )
    return ""
