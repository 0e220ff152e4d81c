"""The training stream: WebDataset shards over fsspec URLs -> endless, deterministic, exactly resumable batches.

The order of samples is global: it depends on the manifest, the seed, `data.streams` and the shuffle buffer,
never on the number of processes, their rank or the DataLoader workers (mosaicml/streaming's idea):

* Canonical streams. The dataset is read as S = min(data.streams, N // shuffle_buffer) streams (at least 1). In
  epoch e the shards are shuffled by a permutation seeded with (seed, e) and concatenated, giving N positions;
  stream g reads the contiguous range of L = ceil(N / S) positions starting at g * L (wrapping), i.e. its own
  few shards, in order through webdataset's tar reader (gopen, with an fsspec opener for s3:// and other
  stores), through a shuffle buffer whose choices and flips are drawn from (seed, e, g): its emission order is
  computed ahead, so reading keeps only the samples still to be emitted.
* Global elements. Element k of the run is emission k // S of stream k % S (each stream's epochs follow each
  other). Step s trains on elements [s * B, (s + 1) * B) for global batch B; rank r of W takes the elements with
  k % W == r, micro_batch at a time (`Schedule`). Timesteps, noise and label dropout are drawn per element from
  (seed, k) by the training step, so a step computes the same gradient on any world size, to float reduction.
* A rank reads only the streams its elements come from: S / W of them when W divides S (no more I/O than a
  per-rank split), every stream when it does not (each then reads more than it decodes). DataLoader workers
  split the rank's streams; each yields its part of every micro-batch, and the parts are merged in order.
* The state is one number, the elements consumed by finished steps (plus what defines the order, to warn when it
  changed): a stream on any number of processes resumes from it exactly where the run left off.

A corrupt image, or a sample lost in a truncated or damaged shard, is replaced in its micro-batch by a copy of
another sample of that micro-batch (so shapes stay fixed), counted in `skipped` and logged; each damaged shard is
logged once, and more than `max_damaged_shards` of them (default 1% of the manifest's shards) is a DataError
naming them. Unreachable shards raise StorageError after retries; with verify_sha256 a shard whose bytes do not
match the manifest raises DataError.
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

STATE_VERSION = 2  # 2: one global position (samples consumed); 1 (per-rank stream positions) is refused


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


def iter_shard(url: str, data: bytes, damage_out: list | None = None) -> Iterator[dict]:
    """Samples ({"__key__", ext: bytes, ...}) in tar order, grouped by key (webdataset's sample convention).

    A truncated or damaged tar ends the shard early: the samples before the damage are kept, the half-read one
    and the rest are skipped. Why it ended is appended to `damage_out` (the stream counts damaged shards and
    logs each once); without one, a warning is logged.
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
    why = f"truncated or damaged after {n} samples ({damage[0]})"
    if damage_out is not None:
        damage_out.append(why)
    else:
        log.warning("shard %s is %s: rest of the shard skipped", url, why)


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


def effective_streams(streams: int, num_samples: int, shuffle_buffer: int) -> int:
    """How many canonical streams a dataset is read as: `data.streams`, but never so many that a stream holds
    less than a shuffle buffer's worth of samples per epoch (a small subset is one stream, shuffled as a whole).
    Depends on the data and the config only, never on the world size."""
    return max(1, min(streams, num_samples // max(1, shuffle_buffer)))


class Plan:
    """The global sample order: canonical stream g (of S) reads, in epoch e, the contiguous range of L positions
    starting at g * L of the shards concatenated in a (seed, e) permutation, through a shuffle buffer whose
    choices and flips are drawn from (seed, e, g). Global element k is the (k // S)-th emission of stream k % S
    (epochs follow each other in each stream)."""

    def __init__(self, manifest: dict, seed: int, streams: int, shuffle_buffer: int, flip: bool):
        self.manifest = manifest
        self.counts = [int(s["samples"]) for s in manifest["shards"]]
        self.n = sum(self.counts)
        if self.n <= 0:
            raise DataError(f"manifest {manifest.get('url')} has no samples")
        self.seed = seed
        self.S = effective_streams(streams, self.n, shuffle_buffer)
        self.length = math.ceil(self.n / self.S)  # emissions per stream per epoch
        self.buffer = min(shuffle_buffer, self.length)
        self.flip = flip
        self.urls = [shard_url(manifest, s) for s in manifest["shards"]]

    @property
    def epoch_size(self) -> int:
        """Global elements per epoch (S * L: every sample once, a few twice when S does not divide N)."""
        return self.S * self.length

    def locate(self, k: int) -> tuple[int, int, int]:
        """Global element k -> (stream g, epoch e, emission j within the epoch)."""
        g, J = k % self.S, k // self.S
        return g, J // self.length, J % self.length

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
        emitted_at = np.empty(self.length, dtype=np.int64)
        emitted_at[order] = np.arange(self.length)
        return {"order": order, "emitted_at": emitted_at, "flips": flips, "segments": segments}


class Schedule:
    """Which global elements each micro-batch of a rank holds: step s covers elements [s*B, (s+1)*B); rank r of W
    takes those with k % W == r, in order, `micro_batch` at a time. Any W and micro batch whose product divides
    B see the same elements per step, so the gradient of a step does not depend on how it was split."""

    def __init__(self, global_batch: int, micro_batch: int, rank: int, world_size: int):
        per_rank, rem = divmod(global_batch, world_size * micro_batch)
        if rem or per_rank == 0:
            raise DataError(
                f"global batch {global_batch} is not a multiple of {world_size} processes x micro batch {micro_batch}"
            )
        self.B, self.m, self.r, self.W = global_batch, micro_batch, rank, world_size
        self.accum = per_rank

    def elements(self, step: int, micro: int) -> np.ndarray:
        u = micro * self.m + np.arange(self.m, dtype=np.int64)
        return step * self.B + self.r + self.W * u


class Damage:
    """Damaged shards seen by this process: each logged once; more than `limit` is a DataError naming them."""

    def __init__(self, limit: int):
        self.limit = limit
        self.shards: dict[str, str] = {}

    def add(self, url: str, why: str) -> None:
        if url in self.shards:
            return
        self.shards[url] = why
        log.warning(
            "shard %s is %s: its remaining samples are skipped (%d damaged shard(s) so far)", url, why, len(self.shards)
        )
        if len(self.shards) > self.limit:
            names = ", ".join(f"{u} ({w})" for u, w in self.shards.items())
            raise DataError(
                f"{len(self.shards)} damaged shards, more than data.max_damaged_shards={self.limit}: {names}. "
                "Rebuild or replace them, or raise data.max_damaged_shards to train on the rest"
            )


class Cursor:
    """Reads canonical stream g for one process: `get(J)` returns the raw sample of emission J (epochs
    continued) and its flip, J non-decreasing. Only samples `mine(J)` are kept while reading ahead."""

    def __init__(self, plan: Plan, g: int, mine, damage: Damage, verify: bool = False):
        self.plan, self.g, self.mine, self.damage, self.verify = plan, g, mine, damage, verify
        self.e = -1

    def _start_epoch(self, e: int, j0: int) -> None:
        self.e, self.ep = e, self.plan.epoch(e, self.g)
        order = self.ep["order"]
        self.have: dict[int, dict] = {}
        self.missing: set[int] = set()
        t_min = int(order[j0:].min()) if j0 < len(order) else self.plan.length
        self.segs = iter([s for s in self.ep["segments"] if s[3] + (s[2] - s[1]) > t_min])
        self.reader = None
        self.j = j0

    def _read_one(self) -> bool:
        """Read the next input of the stream into `have` (if wanted); False when the epoch's inputs are all read."""
        if self.reader is None:
            seg = next(self.segs, None)
            if seg is None:
                return False
            sid, lo, hi, t0 = seg
            shard = self.plan.manifest["shards"][sid]
            url = self.plan.urls[sid]
            data = fetch_shard(url, shard.get("sha256"), self.verify)
            self.why: list = []
            self.reader, self.seg, self.seen = _segment_reader(iter_shard(url, data, self.why), lo, hi), seg, set()
        sid, lo, hi, t0 = self.seg
        try:
            off, sample = next(self.reader)
        except StopIteration:
            if self.why:
                self.damage.add(self.plan.urls[sid], self.why[0])
            self.missing.update(t0 + off - lo for off in range(lo, hi) if off not in self.seen)
            self.reader = None
            return True
        self.seen.add(off)
        t = t0 + off - lo
        j = int(self.ep["emitted_at"][t])
        if j >= self.j and self.mine(self.e * self.plan.length + j):
            self.have[t] = sample
        return True

    def get(self, J: int) -> tuple[dict | None, bool]:
        e, j = divmod(J, self.plan.length)
        if e != self.e:
            self._start_epoch(e, j)
        self.j = j
        t = int(self.ep["order"][j])
        while t not in self.have and t not in self.missing:
            if not self._read_one():
                self.missing.add(t)
        return self.have.pop(t, None), bool(self.ep["flips"][t])


def _segment_reader(samples: Iterator[dict], lo: int, hi: int) -> Iterator[tuple[int, dict]]:
    for off, sample in enumerate(samples):
        if off >= hi:
            return
        if off >= lo:
            yield off, sample


# ------------------------------------------------------------------------------------------------------ stream
def _micro_batches(spec: dict, streams: list[int], step: int, micro: int) -> Iterator[dict]:
    """The part of each micro-batch of one rank that comes from `streams` (one worker's share), endlessly:
    {"slots", "images", "labels", "indices", "skipped", "step", "micro"}."""
    plan = _plan_from_spec(spec)
    sched = Schedule(spec["global_batch"], spec["batch_size"], spec["rank"], spec["world_size"])
    damage = Damage(spec["max_damaged"])
    S, W, r = plan.S, sched.W, sched.r
    cursors = {
        g: Cursor(plan, g, lambda J, g=g: (J * S + g) % W == r, damage, spec["verify"]) for g in streams
    }  # mine(J): element J*S+g belongs to this rank (k % W == r)
    manifest = plan.manifest
    while True:
        slots, arrs, labels, idx, skipped = [], [], [], [], 0
        for slot, k in enumerate(sched.elements(step, micro)):
            g = int(k) % S
            if g not in cursors:
                continue
            sample, flip = cursors[g].get(int(k) // S)
            if sample is None:
                skipped += 1
                continue
            try:
                arr, label, index = decode_sample(sample, manifest, flip)
            except Exception as exc:  # corrupt sample: replaced in its batch, counted, logged
                skipped += 1
                log.warning(
                    "skipping corrupt sample %s in shard %s: %s: %s",
                    sample.get("__key__"),
                    sample.get("__url__"),
                    type(exc).__name__,
                    exc,
                )
                continue
            slots.append(slot)
            arrs.append(arr)
            labels.append(label)
            idx.append(index)
        yield {
            "slots": slots,
            "images": to_tensor(arrs, plan.manifest["kind"], as_float=False) if arrs else None,
            "labels": labels,
            "indices": idx,
            "skipped": skipped,
            "step": step,
            "micro": micro,
        }
        micro += 1
        if micro == sched.accum:
            step, micro = step + 1, 0


class _WorkerDataset(torch.utils.data.IterableDataset):
    """What DataLoader worker w runs: its share of the rank's streams; each yields one part per micro-batch, so
    the DataLoader's round robin over workers hands the main process the parts of one micro-batch in a row."""

    def __init__(self, spec: dict, streams: list[int], step: int, micro: int):
        super().__init__()
        self.spec, self.streams, self.step, self.micro = spec, streams, step, micro

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return _micro_batches(self.spec, self.streams[w::nw], self.step, self.micro)


_PLANS: dict = {}


def _plan_from_spec(spec: dict) -> Plan:
    key = json.dumps({k: spec[k] for k in ("seed", "streams", "shuffle_buffer", "flip")}) + spec["manifest"]["url"]
    if key not in _PLANS:
        _PLANS.clear()
        _PLANS[key] = Plan(spec["manifest"], spec["seed"], spec["streams"], spec["shuffle_buffer"], spec["flip"])
    return _PLANS[key]


class TrainStream:
    """Endless iterator of one rank's micro-batches: (images float32 (B, C, H, W) in [-1, 1] or latents, labels
    int64 (B,)). Which samples a micro-batch holds, and their flips, follow from the seed and the global batch
    alone (module doc); `last_ids` holds the global element ids of the last micro-batch (what per-sample noise is
    drawn from), `last_indices` the dataset indices. `state_dict()` at a step boundary is one global position that
    any number of processes can resume from. A corrupt or missing sample is replaced in its micro-batch by a copy
    of another of the batch (counted in `skipped`, logged)."""

    def __init__(
        self,
        manifest: dict,
        *,
        batch_size: int,
        global_batch: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        flip: bool = True,
        verify_sha256: bool = False,
        streams: int = 64,
        max_damaged_shards: int | None = None,
    ):
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        self.manifest = manifest
        global_batch = global_batch or batch_size * world_size
        self.schedule = Schedule(global_batch, batch_size, rank, world_size)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.num_workers, self.shuffle_buffer, self.flip, self.verify = num_workers, shuffle_buffer, flip, verify_sha256
        self.plan = Plan(manifest, seed, streams, shuffle_buffer, flip)
        self.streams = streams
        n_shards = len(manifest["shards"])
        self.max_damaged = n_shards // 100 if max_damaged_shards is None else max_damaged_shards
        self.step, self.micro = 0, 0  # the next micro-batch
        self.skipped = 0
        self.last_ids: torch.Tensor | None = None
        self.last_indices: torch.Tensor | None = None
        self._it: Iterator[dict] | None = None
        self._loader = None

    @property
    def my_streams(self) -> list[int]:
        """The canonical streams this rank reads: g with g = k % S for some k % W == r."""
        S, W, r = self.plan.S, self.world_size, self.rank
        d = math.gcd(S, W)
        return [g for g in range(S) if g % d == r % d]

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
            "global_batch": self.schedule.B,
            "max_damaged": self.max_damaged,
        }

    def _start(self) -> Iterator[list[dict]]:
        streams = self.my_streams
        if self.num_workers == 0:
            it = _micro_batches(self._spec(), streams, self.step, self.micro)
            return ([part] for part in it)
        register_gopen()
        nw = min(self.num_workers, len(streams))
        ds = _WorkerDataset(self._spec(), streams, self.step, self.micro)
        self._loader = torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=nw, worker_init_fn=worker_init_fn, prefetch_factor=2
        )
        parts = iter(self._loader)
        return ([next(parts) for _ in range(nw)] for _ in iter(int, 1))

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = self._start()
        parts = next(self._it)
        ids = torch.from_numpy(self.schedule.elements(self.step, self.micro))
        m = self.batch_size
        slots = [s for p in parts for s in p["slots"]]
        if not slots:
            raise DataError(
                f"no decodable sample in micro-batch {self.micro} of step {self.step} of {self.manifest['url']} "
                "(every sample of it is corrupt or in a damaged shard)"
            )
        images = torch.cat([p["images"] for p in parts if p["images"] is not None])
        labels = [v for p in parts for v in p["labels"]]
        index = [v for p in parts for v in p["indices"]]
        src = [0] * m  # slot -> row of `images`; a missing slot takes the first present row
        for row, slot in enumerate(slots):
            src[slot] = row
        if len(slots) < m:
            present = set(slots)
            first = slots.index(min(slots))
            src = [src[s] if s in present else first for s in range(m)]
        rows = torch.tensor(src, dtype=torch.int64)
        x = images.index_select(0, rows)
        self.skipped += sum(int(p["skipped"]) for p in parts)
        self.last_ids = ids
        self.last_indices = torch.tensor([index[i] for i in src], dtype=torch.int64)
        self.micro += 1
        if self.micro == self.schedule.accum:
            self.step, self.micro = self.step + 1, 0
        if self.manifest["kind"] != "latents":
            x = to_float(x)
        return x, torch.tensor([labels[i] for i in src], dtype=torch.int64)

    def close(self) -> None:
        self._it = None
        self._loader = None

    @property
    def samples(self) -> int:
        """Global elements consumed by finished steps (the position a checkpoint records)."""
        return self.step * self.schedule.B

    def state_dict(self) -> dict:
        """The global position: elements consumed (at a step boundary) and what defines the order. JSON-able."""
        if self.micro:
            raise DataError(f"the data position is saved between steps, not after micro-batch {self.micro}")
        return {
            "version": STATE_VERSION,
            "samples": self.samples,
            "epoch": self.samples // self.plan.epoch_size,
            "seed": self.seed,
            "streams": self.plan.S,
            "num_samples": self.manifest["num_samples"],
            "shuffle_buffer": self.shuffle_buffer,
            "skipped": self.skipped,
        }

    def load_state_dict(self, sd: dict) -> None:
        """Continue from a saved global position, on any world size. A state saved with another global batch
        continues at the step that starts at or after its position."""
        if sd.get("version") != STATE_VERSION:
            raise DataError(
                f"data-loader state version {sd.get('version')} is not {STATE_VERSION} (a checkpoint of an older "
                "ditscale: convert it with `python -m ditscale checkpoint convert`)"
            )
        mine = {
            "seed": self.seed,
            "streams": self.plan.S,
            "num_samples": self.manifest["num_samples"],
            "shuffle_buffer": self.shuffle_buffer,
        }
        for key, value in mine.items():
            if key in sd and sd[key] != value:
                log.warning(
                    "data-loader state was saved with %s=%s, this stream has %s: the order changes from "
                    "here on (an allowed config change)",
                    key,
                    sd[key],
                    value,
                )
        self.close()
        self.step = -(-int(sd["samples"]) // self.schedule.B)
        self.micro = 0
        self.skipped = int(sd.get("skipped", 0))

    def __del__(self):
        self.close()


def make_loader(
    manifest_url: str,
    *,
    batch_size: int,
    global_batch: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    flip: bool = True,
    verify_sha256: bool = False,
    streams: int = 64,
    max_damaged_shards: int | None = None,
) -> TrainStream:
    """The trainer's input: an endless, resumable TrainStream over the shards of a manifest (see module doc)."""
    register_gopen()
    return TrainStream(
        read_manifest(manifest_url),
        batch_size=batch_size,
        global_batch=global_batch,
        rank=rank,
        world_size=world_size,
        seed=seed,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        flip=flip,
        verify_sha256=verify_sha256,
        streams=streams,
        max_damaged_shards=max_damaged_shards,
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
