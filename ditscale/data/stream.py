"""The training stream: WebDataset shards over fsspec URLs -> endless, deterministic, exactly resumable batches.

How the order is decided (everything follows from the manifest, which counts the samples of every shard):

* Epoch e (of a fixed length, endless): the shards are shuffled by a permutation seeded with (seed, e) and
  concatenated, giving N positions. The job has G = world_size * streams logical streams (`streams` per rank,
  default max(1, num_workers)); global stream g = rank * streams + s reads the contiguous range of
  L = ceil(N / G) positions starting at g * L (wrapping), i.e. its own few shards: the split by node and by
  worker. Each stream reads its shards in order through webdataset's tar iterator (gopen, with an fsspec
  opener for s3:// and other object stores) and passes the samples through a shuffle buffer of
  `shuffle_buffer` samples whose choices are drawn from (seed, e, g) -- the buffer's output order depends only
  on positions, so it is computed ahead and the buffer only holds the samples it still has to emit.
* A stream's batches are its next `batch_size` decodable samples (batches span epochs); the rank's batch b is
  the (b // streams)-th batch of stream b % streams. DataLoader workers each run every num_workers-th stream,
  so the rank's sequence is the same with 0 or any num_workers dividing `streams`.
* The state is, per stream, the (epoch, emitted) position after its last consumed batch, plus the number of
  batches consumed: a fresh stream loaded with it yields exactly the batches the uninterrupted one would.

Flips are drawn per position from (seed, e, g), so they too survive a resume. Corrupt images are skipped,
counted and logged with shard and key; a truncated shard ends early with a warning; unreachable shards raise
StorageError after retries; with verify_sha256 a shard whose bytes do not match the manifest raises DataError.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib
import io
import json
import logging
import math
import tarfile
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from ditscale.data.codec import PngRows, UnsupportedTar, decode_png, inflate_png, tar_index, unfilter_batch
from ditscale.data.gopen import register_gopen, worker_init_fn
from ditscale.errors import DataError, StorageError
from ditscale.io import storage

log = logging.getLogger(__name__)

STATE_VERSION = 1


# --------------------------------------------------------------------------------------------------- manifests
def manifest_url_of(url: str) -> str:
    return url if url.endswith(".json") else storage.join(url, "manifest.json")


def read_manifest(url: str) -> dict:
    """Read a manifest.json (URL of the file, or of the folder holding it); adds "url" (where it was read)."""
    murl = manifest_url_of(url)
    try:
        raw = storage.read_bytes(murl)
    except FileNotFoundError:
        msg = f"manifest {murl} does not exist (expected a manifest.json written by shards/build.py)"
        raise StorageError(msg) from None
    try:
        m = json.loads(raw)
    except ValueError as e:
        raise DataError(f"manifest {murl} is not valid JSON: {e}") from None
    for key in ("shards", "num_samples", "resolution", "channels", "num_classes", "kind"):
        if key not in m:
            raise DataError(f"manifest {murl} has no {key!r} key (is it a ditscale shard manifest?)")
    m["url"] = murl
    return m


def shard_url(manifest: dict, shard: dict) -> str:
    if shard.get("url"):
        return shard["url"]
    return storage.join(storage.dirname(manifest["url"]), shard["path"])


# ------------------------------------------------------------------------------------------------ shard reading
def _gopen(url: str):
    gopen = importlib.import_module("webdataset.gopen").gopen
    return gopen(storage.local_path(url) if storage.is_local(url) else url, "rb")


def missing_shards(manifest: dict) -> list[str]:
    """URLs of the manifest's shards that do not exist (a listing per directory, no downloads)."""
    return storage.missing(shard_url(manifest, s) for s in manifest["shards"])


def fetch_shard(url: str, sha256: str | None = None, verify: bool = False) -> bytes:
    """The shard's bytes through webdataset's gopen (fsspec for object stores, with retries and backoff)."""

    def go() -> bytes:
        with _gopen(url) as f:
            return f.read()

    try:
        data = storage.with_retries(go, url, "read shard") if storage.is_url(url) else go()
    except FileNotFoundError:
        raise StorageError(f"shard {url} does not exist (listed in the manifest)") from None
    except OSError as e:
        raise StorageError(f"cannot read shard {url}: {storage.describe(e)}") from e
    if verify and sha256:
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise DataError(f"shard {url}: sha256 {got} does not match the manifest's {sha256}")
    return data


def _iter_tar_members(url: str, data: bytes) -> tuple[Iterator[tuple[str, bytes]], list]:
    """(name, bytes) of the shard's files, and a one-item list that receives why the tar ended early (or None).

    Our own USTAR shards are indexed in one pass (codec.tar_index); other tars go through webdataset's tar
    iterator (a tar cut off inside a header counts as damaged only if it lacks the end-of-archive blocks).
    """
    damage: list = [None]
    try:
        index, why = tar_index(data)
    except UnsupportedTar:
        tariterators = importlib.import_module("webdataset.tariterators")

        def slow():
            if not (len(data) >= 1024 and len(data) % 512 == 0 and not any(data[-1024:])):
                damage[0] = "the tar ends without its end-of-archive blocks"
            try:
                for item in tariterators.tar_file_iterator(io.BytesIO(data)):
                    yield item["fname"], item["data"]
            except (tarfile.TarError, EOFError, OSError, ValueError) as e:
                damage[0] = f"{type(e).__name__}: {e}"

        return slow(), damage
    damage[0] = why
    return ((name, data[lo:hi]) for name, lo, hi in index), damage


def iter_shard(url: str, data: bytes) -> Iterator[dict]:
    """Samples ({"__key__", ext: bytes, ...}) in tar order, grouped by key (webdataset's sample convention).

    A truncated or damaged tar ends the shard with a warning: the samples before the damage are kept, the
    half-read one and the rest are skipped (the stream counts them as skipped).
    """
    members, damage = _iter_tar_members(url, data)
    current: dict | None = None
    n = 0
    for fname, value in members:
        base = fname.rsplit("/", 1)[-1]
        key, _, ext = base.partition(".")
        key = fname[: len(fname) - len(base)] + key
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
                n += 1
            current = {"__key__": key, "__url__": url}
        current[ext.lower()] = value
    if damage[0] is None:
        if current is not None:
            yield current
        return
    log.warning("shard %s is truncated or damaged after %d samples (%s): rest of the shard skipped", url, n, damage[0])


def decode_sample(sample: dict, manifest: dict, flip: bool) -> tuple[np.ndarray, int, int]:
    """-> (array uint8 HWC / float latents CHW, label, index); raises on anything corrupt."""
    index = int(sample["__key__"])
    label = int(sample["cls"]) if "cls" in sample else int(json.loads(sample["json"])["class"])
    if manifest["kind"] == "latents":
        arr = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)  # (2, C, h, w): image, flipped image
        arr = arr[1 if flip else 0]
        if arr.ndim != 3:
            raise ValueError(f"latent shape {arr.shape}")
        return np.ascontiguousarray(arr, dtype=np.float32), label, index
    key = manifest.get("image_key") or ("png" if "png" in sample else "jpg")
    data = sample[key]
    res, ch = manifest["resolution"], manifest["channels"]
    if key == "png":
        rows = inflate_png(data)  # our own PNGs: unfiltered later, for the whole batch at once
        if rows is not None:
            if rows.shape != (res, res, ch):
                raise ValueError(f"image shape {rows.shape}, manifest says {(res, res, ch)}")
            rows.flip = flip
            return rows, label, index
    arr = decode_png(data) if key == "png" else None
    if arr is None:
        arr = np.asarray(Image.open(io.BytesIO(data)))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape != (res, res, ch):
        raise ValueError(f"image shape {arr.shape}, manifest says {(res, res, ch)}")
    if flip:
        arr = arr[:, ::-1]
    return arr, label, index


def to_tensor(arrays: list, kind: str, as_float: bool = True) -> torch.Tensor:
    """Batch of decoded samples (arrays, or PngRows still to unfilter) -> float tensor (or uint8 B,H,W,C)."""
    if arrays and isinstance(arrays[0], PngRows) and all(isinstance(a, PngRows) for a in arrays):
        x = unfilter_batch(arrays)
    else:
        x = np.stack([a.array() if isinstance(a, PngRows) else a for a in arrays])
    if kind == "latents" or not as_float:
        return torch.from_numpy(x)
    return to_float(torch.from_numpy(x))


def to_float(t: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) in [-1, 1]."""
    return t.permute(0, 3, 1, 2).contiguous().float().mul_(2.0 / 255.0).sub_(1.0)  # transpose the uint8s


# ------------------------------------------------------------------------------------------------------- plan
def shuffle_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of a shuffle buffer of `buffer` slots fed with inputs 0..n-1 (webdataset-style)."""
    if buffer <= 1 or n <= 1:
        return np.arange(n)
    r = rng.random(n + buffer)
    buf: list[int] = []
    out = np.empty(n, dtype=np.int64)
    j = 0
    for t in range(n):
        buf.append(t)
        if len(buf) >= buffer:
            i = int(r[j] * len(buf))
            out[j] = buf[i]
            buf[i] = buf[-1]
            buf.pop()
            j += 1
    while buf:
        i = int(r[j] * len(buf))
        out[j] = buf[i]
        buf[i] = buf[-1]
        buf.pop()
        j += 1
    return out


class Plan:
    """Sample order of every (epoch, global stream), computed from the manifest's shard counts."""

    def __init__(self, manifest: dict, seed: int, global_streams: int, shuffle_buffer: int, flip: bool):
        self.manifest = manifest
        self.counts = [int(s["samples"]) for s in manifest["shards"]]
        self.n = sum(self.counts)
        if self.n <= 0:
            raise DataError(f"manifest {manifest.get('url')} has no samples")
        self.seed = seed
        self.G = global_streams
        self.length = math.ceil(self.n / self.G)  # samples per stream per epoch
        self.buffer = min(shuffle_buffer, self.length)
        self.flip = flip
        self.urls = [shard_url(manifest, s) for s in manifest["shards"]]

    def epoch(self, e: int, g: int) -> dict:
        perm = np.random.default_rng([self.seed, e, 0]).permutation(len(self.counts))
        starts = np.concatenate([[0], np.cumsum([self.counts[i] for i in perm])])
        order = shuffle_order(self.length, self.buffer, np.random.default_rng([self.seed, e, 1, g]))
        flips = (np.random.default_rng([self.seed, e, 2, g]).random(self.length) < 0.5) & self.flip
        # input t of this stream is epoch position (g * L + t) % N; split the inputs into per-shard segments
        segments = []  # (shard id, first offset, last offset + 1, first input t)
        t = 0
        while t < self.length:
            p = (g * self.length + t) % self.n
            k = bisect.bisect_right(starts, p) - 1
            off = p - int(starts[k])
            take = min(int(starts[k + 1]) - p, self.length - t)
            segments.append((int(perm[k]), off, off + take, t))
            t += take
        return {"order": order, "flips": flips, "segments": segments}


class LogicalStream:
    """One logical stream g: yields (array, label, index, position after) endlessly; counts skipped samples."""

    def __init__(self, plan: Plan, g: int, epoch: int = 0, emitted: int = 0, verify: bool = False):
        self.plan, self.g, self.verify = plan, g, verify
        self.epoch, self.emitted = epoch, emitted
        self.skipped = 0
        self.kind = plan.manifest["kind"]

    def samples(self) -> Iterator[tuple[np.ndarray, int, int, tuple[int, int]]]:
        while True:
            yield from self._epoch_samples(self.epoch, self.emitted)
            self.epoch, self.emitted = self.epoch + 1, 0

    def _epoch_samples(self, e: int, j0: int):
        ep = self.plan.epoch(e, self.g)
        order, flips, segments = ep["order"], ep["flips"], ep["segments"]
        L = len(order)
        if j0 >= L:
            return
        pending = np.ones(L, dtype=bool)
        pending[order[:j0]] = False
        t_min = int(order[j0:].min())
        have: dict[int, dict] = {}
        missing: set[int] = set()
        seg_iter = iter([s for s in segments if s[3] + (s[2] - s[1]) > t_min])
        reader: Iterator | None = None
        cur = None
        manifest, urls = self.plan.manifest, self.plan.urls
        for j in range(j0, L):
            t = int(order[j])
            while t not in have and t not in missing:
                if reader is None:
                    cur = next(seg_iter, None)
                    if cur is None:  # nothing left to read: the sample cannot arrive
                        missing.add(t)
                        break
                    sid, lo, hi, t0 = cur
                    shard = manifest["shards"][sid]
                    data = fetch_shard(urls[sid], shard.get("sha256"), self.verify)
                    reader = _segment_reader(iter_shard(urls[sid], data), lo, hi)
                    seen = set()
                try:
                    off, sample = next(reader)
                    seen.add(off)
                    tt = cur[3] + off - cur[1]
                    if pending[tt]:
                        have[tt] = sample
                except StopIteration:
                    sid, lo, hi, t0 = cur
                    for off in range(lo, hi):
                        if off not in seen:
                            missing.add(t0 + off - lo)
                    reader = None
            self.emitted = j + 1
            if t in missing:
                self.skipped += 1
                continue
            sample = have.pop(t)
            try:
                arr, label, index = decode_sample(sample, manifest, bool(flips[t]))
            except Exception as exc:
                self.skipped += 1
                log.warning(
                    "skipping corrupt sample %s in shard %s: %s: %s",
                    sample.get("__key__"),
                    sample.get("__url__"),
                    type(exc).__name__,
                    exc,
                )
                continue
            yield arr, label, index, (e, j + 1)

    def batches(self, batch_size: int) -> Iterator[dict]:
        it = self.samples()
        while True:
            skipped0 = self.skipped
            arrs, labels, idx = [], [], []
            pos = (self.epoch, self.emitted)
            for arr, label, index, after in it:
                pos = after
                arrs.append(arr)
                labels.append(label)
                idx.append(index)
                if len(arrs) == batch_size:
                    break
            yield {
                "images": to_tensor(arrs, self.kind, as_float=False),  # 4x less to move from a worker
                "labels": labels,  # plain lists: one shared-memory tensor per batch crosses from a worker
                "indices": idx,
                "stream": self.g,
                "position": pos,
                "skipped": self.skipped - skipped0,
            }


def _segment_reader(samples: Iterator[dict], lo: int, hi: int) -> Iterator[tuple[int, dict]]:
    for off, sample in enumerate(samples):
        if off >= hi:
            return
        if off >= lo:
            yield off, sample


def _round_robin(streams: list[LogicalStream], batch_size: int) -> Iterator[dict]:
    its = [s.batches(batch_size) for s in streams]
    while True:
        for it in its:
            yield next(it)


class _WorkerDataset(torch.utils.data.IterableDataset):
    """What a DataLoader worker runs: every num_workers-th logical stream of the rank, round-robin."""

    def __init__(self, spec: dict, order: list[int], positions: list[tuple[int, int]]):
        super().__init__()
        self.spec, self.order, self.positions = spec, order, positions

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = _plan_from_spec(self.spec)
        mine = self.order[w::W]
        streams = [
            LogicalStream(
                plan, self.spec["rank"] * self.spec["streams"] + s, *self.positions[s], verify=self.spec["verify"]
            )
            for s in mine
        ]
        return _round_robin(streams, self.spec["batch_size"])


_PLANS: dict = {}


def _plan_from_spec(spec: dict) -> Plan:
    key = (
        json.dumps({k: spec[k] for k in ("seed", "world_size", "streams", "shuffle_buffer", "flip")})
        + spec["manifest"]["url"]
    )
    if key not in _PLANS:
        _PLANS.clear()
        _PLANS[key] = Plan(
            spec["manifest"], spec["seed"], spec["world_size"] * spec["streams"], spec["shuffle_buffer"], spec["flip"]
        )
    return _PLANS[key]


class TrainStream:
    """Endless iterator of (images float32 (B, C, H, W) in [-1, 1], labels int64 (B,)) for one rank.

    `state_dict()` / `load_state_dict()` make it exactly resumable; `skipped` counts corrupt samples;
    `last_indices` holds the global sample indices of the last batch yielded (for tests and debugging).
    """

    def __init__(
        self,
        manifest: dict,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        flip: bool = True,
        verify_sha256: bool = False,
        streams: int | None = None,
    ):
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        self.manifest = manifest
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.num_workers = num_workers
        self.streams = streams or max(1, num_workers)
        self._check_streams(self.streams)
        self.shuffle_buffer, self.flip, self.verify = shuffle_buffer, flip, verify_sha256
        self.positions: list[tuple[int, int]] = [(0, 0)] * self.streams
        self.batches = 0
        self.skipped = 0
        self.last_indices: torch.Tensor | None = None
        self._it: Iterator[dict] | None = None
        self._loader = None

    def _check_streams(self, streams: int) -> None:
        if self.num_workers and streams % self.num_workers:
            raise DataError(f"streams={streams} is not a multiple of num_workers={self.num_workers}")

    def _spec(self) -> dict:
        return {
            "manifest": self.manifest,
            "seed": self.seed,
            "world_size": self.world_size,
            "rank": self.rank,
            "streams": self.streams,
            "shuffle_buffer": self.shuffle_buffer,
            "flip": self.flip,
            "verify": self.verify,
            "batch_size": self.batch_size,
        }

    def _start(self) -> Iterator[dict]:
        order = [(self.batches + i) % self.streams for i in range(self.streams)]  # next batch first
        if self.num_workers == 0:
            plan = _plan_from_spec(self._spec())
            by_s = {
                s: LogicalStream(plan, self.rank * self.streams + s, *self.positions[s], verify=self.verify)
                for s in order
            }
            return _round_robin([by_s[s] for s in order], self.batch_size)
        register_gopen()
        ds = _WorkerDataset(self._spec(), order, list(self.positions))
        self._loader = torch.utils.data.DataLoader(
            ds,
            batch_size=None,
            num_workers=self.num_workers,
            worker_init_fn=worker_init_fn,
            prefetch_factor=2,
            persistent_workers=False,
        )
        return iter(self._loader)

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = self._start()
        b = next(self._it)
        s = b["stream"] - self.rank * self.streams
        self.positions[s] = tuple(b["position"])
        self.batches += 1
        self.skipped += int(b["skipped"])
        self.last_indices = torch.tensor(b["indices"], dtype=torch.int64)
        x = b["images"] if self.manifest["kind"] == "latents" else to_float(b["images"])
        return x, torch.tensor(b["labels"], dtype=torch.int64)

    def close(self) -> None:
        self._it = None
        self._loader = None

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "streams": self.streams,
            "num_samples": self.manifest["num_samples"],
            "batches": self.batches,
            "skipped": self.skipped,
            "positions": [list(p) for p in self.positions],
            "shuffle_buffer": self.shuffle_buffer,
        }

    def load_state_dict(self, sd: dict) -> None:
        for key in ("seed", "world_size", "rank", "num_samples", "shuffle_buffer"):
            mine = (
                self.seed
                if key == "seed"
                else (self.manifest["num_samples"] if key == "num_samples" else getattr(self, key))
            )
            if key in sd and sd[key] != mine:
                raise DataError(
                    f"data-loader state was saved with {key}={sd[key]}, this stream has {key}={mine}; "
                    "resume with the same data settings"
                )
        streams = int(sd["streams"])
        self._check_streams(streams)
        if len(sd["positions"]) != streams:
            raise DataError(f"data-loader state has {len(sd['positions'])} positions for {streams} streams")
        self.close()
        self.streams = streams
        self.positions = [tuple(int(v) for v in p) for p in sd["positions"]]
        self.batches = int(sd["batches"])
        self.skipped = int(sd.get("skipped", 0))

    def __del__(self):
        self.close()


def make_loader(
    manifest_url: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    flip: bool = True,
    verify_sha256: bool = False,
    streams: int | None = None,
) -> TrainStream:
    """The trainer's input: an endless, resumable TrainStream over the shards of a manifest (see module doc)."""
    register_gopen()
    return TrainStream(
        read_manifest(manifest_url),
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        flip=flip,
        verify_sha256=verify_sha256,
        streams=streams,
    )


def iter_dataset(manifest_url: str, verify_sha256: bool = False) -> Iterator[tuple[torch.Tensor, int, int]]:
    """Every sample once, in index order: (image float32 (C, H, W) in [-1, 1] or latent, label, index)."""
    register_gopen()
    m = read_manifest(manifest_url)
    for shard in m["shards"]:
        url = shard_url(m, shard)
        for sample in iter_shard(url, fetch_shard(url, shard.get("sha256"), verify_sha256)):
            try:
                arr, label, index = decode_sample(sample, m, False)
            except Exception as exc:
                log.warning("skipping corrupt sample %s in shard %s: %s", sample.get("__key__"), url, exc)
                continue
            yield to_tensor([arr], m["kind"])[0], label, index
