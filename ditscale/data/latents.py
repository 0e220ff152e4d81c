"""Optional latent shards (the DiT-XL scale): Stable-Diffusion VAE latents of each image and of its mirror image.

    python shards/latents.py --manifest data/in256/manifest.json --vae /models/sd-vae-ft-ema --out data/in256-lat

The VAE is a diffusers `AutoencoderKL` loaded from a local folder (nothing is fetched at run time); latents are
`latent_dist.sample()` scaled by 0.18215 as DiT does, drawn with a generator seeded per batch (deterministic).
Each sample stores one .npy of shape (2, C, h, w): [latent of the image, latent of its horizontal flip], so the
loader's flip augmentation picks index 1 instead of flipping a latent (which is not the latent of the flip).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable

import numpy as np
import torch

from ditscale.data.convert import add_tar_member, sample_key, write_manifest
from ditscale.data.stream import iter_dataset, read_manifest
from ditscale.errors import DataError
from ditscale.io import storage

LATENT_SCALE = 0.18215
Encoder = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # (B,3,H,W) in [-1,1] -> (B,C,h,w) scaled


def load_vae_encoder(vae_path: str, device: str = "cpu") -> Encoder:
    """An encoder from a local diffusers AutoencoderKL folder; DataError if the folder or diffusers is missing."""
    if not vae_path or not os.path.isdir(vae_path):
        raise DataError(
            f"VAE folder {vae_path!r} does not exist: give a local copy of a diffusers AutoencoderKL "
            "(e.g. stabilityai/sd-vae-ft-ema, downloaded beforehand); nothing is downloaded at run time"
        )
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise DataError("latent shards need diffusers: pip install 'ditscale[latents]' (diffusers>=0.27)") from None
    try:
        vae = AutoencoderKL.from_pretrained(vae_path, local_files_only=True).to(device).eval()
    except Exception as e:
        raise DataError(f"cannot load an AutoencoderKL from {vae_path!r}: {e}") from None

    @torch.no_grad()
    def encode(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        dist = vae.encode(x.to(device)).latent_dist
        return dist.sample(generator=generator).mul_(LATENT_SCALE).float().cpu()

    return encode


def build_latents(
    manifest_url: str,
    out: str,
    vae_path: str | None = None,
    *,
    encoder: Encoder | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    shard_size: int = 1000,
    seed: int = 0,
) -> dict:
    """Encode every image of a pixel shard set (and its flip) into latent shards at OUT; returns the manifest."""
    src = read_manifest(manifest_url)
    if src["kind"] != "pixels":
        raise DataError(f"{manifest_url}: latents are built from pixel shards, this manifest has kind={src['kind']}")
    if src["channels"] != 3:
        raise DataError(f"{manifest_url}: the VAE needs RGB shards (channels=3), got channels={src['channels']}")
    encode = encoder or load_vae_encoder(vae_path or "", device)
    storage.makedirs(out)
    shards: list[dict] = []
    state = {"buf": io.BytesIO(), "tar": None, "n": 0, "first": None}
    split = src.get("split", "train")
    lat_shape: tuple = ()

    def flush() -> None:
        if state["tar"] is None:
            return
        state["tar"].close()
        data = state["buf"].getvalue()
        name = f"{split}-{len(shards):06d}.tar"
        storage.write_bytes(storage.join(out, name), data)
        shards.append(
            {
                "path": name,
                "samples": state["n"],
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "first_index": state["first"],
            }
        )
        state.update(buf=io.BytesIO(), tar=None, n=0, first=None)

    def encode_batch(imgs: list[torch.Tensor], labels: list[int], indices: list[int]) -> None:
        nonlocal lat_shape
        x = torch.stack(imgs)
        g = torch.Generator().manual_seed(seed * 1_000_003 + indices[0])
        z = encode(torch.cat([x, x.flip(-1)]), g)
        z = torch.stack([z[: len(imgs)], z[len(imgs) :]], dim=1).numpy().astype(np.float32)  # (B, 2, C, h, w)
        lat_shape = z.shape[2:]
        for k in range(len(imgs)):
            if state["tar"] is None:
                state["tar"] = tarfile.open(fileobj=state["buf"], mode="w", format=tarfile.USTAR_FORMAT)
                state["first"] = indices[k]
            buf = io.BytesIO()
            np.save(buf, z[k])
            key = sample_key(indices[k])
            add_tar_member(state["tar"], f"{key}.npy", buf.getvalue())
            add_tar_member(state["tar"], f"{key}.cls", str(labels[k]).encode())
            add_tar_member(
                state["tar"],
                f"{key}.json",
                json.dumps({"index": indices[k], "class": labels[k], "split": split}, sort_keys=True).encode(),
            )
            state["n"] += 1
            if state["n"] >= shard_size:
                flush()

    imgs, labels, indices = [], [], []
    for img, label, index in iter_dataset(manifest_url):
        imgs.append(img)
        labels.append(label)
        indices.append(index)
        if len(imgs) == batch_size:
            encode_batch(imgs, labels, indices)
            imgs, labels, indices = [], [], []
    if imgs:
        encode_batch(imgs, labels, indices)
    flush()
    m = {
        "format": "ditscale-shards",
        "version": 1,
        "kind": "latents",
        "source": src.get("source"),
        "split": split,
        "resolution": int(lat_shape[-1]),
        "channels": int(lat_shape[0]),
        "image_resolution": src["resolution"],
        "latent_scale": LATENT_SCALE,
        "vae": os.path.basename(os.path.normpath(vae_path)) if vae_path else "custom",
        "num_classes": src["num_classes"],
        "class_names": src.get("class_names", []),
        "num_samples": sum(s["samples"] for s in shards),
        "shards": shards,
        "parent": src["url"],
        "splits": {split: "manifest.json"},
    }
    write_manifest(out, m)
    m["url"] = storage.join(out, "manifest.json")
    return m
