"""A lease on a run dir: one writer at a time, on local disk and on object storage alike.

The holder writes `lock.json` (host, pid, since, heartbeat, lease) and rewrites it every lease/4 seconds from a
daemon thread. Another trainer that finds a live lock refuses to start and names the holder. A lock whose
heartbeat is older than its lease belongs to a dead writer and is taken over (logged); on the same host a holder
whose process no longer exists is dead at once. Object stores have no create-if-absent, so every acquisition
writes, waits a settle time and reads back: of two racing starters only the last writer keeps the lock, and the
other refuses. A holder whose lock was taken over (it was paused for longer than its lease) learns it at its
next heartbeat: `lost` is set and the trainer stops without writing anything more.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from ditscale.errors import RunLockedError, StorageError
from ditscale.io import storage

log = logging.getLogger(__name__)

SETTLE_S = 1.0  # between writing the lock and reading it back (racing writers on object storage)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (signal 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a run dir's lock, as read from lock.json."""

    id: str
    host: str
    pid: int
    since: float
    heartbeat: float
    lease_s: float
    boot: str = ""

    @classmethod
    def parse(cls, raw: bytes | None) -> Holder | None:
        if not raw:
            return None
        try:
            d = json.loads(raw)
            return cls(
                str(d["id"]),
                str(d["host"]),
                int(d["pid"]),
                float(d["since"]),
                float(d["heartbeat"]),
                float(d["lease_s"]),
                str(d.get("boot", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None  # junk: nobody holds it

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=1).encode()

    @property
    def age(self) -> float:
        """Seconds since the last heartbeat (by this machine's clock)."""
        return max(0.0, time.time() - self.heartbeat)

    def alive(self) -> bool:
        """Live: a fresh heartbeat, and (on this host) a running process."""
        if self.host == socket.gethostname() and self.boot == _boot_id() and not pid_alive(self.pid):
            return False
        return self.age < self.lease_s

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on {self.host}, since {since}, last heartbeat {self.age:.0f} s ago"


class Lease:
    """The lock of one run dir (`url` is its lock.json). acquire() -> heartbeats -> release()."""

    def __init__(self, url: str, lease_s: float = 120.0, what: str = "run dir"):
        self.url, self.lease_s, self.what = url, float(lease_s), what
        now = time.time()
        self.me = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now, self.lease_s, _boot_id())
        self.held = False
        self.lost = False
        self.took_over: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> Holder | None:
        return Holder.parse(storage.read_bytes_or_none(self.url))

    def _beat(self) -> bytes:
        self.me = Holder(**{**self.me.__dict__, "heartbeat": time.time()})
        return self.me.to_json()

    def acquire(self) -> Lease:
        """Take the lock or raise RunLockedError naming the live holder."""
        run = storage.dirname(self.url)
        cur = self.holder()
        if cur is None and storage.create_exclusive(self.url, self._beat()):
            exact = storage.is_local(self.url)
        else:
            cur = cur or self.holder()
            if cur is not None and cur.alive():
                raise RunLockedError(f"{self.what} {run} is held by a live trainer: {cur.describe()}")
            if cur is not None:
                log.warning("%s %s: taking over the lock of a dead trainer (%s)", self.what, run, cur.describe())
                self.took_over = cur
            storage.write_bytes(self.url, self._beat())
            exact = False
        if not exact:  # another starter may have written at the same time: the last writer wins
            time.sleep(SETTLE_S)
            now = self.holder()
            if now is None or now.id != self.me.id:
                who = now.describe() if now else "unknown"
                raise RunLockedError(f"{self.what} {run} was taken by another trainer while starting: {who}")
        self.held = True
        self._thread = threading.Thread(target=self._heartbeat, name="ditscale-lease", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        period = max(0.5, self.lease_s / 4)
        while not self._stop.wait(period):
            try:
                cur = self.holder()
                if cur is None or cur.id != self.me.id:
                    self.lost = True
                    who = cur.describe() if cur else "the lock file is gone"
                    log.error("%s %s: lost the lock to another trainer (%s)", self.what, self.url, who)
                    return
                storage.write_bytes(self.url, self._beat(), budget=self.lease_s / 2)
            except StorageError as e:  # a store outage: keep trying; the lease covers a short one
                log.warning("%s %s: heartbeat failed: %s", self.what, self.url, e)

    def release(self) -> None:
        """Stop heartbeating and delete the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if not self.held:
            return
        self.held = False
        try:
            cur = self.holder()
            if cur is not None and cur.id == self.me.id:
                storage.remove(self.url)
        except StorageError as e:
            log.warning("%s %s: could not release the lock: %s", self.what, self.url, e)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
