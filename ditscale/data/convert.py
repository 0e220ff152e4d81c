"""Convert an image dataset into WebDataset shards + manifest.json at any fsspec URL (local path or s3://...).

Layout written at OUT (shards/README.md has the full format):
    OUT/manifest.json              the primary split ("train" when the source has one)
    OUT/train-000000.tar ...       its shards
    OUT/<split>/manifest.json      every other split (test, val), with its shards beside it
    OUT/_parts/<shard>.json        one sidecar per finished shard (resume: finished shards are not rebuilt)

Deterministic: same input and options give the same bytes (fixed tar headers, PNG without metadata, sorted
listings, samples in index order). Parallel: shards are encoded by a process pool; a tqdm bar counts samples.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
from tqdm import tqdm

from ditscale.data import sources
from ditscale.data.codec import encode_png
from ditscale.data.sources import Record, check_resolution, list_source, prepare_record
from ditscale.errors import DataError
from ditscale.io import storage

log = logging.getLogger(__name__)

FORMAT_NAME = "ditscale-shards"
FORMAT_VERSION = 1
MAX_SKIPPED_LISTED = 1000  # the manifest lists at most this many skipped source files (the count is exact)
TARGET_SHARD_BYTES = 64 << 20
SMALL_RESOLUTION = 64  # at or below: PNGs stored with deflate level 0 by default


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A tar member with fixed metadata, so that the same content gives the same bytes."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def sample_key(index: int) -> str:
    return f"{index:08d}"


def encode_image(img, image_format: str, png_level: int = 6) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        return encode_png(np.asarray(img), png_level)  # standard PNG, one filter per image (codec.py)
    else:
        img.save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def sample_meta(index: int, label: int, source_id: str, split: str) -> bytes:
    return json.dumps({"index": index, "class": label, "source_id": source_id, "split": split}, sort_keys=True).encode()


@dataclass
class ShardTask:
    name: str  # e.g. train-000003.tar
    url: str
    sidecar_url: str
    items: list[tuple[int, Record]]  # (global index, record)
    resolution: int
    channels: int
    image_format: str
    fingerprint: dict
    png_level: int = 6


def _encode_shard(task: ShardTask) -> dict:
    buf = io.BytesIO()
    skipped = []
    n = 0
    ext = "png" if task.image_format == "png" else "jpg"
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for index, rec in task.items:
            try:
                img = prepare_record(rec, task.resolution, task.channels)
                data = encode_image(img, task.image_format, task.png_level)
            except Exception as e:
                skipped.append({"source_id": rec.source_id, "reason": f"cannot decode: {type(e).__name__}: {e}"})
                continue
            key = sample_key(index)
            add_tar_member(tar, f"{key}.{ext}", data)
            add_tar_member(tar, f"{key}.cls", str(rec.label).encode())
            add_tar_member(tar, f"{key}.json", sample_meta(index, rec.label, rec.source_id, rec.split))
            n += 1
    data = buf.getvalue()
    info = {
        "path": task.name,
        "samples": n,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "first_index": task.items[0][0] if task.items else None,
        "skipped": skipped,
        "fingerprint": task.fingerprint,
    }
    storage.write_bytes(task.url, data)
    storage.write_bytes(task.sidecar_url, json.dumps(info, sort_keys=True).encode())  # written last: "finished"
    return info


def _worker_init() -> None:
    sources._LMDB_ENVS.clear()  # LMDB environments must not cross fork(): each worker opens its own


def _finished(task: ShardTask) -> dict | None:
    if not storage.exists(task.sidecar_url) or not storage.exists(task.url):
        return None
    try:
        info = json.loads(storage.read_bytes(task.sidecar_url))
    except (ValueError, DataError):
        return None
    return info if info.get("fingerprint") == task.fingerprint else None


def default_shard_size(n: int, resolution: int, channels: int, image_format: str) -> int:
    per_sample = resolution * resolution * channels * (0.6 if image_format == "png" else 0.25) + 1536
    by_bytes = max(1, int(TARGET_SHARD_BYTES / per_sample))
    return max(1, min(by_bytes, max(64, math.ceil(n / 8))))


def split_url(out: str, split: str, primary: str) -> str:
    return out if split == primary else storage.join(out, split)


def write_manifest(url_dir: str, manifest: dict) -> str:
    url = storage.join(url_dir, "manifest.json")
    storage.write_bytes(url, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return url


def build_shards(
    source: str,
    src: str | None,
    out: str,
    resolution: int,
    *,
    channels: int = 3,
    image_format: str = "png",
    shard_size: int | None = None,
    workers: int = 1,
    class_folders: bool = False,
    limit: int | None = None,
    progress: bool = True,
    png_level: int | None = None,
) -> dict:
    """Convert SOURCE (ditscale.data.sources.SOURCES) at SRC into shards at OUT.

    Returns the primary split's manifest (also written to OUT/manifest.json) with an extra key "summary"
    (per-split counts, skipped source files, shards built vs reused). `limit` keeps only the first N records
    of the listing (quick trials). `png_level` (0..9): deflate level of the PNGs; default 0 (stored) up to
    64x64, where deflate saves ~20% and costs most of the decoding time, else 6.
    """
    if resolution <= 0:
        raise DataError(f"--resolution must be positive, got {resolution}")
    if channels not in (1, 3):
        raise DataError(f"--channels must be 1 or 3, got {channels}")
    if image_format not in ("png", "jpg"):
        raise DataError(f"--format must be png or jpg, got {image_format!r}")
    check_resolution(source, resolution)
    listing = list_source(source, src, class_folders=class_folders)
    records = listing.records[:limit] if limit else listing.records
    if not records:
        raise DataError(f"source {source!r} at {src!r}: no images found")
    by_split: dict[str, list[tuple[int, Record]]] = {}
    for index, rec in enumerate(records):
        by_split.setdefault(rec.split, []).append((index, rec))
    splits = sorted(by_split, key=lambda s: (s != "train", s))
    primary = splits[0]
    storage.makedirs(out)

    if png_level is None:  # small images barely compress: store them, inflating is then ~free (codec.py)
        png_level = 0 if resolution <= SMALL_RESOLUTION else 6
    if not 0 <= png_level <= 9:
        raise DataError(f"--png-level must be 0..9, got {png_level}")
    fingerprint = {
        "source": source,
        "resolution": resolution,
        "channels": channels,
        "format": image_format,
        "png_level": png_level,
    }
    tasks: dict[str, list[ShardTask]] = {}
    for split in splits:
        items = by_split[split]
        size = shard_size or default_shard_size(len(items), resolution, channels, image_format)
        base = split_url(out, split, primary)
        tasks[split] = []
        for k in range(0, len(items), size):
            name = f"{split}-{k // size:06d}.tar"
            chunk = items[k : k + size]
            fp = dict(fingerprint, first=chunk[0][0], last=chunk[-1][0], count=len(chunk))
            tasks[split].append(
                ShardTask(
                    name,
                    storage.join(base, name),
                    storage.join(base, "_parts", name + ".json"),
                    chunk,
                    resolution,
                    channels,
                    image_format,
                    fp,
                    png_level,
                )
            )

    all_tasks = [t for split in splits for t in tasks[split]]
    results: dict[str, dict] = {}
    todo = []
    for t in all_tasks:
        info = _finished(t)
        if info is None:
            todo.append(t)
        else:
            results[t.url] = info
    reused = len(results)
    total = sum(len(t.items) for t in todo)
    bar = tqdm(total=total, unit="img", desc=f"build {source}", disable=not progress, dynamic_ncols=True)
    try:
        if workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_worker_init) as pool:
                for t, info in zip(todo, pool.map(_encode_shard, todo), strict=True):
                    results[t.url] = info
                    bar.update(len(t.items))
        else:
            for t in todo:
                results[t.url] = _encode_shard(t)
                bar.update(len(t.items))
    finally:
        bar.close()

    manifests = {}
    all_skipped = list(listing.skipped)
    for split in splits:
        infos = [results[t.url] for t in tasks[split]]
        shard_skipped = [s for info in infos for s in info["skipped"]]
        all_skipped += shard_skipped
        manifests[split] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "kind": "pixels",
            "source": source,
            "split": split,
            "resolution": resolution,
            "channels": channels,
            "image_format": image_format,
            "image_key": "png" if image_format == "png" else "jpg",
            "png_level": png_level if image_format == "png" else None,
            "num_classes": listing.num_classes,
            "class_names": listing.class_names,
            "num_samples": sum(i["samples"] for i in infos),
            "shards": [{k: i[k] for k in ("path", "samples", "bytes", "sha256", "first_index")} for i in infos],
            "skipped_count": len(shard_skipped),
            "skipped": shard_skipped[:MAX_SKIPPED_LISTED],
        }
    split_map = {s: ("manifest.json" if s == primary else f"{s}/manifest.json") for s in splits}
    for split in splits:
        m = manifests[split]
        m["splits"] = {s: _relative(split, primary, s, p) for s, p in split_map.items()}
        if split == primary:
            m["source_skipped_count"] = len(listing.skipped)
            m["source_skipped"] = listing.skipped[:MAX_SKIPPED_LISTED]
        write_manifest(split_url(out, split, primary), m)

    root = dict(manifests[primary])
    root["summary"] = {
        "manifest": storage.join(out, "manifest.json"),
        "splits": {
            s: {
                "url": storage.join(split_url(out, s, primary), "manifest.json"),
                "samples": manifests[s]["num_samples"],
                "shards": len(manifests[s]["shards"]),
            }
            for s in splits
        },
        "shards_built": len(todo),
        "shards_reused": reused,
        "skipped": all_skipped,
    }
    for s in all_skipped:
        log.warning("skipped %s: %s", s["source_id"], s["reason"])
    return root


def _relative(from_split: str, primary: str, to_split: str, path: str) -> str:
    """Path of split `to_split`'s manifest relative to split `from_split`'s manifest directory."""
    if from_split == primary:
        return path
    return "../manifest.json" if to_split == primary else f"../{to_split}/manifest.json"
