"""Converters on tiny generated layouts: digits, celeba, imagenet (train/val), lsun (lmdb + folders), coco, folder."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditscale.data import build_shards, iter_dataset, read_manifest
from ditscale.data.sources import center_crop_arr
from ditscale.errors import DataError
from tests.needs import import_or_fail


def write_image(path: Path, seed: int, size=(40, 30), fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


def shard_bytes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.tar"))}


def test_digits_default_dataset(tmp_path):
    m = build_shards("digits", None, str(tmp_path / "d"), resolution=8, progress=False)
    assert m["num_samples"] == 1500 and m["split"] == "train" and m["num_classes"] == 10 and m["channels"] == 3
    test = read_manifest(str(tmp_path / "d" / "test"))
    assert test["num_samples"] == 297 and test["split"] == "test"
    assert m["splits"] == {"train": "manifest.json", "test": "test/manifest.json"}
    for s in m["shards"]:  # manifest counts, bytes and sha256 match the files
        data = (tmp_path / "d" / s["path"]).read_bytes()
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
    items = list(iter_dataset(str(tmp_path / "d")))
    assert len(items) == 1500
    idx = [i for _, _, i in items]
    assert idx == sorted(idx)
    assert not set(idx) & {i for _, _, i in iter_dataset(str(tmp_path / "d" / "test"))}
    x, y, _ = items[0]
    assert x.shape == (3, 8, 8) and x.dtype.is_floating_point and -1 <= float(x.min()) <= float(x.max()) <= 1
    assert 0 <= y < 10


def test_digits_one_channel_and_upscaled(tmp_path):
    m = build_shards("digits", None, str(tmp_path / "d"), resolution=16, channels=1, progress=False)
    assert m["channels"] == 1 and m["resolution"] == 16
    x, _, _ = next(iter_dataset(str(tmp_path / "d")))
    assert x.shape == (1, 16, 16)


def test_deterministic_bytes_parallel_and_resume(tmp_path):
    a = build_shards("digits", None, str(tmp_path / "a"), resolution=8, workers=1, progress=False)
    b = build_shards("digits", None, str(tmp_path / "b"), resolution=8, workers=2, progress=False)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert a["shards"] == b["shards"]
    # interrupted build: one shard (and its sidecar) missing -> only that shard is rebuilt, same bytes
    victim = a["shards"][3]["path"]
    os.remove(tmp_path / "a" / victim)
    os.remove(tmp_path / "a" / "_parts" / (victim + ".json"))
    before = shard_bytes(tmp_path / "b")
    again = build_shards("digits", None, str(tmp_path / "a"), resolution=8, progress=False)
    assert again["summary"]["shards_built"] == 1 and again["summary"]["shards_reused"] == 12
    assert shard_bytes(tmp_path / "a") == before
    # changed options do not reuse shards built with other options
    c = build_shards("digits", None, str(tmp_path / "a"), resolution=16, progress=False)
    assert c["summary"]["shards_reused"] == 0 and c["resolution"] == 16


def test_center_crop_matches_adm():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    out = center_crop_arr(img, 64)
    assert out.size == (64, 64)


def test_celeba_partition(tmp_path):
    root = tmp_path / "celeba"
    names = [f"{i:06d}.jpg" for i in range(1, 8)]
    for i, n in enumerate(names):
        write_image(root / "img_align_celeba" / n, i, (44, 54))
    parts = ["0", "0", "0", "1", "2", "2", "0"]
    (root / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, parts, strict=True)))
    m = build_shards("celeba", str(root), str(tmp_path / "out"), resolution=16, progress=False)
    assert m["num_samples"] == 4 and m["num_classes"] == 1
    assert read_manifest(str(tmp_path / "out" / "val"))["num_samples"] == 1
    assert read_manifest(str(tmp_path / "out" / "test"))["num_samples"] == 2
    assert set(m["splits"]) == {"train", "val", "test"}


def test_celeba_without_partition_file(tmp_path):
    write_image(tmp_path / "c" / "img_align_celeba" / "000001.jpg", 0)
    with pytest.raises(DataError, match="list_eval_partition.txt"):
        build_shards("celeba", str(tmp_path / "c"), str(tmp_path / "out"), resolution=16, progress=False)


def _imagenet_train(root: Path) -> None:
    for c, syn in enumerate(["n01440764", "n01443537", "n01484850"]):
        for i in range(3):
            write_image(root / "train" / syn / f"{syn}_{i}.JPEG", c * 10 + i, (50, 40), fmt="JPEG")


@pytest.mark.parametrize("val_layout", ["folders", "loc_csv", "devkit"])
def test_imagenet_layouts(tmp_path, val_layout):
    root = tmp_path / "imagenet"
    _imagenet_train(root)
    syns = ["n01440764", "n01443537", "n01484850"]
    labels = [2, 0, 1, 2]
    for i, c in enumerate(labels):
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        if val_layout == "folders":
            write_image(root / "val" / syns[c] / name, 100 + i, fmt="JPEG")
        else:
            write_image(root / "val" / name, 100 + i, fmt="JPEG")
    if val_layout == "loc_csv":
        rows = "".join(f"ILSVRC2012_val_{i + 1:08d},{syns[c]} 1 2 3 4\n" for i, c in enumerate(labels))
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + rows)
    if val_layout == "devkit":
        from scipy.io import savemat

        data = root / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        ids = [3, 1, 2]  # ILSVRC2012_ID of each synset (devkit order is not the sorted-synset order)
        rec = np.array([(ids[k], syns[k]) for k in range(3)], dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
        savemat(str(data / "meta.mat"), {"synsets": rec})
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[c]}\n" for c in labels))
    m = build_shards("imagenet", str(root), str(tmp_path / "out"), resolution=16, progress=False)
    assert m["num_samples"] == 9 and m["num_classes"] == 3 and m["class_names"] == syns
    val = list(iter_dataset(str(tmp_path / "out" / "val")))
    assert [y for _, y, _ in val] == ([2, 0, 1, 2] if val_layout != "folders" else [0, 1, 2, 2])
    train_labels = sorted(y for _, y, _ in iter_dataset(str(tmp_path / "out")))
    assert train_labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_lsun_lmdb_and_folder(tmp_path):
    import io

    lmdb = import_or_fail("lmdb", "lsun")
    for k, cat in enumerate(["bedroom_train_lmdb", "church_outdoor_train_lmdb"]):
        (tmp_path / "lsun" / cat).mkdir(parents=True)
        env = lmdb.open(str(tmp_path / "lsun" / cat), map_size=1 << 24)
        with env.begin(write=True) as txn:
            for i in range(3):
                buf = io.BytesIO()
                arr = np.random.default_rng(k * 10 + i).integers(0, 256, (30, 40, 3), dtype=np.uint8)
                Image.fromarray(arr).save(buf, format="WEBP")
                txn.put(f"{k}{i:039x}".encode(), buf.getvalue())
            txn.put(b"zz-corrupt", b"not an image")
        env.close()
    m = build_shards("lsun", str(tmp_path / "lsun"), str(tmp_path / "out"), resolution=16, progress=False)
    assert m["num_samples"] == 6 and m["class_names"] == ["bedroom", "church_outdoor"]
    assert sorted(y for _, y, _ in iter_dataset(str(tmp_path / "out"))) == [0, 0, 0, 1, 1, 1]
    assert len(m["summary"]["skipped"]) == 2 and all("zz-corrupt" in s["source_id"] for s in m["summary"]["skipped"])
    one = build_shards(
        "lsun", str(tmp_path / "lsun" / "bedroom_train_lmdb"), str(tmp_path / "one"), resolution=8, progress=False
    )
    assert one["num_samples"] == 3
    # folder export: category folders of images
    for i in range(2):
        write_image(tmp_path / "lsunf" / "tower" / f"{i}.webp", i, fmt="WEBP")
    f = build_shards("lsun", str(tmp_path / "lsunf"), str(tmp_path / "outf"), resolution=8, progress=False)
    assert f["num_samples"] == 2 and f["class_names"] == ["tower"]


def test_coco_folders(tmp_path):
    for i in range(3):
        write_image(tmp_path / "coco" / "train2017" / f"{i:012d}.jpg", i, fmt="JPEG")
    write_image(tmp_path / "coco" / "val2017" / "000000000100.jpg", 9, fmt="JPEG")
    m = build_shards(
        "coco", str(tmp_path / "coco"), str(tmp_path / "out"), resolution=16, image_format="jpg", progress=False
    )
    assert m["num_samples"] == 3 and m["image_key"] == "jpg"
    assert read_manifest(str(tmp_path / "out" / "val"))["num_samples"] == 1
    x, _, _ = next(iter_dataset(str(tmp_path / "out")))
    assert x.shape == (3, 16, 16)


def test_folder_skips_and_reports_bad_files(tmp_path, capsys):
    root = tmp_path / "imgs"
    write_image(root / "cats" / "a.png", 1)
    write_image(root / "cats" / "deep" / "b.png", 2)
    write_image(root / "dogs" / "c.jpg", 3, fmt="JPEG")
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "dogs" / "notes.txt").write_text("hello")
    unreadable = root / "dogs" / "locked.png"
    write_image(unreadable, 4)
    os.chmod(unreadable, 0)
    m = build_shards("folder", str(root), str(tmp_path / "out"), resolution=8, progress=False)
    skipped = {Path(s["source_id"]).name: s["reason"] for s in m["summary"]["skipped"]}
    assert "notes.txt" in skipped and "broken.jpg" in skipped
    if os.geteuid() == 0:  # root reads mode-0 files anyway
        assert m["num_samples"] == 4
    else:
        assert m["num_samples"] == 3 and "locked.png" in skipped
    assert m["skipped_count"] >= 1 and m["source_skipped_count"] == 1
    cls = build_shards("folder", str(root), str(tmp_path / "out2"), resolution=8, class_folders=True, progress=False)
    assert cls["class_names"] == ["cats", "dogs"]
    assert sorted(y for _, y, _ in iter_dataset(str(tmp_path / "out2")))[:2] == [0, 0]
    # the command-line summary reports them too
    from ditscale.cli import main

    assert (
        main(
            [
                "data",
                "build",
                "folder",
                "--src",
                str(root),
                "--out",
                str(tmp_path / "o3"),
                "--resolution",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "skipped source files: " in out and "broken.jpg" in out and "notes.txt" in out


def test_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="unknown source"):
        build_shards("cifar10", None, str(tmp_path), resolution=8)
    with pytest.raises(DataError, match="--src"):
        build_shards("celeba", None, str(tmp_path), resolution=8)
    with pytest.raises(DataError, match="directory"):
        build_shards("folder", str(tmp_path / "nope"), str(tmp_path / "o"), resolution=8)


def test_manifest_schema(tmp_path):
    build_shards("digits", None, str(tmp_path / "d"), resolution=8, progress=False)
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    for key in ("shards", "resolution", "channels", "num_classes", "source", "split", "num_samples", "kind"):
        assert key in m
    assert m["kind"] == "pixels" and m["source"] == "digits"
    assert set(m["shards"][0]) >= {"path", "samples", "bytes", "sha256"}
    assert sum(s["samples"] for s in m["shards"]) == m["num_samples"]


def test_shards_read_by_plain_webdataset(tmp_path):
    import webdataset as wds

    m = build_shards("digits", None, str(tmp_path / "d"), resolution=8, progress=False)
    urls = [str(tmp_path / "d" / s["path"]) for s in m["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple("png", "cls", "json")
    items = list(ds)
    assert len(items) == 1500
    img, cls, meta = items[0]
    assert img.size == (8, 8) and meta["class"] == cls and meta["split"] == "train" and meta["index"] == 0
