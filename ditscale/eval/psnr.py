"""One-step denoising PSNR of training and test images, and the train/test PSNR gap (An et al. 2024, following
Kadkhodaie et al. 2024).

For each evaluation timestep t: noise a clean image x0 to x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, denoise in
one shot to x0_hat = predict_xstart(model, x_t, t), and compute PSNR(x0, x0_hat) with images in [-1, 1] (peak-to-
peak 2, the same number as [0, 1] images with peak 1). Average over K training and K test images separately;
gap(t) = train PSNR - test PSNR; the average gap is the mean over the timesteps. Lower = better generalisation.
Train and test images see the same noise draws (same seed per timestep), so the gap measures the model, not the noise.
"""

from __future__ import annotations

import torch


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, eps: float = 1e-12) -> torch.Tensor:
    """Per-image PSNR in dB between batches x and y (B, ...): 10 log10(range^2 / MSE)."""
    mse = (x.float() - y.float()).flatten(1).pow(2).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(eps))


def eval_timesteps(num_timesteps: int, n: int = 50) -> list[int]:
    """`n` evenly spaced timesteps covering [0, num_timesteps - 1] (the paper's 50 evaluation points)."""
    n = max(1, min(int(n), int(num_timesteps)))
    if n == 1:
        return [num_timesteps // 2]
    return [round(i * (num_timesteps - 1) / (n - 1)) for i in range(n)]


def noise_for(shape: tuple[int, ...], seed: int, t: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + int(t))
    return torch.randn(shape, generator=g)


@torch.no_grad()
def psnr_curve(
    model,
    diffusion,
    images: torch.Tensor,
    labels: torch.Tensor,
    timesteps: list[int],
    *,
    batch_size: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    """Mean one-step denoising PSNR per timestep: tensor (len(timesteps),)."""
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = []
    for t in timesteps:
        # noise per image is fixed by (seed, t, position), whatever the batch size and device
        noise = noise_for(tuple(images.shape), seed, t)
        vals = []
        for i in range(0, len(images), batch_size):
            x0 = images[i : i + batch_size].to(dev)
            y = labels[i : i + batch_size].to(dev)
            tt = torch.full((len(x0),), int(t), dtype=torch.long, device=dev)
            x_t = diffusion.q_sample(x0, tt, noise=noise[i : i + batch_size].to(dev))
            x0_hat = diffusion.predict_xstart(model, x_t, tt, model_kwargs={"y": y}, clip=True)
            vals.append(psnr(x0, x0_hat).cpu())
        out.append(torch.cat(vals).double().mean())
    return torch.stack(out)


def psnr_gap(
    model,
    diffusion,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    num_points: int = 50,
    batch_size: int = 256,
    seed: int = 0,
) -> dict:
    """Train and test PSNR curves, the gap per timestep and the averages (all numbers in dB)."""
    ts = eval_timesteps(diffusion.num_timesteps, num_points)
    tr = psnr_curve(model, diffusion, *train, ts, batch_size=batch_size, seed=seed)
    te = psnr_curve(model, diffusion, *test, ts, batch_size=batch_size, seed=seed)
    gap = tr - te
    return {
        "timesteps": ts,
        "train_psnr": tr.tolist(),
        "test_psnr": te.tolist(),
        "gap": gap.tolist(),
        "avg_train_psnr": float(tr.mean()),
        "avg_test_psnr": float(te.mean()),
        "avg_gap": float(gap.mean()),
        "num_train_images": int(len(train[0])),
        "num_test_images": int(len(test[0])),
    }


def plot_psnr(result: dict, title: str = ""):
    """Figure: train and test PSNR against the input timestep, and the gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    ts = result["timesteps"]
    a.plot(ts, result["train_psnr"], label="train")
    a.plot(ts, result["test_psnr"], label="test")
    a.set_xlabel("input diffusion step t")
    a.set_ylabel("PSNR of one-step x0 estimate (dB)")
    a.legend()
    b.plot(ts, result["gap"], color="C3")
    b.axhline(0, color="gray", lw=0.5)
    b.set_xlabel("input diffusion step t")
    b.set_ylabel("PSNR gap, train - test (dB)")
    b.set_title(f"average gap {result['avg_gap']:.2f} dB")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
