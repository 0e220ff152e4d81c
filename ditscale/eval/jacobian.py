"""The denoiser's Jacobian at one noise level, its eigenvalues and eigenvector images (Kadkhodaie et al. 2024 §3;
An et al. 2024 Fig. 1).

The denoiser is taken in the clean-image scale of Kadkhodaie et al.: a noisy image y = x0 + sigma * eps with
sigma = sqrt((1 - abar_t) / abar_t) is mapped to x_t = sqrt(abar_t) y and denoised in one shot,
f(y) = x0_hat(x_t, t) (no clipping, so f is differentiable). J = df/dy (d x d, d = C * H * W) is computed with
torch.func.jacrev (falling back to one autograd row at a time). Eigenvalues are those of the symmetrised
Jacobian (J + J^T) / 2 (eigh; the asymmetry ||J - J^T|| / ||J|| is reported); for an optimal (posterior-mean)
denoiser J = Cov[x | y] / sigma^2 is symmetric positive semi-definite with eigenvalues in [0, 1].
"""

from __future__ import annotations

import logging
import math

import torch

from ditscale.errors import ConfigError

log = logging.getLogger("ditscale.eval.jacobian")
MAX_DIM = 4096


def sigma_of(diffusion, t: int) -> float:
    abar = float(diffusion.alphas_cumprod[int(t)])
    return math.sqrt((1 - abar) / abar)


def timestep_for_sigma(diffusion, sigma: float) -> int:
    """The timestep whose noise level sqrt((1 - abar) / abar) is closest to `sigma`."""
    ab = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float64)
    sig = ((1 - ab) / ab).sqrt()
    return int((sig - sigma).abs().argmin())


def jacobian(fn, x: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """(d, d) Jacobian of fn: R^d -> R^d at the flat vector x."""
    if method in ("auto", "jacrev"):
        try:
            return torch.func.jacrev(fn)(x).detach()
        except Exception as e:  # some kernels have no batching rule; rows always work
            if method == "jacrev":
                raise
            log.info("jacrev failed (%s); computing the Jacobian one row at a time", type(e).__name__)
    x = x.detach().requires_grad_(True)
    y = fn(x)
    rows = []
    for i in range(y.numel()):
        (g,) = torch.autograd.grad(y[i], x, retain_graph=i + 1 < y.numel())
        rows.append(g)
    return torch.stack(rows).detach()


def spectrum(J: torch.Tensor) -> dict:
    """Eigen-decomposition of the symmetrised Jacobian, eigenvalues in descending order."""
    J = J.double()
    S = (J + J.T) / 2
    evals, evecs = torch.linalg.eigh(S)
    order = torch.argsort(evals, descending=True)
    return {
        "eigenvalues": evals[order],
        "eigenvectors": evecs[:, order],  # columns
        "asymmetry": float(torch.linalg.norm(J - J.T) / torch.linalg.norm(J).clamp_min(1e-30)),
        "trace": float(torch.trace(J)),
    }


def denoiser_jacobian(
    model, diffusion, image: torch.Tensor, label: int, t: int, *, seed: int = 0, method: str = "auto"
) -> dict:
    """Jacobian analysis of the one-step denoiser y -> x0_hat at timestep t around y = image + sigma * eps."""
    c, h, w = image.shape
    d = c * h * w
    if d > MAX_DIM:
        raise ConfigError(f"jacobian: images of {c}x{h}x{w} = {d} dimensions are too large (at most {MAX_DIM})")
    sigma = sigma_of(diffusion, t)
    abar = float(diffusion.alphas_cumprod[int(t)])
    g = torch.Generator().manual_seed(seed)
    y0 = (image.float() + sigma * torch.randn(image.shape, generator=g)).flatten()
    tt = torch.tensor([int(t)])
    yy = torch.tensor([int(label)])

    def fn(v: torch.Tensor) -> torch.Tensor:
        x_t = math.sqrt(abar) * v.reshape(1, c, h, w)
        return diffusion.predict_xstart(model, x_t, tt, model_kwargs={"y": yy}, clip=False).flatten()

    with torch.no_grad():
        out = fn(y0)
    J = jacobian(fn, y0, method)
    s = spectrum(J)
    # how well the local linear map explains the output (exactly 1 for a bias-free, piecewise-linear denoiser)
    lin = J.double() @ y0.double()
    rel = float(torch.linalg.norm(lin - out.double()) / torch.linalg.norm(out.double()).clamp_min(1e-30))
    return {
        "t": int(t),
        "sigma": sigma,
        "dim": d,
        "shape": [c, h, w],
        "jacobian": J,
        "noisy": y0.reshape(c, h, w),
        "denoised": out.reshape(c, h, w),
        "linear_residual": rel,
        **s,
    }


def summary(res: dict, top: int = 8) -> dict:
    ev = res["eigenvalues"]
    d = len(ev)
    picks = sorted({0, 1, 2, 4, 8, 16, 32, 64, 112, 128, d // 4, d // 2, d - 1} & set(range(d)))
    return {
        "t": res["t"],
        "sigma": res["sigma"],
        "dim": res["dim"],
        "asymmetry": res["asymmetry"],
        "trace": res["trace"],
        "effective_dim": float(ev.clamp_min(0).sum() ** 2 / ev.clamp_min(0).pow(2).sum().clamp_min(1e-30)),
        "linear_residual": res["linear_residual"],
        "eigenvalues": [float(v) for v in ev],
        "eigenvalues_at": {str(k): float(ev[k]) for k in picks},
        "top": [float(v) for v in ev[:top]],
    }


def plot_jacobian(results: dict[str, dict], top: int = 8, title: str = ""):
    """Eigenvalue spectra (one line per image) and, per image: clean, noisy, denoised, top eigenvectors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig = plt.figure(figsize=(2 + 1.3 * (top + 3), 2.6 + 1.4 * len(names)))
    gs = fig.add_gridspec(1 + len(names), top + 3, height_ratios=[2.2] + [1.0] * len(names))
    ax = fig.add_subplot(gs[0, :])
    for name in names:
        ax.plot(results[name]["eigenvalues"].numpy(), label=f"{name} (sigma={results[name]['sigma']:.2f})")
    ax.set_xlabel("eigen-index k")
    ax.set_ylabel("eigenvalue of sym(J)")
    ax.axhline(0, color="gray", lw=0.5)
    ax.legend(fontsize=8)

    def show(a, img, label):
        img = img.float()
        if img.shape[0] == 3:
            a.imshow(((img.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
        else:
            a.imshow(img[0].numpy(), cmap="gray")
        a.set_title(label, fontsize=7)
        a.set_xticks([])
        a.set_yticks([])

    for r, name in enumerate(names, start=1):
        res = results[name]
        c, h, w = res["shape"]
        show(fig.add_subplot(gs[r, 0]), res["clean"], f"{name}: clean")
        show(fig.add_subplot(gs[r, 1]), res["noisy"].clamp(-1, 1), "noisy y")
        show(fig.add_subplot(gs[r, 2]), res["denoised"].clamp(-1, 1), "f(y)")
        for k in range(top):
            v = res["eigenvectors"][:, k].float().reshape(c, h, w)
            v = v / v.abs().max().clamp_min(1e-12)
            a = fig.add_subplot(gs[r, 3 + k])
            a.imshow(v.mean(0).numpy() if c == 3 else v[0].numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
            a.set_title(f"e{k}, λ={float(res['eigenvalues'][k]):.2f}", fontsize=7)
            a.set_xticks([])
            a.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
