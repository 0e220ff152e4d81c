"""Gaussian diffusion for DiT: training losses, one-step denoising, respaced DDPM and DDIM sampling, guidance.

from ditscale.diffusion import create_diffusion, sample

diffusion = create_diffusion()                       # training: 1000 linear steps, hybrid loss
t = torch.randint(0, diffusion.num_timesteps, (B,))
loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()

images = sample(model, labels, steps=250, cfg_scale=4.0, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ditscale.diffusion.gaussian import (
    GaussianDiffusion,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    mean_flat,
    normal_kl,
    randn,
)
from ditscale.diffusion.respace import SpacedDiffusion, space_timesteps
from ditscale.errors import ConfigError, ModelInputError

__all__ = [
    "GaussianDiffusion",
    "SpacedDiffusion",
    "approx_standard_normal_cdf",
    "create_diffusion",
    "diffusion_from_config",
    "diffusion_kwargs",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "mean_flat",
    "normal_kl",
    "randn",
    "sample",
    "space_timesteps",
]


def create_diffusion(
    timestep_respacing: str | Iterable[int] | None = "",
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
    *,
    loss: str = "hybrid",
    rescale_vb: bool | None = None,
) -> SpacedDiffusion:
    """The DiT diffusion: the reference's `create_diffusion` (same arguments, order and defaults), plus `loss`.

    Args:
        timestep_respacing: "" for all steps (training), "250" / "10,20,30" / "ddim50" / a list of section counts
            to sample with fewer steps (see space_timesteps).
        noise_schedule: "linear" (DDPM, scaled to the step count), "squaredcos_cap_v2" or its alias "cosine".
        use_kl: train on the variational bound alone (rescaled by the step count), mean and variance both.
        sigma_small: with a fixed variance (learn_sigma False, or loss "mse"), the posterior variance instead of
            beta_t.
        predict_xstart: the model outputs x_0 instead of epsilon.
        learn_sigma: the model outputs 2C channels (its mean output and the learned-range variance). With False,
            the variance is fixed and the loss is the MSE alone.
        rescale_learned_sigmas: scale the VLB term of the hybrid loss by T / 1000 (T: this process's steps);
            `rescale_vb` is the same switch under ditscale's name (give one of them).
        diffusion_steps: T of the base process.
        loss: "hybrid" (the reference's loss: MSE, plus the VLB term when the variance is learned) or "mse" (a
            ditscale addition: the MSE alone even with learn_sigma; sigma channels are then ignored in training and
            sampling, which use the fixed variance). use_kl replaces either by the VLB.
    """
    if loss not in ("hybrid", "mse"):
        raise ConfigError(f"diffusion loss = {loss!r}: expected 'hybrid' or 'mse' (use_kl=True for the VLB loss)")
    if use_kl and loss == "mse":
        raise ConfigError("diffusion use_kl = True trains on the VLB: it contradicts loss = 'mse'; keep loss 'hybrid'")
    if rescale_vb is None:
        rescale_vb = rescale_learned_sigmas
    elif rescale_learned_sigmas and not rescale_vb:
        raise ConfigError("diffusion rescale_learned_sigmas = True and rescale_vb = False: they are one switch")
    betas = get_named_beta_schedule(noise_schedule, int(diffusion_steps))
    if learn_sigma and loss == "hybrid":
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if sigma_small else "fixed_large"
    if timestep_respacing is None or (isinstance(timestep_respacing, str) and timestep_respacing.strip() == ""):
        timestep_respacing = [int(diffusion_steps)]
    use = space_timesteps(int(diffusion_steps), timestep_respacing)
    return SpacedDiffusion(
        use,
        betas,
        var_type=var_type,
        loss="kl" if use_kl else loss,
        rescale_vb=bool(rescale_vb),
        mean_type="start_x" if predict_xstart else "epsilon",
    )


def diffusion_kwargs(cfg) -> dict:
    """create_diffusion's keywords for a run config: `cfg.diffusion.kwargs(cfg.model.learn_sigma)`.
    `sample(model, labels, **diffusion_kwargs(cfg))` samples as the run was trained."""
    return cfg.diffusion.kwargs(cfg.model.learn_sigma)


def diffusion_from_config(cfg, timestep_respacing: str | Iterable[int] | None = "") -> SpacedDiffusion:
    """The diffusion of a run config: `cfg.diffusion.build(cfg.model.learn_sigma, respacing)`."""
    return create_diffusion(timestep_respacing, **diffusion_kwargs(cfg))


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    labels: torch.Tensor | Iterable[int],
    *,
    steps: int = 250,
    method: str = "ddpm",
    cfg_scale: float = 1.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    eta: float = 0.0,
    clip_denoised: bool = True,
    loss: str | None = None,
    diffusion_steps: int = 1000,
    noise_schedule: str = "linear",
    progress: bool = False,
    **diffusion_kw,
) -> torch.Tensor:
    """Class-conditional samples from a DiT, float32 (N, C, H, W) in [-1, 1] (clipped; pixel space).

    Args:
        model: a DiT (or any module with `forward(x, t, y)`, `forward_with_cfg(x, t, y, cfg_scale)` and the
            attributes in_channels, input_size, num_classes, learn_sigma). Run in eval mode (restored after).
        labels: N class ids in [0, model.num_classes).
        steps: sampling steps, evenly respaced from `diffusion_steps` (str(steps) respacing, as DiT's sample.py).
        method: "ddpm" (ancestral) or "ddim" (deterministic for eta = 0).
        cfg_scale: > 1 uses classifier-free guidance: the batch is doubled with the null class (model.num_classes)
            and the model's forward_with_cfg combines the two halves; the conditional half is returned.
        generator: source of all noise (a CPU generator gives the same images on CPU and CUDA, up to kernels).
        noise: the initial x_T (N, C, H, W); drawn from `generator` when not given.
        clip_denoised: clip each x_0 estimate to [-1, 1] (pixels). For latents pass False (output is not clipped).
        loss: the loss the model was trained with; "mse" samples with the fixed variance. Default: "hybrid" if
            model.learn_sigma else "mse".
        diffusion_kw: other create_diffusion keywords the model was trained with (predict_xstart, sigma_small, ...;
            `**diffusion_kwargs(cfg)` passes a run's). learn_sigma, if given, must match the model's.
    """
    if method not in ("ddpm", "ddim"):
        raise ConfigError(f"sample method = {method!r}: expected 'ddpm' or 'ddim'")
    if cfg_scale < 1.0:
        raise ConfigError(f"sample cfg_scale = {cfg_scale}: expected >= 1.0 (1.0 disables guidance)")
    device = _model_device(model)
    num_classes = int(model.num_classes)
    labels = torch.as_tensor(labels if isinstance(labels, torch.Tensor) else list(labels), dtype=torch.long)
    if labels.ndim != 1 or labels.numel() == 0:
        raise ModelInputError(f"sample labels: expected a non-empty 1-D tensor of class ids, got {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ModelInputError(
            f"sample labels: expected class ids in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )
    labels = labels.to(device)
    n = labels.shape[0]
    size = model.input_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    shape = (n, int(model.in_channels), h, w)
    if noise is None:
        noise = randn(shape, generator=generator, device=device)
    elif tuple(noise.shape) != shape:
        raise ModelInputError(f"sample noise: expected shape {shape}, got {tuple(noise.shape)}")
    noise = noise.to(device=device, dtype=torch.float32)

    learn_sigma = bool(getattr(model, "learn_sigma", True))
    if "learn_sigma" in diffusion_kw and bool(diffusion_kw.pop("learn_sigma")) != learn_sigma:
        raise ConfigError(f"sample learn_sigma: the model has learn_sigma = {learn_sigma}")
    diffusion = create_diffusion(
        str(steps),
        noise_schedule=noise_schedule,
        learn_sigma=learn_sigma,
        loss=loss or ("hybrid" if learn_sigma else "mse"),
        diffusion_steps=diffusion_steps,
        **diffusion_kw,
    )
    model_dtype = _model_dtype(model)
    if cfg_scale > 1.0:
        x_T = torch.cat([noise, noise], 0)
        y = torch.cat([labels, torch.full_like(labels, num_classes)], 0)

        def model_fn(x, t, y):
            return model.forward_with_cfg(x.to(model_dtype), t, y, cfg_scale)

    else:
        x_T, y = noise, labels

        def model_fn(x, t, y):
            return model(x.to(model_dtype), t, y)

    was_training = model.training
    model.eval()
    try:
        kw = dict(clip_denoised=clip_denoised, model_kwargs=dict(y=y), device=device, progress=progress)
        if method == "ddpm":
            out = diffusion.p_sample_loop(model_fn, x_T.shape, x_T, generator=generator, **kw)
        else:
            out = diffusion.ddim_sample_loop(model_fn, x_T.shape, x_T, eta=eta, generator=generator, **kw)
    finally:
        model.train(was_training)
    out = out[:n]
    return out.clamp(-1, 1) if clip_denoised else out
