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


class SampleGrids:
    """The trainer's sample-grid part (rank 0): every `log.sample_every` steps and at the end, a grid of EMA
    samples with fixed noise and labels to samples/step_XXXXXXXX.png in the run dir."""

    def __init__(self, cfg: Config, rundir, enabled: bool):
        self.cfg, self.rundir = cfg, rundir
        self.every = cfg.log.sample_every if enabled else 0
        self.labels = grid_labels(cfg.model.num_classes)

    def due(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step >= self.cfg.train.steps)

    def maybe_sample(self, step: int, model: torch.nn.Module):
        """The path of the grid written at this step, or None."""
        if not self.due(step):
            return None
        from ditscale.io.rundir import SAMPLES
        from ditscale.observability import save_grid

        rel = f"{SAMPLES}/step_{step:08d}.png"
        images = draw(model, self.cfg, self.labels, seed=self.cfg.run.seed)
        path = save_grid(images, self.rundir.local / rel, nrow=4, scale=max(1, 128 // (4 * self.cfg.model.input_size)))
        self.rundir.upload(rel)
        return path
