"""Data: WebDataset shards of image datasets on any fsspec URL, study subsets, and the resumable train stream.

build_shards(source, src, out, resolution, ...)  -> manifest (OUT/manifest.json)
make_subset(manifest_url, size, out, seed=0, pair=False, ...) -> subset manifests
read_manifest(url) -> dict
missing_shards(manifest) -> URLs of shards that do not exist
make_loader(manifest_url, *, batch_size, rank, world_size, seed, num_workers, ...) -> TrainStream
iter_dataset(manifest_url) -> (image, label, index) once each, in index order
"""

from ditscale.data.convert import build_shards
from ditscale.data.gopen import register_gopen
from ditscale.data.stream import TrainStream, iter_dataset, make_loader, missing_shards, read_manifest
from ditscale.data.subset import make_subset

register_gopen()

__all__ = [
    "TrainStream",
    "build_shards",
    "iter_dataset",
    "make_loader",
    "make_subset",
    "missing_shards",
    "read_manifest",
    "register_gopen",
]
