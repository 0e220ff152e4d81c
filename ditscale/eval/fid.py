"""FID: Frechet distance between Inception-v3 pool features of generated and reference images.

The feature network is the FID variant of Inception-v3 (TensorFlow's 2015-12-05 graph ported to PyTorch, as in
pytorch-fid / torch-fidelity / clean-fid): defined here in plain torch and loaded from a LOCAL weights file
(`pt_inception-2015-12-05-6726825d.pth`); nothing is downloaded. Images are resized to 299 x 299 (bilinear),
grey images are repeated to 3 channels, inputs are scaled to [-1, 1], and the 2048-d average-pool output is used.

`--features pixels` swaps in a small deterministic extractor (the flattened image, optionally pooled) for tests and
for datasets where Inception features mean little (8 x 8 digits); `--features classifier` uses a small classifier
trained on the dataset itself (ditscale.eval.classifier: 28x28 grey images). Neither is comparable to published FIDs.
Reference statistics (mean, covariance) are computed once per (shards, features) and cached under the cache dir.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ditscale.data import iter_dataset
from ditscale.errors import CheckpointError, ConfigError, DataError
from ditscale.eval.classifier import load_classifier
from ditscale.eval.common import manifest_of
from ditscale.io import storage
from ditscale.model.checkpoint import load_tensor_file

log = logging.getLogger("ditscale.eval.fid")

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "DITSCALE_INCEPTION_WEIGHTS"


# ------------------------------------------------------------------------------------------- Frechet distance
def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Dowson & Landau; as computed by pytorch-fid)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics of different dimension: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular products are handled below
        covmean = linalg.sqrtm(s1.dot(s2))
        if not np.isfinite(covmean).all():  # singular product: add a small ridge
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(max(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean), 0.0))


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need at least 2 feature vectors (got shape {feats.shape})")
    return feats.mean(0), np.cov(feats, rowvar=False)


# ------------------------------------------------------------------------------------------ FID Inception-v3
class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):  # TensorFlow's average pool ignores the zero padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = m(bd)
        return torch.cat([b1, b7, bd, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # FID Inception: Mixed_7b average-pools, Mixed_7c max-pools
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([b1, b3, bd, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 with the FID blocks; parameter names match pt_inception-2015-12-05-6726825d.pth."""

    def __init__(self, num_classes: int = 1008):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 1 or 3, H, W) -> 2048-d pool features."""
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def default_weights_path() -> str:
    return os.environ.get(WEIGHTS_ENV) or str(Path.home() / ".cache" / "ditscale" / WEIGHTS_NAME)


def load_inception(path: str | None = None) -> FIDInceptionV3:
    """The FID Inception from a local weights file; CheckpointError naming the path when it is missing or wrong."""
    path = path or default_weights_path()
    if not Path(path).is_file():
        raise CheckpointError(
            f"Inception weights file {path!r} not found. FID needs the FID-Inception-v3 weights "
            f"({WEIGHTS_NAME}, as used by pytorch-fid / torch-fidelity / clean-fid) on local disk: download it "
            f"once and pass --inception-weights PATH or set {WEIGHTS_ENV}. Nothing is downloaded at run time."
        )

    sd = load_tensor_file(path, source=f"Inception weights {path}")  # tensors only: a pickle with code is refused
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"Inception weights {path!r}: expected a state dict, got {type(sd).__name__}")
    sd = {k.removeprefix("module."): v for k, v in sd.items() if not k.startswith("AuxLogits.")}
    net = FIDInceptionV3(num_classes=int(sd["fc.weight"].shape[0]) if "fc.weight" in sd else 1008)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if missing:
        raise CheckpointError(
            f"Inception weights {path!r} do not fit the FID Inception-v3: {len(missing)} missing keys, e.g. "
            f"{missing[:3]} (expected the pt_inception-2015-12-05 state dict)"
        )
    if unexpected:
        log.warning("ignored %d unexpected keys in %s, e.g. %s", len(unexpected), path, unexpected[:3])
    return net.eval()


class PixelFeatures(nn.Module):
    """Deterministic stand-in extractor: the image (average-pooled to at most `side` x `side`), flattened."""

    def __init__(self, side: int = 16):
        super().__init__()
        self.side = side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > self.side:
            x = F.adaptive_avg_pool2d(x, self.side)
        return x.flatten(1)


def make_extractor(kind: str, weights: str | None = None, classifier: str | None = None) -> nn.Module:
    if kind == "inception":
        return load_inception(weights)
    if kind == "pixels":
        return PixelFeatures()
    if kind == "classifier":
        if not classifier:
            raise ConfigError(
                "--features classifier needs --classifier FOLDER (built by `python -m ditscale eval classifier`)"
            )
        return load_classifier(classifier)
    raise ConfigError(f"--features {kind!r}: expected 'inception', 'pixels' or 'classifier'")


class Concat(nn.Module):
    """Several feature networks on the same images: their features side by side (split them with `split`)."""

    def __init__(self, extractors: list[nn.Module]):
        super().__init__()
        self.extractors = nn.ModuleList(extractors)
        self.dims: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [e(x).flatten(1) for e in self.extractors]
        self.dims = [f.shape[1] for f in feats]
        return torch.cat(feats, 1)

    def split(self, joined: np.ndarray) -> list[np.ndarray]:
        """The columns of each network, in order (the widths seen by forward)."""
        if sum(self.dims) != joined.shape[1]:
            raise ValueError(f"features of width {joined.shape[1]} do not split into {self.dims}")
        edges = np.cumsum([0, *self.dims])
        return [joined[:, a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]


def features_key(kind: str, extractor: nn.Module) -> str:
    """The name reference statistics are cached under: a classifier's statistics belong to its weights."""
    return f"classifier-{extractor.digest}" if kind == "classifier" else kind


@torch.no_grad()
def extract(extractor: nn.Module, images: torch.Tensor, batch_size: int = 100, device: str = "cpu") -> np.ndarray:
    extractor = extractor.to(device)
    out = [extractor(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy().astype(np.float64)


# -------------------------------------------------------------------------------------- reference statistics
def cache_dir() -> Path:
    return Path(os.environ.get("DITSCALE_CACHE", Path.home() / ".cache" / "ditscale"))


def reference_stats(
    manifest_url: str,
    features: str,
    extractor: nn.Module,
    *,
    cache: Path | None = None,
    limit: int | None = None,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu, sigma, info) of the reference shards' features; cached by manifest contents, features and limit."""

    manifest = manifest_of(manifest_url)
    key_src = json.dumps(
        {
            "manifest": manifest_url,
            "shards": manifest.get("shards"),
            "features": features,
            "limit": limit,
            "n": manifest.get("num_samples"),
        },
        sort_keys=True,
        default=str,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    path = (cache or cache_dir()) / "fid_stats" / f"{features}-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:  # arrays only, never objects
                return z["mu"], z["sigma"], {"path": str(path), "cached": True, "num_images": int(z["n"])}
        except Exception as e:  # a damaged or foreign cache file: computed again and replaced
            log.warning("reference statistics cache %s cannot be read (%s); computing it again", path, e)
    # streamed in batches: the reference set never has to fit in memory as images
    chunks, batch = [], []
    for count, (img, _label, _index) in enumerate(iter_dataset(manifest_url), start=1):
        batch.append(torch.as_tensor(img, dtype=torch.float32))
        if len(batch) == batch_size:
            chunks.append(extract(extractor, torch.stack(batch), batch_size, device))
            batch = []
        if limit is not None and count >= limit:
            break
    if batch:
        chunks.append(extract(extractor, torch.stack(batch), batch_size, device))
    if not chunks:
        raise DataError(f"reference shards {manifest_url!r} hold no samples")
    feats = np.concatenate(chunks)
    mu, sigma = feature_stats(feats)
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, n=len(feats))
    storage.write_bytes(str(path), buf.getvalue())  # atomic: concurrent evals never read a half-written cache
    return mu, sigma, {"path": str(path), "cached": False, "num_images": len(feats)}


# ----------------------------------------------------------------------------------------- generated samples
def rank_share(total: int, rank: int, world: int) -> tuple[int, int]:
    """(start, count) of this rank's share of `total` samples; shares differ by at most one."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, base + (1 if rank < extra else 0)


@torch.no_grad()
def sample_features(
    model,
    diffusion_sample,
    extractor: nn.Module,
    num_samples: int,
    *,
    num_classes: int,
    shape: tuple[int, ...] | None = None,
    batch_size: int = 100,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Features of `num_samples` generated images, spread over the ranks when torch.distributed is initialised.

    `diffusion_sample(model, labels, noise, generator) -> images in [-1, 1]`. Global sample i has label
    i % num_classes and initial noise drawn from its own stream (seed, i), so with a deterministic sampler (DDIM)
    the set of samples does not depend on the world size; `generator` (seeded per batch) drives any further
    sampler noise. Returns the features of ALL samples on every rank (all_gather)."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    if shape is None:
        shape = (int(model.in_channels), int(model.input_size), int(model.input_size))
    start, count = rank_share(num_samples, rank, world)
    feats = []
    for i in range(start, start + count, batch_size):
        idx = list(range(i, min(i + batch_size, start + count)))
        noise = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + j)) for j in idx]
        )
        g = torch.Generator().manual_seed(seed * 1_000_003 + 500_000 + idx[0])
        labels = torch.tensor([j % max(num_classes, 1) for j in idx], dtype=torch.long)
        images = diffusion_sample(model, labels, noise, g)
        feats.append(extract(extractor, images.float().clamp(-1, 1), batch_size, device))
    local = np.concatenate(feats) if feats else np.zeros((0, 0))
    if world == 1:
        return local
    dim = torch.tensor([local.shape[1] if len(local) else 0], dtype=torch.long)
    dist.all_reduce(dim, op=dist.ReduceOp.MAX)
    width = int(dim.item())
    _, most = rank_share(num_samples, 0, world)
    buf = torch.zeros(most, width, dtype=torch.float64)
    if len(local):
        buf[: len(local)] = torch.from_numpy(local)
    parts = [torch.zeros_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf)
    return torch.cat([p[: rank_share(num_samples, r, world)[1]] for r, p in enumerate(parts)]).numpy()


def fid_from_features(gen: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    mu, sigma = feature_stats(gen)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)
