"""The diffusion micro-step: what one micro-batch costs, shared by the trainer and `bench train`.

Nothing here reads a value back to the host: the loss stays a device tensor, so a GPU runs ahead of Python.

Per-sample randomness: each sample's timestep, label drop and noise are drawn from (run seed, the sample's global
element id), never from a per-rank generator, so a step computes the same gradient however many processes share
it (ditscale.data.stream has the ids) and a resumed run draws exactly what the uninterrupted one would.
"""

from __future__ import annotations

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
SALT_T, SALT_DROP, SALT_NOISE = 1, 2, 3


def _mix(seed: int, ids: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of (seed, id, salt): well-spread 64-bit integers, vectorised."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) * _GOLDEN + np.uint64((seed * 1_000_003 + salt) & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _uniform(seed: int, ids: np.ndarray, salt: int) -> np.ndarray:
    return (_mix(seed, ids, salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def sample_randomness(
    ids: torch.Tensor, seed: int, shape: tuple[int, ...], num_timesteps: int, drop_prob: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(t, force_drop_ids or None, noise) for the samples with global element ids `ids`: each from (seed, id)."""
    k = ids.numpy()
    t = torch.from_numpy((_uniform(seed, k, SALT_T) * num_timesteps).astype(np.int64)).clamp_(max=num_timesteps - 1)
    drop = None
    if drop_prob > 0:
        drop = torch.from_numpy((_uniform(seed, k, SALT_DROP) < drop_prob).astype(np.int64)).to(device)
    gen = torch.Generator(device=device)
    noise = torch.empty((len(k), *shape), device=device)
    for i, s in enumerate(_mix(seed, k, SALT_NOISE)):
        gen.manual_seed(int(s) >> 1)  # one draw per sample: its noise is its own, whatever batch it is in
        torch.randn(shape, generator=gen, device=device, out=noise[i])
    return t.to(device, non_blocking=True), drop, noise


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
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    drop: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean training loss of one micro-batch. The trainer gives t, noise and label drops (sample_randomness);
    without them t and noise are drawn from `generator` (benchmarks)."""
    if t is None:
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device, generator=generator)
    if noise is None:
        noise = torch.randn(x.shape, device=x.device, generator=generator)
    kwargs = {"y": y} if drop is None else {"y": y, "force_drop_ids": drop}
    return diffusion.training_losses(fn, x, t, model_kwargs=kwargs, noise=noise)["loss"].mean()
