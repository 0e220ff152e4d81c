"""A run directory that is either a local path or an object-storage URL (s3://bucket/prefix, any fsspec URL).

Everything is written locally first (the run directory itself, or a local mirror for a URL) and, for a URL,
uploaded file by file; small files are replaced atomically (write to a temporary name, then rename/put).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ditscale.errors import StorageError


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def staging_root() -> Path:
    """Node-local scratch space for URL run directories (DITSCALE_STAGING, else the system temp dir)."""
    return Path(os.environ.get("DITSCALE_STAGING") or Path(tempfile.gettempdir()) / "ditscale-staging")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    """`url` is where the run lives; `local` is a local directory holding (a mirror of) its files."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") if url != "/" else url
        if url.startswith("file://"):
            self.url = url[len("file://") :]
        self.remote = is_url(self.url)
        if self.remote:
            import fsspec

            try:
                self.fs, self.root = fsspec.core.url_to_fs(self.url)
            except (ImportError, ValueError) as e:
                raise StorageError(f"run.dir {self.url!r}: no filesystem for this URL ({e})") from None
            self.root = self.root.rstrip("/")
            self.local = staging_root() / hashlib.sha1(self.url.encode()).hexdigest()[:16]
        else:
            self.fs, self.root = None, str(Path(self.url))
            self.local = Path(self.url)

    def __str__(self) -> str:
        return self.url

    def _remote(self, rel: str) -> str:
        return f"{self.root}/{rel}".rstrip("/")

    def _wrap(self, what: str, rel: str, fn, *args):
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except Exception as e:  # network, credentials, permissions
            raise StorageError(f"{what} {self.url}/{rel} failed: {type(e).__name__}: {e}") from e

    # --- files -------------------------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        atomic_write_bytes(self.local / rel, data)
        if self.remote:
            self._wrap("upload to", rel, self.fs.pipe_file, self._remote(rel), data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def read_bytes(self, rel: str) -> bytes | None:
        if not self.remote:
            p = self.local / rel
            return p.read_bytes() if p.is_file() else None
        try:
            return self._wrap("read of", rel, self.fs.cat_file, self._remote(rel))
        except FileNotFoundError:
            return None

    def read_text(self, rel: str) -> str | None:
        data = self.read_bytes(rel)
        return None if data is None else data.decode()

    def exists(self, rel: str) -> bool:
        if not self.remote:
            return (self.local / rel).exists()
        self.fs.invalidate_cache(self._remote(rel))  # other processes write here: never trust a cached listing
        return bool(self._wrap("lookup of", rel, self.fs.exists, self._remote(rel)))

    def upload(self, rel: str) -> None:
        """Copy the local file `rel` to the URL (no-op for a local run directory)."""
        if self.remote and (self.local / rel).is_file():
            self._wrap("upload to", rel, self.fs.put_file, str(self.local / rel), self._remote(rel))

    # --- directories -------------------------------------------------------------------------------------------
    def listdir(self, rel: str) -> list[str]:
        if not self.remote:
            p = self.local / rel
            return sorted(x.name for x in p.iterdir()) if p.is_dir() else []
        self.fs.invalidate_cache(self._remote(rel))
        try:
            entries = self._wrap("listing of", rel, self.fs.ls, self._remote(rel), False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def upload_tree(self, local_dir: Path, rel: str, skip: tuple[str, ...] = ()) -> None:
        for f in sorted(local_dir.rglob("*")):
            if f.is_file() and f.name not in skip:
                dest = self._remote(f"{rel}/{f.relative_to(local_dir).as_posix()}")
                self._wrap("upload to", rel, self.fs.put_file, str(f), dest)

    def download_tree(self, rel: str, local_dir: Path) -> None:
        base = self._remote(rel)
        self.fs.invalidate_cache(base)
        files = self._wrap("listing of", rel, self.fs.find, base)
        if not files:
            raise FileNotFoundError(f"{self.url}/{rel}")
        for src in files:
            sub = src[len(base) :].lstrip("/")
            dest = local_dir / sub
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._wrap("download of", rel, self.fs.get_file, src, str(dest))

    def rmtree(self, rel: str) -> None:
        if not self.remote:
            shutil.rmtree(self.local / rel, ignore_errors=True)
            return
        try:
            self._wrap("delete of", rel, self.fs.rm, self._remote(rel), True)
        except FileNotFoundError:
            pass
        shutil.rmtree(self.local / rel, ignore_errors=True)
