"""Waiting for something a test started (a Slurm job, a Ray driver, a file): poll until it holds, bounded
generously for a loaded machine (a bound, never a target)."""

from __future__ import annotations

import time


def wait_for(what, check, timeout, watch=None, interval=0.5):
    """check()'s first truthy value, polled every `interval` s for up to `timeout` s; else an AssertionError naming
    `what`. `watch`: a process that must stay alive meanwhile (fail as soon as it ends), or a test cluster whose
    logs (`watch.logs()`) explain a time-out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        if hasattr(watch, "poll") and watch.poll() is not None:
            raise AssertionError(f"the launcher ended (rc {watch.returncode}) while waiting for {what}")
        time.sleep(interval)
    logs = f"\n{watch.logs()}" if hasattr(watch, "logs") else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{logs}")
