"""DiT checkpoints as diffusers `DiTTransformer2DModel` folders, and back.

    from ditscale.interop.diffusers import save_diffusers, load_diffusers, from_diffusers

    save_diffusers(model, "out/transformer")                     # config.json + diffusion_pytorch_model.safetensors
    transformer = load_diffusers("out/transformer")              # diffusers' model, computing exactly ditscale's DiT
    model = from_diffusers("out/transformer")                    # back to a ditscale DiT (any DiT folder)

The parameter mapping is diffusers' own (scripts/convert_dit_to_diffusers.py): qkv split into to_q/to_k/to_v, the
timestep and label embedders copied into every block's AdaLayerNormZero (diffusers computes the conditioning per
block), the final layer as proj_out_1/proj_out_2; the fixed sin-cos position embedding is rebuilt by diffusers.

Two things a plain `DiTTransformer2DModel.from_pretrained(folder)` does differently from the reference DiT:
- Its timestep embedding uses frequencies exp(-ln(10000) i / 127) (`downscale_freq_shift=1`), the reference's
  exp(-ln(10000) i / 128): outputs agree exactly at t = 0 only. `load_diffusers` (or `apply_ditscale` on a loaded
  model) installs the reference's embedding (diffusers' own `Timesteps` with `downscale_freq_shift=0`).
- It has no attention windows. A windowed export keeps its windows in config.json (`ditscale_windows`, which plain
  diffusers reports as an unexpected config attribute and ignores: it then computes global attention);
  `load_diffusers` installs `WindowAttnProcessor` on the windowed blocks.
ditscale's own settings go in config.json's private entry `_ditscale` (diffusers keeps it in `model.config`).

A folder is written whole or not at all: `save_diffusers` writes it under a temporary name beside OUT and swaps it
into place in one rename (Linux renameat2 RENAME_EXCHANGE; elsewhere two renames, so a kill between them leaves no
OUT rather than a mix of two exports). Reading a folder runs no code: config.json is JSON, the weights are
safetensors, or a `.bin` read with torch.load(weights_only=True) (CheckpointError naming the file otherwise).
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ditscale.errors import CheckpointError
from ditscale.io import storage
from ditscale.model.attention import attention
from ditscale.model.checkpoint import load_reference_state_dict, load_tensor_file
from ditscale.model.dit import DiT
from ditscale.model.spec import model_spec

WINDOWS_CONFIG_KEY = "ditscale_windows"
PRIVATE_CONFIG_KEY = "_ditscale"
DIFFUSERS_CLASS_DROPOUT = 0.1  # CombinedTimestepLabelEmbeddings always has the null-class row
CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # preferred first


def _diffusers():
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - the extra is part of `all`
        raise CheckpointError("diffusers is not installed: pip install 'ditscale[diffusers]'") from e
    return diffusers


# ------------------------------------------------------------------------------------------------ attention windows


class WindowAttnProcessor:
    """A diffusers attention processor for a DiT block with a k x k window on the (square) token grid: the same
    border-clipped window as ditscale's blocks (ditscale.model.attention), with the block's own projections."""

    def __init__(self, window: int, backend: str = "auto"):
        self.window = int(window)
        self.backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **kw):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("WindowAttnProcessor: self-attention over (B, N, C) tokens only, without a mask")
        residual = hidden_states
        b, n, _ = hidden_states.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"WindowAttnProcessor: {n} tokens are not a square grid")
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        d = q.shape[-1] // attn.heads
        q, k, v = (z.view(b, n, attn.heads, d).transpose(1, 2) for z in (q, k, v))  # (B, heads, N, d)
        out = attention(q, k, v, (side, side), self.window, self.backend)
        out = out.transpose(1, 2).reshape(b, n, attn.heads * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def __repr__(self) -> str:
        return f"WindowAttnProcessor(window={self.window}, backend={self.backend!r})"


def set_windows(transformer, windows, backend: str = "auto") -> None:
    """Give each block of a DiTTransformer2DModel its window (None: diffusers' default global processor)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    blocks = transformer.transformer_blocks
    windows = list(windows)
    if len(windows) != len(blocks):
        raise CheckpointError(f"windows {windows!r}: {len(windows)} entries for a model of {len(blocks)} blocks")
    for block, w in zip(blocks, windows, strict=True):
        block.attn1.set_processor(WindowAttnProcessor(w, backend) if w is not None else AttnProcessor2_0())


def use_reference_timestep_embedding(transformer) -> None:
    """Replace each block's timestep projection by the reference DiT's frequencies (downscale_freq_shift 0)."""
    from diffusers.models.embeddings import Timesteps

    for block in transformer.transformer_blocks:
        emb = block.norm1.emb
        emb.time_proj = Timesteps(num_channels=emb.time_proj.num_channels, flip_sin_to_cos=True, downscale_freq_shift=0)


def apply_ditscale(transformer, *, backend: str = "auto", timestep_embedding: str = "auto"):
    """Make a loaded DiTTransformer2DModel compute the ditscale DiT it was exported from: windows from its config
    (`ditscale_windows`), and the reference timestep embedding. timestep_embedding: "dit" (the reference's),
    "diffusers" (leave it) or "auto" ("dit" for folders written by ditscale, else "diffusers"). Returns it."""
    cfg = transformer.config
    windows = cfg.get(WINDOWS_CONFIG_KEY) if hasattr(cfg, "get") else getattr(cfg, WINDOWS_CONFIG_KEY, None)
    if windows is not None:
        set_windows(transformer, windows, backend)
    if timestep_embedding == "auto":
        private = cfg.get(PRIVATE_CONFIG_KEY) if hasattr(cfg, "get") else None
        timestep_embedding = (private or {}).get("timestep_embedding", "diffusers")
    if timestep_embedding == "dit":
        use_reference_timestep_embedding(transformer)
    elif timestep_embedding != "diffusers":
        raise CheckpointError(f"timestep_embedding {timestep_embedding!r}: expected 'dit', 'diffusers' or 'auto'")
    return transformer


# ------------------------------------------------------------------------------------------------ ditscale -> diffusers


def diffusers_config(spec: Mapping[str, Any]) -> dict[str, Any]:
    """DiTTransformer2DModel's config for a ditscale model description (ditscale.model.export.model_spec)."""
    if spec["hidden_size"] % spec["num_heads"]:
        raise CheckpointError(f"hidden size {spec['hidden_size']} is not a multiple of {spec['num_heads']} heads")
    if abs(float(spec["mlp_ratio"]) - 4.0) > 1e-9:
        raise CheckpointError(f"mlp_ratio {spec['mlp_ratio']}: diffusers' DiT blocks have mlp_ratio 4 only")
    return {
        "num_attention_heads": spec["num_heads"],
        "attention_head_dim": spec["hidden_size"] // spec["num_heads"],
        "in_channels": spec["in_channels"],
        "out_channels": spec["in_channels"] * (2 if spec["learn_sigma"] else 1),
        "num_layers": spec["depth"],
        "dropout": 0.0,
        "norm_num_groups": 32,
        "attention_bias": True,
        "sample_size": spec["input_size"],
        "patch_size": spec["patch_size"],
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": spec["num_classes"],
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,  # the reference's LayerNorm eps (diffusers' default is 1e-5)
    }


def to_diffusers_state(state: Mapping[str, torch.Tensor], spec: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A DiT state dict (reference names) in DiTTransformer2DModel's names."""
    sd = {k: v for k, v in state.items() if k not in ("pos_embed", "ditscale_windows")}
    table = sd.pop("y_embedder.embedding_table.weight")
    if table.shape[0] == spec["num_classes"]:  # no dropout row (class_dropout_prob 0): diffusers always has one
        table = torch.cat([table, torch.zeros_like(table[:1])])
    t_emb = {f"linear_{j + 1}.{p}": sd.pop(f"t_embedder.mlp.{2 * j}.{p}") for j in (0, 1) for p in ("weight", "bias")}
    out: dict[str, torch.Tensor] = {
        "pos_embed.proj.weight": sd.pop("x_embedder.proj.weight"),
        "pos_embed.proj.bias": sd.pop("x_embedder.proj.bias"),
        "proj_out_1.weight": sd.pop("final_layer.adaLN_modulation.1.weight"),
        "proj_out_1.bias": sd.pop("final_layer.adaLN_modulation.1.bias"),
        "proj_out_2.weight": sd.pop("final_layer.linear.weight"),
        "proj_out_2.bias": sd.pop("final_layer.linear.bias"),
    }
    for i in range(spec["depth"]):
        b, o = f"blocks.{i}.", f"transformer_blocks.{i}."
        for name, value in t_emb.items():
            out[f"{o}norm1.emb.timestep_embedder.{name}"] = value.clone()
        out[f"{o}norm1.emb.class_embedder.embedding_table.weight"] = table.clone()
        for p in ("weight", "bias"):
            out[f"{o}norm1.linear.{p}"] = sd.pop(f"{b}adaLN_modulation.1.{p}")
            q, k, v = sd.pop(f"{b}attn.qkv.{p}").chunk(3, dim=0)
            out[f"{o}attn1.to_q.{p}"], out[f"{o}attn1.to_k.{p}"], out[f"{o}attn1.to_v.{p}"] = q, k, v
            out[f"{o}attn1.to_out.0.{p}"] = sd.pop(f"{b}attn.proj.{p}")
            out[f"{o}ff.net.0.proj.{p}"] = sd.pop(f"{b}mlp.fc1.{p}")
            out[f"{o}ff.net.2.{p}"] = sd.pop(f"{b}mlp.fc2.{p}")
    if sd:
        raise CheckpointError(f"state dict entries with no diffusers counterpart: {sorted(sd)[:8]}")
    return {k: v.contiguous() for k, v in out.items()}


def build_diffusers(
    state: Mapping[str, torch.Tensor], spec: Mapping[str, Any], *, info: Mapping | None = None, backend: str = "auto"
):
    """A DiTTransformer2DModel (eval mode) with a DiT's weights, computing exactly that DiT (windows and the
    reference timestep embedding installed), its config carrying the windows and ditscale's description."""
    diffusers = _diffusers()
    transformer = diffusers.DiTTransformer2DModel(**diffusers_config(spec))
    transformer.load_state_dict(to_diffusers_state(state, spec), strict=True)
    private = {**dict(spec), **dict(info or {}), "timestep_embedding": "dit"}
    extra: dict[str, Any] = {PRIVATE_CONFIG_KEY: json.loads(json.dumps(private))}
    if not spec.get("reference_compatible", all(w is None for w in spec["block_windows"])):
        extra[WINDOWS_CONFIG_KEY] = list(spec["block_windows"])
    transformer.register_to_config(**extra)
    return apply_ditscale(transformer, backend=backend).eval()


def to_diffusers(model, *, variant: str | None = None, backend: str = "auto"):
    """The DiTTransformer2DModel of a ditscale DiT (see build_diffusers)."""
    return build_diffusers(model.state_dict(), model_spec(model, variant), backend=backend)


def save_diffusers(
    model_or_state, out: str | os.PathLike, *, spec: Mapping[str, Any] | None = None, info: Mapping | None = None
) -> Path:
    """Write a folder that `diffusers.DiTTransformer2DModel.from_pretrained(out)` loads (config.json,
    diffusion_pytorch_model.safetensors; files all with the mode of config.json), whole or not at all: it is
    written beside OUT under a temporary name and swapped into place (an older export there is replaced; a folder
    holding other files is refused). `model_or_state`: a DiT, or a state dict with `spec`
    (ditscale.model.export.model_spec). Returns the folder."""
    if isinstance(model_or_state, Mapping):
        if spec is None:
            raise CheckpointError("save_diffusers of a state dict needs its model description (spec)")
        state = model_or_state
    else:
        state, spec = model_or_state.state_dict(), spec or model_spec(model_or_state)
    if not storage.is_local(os.fspath(out)):
        raise CheckpointError(f"{out}: a diffusers folder is written to a local path (copy it to object storage)")
    out = Path(storage.normalize(os.fspath(out))).absolute()
    _check_replaceable(out)
    transformer = build_diffusers(state, spec, info=info)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / storage.tmp_name(out.name)
    try:
        transformer.save_pretrained(tmp, safe_serialization=True)
        mode = (tmp / CONFIG_NAME).stat().st_mode & 0o777
        for p in tmp.iterdir():
            if p.is_file():
                os.chmod(p, mode)
                with open(p, "rb") as f:  # on disk before the folder is swapped in
                    os.fsync(f.fileno())
        storage.fsync_dir(str(tmp))
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the unfinished folder, or the older export swapped out
    return out


def _check_replaceable(out: Path) -> None:
    """OUT may be absent, an empty folder, or a diffusers model folder (what an export writes): nothing else is
    replaced."""
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder; a diffusers export is a folder")
    others = sorted(
        p.name
        for p in out.iterdir()
        if not (p.name == CONFIG_NAME or p.name.startswith("diffusion_pytorch_model.")) or not p.is_file()
    )
    if others:
        raise CheckpointError(
            f"{out}: holds other files than a diffusers model ({', '.join(others[:5])}); an export replaces the "
            "whole folder, so pick another --out (or remove them)"
        )


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic rename (Linux renameat2); False where the system or filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise CheckpointError(f"cannot move {a} into place as {b}: {os.strerror(err)}")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Make the finished folder `tmp` be `out`; the older `out`, if any, ends at `tmp` (the caller removes it)."""
    if out.exists() and _exchange(tmp, out):
        storage.fsync_dir(str(out.parent))
        return
    if out.exists():  # no atomic exchange here: between these two renames there is no OUT (never a mix)
        old = out.parent / storage.tmp_name(out.name)
        os.rename(out, old)
        os.rename(tmp, out)
        os.rename(old, tmp)
    else:
        os.rename(tmp, out)
    storage.fsync_dir(str(out.parent))


def diffusers_note(spec: Mapping[str, Any]) -> str:
    """What to tell the user who exports to diffusers."""
    note = (
        "note: diffusers' DiTTransformer2DModel embeds timesteps with other frequencies than facebookresearch/DiT "
        "(downscale_freq_shift=1): a plain from_pretrained(DIR) agrees with this model exactly at t = 0 only. "
        "ditscale.interop.diffusers.load_diffusers(DIR) (or apply_ditscale(model)) computes it exactly."
    )
    if not spec.get("reference_compatible", True):
        note += (
            f" This model has local attention windows ({spec['windows']}): diffusers has none and ignores the "
            f"'{WINDOWS_CONFIG_KEY}' entry of config.json (it warns), computing global attention; load_diffusers "
            "installs ditscale's WindowAttnProcessor on the windowed blocks."
        )
    return note


# ------------------------------------------------------------------------------------------------ diffusers -> ditscale


def read_diffusers(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state dict) of a local DiTTransformer2DModel folder, read without running code: config.json as
    JSON; diffusion_pytorch_model.safetensors (or its shards), else the .bin (or its shards) through
    torch.load(weights_only=True). CheckpointError naming the file otherwise."""
    from safetensors.torch import load_file

    folder = Path(path)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {CONFIG_NAME} (expected a DiTTransformer2DModel folder)") from None
    except ValueError as e:
        raise CheckpointError(f"{folder / CONFIG_NAME}: not JSON ({e})") from None
    for name in WEIGHTS_NAMES:
        index = folder / f"{name}.index.json"
        if (folder / name).is_file():
            files = [folder / name]
        elif index.is_file():
            try:
                files = [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a weights index ({type(e).__name__}: {e})") from None
        else:
            continue
        state: dict[str, torch.Tensor] = {}
        for f in files:
            if name.endswith(".safetensors"):
                try:
                    state.update(load_file(str(f)))
                except FileNotFoundError:
                    raise CheckpointError(f"{f}: file not found (listed by {index})") from None
                except Exception as e:
                    raise CheckpointError(f"{f}: not a safetensors file, or a damaged one ({e})") from None
            else:
                part = load_tensor_file(f)
                if not isinstance(part, Mapping) or not all(isinstance(v, torch.Tensor) for v in part.values()):
                    raise CheckpointError(f"{f}: expected a state dict of tensors, got {type(part).__name__}")
                state.update(part)
        return config, state
    raise CheckpointError(f"{folder}: no weights ({' or '.join(WEIGHTS_NAMES)})")


def _transformer_from_folder(path: str | os.PathLike, torch_dtype: torch.dtype | None = None):
    """The DiTTransformer2DModel of a local folder (read_diffusers), built from its config, weights loaded strictly."""
    diffusers = _diffusers()
    if not storage.is_local(os.fspath(path)) or not Path(path).is_dir():
        raise CheckpointError(
            f"{path}: not a local folder; ditscale reads diffusers models from local folders only (download one "
            "first, e.g. huggingface_hub.snapshot_download)"
        )
    config, state = read_diffusers(path)
    if config.get("_class_name", "DiTTransformer2DModel") != "DiTTransformer2DModel":
        raise CheckpointError(f"{path}: a {config['_class_name']}, not a DiTTransformer2DModel")
    transformer = diffusers.DiTTransformer2DModel.from_config(config)
    missing, unexpected = transformer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: its weights do not fit its {CONFIG_NAME}: {len(missing)} missing ({missing[:5]}), "
            f"{len(unexpected)} unexpected ({unexpected[:5]})"
        )
    return transformer.to(torch_dtype) if torch_dtype is not None else transformer


def load_diffusers(
    path: str | os.PathLike,
    *,
    backend: str = "auto",
    timestep_embedding: str = "auto",
    torch_dtype: torch.dtype | None = None,
):
    """The DiTTransformer2DModel of a local folder (what from_pretrained(path) loads, read without running code)
    with apply_ditscale: a folder written by ditscale computes exactly the exported DiT (eval mode)."""
    transformer = _transformer_from_folder(path, torch_dtype)
    return apply_ditscale(transformer, backend=backend, timestep_embedding=timestep_embedding).eval()


def from_diffusers(source, *, attention_backend: str = "auto", atol: float = 0.0):
    """A ditscale DiT from a diffusers DiT: a DiTTransformer2DModel or a folder one loads from (a pipeline's
    `transformer/` folder, or the pipeline folder itself). Windows come from the config's `ditscale_windows`.

    diffusers keeps one copy of the timestep and label embedders per block; the DiT has one. They must agree
    within `atol` (as in every conversion of the reference's checkpoints); otherwise CheckpointError. The DiT
    computes the reference's timestep embedding and LayerNorm eps 1e-6: for a folder written by ditscale (or
    converted from facebookresearch/DiT) that is the model itself; a model trained in diffusers with its own
    embedding and norm_eps is approximated (the differences are named in docs/model.md).
    """

    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if (path / "transformer" / CONFIG_NAME).is_file() and not (path / CONFIG_NAME).is_file():
            path = path / "transformer"
        if not (path / CONFIG_NAME).is_file():
            raise CheckpointError(f"{source}: no diffusers config.json (expected a DiTTransformer2DModel folder)")
        transformer = _transformer_from_folder(path)
        where = str(path)
    else:
        transformer, where = source, type(source).__name__
    cfg = dict(transformer.config)
    if cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or cfg.get("activation_fn") != "gelu-approximate":
        raise CheckpointError(f"{where}: not a DiT (norm_type {cfg.get('norm_type')}, {cfg.get('activation_fn')})")
    heads, head_dim, depth = cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["num_layers"]
    hidden, in_ch, num_classes = heads * head_dim, cfg["in_channels"], cfg["num_embeds_ada_norm"]
    out_ch = cfg.get("out_channels") or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"{where}: out_channels {out_ch} is neither in_channels {in_ch} nor twice it")
    private = cfg.get(PRIVATE_CONFIG_KEY) or {}
    sd = transformer.state_dict()
    first = "transformer_blocks.0.norm1.emb."
    shared = {k[len(first) :]: v for k, v in sd.items() if k.startswith(first)}
    for i in range(1, depth):
        for name, v in shared.items():
            other = sd[f"transformer_blocks.{i}.norm1.emb.{name}"]
            diff = float((other.float() - v.float()).abs().max())
            if diff > atol:
                raise CheckpointError(
                    f"{where}: block {i}'s {name} differs from block 0's by {diff:.3g}; ditscale's DiT has one "
                    f"timestep and label embedder (pass atol= to accept copies that differ this much)"
                )
    table = shared["class_embedder.embedding_table.weight"]
    dropout = private.get("class_dropout_prob", DIFFUSERS_CLASS_DROPOUT)
    if dropout == 0:
        table = table[:num_classes]
    windows = cfg.get(WINDOWS_CONFIG_KEY) or [None] * depth
    model = DiT(
        input_size=cfg["sample_size"],
        patch_size=cfg["patch_size"],
        in_channels=in_ch,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        num_classes=num_classes,
        class_dropout_prob=dropout,
        learn_sigma=out_ch == 2 * in_ch,
        windows=list(windows),
        attention_backend=attention_backend,
    )
    state: dict[str, torch.Tensor] = {
        "pos_embed": model.pos_embed.detach().clone(),
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "y_embedder.embedding_table.weight": table,
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
    }
    for j in (0, 1):
        for p in ("weight", "bias"):
            state[f"t_embedder.mlp.{2 * j}.{p}"] = shared[f"timestep_embedder.linear_{j + 1}.{p}"]
    for i in range(depth):
        b, o = f"blocks.{i}.", f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            state[f"{b}adaLN_modulation.1.{p}"] = sd[f"{o}norm1.linear.{p}"]
            state[f"{b}attn.qkv.{p}"] = torch.cat([sd[f"{o}attn1.to_{n}.{p}"] for n in "qkv"], dim=0)
            state[f"{b}attn.proj.{p}"] = sd[f"{o}attn1.to_out.0.{p}"]
            state[f"{b}mlp.fc1.{p}"] = sd[f"{o}ff.net.0.proj.{p}"]
            state[f"{b}mlp.fc2.{p}"] = sd[f"{o}ff.net.2.{p}"]
    load_reference_state_dict(model, {k: v.float() for k, v in state.items()}, source=where)
    return model.eval()
