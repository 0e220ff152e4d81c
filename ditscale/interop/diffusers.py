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
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ditscale.errors import CheckpointError
from ditscale.model.attention import attention
from ditscale.model.spec import model_spec

WINDOWS_CONFIG_KEY = "ditscale_windows"
PRIVATE_CONFIG_KEY = "_ditscale"
DIFFUSERS_CLASS_DROPOUT = 0.1  # CombinedTimestepLabelEmbeddings always has the null-class row


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
    diffusion_pytorch_model.safetensors; files all with the mode of config.json). `model_or_state`: a DiT, or a
    state dict with `spec` (ditscale.model.export.model_spec). Returns the folder."""
    if isinstance(model_or_state, Mapping):
        if spec is None:
            raise CheckpointError("save_diffusers of a state dict needs its model description (spec)")
        state = model_or_state
    else:
        state, spec = model_or_state.state_dict(), spec or model_spec(model_or_state)
    transformer = build_diffusers(state, spec, info=info)
    out = Path(out)
    transformer.save_pretrained(out, safe_serialization=True)
    ref = out / "config.json"
    mode = ref.stat().st_mode & 0o777
    for p in out.iterdir():
        if p.is_file():
            os.chmod(p, mode)
    return out


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


def load_diffusers(path: str | os.PathLike, *, backend: str = "auto", timestep_embedding: str = "auto", **kwargs):
    """DiTTransformer2DModel.from_pretrained(path, **kwargs) with apply_ditscale: a folder written by ditscale
    computes exactly the exported DiT (eval mode)."""
    diffusers = _diffusers()
    kwargs.setdefault("low_cpu_mem_usage", False)  # without accelerate installed, diffusers asks for it otherwise
    transformer = diffusers.DiTTransformer2DModel.from_pretrained(str(path), **kwargs)
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
    from ditscale.model.checkpoint import load_reference_state_dict
    from ditscale.model.dit import DiT

    diffusers = _diffusers()
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if (path / "transformer" / "config.json").is_file() and not (path / "config.json").is_file():
            path = path / "transformer"
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{source}: no diffusers config.json (expected a DiTTransformer2DModel folder)")
        transformer = diffusers.DiTTransformer2DModel.from_pretrained(str(path), low_cpu_mem_usage=False)
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
