"""A run's weights out of its checkpoint, for use elsewhere (`python -m ditscale export`, ditscale.cli.export).

`export(run, out, ...)` writes a run's EMA weights (or, with ema=False, the trained weights) with
facebookresearch/DiT's parameter names:
- `fmt="dit"` (default): OUT.pt (torch.save of the state dict, loadable by DiT's `find_model`), OUT.safetensors
  and OUT.json (the model description, typed), see ditscale.model.export;
- `fmt="diffusers"`: a folder OUT that `diffusers.DiTTransformer2DModel.from_pretrained(OUT)` loads, see
  ditscale.interop.diffusers.
For a windowed model the command says on stderr that the reference DiT, or plain diffusers, would compute global
attention with its weights; `ditscale.model.load_exported(OUT)` rebuilds the exact model from either format.
Reads local or object-storage run directories; DeepSpeed is needed only for the trained weights of a ZeRO run.
"""

from __future__ import annotations


def export(run: str, out: str, tag: str | None = None, ema: bool = True, fmt: str = "dit") -> tuple[dict, dict]:
    """(model description, written paths) of a run's export."""
    import torch

    # lazy: torch at import, like `import torch` above
    from ditscale.model.export import model_spec, save_export
    from ditscale.train.checkpoint import load_state_for_eval

    cfg, state, tag = load_state_for_eval(run, ema=ema, tag=tag)
    with torch.device("meta"):  # the description only: no memory for a second copy of the weights
        spec = model_spec(cfg.model.build(), cfg.model.variant)
    info = {"weights": "ema" if ema else "raw", "checkpoint": tag, "run": run}
    if fmt == "diffusers":
        from ditscale.interop.diffusers import save_diffusers  # lazy: torch at import, like `import torch` above

        return spec, {"folder": save_diffusers(state, out, spec=spec, info=info)}
    return spec, save_export(state, spec, out, info=info)
