"""The typed description of a DiT that rebuilds it exactly: what an export and a diffusers folder carry."""

from __future__ import annotations

from typing import Any

from ditscale.model.windows import format_windows

FORMAT = "ditscale-dit"
VERSION = 1
ARCH_KEYS = (
    "depth",
    "hidden_size",
    "patch_size",
    "num_heads",
    "mlp_ratio",
    "input_size",
    "in_channels",
    "num_classes",
    "learn_sigma",
    "class_dropout_prob",
)


def model_spec(model, variant: str | None = None) -> dict[str, Any]:
    """The typed description of a DiT that rebuilds it (works on a model on the meta device too)."""
    hidden = int(model.pos_embed.shape[-1])
    windows = list(model.windows)
    return {
        "format": FORMAT,
        "version": VERSION,
        "variant": variant,
        "depth": int(model.depth),
        "hidden_size": hidden,
        "patch_size": int(model.patch_size),
        "num_heads": int(model.num_heads),
        "mlp_ratio": model.blocks[0].mlp.fc1.out_features / hidden,
        "input_size": int(model.input_size),
        "in_channels": int(model.in_channels),
        "num_classes": int(model.num_classes),
        "learn_sigma": bool(model.learn_sigma),
        "class_dropout_prob": float(model.y_embedder.dropout_prob),
        "windows": format_windows(windows),
        "block_windows": windows,
        "reference_compatible": all(w is None for w in windows),
    }
