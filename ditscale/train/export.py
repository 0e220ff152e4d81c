"""`python -m ditscale export --run DIR --out FILE [--tag step_XXXXXXXX] [--raw]`

Writes a run's EMA weights (or, with --raw, the trained weights) as a state dict with facebookresearch/DiT's
parameter names, both as FILE.pt (torch.save of the plain state dict, loadable by DiT's `find_model`) and as
FILE.safetensors. Reads local or object-storage run directories; DeepSpeed is only needed for --raw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run directory or URL")
    parser.add_argument("--out", required=True, help="output file; .pt and .safetensors are both written")
    parser.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    parser.add_argument("--raw", action="store_true", help="export the trained weights instead of the EMA")


def export(run: str, out: str, tag: str | None = None, ema: bool = True) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    from ditscale.train.checkpoint import load_state_for_eval

    cfg, state, tag = load_state_for_eval(run, ema=ema, tag=tag)
    state = {k: v.detach().float().contiguous().clone() for k, v in state.items()}
    base = Path(out)
    if base.suffix in (".pt", ".pth", ".safetensors"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    pt, st = base.with_suffix(".pt"), base.with_suffix(".safetensors")
    torch.save(state, pt)
    m = cfg.model
    meta = {
        "variant": m.variant, "windows": m.windows, "input_size": str(m.input_size),
        "in_channels": str(m.in_channels), "num_classes": str(m.num_classes), "learn_sigma": str(m.learn_sigma),
        "weights": "ema" if ema else "raw", "checkpoint": tag, "run": run,
    }  # fmt: skip
    save_file(state, st, metadata=meta)
    base.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return pt, st


def run(args: argparse.Namespace) -> int:
    pt, st = export(args.run, args.out, tag=args.tag, ema=not args.raw)
    print(f"wrote {pt} and {st}")
    return 0
