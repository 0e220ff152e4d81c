"""The train stream: determinism, exact resume (with and without DataLoader workers), rank split, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch

from ditscale.data import build_shards, make_loader, make_subset, read_manifest
from ditscale.data.latents import build_latents, load_vae_encoder
from ditscale.errors import DataError, StorageError


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits") / "d8"
    build_shards("digits", None, str(out), resolution=8, progress=False)
    return str(out / "manifest.json")


def take(stream, n: int) -> list[list[int]]:
    out = []
    for _ in range(n):
        next(stream)
        out.append(stream.last_indices.tolist())
    return out


def flat(batches):
    return [i for b in batches for i in b]


def test_batches_shape_range_and_labels(digits):
    s = make_loader(digits, batch_size=16, seed=0)
    x, y = next(s)
    assert x.shape == (16, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) >= -1 and float(x.max()) <= 1 and float(x.max()) > 0.5
    assert s.manifest["num_classes"] == 10 and s.skipped == 0


@pytest.mark.parametrize("cut", [0, 1, 37, 95])
def test_exact_resume(digits, cut):
    ref = take(make_loader(digits, batch_size=16, seed=5, streams=2, shuffle_buffer=200), 130)
    a = make_loader(digits, batch_size=16, seed=5, streams=2, shuffle_buffer=200)
    first = take(a, cut)
    sd = json.loads(json.dumps(a.state_dict()))  # small and JSON-able
    b = make_loader(digits, batch_size=16, seed=5, streams=2, shuffle_buffer=200)
    b.load_state_dict(sd)
    assert first + take(b, 130 - cut) == ref


def test_resume_restores_images_and_flips(digits):
    a = make_loader(digits, batch_size=8, seed=1)
    ref = [next(a)[0] for _ in range(6)]
    b = make_loader(digits, batch_size=8, seed=1)
    for _ in range(4):
        next(b)
    c = make_loader(digits, batch_size=8, seed=1)
    c.load_state_dict(b.state_dict())
    assert torch.equal(next(c)[0], ref[4]) and torch.equal(next(c)[0], ref[5])


def test_deterministic_per_seed_and_rank(digits):
    k = lambda **kw: flat(take(make_loader(digits, batch_size=10, **kw), 20))
    assert k(seed=0) == k(seed=0)
    assert k(seed=0) != k(seed=1)
    assert k(seed=0, rank=0, world_size=2) != k(seed=0, rank=1, world_size=2)


def test_ranks_partition_each_epoch(digits):
    n = read_manifest(digits)["num_samples"]  # 1,500: divisible by 2 ranks
    one = flat(take(make_loader(digits, batch_size=10, seed=3), n // 10))
    assert sorted(one) == sorted(set(one)) and len(one) == n
    per_rank = [flat(take(make_loader(digits, batch_size=10, seed=3, rank=r, world_size=2), n // 20)) for r in (0, 1)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == set(one)
    # the next epoch is a new shuffle of the same samples
    s = make_loader(digits, batch_size=10, seed=3)
    take(s, n // 10)
    second = flat(take(s, n // 10))
    assert sorted(second) == sorted(one) and second != one


def test_flip_is_seeded(digits):
    a, b = make_loader(digits, batch_size=64, seed=2), make_loader(digits, batch_size=64, seed=2, flip=False)
    xa, xb = next(a)[0], next(b)[0]
    assert torch.equal(a.last_indices, b.last_indices)
    same = [torch.equal(xa[i], xb[i]) for i in range(64)]
    flipped = [torch.equal(xa[i], xb[i].flip(-1)) for i in range(64)]
    assert all(s or f for s, f in zip(same, flipped, strict=True)) and 10 < sum(flipped) < 54


def test_tiny_subset_with_many_streams(digits, tmp_path):
    urls = make_subset(digits, 10, str(tmp_path / "n10"), seed=0)
    seen = set()
    for r in (0, 1):
        s = make_loader(urls["train"], batch_size=4, rank=r, world_size=2, streams=2)
        seen |= set(flat(take(s, 6)))
    assert seen == set(read_manifest(urls["train"])["subset"]["indices"])


def test_state_is_global_and_resumes_on_another_world_size(digits):
    """Two ranks (global batch 20) for 7 steps, then one rank: the elements of steps 8-10 are the undisturbed run's."""
    ref = make_loader(digits, batch_size=20, seed=3)
    want = [sorted(b) for b in take(ref, 10)]
    pair = [make_loader(digits, batch_size=10, global_batch=20, seed=3, rank=r, world_size=2) for r in (0, 1)]
    got = [sorted(a + b) for a, b in zip(take(pair[0], 7), take(pair[1], 7), strict=True)]
    sd = pair[0].state_dict()
    assert sd == pair[1].state_dict() and sd["samples"] == 140 and json.loads(json.dumps(sd)) == sd
    one = make_loader(digits, batch_size=20, seed=3)
    one.load_state_dict(sd)
    assert got + [sorted(b) for b in take(one, 3)] == want


def test_older_state_is_refused_and_mid_step_state_is_an_error(digits):
    with pytest.raises(DataError, match="version 1 .* checkpoint convert"):
        make_loader(digits, batch_size=8).load_state_dict({"version": 1, "positions": [[0, 0]], "batches": 3})
    s = make_loader(digits, batch_size=4, global_batch=8)  # two micro-batches a step
    next(s)
    with pytest.raises(DataError, match="between steps"):
        s.state_dict()


@pytest.mark.slow
def test_workers_give_the_same_stream_and_resume(digits):
    ref = take(make_loader(digits, batch_size=16, seed=7, streams=2), 60)
    w = make_loader(digits, batch_size=16, seed=7, num_workers=2)
    assert take(w, 60) == ref
    w2 = make_loader(digits, batch_size=16, seed=7, num_workers=2)
    head = take(w2, 23)
    sd = w2.state_dict()
    w2.close()
    w3 = make_loader(digits, batch_size=16, seed=7, num_workers=2)
    w3.load_state_dict(sd)
    assert head + take(w3, 37) == ref
    z = make_loader(digits, batch_size=16, seed=7, num_workers=0)  # a worker-made state resumes without workers
    z.load_state_dict(sd)
    assert take(z, 37) == ref[23:]
    w3.close()


@pytest.mark.slow
def test_two_ranks_with_workers(digits):
    for r in (0, 1):
        main = take(make_loader(digits, batch_size=10, seed=4, rank=r, world_size=2, streams=2), 20)
        work = take(make_loader(digits, batch_size=10, seed=4, rank=r, world_size=2, num_workers=2), 20)
        assert main == work


# ------------------------------------------------------------------------------------------------ bad input
def copy_set(manifest_url: str, dst: Path) -> Path:
    src = Path(manifest_url).parent
    dst.mkdir(parents=True)
    for p in src.glob("*.tar"):
        (dst / p.name).write_bytes(p.read_bytes())
    (dst / "manifest.json").write_text((src / "manifest.json").read_text())
    return dst


def rewrite_shard(path: Path, fn) -> None:
    """Rewrite every member through fn(name, data) -> data."""
    out = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for m in src.getmembers():
            data = fn(m.name, src.extractfile(m).read())
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    path.write_bytes(out.getvalue())


def fix_sha(root: Path) -> None:
    m = json.loads((root / "manifest.json").read_text())
    for s in m["shards"]:
        data = (root / s["path"]).read_bytes()
        s["sha256"], s["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (root / "manifest.json").write_text(json.dumps(m))


def epoch_keys(url: str, **kw) -> tuple[list[int], object]:
    s = make_loader(url, batch_size=10, seed=0, **kw)
    n = read_manifest(url)["num_samples"]
    return flat(take(s, n // 10 - 1)), s


def test_corrupt_image_is_skipped_counted_logged(digits, tmp_path, caplog):
    root = copy_set(digits, tmp_path / "bad")
    shard = root / "train-000002.tar"
    with tarfile.open(shard) as t:
        victim = sorted({m.name.split(".")[0] for m in t.getmembers()})[5]
    rewrite_shard(shard, lambda name, data: b"\x89PNG garbage" if name == f"{victim}.png" else data)
    fix_sha(root)
    with caplog.at_level(logging.WARNING, logger="ditscale.data.stream"):
        keys, s = epoch_keys(str(root / "manifest.json"), verify_sha256=True)
    assert s.skipped == 1 and int(victim) not in keys
    assert any(victim in r.getMessage() and "train-000002.tar" in r.getMessage() for r in caplog.records)


def test_truncated_shard_skips_its_rest(digits, tmp_path, caplog):
    root = copy_set(digits, tmp_path / "trunc")
    shard = root / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: 40 * 1024 + 100])
    url = str(root / "manifest.json")
    s = make_loader(url, batch_size=10, seed=0, max_damaged_shards=1)
    with caplog.at_level(logging.WARNING, logger="ditscale.data.stream"):
        keys = flat(take(s, 150))  # one epoch: 1,500 elements (one canonical stream here)
    lost = 188 - 40 * 1024 // (3 * 1024)  # the shard keeps the samples before the cut (3 KiB each here)
    assert s.skipped == lost and len(set(keys)) == 1500 - lost  # each lost sample replaced by one of its batch
    damaged = [r for r in caplog.records if "truncated" in r.getMessage() and "train-000001.tar" in r.getMessage()]
    assert len(damaged) == 1  # logged once, not once per attempt
    assert not [r for r in caplog.records if "corrupt" in r.getMessage()]  # the half sample is not "corrupt"
    strict = make_loader(url, batch_size=10, seed=0)  # default: 1% of 7 shards = none tolerated
    with pytest.raises(DataError, match=r"1 damaged shards, more than data.max_damaged_shards=0: .*train-000001.tar"):
        take(strict, 150)


def test_missing_shard_is_named_without_retrying(digits, tmp_path, caplog):
    from ditscale.data import missing_shards, read_manifest

    root = copy_set(digits, tmp_path / "missing")
    gone = sorted(root.glob("*.tar"))[:2]
    for p in gone:
        p.unlink()
    assert missing_shards(read_manifest(str(root / "manifest.json"))) == [str(p) for p in gone]
    for p in root.glob("*.tar"):
        p.unlink()
    with caplog.at_level(logging.WARNING), pytest.raises(StorageError, match=r"train-0000\d\d\.tar does not exist"):
        next(make_loader(str(root / "manifest.json"), batch_size=4))
    assert not [r for r in caplog.records if "retry" in r.getMessage()]  # a missing file is not transient
    with pytest.raises(StorageError, match="nowhere/manifest.json"):
        make_loader(str(tmp_path / "nowhere"), batch_size=4)


def test_sha256_mismatch_names_the_shard(digits, tmp_path):
    root = copy_set(digits, tmp_path / "sha")
    m = json.loads((root / "manifest.json").read_text())
    for s in m["shards"]:
        s["sha256"] = "0" * 64
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"shard .*train-0000\d\d\.tar: sha256"):
        next(make_loader(str(root / "manifest.json"), batch_size=4, verify_sha256=True))
    next(make_loader(str(root / "manifest.json"), batch_size=4))  # not checked unless asked


# --------------------------------------------------------------------------------------------------- latents
def fake_vae(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Stands in for AutoencoderKL: 4 channels at 1/4 size, a little seeded noise like latent_dist.sample()."""
    z = torch.nn.functional.avg_pool2d(x, 4)
    z = torch.cat([z, z.mean(1, keepdim=True)], 1)
    return (z + 0.01 * torch.randn(z.shape, generator=g)) * 0.18215


def test_latent_shards_and_loader(digits, tmp_path):
    small = make_subset(digits, 40, str(tmp_path / "n40"))["train"]
    m = build_latents(small, str(tmp_path / "lat"), encoder=fake_vae, batch_size=16, shard_size=16)
    assert m["kind"] == "latents" and m["channels"] == 4 and m["resolution"] == 2 and m["num_samples"] == 40
    again = build_latents(small, str(tmp_path / "lat2"), encoder=fake_vae, batch_size=16, shard_size=16)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in m["shards"]]  # deterministic
    s = make_loader(m["url"], batch_size=8, seed=0)
    z, y = next(s)
    assert z.shape == (8, 4, 2, 2) and z.dtype == torch.float32 and y.shape == (8,)


def test_latents_need_a_local_vae(digits, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_vae_encoder(str(tmp_path / "no-vae"))
    try:
        import diffusers  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="diffusers"):
            load_vae_encoder(str(tmp_path))
