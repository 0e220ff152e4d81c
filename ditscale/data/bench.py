"""`python -m ditscale bench data`: decode throughput of the shard stream vs a one-file-per-image PIL loader.

Generates synthetic photos (smooth colour fields with texture), converts them to 32x32 and 256x256 shards with
the real converter, writes the very same stored images as one PNG file per image, and times, per worker
(`--workers`, default 0 = the loading process itself), samples/s of:
  * shards: `make_loader` (tar shards through webdataset + fsspec, shuffle buffer, flips, batches);
  * per-file: a map-style Dataset that opens each PNG with PIL (flip, to tensor, normalise) under a DataLoader;
from local disk and from a loopback S3 server (moto_server, started and stopped by PID) unless --no-s3.
Prints a markdown table (docs/benchmarks.md holds the figures with the machine they came from).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ditscale.data import build_shards, make_loader, read_manifest
from ditscale.data.stream import fetch_shard, iter_shard, shard_url
from ditscale.distenv import free_port


def synthetic_images(folder: Path, n: int, side: int, seed: int = 0) -> None:
    """Photo-like test images: a bicubic-upsampled coarse colour field plus fine texture (PNG sizes ~ photos)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((side, side), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (side, side, 3), dtype=np.int16)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.png", compress_level=1)


class PerFileDataset(torch.utils.data.Dataset):
    """The baseline: one image file per sample, opened with PIL (local path or fsspec URL)."""

    def __init__(self, urls: list[str], labels: list[int]):
        self.urls, self.labels = urls, labels

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, i: int):
        url = self.urls[i]
        if "://" in url:
            import fsspec

            with fsspec.open(url, "rb") as f:
                img = Image.open(f)
                img.load()
        else:
            img = Image.open(url)
        arr = np.asarray(img.convert("RGB"))
        if np.random.random() < 0.5:
            arr = arr[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return x, self.labels[i]


def _time(it, batches: int, batch_size: int) -> float:
    next(it)  # warm-up: first shard / worker start
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - t0)


def _per_file_rate(urls: list[str], labels: list[int], batches: int, bs: int, workers: int) -> float:
    dl = torch.utils.data.DataLoader(
        PerFileDataset(urls, labels),
        batch_size=bs,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )

    def endless():
        while True:
            yield from dl

    return _time(endless(), batches, bs)


def _start_moto() -> tuple[subprocess.Popen, str] | None:
    binary = Path(sys.executable).parent / "moto_server"
    binary = str(binary) if binary.exists() else shutil.which("moto_server")
    if not binary:
        return None
    port = free_port()
    proc = subprocess.Popen(
        [binary, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint + "/", timeout=1).read()
            return proc, endpoint
        except Exception:
            time.sleep(0.1)
    proc.terminate()
    return None


def run(args) -> int:
    work = Path(args.dir or tempfile.mkdtemp(prefix="ditscale-bench-data-"))
    rows: list[dict] = []
    moto = None
    saved_env = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    try:
        if not args.no_s3:
            moto = _start_moto()
            if moto is None:
                print("moto_server not found: S3 rows skipped", file=sys.stderr)
            else:
                os.environ.update(
                    AWS_ENDPOINT_URL=moto[1],
                    AWS_ACCESS_KEY_ID="bench",
                    AWS_SECRET_ACCESS_KEY="bench",
                    AWS_DEFAULT_REGION="us-east-1",
                )
        W = args.workers
        bs = args.batch_size
        for res in [int(r) for r in args.resolutions.split(",")]:
            n = args.images if res <= 64 else max(bs * 3, args.images // 10)
            src = work / f"src{res}"
            if not src.exists():
                synthetic_images(src, n, max(res, 48) + res // 4)
            variants = [("", None)] + ([(", PNG deflate 6", 6)] if res <= 64 else [])
            for label, level in variants:
                local = work / f"shards{res}-{level}"
                build_shards("folder", str(src), str(local), res, workers=2, progress=False, png_level=level)
                files = work / f"files{res}-{level}"  # the very same stored images, one PNG per image
                files.mkdir(exist_ok=True)
                urls, labels = [], []
                m = read_manifest(str(local))
                for shard in m["shards"]:  # the same PNG bytes as in the shards, one file each
                    url = shard_url(m, shard)
                    for sample in iter_shard(url, fetch_shard(url)):
                        p = files / f"{sample['__key__']}.png"
                        p.write_bytes(sample["png"])
                        urls.append(str(p))
                        labels.append(int(sample["cls"]))
                batches = max(5, n // bs - 2)
                targets = [("local disk" + label, str(local), urls)]
                if moto is not None and level is None:
                    import fsspec

                    fs = fsspec.filesystem("s3")
                    fs.mkdir(f"bench{res}")
                    s3root = f"s3://bench{res}"
                    build_shards("folder", str(src), f"{s3root}/shards", res, workers=1, progress=False)
                    fs.put(str(files) + "/", f"bench{res}/files/", recursive=True)
                    s3_files = [f"{s3root}/files/{Path(u).name}" for u in urls]
                    targets.append(("loopback S3" + label, f"{s3root}/shards", s3_files))
                for where, shards_at, file_urls in targets:
                    remote = where.startswith("loopback")
                    sb = min(batches, 40) if remote else batches
                    fb = min(sb, 10) if remote else sb
                    shard_rates, file_rates = [], []
                    for _ in range(args.repeats):  # interleaved, best of N: the machine is shared and noisy
                        stream = make_loader(shards_at, batch_size=bs, seed=0, num_workers=W)
                        shard_rates.append(_time(stream, sb, bs) / max(1, W))
                        stream.close()
                        file_rates.append(_per_file_rate(file_urls, labels, fb, bs, W) / max(1, W))
                    shard_rate, file_rate = max(shard_rates), max(file_rates)
                    rows.append(
                        {
                            "resolution": res,
                            "storage": where,
                            "shards": shard_rate,
                            "per_file": file_rate,
                            "speedup": shard_rate / file_rate,
                            "images": n,
                            "batch_size": bs,
                            "workers": W,
                            "shard_bytes": sum(s["bytes"] for s in m["shards"]),
                            "png_level": m.get("png_level"),
                        }
                    )
                    print(
                        f"{res}x{res} {where}: shards {shard_rate:,.0f}/s, per-file {file_rate:,.0f}/s "
                        f"({shard_rate / file_rate:.1f}x)",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        if moto is not None:
            moto[0].terminate()  # by PID
            moto[0].wait(timeout=10)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}; workers={args.workers}, batch {args.batch_size}; samples/s per worker\n"
    )
    print("| resolution | storage | shards (samples/s) | one file per image (samples/s) | speed-up | shard MB |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        res = f"{r['resolution']}x{r['resolution']}"
        print(
            f"| {res} | {r['storage']} | {r['shards']:,.0f} | {r['per_file']:,.0f} | {r['speedup']:.1f}x "
            f"| {r['shard_bytes'] / 1e6:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0
