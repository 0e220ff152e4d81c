"""A lease on a run dir with a fencing token: one writer at a time, on local disk and on object storage alike.

Each holder has a generation g, its fencing token. Taking the lease means creating `lock.<g>.json` beside the
lease's name (`run/lock.json` -> `run/lock.00000007.json`) with a create-exclusive write: O_CREAT|O_EXCL on local
disk, `If-None-Match: *` on S3 (moto and S3 answer 412 to the loser). So of two trainers racing for generation
g exactly one wins, on every store, without a settle time. The current holder is the highest generation.

The holder rewrites only its own file (host, pid, since, heartbeat, lease) every lease/4 seconds from a daemon
thread; each beat first lists the generations: a higher one means the lease was taken over (`lost`). Another
trainer may take over only when the current holder's heartbeat is older than its lease (or, on the same host,
its process is gone): it creates generation g+1. Release marks the file released (never deleted, so a
generation number is never reused).

Fencing: a holder may write into the run dir only while it can prove it holds the lease: `check()` passes while
nothing said `lost` and its last confirmed heartbeat (a beat that listed no higher generation, then wrote) began
less than `lease - margin` seconds ago by the monotonic clock, which keeps counting while a process is paused.
A taker waits for the holder's written heartbeat to be `lease` old, so every write that passed `check()` happened
before any takeover, as long as the hosts' clocks differ by less than the margin and a write that passed the
check lands within the margin (docs/training.md says what this guarantees on each store).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace

from ditscale.errors import LeaseLostError, RunLockedError, StorageError
from ditscale.io import storage

log = logging.getLogger(__name__)


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


def margin_for(lease_s: float) -> float:
    """How much of the lease a write keeps in hand: a quarter (30 s of the default 120 s), at least 1 s, but never
    more than half the lease."""
    return max(min(1.0, lease_s / 2), lease_s / 4)


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a run dir's lease, as read from its generation file."""

    id: str
    host: str
    pid: int
    since: float
    heartbeat: float
    lease_s: float
    boot: str = ""
    gen: int = 0
    released: bool = False

    @classmethod
    def parse(cls, raw: bytes | None, gen: int = 0) -> Holder | None:
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
                int(d.get("gen", gen)),
                bool(d.get("released", False)),
            )
        except (ValueError, KeyError, TypeError):
            return None  # junk: nobody holds it

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @property
    def age(self) -> float:
        """Seconds since the last heartbeat (by this machine's clock)."""
        return max(0.0, time.time() - self.heartbeat)

    def alive(self) -> bool:
        """Live: not released, a fresh heartbeat, and (on this host) a running process."""
        if self.released:
            return False
        if self.host == socket.gethostname() and self.boot == _boot_id() and not pid_alive(self.pid):
            return False
        return self.age < self.lease_s

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        gen = f" (lease generation {self.gen})" if self.gen else ""
        return f"pid {self.pid} on {self.host}, since {since}, last heartbeat {self.age:.0f} s ago{gen}"


class Lease:
    """The lease of one run dir. `url` names it (`<run>/lock.json`); acquire() -> heartbeats -> release().

    `gen` is the fencing token once acquired; `check(what)` raises LeaseLostError unless the holder can prove
    it still holds the lease; `lost` is set by the heartbeat when another trainer took over."""

    def __init__(self, url: str, lease_s: float = 120.0, what: str = "run dir", keep: bool = True):
        self.url, self.lease_s, self.what = url, float(lease_s), what
        self.keep = keep  # release marks the file released (a run dir's record); False removes it (a data folder)
        self.dir = storage.dirname(url)
        self.stem = storage.basename(url).removesuffix(".json")
        self.margin = margin_for(self.lease_s)
        now = time.time()
        self.me = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now, self.lease_s, _boot_id())
        self.gen = 0
        self.held = False
        self.lost = False
        self.lost_why = ""
        self.took_over: Holder | None = None
        self._confirmed = 0.0  # monotonic time at which the last confirmed beat began
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the generation files -------------------------------------------------------------------------------
    def _file(self, gen: int) -> str:
        return storage.join(self.dir, f"{self.stem}.{gen:08d}.json")

    def generations(self, names: list[str] | None = None) -> list[int]:
        """The generations that exist, lowest first (one listing of the run dir, or the `names` it holds)."""
        rx = re.compile(rf"^{re.escape(self.stem)}\.(\d{{8}})\.json$")
        names = storage.listdir(self.dir) if names is None else names
        return sorted(int(m.group(1)) for n in names if (m := rx.match(n)))

    def current(self, names: list[str] | None = None) -> Holder | None:
        """The holder of the highest generation (live or not), or None."""
        gens = self.generations(names)
        if not gens:
            return None
        return Holder.parse(storage.read_bytes_or_none(self._file(gens[-1])), gens[-1])

    def _legacy_holder(self) -> Holder | None:
        """A live holder of the single lock.json that ditscale wrote before generations (an older trainer)."""
        h = Holder.parse(storage.read_bytes_or_none(self.url))
        return h if h is not None and h.alive() else None

    # --- acquire / heartbeat / release ----------------------------------------------------------------------
    def acquire(self) -> Lease:
        """Take the lease or raise RunLockedError naming the live holder."""
        run = self.dir
        old = self._legacy_holder()
        if old is not None:
            raise RunLockedError(f"{self.what} {run} is held by a live trainer (an older ditscale): {old.describe()}")
        for _ in range(5):
            gens = self.generations()
            top = gens[-1] if gens else 0
            cur = Holder.parse(storage.read_bytes_or_none(self._file(top)), top) if top else None
            if cur is not None and cur.alive():
                raise RunLockedError(f"{self.what} {run} is held by a live trainer: {cur.describe()}")
            t0 = time.monotonic()
            me = replace(self.me, gen=top + 1, heartbeat=time.time())
            if storage.create_exclusive(self._file(top + 1), me.to_json()):
                self.me, self.gen, self._confirmed = me, top + 1, t0
                if cur is not None and not cur.released:
                    log.warning("%s %s: took over the lease of a dead trainer (%s)", self.what, run, cur.describe())
                    self.took_over = cur
                break
            # another trainer created generation top+1 first: look again (it is alive, so we refuse)
        else:
            raise RunLockedError(f"{self.what} {run}: could not take the lease (other trainers keep starting)")
        self.held = True
        self._prune()
        self._thread = threading.Thread(target=self._heartbeat, name="ditscale-lease", daemon=True)
        self._thread.start()
        return self

    def _prune(self) -> None:
        """Remove generation files older than the previous one, and a dead legacy lock.json."""
        try:
            for g in self.generations():
                if g < self.gen - 1:
                    storage.remove(self._file(g))
            if storage.exists(self.url):
                storage.remove(self.url)
        except StorageError as e:
            log.debug("pruning old lease files of %s: %s", self.dir, e)

    def beat(self) -> bool:
        """One heartbeat: list the generations (a higher one: lost), then rewrite our own file. True when the
        lease is confirmed for another lease - margin seconds."""
        t0 = time.monotonic()
        gens = self.generations()
        if gens and gens[-1] > self.gen:
            cur = Holder.parse(storage.read_bytes_or_none(self._file(gens[-1])), gens[-1])
            self._lose(f"taken over by {cur.describe() if cur else f'generation {gens[-1]}'}")
            return False
        self.me = replace(self.me, heartbeat=time.time())
        storage.write_bytes(self._file(self.gen), self.me.to_json(), budget=self.margin)
        self._confirmed = t0
        return True

    def _lose(self, why: str) -> None:
        if not self.lost:
            self.lost, self.lost_why = True, why
            log.error("%s %s: lost the lease (generation %d): %s", self.what, self.dir, self.gen, why)

    def _heartbeat(self) -> None:
        period = max(0.5, self.lease_s / 4)
        while not self._stop.wait(period):
            try:
                if not self.beat():
                    return
            except StorageError as e:  # a store outage: keep trying; the margin covers a short one
                log.warning("%s %s: heartbeat failed: %s", self.what, self.dir, e)

    # --- the fence --------------------------------------------------------------------------------------------
    def provable(self) -> bool:
        """Whether this holder can prove it holds the lease right now (see the module doc)."""
        return self.held and not self.lost and time.monotonic() - self._confirmed < self.lease_s - self.margin

    def check(self, what: str = "write") -> None:
        """Raise LeaseLostError unless the lease is provably ours: called right before every write."""
        if self.provable():
            return
        if not self.lost:
            age = time.monotonic() - self._confirmed
            self._lose(f"no confirmed heartbeat for {age:.0f} s (lease {self.lease_s:.0f} s, margin {self.margin:g} s)")
        raise LeaseLostError(
            f"{self.what} {self.dir}: refusing to {what}: this trainer (lease generation {self.gen}) can no "
            f"longer prove it holds the run: {self.lost_why}. It writes nothing more; the run belongs to the "
            "trainer that holds it now (or resume it once that one is gone)"
        )

    def release(self) -> None:
        """Stop heartbeating and mark our generation released, if it is still the current one."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if not self.held:
            return
        self.held = False
        if self.lost:
            return
        try:
            gens = self.generations()
            if gens and gens[-1] == self.gen and not self.keep:
                storage.remove(self._file(self.gen))
            elif gens and gens[-1] == self.gen:
                storage.write_bytes(self._file(self.gen), replace(self.me, released=True).to_json())
        except StorageError as e:
            log.warning("%s %s: could not release the lease: %s", self.what, self.dir, e)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def current_holder(url: str, names: list[str] | None = None) -> Holder | None:
    """The live holder of the lease named `url`, or None (what status readers ask). `names`: a listing of the
    lease's folder the caller already has (saves a request per run on object storage)."""
    names = storage.listdir(storage.dirname(url)) if names is None else names
    h = Lease(url).current(names)
    if h is not None and h.alive():
        return h
    if storage.basename(url) not in names:
        return None
    legacy = Holder.parse(storage.read_bytes_or_none(url))
    return legacy if legacy is not None and legacy.alive() else None
