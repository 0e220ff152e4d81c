"""Readers for the study's image datasets. Each turns a source layout into an ordered list of `Record`s.

A record names where its image comes from (a picklable `ref` that a worker process opens), its source id, its
split and its class. The list order is deterministic (sorted paths / LMDB key order), and a record's position in
the list is its stable global index. Images are read lazily by `load_image(ref)`, in the converter's workers.

Sources: digits (embedded, scikit-learn), celeba, imagenet, lsun (LMDB exports and folders), coco, folder.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ditscale.data.images import to_channels
from ditscale.errors import DataError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
DIGITS_TEST_SIZE = 297  # fixed held-out test split of the 1,797 digits (train 1,500)


@dataclass(frozen=True)
class Record:
    ref: tuple  # ("file", path) | ("digits", i) | ("lmdb", db_path, key) -- opened by load_image
    source_id: str
    split: str
    label: int


@dataclass
class SourceListing:
    name: str
    records: list[Record]
    class_names: list[str]
    skipped: list[dict] = field(default_factory=list)  # {"source_id", "reason"}: files not turned into records

    @property
    def num_classes(self) -> int:
        return max(1, len(self.class_names))


# ----------------------------------------------------------------------------------------------- loading images
_DIGITS: np.ndarray | None = None
_LMDB_ENVS: dict = {}


def _digits_images() -> np.ndarray:
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        _DIGITS = load_digits().images  # (1797, 8, 8) float 0..16
    return _DIGITS


def _lmdb_env(path: str):
    """One read-only environment per LMDB and process (lmdb refuses to open the same one twice)."""
    import lmdb

    env = _LMDB_ENVS.get(path)
    if env is None:
        env = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False, max_readers=64)
        _LMDB_ENVS[path] = env
    return env


def load_image(ref: tuple) -> Image.Image:
    """Open the image a record points at (raises on unreadable data; the converter skips and reports it)."""
    kind = ref[0]
    if kind == "file":
        with open(ref[1], "rb") as f:
            data = f.read()
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    if kind == "digits":
        arr = _digits_images()[ref[1]]
        return Image.fromarray(np.round(arr * (255.0 / 16.0)).astype(np.uint8), mode="L")
    if kind == "lmdb":
        with _lmdb_env(ref[1]).begin(write=False) as txn:
            data = txn.get(ref[2])
        if data is None:
            raise KeyError(f"key {ref[2]!r} not in {ref[1]}")
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    raise ValueError(f"unknown record kind {kind!r}")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM / DiT centre crop: halve with BOX while large, bicubic-resize the short side, crop the centre.

    Both resampling steps are antialiased in PIL, which is what small (32x32) targets need.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def prepare(img: Image.Image, resolution: int, channels: int, *, source: str = "image") -> Image.Image:
    """The image a shard stores: upright (EXIF), 8-bit L or RGB from any mode (16-bit scaled, alpha over white;
    ditscale.data.images), centre-cropped to resolution x resolution."""
    img = to_channels(img, channels, source=source)
    if img.size != (resolution, resolution):
        img = center_crop_arr(img, resolution)
    return img


# ------------------------------------------------------------------------------------------------------ listing
def _walk(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            out.append(Path(dirpath) / name)
    return out


def _image_files(root: Path, skipped: list[dict]) -> list[Path]:
    files = []
    for p in _walk(root):
        if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):
            files.append(p)
        else:
            skipped.append({"source_id": str(p), "reason": "not an image file"})
    return files


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what}: expected a directory at {str(path)!r}")
    return path


def list_digits(src: str | None = None) -> SourceListing:
    n = len(_digits_images())
    from sklearn.datasets import load_digits

    target = load_digits().target
    test = set(np.random.default_rng(0).permutation(n)[:DIGITS_TEST_SIZE].tolist())
    records = [Record(("digits", i), f"digits/{i}", "test" if i in test else "train", int(target[i])) for i in range(n)]
    return SourceListing("digits", records, [str(d) for d in range(10)])


def list_celeba(src: str) -> SourceListing:
    root = _need_dir(Path(src), "celeba --src")
    img_dir = root / "img_align_celeba" if (root / "img_align_celeba").is_dir() else root
    part_file = next(
        (p for p in (root / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt") if p.is_file()),
        None,
    )
    if part_file is None:
        raise DataError(f"celeba --src {src!r}: expected list_eval_partition.txt (the official split) in it")
    splits = {"0": "train", "1": "val", "2": "test"}
    records, skipped = [], []
    for line in part_file.read_text().splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        name, part = parts
        path = img_dir / name
        if not path.is_file():
            skipped.append({"source_id": name, "reason": "listed in list_eval_partition.txt but missing"})
            continue
        records.append(Record(("file", str(path)), name, splits.get(part, "train"), 0))
    records.sort(key=lambda r: r.source_id)
    return SourceListing("celeba", records, ["face"], skipped)


def _imagenet_val_labels(root: Path, val_dir: Path, synsets: list[str]) -> dict[str, str]:
    """filename -> synset for a flat val folder: LOC_val_solution.csv (Kaggle) or the ILSVRC2012 devkit."""
    for csv_path in (root / "LOC_val_solution.csv", val_dir / "LOC_val_solution.csv"):
        if csv_path.is_file():
            with open(csv_path) as f:
                return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
    for devkit in (root / "ILSVRC2012_devkit_t12", root / "devkit"):
        gt = devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
        meta = devkit / "data" / "meta.mat"
        if gt.is_file() and meta.is_file():
            from scipy.io import loadmat

            rows = loadmat(str(meta), squeeze_me=True)["synsets"]
            id_to_wnid = {int(r["ILSVRC2012_ID"]): str(r["WNID"]) for r in rows}
            ids = [int(x) for x in gt.read_text().split()]
            files = sorted(p.name for p in val_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
            return {Path(f).stem: id_to_wnid[i] for f, i in zip(files, ids, strict=False)}
    raise DataError(
        f"imagenet val folder {str(val_dir)!r} is flat: expected synset subfolders, LOC_val_solution.csv, "
        f"or ILSVRC2012_devkit_t12/data/{{meta.mat,ILSVRC2012_validation_ground_truth.txt}} under {str(root)!r}"
    )


def list_imagenet(src: str) -> SourceListing:
    root = _need_dir(Path(src), "imagenet --src")
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir() and not val_dir.is_dir():
        raise DataError(f"imagenet --src {src!r}: expected train/ (synset folders) and/or val/")
    skipped: list[dict] = []
    synsets = sorted(p.name for p in train_dir.iterdir() if p.is_dir()) if train_dir.is_dir() else []
    if not synsets and val_dir.is_dir():
        synsets = sorted(p.name for p in val_dir.iterdir() if p.is_dir())
    cls = {s: i for i, s in enumerate(synsets)}
    records: list[Record] = []
    for s in synsets if train_dir.is_dir() else []:
        for p in _image_files(train_dir / s, skipped):
            records.append(Record(("file", str(p)), f"train/{s}/{p.name}", "train", cls[s]))
    if val_dir.is_dir():
        sub = sorted(p.name for p in val_dir.iterdir() if p.is_dir())
        if sub:
            for s in sub:
                if s not in cls:
                    raise DataError(f"imagenet val synset {s!r} is not among the train synsets in {src!r}")
                for p in _image_files(val_dir / s, skipped):
                    records.append(Record(("file", str(p)), f"val/{s}/{p.name}", "val", cls[s]))
        else:
            labels = _imagenet_val_labels(root, val_dir, synsets)
            for p in _image_files(val_dir, skipped):
                wnid = labels.get(p.stem) or labels.get(p.name)
                if wnid is None or wnid not in cls:
                    skipped.append({"source_id": f"val/{p.name}", "reason": "no label for this val image"})
                    continue
                records.append(Record(("file", str(p)), f"val/{p.name}", "val", cls[wnid]))
    return SourceListing("imagenet", records, synsets, skipped)


def _lsun_category(name: str) -> tuple[str, str]:
    base = name[: -len("_lmdb")] if name.endswith("_lmdb") else name
    for split in ("train", "val", "test"):
        if base.endswith("_" + split):
            return base[: -len(split) - 1], split
    return base, "train"


def list_lsun(src: str) -> SourceListing:
    """LSUN: one official LMDB export (church_outdoor_train_lmdb/), a folder of them, or plain image folders."""
    root = _need_dir(Path(src), "lsun --src")
    if (root / "data.mdb").is_file():
        dbs = [root]
    else:
        dbs = sorted(p for p in root.iterdir() if p.is_dir() and (p / "data.mdb").is_file())
    skipped: list[dict] = []
    if not dbs:  # folder export: category folders (or one flat folder) of images
        subdirs = sorted(p for p in root.iterdir() if p.is_dir())
        cats = sorted({_lsun_category(p.name)[0] for p in subdirs}) or [root.name]
        records = []
        for d in subdirs or [root]:
            cat, split = _lsun_category(d.name) if subdirs else (root.name, "train")
            for p in _image_files(d, skipped):
                records.append(Record(("file", str(p)), f"{d.name}/{p.relative_to(d)}", split, cats.index(cat)))
        return SourceListing("lsun", records, cats, skipped)
    cats = sorted({_lsun_category(d.name)[0] for d in dbs})
    records = []
    for d in dbs:
        cat, split = _lsun_category(d.name)
        with _lmdb_env(str(d)).begin(write=False) as txn:
            keys = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
        for k in keys:
            records.append(
                Record(("lmdb", str(d), k), f"{d.name}/{k.decode('ascii', 'replace')}", split, cats.index(cat))
            )
    return SourceListing("lsun", records, cats, skipped)


def list_coco(src: str) -> SourceListing:
    root = _need_dir(Path(src), "coco --src")
    found = [
        (d, s)
        for d, s in (("train2017", "train"), ("val2017", "val"), ("train2014", "train"), ("val2014", "val"))
        if (root / d).is_dir()
    ]
    if not found:
        raise DataError(f"coco --src {src!r}: expected train2017/ and/or val2017/ image folders")
    records, skipped = [], []
    for d, split in found:
        for p in _image_files(root / d, skipped):
            records.append(Record(("file", str(p)), f"{d}/{p.name}", split, 0))
    return SourceListing("coco", records, ["image"], skipped)


def list_folder(src: str, class_folders: bool = False) -> SourceListing:
    root = _need_dir(Path(src), "folder --src")
    skipped: list[dict] = []
    if class_folders:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        records = []
        for i, c in enumerate(classes):
            for p in _image_files(root / c, skipped):
                records.append(Record(("file", str(p)), str(p.relative_to(root)), "train", i))
        return SourceListing("folder", records, classes, skipped)
    records = [Record(("file", str(p)), str(p.relative_to(root)), "train", 0) for p in _image_files(root, skipped)]
    return SourceListing("folder", records, ["image"], skipped)


SOURCES = ("celeba", "imagenet", "lsun", "coco", "folder", "digits")


def list_source(source: str, src: str | None, class_folders: bool = False) -> SourceListing:
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r}: expected one of {', '.join(SOURCES)}")
    if source == "digits":
        return list_digits(src)
    if not src:
        raise DataError(f"source {source!r} needs --src PATH (the dataset folder)")
    if source == "folder":
        return list_folder(src, class_folders)
    return {"celeba": list_celeba, "imagenet": list_imagenet, "lsun": list_lsun, "coco": list_coco}[source](src)
