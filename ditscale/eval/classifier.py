"""A small image classifier as the FID feature network for small grey images (28x28 Fashion-MNIST, MNIST, digits).

Inception-v3 features mean little for 28x28 grey images (they are upsampled to 299x299 and repeated to RGB), and
its weights are a download. This network is trained here, on the dataset itself: `train_classifier` is the recipe
that rebuilds it from a shard set's training split (deterministic: a fixed seed, one thread, deterministic
algorithms, images in index order, a seeded shuffle), evaluates it on the held-out split and writes
`classifier.safetensors` plus `classifier.json` (the recipe, test accuracy and the weights' sha256).

Features for FID are the 64-d activations before the last linear layer (`ClassifierFeatures`); because the logits
are that layer applied to the features, the same numbers also say how often a class-conditional sample is
classified as the class it was drawn for (`sample_accuracy`).

    python -m ditscale eval classifier --data data/fmnist28/full/manifest.json --out data/fmnist28/classifier
    python -m ditscale eval fid --run DIR --features classifier --classifier data/fmnist28/classifier
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ditscale.errors import CheckpointError, DataError
from ditscale.eval.common import load_images, manifest_of
from ditscale.io import storage

log = logging.getLogger("ditscale.eval.classifier")

WEIGHTS = "classifier.safetensors"
META = "classifier.json"
FEATURE_DIM = 64


class SmallCNN(nn.Module):
    """Two conv blocks, 4x4 adaptive pooling (any input side), a 64-d feature layer, then the class logits."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, C, H, W) -> (B, feature_dim)."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 32, H/2, W/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 64, H/4, W/4)
        x = F.adaptive_avg_pool2d(x, 4).flatten(1)  # (B, 1024)
        return F.relu(self.fc1(x))  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))  # (B, num_classes)


class ClassifierFeatures(nn.Module):
    """The FID extractor: the classifier's features; `logits(features)` gives its class scores."""

    def __init__(self, net: SmallCNN, meta: dict):
        super().__init__()
        self.net = net
        self.meta = meta
        self.resolution = int(meta["resolution"])
        self.channels = int(meta["channels"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != (self.channels, self.resolution, self.resolution):
            raise DataError(
                f"classifier {self.meta.get('path')!r} was trained on {self.channels}x{self.resolution}x"
                f"{self.resolution} images, got {tuple(x.shape[1:])}"
            )
        return self.net.features(x)

    @torch.no_grad()
    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net.fc2(feats.to(self.net.fc2.weight.dtype))

    @property
    def digest(self) -> str:
        return str(self.meta["sha256"])[:16]


def _load_split(url: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _ = load_images(url, limit)
    return x, y


def _test_url(train_url: str) -> str | None:
    splits = manifest_of(train_url).get("splits") or {}
    for name in ("test", "val"):
        if name in splits and splits[name] != "manifest.json":
            return storage.join(storage.dirname(train_url), splits[name])
    return None


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    net.eval()
    steps = range(0, len(x), batch_size)
    right = sum(int((net(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum()) for i in steps)
    return right / max(len(x), 1)


def train_classifier(
    data: str,
    out: str,
    *,
    epochs: int = 4,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    limit: int | None = None,
) -> dict:
    """Train the classifier on the shard set `data` (its train split), test it on the held-out split, write
    `out/classifier.safetensors` and `out/classifier.json`; returns the metadata. Deterministic: one thread."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same sums in the same order, so the same weights on a rerun
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        manifest = manifest_of(data)
        x, y = _load_split(data, limit)
        num_classes = int(manifest.get("num_classes") or int(y.max()) + 1)
        torch.manual_seed(seed)
        net = SmallCNN(x.shape[1], num_classes)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        steps = epochs * ((len(x) + batch_size - 1) // batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        g = torch.Generator().manual_seed(seed)
        for epoch in range(epochs):
            net.train()
            order = torch.randperm(len(x), generator=g)
            total = 0.0
            for i in range(0, len(x), batch_size):
                idx = order[i : i + batch_size]
                loss = F.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            log.info("classifier epoch %d/%d: loss %.4f", epoch + 1, epochs, total / len(x))
        test_url = _test_url(data)
        test_acc = None
        if test_url:
            xt, yt = _load_split(test_url)
            test_acc = accuracy(net, xt, yt)
        train_acc = accuracy(net, x, y)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    meta = {
        "arch": "SmallCNN",
        "feature_dim": FEATURE_DIM,
        "in_channels": int(x.shape[1]),
        "channels": int(x.shape[1]),
        "resolution": int(x.shape[-1]),
        "num_classes": num_classes,
        "class_names": manifest.get("class_names"),
        "recipe": {"data": data, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "limit": limit},
        "train_images": len(x),
        "train_shards_sha256": [s.get("sha256") for s in manifest.get("shards", [])],
        "train_accuracy": train_acc,
        "test": test_url,
        "test_accuracy": test_acc,
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 1),
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    (out_dir / META).write_text(json.dumps(meta, indent=1) + "\n")
    log.info("classifier: test accuracy %s, wrote %s", test_acc, weights)
    return meta


def load_classifier(path: str) -> ClassifierFeatures:
    """The feature extractor from a folder (or its classifier.safetensors) written by train_classifier."""
    from safetensors.torch import load_file

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    weights, meta_file = folder / WEIGHTS, folder / META
    if not weights.is_file() or not meta_file.is_file():
        raise CheckpointError(
            f"classifier {path!r}: expected {WEIGHTS} and {META} in {str(folder)!r}; build them with "
            "`python -m ditscale eval classifier --data TRAIN_MANIFEST --out FOLDER` (trained here, nothing downloaded)"
        )
    meta = json.loads(meta_file.read_text())
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if digest != meta.get("sha256"):
        raise CheckpointError(f"classifier {str(weights)!r}: sha256 {digest[:16]}... differs from {META}'s record")
    net = SmallCNN(int(meta["in_channels"]), int(meta["num_classes"]), int(meta["feature_dim"]))
    net.load_state_dict(load_file(str(weights)))
    return ClassifierFeatures(net.eval(), {**meta, "path": str(folder)}).eval()
