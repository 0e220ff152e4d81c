"""Checksums of what a run dir holds: every checkpoint file is listed in its meta.json with size and checksum, and
verified before it is believed.

The checksum is XXH3-128 (xxhash): it runs at memory speed (tens of GB/s per core), so hashing a DiT-XL/2-sized
checkpoint costs a small share of writing it (docs/benchmarks.md has the figure that chose it); it detects
corruption (a flipped byte, a truncated or overwritten file), not tampering by someone who can also rewrite
meta.json.
"""

from __future__ import annotations

import os
from pathlib import Path

import xxhash

from ditscale.errors import CheckpointError

ALGORITHM = "xxh3_128"
_CHUNK = 64 << 20


def digest(data: bytes | memoryview) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def entry(data: bytes | memoryview) -> dict:
    """What meta.json records of one file's bytes."""
    return {"size": len(data), ALGORITHM: digest(data)}


def file_entry(path: str | Path) -> dict:
    """The same, streamed from a file."""
    h = xxhash.xxh3_128()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, ALGORITHM: h.hexdigest()}


def check(where: str, name: str, got: dict | None, want: dict) -> None:
    """Raise CheckpointError naming the file and what differs (missing, size, checksum)."""
    if got is None:
        raise CheckpointError(f"{where}: {name} is missing (meta.json lists it: {want.get('size')} bytes)")
    if got.get("size") != want.get("size"):
        raise CheckpointError(
            f"{where}: {name} has {got.get('size')} bytes, meta.json says {want.get('size')} (truncated or replaced)"
        )
    if want.get(ALGORITHM) and got.get(ALGORITHM) != want.get(ALGORITHM):
        raise CheckpointError(
            f"{where}: {name} does not match its checksum in meta.json ({ALGORITHM} {got.get(ALGORITHM)} != "
            f"{want.get(ALGORITHM)}): its bytes changed after they were written"
        )


def check_file(where: str, path: str | Path, want: dict) -> None:
    """Verify a local file against its meta.json entry (the size first: a truncated file is not hashed)."""
    name = os.path.basename(str(path))
    try:
        size = os.path.getsize(path)
    except OSError:
        check(where, name, None, want)
        return
    if size != want.get("size"):
        check(where, name, {"size": size}, want)
    check(where, name, file_entry(path), want)
