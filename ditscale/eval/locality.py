"""How local a DiT's attention is, per block, as numbers and as the paper's pictures.

For attention probabilities p (B, heads, N, N) over an h x w token grid:
- mean attention distance: sum_k p(q, k) * ||pos(q) - pos(k)||_2 in tokens, averaged over queries, heads, batch;
- neighbourhood mass for k in {3, 5, 7}: the attention mass falling inside the k x k window centred on the query
  (clipped at the border, the same windows the model's local attention uses), averaged the same way.
The same numbers for uniform attention over the grid are reported alongside, as the "no locality" reference.
Figures (as in the paper): full N x N maps averaged over heads, linearly normalised to [0, 1] and shown with the
colour map clipped to [0, 0.1]; one query row of the last block reshaped to h x w.
"""

from __future__ import annotations

import math

import torch

KS = (3, 5, 7)


def grid_coords(h: int, w: int) -> torch.Tensor:
    """(N, 2) row/column coordinates of the tokens of an h x w grid in raster order."""
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([r.flatten(), c.flatten()], 1).float()


def distance_matrix(h: int, w: int) -> torch.Tensor:
    """(N, N) Euclidean distances between token positions, in tokens."""
    xy = grid_coords(h, w)
    return torch.cdist(xy, xy)


def window_mask(h: int, w: int, k: int) -> torch.Tensor:
    """(N, N) bool: key inside the k x k window centred on the query (Chebyshev radius k // 2)."""
    xy = grid_coords(h, w)
    d = (xy[:, None, :] - xy[None, :, :]).abs().amax(-1)
    return d <= k // 2


def locality_stats(probs: torch.Tensor, h: int, w: int, ks=KS) -> dict:
    """Mean attention distance and k x k neighbourhood mass of probabilities (..., N, N), N = h * w."""
    n = h * w
    if probs.shape[-1] != n or probs.shape[-2] != n:
        raise ValueError(f"attention of shape {tuple(probs.shape)} does not fit a {h}x{w} token grid")
    p = probs.float().reshape(-1, n, n)
    dist = distance_matrix(h, w)
    out = {"mean_distance": float((p * dist).sum(-1).mean())}
    for k in ks:
        out[f"mass_{k}x{k}"] = float((p * window_mask(h, w, k)).sum(-1).mean())
    return out


def uniform_reference(h: int, w: int, ks=KS) -> dict:
    """The same statistics for uniform attention over the whole grid."""
    n = h * w
    return locality_stats(torch.full((1, n, n), 1.0 / n), h, w, ks)


def attention_entropy(probs: torch.Tensor) -> float:
    """Mean entropy (nats) of the attention rows; log N for uniform attention."""
    p = probs.float().clamp_min(1e-12)
    return float(-(p * p.log()).sum(-1).mean())


@torch.no_grad()
def collect_attention(model, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, blocks: list[int] | None = None):
    """Run the model once under `capture_attention`; {block: probabilities (B, heads, N, N)}."""
    blocks = list(range(model.depth)) if blocks is None else list(blocks)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    with model.capture_attention(blocks=blocks) as probs:
        model(x_t.to(dev), t.to(dev), y.to(dev))
    return {b: probs[b].detach().float().cpu() for b in blocks}


def token_grid(model) -> tuple[int, int]:
    side = int(model.input_size) // int(model.patch_size)
    return side, side


@torch.no_grad()
def locality(model, diffusion, images, labels, timesteps: list[int], *, seed: int = 0, batch_size: int = 64) -> dict:
    """Per-block locality numbers of `model` on noisy versions of `images` at each timestep in `timesteps`."""
    h, w = token_grid(model)
    per_t = {}
    sums: dict[int, dict[str, float]] = {}
    maps = {}
    for t in timesteps:
        g = torch.Generator().manual_seed(seed * 7919 + int(t))
        stats: dict[int, list[dict]] = {}
        acc_maps: dict[int, torch.Tensor] = {}
        count = 0
        for i in range(0, len(images), batch_size):
            x0 = images[i : i + batch_size]
            tt = torch.full((len(x0),), int(t), dtype=torch.long)
            noise = torch.randn(x0.shape, generator=g)
            x_t = diffusion.q_sample(x0, tt, noise=noise)
            probs = collect_attention(model, x_t, tt, labels[i : i + batch_size])
            for b, p in probs.items():
                s = locality_stats(p, h, w)
                s["entropy"] = attention_entropy(p)
                stats.setdefault(b, []).append((len(x0), s))
                m = p.mean(1).sum(0)  # sum over batch of the head-averaged map
                acc_maps[b] = acc_maps.get(b, 0) + m
            count += len(x0)
        block_stats = {}
        for b, items in stats.items():
            tot = sum(n for n, _ in items)
            block_stats[b] = {key: sum(n * s[key] for n, s in items) / tot for key in items[0][1]}
            for key, v in block_stats[b].items():
                sums.setdefault(b, {}).setdefault(key, 0.0)
                sums[b][key] += v / len(timesteps)
        per_t[int(t)] = {str(b): v for b, v in block_stats.items()}
        maps[int(t)] = {b: m / count for b, m in acc_maps.items()}
    blocks = sorted(sums)
    ref = uniform_reference(h, w)
    ref["entropy"] = math.log(h * w)
    return {
        "grid": [h, w],
        "timesteps": [int(t) for t in timesteps],
        "windows": [None if x is None else int(x) for x in getattr(model, "windows", [None] * len(blocks))],
        "blocks": [{"block": b, **sums[b]} for b in blocks],
        "per_timestep": per_t,
        "uniform": ref,
        "num_images": int(len(images)),
    }, maps


def plot_maps(maps: dict[int, torch.Tensor], h: int, w: int, title: str = "", row: int | None = None):
    """Paper-style figure: full head-averaged maps per block (normalised to [0, 1], colours clipped to [0, 0.1]),
    and one query row of the last block reshaped to h x w."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = sorted(maps)
    n = len(blocks) + 1
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n, 2.7))
    for ax, b in zip(axes, blocks, strict=False):
        m = maps[b].float()
        m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
        ax.imshow(m.numpy(), cmap="viridis", vmin=0.0, vmax=0.1, interpolation="nearest")
        ax.set_title(f"block {b}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    last = blocks[-1]
    row = (h // 2) * w + w // 2 if row is None else row
    r = maps[last][row].reshape(h, w)
    axes[-1].imshow(r.numpy(), cmap="viridis", interpolation="nearest")
    axes[-1].plot([row % w], [row // w], "r+", ms=8)
    axes[-1].set_title(f"block {last}, row {row}", fontsize=9)
    axes[-1].set_xticks([])
    axes[-1].set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_locality(result: dict, title: str = ""):
    """Per-block mean distance and 3x3 mass, with the uniform-attention reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = [b["block"] for b in result["blocks"]]
    fig, (a, c) = plt.subplots(1, 2, figsize=(8, 3))
    a.plot(blocks, [b["mean_distance"] for b in result["blocks"]], "o-")
    a.axhline(result["uniform"]["mean_distance"], color="gray", ls="--", label="uniform")
    a.set_xlabel("block")
    a.set_ylabel("mean attention distance (tokens)")
    a.legend()
    for k in KS:
        c.plot(blocks, [b[f"mass_{k}x{k}"] for b in result["blocks"]], "o-", label=f"{k}x{k}")
    c.set_xlabel("block")
    c.set_ylabel("attention mass in k x k window")
    c.set_ylim(0, 1.02)
    c.legend()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
