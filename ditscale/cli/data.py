"""`python -m ditscale data build|subset|latents|info ...` (shards/build.py, subset.py, latents.py call the same code).

python -m ditscale data build digits --out data/digits16 --resolution 16
python -m ditscale data build celeba --src /datasets/celeba --out s3://bucket/celeba64 --resolution 64 --workers 8
python -m ditscale data subset --manifest data/digits16/manifest.json --size 100 --seed 0 --out data/digits16-n100
python -m ditscale data latents --manifest s3://bucket/in256/manifest.json --vae /models/sd-vae-ft-ema --out ...
"""

from __future__ import annotations

import argparse
import json
import logging

from ditscale.data.convert import build_shards
from ditscale.data.latents import build_latents
from ditscale.data.sources import SOURCES
from ditscale.data.stream import read_manifest
from ditscale.data.subset import make_subset

log = logging.getLogger(__name__)


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", choices=SOURCES, help="dataset layout to read")
    p.add_argument(
        "--src",
        default=None,
        help="dataset folder (not needed for digits; fashion-mnist: default /usr/share/datasets/fashion-mnist, "
        "where Debian's dataset-fashion-mnist installs it)",
    )
    p.add_argument("--out", required=True, help="output folder or URL (local path or s3://bucket/prefix)")
    p.add_argument(
        "--resolution",
        type=int,
        required=True,
        help="square side of the stored images (mnist, fashion-mnist: 28 as published, or 32 = zero-padded)",
    )
    p.add_argument("--format", dest="image_format", choices=("png", "jpg"), default="png")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="1 = grayscale, 3 = RGB (default)")
    p.add_argument("--workers", type=int, default=1, help="encoding processes")
    p.add_argument("--shard-size", type=int, default=None, help="samples per shard (default: ~64 MB, >= 8 shards)")
    p.add_argument("--class-folders", action="store_true", help="folder source: one class per top-level subfolder")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of the listing")
    p.add_argument(
        "--png-level", type=int, default=None, help="PNG deflate level 0..9 (default: 0 = stored up to 64x64, else 6)"
    )
    p.add_argument("--no-progress", action="store_true")


def add_subset_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="parent manifest URL (the dataset's train split)")
    p.add_argument("--size", type=float, required=True, help="N images (>= 1) or a fraction of the pool (< 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pair", action="store_true", help="two disjoint subsets S1, S2 of size N (OUT/s1, OUT/s2)")
    p.add_argument("--out", required=True, help="output folder or URL")
    p.add_argument("--test-size", type=int, default=10_000, help="held-out test samples (at most)")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--verify", action="store_true", help="check parent shards' sha256")


def add_latents_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="pixel shards to encode")
    p.add_argument("--vae", required=True, help="local folder of a diffusers AutoencoderKL (e.g. sd-vae-ft-ema)")
    p.add_argument("--out", required=True, help="output folder or URL")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shard-size", type=int, default=1000)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    add_build_arguments(sub.add_parser("build", help="convert a dataset into WebDataset shards + manifest.json"))
    add_subset_arguments(sub.add_parser("subset", help="study subsets (size N, --pair) and the held-out test set"))
    add_latents_arguments(sub.add_parser("latents", help="precompute VAE latent shards (image + flipped image)"))
    p = sub.add_parser("info", help="print a manifest's summary")
    p.add_argument("manifest")


def run_build(args: argparse.Namespace) -> int:
    m = build_shards(
        args.source,
        args.src,
        args.out,
        args.resolution,
        channels=args.channels,
        image_format=args.image_format,
        shard_size=args.shard_size,
        workers=args.workers,
        class_folders=args.class_folders,
        limit=args.limit,
        progress=not args.no_progress,
        png_level=args.png_level,
    )
    s = m["summary"]
    for split, info in s["splits"].items():
        print(f"{split}: {info['samples']} samples in {info['shards']} shards -> {info['url']}")
    print(f"shards built: {s['shards_built']}, reused (already finished): {s['shards_reused']}")
    print(f"skipped source files: {len(s['skipped'])}")
    for item in s["skipped"][:20]:
        print(f"  {item['source_id']}: {item['reason']}")
    if len(s["skipped"]) > 20:
        print(f"  ... {len(s['skipped']) - 20} more (listed in the manifests)")
    return 0


def run_subset(args: argparse.Namespace) -> int:
    urls = make_subset(
        args.manifest,
        args.size,
        args.out,
        seed=args.seed,
        pair=args.pair,
        test_size=args.test_size,
        shard_size=args.shard_size,
        verify_sha256=args.verify,
    )
    for role, url in urls.items():
        print(f"{role}: {url}")
    return 0


def run_latents(args: argparse.Namespace) -> int:
    m = build_latents(
        args.manifest, args.out, args.vae, batch_size=args.batch_size, device=args.device, shard_size=args.shard_size
    )
    print(f"latents: {m['num_samples']} samples in {len(m['shards'])} shards -> {m['url']}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    m = read_manifest(args.manifest)
    m.pop("skipped", None)
    m.pop("source_skipped", None)
    if "subset" in m:
        m["subset"]["indices"] = f"[{len(m['subset']['indices'])} indices]"
    m["shards"] = f"[{len(m['shards'])} shards]"
    print(json.dumps(m, indent=1, sort_keys=True))
    return 0


def run(args: argparse.Namespace) -> int:
    return {"build": run_build, "subset": run_subset, "latents": run_latents, "info": run_info}[args.data_command](args)
