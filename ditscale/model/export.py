"""Exported DiT weights: files facebookresearch/DiT loads, that a windowed model cannot pass as a global one, and a
loader that rebuilds the exact model from the files alone.

An export is three files with one base name:
    NAME.pt           torch.save of the state dict, the reference's parameter names (DiT's `find_model` loads it)
    NAME.safetensors  the same tensors; its metadata holds the model description below (key "ditscale", JSON)
    NAME.json         the model description, typed JSON: format, version, variant, depth, hidden_size, patch_size,
                      num_heads, mlp_ratio, input_size, in_channels, num_classes, learn_sigma, class_dropout_prob,
                      windows (spec), block_windows (one entry per block, null = global), reference_compatible,
                      whatever the exporter adds (weights, checkpoint, run), and `files`: the size and sha256 of
                      NAME.pt and NAME.safetensors of this export

The reference DiT has no windows: loaded there, a windowed model's weights compute global attention in every
block, a different model. So a windowed export also carries the tensor `ditscale_windows` (int64, one entry per
block, 0 = global): a strict load into the reference (or into a global model) fails on that unexpected key instead
of silently computing something else. `load_exported(path)` rebuilds the windowed model exactly.

Each file is written under a temporary name and renamed into place (ditscale.io.storage.write_bytes), NAME.json
last. Three renames are not one, so the files vouch for each other instead: `read_export` loads the file it is
given, and the weights of NAME.pt or NAME.safetensors are used with NAME.json only when their size and sha256 are
the ones NAME.json lists. An export killed half-way over an older one leaves files that refuse to load together
(named), never a model made of two exports. NAME.safetensors is whole by itself (its own description).
Nothing read runs code: safetensors, JSON, and NAME.pt through torch.load(weights_only=True).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ditscale.errors import CheckpointError
from ditscale.io import storage
from ditscale.model.checkpoint import WINDOWS_KEY, load_reference_state_dict, load_tensor_file
from ditscale.model.dit import DiT, DiT_models
from ditscale.model.spec import ARCH_KEYS, FORMAT, model_spec
from ditscale.model.windows import parse_windows

SUFFIXES = (".pt", ".pth", ".safetensors", ".json")


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


def _split(path: str) -> tuple[str, str]:
    """(NAME, suffix) of an export path; suffix "" for a bare NAME (or a name with another suffix)."""
    stem, suffix = os.path.splitext(path)
    return (stem, suffix) if suffix in SUFFIXES else (path, "")


def _file_entry(path: str, data: bytes) -> dict[str, Any]:
    return {"name": storage.basename(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _out(path: str):
    return Path(path) if storage.is_local(path) else path


def save_export(
    state: Mapping[str, torch.Tensor], spec: Mapping[str, Any], out: str | os.PathLike, *, info: Mapping | None = None
) -> dict[str, Path | str]:
    """Write NAME.pt, NAME.safetensors and NAME.json (NAME: `out` without a .pt/.pth/.safetensors/.json suffix;
    a local path or an object-storage URL), each atomically, NAME.json last with the size and sha256 of the others.

    `state`: the model's state dict (reference names); `spec`: model_spec(model); `info`: extra JSON-able entries
    for the description (e.g. weights, checkpoint, run). Returns {"pt", "safetensors", "json"} paths (Path for a
    local export). All three files get the same mode (that of a file this process creates).
    """
    from safetensors.torch import save as st_save

    base, _ = _split(storage.normalize(os.fspath(out)))
    meta = {**dict(spec), **dict(info or {})}
    tensors = {k: v.detach().to("cpu").float().contiguous().clone() for k, v in state.items() if k != WINDOWS_KEY}
    if not meta.get("reference_compatible", True):
        tensors[WINDOWS_KEY] = windows_tensor(meta["block_windows"])
    paths = {ext: f"{base}.{ext}" for ext in ("pt", "safetensors", "json")}
    files: dict[str, dict[str, Any]] = {}
    _drop_unverifiable_description(paths["json"])
    # one file's bytes in memory at a time (beside the tensors): each is hashed, written and dropped
    buf = io.BytesIO()
    torch.save(tensors, buf)
    data = buf.getvalue()
    del buf
    files["pt"] = _file_entry(paths["pt"], data)
    storage.write_bytes(paths["pt"], data)
    # safetensors metadata is str -> str: the typed description goes in one JSON entry, a few plain copies beside it
    st_meta = {"ditscale": json.dumps(meta, sort_keys=True), "format": FORMAT, "windows": str(meta["windows"])}
    data = st_save(tensors, metadata=st_meta)
    files["safetensors"] = _file_entry(paths["safetensors"], data)
    storage.write_bytes(paths["safetensors"], data)
    del data
    storage.write_text(paths["json"], json.dumps({**meta, "files": files}, indent=1) + "\n")
    return {k: _out(v) for k, v in paths.items()}


def _drop_unverifiable_description(path: str) -> None:
    """Remove an older NAME.json that lists no file checksums (written before them, or damaged) before replacing
    the export: it would vouch for whatever NAME.pt an interrupted export leaves beside it."""
    raw = storage.read_bytes_or_none(path)
    if raw is None:
        return
    try:
        ok = "files" in json.loads(raw)
    except (ValueError, TypeError):
        ok = False
    if not ok:
        storage.remove(path)


def save_model(model, out: str | os.PathLike, *, variant: str | None = None, info: Mapping | None = None):
    """save_export of a DiT's own weights and description."""
    return save_export(model.state_dict(), model_spec(model, variant), out, info=info)


def _legacy_spec(meta: Mapping[str, str], state: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    """The description of an export written before typed metadata (flat strings; variant + windows)."""

    variant = meta.get("variant")
    if variant not in DiT_models:
        raise CheckpointError(f"{source}: export metadata names no known DiT variant: {variant!r}")
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


def _read(path: str) -> bytes:
    try:
        return storage.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise CheckpointError(f"{path}: file not found") from None


def _read_safetensors(path: str, data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file's bytes; CheckpointError naming the file otherwise."""
    from safetensors.torch import load as st_load

    try:
        state = st_load(data)
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
    except Exception as e:
        raise CheckpointError(f"{path}: not a safetensors file, or a damaged one ({type(e).__name__}: {e})") from None
    return state, dict(header.get("__metadata__") or {})


def _read_pt(path: str, data: bytes) -> dict[str, torch.Tensor]:
    state = load_tensor_file(path, data)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return dict(state)


def _read_description(path: str) -> dict[str, Any]:
    try:
        desc = json.loads(_read(path))
    except ValueError as e:
        raise CheckpointError(f"{path}: not a JSON model description ({e})") from None
    if not isinstance(desc, dict):
        raise CheckpointError(f"{path}: expected a JSON object (the model description)")
    return desc


def _check_belongs(weights: str, data: bytes, kind: str, desc_path: str, desc: Mapping[str, Any]) -> None:
    """`weights` (of kind "pt" or "safetensors") must be the file `desc` lists; descriptions from before the
    `files` entry list none and are taken as they are."""
    entry = (desc.get("files") or {}).get(kind)
    if entry is None:
        if "files" in desc:
            raise CheckpointError(f"{desc_path}: lists no NAME.{kind} file; {weights} is not part of this export")
        return
    got = hashlib.sha256(data).hexdigest()
    if entry.get("sha256") != got or entry.get("bytes") != len(data):
        raise CheckpointError(
            f"{weights} does not belong to the export described by {desc_path} ({len(data)} bytes, sha256 "
            f"{got[:16]}...; the description lists {entry.get('bytes')} bytes, sha256 {str(entry.get('sha256'))[:16]}"
            "...): these files come from two exports (e.g. an export killed while it replaced an older one). Export "
            "again" + (f", or load {_split(weights)[0]}.safetensors, whole by itself" if kind == "pt" else "")
        )


def _described(desc: Mapping[str, Any], state: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    if "format" not in desc:  # an export written before typed metadata
        return _legacy_spec(desc, state, source)
    return {k: v for k, v in desc.items() if k != "files"}


def _from_safetensors(path: str, desc_path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    data = _read(path)
    state, raw = _read_safetensors(path, data)
    if "ditscale" in raw:
        try:
            return state, json.loads(raw["ditscale"])
        except ValueError as e:
            raise CheckpointError(f"{path}: its 'ditscale' metadata is not JSON ({e})") from None
    if raw.get("variant"):
        return state, _legacy_spec(raw, state, path)
    if not storage.exists(desc_path):
        raise CheckpointError(f"{path}: no ditscale model description (safetensors metadata or {desc_path})")
    desc = _read_description(desc_path)
    _check_belongs(path, data, "safetensors", desc_path, desc)
    return state, _described(desc, state, desc_path)


def _from_pt(path: str, desc_path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    data = _read(path)
    if not storage.exists(desc_path):
        _read_pt(path, data)  # a damaged or unsafe file is named as such
        raise CheckpointError(
            f"{path}: no ditscale model description ({desc_path} is missing); for an official DiT checkpoint build "
            "the model and call ditscale.model.load_reference_state_dict"
        )
    state = _read_pt(path, data)  # first: an unsafe file is named as such whatever its description says
    desc = _read_description(desc_path)
    _check_belongs(path, data, "pt", desc_path, desc)
    return state, _described(desc, state, desc_path)


def _from_description(path: str, base: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    desc = _read_description(path)
    for kind in ("safetensors", "pt"):
        weights = f"{base}.{kind}"
        if ("files" in desc and kind not in desc["files"]) or not storage.exists(weights):
            continue
        data = _read(weights)
        _check_belongs(weights, data, kind, path, desc)
        state = _read_safetensors(weights, data)[0] if kind == "safetensors" else _read_pt(weights, data)
        return state, _described(desc, state, path)
    raise CheckpointError(f"{path}: the weights it describes ({base}.safetensors or {base}.pt) are not there")


def read_export(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, description) of the export file named: NAME.safetensors (its own description), NAME.pt or
    NAME.pth (with NAME.json, which must list it), NAME.json (the weights it lists: NAME.safetensors, else
    NAME.pt), or a bare NAME (as NAME.json, else NAME.safetensors, else NAME.pt). Local paths or URLs."""
    p = storage.normalize(os.fspath(path))
    base, suffix = _split(p)
    if not suffix:
        suffix = next((s for s in (".json", ".safetensors", ".pt") if storage.exists(base + s)), "")
        if not suffix:
            raise CheckpointError(f"{path}: no export found (NAME.json, NAME.safetensors or NAME.pt)")
        p = base + suffix
    if suffix == ".safetensors":
        return _from_safetensors(p, base + ".json")
    if suffix == ".json":
        return _from_description(p, base)
    return _from_pt(p, base + ".json")


def load_exported(path: str | os.PathLike, *, attention_backend: str = "auto"):
    """The exact DiT of an export (the file named: NAME.pt, NAME.safetensors, NAME.json or a bare NAME, see
    read_export; or a diffusers folder written by `ditscale export --format diffusers`), built from the files
    alone, in eval mode on the CPU."""
    p = Path(path)
    if storage.is_local(os.fspath(path)) and p.is_dir():
        # lazy: import cycle, ditscale.interop.diffusers imports ditscale.model
        from ditscale.interop.diffusers import from_diffusers

        return from_diffusers(p, attention_backend=attention_backend).eval()

    state, meta = read_export(path)
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
