"""`python -m ditscale train --config FILE [--run-dir DIR] [key=value ...]`

Works alone, under torchrun, under the deepspeed launcher (which passes --local_rank) and under srun.
"""

from __future__ import annotations

import argparse
import os

from ditscale.train import run_training


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML (see configs/)")
    parser.add_argument("--run-dir", help="run directory or URL, taken as given (overrides run.dir)")
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though keys that change what is trained (model.*, optim.*, data.*, ...) differ from the "
        "run's config; the change is recorded in the run's config_history.jsonl with its step",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides (before or after options), e.g. train.steps=100",
    )


def run(args: argparse.Namespace) -> int:
    from ditscale.config import load_config  # lazy: pydantic at start-up

    cfg = load_config(args.config, args.overrides)  # fails here, before torch/DeepSpeed work, on a bad key or type
    if args.run_dir:
        cfg.run.dir = args.run_dir  # the path as given: not a YAML value ("runs/a #2" keeps its "#2")
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    run_training(cfg, allow_config_change=args.allow_config_change)
    return 0
