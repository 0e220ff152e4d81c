"""Exported DiT weights: files facebookresearch/DiT loads, that a windowed model cannot pass as a global one, and a
loader that rebuilds the exact model from the files alone.

An export is three files with one base name:
    NAME.pt           torch.save of the state dict, the reference's parameter names (DiT's `find_model` loads it)
    NAME.safetensors  the same tensors; its metadata holds the model description below (key "ditscale", JSON)
    NAME.json         the model description, typed JSON: format, version, variant, depth, hidden_size, patch_size,
                      num_heads, mlp_ratio, input_size, in_channels, num_classes, learn_sigma, class_dropout_prob,
                      windows (spec), block_windows (one entry per block, null = global), reference_compatible,
                      and whatever the exporter adds (weights, checkpoint, run)

The reference DiT has no windows: loaded there, a windowed model's weights compute global attention in every
block, a different model. So a windowed export also carries the tensor `ditscale_windows` (int64, one entry per
block, 0 = global): a strict load into the reference (or into a global model) fails on that unexpected key instead
of silently computing something else. `load_exported(path)` rebuilds the windowed model exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ditscale.errors import CheckpointError
from ditscale.model.checkpoint import WINDOWS_KEY
from ditscale.model.spec import ARCH_KEYS, FORMAT, model_spec
from ditscale.model.windows import parse_windows


def windows_tensor(windows) -> torch.Tensor:
    return torch.tensor([0 if w is None else int(w) for w in windows], dtype=torch.int64)


def reference_note(spec: Mapping[str, Any]) -> str | None:
    """What to tell the user about a windowed export (None for a global one): the reference computes another model."""
    if spec.get("reference_compatible", True):
        return None
    return (
        f"note: this model has local attention windows ({spec['windows']}); facebookresearch/DiT's DiT has none and "
        f"would compute global attention in every block with these weights, a different model. The files carry the "
        f"entry '{WINDOWS_KEY}', so a strict load into the reference fails instead. Load the exact model with "
        f"ditscale.model.load_exported(PATH) (delete '{WINDOWS_KEY}' from the state dict only to use the weights as "
        f"a global model on purpose)."
    )


def _same_mode_as(reference: Path, paths) -> None:
    """Give files the mode a plain open() gave `reference` (safetensors' writer creates 0600 files)."""
    mode = reference.stat().st_mode & 0o777
    for p in paths:
        os.chmod(p, mode)


def save_export(
    state: Mapping[str, torch.Tensor], spec: Mapping[str, Any], out: str | os.PathLike, *, info: Mapping | None = None
) -> dict[str, Path]:
    """Write NAME.pt, NAME.safetensors and NAME.json (NAME: `out` without a .pt/.pth/.safetensors/.json suffix).

    `state`: the model's state dict (reference names); `spec`: model_spec(model); `info`: extra JSON-able entries
    for the description (e.g. weights, checkpoint, run). Returns {"pt", "safetensors", "json"} paths. All three
    files get the same mode (that of a file this process creates).
    """
    from safetensors.torch import save as st_save

    base = Path(out)
    if base.suffix in (".pt", ".pth", ".safetensors", ".json"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    meta = {**dict(spec), **dict(info or {})}
    tensors = {k: v.detach().to("cpu").float().contiguous().clone() for k, v in state.items() if k != WINDOWS_KEY}
    if not meta.get("reference_compatible", True):
        tensors[WINDOWS_KEY] = windows_tensor(meta["block_windows"])
    paths = {ext: base.with_suffix("." + ext) for ext in ("pt", "safetensors", "json")}
    torch.save(tensors, paths["pt"])
    # safetensors metadata is str -> str: the typed description goes in one JSON entry, a few plain copies beside it
    st_meta = {"ditscale": json.dumps(meta, sort_keys=True), "format": FORMAT, "windows": str(meta["windows"])}
    paths["safetensors"].write_bytes(st_save(tensors, metadata=st_meta))
    paths["json"].write_text(json.dumps(meta, indent=1) + "\n")
    _same_mode_as(paths["json"], [paths["pt"], paths["safetensors"]])
    return paths


def save_model(model, out: str | os.PathLike, *, variant: str | None = None, info: Mapping | None = None):
    """save_export of a DiT's own weights and description."""
    return save_export(model.state_dict(), model_spec(model, variant), out, info=info)


def _legacy_spec(meta: Mapping[str, str], state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The description of an export written before typed metadata (flat strings; variant + windows)."""
    from ditscale.model.dit import DiT_models

    variant = meta.get("variant")
    if variant not in DiT_models:
        raise CheckpointError(f"export metadata names no known DiT variant: {variant!r}")
    num_classes = int(meta["num_classes"])
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    with torch.device("meta"):
        model = DiT_models[variant](
            input_size=int(meta["input_size"]),
            in_channels=int(meta["in_channels"]),
            num_classes=num_classes,
            learn_sigma=str(meta.get("learn_sigma", "True")).lower() == "true",
            class_dropout_prob=0.1 if rows > num_classes else 0.0,
            windows=meta.get("windows") or "global",
        )
    return model_spec(model, variant)


def _find(path: Path) -> tuple[Path | None, Path | None, Path | None]:
    base = path.with_suffix("") if path.suffix in (".pt", ".pth", ".safetensors", ".json") else path
    found = [p if p.is_file() else None for p in (base.with_suffix(".safetensors"), base.with_suffix(".pt"))]
    if path.suffix == ".pth" and path.is_file():
        found[1] = path
    js = base.with_suffix(".json")
    return found[0], found[1], js if js.is_file() else None


def read_export(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, description) of an export, from NAME.safetensors (preferred) or NAME.pt with NAME.json."""
    p = Path(path)
    st_path, pt_path, js_path = _find(p)
    if st_path is None and pt_path is None:
        raise CheckpointError(f"{path}: no exported weights (NAME.safetensors or NAME.pt) found")
    meta: dict[str, Any] | None = None
    if st_path is not None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        state = load_file(str(st_path))
        with safe_open(str(st_path), framework="pt") as f:
            raw = f.metadata() or {}
        if "ditscale" in raw:
            meta = json.loads(raw["ditscale"])
        elif raw.get("variant"):
            meta = _legacy_spec(raw, state)
    else:
        try:
            state = torch.load(pt_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{pt_path}: cannot read ({type(e).__name__}: {e})") from e
    if meta is None and js_path is not None:
        meta = json.loads(js_path.read_text())
        if "format" not in meta:  # an export written before typed metadata
            meta = _legacy_spec(meta, state)
    if meta is None:
        raise CheckpointError(
            f"{path}: no ditscale model description (safetensors metadata or NAME.json); for an official DiT "
            "checkpoint build the model and call ditscale.model.load_reference_state_dict"
        )
    return dict(state), meta


def load_exported(path: str | os.PathLike, *, attention_backend: str = "auto"):
    """The exact DiT of an export (NAME, NAME.pt, NAME.safetensors or NAME.json; or a diffusers folder written by
    `ditscale export --format diffusers`), built from the files alone, in eval mode on the CPU."""
    p = Path(path)
    if p.is_dir():
        from ditscale.interop.diffusers import from_diffusers

        return from_diffusers(p, attention_backend=attention_backend).eval()
    from ditscale.model.checkpoint import load_reference_state_dict
    from ditscale.model.dit import DiT

    state, meta = read_export(p)
    missing = [k for k in ARCH_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: the model description lacks {missing}")
    windows = meta.get("block_windows")
    if windows is None:
        windows = parse_windows(meta.get("windows", "global"), int(meta["depth"]))
    model = DiT(
        input_size=meta["input_size"],
        patch_size=meta["patch_size"],
        in_channels=meta["in_channels"],
        hidden_size=meta["hidden_size"],
        depth=meta["depth"],
        num_heads=meta["num_heads"],
        mlp_ratio=meta["mlp_ratio"],
        class_dropout_prob=meta["class_dropout_prob"],
        num_classes=meta["num_classes"],
        learn_sigma=meta["learn_sigma"],
        windows=windows,
        attention_backend=attention_backend,
    )
    load_reference_state_dict(model, state, source=str(path))
    return model.eval()
