"""Shards on a real S3-compatible server (moto_server on loopback, via s3fs): write, stream back, subsets, errors."""

from __future__ import annotations

import pytest
import s3fs

from ditscale.data import build_shards, iter_dataset, make_loader, make_subset, read_manifest
from ditscale.errors import StorageError

pytestmark = pytest.mark.slow


def keys(stream, n):
    out = []
    for _ in range(n):
        next(stream)
        out.append(stream.last_indices.tolist())
    return out


@pytest.fixture(scope="module")
def s3_digits(s3_server, tmp_path_factory):
    url = s3_server.bucket() + "/digits8"
    m = build_shards("digits", None, url, resolution=8, workers=2, progress=False)
    local = tmp_path_factory.mktemp("local") / "digits8"
    build_shards("digits", None, str(local), resolution=8, progress=False)
    return m, str(local)


def test_build_writes_shards_and_manifest_to_s3(s3_server, s3_digits):
    m, local = s3_digits
    url = m["summary"]["manifest"]
    assert url.startswith("s3://") and url.endswith("/digits8/manifest.json")
    bucket_path = url[len("s3://") :].rsplit("/", 1)[0]
    names = {p.rsplit("/", 1)[1] for p in s3_server.fs.ls(bucket_path)}
    assert {"manifest.json", "train-000000.tar", "test"} <= names
    remote, here = read_manifest(url), read_manifest(local)
    assert [s["sha256"] for s in remote["shards"]] == [s["sha256"] for s in here["shards"]]  # same bytes
    # rebuilding finds every shard finished
    again = build_shards("digits", None, url.rsplit("/", 1)[0], resolution=8, progress=False)
    assert again["summary"]["shards_built"] == 0


def test_stream_from_s3_equals_local(s3_digits):
    m, local = s3_digits
    url = m["summary"]["manifest"]
    ref = keys(make_loader(local, batch_size=16, seed=1, streams=2), 30)
    assert keys(make_loader(url, batch_size=16, seed=1, streams=2, verify_sha256=True), 30) == ref
    w = make_loader(url, batch_size=16, seed=1, num_workers=2)  # workers open s3:// through gopen + fsspec
    head = keys(w, 12)
    sd = w.state_dict()
    w.close()
    r = make_loader(url, batch_size=16, seed=1, num_workers=2)
    r.load_state_dict(sd)
    assert head + keys(r, 18) == ref
    r.close()
    assert len(list(iter_dataset(url))) == 1500


def test_plain_webdataset_reads_s3_through_registered_gopen(s3_digits):
    import webdataset as wds

    import ditscale.data  # noqa: F401 - registers the fsspec opener for s3:// in webdataset's gopen_schemes

    m, _ = s3_digits
    base = m["summary"]["manifest"].rsplit("/", 1)[0]
    url = base + "/train-{000000..000007}.tar"
    ds = wds.WebDataset(url, shardshuffle=False, empty_check=False).decode("pil").to_tuple("png", "cls")
    assert sum(1 for _ in ds) == 1500


def test_subset_s3_to_s3(s3_server, s3_digits):
    m, _ = s3_digits
    out = s3_server.bucket() + "/n50"
    urls = make_subset(m["summary"]["manifest"], 50, out, seed=2, pair=True)
    s1, s2, test = (read_manifest(urls[r]) for r in ("s1", "s2", "test"))
    a, b = set(s1["subset"]["indices"]), set(s2["subset"]["indices"])
    assert len(a) == len(b) == 50 and not a & b and test["num_samples"] == 297
    assert len(list(iter_dataset(urls["s2"]))) == 50


def test_missing_object_and_unreachable_store(s3_server, s3_digits, monkeypatch):
    monkeypatch.setenv("DITSCALE_STORAGE_RETRY_SECONDS", "1")
    monkeypatch.setenv("DITSCALE_STORAGE_BACKOFF", "0.1")
    m, _ = s3_digits
    url = m["summary"]["manifest"]
    bucket = s3_server.bucket()
    s3_server.fs.pipe(f"{bucket[5:]}/broken/manifest.json", s3_server.fs.cat(url[5:]))
    with pytest.raises(StorageError, match=rf"{bucket}/broken/train-000\d\d\d\.tar"):
        next(make_loader(f"{bucket}/broken/manifest.json", batch_size=4))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()  # each fsspec class caches its own instances
    try:
        with pytest.raises(StorageError, match=r"cannot read s3://nowhere-bucket/x/manifest.json after \d+ attempt"):
            read_manifest("s3://nowhere-bucket/x/manifest.json")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
