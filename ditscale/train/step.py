"""The diffusion micro-step: what one micro-batch costs, shared by the trainer and `bench train`.

Nothing here reads a value back to the host: the loss stays a device tensor, so a GPU runs ahead of Python.
"""

from __future__ import annotations

import torch


def model_fn(model, precision: str, device: torch.device):
    """What the diffusion loss calls: the model (or DeepSpeed engine), under bf16 autocast when training in bf16.
    The output is cast back to fp32 so that the loss terms (MSE, VLB) are computed in full precision."""
    if precision != "bf16":
        return model

    def fn(x, t, **kwargs):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(x, t, **kwargs).float()

    return fn


def diffusion_loss(
    fn,
    diffusion,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean training loss of one micro-batch: timesteps and noise drawn from `generator` unless given.

    The generator is this rank's own (seeded per rank, checkpointed), so a resumed run draws the same t and noise.
    """
    if t is None:
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device, generator=generator)
    if noise is None:
        noise = torch.randn(x.shape, device=x.device, generator=generator)
    return diffusion.training_losses(fn, x, t, model_kwargs={"y": y}, noise=noise)["loss"].mean()
