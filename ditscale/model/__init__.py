"""The DiT family with per-block local-attention windows (ditscale.model)."""

from ditscale.model.attention import (
    attention,
    halo_attention,
    qkv_attention,
    sdpa_mask_attention,
    window_mask,
)
from ditscale.model.checkpoint import extract_state_dict, load_reference_state_dict
from ditscale.model.dit import DiT, DiT_models, check_variant_windows, create_model, variant_depth
from ditscale.model.export import load_exported, save_export, save_model
from ditscale.model.spec import model_spec
from ditscale.model.windows import (
    PRESETS,
    GlobalWindowWarning,
    covering_windows,
    format_windows,
    parse_windows,
    placement_indices,
    placement_of,
)

__all__ = [
    "DiT",
    "DiT_models",
    "GlobalWindowWarning",
    "PRESETS",
    "attention",
    "check_variant_windows",
    "covering_windows",
    "create_model",
    "extract_state_dict",
    "format_windows",
    "halo_attention",
    "load_exported",
    "load_reference_state_dict",
    "model_spec",
    "parse_windows",
    "placement_indices",
    "placement_of",
    "qkv_attention",
    "save_export",
    "save_model",
    "sdpa_mask_attention",
    "variant_depth",
    "window_mask",
]
