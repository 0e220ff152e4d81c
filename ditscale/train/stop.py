"""When training stops early, and how every rank agrees on it.

Three things can end a run before train.steps:
- a stop request: SIGTERM / SIGUSR1 (Kubernetes eviction, Slurm preemption or time limit, `scancel`), a call to
  `request()` (a launcher whose worker cannot install signal handlers, e.g. Ray Train), or the death of the
  launcher that started this rank (`kill -9` of torchrun): checkpoint at the end of the step, then exit;
- a data error on some rank (a shard that cannot be read after retries): checkpoint, then exit with the error;
- the loss of the run dir's lock (another trainer took it over): exit at once, writing nothing more.

Once per step `StopSignal.poll()` all-reduces these three flags over a CPU (gloo) group. The flags live in host
memory, so the poll never waits for a GPU: it costs one small message per step, not a device sync.

The launcher watch: a rank re-parented to init (its launcher was killed) asks to stop, and if it has not exited
`HARD_EXIT_S` seconds later (a peer that is gone can block a collective forever) it runs the exit hooks (the lock
is released) and leaves with os._exit.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
HARD_EXIT_S = 20.0
_requested: str | None = None
_previous: dict[int, object] = {}


def request(reason: str) -> None:
    """Ask the running trainer to checkpoint at the end of its step and return (any thread may call this)."""
    global _requested
    if _requested is None:
        _requested = reason
        log.warning("%s: will checkpoint at the end of this step and exit", reason)


def requested() -> str | None:
    return _requested


def _handler(signum, frame) -> None:
    request(signal.Signals(signum).name)


def install() -> None:
    """Record stop signals instead of dying (main thread only; elsewhere the caller uses `request()`)."""
    global _requested
    _requested = None
    if threading.current_thread() is not threading.main_thread():
        log.info("not in the main thread: stop signals are the caller's to forward with ditscale.train.stop.request")
        return
    for sig in STOP_SIGNALS:
        _previous[sig] = signal.signal(sig, _handler)


def uninstall() -> None:
    for sig, prev in _previous.items():
        signal.signal(sig, prev)
    _previous.clear()


class LauncherWatch:
    """Notices when this process's parent (torchrun, the deepspeed launcher, slurmstepd) is gone."""

    def __init__(self, on_exit: Callable[[], None], poll_s: float = 1.0, hard_exit_s: float = HARD_EXIT_S):
        self.parent = os.getppid()
        self.on_exit, self.poll_s, self.hard_exit_s = on_exit, poll_s, hard_exit_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.parent <= 1:  # already an orphan (a daemon, a container's PID 1 child): nothing to watch
            return
        self._thread = threading.Thread(target=self._run, name="ditscale-launcher-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if os.getppid() != self.parent:
                break
        else:
            return
        request(f"launcher (pid {self.parent}) died")
        if self._stop.wait(self.hard_exit_s):
            return  # the trainer finished its step, checkpointed and left in time
        log.error("launcher (pid %d) died and this rank could not stop cleanly: exiting", self.parent)
        try:
            self.on_exit()
        finally:
            os._exit(1)


@dataclass(frozen=True)
class Verdict:
    stop: bool = False
    data_error: bool = False
    lock_lost: bool = False

    @property
    def any(self) -> bool:
        return self.stop or self.data_error or self.lock_lost


class StopSignal:
    """The trainer's stop part: signals, the launcher watch and the per-step agreement of all ranks."""

    def __init__(self, world_size: int, on_exit: Callable[[], None]):
        import torch.distributed as dist

        self.world_size = world_size
        self.group = None
        if world_size > 1 and dist.get_backend() != "gloo":  # NCCL: flags go over a CPU side channel
            self.group = dist.new_group(backend="gloo")
        self._flags = np.zeros(3, dtype=np.float64)
        self._tensor = torch.from_numpy(self._flags)  # shares the numpy buffer: read back without a tensor op
        self.watch = LauncherWatch(on_exit)

    def install(self) -> None:
        install()
        self.watch.start()

    def close(self) -> None:
        self.watch.stop()
        uninstall()

    def reason(self) -> str | None:
        return requested()

    def poll(self, *, data_error: bool = False, lock_lost: bool = False) -> Verdict:
        """Collective: every rank calls it once per step and gets the same verdict."""
        import torch.distributed as dist

        self._flags[:] = (requested() is not None, data_error, lock_lost)
        if self.world_size > 1:
            dist.all_reduce(self._tensor, group=self.group)
        return Verdict(bool(self._flags[0] > 0), bool(self._flags[1] > 0), bool(self._flags[2] > 0))
