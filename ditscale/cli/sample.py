"""`python -m ditscale sample --run DIR --out grid.png [--n 16] [--labels 0,1,2] [--steps 250] [--cfg-scale 4]`

Draws a grid of samples from a run's EMA weights (newest complete checkpoint, or --tag) on CPU or --device.
"""

from __future__ import annotations

import argparse

from ditscale.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run directory or URL")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    parser.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    parser.add_argument("--labels", help="comma-separated class ids (default: 0, 1, 2, ... cycling)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the run's diffusion.sample_steps)")
    parser.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default: the run's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="use the trained weights instead of the EMA")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    import torch

    # lazy: torch at start-up
    from ditscale.observability import save_grid
    from ditscale.train.checkpoint import load_for_eval
    from ditscale.train.sampling import draw, grid_labels

    cfg, model = load_for_eval(args.run, ema=not args.raw, tag=args.tag)
    if args.labels:
        try:
            labels = torch.tensor([int(x) for x in args.labels.split(",") if x.strip()])
        except ValueError:
            raise ConfigError(f"--labels {args.labels!r}: expected comma-separated class ids") from None
    else:
        labels = grid_labels(cfg.model.num_classes, args.n)
    model.to(args.device)
    images = draw(model, cfg, labels, seed=args.seed, steps=args.steps, cfg_scale=args.cfg_scale)
    path = save_grid(images, args.out, scale=max(1, 128 // (4 * cfg.model.input_size)))
    print(f"wrote {path} ({len(labels)} samples, labels {labels.tolist()})")
    return 0
