"""`python -m ditscale export --run DIR --out OUT [--format dit|diffusers] [--tag step_XXXXXXXX] [--raw]`

Writes a run's EMA weights (or, with --raw, the trained weights) with facebookresearch/DiT's parameter names:
- `--format dit` (default): OUT.pt (torch.save of the state dict, loadable by DiT's `find_model`), OUT.safetensors
  and OUT.json (the model description, typed), see ditscale.model.export;
- `--format diffusers`: a folder OUT that `diffusers.DiTTransformer2DModel.from_pretrained(OUT)` loads, see
  ditscale.interop.diffusers.
A windowed model is said so on stderr (the reference DiT, or plain diffusers, would compute global attention with
its weights); `ditscale.model.load_exported(OUT)` rebuilds the exact model from either format. Reads local or
object-storage run directories; DeepSpeed is only needed for --raw.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run directory or URL")
    parser.add_argument("--out", required=True, help="dit: output file (.pt, .safetensors and .json are written); "
                        "diffusers: output folder")  # fmt: skip
    parser.add_argument("--format", choices=("dit", "diffusers"), default="dit", help="output format (default: dit)")
    parser.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    parser.add_argument("--raw", action="store_true", help="export the trained weights instead of the EMA")


def export(run: str, out: str, tag: str | None = None, ema: bool = True, fmt: str = "dit") -> tuple[dict, dict]:
    """(model description, written paths) of a run's export."""
    import torch

    from ditscale.model.export import model_spec, save_export
    from ditscale.train.checkpoint import load_state_for_eval

    cfg, state, tag = load_state_for_eval(run, ema=ema, tag=tag)
    with torch.device("meta"):  # the description only: no memory for a second copy of the weights
        spec = model_spec(cfg.model.build(), cfg.model.variant)
    info = {"weights": "ema" if ema else "raw", "checkpoint": tag, "run": run}
    if fmt == "diffusers":
        from ditscale.interop.diffusers import save_diffusers

        return spec, {"folder": save_diffusers(state, out, spec=spec, info=info)}
    return spec, save_export(state, spec, out, info=info)


def run(args: argparse.Namespace) -> int:
    from ditscale.model.export import reference_note

    spec, paths = export(args.run, args.out, tag=args.tag, ema=not args.raw, fmt=args.format)
    if args.format == "diffusers":
        from ditscale.interop.diffusers import diffusers_note

        note = diffusers_note(spec)
    else:
        note = reference_note(spec)
    if note:
        print(note, file=sys.stderr)
    print("wrote " + ", ".join(str(Path(p)) for p in paths.values()))
    return 0
