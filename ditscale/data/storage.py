"""fsspec helpers for local paths and object storage (s3://, gs://, ...), with retries and backoff.

Credentials and endpoints come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION for s3://), never from our config files, and are never logged.

`register_gopen()` teaches webdataset's `gopen` to open every fsspec URL scheme (s3, gs, az, memory, ...): it is
called on import of ditscale.data and again in each DataLoader worker (spawned workers start with a fresh module).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import posixpath
import time
from collections.abc import Callable
from typing import TypeVar

import fsspec

from ditscale.errors import StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Tunable for tests and flaky stores: attempts and base delay (seconds) of the exponential backoff.
RETRIES = int(os.environ.get("DITSCALE_STORAGE_RETRIES", "4"))
BACKOFF = float(os.environ.get("DITSCALE_STORAGE_BACKOFF", "0.5"))

_LOCAL = {"", "file", "local"}
_WDS_BUILTIN = {"pipe", "http", "https", "ais", "sftp", "ftps", "scp", "gs", "htgs", "hf"}


def scheme(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else ""


def is_local(url: str) -> bool:
    return scheme(url) in _LOCAL


def local_path(url: str) -> str:
    return url.split("://", 1)[1] if url.startswith("file://") else url


def join(base: str, *parts: str) -> str:
    """Join a directory URL and relative parts ("../x" allowed); absolute URLs in parts win."""
    out = base
    for p in parts:
        if "://" in p or p.startswith("/"):
            out = p
            continue
        if "://" in out:
            sch, rest = out.split("://", 1)
            out = f"{sch}://{posixpath.normpath(posixpath.join(rest, p))}"
        else:
            out = os.path.normpath(os.path.join(out, p))
    return out


def dirname(url: str) -> str:
    if "://" in url:
        sch, rest = url.split("://", 1)
        return f"{sch}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(os.path.abspath(url))


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def _retryable(exc: BaseException) -> bool:
    return not isinstance(exc, (IsADirectoryError, NotADirectoryError, PermissionError, ValueError, TypeError))


def with_retries(fn: Callable[[], T], url: str, what: str = "read", retries: int | None = None) -> T:
    """Call fn(); on I/O errors retry with exponential backoff, then raise StorageError naming the URL."""
    attempts = max(1, RETRIES if retries is None else retries)
    delay = BACKOFF
    last: BaseException | None = None
    for i in range(attempts):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - fsspec backends raise many types (OSError, botocore, aiohttp)
            last = e
            if not _retryable(e) or i == attempts - 1:
                break
            log.warning(
                "%s %s failed (%s: %s); retry %d/%d in %.1fs",
                what,
                url,
                type(e).__name__,
                e,
                i + 1,
                attempts - 1,
                delay,
            )
            time.sleep(delay)
            delay *= 2
    raise StorageError(f"cannot {what} {url} after {attempts} attempt(s): {type(last).__name__}: {last}") from last


def read_bytes(url: str, retries: int | None = None) -> bytes:
    def go() -> bytes:
        if is_local(url):
            with open(local_path(url), "rb") as f:
                return f.read()
        with fsspec.open(url, "rb") as f:
            return f.read()

    return with_retries(go, url, "read", retries)


def write_bytes(url: str, data: bytes, retries: int | None = None) -> None:
    """Write atomically: a temp file + rename locally; a single PUT on object stores."""

    def go() -> None:
        if is_local(url):
            path = local_path(url)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            fs, path = filesystem(url)
            fs.pipe_file(path, data)

    with_retries(go, url, "write", retries)


def exists(url: str) -> bool:
    if is_local(url):
        return os.path.exists(local_path(url))

    def go() -> bool:
        fs, path = filesystem(url)
        fs.invalidate_cache(path)
        return fs.exists(path)

    return with_retries(go, url, "stat")


def makedirs(url: str) -> None:
    if is_local(url):
        os.makedirs(local_path(url), exist_ok=True)
        return
    fs, path = filesystem(url)
    if scheme(url) == "s3":  # create the bucket if needed (prefixes need nothing)
        bucket = path.split("/", 1)[0]
        try:
            if not fs.exists(bucket):
                fs.mkdir(bucket)
        except Exception as e:  # noqa: BLE001
            log.debug("mkdir %s: %s", bucket, e)
    else:
        fs.makedirs(path, exist_ok=True)


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    def go():
        return fsspec.open(url, mode).open()

    return with_retries(go, url, "open")


def register_gopen(schemes: list[str] | None = None) -> None:
    """Register fsspec-backed openers in webdataset's gopen_schemes (s3 and every other fsspec protocol).

    webdataset's own handlers for http(s)/gs/... (curl, gsutil subprocesses) are replaced only for s3 and for
    protocols webdataset does not know; `python -c "import webdataset"` alone has no s3:// support.
    """
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
    except Exception:  # noqa: BLE001
        pass
    register_gopen()
