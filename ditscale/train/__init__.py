"""Training: DeepSpeed ZeRO trainer with exact resume, EMA, checkpoints and metrics.

`run_training(cfg)` is the in-process entry point (launchers call it after exporting the distributed env);
`python -m ditscale train` is the command. `checkpoint.load_for_eval(run_dir)` reads a run back without DeepSpeed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ditscale.config import Config


def run_training(cfg: Config, allow_config_change: bool = False) -> dict:
    """Train (or resume) the run described by `cfg`; returns the final metrics (final.json's content)."""
    from ditscale.train.trainer import run_training as _run  # lazy: torch and DeepSpeed at `import ditscale.train`

    return _run(cfg, allow_config_change=allow_config_change)


def load_for_eval(run_dir: str, ema: bool = True, tag: str | None = None):
    from ditscale.train.checkpoint import load_for_eval as _load  # lazy: torch and DeepSpeed at `import ditscale.train`

    return _load(run_dir, ema=ema, tag=tag)


__all__ = ["run_training", "load_for_eval"]
