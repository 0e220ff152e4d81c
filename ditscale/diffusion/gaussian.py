"""Gaussian diffusion as in ADM / DiT (openai/improved-diffusion, facebookresearch/DiT `gaussian_diffusion.py`).

The model predicts the noise epsilon (or, with mean_type "start_x", x_0; the mean follows from it) and, with a
learned sigma, an interpolation coefficient v in [-1, 1] per pixel between the log of beta_t and the log of the
posterior variance (learned-range variance). Training minimises the epsilon MSE plus, for the variance, the
variational bound term with the mean detached (the hybrid loss of Nichol & Dhariwal 2021), or the full variational
bound (loss "kl", the reference's use_kl).

The method names, argument orders and defaults are the reference's (facebookresearch/DiT gaussian_diffusion.py):
`p_sample_loop(model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress)` and the
rest work positionally as there; ditscale adds keyword-only arguments (a `generator` for all noise).

Schedules are computed once in float64 (numpy) and gathered per timestep onto the input's device, in float32 or
wider: bf16 inputs are computed in float32 and returned in bf16 where a tensor of the input's kind is returned.
All noise can come from a `torch.Generator`, so sampler runs are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from ditscale.errors import ConfigError, ModelInputError

VAR_TYPES = ("learned_range", "fixed_large", "fixed_small")
MEAN_TYPES = ("epsilon", "start_x")
LOSSES = ("hybrid", "mse", "kl")


# --------------------------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------------------------


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Betas (float64, shape (T,)) of a named schedule.

    "linear": the DDPM schedule 1e-4 -> 0.02 for T = 1000, scaled by 1000 / T so that other T keep the same shape.
    "cosine": the improved-DDPM cosine schedule (alpha_bar(t) = cos^2(((t + 0.008) / 1.008) * pi / 2), beta <= 0.999).
    """
    if num_timesteps < 2:
        raise ConfigError(f"diffusion num_timesteps = {num_timesteps}: expected at least 2")
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name in ("cosine", "squaredcos_cap_v2"):

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
            for i in range(num_timesteps)
        ]
        return np.array(betas, dtype=np.float64)
    raise ConfigError(f"diffusion noise_schedule = {name!r}: expected 'linear' or 'cosine'")


# --------------------------------------------------------------------------------------------------------------------
# Likelihood helpers (elementwise)
# --------------------------------------------------------------------------------------------------------------------


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats, elementwise (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """A fast approximation of the standard normal CDF (the tanh form used by ADM)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood (nats, elementwise) of data x in [-1, 1] quantised to 256 bins under N(means, exp(log_scales)^2).

    Each value owns the bin [x - 1/255, x + 1/255]; the outermost bins extend to -inf / +inf.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ModelInputError(
            f"discretized_gaussian_log_likelihood: shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, "
            f"log_scales {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all dimensions but the batch one."""
    return x.mean(dim=list(range(1, x.ndim)))


def randn(
    shape: tuple[int, ...] | torch.Size,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise. With a generator the noise is drawn on the generator's device (in float32) and moved,
    so a CPU generator gives the same numbers whether the sampler runs on CPU or CUDA."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    z = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return z.to(device=device if device is not None else z.device, dtype=dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 at least: bf16/fp16 inputs are computed in float32, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


ModelFn = Callable[..., torch.Tensor]


# --------------------------------------------------------------------------------------------------------------------
# The diffusion process
# --------------------------------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """A discrete-time Gaussian diffusion q(x_t | x_0) = N(sqrt(a_bar_t) x_0, (1 - a_bar_t) I), t in [0, T).

    The model is any callable `model(x_t, t, **model_kwargs)` returning epsilon (C channels) or epsilon and the
    variance interpolation v (2C channels, learned-range variance); with mean_type "start_x", x_0 in place of
    epsilon. Timesteps `t` are int64 tensors of shape (B,) with values in [0, num_timesteps).

    Args:
        betas: the noise schedule, shape (T,), values in (0, 1].
        var_type: "learned_range" (DiT), "fixed_large" (beta_t) or "fixed_small" (posterior variance).
        loss: "hybrid" (the reference's MSE loss type: MSE of the model's mean output, plus the VLB term for a
            learned variance, with the mean detached), "mse" (MSE only; sigma channels, if the model has them, are
            ignored: a ditscale addition) or "kl" (the reference's use_kl: the VLB times num_timesteps, which
            trains mean and variance).
        rescale_vb: multiply the hybrid loss's VLB term by num_timesteps / 1000 (identity at T = 1000): the
            reference's rescale_learned_sigmas (its default, False, is this default).
        mean_type: "epsilon" (DiT) or "start_x" (the model predicts x_0; the reference's predict_xstart).
    """

    def __init__(
        self,
        betas: np.ndarray,
        *,
        var_type: str = "learned_range",
        loss: str = "hybrid",
        rescale_vb: bool = False,
        mean_type: str = "epsilon",
    ):
        if var_type not in VAR_TYPES:
            raise ConfigError(f"diffusion var_type = {var_type!r}: expected one of {VAR_TYPES}")
        if loss not in LOSSES:
            raise ConfigError(f"diffusion loss = {loss!r}: expected one of {LOSSES}")
        if mean_type not in MEAN_TYPES:
            raise ConfigError(f"diffusion mean_type = {mean_type!r}: expected one of {MEAN_TYPES}")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ConfigError(f"diffusion betas: expected a 1-D schedule with values in (0, 1], got {betas!r}")
        self.var_type = var_type
        self.mean_type = mean_type
        self.loss_type = loss
        self.rescale_vb = bool(rescale_vb)
        self.num_timesteps = int(len(betas))

        # All schedule arrays are float64 numpy, shape (T,).
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0: its log is clipped to the value at t = 1.
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
        else:
            self.posterior_log_variance_clipped = np.log(np.maximum(self.posterior_variance, betas))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        # "fixed_large": beta_t, with the t = 0 value replaced by the posterior variance at t = 1 (as ADM).
        if self.num_timesteps > 1:
            self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        else:
            self.fixed_large_variance = betas.copy()
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

        self._device_cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_timesteps={self.num_timesteps}, var_type={self.var_type!r}, "
            f"mean_type={self.mean_type!r}, loss={self.loss_type!r}, rescale_vb={self.rescale_vb})"
        )

    # ---------------------------------------------------------------------------------------------------- helpers

    def _gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Schedule array `name` at timesteps t, shaped (B, 1, 1, ...) to broadcast against `like`."""
        key = (name, t.device)
        buf = self._device_cache.get(key)
        if buf is None:
            arr = getattr(self, name)
            dtype = torch.float32 if t.device.type == "mps" else torch.float64
            buf = torch.as_tensor(arr, dtype=dtype).to(t.device)
            self._device_cache[key] = buf
        out = buf[t].to(_compute_dtype(like.dtype))
        return out.view(-1, *([1] * (like.ndim - 1)))

    def _check_t(self, t: torch.Tensor, x: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.shape[0] != x.shape[0]:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ModelInputError(f"timesteps t: expected an int tensor of shape ({x.shape[0]},), got {shape}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ModelInputError(f"timesteps t: expected an integer tensor, got dtype {t.dtype}")
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ModelInputError(
                f"timesteps t: expected values in [0, {self.num_timesteps}), got [{int(t.min())}, {int(t.max())}]"
            )

    def _model_t(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps a model (or cond_fn) sees for this process's indices t (SpacedDiffusion maps them)."""
        return t

    def _call_model(self, model: ModelFn, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None) -> torch.Tensor:
        """Call the model with timesteps t in this process's index space."""
        out = model(x, self._model_t(t), **(model_kwargs or {}))
        if isinstance(out, tuple):  # some models return (output, extra)
            out = out[0]
        return out

    def _split_output(self, out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the mean output: epsilon or x_0, v or None) from a model output of C or 2C channels."""
        B, C = x.shape[:2]
        spatial = tuple(x.shape[2:])
        if out.shape == (B, 2 * C, *spatial):
            eps, v = out[:, :C], out[:, C:]
        elif out.shape == (B, C, *spatial) and self.var_type != "learned_range":
            eps, v = out, None
        else:
            want = f"(B, {2 * C}, ...)" if self.var_type == "learned_range" else f"(B, {C} or {2 * C}, ...)"
            raise ModelInputError(
                f"model output: expected shape {want} for input {tuple(x.shape)} with var_type {self.var_type!r}, "
                f"got {tuple(out.shape)}"
            )
        if self.var_type != "learned_range":
            v = None  # sigma channels of a model trained with the plain MSE loss carry no information
        return eps, v

    # ---------------------------------------------------------------------------------------------- forward process

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = self._gather("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._gather("sqrt_one_minus_alphas_cumprod", t, x_start) ** 2
        log_variance = self._gather("log_one_minus_alphas_cumprod", t, x_start)
        return mean, variance, log_variance

    def q_sample(
        self,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = sqrt(a_bar_t) x_0 + sqrt(1 - a_bar_t) noise (same dtype as x_start)."""
        self._check_t(t, x_start)
        if noise is None:
            noise = randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        elif noise.shape != x_start.shape:
            raise ModelInputError(f"noise: expected shape {tuple(x_start.shape)}, got {tuple(noise.shape)}")
        a = self._gather("sqrt_alphas_cumprod", t, x_start)
        s = self._gather("sqrt_one_minus_alphas_cumprod", t, x_start)
        return (a * x_start + s * noise).to(x_start.dtype)

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._gather("posterior_mean_coef1", t, x_t) * x_start + self._gather("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._gather("posterior_variance", t, x_t)
        log_variance = self._gather("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - a_bar_t) eps) / sqrt(a_bar_t)."""
        return (
            self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._gather("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        """The epsilon that maps x_t to pred_xstart (inverse of predict_xstart_from_eps)."""
        return (self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._gather(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    # ---------------------------------------------------------------------------------------------- reverse process

    def p_mean_variance_from_output(
        self,
        model_output: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from a model output already computed (see p_mean_variance). Computed in float32+."""
        cd = _compute_dtype(x.dtype)
        xc = x.to(cd)
        mean_out, v = self._split_output(model_output.to(cd), x)
        if self.var_type == "learned_range":
            min_log = self._gather("posterior_log_variance_clipped", t, xc)
            max_log = self._gather("log_betas", t, xc)
            frac = (v + 1) / 2  # the model's v in [-1, 1] interpolates between the two log-variances
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if self.var_type == "fixed_large":
                var_name, log_name = "fixed_large_variance", "fixed_large_log_variance"
            else:
                var_name, log_name = "posterior_variance", "posterior_log_variance_clipped"
            variance = self._gather(var_name, t, xc).expand_as(xc)
            log_variance = self._gather(log_name, t, xc).expand_as(xc)

        pred_xstart = mean_out if self.mean_type == "start_x" else self.predict_xstart_from_eps(xc, t, mean_out)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, xc, t)
        eps = mean_out if self.mean_type == "epsilon" else self.predict_eps_from_xstart(xc, t, pred_xstart)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    def p_mean_variance(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """Apply the model: mean, variance, log_variance of p(x_{t-1} | x_t), and the model's x_0 (pred_xstart)."""
        self._check_t(t, x)
        out = self._call_model(model, x, t, model_kwargs)
        return self.p_mean_variance_from_output(out, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn)

    def predict_xstart(
        self,
        model: ModelFn,
        x_t: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        clip: bool = True,
    ) -> torch.Tensor:
        """One-step denoising: the model's estimate of x_0 from x_t (optionally clipped to [-1, 1]), in x_t's dtype.

        Gradients flow if the caller does not disable them (wrap in torch.no_grad() for evaluation).
        """
        self._check_t(t, x_t)
        out = self._call_model(model, x_t, t, model_kwargs)
        cd = _compute_dtype(x_t.dtype)
        mean_out, _ = self._split_output(out.to(cd), x_t)
        x0 = mean_out if self.mean_type == "start_x" else self.predict_xstart_from_eps(x_t.to(cd), t, mean_out)
        if clip:
            x0 = x0.clamp(-1, 1)
        return x0.to(x_t.dtype)

    # --------------------------------------------------------------------------------------------------- training

    def _vb_terms_bpd(
        self, out: dict[str, torch.Tensor], x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The VLB term for each sample, in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0,
        the discretised Gaussian decoder NLL -log p(x_0 | x_1) at t = 0. Shape (B,)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(
        self,
        model: ModelFn,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses for a batch at timesteps t.

        Returns {"loss": (B,), "mse": (B,)} and, for the hybrid loss with a learned variance, "vb": (B,)
        (loss = mse + vb); for loss "kl", {"loss", "vb"} (loss = vb = the VLB term times num_timesteps). Losses are
        in float32 (float64 for float64 inputs), whatever the model's output dtype. In the hybrid loss the VLB sees
        the model's mean detached: it trains only the variance channels, the MSE trains the mean output (epsilon,
        or x_0 with mean_type "start_x").
        """
        self._check_t(t, x_start)
        if noise is None:
            noise = randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self._call_model(model, x_t, t, model_kwargs)

        cd = _compute_dtype(x_start.dtype)
        model_output = model_output.to(cd)
        if self.loss_type == "kl":  # the full VLB, rescaled to estimate its sum over all T steps
            out = self.p_mean_variance_from_output(model_output, x_t.to(cd), t, clip_denoised=False)
            vb = self._vb_terms_bpd(out, x_start.to(cd), x_t.to(cd), t) * self.num_timesteps
            return {"loss": vb, "vb": vb}
        mean_out, v = self._split_output(model_output, x_start)
        target = x_start if self.mean_type == "start_x" else noise
        terms: dict[str, torch.Tensor] = {"mse": mean_flat((target.to(cd) - mean_out) ** 2)}
        if self.loss_type == "hybrid" and v is not None:
            frozen = torch.cat([mean_out.detach(), v], dim=1)  # the VLB must not move the mean
            out = self.p_mean_variance_from_output(frozen, x_t.to(cd), t, clip_denoised=False)
            vb = self._vb_terms_bpd(out, x_start.to(cd), x_t.to(cd), t)
            if self.rescale_vb:
                vb = vb * (self.num_timesteps / 1000.0)
            terms["vb"] = vb
            terms["loss"] = terms["mse"] + vb
        else:
            terms["loss"] = terms["mse"]
        return terms

    # --------------------------------------------------------------------------------------------------- sampling

    def condition_mean(
        self,
        cond_fn: ModelFn,
        p_mean_var: dict[str, torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """The mean of p(x_{t-1} | x_t) shifted by variance x grad log p(y | x_t) (Sohl-Dickstein et al. 2015), where
        `cond_fn(x, t, **model_kwargs)` returns that gradient (t: the model's timesteps)."""
        gradient = cond_fn(x, self._model_t(t), **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(
        self,
        cond_fn: ModelFn,
        p_mean_var: dict[str, torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """p_mean_var as if the model's score were conditioned by cond_fn (Song et al. 2020): epsilon moves by
        -sqrt(1 - a_bar_t) x cond_fn(x, t, **model_kwargs); pred_xstart and the mean follow (DDIM's conditioning)."""
        xc = x.to(p_mean_var["mean"].dtype)
        alpha_bar = self._gather("alphas_cumprod", t, xc)
        eps = self.predict_eps_from_xstart(xc, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, self._model_t(t), **(model_kwargs or {}))
        out = dict(p_mean_var)
        out["pred_xstart"] = self.predict_xstart_from_eps(xc, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], xc, t)
        out["eps"] = eps
        return out

    def p_sample(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cond_fn: ModelFn | None = None,
        model_kwargs: dict | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (no noise added at t = 0); `cond_fn` shifts the mean
        (condition_mean)."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        noise = randn(x.shape, generator=generator, device=x.device, dtype=out["mean"].dtype)
        nonzero = (t != 0).to(noise.dtype).view(-1, *([1] * (x.ndim - 1)))
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample.to(x.dtype), "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cond_fn: ModelFn | None = None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One DDIM step x_t -> x_{t-1} (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 ~ DDPM;
        `cond_fn` conditions the score (condition_score)."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        xc = x.to(out["mean"].dtype)
        # Usually the model outputs epsilon; it is re-derived from pred_xstart (clipped, denoised_fn applied).
        eps = self.predict_eps_from_xstart(xc, t, out["pred_xstart"])
        a_bar = self._gather("alphas_cumprod", t, xc)
        a_bar_prev = self._gather("alphas_cumprod_prev", t, xc)
        sigma = eta * torch.sqrt((1 - a_bar_prev) / (1 - a_bar)) * torch.sqrt(1 - a_bar / a_bar_prev)
        sample = out["pred_xstart"] * torch.sqrt(a_bar_prev) + torch.sqrt(1 - a_bar_prev - sigma**2) * eps
        if eta > 0:
            noise = randn(x.shape, generator=generator, device=x.device, dtype=xc.dtype)
            nonzero = (t != 0).to(xc.dtype).view(-1, *([1] * (x.ndim - 1)))
            sample = sample + nonzero * sigma * noise
        return {"sample": sample.to(x.dtype), "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cond_fn: ModelFn | None = None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """One step of the reverse DDIM ODE, x_t -> x_{t+1} (DDIM inversion); deterministic, so eta must be 0."""
        if eta != 0.0:
            raise ConfigError(f"ddim_reverse_sample eta = {eta}: the reverse ODE is deterministic, expected eta = 0")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        xc = x.to(out["mean"].dtype)
        eps = self.predict_eps_from_xstart(xc, t, out["pred_xstart"])
        a_bar_next = self._gather("alphas_cumprod_next", t, xc)
        sample = out["pred_xstart"] * torch.sqrt(a_bar_next) + torch.sqrt(1 - a_bar_next) * eps  # eq. 12 reversed
        return {"sample": sample.to(x.dtype), "pred_xstart": out["pred_xstart"]}

    def _loop(
        self,
        step: Callable[..., dict[str, torch.Tensor]],
        model: ModelFn,
        shape: tuple[int, ...],
        noise: torch.Tensor | None,
        device: torch.device | str | None,
        progress: bool,
        generator: torch.Generator | None,
        **step_kwargs: Any,
    ) -> Iterator[dict[str, torch.Tensor]]:
        clip = step_kwargs.get("clip_denoised")
        if isinstance(clip, Mapping):  # model_kwargs passed in the 4th place, as ditscale's loops took them before
            raise ModelInputError(
                f"clip_denoised: expected a bool, got a {type(clip).__name__}; the sampling loops take the reference's "
                "arguments in its order: (model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, "
                "device, progress); pass model_kwargs=... by keyword"
            )
        shape = tuple(shape)
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ModelInputError(f"noise: expected shape {shape}, got {tuple(noise.shape)}")
            img = noise if device is None else noise.to(device)
        else:
            if device is None:
                device = _default_device(model, generator)
            img = randn(shape, generator=generator, device=device)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        for i in indices:
            t = torch.full((shape[0],), i, device=img.device, dtype=torch.long)
            with torch.no_grad():
                out = step(model, img, t, generator=generator, **step_kwargs)
            yield out
            img = out["sample"]

    def p_sample_loop_progressive(
        self,
        model: ModelFn,
        shape: tuple[int, ...],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cond_fn: ModelFn | None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        *,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield {"sample", "pred_xstart"} after each ancestral step, from t = T-1 down to 0."""
        yield from self._loop(
            self.p_sample,
            model,
            shape,
            noise,
            device,
            progress,
            generator,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
        )

    def p_sample_loop(
        self,
        model: ModelFn,
        shape: tuple[int, ...],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cond_fn: ModelFn | None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Ancestral (DDPM) sampling over all num_timesteps steps; returns x_0 with the noise's dtype (float32 if
        the noise is drawn here).

        Arguments as the reference's: `noise` the initial x_T (drawn from `generator` when not given, on `device`:
        by default the model's parameters' device, else the generator's), `clip_denoised` clips each x_0 estimate
        to [-1, 1] after `denoised_fn`, `cond_fn(x, t, **model_kwargs)` returns grad log p(y | x) (condition_mean),
        `model_kwargs` go to the model, `progress` shows a tqdm bar."""
        final = None
        for step_out in self.p_sample_loop_progressive(
            model,
            shape,
            noise,
            clip_denoised,
            denoised_fn,
            cond_fn,
            model_kwargs,
            device,
            progress,
            generator=generator,
        ):
            final = step_out
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model: ModelFn,
        shape: tuple[int, ...],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cond_fn: ModelFn | None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
        *,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield {"sample", "pred_xstart"} after each DDIM step, from t = T-1 down to 0."""
        yield from self._loop(
            self.ddim_sample,
            model,
            shape,
            noise,
            device,
            progress,
            generator,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            eta=eta,
        )

    def ddim_sample_loop(
        self,
        model: ModelFn,
        shape: tuple[int, ...],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cond_fn: ModelFn | None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DDIM sampling over all num_timesteps steps (respace the diffusion for fewer); eta = 0 is deterministic
        given the noise. Arguments as p_sample_loop's, plus eta (`cond_fn` conditions the score)."""
        final = None
        for step_out in self.ddim_sample_loop_progressive(
            model,
            shape,
            noise,
            clip_denoised,
            denoised_fn,
            cond_fn,
            model_kwargs,
            device,
            progress,
            eta,
            generator=generator,
        ):
            final = step_out
        return final["sample"]

    # Names of the reference's private helpers, for code written against it.
    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.predict_xstart_from_eps(x_t, t, eps)

    def _predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        return self.predict_eps_from_xstart(x_t, t, pred_xstart)


def _default_device(model: ModelFn, generator: torch.Generator | None) -> torch.device:
    """The reference's default device (a model parameter's), else the generator's, else the CPU."""
    for owner in (model, getattr(model, "__self__", None)):  # a module, or a bound method such as forward_with_cfg
        params = getattr(owner, "parameters", None)
        if callable(params):
            for p in params():
                return p.device
    return generator.device if generator is not None else torch.device("cpu")
