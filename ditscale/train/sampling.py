"""Sample grids from a (EMA) DiT: fixed noise and labels, own generator, no effect on the training RNG."""

from __future__ import annotations

import torch

from ditscale.config import Config
from ditscale.diffusion import diffusion_kwargs, sample
from ditscale.io.rundir import SAMPLES
from ditscale.observability import save_grid


def grid_labels(num_classes: int, n: int = 16) -> torch.Tensor:
    return torch.arange(n) % num_classes


@torch.no_grad()
def draw(
    model: torch.nn.Module,
    cfg: Config,
    labels: torch.Tensor,
    *,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    steps: int | None = None,
    method: str = "ddpm",
    cfg_scale: float | None = None,
) -> torch.Tensor:
    """Samples (len(labels), C, H, W) as the run `cfg` was trained (its diffusion settings), float32 on the CPU, in
    [-1, 1] for pixels. The one sampling path: training's sample grids, `ditscale sample` and every evaluation.

    Deterministic for a seed (or a given generator and noise); DDIM with eta 0 is deterministic given the noise.
    The global RNG state is left as it was, so sampling during training never changes the training trajectory.
    Labels outside the model's classes are clamped (an unconditional, 1-class model gets its one class).
    """

    n = max(int(getattr(model, "num_classes", 1) or 1), 1)
    labels = torch.as_tensor(labels, dtype=torch.long).clamp(0, n - 1)
    device = next(model.parameters()).device
    forks = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forks):
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else seed)
        out = sample(
            model,
            labels,
            steps=min(steps or cfg.diffusion.sample_steps, cfg.diffusion.num_timesteps),
            method=method,
            cfg_scale=cfg.diffusion.cfg_scale if cfg_scale is None else cfg_scale,
            generator=generator,
            noise=noise,
            clip_denoised=cfg.data.kind == "pixels",
            **diffusion_kwargs(cfg),
        )
    return out.float().cpu()


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

        rel = f"{SAMPLES}/step_{step:08d}.png"
        images = draw(model, self.cfg, self.labels, seed=self.cfg.run.seed)
        scale = max(1, 128 // (4 * self.cfg.model.input_size))
        path = save_grid(images, self.rundir.local_file(rel), nrow=4, scale=scale)
        self.rundir.upload(rel)
        return path
