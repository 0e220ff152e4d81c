"""One claim per run: whichever launcher, backend or log dir, a run is submitted once.

Before a launcher submits or starts a run it creates `<run dir>.claim-<generation>.json` beside the run dir,
create-exclusive (O_EXCL on a filesystem; a conditional PUT, `If-None-Match: *`, on object storage): of any number
of launchers that try at the same moment exactly one creates it. The claim names who holds it (backend, job id,
host, pid, log dir) and how the run was launched (overrides, vars, train.steps), so it is also the run's launch
record: `--status` reads the steps a run was launched with from it.

A claim is live until its job ends: the backend that wrote it says (a Slurm job still in squeue, a launcher
process still alive on its host). A launcher that sees its job end replaces the claim by
`<run dir>.claim-<generation>.ended.json` (the same record, with how it ended), so that a listing of the runs folder
alone tells which runs are free: only claims in flight are ever read to decide. A launcher that
finds the newest claim dead takes the run over by creating the next generation, again create-exclusive, so two
launchers that both found it dead still race for one file; older generations are then removed. A claim that no
one here can check (a Slurm job seen from a machine without squeue, a process on another host) counts as live.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ditscale.errors import StorageError
from ditscale.io import storage

CLAIM_RE = re.compile(r"^(?P<name>.+)\.claim-(?P<gen>\d{6})(?P<ended>\.ended)?\.json$")


def claim_url(run_dir: str, gen: int, ended: bool = False) -> str:
    suffix = ".ended.json" if ended else ".json"
    return storage.join(storage.dirname(run_dir), f"{storage.basename(run_dir)}.claim-{gen:06d}{suffix}")


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str | None:
    """The start time of a process on this machine (field 22 of /proc/<pid>/stat): tells a pid from its reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def me() -> dict[str, Any]:
    """Who is claiming: this host and process (a launcher, or a Slurm task)."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "boot": boot_id(), "pid_start": process_start(pid)}


def process_alive(data: dict) -> bool | None:
    """Whether the process a claim names still runs: None when it ran on another machine (cannot tell here)."""
    if data.get("host") != socket.gethostname() or data.get("boot") != boot_id():
        return None
    pid = int(data.get("pid") or 0)
    start = process_start(pid) if pid > 0 else None
    return start is not None and (data.get("pid_start") in (None, start))


@dataclass
class Claim:
    run_dir: str
    gen: int
    data: dict[str, Any] = field(default_factory=dict)
    ended_file: bool = False  # read from (or moved to) <run dir>.claim-<gen>.ended.json

    @property
    def url(self) -> str:
        return claim_url(self.run_dir, self.gen, self.ended_file)

    @property
    def ended(self) -> bool:
        return self.ended_file or bool(self.data.get("ended"))

    def who(self) -> str:
        d = self.data
        job = f" job {d['job']}" if d.get("job") else ""
        where = f"pid {d.get('pid')} on {d.get('host')}"
        return f"{d.get('backend', '?')}{job} ({where}, log dir {d.get('log_dir') or '-'})"


def _create(url: str, data: bytes) -> bool:
    """Create the file only if it does not exist (exact on a filesystem and on S3's conditional PUT)."""
    if storage.is_local(url):
        return storage.create_exclusive(url, data)

    def go() -> bool:
        fs, path = storage.filesystem(url)
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    return storage.with_retries(go, url, "create")


def parse_listing(names: list[str]) -> dict[str, tuple[int, bool]]:
    """{run dir name: (newest claim generation, whether it ended)} from the names in a runs folder."""
    out: dict[str, tuple[int, bool]] = {}
    for n in names:
        m = CLAIM_RE.match(n)
        if m:
            gen, ended = int(m["gen"]), bool(m["ended"])
            old = out.get(m["name"], (0, False))
            if gen > old[0] or (gen == old[0] and ended):
                out[m["name"]] = (gen, ended)
    return out


def newest_generations(run_dirs: list[str]) -> dict[str, tuple[int, bool]]:
    """run dir -> (its newest claim generation (0: never claimed), ended): one listing per folder of run dirs."""
    by_parent: dict[str, list[str]] = {}
    for d in run_dirs:
        by_parent.setdefault(storage.dirname(d), []).append(d)
    out: dict[str, tuple[int, bool]] = {}
    for parent, dirs in by_parent.items():
        gens = parse_listing(storage.listdir(parent))
        out.update({d: gens.get(storage.basename(d), (0, False)) for d in dirs})
    return out


def read(run_dir: str, gen: int, ended: bool = False) -> Claim | None:
    raw = storage.read_bytes_or_none(claim_url(run_dir, gen, ended)) if gen > 0 else None
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = None
    return Claim(run_dir, gen, data, ended) if isinstance(data, dict) else None


def current(run_dirs: list[str], workers: int = 16) -> dict[str, Claim | None]:
    """The newest claim of each run dir (None: never claimed), read in parallel."""
    gens = newest_generations(run_dirs)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(run_dirs) or 1))) as pool:
        claims = list(pool.map(lambda d: read(d, *gens[d]), run_dirs))
    return dict(zip(run_dirs, claims, strict=True))


def try_claim(run_dir: str, record: dict[str, Any], alive, newest: Claim | None = None) -> tuple[bool, Claim | None]:
    """(True, our claim) when this call claimed the run, else (False, the claim that holds it).

    `alive(claim) -> bool | None` says whether a claim's job still runs (None: cannot tell, counts as live)."""
    if newest is not None:
        cur = newest
    else:
        gen, ended = newest_generations([run_dir])[run_dir]
        cur = read(run_dir, gen, ended)
        if cur is None and gen:  # a claim being replaced right now: its next state decides
            cur = Claim(run_dir, gen, {"backend": "?"}, ended)
    if cur is not None and not cur.ended and alive(cur) is not False:
        return False, cur
    gen = cur.gen if cur is not None else 0
    data = {**record, **me(), "time": time.time(), "generation": gen + 1}
    mine = Claim(run_dir, gen + 1, data)
    if not _create(mine.url, json.dumps(data, indent=1).encode()):
        g, e = newest_generations([run_dir])[run_dir]
        return False, read(run_dir, g, e)
    for old in range(max(1, gen - 2), gen + 1):  # the generations this one replaces (a few: earlier races)
        for ended in (False, True):
            try:
                storage.remove(claim_url(run_dir, old, ended))
            except StorageError:
                pass  # a leftover costs nothing: the newest generation wins
    return True, mine


def update(claim: Claim, **fields: Any) -> None:
    """Add what became known after the claim (the job id): only the claim's holder writes it."""
    claim.data.update(fields)
    storage.write_bytes(claim.url, json.dumps(claim.data, indent=1).encode())


def end(claim: Claim, **fields: Any) -> None:
    """The claim's job ended: the run is free for the next launcher. The record stays, as
    <run dir>.claim-<gen>.ended.json (a listing tells it ended), with how it ended."""
    if claim.ended_file:
        return
    claim.data.update(fields, ended=time.time())
    live = claim.url
    claim.ended_file = True
    storage.write_bytes(claim.url, json.dumps(claim.data, indent=1).encode())
    storage.remove(live)
