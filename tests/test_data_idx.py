"""The IDX sources (fashion-mnist, mnist): shards from Debian's dataset-fashion-mnist as installed, and the reader on
IDX folders the tests write (gzip or not, both file namings, wrong counts, missing files)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from ditscale.data import build_shards, iter_dataset, read_manifest
from ditscale.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, list_source, load_image, read_idx
from ditscale.errors import DataError
from tests.needs import skip_or_fail


def fashion_dir() -> str:
    if not Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file():
        skip_or_fail(f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")
    return FASHION_MNIST_DIR


def write_idx(path: Path, arr: np.ndarray) -> None:
    """An unsigned-byte IDX file: magic 0x0000080N, N big-endian dimensions, then the bytes."""
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + np.ascontiguousarray(arr, np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, compresslevel=1) if path.suffix == ".gz" else data)


def write_idx_folder(root: Path, *, gz: bool, dotted: bool = False, train: int = 60_000, test: int = 10_000):
    """Four IDX files with the published counts; image i of a split has pixel (0, 0) = i % 256 and label i % 10."""
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n, img_stem, lbl_stem in (
        ("train", train, "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        ("test", test, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    ):
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 0, 0] = np.arange(n) % 256
        images[:, 14, 3:25] = 200  # a bar, to see where padding puts it
        labels = (np.arange(n) % 10).astype(np.uint8)
        name = (lambda s: s.replace("-idx", ".idx", 1)) if dotted else (lambda s: s)
        suffix = ".gz" if gz else ""
        write_idx(root / (name(img_stem) + suffix), images)
        write_idx(root / (name(lbl_stem) + suffix), labels)
        arrays[split] = (images, labels)
    return arrays


def test_fashion_mnist_from_the_debian_package(tmp_path):
    src = fashion_dir()
    listing = list_source("fashion-mnist", None)  # no --src: the package's folder
    assert listing.class_names == FASHION_MNIST_CLASSES
    by_split = {s: [r for r in listing.records if r.split == s] for s in ("train", "test")}
    assert {s: len(v) for s, v in by_split.items()} == {"train": 60_000, "test": 10_000}  # as published
    for split, per_class in (("train", 6000), ("test", 1000)):
        assert np.bincount([r.label for r in by_split[split]]).tolist() == [per_class] * 10

    m = build_shards("fashion-mnist", None, str(tmp_path / "f32"), resolution=32, channels=1, progress=False)
    test = read_manifest(str(tmp_path / "f32" / "test"))
    assert (m["num_samples"], test["num_samples"], m["num_classes"], m["resolution"]) == (60_000, 10_000, 10, 32)
    assert m["class_names"] == FASHION_MNIST_CLASSES and m["source"] == "fashion-mnist"
    raw_test = read_idx(Path(src) / "t10k-images-idx3-ubyte.gz")
    raw_labels = read_idx(Path(src) / "t10k-labels-idx1-ubyte.gz")
    for k, (x, y, index) in enumerate(iter_dataset(str(tmp_path / "f32" / "test"))):
        px = np.round((x[0].numpy() + 1) * 127.5).astype(np.uint8)  # [-1, 1] back to the stored bytes
        assert px.shape == (32, 32) and not px[:2].any() and not px[-2:].any() and not px[:, :2].any()
        assert np.array_equal(px[2:30, 2:30], raw_test[k]), "padding keeps the published pixels exactly"
        assert y == raw_labels[k] and index == 60_000 + k
        if k == 50:
            break

    m28 = build_shards("fashion-mnist", src, str(tmp_path / "f28"), resolution=28, channels=3, limit=64, progress=False)
    raw_train = read_idx(Path(src) / "train-images-idx3-ubyte.gz")
    items = list(iter_dataset(str(tmp_path / "f28")))
    assert m28["num_samples"] == 64 and len(items) == 64
    x, _, index = items[7]
    assert x.shape == (3, 28, 28) and index == 7
    assert np.array_equal(np.round((x[1].numpy() + 1) * 127.5).astype(np.uint8), raw_train[7])


@pytest.mark.parametrize("gz,dotted", [(False, False), (True, False), (True, True)])
def test_idx_folder_gzip_or_not(tmp_path, gz, dotted):
    arrays = write_idx_folder(tmp_path / "mnist", gz=gz, dotted=dotted)
    listing = list_source("mnist", str(tmp_path / "mnist"))
    assert listing.class_names == [str(d) for d in range(10)]
    train = [r for r in listing.records if r.split == "train"]
    test = [r for r in listing.records if r.split == "test"]
    assert len(train) == 60_000 and len(test) == 10_000
    rec = test[1234]
    assert rec.label == 1234 % 10 and rec.source_id == "test/1234"
    assert np.array_equal(np.asarray(load_image(rec.ref)), arrays["test"][0][1234])


def test_idx_errors_name_the_files_and_the_package(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        list_source("fashion-mnist", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"lacks train-images-idx3-ubyte\[\.gz\].*apt-get install dataset-fashion"):
        list_source("fashion-mnist", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="mnist.*needs --src"):
        list_source("mnist", None)
    write_idx_folder(tmp_path / "short", gz=False, train=600, test=100)
    with pytest.raises(DataError, match=r"train split.*600 images.*expected 60,000"):
        list_source("mnist", str(tmp_path / "short"))
    bad = tmp_path / "bad-idx"
    bad.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))  # says 9 bytes, holds 2
    with pytest.raises(DataError, match="truncated"):
        read_idx(bad)
    bad.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="not an unsigned-byte IDX file"):
        read_idx(bad)
    write_idx_folder(tmp_path / "ok", gz=False)
    with pytest.raises(DataError, match="--resolution 16: expected 28.*or 32"):
        build_shards("mnist", str(tmp_path / "ok"), str(tmp_path / "out"), resolution=16, progress=False)
