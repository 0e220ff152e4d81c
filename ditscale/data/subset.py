"""Study subsets: N training images (or two disjoint sets S1, S2 of N), and a held-out test set, as shard sets.

Semantics (shards/README.md says the same):
* The pool is the parent manifest's samples (the dataset's train split), in manifest order.
* Held-out test set, drawn once per dataset: the dataset's own test split when it has one (a "test", else "val"
  split listed in the parent manifest), otherwise `test_size` samples of the pool chosen by a fixed permutation
  (seed-independent), which are then removed from the training pool. Either way at most `test_size` samples,
  the same for every --size and --seed, never overlapping a training subset. Written to OUT/test/.
* Training subset: the first N of a permutation of the pool seeded with --seed. Subsets of growing N with the
  same seed are therefore nested (N=10 is inside N=100); different seeds give different draws.
* --pair: S1 = permutation[:N], S2 = permutation[N:2N] (disjoint; S1 equals the plain subset of that seed).
Each subset is materialised as its own shards (sample bytes copied unchanged, in index order) with a manifest
recording the parent manifest and the chosen global indices, so that N=10 never streams the whole dataset.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile

import numpy as np

from ditscale.data.convert import add_tar_member, write_manifest
from ditscale.data.gopen import register_gopen
from ditscale.data.stream import fetch_shard, iter_shard, read_manifest, shard_url
from ditscale.errors import DataError
from ditscale.io import storage

log = logging.getLogger(__name__)

TEST_SEED = 0x7E57  # the held-out test draw does not depend on --seed
DEFAULT_TEST_SIZE = 10_000
COPY_KEYS = (
    "kind",
    "source",
    "resolution",
    "channels",
    "image_format",
    "image_key",
    "num_classes",
    "class_names",
    "latent_scale",
    "latent_channels",
    "vae",
)


def _resolve_size(size: float, pool: int, what: str) -> int:
    if size <= 0:
        raise DataError(f"{what} must be positive, got {size}")
    n = int(round(size * pool)) if size < 1 else int(size)
    return max(1, n)


def _parent_test_manifest(parent: dict) -> dict | None:
    splits = parent.get("splits") or {}
    for name in ("test", "val"):
        if name in splits and name != parent.get("split"):
            return read_manifest(storage.join(storage.dirname(parent["url"]), splits[name]))
    return None


def _positions_to_shards(manifest: dict, positions: set[int]) -> dict[int, set[int]]:
    """{shard id: offsets} for manifest positions (position = running count over shards in manifest order)."""
    out: dict[int, set[int]] = {}
    start = 0
    for sid, shard in enumerate(manifest["shards"]):
        n = int(shard["samples"])
        offs = {p - start for p in positions if start <= p < start + n}
        if offs:
            out[sid] = offs
        start += n
    return out


def _materialise(
    manifest: dict,
    roles: dict[str, set[int]],
    outs: dict[str, str],
    shard_size: int,
    meta: dict[str, dict],
    verify: bool,
) -> dict[str, dict]:
    """Copy the samples at the given positions of `manifest` into one shard set per role."""
    wanted = set().union(*roles.values()) if roles else set()
    role_of = {p: r for r, ps in roles.items() for p in ps}
    by_shard = _positions_to_shards(manifest, wanted)
    writers: dict[str, dict] = {
        r: {"buf": io.BytesIO(), "tar": None, "n": 0, "shards": [], "indices": []} for r in roles
    }

    def flush(r: str) -> None:
        w = writers[r]
        if w["tar"] is None:
            return
        w["tar"].close()
        data = w["buf"].getvalue()
        name = f"{meta[r]['split']}-{len(w['shards']):06d}.tar"
        storage.write_bytes(storage.join(outs[r], name), data)
        w["shards"].append(
            {
                "path": name,
                "samples": w["n"],
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "first_index": w["first"],
            }
        )
        w["buf"], w["tar"], w["n"] = io.BytesIO(), None, 0

    start = 0
    for sid, shard in enumerate(manifest["shards"]):
        n = int(shard["samples"])
        if sid in by_shard:
            url = shard_url(manifest, shard)
            offs = by_shard[sid]
            for off, sample in enumerate(iter_shard(url, fetch_shard(url, shard.get("sha256"), verify))):
                if off not in offs:
                    continue
                r = role_of[start + off]
                w = writers[r]
                if w["tar"] is None:
                    w["tar"] = tarfile.open(fileobj=w["buf"], mode="w", format=tarfile.USTAR_FORMAT)
                    w["first"] = int(sample["__key__"])
                for ext, value in sample.items():
                    if not ext.startswith("__"):
                        add_tar_member(w["tar"], f"{sample['__key__']}.{ext}", value)
                w["n"] += 1
                w["indices"].append(int(sample["__key__"]))
                if w["n"] >= shard_size:
                    flush(r)
        start += n
    result = {}
    for r in roles:
        flush(r)
        w = writers[r]
        if len(w["indices"]) != len(roles[r]):
            log.warning(
                "subset %s: %d of %d samples read (the parent has damaged shards)", r, len(w["indices"]), len(roles[r])
            )
        m = {k: manifest[k] for k in COPY_KEYS if k in manifest}
        m.update(
            format="ditscale-shards",
            version=1,
            split=meta[r]["split"],
            num_samples=len(w["indices"]),
            shards=w["shards"],
            subset=dict(meta[r]["subset"], indices=w["indices"]),
        )
        m["splits"] = meta[r].get("splits", {})
        write_manifest(outs[r], m)
        m["url"] = storage.join(outs[r], "manifest.json")
        result[r] = m
    return result


def make_subset(
    manifest_url: str,
    size: float,
    out: str,
    *,
    seed: int = 0,
    pair: bool = False,
    test_size: int = DEFAULT_TEST_SIZE,
    shard_size: int = 1000,
    verify_sha256: bool = False,
) -> dict:
    """Write the training subset(s) and the held-out test set under OUT; returns {role: manifest URL}.

    Roles: "train" (OUT/manifest.json) or, with pair, "s1" and "s2" (OUT/s1/, OUT/s2/); and "test" (OUT/test/).
    `size` is a count (>= 1) or a fraction of the training pool (< 1).
    """
    register_gopen()
    parent = read_manifest(manifest_url)
    n_parent = int(parent["num_samples"])
    test_parent = _parent_test_manifest(parent)
    pool = np.arange(n_parent)
    if test_parent is None:  # carve the held-out test set out of the pool, the same way for every seed and N
        n_test = min(test_size, n_parent // 10)
        perm = np.random.default_rng(TEST_SEED).permutation(n_parent)
        test_pos = set(perm[:n_test].tolist())
        pool = np.array(sorted(set(pool.tolist()) - test_pos), dtype=np.int64)
    else:
        n_t = int(test_parent["num_samples"])
        n_test = min(test_size, n_t)
        test_pos = set(np.random.default_rng(TEST_SEED).permutation(n_t)[:n_test].tolist())
    n = _resolve_size(size, len(pool), "--size")
    need = 2 * n if pair else n
    if need > len(pool):
        raise DataError(
            f"--size {size}{' (x2 for --pair)' if pair else ''} needs {need} samples; "
            f"the training pool of {manifest_url} has {len(pool)}"
        )
    perm = pool[np.random.default_rng(seed).permutation(len(pool))]
    roles = (
        {"s1": set(perm[:n].tolist()), "s2": set(perm[n : 2 * n].tolist())}
        if pair
        else {"train": set(perm[:n].tolist())}
    )
    outs = {r: (out if r == "train" else storage.join(out, r)) for r in roles}
    outs["test"] = storage.join(out, "test")
    storage.makedirs(out)
    base = {"parent": parent["url"], "seed": seed, "size": n, "nested": True, "test_size": n_test}
    meta = {
        r: {
            "split": "train",
            "subset": dict(base, role=r),
            "splits": {"train": "manifest.json", "test": ("test" if r == "train" else "../test") + "/manifest.json"},
        }
        for r in roles
    }
    meta["test"] = {
        "split": "test",
        "subset": {"parent": (test_parent or parent)["url"], "role": "test", "size": n_test, "seed": TEST_SEED},
        "splits": {"test": "manifest.json"},
    }
    if test_parent is None:
        made = _materialise(parent, dict(roles, test=test_pos), outs, shard_size, meta, verify_sha256)
    else:
        made = _materialise(parent, roles, outs, shard_size, meta, verify_sha256)
        made.update(_materialise(test_parent, {"test": test_pos}, outs, shard_size, meta, verify_sha256))
    return {r: m["url"] for r, m in made.items()}
