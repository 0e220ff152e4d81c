"""`python -m ditscale export --run DIR --out OUT [--format dit|diffusers] [--tag step_XXXXXXXX] [--raw]`

The formats are described in ditscale.train.export; a windowed model is said so on stderr.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run directory or URL")
    parser.add_argument(
        "--out",
        required=True,
        help="dit: output file, a path or URL (.pt, .safetensors and .json are written, each atomically); diffusers: "
        "output folder (written whole, then swapped into place)",
    )
    parser.add_argument("--format", choices=("dit", "diffusers"), default="dit", help="output format (default: dit)")
    parser.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    parser.add_argument("--raw", action="store_true", help="export the trained weights instead of the EMA")


def run(args: argparse.Namespace) -> int:
    # lazy: torch at start-up
    from ditscale.model.export import reference_note
    from ditscale.train.export import export

    spec, paths = export(args.run, args.out, tag=args.tag, ema=not args.raw, fmt=args.format)
    if args.format == "diffusers":
        from ditscale.interop.diffusers import diffusers_note  # lazy: torch at start-up

        note = diffusers_note(spec)
    else:
        note = reference_note(spec)
    if note:
        print(note, file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
