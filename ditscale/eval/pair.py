"""The two-model test (Kadkhodaie et al. 2024, §2): two models trained on DISJOINT subsets S1, S2 of size N sample
from the same initial noise with a deterministic sampler (DDIM, eta = 0). Memorising models reproduce their own
training images (paired samples differ, each is close to a training image); generalising models produce nearly the
same novel image from the same noise (paired similarity near 1, further from any training image).

Similarities are cosine similarities of the flattened images in [-1, 1] (0 = mid grey); the nearest training image
of a sample is the one of its own model's subset with the highest cosine similarity.
"""

from __future__ import annotations

import torch

from ditscale.errors import DataError

INDEX_KEYS = ("indices", "source_indices", "chosen", "chosen_indices", "subset_indices", "parent_indices", "ids")


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of (B, ...) batches."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)


def nearest(samples: torch.Tensor, train: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample: (max cosine similarity to the training images, index of that image)."""
    s = torch.nn.functional.normalize(samples.flatten(1).double(), dim=1, eps=1e-12)
    best_v, best_i = [], []
    for i in range(0, len(s), chunk):
        sims = s[i : i + chunk] @ torch.nn.functional.normalize(train.flatten(1).double(), dim=1, eps=1e-12).T
        v, j = sims.max(1)
        best_v.append(v)
        best_i.append(j)
    return torch.cat(best_v), torch.cat(best_i)


def subset_ids(manifest: dict) -> set | None:
    """The source indices a subset manifest says it chose, if it records them (None otherwise)."""
    for key in INDEX_KEYS:
        v = manifest.get(key)
        if isinstance(v, list) and v and all(isinstance(x, (int, str)) for x in v):
            return set(v)
    sub = manifest.get("subset")
    if isinstance(sub, dict):
        return subset_ids(sub)
    return None


def check_disjoint(ids_a, ids_b, what_a: str, what_b: str) -> None:
    both = set(ids_a) & set(ids_b)
    if both:
        ex = sorted(both, key=str)[:5]
        raise DataError(
            f"the two-model test needs disjoint training sets, but {what_a} and {what_b} share {len(both)} "
            f"images (e.g. source indices {ex}); build them with `shards/subset.py --pair`"
        )


def shared_samples(ids_a, images_a, ids_b, images_b) -> set:
    """Source indices present in both sets WITH identical pixels (indices alone may come from different sources)."""
    ha = dict(zip(ids_a, image_hashes(images_a), strict=True))
    hb = dict(zip(ids_b, image_hashes(images_b), strict=True))
    return {i for i in ha.keys() & hb.keys() if ha[i] == hb[i]}


def image_hashes(images: torch.Tensor) -> list[bytes]:
    import hashlib

    q = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [hashlib.sha1(x.numpy().tobytes()).digest() for x in q]


def pair_stats(samples_a, samples_b, train_a, train_b) -> dict:
    """Similarities of paired samples and of each sample to its nearest training image."""
    paired = cosine(samples_a, samples_b)
    near_a, idx_a = nearest(samples_a, train_a)
    near_b, idx_b = nearest(samples_b, train_b)
    return {
        "paired": paired,
        "nearest_a": near_a,
        "nearest_b": near_b,
        "nearest_index_a": idx_a,
        "nearest_index_b": idx_b,
    }


def summarise(stats: dict, threshold: float = 0.95) -> dict:
    def s(v: torch.Tensor) -> dict:
        return {
            "mean": float(v.mean()),
            "median": float(v.median()),
            "std": float(v.std()) if len(v) > 1 else 0.0,
            f"frac_above_{threshold}": float((v > threshold).double().mean()),
        }

    near = torch.cat([stats["nearest_a"], stats["nearest_b"]])
    return {
        "paired_similarity": s(stats["paired"]),
        "nearest_train_similarity": s(near),
        "nearest_train_similarity_a": s(stats["nearest_a"]),
        "nearest_train_similarity_b": s(stats["nearest_b"]),
    }


def plot_pair(stats: dict, samples_a, samples_b, title: str = "", show: int = 8):
    """Histograms (paired; nearest training image) and the first `show` sample pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    show = min(show, len(samples_a))
    fig = plt.figure(figsize=(max(8, 1.1 * show), 5.6))
    gs = fig.add_gridspec(3, max(show, 2), height_ratios=[2.4, 1, 1])
    bins = torch.linspace(-1, 1, 81).numpy()
    a = fig.add_subplot(gs[0, : max(show, 2) // 2])
    a.hist(stats["paired"].numpy(), bins=bins, color="C0")
    a.set_xlabel("cos sim, model A vs model B (same noise)")
    a.set_xlim(min(0.0, float(stats["paired"].min())), 1)
    b = fig.add_subplot(gs[0, max(show, 2) // 2 :])
    near = torch.cat([stats["nearest_a"], stats["nearest_b"]])
    b.hist(near.numpy(), bins=bins, color="C1")
    b.set_xlabel("cos sim, sample vs nearest own training image")
    b.set_xlim(min(0.0, float(near.min())), 1)
    for row, samples in ((1, samples_a), (2, samples_b)):
        for k in range(show):
            ax = fig.add_subplot(gs[row, k])
            img = ((samples[k].float() + 1) / 2).clamp(0, 1)
            ax.imshow(img.permute(1, 2, 0).numpy() if img.shape[0] == 3 else img[0].numpy(), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_ylabel("A" if row == 1 else "B")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
