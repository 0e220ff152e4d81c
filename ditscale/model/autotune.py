"""Pick one of several equivalent implementations by timing them once, instead of by constants fitted to one machine.

A choice is keyed by the problem (for the halo kernel: grid, window, heads, head dim, dtype), the device's name, the
torch version and the CPU thread count. It is measured once per process and kept in memory, and on disk in
`<project cache>/autotune.json` so that later processes on the machine (every rank of a job, a resumed run) reuse it
without timing again. The disk cache is locked while a choice is measured and written (ranks on one node wait for
the first one instead of timing on cores they share) and replaced atomically (a rename), so concurrent writers
never leave a torn file.

Timings taken while other processes oversubscribe the CPU say little about a quiet machine: such a choice is used
by the process that measured it but not written to disk, so that a later process measures again.

Environment: DITSCALE_AUTOTUNE_CACHE=PATH moves the disk cache, `off` disables it (per-process only).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import torch

from ditscale.cache import project_cache
from ditscale.errors import StorageError
from ditscale.io import storage

ROUNDS = 3  # timed rounds after one warm-up round; the fastest round of each candidate counts
TIE = 0.05  # candidates within 5% of the fastest are a tie, broken by the cost model (then the smaller value)
DROP = 3.0  # after the first timed round, candidates slower than 3x the fastest are not timed again
LOADED = 1.5  # a CPU choice measured while the load average exceeds 1.5 x the cores is not written to disk

_CHOICES: dict[str, int] = {}  # this process's choices
_REFRESH = False  # measure again, ignoring (and then replacing) what the disk cache holds
_TIMINGS: dict[str, dict[int, float]] = {}  # ms per candidate, for the ones measured or read from disk


def cache_path() -> Path | None:
    env = os.environ.get("DITSCALE_AUTOTUNE_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)

    return project_cache() / "autotune.json"


@lru_cache(maxsize=8)
def device_name(device: torch.device) -> str:
    """A name for the kind of device (GPU model, or CPU model and thread count) that the timings hold for."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} sm{major}{minor}"
    name = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    import platform

    return f"{name or platform.processor() or platform.machine()} x{os.cpu_count()}"


def make_key(op: str, device: torch.device, **problem) -> str:
    threads = f"|threads={torch.get_num_threads()}" if device.type == "cpu" else ""
    fields = "|".join(f"{k}={v}" for k, v in problem.items())
    return f"{op}|{fields}|{device_name(device)}{threads}|torch={torch.__version__}"


def timings(key: str) -> dict[int, float] | None:
    """The measured times (ms) behind a choice, if this process measured it or read it from disk."""
    return _TIMINGS.get(key)


def forget(refresh: bool = False) -> None:
    """Drop this process's choices (tests, benchmarks); with refresh, also measure again what the disk holds."""
    global _REFRESH
    _CHOICES.clear()
    _TIMINGS.clear()
    _REFRESH = refresh


def choose(
    key: str,
    candidates: Sequence[int],
    make_run: Callable[[int], Callable[[], None]],
    prior: Callable[[int], float],
    device: torch.device,
    note: dict | None = None,
) -> int:
    """The fastest candidate for `key`: from memory, else from the disk cache, else timed now (and stored, with
    `note`: how it was measured)."""
    if key in _CHOICES:
        return _CHOICES[key]
    path = cache_path()
    with _locked(path):
        entry = None if _REFRESH else _read(path).get(key)
        if entry is not None and entry.get("choice") in candidates:
            choice = int(entry["choice"])
            _TIMINGS[key] = {int(c): float(ms) for c, ms in entry.get("ms", {}).items()}
        else:
            load = _cpu_load() if device.type == "cpu" else None
            ms = measure(candidates, make_run, device, prior)
            choice = pick(ms, prior)
            _TIMINGS[key] = ms
            if load is None or load <= LOADED * (os.cpu_count() or 1):  # an oversubscribed CPU: this process only
                entry = {"choice": choice, "ms": {str(c): round(t, 4) for c, t in ms.items()}, **(note or {})}
                _write(path, key, entry if load is None else {**entry, "load": round(load, 2)})
    _CHOICES[key] = choice
    return choice


def pick(ms: dict[int, float], prior: Callable[[int], float]) -> int:
    """The fastest; among candidates within TIE of it, the one the cost model prefers (deterministic on ties)."""
    best = min(ms.values())
    tied = [c for c, t in ms.items() if t <= best * (1 + TIE)]
    return min(tied, key=lambda c: (prior(c), c))


def measure(
    candidates: Sequence[int],
    make_run: Callable[[int], Callable[[], None]],
    device: torch.device,
    prior: Callable[[int], float] | None = None,
) -> dict[int, float]:
    """Milliseconds per candidate (CPU time of all threads on a CPU): one warm-up round, then ROUNDS interleaved
    rounds (so that load from other processes hits every candidate alike); the fastest round counts. Runs with
    autocast off, gradients on, outside inference mode, whatever the caller's context."""
    order = sorted(candidates, key=lambda c: (prior(c), c)) if prior else list(candidates)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    # CPU: the process's CPU time (all threads), which other processes on shared cores hardly disturb, unlike the
    # wall clock; a GPU: the wall clock between synchronisations.
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    best: dict[int, float] = {}
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        runs = {c: make_run(c) for c in order}
        for c in order:
            runs[c]()
        live = list(order)
        for rnd in range(ROUNDS):
            for c in live:
                sync(device)
                t0 = clock()
                runs[c]()
                sync(device)
                best[c] = min(best.get(c, float("inf")), (clock() - t0) * 1e3)
            if rnd == 0:
                fastest = min(best[c] for c in live)
                live = [c for c in live if best[c] <= DROP * fastest]
    return best


@contextlib.contextmanager
def _locked(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(f"{path}.lock", "a")
    except (ImportError, OSError):  # no flock (Windows) or a read-only cache: measure without the lock
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cpu_load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _read(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
        return data.get("entries", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):  # missing or unreadable: measure again
        return {}


def _write(path: Path | None, key: str, entry: dict) -> None:
    if path is None:
        return
    entries = _read(path)
    entries[key] = entry
    # atomic (readers see the old file or the new one); a read-only cache keeps the choice in memory only
    with contextlib.suppress(OSError, StorageError):
        storage.write_text(str(path), json.dumps({"version": 1, "entries": entries}, indent=1, sort_keys=True))
