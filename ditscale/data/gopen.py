"""webdataset's `gopen` taught to open every fsspec URL scheme (s3, gs, az, memory, ...) through ditscale.io.storage
(retries and backoff included). `python -c "import webdataset"` alone has no s3:// support.

`register_gopen()` runs on import of ditscale.data and again in each DataLoader worker (`worker_init_fn`):
spawned workers start with a fresh module.
"""

from __future__ import annotations

import importlib
import importlib.util

import fsspec

from ditscale.io import storage

_LOCAL = {"", "file", "local"}
_WDS_BUILTIN = {"pipe", "http", "https", "ais", "sftp", "ftps", "scp", "gs", "htgs", "hf"}


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    return storage.open_read(url)


def register_gopen(schemes: list[str] | None = None) -> None:
    """Register fsspec-backed openers in webdataset's gopen_schemes (s3 and every protocol webdataset does not
    know; webdataset's own http(s)/gs handlers, curl and gsutil subprocesses, are kept except gs with gcsfs)."""
    gmod = importlib.import_module("webdataset.gopen")  # `import webdataset.gopen` yields the function
    if schemes is None:
        schemes = sorted((set(fsspec.available_protocols()) - _LOCAL - _WDS_BUILTIN) | {"s3", "s3a"})
        if importlib.util.find_spec("gcsfs") is not None:
            schemes.append("gs")
    for name in schemes:
        gmod.gopen_schemes[name] = _gopen_fsspec


def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker_init_fn: re-register openers (lost in spawned workers) and drop fork-inherited fs caches."""
    try:
        fsspec.AbstractFileSystem.clear_instance_cache()
    except Exception:
        pass
    register_gopen()
