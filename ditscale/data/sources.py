"""Readers for the study's image datasets. Each turns a source layout into an ordered list of `Record`s.

A record names where its image comes from (a picklable `ref` that a worker process opens), its source id, its
split and its class. The list order is deterministic (sorted paths / LMDB key order), and a record's position in
the list is its stable global index. Images are read lazily by `load_image(ref)`, in the converter's workers.

Sources: digits (embedded, scikit-learn), fashion-mnist and mnist (IDX files; Debian's dataset-fashion-mnist),
celeba, imagenet, lsun (LMDB exports and folders), coco, folder.
"""

from __future__ import annotations

import csv
import gzip
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
    ref: tuple  # ("file", path) | ("digits", i) | ("lmdb", db_path, key) | ("idx", images_path, i): load_image
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
_IDX_ARRAYS: dict[str, np.ndarray] = {}  # images file -> (n, 28, 28) uint8, once per process


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
    if kind == "idx":
        arr = _IDX_ARRAYS.get(ref[1])
        if arr is None:
            arr = _IDX_ARRAYS[ref[1]] = read_idx(ref[1])
        return Image.fromarray(arr[ref[2]], mode="L")
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


def pad_to(img: Image.Image, resolution: int) -> Image.Image:
    """Centre the image on a black square of side `resolution` (28x28 MNIST digits -> 32x32, as LeNet-5 took them):
    the pixels stay exactly as published, nothing is resampled."""
    w, h = img.size
    out = Image.new(img.mode, (resolution, resolution), 0)
    out.paste(img, ((resolution - w) // 2, (resolution - h) // 2))
    return out


def prepare_record(rec: Record, resolution: int, channels: int) -> Image.Image:
    """The image a shard stores for one record: IDX images are padded (IDX_RESOLUTIONS), all others go through
    `prepare` (centre crop and resize)."""
    img = load_image(rec.ref)
    if rec.ref[0] == "idx":
        return pad_to(to_channels(img, channels, source=rec.source_id), resolution)
    return prepare(img, resolution, channels, source=rec.source_id)


def check_resolution(source: str, resolution: int) -> None:
    """DataError when a source cannot be stored at `resolution` (the IDX sources keep their pixels: 28 or 32)."""
    if source in IDX_SOURCES and resolution not in IDX_RESOLUTIONS:
        raise DataError(
            f"{source} --resolution {resolution}: expected 28 (the images as published) or 32 (the 28x28 images "
            "centred on a black 32x32 square, zero padding of 2 pixels a side; nothing is resized)"
        )


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


# ------------------------------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist installs it
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IDX_RESOLUTIONS = (28, 32)
IDX_FILES = {  # split -> (images, labels) file stems, as published (t10k = the 10,000 test images)
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_COUNTS = {"train": 60_000, "test": 10_000}  # the published split sizes of both datasets


@dataclass(frozen=True)
class IdxSource:
    name: str
    default_src: str | None
    provider: str  # where the files come from, for the error when they are missing
    class_names: list[str]


IDX_SOURCES = {
    "fashion-mnist": IdxSource(
        "fashion-mnist",
        FASHION_MNIST_DIR,
        "Debian/Ubuntu package dataset-fashion-mnist (apt-get install dataset-fashion-mnist installs them in "
        f"{FASHION_MNIST_DIR}), or any copy of the four files from github.com/zalandoresearch/fashion-mnist",
        FASHION_MNIST_CLASSES,
    ),
    "mnist": IdxSource(
        "mnist",
        None,
        "any copy of MNIST's four IDX files (yann.lecun.com/exdb/mnist; no Debian package ships them); "
        "pass their folder with --src",
        [str(d) for d in range(10)],
    ),
}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzip or not) as an array: unsigned-byte data only (what MNIST and Fashion-MNIST use)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {str(path)!r}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{str(path)!r} is not an unsigned-byte IDX file (magic {data[:4].hex()!r}, expected 0000080N)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    start = 4 + 4 * ndim
    size = int(np.prod(dims)) if dims else 0
    if len(data) - start != size:
        raise DataError(
            f"IDX file {str(path)!r} is truncated or padded: its header says {dims} = {size} bytes, "
            f"found {len(data) - start}"
        )
    return np.frombuffer(data, np.uint8, size, start).reshape(dims)


def _idx_file(root: Path, stem: str) -> Path | None:
    """The file for `stem` in root: as published (train-images-idx3-ubyte), with a dot (train-images.idx3-ubyte,
    as some copies name it), each gzipped or not."""
    dotted = stem.replace("-idx", ".idx", 1)
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def list_idx(source: str, src: str | None) -> SourceListing:
    """MNIST-format datasets: the four IDX files in one folder; train and test kept as published; labels as classes.

    Record i of a split is image i of its IDX file; the counts are checked against the published 60,000 / 10,000
    and against each other (images vs labels)."""
    spec = IDX_SOURCES[source]
    folder = src or spec.default_src
    if folder is None:
        raise DataError(f"source {source!r} needs --src DIR: the folder with its IDX files ({spec.provider})")
    root = Path(folder)
    found = {split: [_idx_file(root, stem) for stem in stems] for split, stems in IDX_FILES.items()}
    missing = [s for split, stems in IDX_FILES.items() for s, p in zip(stems, found[split], strict=True) if p is None]
    if missing:
        where = "is not a directory" if not root.is_dir() else f"lacks {', '.join(f + '[.gz]' for f in missing)}"
        raise DataError(f"{source}: {str(root)!r} {where}. The files come from the {spec.provider}")
    records: list[Record] = []
    for split, (images_path, labels_path) in found.items():
        labels = read_idx(labels_path)
        with (gzip.open if images_path.suffix == ".gz" else open)(images_path, "rb") as f:
            header = f.read(16)  # the header only: the pixels are read by load_image, in the converter's workers
        n_images = int.from_bytes(header[4:8], "big") if len(header) == 16 and header[3] == 3 else -1
        if labels.ndim != 1 or n_images != len(labels) or len(labels) != IDX_COUNTS[split]:
            raise DataError(
                f"{source} {split} split in {str(root)!r}: {n_images} images ({images_path.name}) and "
                f"{len(labels)} labels ({labels_path.name}); expected {IDX_COUNTS[split]:,} of each, as published"
            )
        if int(labels.max()) >= len(spec.class_names):
            raise DataError(f"{source}: label {int(labels.max())} in {str(labels_path)!r} is not one of 0..9")
        records += [
            Record(("idx", str(images_path), i), f"{split}/{i}", split, int(label)) for i, label in enumerate(labels)
        ]
    return SourceListing(source, records, list(spec.class_names))


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


SOURCES = ("celeba", "imagenet", "lsun", "coco", "folder", "digits", "fashion-mnist", "mnist")


def list_source(source: str, src: str | None, class_folders: bool = False) -> SourceListing:
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r}: expected one of {', '.join(SOURCES)}")
    if source == "digits":
        return list_digits(src)
    if source in IDX_SOURCES:
        return list_idx(source, src)
    if not src:
        raise DataError(f"source {source!r} needs --src PATH (the dataset folder)")
    if source == "folder":
        return list_folder(src, class_folders)
    return {"celeba": list_celeba, "imagenet": list_imagenet, "lsun": list_lsun, "coco": list_coco}[source](src)
