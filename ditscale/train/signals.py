"""SIGTERM / SIGUSR1 (Kubernetes eviction, Slurm preemption): checkpoint at the end of the current step, exit 0.

The handler only records the request; the training loop polls `requested()` once per step and all ranks agree
on it (an all-reduce), so a signal that reaches a single rank still stops every rank at the same step.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_requested: str | None = None
_previous: dict[int, object] = {}


def _handler(signum, frame) -> None:
    global _requested
    if _requested is None:
        _requested = signal.Signals(signum).name
        log.warning("%s received: will checkpoint at the end of this step and exit", _requested)


def install() -> None:
    global _requested
    _requested = None
    if threading.current_thread() is not threading.main_thread():  # e.g. a Ray Train worker runs us in a thread
        log.info("not in the main thread: SIGTERM/SIGUSR1 handlers not installed (the caller stops the run)")
        return
    for sig in STOP_SIGNALS:
        try:
            _previous[sig] = signal.signal(sig, _handler)
        except ValueError:  # not the main thread (e.g. a Ray Train worker): the launcher handles signals
            log.info("SIGTERM/SIGUSR1 handlers not installed: training is not running in the main thread")
            return


def uninstall() -> None:
    for sig, prev in _previous.items():
        signal.signal(sig, prev)
    _previous.clear()


def requested() -> str | None:
    return _requested
