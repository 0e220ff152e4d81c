"""The one module that touches URLs: local paths and any fsspec URL (s3://, gs://, memory://, ...).

Everything that reads or writes a run dir or a shard goes through here, so there is one place for
- retries: remote reads and writes (uploads included) retry with exponential backoff for up to a time budget
  (DITSCALE_STORAGE_RETRY_SECONDS, default 120 s: a store outage shorter than that is survived), then raise a
  StorageError naming the URL and the last error;
- atomic writes: locally a temporary file in the same directory, fsync, rename, fsync of the directory; remotely
  one PUT (an object store makes an object visible only when its upload is complete);
- errors that name the path and the OS error ("No space left on device", "Permission denied"), never retried;
  missing or rejected credentials, access denied and a bucket that does not exist fail at the first attempt too,
  naming the AWS_* variables to check (only transient errors are retried).

Credentials and endpoints come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for s3://), never
from config files, and are never logged.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import fsspec

from ditscale.errors import StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

_LOCAL = {"", "file", "local"}
# OS errors that no retry can fix: reported at once with the path.
_FATAL_ERRNO = {errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG}


def retry_budget() -> float:
    """Seconds a remote operation keeps retrying (read at each call, so tests and users can change it)."""
    return float(os.environ.get("DITSCALE_STORAGE_RETRY_SECONDS", "120"))


def _backoff() -> float:
    return float(os.environ.get("DITSCALE_STORAGE_BACKOFF", "0.5"))


# ------------------------------------------------------------------------------------------------- URLs
def scheme(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else ""


def is_local(url: str) -> bool:
    return scheme(url) in _LOCAL


def is_url(url: str) -> bool:
    """True for object-storage and other fsspec URLs; False for local paths and file:// URLs."""
    return not is_local(url)


def local_path(url: str) -> str:
    return url.split("://", 1)[1] if "://" in url and is_local(url) else url


def normalize(url: str) -> str:
    """file:// stripped, no trailing slash (except a bare root)."""
    url = local_path(url) if is_local(url) else url
    return url.rstrip("/") or url


def join(base: str, *parts: str) -> str:
    """Join a directory URL and relative parts ("../x" allowed); absolute URLs or paths in parts win."""
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
    if "://" in url and not is_local(url):
        sch, rest = url.split("://", 1)
        return f"{sch}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(os.path.abspath(local_path(url)))


def basename(url: str) -> str:
    return posixpath.basename(url.rstrip("/")) if is_url(url) else os.path.basename(local_path(url).rstrip("/"))


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise StorageError(f"{url}: no filesystem for this URL ({e})") from None


# ------------------------------------------------------------------------------------------------- errors
# Errors that no retry can fix: the credentials, the permission or the bucket is wrong. botocore's exceptions are
# recognised by name (s3fs wraps some of them in PermissionError / FileNotFoundError, keeping the cause).
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_FATAL_CODES = {
    "AccessDenied": "access denied",
    "AllAccessDisabled": "access denied",
    "InvalidAccessKeyId": "the access key is not known to the store",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is not valid",
    "NoSuchBucket": "no such bucket",
}
_CREDENTIAL_HINT = (
    "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / AWS_SHARED_CREDENTIALS_FILE), "
    "AWS_SESSION_TOKEN for temporary keys, and AWS_ENDPOINT_URL for a store other than AWS"
)


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError (or of the one s3fs translated into an OSError), else None."""
    for e in (exc, exc.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return (response.get("Error") or {}).get("Code")
    return None


def _credentials_problem(exc: BaseException) -> str | None:
    """What is wrong with the store's credentials, bucket or permissions (None: something else)."""
    names = {type(e).__name__ for e in (exc, exc.__cause__) if e is not None}
    if names & _CREDENTIAL_ERRORS:
        return "no credentials were found"
    return _FATAL_CODES.get(_error_code(exc) or "")


def _fatal(exc: BaseException) -> bool:
    if _credentials_problem(exc):
        return True
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return True
    if isinstance(exc, (ValueError, TypeError, KeyError, StorageError)):
        return True
    return isinstance(exc, OSError) and exc.errno in _FATAL_ERRNO


def describe(exc: BaseException) -> str:
    """'No space left on device' for an OSError with an errno; credentials, permission and bucket problems with the
    variables to check; else 'Type: message'."""
    problem = _credentials_problem(exc)
    if problem == "no such bucket":
        return f"no such bucket ({exc}): check the URL's bucket name, and AWS_ENDPOINT_URL for a store other than AWS"
    if problem:
        return f"{problem} ({type(exc).__name__}: {exc}): {_CREDENTIAL_HINT}"
    if isinstance(exc, OSError) and exc.errno:
        return exc.strerror or os.strerror(exc.errno)
    return f"{type(exc).__name__}: {exc}"


def with_retries(fn: Callable[[], T], url: str, what: str = "read", budget: float | None = None) -> T:
    """Call fn(); on transient errors retry with exponential backoff until `budget` seconds have passed.

    FileNotFoundError passes through unchanged (callers decide what a missing file means); other fatal errors and
    an exhausted budget raise StorageError naming the URL and the error.
    """
    budget = retry_budget() if budget is None else budget
    delay, start, attempt = _backoff(), time.monotonic(), 0
    while True:
        attempt += 1
        try:
            return fn()
        except FileNotFoundError as e:
            if _error_code(e) == "NoSuchBucket":  # not a missing file: nothing under this URL can be read
                raise StorageError(f"cannot {what} {url}: {describe(e)}") from e
            raise
        except Exception as e:
            if _fatal(e):
                raise StorageError(f"cannot {what} {url}: {describe(e)}") from e
            waited = time.monotonic() - start
            if waited + delay > budget:
                raise StorageError(
                    f"cannot {what} {url} after {attempt} attempt(s) over {waited:.0f} s: {describe(e)}"
                ) from e
            log.warning("%s %s failed (%s); retry %d in %.1fs", what, url, describe(e), attempt, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _local(fn: Callable[[], T], url: str, what: str) -> T:
    """Local I/O: no retries (a full disk stays full); OS errors become StorageError naming the path."""
    try:
        return fn()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise StorageError(f"cannot {what} {url}: {describe(e)}") from e


# ------------------------------------------------------------------------------------------------- reads
def read_bytes(url: str, budget: float | None = None) -> bytes:
    """The whole file. FileNotFoundError when it does not exist."""
    if is_local(url):
        path = local_path(url)

        def go_local() -> bytes:
            with open(path, "rb") as f:
                return f.read()

        return _local(go_local, url, "read")

    def go() -> bytes:
        fs, path = filesystem(url)
        return fs.cat_file(path)

    return with_retries(go, url, "read", budget)


def read_bytes_or_none(url: str) -> bytes | None:
    try:
        return read_bytes(url)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def read_text(url: str) -> str | None:
    """UTF-8 text, None when missing. Undecodable bytes are replaced, never raised."""
    data = read_bytes_or_none(url)
    return None if data is None else data.decode("utf-8", errors="replace")


def open_read(url: str):
    """A binary file object for streaming reads (shards), opened with retries."""
    if is_local(url):
        return _local(lambda: open(local_path(url), "rb"), url, "open")
    return with_retries(lambda: fsspec.open(url, "rb").open(), url, "open")


def exists(url: str) -> bool:
    if is_local(url):
        return os.path.exists(local_path(url))

    def go() -> bool:
        fs, path = filesystem(url)
        fs.invalidate_cache(path)  # other processes write here: never trust a cached listing
        return bool(fs.exists(path))

    return with_retries(go, url, "look up")


def listdir(url: str) -> list[str]:
    """Names directly under a directory URL (sorted); [] when it does not exist."""
    if is_local(url):
        path = local_path(url)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def go() -> list[str]:
        fs, path = filesystem(url)
        fs.invalidate_cache(path)
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError as e:
            if _error_code(e) == "NoSuchBucket":
                raise
            return []
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path.rstrip("/")})

    return with_retries(go, url, "list")


def find(url: str) -> list[str]:
    """Every file below a directory URL, as paths relative to it (sorted)."""
    if is_local(url):
        root = local_path(url)
        out = []
        for d, _, files in os.walk(root):
            out += [os.path.relpath(os.path.join(d, f), root) for f in files]
        return sorted(out)

    def go() -> list[str]:
        fs, path = filesystem(url)
        fs.invalidate_cache(path)
        base = path.rstrip("/")
        return sorted(f[len(base) :].lstrip("/") for f in fs.find(base))

    return with_retries(go, url, "list")


def missing(urls: Iterable[str], workers: int = 32) -> list[str]:
    """The URLs among `urls` that do not exist, found without downloading anything.

    One listing per parent directory (a few requests for thousands of shards); names a listing does not show are
    checked again with a HEAD each (in parallel), so an eventually consistent listing cannot cause a false alarm.
    """
    urls = list(urls)
    by_dir: dict[str, list[str]] = {}
    for u in urls:
        by_dir.setdefault(dirname(u), []).append(u)
    doubtful: list[str] = []
    for d, group in by_dir.items():
        names = set(listdir(d))
        doubtful += [u for u in group if basename(u) not in names]
    if not doubtful:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(doubtful))) as pool:
        found = list(pool.map(exists, doubtful))
    return [u for u, ok in zip(doubtful, found, strict=True) if not ok]


# ------------------------------------------------------------------------------------------------- writes
def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_name(name: str) -> str:
    """The temporary name an atomic write uses beside `name` (recognised by `is_tmp_name`)."""
    return f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def is_tmp_name(name: str) -> bool:
    return name.startswith(".") and ".tmp" in name  # also the older ".name.tmp<pid>" form


def write_bytes(url: str, data: bytes, budget: float | None = None) -> None:
    """Replace the file atomically: readers see the old content or the new, never a part."""
    if is_local(url):
        path = local_path(url)

        def go_local() -> None:
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, tmp_name(os.path.basename(path)))
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            fsync_dir(parent)

        _local(go_local, url, "write")
        return

    def go() -> None:
        fs, path = filesystem(url)
        fs.pipe_file(path, data)

    with_retries(go, url, "write", budget)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode())


def create_exclusive(url: str, data: bytes) -> bool:
    """Create the file only if it does not exist; True when this call created it, False when it existed.

    Exact on local disk (O_CREAT | O_EXCL) and on S3 (a PUT with `If-None-Match: *`, which S3 and the test
    server answer with 412 for all but the first). Other fsspec stores: their own create mode where they have
    one (memory://: exact within a process), else a look-up then a PUT.
    """
    if is_local(url):
        path = local_path(url)

        def go_local() -> bool:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return True

        return _local(go_local, url, "create")

    def go() -> bool | None:
        fs, path = filesystem(url)
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except TypeError:  # a store without a create mode
            return None
        return True

    created = with_retries(go, url, "create")
    if created is not None:
        return created
    if exists(url):
        return False
    write_bytes(url, data)
    return True


def put_file(local: str, url: str, budget: float | None = None) -> None:
    """Upload (or copy) a local file to `url`, with retries; the object appears complete or not at all."""
    if is_local(url):
        write_bytes(url, read_bytes(local))
        return

    def go() -> None:
        fs, path = filesystem(url)
        fs.put_file(local, path)

    with_retries(go, url, "upload to", budget)


def put_tree(local_dir: str, url: str, skip: tuple[str, ...] = ()) -> None:
    """Upload every file below local_dir to url/<relative path> (names in `skip` are left out)."""
    for d, _, files in sorted(os.walk(local_dir)):
        for f in sorted(files):
            if f in skip:
                continue
            rel = os.path.relpath(os.path.join(d, f), local_dir).replace(os.sep, "/")
            put_file(os.path.join(d, f), join(url, rel))


def get_file(url: str, local: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    if is_local(url):
        with open(local, "wb") as f:
            f.write(read_bytes(url))
        return

    def go() -> None:
        fs, path = filesystem(url)
        fs.get_file(path, local)

    with_retries(go, url, "download", None)


def get_tree(url: str, local_dir: str) -> None:
    """Download every file below url into local_dir. FileNotFoundError when there is none."""
    files = find(url)
    if not files:
        raise FileNotFoundError(url)
    for rel in files:
        get_file(join(url, rel), os.path.join(local_dir, rel))


def remove(url: str) -> None:
    """Delete one file; a missing file is not an error."""
    if is_local(url):
        try:
            os.unlink(local_path(url))
        except FileNotFoundError:
            pass
        return

    def go() -> None:
        fs, path = filesystem(url)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    with_retries(go, url, "delete")


def rmtree(url: str) -> None:
    """Delete a directory and everything below it; a missing one is not an error."""
    if is_local(url):
        import shutil

        shutil.rmtree(local_path(url), ignore_errors=True)
        return

    def go() -> None:
        fs, path = filesystem(url)
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    with_retries(go, url, "delete")


def makedirs(url: str) -> None:
    """Create a directory (local) or, for s3://, the bucket if needed (prefixes need nothing)."""
    if is_local(url):
        _local(lambda: os.makedirs(local_path(url), exist_ok=True), url, "create directory")
        return
    fs, path = filesystem(url)
    if scheme(url) in ("s3", "s3a"):
        bucket = path.split("/", 1)[0]
        try:
            if not fs.exists(bucket):
                fs.mkdir(bucket)
        except Exception as e:
            log.debug("mkdir %s: %s", bucket, e)
    else:
        fs.makedirs(path, exist_ok=True)
