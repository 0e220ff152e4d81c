"""Sample grids from a (EMA) DiT: fixed noise and labels, own generator, no effect on the training RNG."""

from __future__ import annotations

import torch

from ditscale.config import Config


def grid_labels(num_classes: int, n: int = 16) -> torch.Tensor:
    return torch.arange(n) % num_classes


@torch.no_grad()
def draw(
    model: torch.nn.Module,
    cfg: Config,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    steps: int | None = None,
    cfg_scale: float | None = None,
) -> torch.Tensor:
    """DDPM samples (len(labels), C, H, W), deterministic for a seed. The global RNG state is left as it was, so
    sampling during training never changes the training trajectory."""
    from ditscale.diffusion import diffusion_kwargs, sample

    device = next(model.parameters()).device
    forks = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forks):
        return sample(
            model,
            labels,
            steps=min(steps or cfg.diffusion.sample_steps, cfg.diffusion.num_timesteps),
            cfg_scale=cfg.diffusion.cfg_scale if cfg_scale is None else cfg_scale,
            generator=torch.Generator().manual_seed(seed),
            clip_denoised=cfg.data.kind == "pixels",
            **diffusion_kwargs(cfg),
        )
