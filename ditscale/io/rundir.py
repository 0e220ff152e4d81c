"""A run's directory: the only owner of its layout and state. A local path or any fsspec URL (s3://bucket/run).

    config.yaml               the run's config as it trains now (rewritten at each start)
    config_history.jsonl      one line per start: event, step, time, host, changes, world size, nodes, ZeRO stage
    lock.<gen>.json           the writer's lease, one file per generation (ditscale.io.lock): one trainer at a time
    metrics.jsonl             one JSON object per logged step (rank 0 appends; a resume drops the repeated tail)
    final.json                written last: finished at train.steps, or diverged at a step
    checkpoints/step_XXXXXXXX/  complete checkpoints (meta.json, written last, lists every file with its size and
                              checksum: train/checkpoint.py); checkpoints/latest names the newest
    checkpoints/.staging/     half-written checkpoints (local run dirs; node-local for URLs)
    samples/step_XXXXXXXX.png sample grids
    eval/<metric>.json|png    evaluation results

One writer: the trainer that holds the lease attaches it (`attach`), and from then on every write through this
object first proves the lease is still held (`guard`, the lease's fence); a trainer that cannot prove it writes
nothing and stops. Readers (status, eval, report) never attach one.

"Done" has one meaning everywhere (trainer, eval, results, report, launchers, demo): final.json says finished at
a step >= the train.steps asked for (`is_done(steps)`). Raising train.steps makes a done run resumable again.
For a URL run dir, files that grow (metrics.jsonl) and checkpoints being written live in a node-local mirror
(`local`) and are uploaded from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditscale.io import storage
from ditscale.io.lock import Holder, Lease, current_holder

log = logging.getLogger(__name__)

CONFIG, HISTORY, LOCK = "config.yaml", "config_history.jsonl", "lock.json"
FINAL, METRICS = "final.json", "metrics.jsonl"
CKPT, STAGING, LATEST = "checkpoints", ".staging", "latest"
SAMPLES, EVAL = "samples", "eval"

# states, from least to most advanced; DIVERGED ends a run like DONE but is not done (final.json says where)
PENDING, STARTED, RESUMABLE, RUNNING, DONE = "pending", "started", "resumable", "running", "done"
DIVERGED = "diverged"


def is_lock_name(name: str) -> bool:
    """A lease file of a run dir: lock.<generation>.json (or the single lock.json of older versions)."""
    return name == LOCK or (name.startswith("lock.") and name.endswith(".json") and name[5:-5].isdigit())


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.split("_", 1)[1])


def is_tag(name: str) -> bool:
    return name.startswith("step_") and name[5:].isdigit()


def run_id(url: str) -> str:
    """A run's identity: a short stable hash of where its run dir lives (a URL as given, a local path made
    absolute; symlinks are not resolved). Unique per run directory, so two runs of one config (same run.name,
    another --run-dir) never share it, and the same after a resume from any host that sees the same path. Every
    Prometheus series carries it as `run_id` beside the human `run` name; W&B uses it as its run id."""
    url = storage.normalize(str(url))
    where = url if storage.is_url(url) else os.path.abspath(url)
    return hashlib.sha1(where.encode()).hexdigest()[:16]


def staging_root() -> Path:
    """Node-local scratch space for URL run dirs (DITSCALE_STAGING, else the system temp dir)."""
    return Path(os.environ.get("DITSCALE_STAGING") or Path(tempfile.gettempdir()) / "ditscale-staging")


@dataclass
class RunStatus:
    """What a run dir says about its run. `holder` is set while a live trainer holds the lock."""

    state: str
    step: int | None = None
    steps: int | None = None
    checkpoint: str | None = None
    final: dict | None = None
    last: dict | None = None  # the last metrics.jsonl record
    holder: Holder | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def last_step_age(self) -> float | None:
        """Seconds since the last logged step (its "time"), None when unknown."""
        t = (self.last or {}).get("time")
        return max(0.0, time.time() - float(t)) if isinstance(t, (int, float)) else None

    def steady_step_time(self) -> float | None:
        """Seconds per step once the run is past its first logged interval (compilation, data warm-up): the median
        over the recent records (`extra["recent"]`, filled by status reads that fetch the tail of metrics.jsonl),
        leaving out the oldest of them; None when only one record is known. Without `recent`, the last record's."""
        recent = self.extra.get("recent")
        if recent is None:
            t = (self.last or {}).get("step_time")
            return float(t) if isinstance(t, (int, float)) else None
        times = sorted(float(r["step_time"]) for r in recent[1:] if isinstance(r.get("step_time"), (int, float)))
        return times[len(times) // 2] if times else None

    def stall(
        self, after_s: float, log_every: int, started: float | None = None, now: float | None = None
    ) -> str | None:
        """Why a run that should be training counts as stalled, or None.

        Stalled: no step was logged for `after_s` seconds (or 5 logging intervals at the steady step time, if
        longer) since the later of its last step and `started` (its job's start; default: since the live trainer
        took the lock). The first logged interval's time (compilation, warm-up) never counts: a run that logged
        only its first step, or nothing since it started, is judged by `after_s` alone. The lock's heartbeat comes
        from a thread of its own, so a trainer hung in a collective or a data read still holds the lock: only the
        steps tell. E.g. "last step 86 7m ago", "no step since it started 12m ago".
        """
        if self.state in (DONE, DIVERGED):
            return None
        now = time.time() if now is None else now
        if started is None and self.holder is not None:
            started = self.holder.since
        last_t = (self.last or {}).get("time")
        last_t = float(last_t) if isinstance(last_t, (int, float)) else None
        marks = [t for t in (last_t, started) if t is not None]
        if not marks:
            return None
        logged_since_start = last_t is not None and last_t >= (started or 0)
        steady = self.steady_step_time() if logged_since_start else None
        interval = (steady or 0.0) * log_every
        if now - max(marks) <= max(after_s, 5 * interval):
            return None
        if logged_since_start:
            why = f"last step {(self.last or {}).get('step')} {age_text(now - last_t)} ago"
        else:
            why = f"no step since it started {age_text(now - (started or now))} ago"
        return why + ("" if self.holder else ", no live trainer")


def _diverged(rec: Any) -> bool:
    """A final.json record of a run stopped by a NaN/inf loss or gradient norm (train.nonfinite)."""
    return isinstance(rec, dict) and bool(rec.get("diverged")) and not rec.get("finished")


def _judge(st: RunStatus, started: bool) -> bool:
    """The state of a run that is not done, from its final.json, holder and checkpoint (RunDir.status and
    RowReader.status read them their own way): diverged (no live trainer) > running > resumable > started
    (`started`: config or metrics written) > pending. True when final.json decided it (diverged: nothing more to
    read)."""
    if st.holder is None and _diverged(st.final):
        st.state, st.step = DIVERGED, st.final.get("step")
        return True
    if st.holder is not None:
        st.state = RUNNING
    elif st.checkpoint:
        st.state = RESUMABLE
    elif started:
        st.state = STARTED
    return False


def _finished(rec: Any, steps: int | None = None) -> bool:
    """A final.json record of a finished run, at `steps` or beyond when given."""
    if not (isinstance(rec, dict) and rec.get("finished")):
        return False
    return steps is None or int(rec.get("step", 0)) >= int(steps)


def _records(lines: Iterable[str]) -> Iterator[dict]:
    """The metrics records among `lines` (a torn line, written while the run writes, is skipped)."""
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            yield rec


def format_starts(starts: list[dict]) -> str:
    """The world sizes a run trained on: "2x ZeRO-2 from 0, 1x ZeRO-2 from 40" (one item per change)."""
    out: list[str] = []
    last = None
    for s in starts:
        if s.get("world_size") is None:
            continue
        what = f"{s['world_size']}x ZeRO-{s.get('zero_stage')}"
        if s.get("nodes") and s["nodes"] > 1:
            what += f" on {s['nodes']} nodes"
        if what != last:
            out.append(f"{what} from {s.get('step') or 0}")
            last = what
    return ", ".join(out)


def age_text(seconds: float) -> str:
    """90 -> "90s", 600 -> "10m", 7500 -> "2h05m"."""
    s = int(seconds)
    return f"{s}s" if s < 120 else (f"{s // 60}m" if s < 7200 else f"{s // 3600}h{(s % 3600) // 60:02d}m")


class RunDir:
    def __init__(self, url: str):
        self.url = storage.normalize(str(url))
        self.remote = storage.is_url(self.url)
        if self.remote:
            self.local = staging_root() / hashlib.sha1(self.url.encode()).hexdigest()[:16]
        else:
            self.local = Path(self.url)
        self.fence: Lease | None = None

    # --- the writer's fence -----------------------------------------------------------------------------------
    def attach(self, lease: Lease) -> None:
        """Make `lease` the fence of every write through this object (the lease holder's RunDir)."""
        self.fence = lease

    def guard(self, what: str = "write") -> None:
        """Raise LeaseLostError unless this writer provably holds the run's lease (no-op without a fence)."""
        if self.fence is not None:
            self.fence.check(f"{what} in {self.url}")

    @property
    def gen(self) -> int | None:
        """The fencing token (lease generation) of this writer, recorded in what it writes."""
        return self.fence.gen if self.fence is not None else None

    def __str__(self) -> str:
        return self.url

    @property
    def run_id(self) -> str:
        return run_id(self.url)

    def __repr__(self) -> str:
        return f"RunDir({self.url!r})"

    def path(self, rel: str = "") -> str:
        """The URL (or local path) of `rel` inside the run dir."""
        return storage.join(self.url, rel) if rel else self.url

    def local_file(self, rel: str) -> Path:
        """Where a writer puts `rel` on this node (the run dir itself, or the node-local mirror of a URL run dir),
        with its folder made: nothing creates the mirror but the writers that use it, so a RunDir made only to
        read a run (status of a thousand runs) leaves nothing behind. Guarded: a writer asks for it to write."""
        self.guard(f"write {rel}")
        path = self.local / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # --- files ------------------------------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes | None:
        return storage.read_bytes_or_none(self.path(rel))

    def read_text(self, rel: str) -> str | None:
        return storage.read_text(self.path(rel))

    def read_tail(self, rel: str, nbytes: int, size: int | None = None) -> bytes | None:
        """The last `nbytes` of a file (one ranged read on object storage when its `size` is known), None when
        missing."""
        url = self.path(rel)
        if not self.remote:
            try:
                with open(url, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - nbytes))
                    return f.read()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None

        def go() -> bytes:
            fs, path = storage.filesystem(url)
            total = size if size is not None else fs.info(path)["size"]
            return fs.cat_file(path, start=max(0, total - nbytes))

        try:
            return storage.with_retries(go, url, "read")
        except FileNotFoundError:
            return None

    def read_json(self, rel: str) -> Any:
        """Parsed JSON, or None when missing or unreadable."""
        raw = self.read_text(rel)
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.guard(f"write {rel}")
        storage.write_bytes(self.path(rel), data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, obj: Any) -> None:
        """Strict JSON (no NaN/Infinity literals, which jq and JavaScript reject): see finite_json."""
        self.write_text(rel, dumps(obj, indent=1) + "\n")

    def remove(self, rel: str) -> None:
        self.guard(f"remove {rel}")
        storage.remove(self.path(rel))

    def exists(self, rel: str) -> bool:
        return storage.exists(self.path(rel))

    def listdir(self, rel: str = "") -> list[str]:
        return storage.listdir(self.path(rel))

    def rmtree(self, rel: str) -> None:
        self.guard(f"remove {rel}")
        storage.rmtree(self.path(rel))
        if self.remote:
            import shutil

            shutil.rmtree(self.local / rel, ignore_errors=True)

    def upload(self, rel: str) -> None:
        """Copy the local mirror's file `rel` to the URL (nothing to do for a local run dir)."""
        if self.remote and (self.local / rel).is_file():
            self.guard(f"upload {rel}")
            storage.put_file(str(self.local / rel), self.path(rel))

    def upload_tree(self, local_dir: Path, rel: str, skip: tuple[str, ...] = ()) -> None:
        self.guard(f"upload {rel}")
        storage.put_tree(str(local_dir), self.path(rel), skip=skip)

    def download_tree(self, rel: str, local_dir: Path) -> None:
        storage.get_tree(self.path(rel), str(local_dir))

    # --- checkpoints ------------------------------------------------------------------------------------------
    def complete_tags(self) -> list[str]:
        """Checkpoint tags whose meta.json exists (written last), oldest first."""
        tags = [t for t in self.listdir(CKPT) if is_tag(t)]
        return sorted((t for t in tags if self.exists(f"{CKPT}/{t}/meta.json")), key=step_of)

    def latest_tag(self) -> str | None:
        """The newest complete checkpoint. `latest` is a hint: whatever it holds (junk, binary, empty, a missing
        or incomplete tag, an older tag), the answer is the highest complete step."""
        tags = self.complete_tags()
        return tags[-1] if tags else None

    def latest_hint(self) -> str | None:
        """What checkpoints/latest says, if it names a well-formed tag."""
        raw = (self.read_text(f"{CKPT}/{LATEST}") or "").strip()
        return raw if is_tag(raw) else None

    def publish_latest(self, tag: str) -> None:
        self.write_text(f"{CKPT}/{LATEST}", tag + "\n")

    def staging_dir(self, gen: int | None = None) -> Path:
        """Where checkpoints are written before they are published: inside a local run dir (same filesystem, so
        publishing is a rename), node-local for a URL; one folder per lease generation, so a paused writer that
        wakes up never writes into its successor's."""
        root = self.local / CKPT / STAGING
        return root / f"g{gen}" if gen is not None else root

    def checkpoint_local(self, tag: str, download: bool = True) -> Path:
        """A local directory holding checkpoint `tag` (downloaded once for URL run dirs)."""
        if not self.remote:
            return self.local / CKPT / tag
        dest = self.local / "download" / tag
        if download and not (dest / "meta.json").is_file():
            import shutil

            shutil.rmtree(dest, ignore_errors=True)
            self.download_tree(f"{CKPT}/{tag}", dest)
        return dest

    # --- state ------------------------------------------------------------------------------------------------
    def final(self) -> dict | None:
        rec = self.read_json(FINAL)
        return rec if _finished(rec) else None

    def ended(self) -> dict | None:
        """final.json of a run that finished or diverged (stopped on a non-finite loss), else None."""
        rec = self.read_json(FINAL)
        return rec if _finished(rec) or _diverged(rec) else None

    def is_done(self, steps: int) -> bool:
        """The one definition of done: final.json says finished at a step >= `steps`."""
        return _finished(self.read_json(FINAL), steps)

    def write_final(self, rec: dict) -> None:
        self.write_json(FINAL, rec)

    def last_record(self) -> dict | None:
        """The last complete line of metrics.jsonl (a torn last line while the run writes is skipped)."""
        lines = (self.read_text(METRICS) or "").splitlines()
        return next(_records(reversed(lines)), None)

    def records(self) -> list[dict]:
        return list(_records((self.read_text(METRICS) or "").splitlines()))

    def holder(self, names: list[str] | None = None) -> Holder | None:
        """The live trainer holding this run dir, or None (`names`: a listing of the run dir, if at hand)."""
        return current_holder(self.path(LOCK), names)

    def status(self, steps: int | None = None) -> RunStatus:
        """done (final.json at >= steps) > diverged (final.json says so, no live trainer) > running (a live lock)
        > resumable (a complete checkpoint) > started (config or metrics written) > pending."""
        st = RunStatus(PENDING, steps=steps)
        names = self.listdir()
        st.final = self.read_json(FINAL) if FINAL in names else None
        st.last = self.last_record() if METRICS in names else None
        st.holder = self.holder(names)
        st.checkpoint = self.latest_tag()
        if _finished(st.final, steps):
            st.state, st.step = DONE, st.final.get("step")
            return st
        if _judge(st, started=st.last is not None or CONFIG in names):
            return st
        st.step = (st.last or {}).get("step")
        if st.step is None and st.checkpoint:
            st.step = step_of(st.checkpoint)
        return st

    # --- config -----------------------------------------------------------------------------------------------
    def saved_config(self) -> dict | None:
        """The config the run trained with (config.yaml; else the newest checkpoint's), as a plain tree."""
        import yaml

        raw = self.read_text(CONFIG)
        if raw:
            try:
                tree = yaml.safe_load(raw)
                if isinstance(tree, dict):
                    return tree
            except yaml.YAMLError:
                pass
        tag = self.latest_tag()
        meta = self.read_json(f"{CKPT}/{tag}/meta.json") if tag else None
        return meta.get("config") if isinstance(meta, dict) else None

    def history(self) -> list[dict]:
        """config_history.jsonl: one entry per start (created, resumed, changed), oldest first."""
        return list(_records((self.read_text(HISTORY) or "").splitlines()))

    def starts(self) -> list[dict]:
        """Where each start of the run began and on what: [{"step", "world_size", "nodes", "zero_stage"}, ...]
        (entries written before these fields were recorded have None there)."""
        keys = ("step", "world_size", "nodes", "zero_stage")
        return [{k: e.get(k) for k in keys} for e in self.history()]

    def record_config(self, config_yaml: str, step: int, changes: dict[str, list], event: str, **extra: Any) -> None:
        """Write config.yaml and a line of config_history.jsonl for this start (`extra`: world_size, nodes,
        zero_stage, the lease generation...)."""
        self.write_text(CONFIG, config_yaml)
        entry = {"event": event, "step": step, "time": time.time(), "host": socket.gethostname(), "changes": changes}
        text = (self.read_text(HISTORY) or "") + json.dumps({**entry, **extra}, default=str) + "\n"
        self.write_text(HISTORY, text)

    # --- the writer -------------------------------------------------------------------------------------------
    def lease(self, lease_s: float = 120.0) -> Lease:
        """The run's lock (not yet acquired): `with rundir.lease(120) as lease: ...`."""
        return Lease(self.path(LOCK), lease_s)

    def clean_leftovers(self) -> list[str]:
        """Remove what dead writers left: the staging dir, temporary files and checkpoint directories without
        meta.json. Only the lock holder calls this."""
        self.guard("remove leftovers")
        removed = []
        stage = self.staging_dir()
        if stage.exists():
            import shutil

            shutil.rmtree(stage, ignore_errors=True)
            removed.append(str(stage))
        for rel in ("", CKPT):
            for name in self.listdir(rel):
                if storage.is_tmp_name(name):
                    storage.remove(self.path(f"{rel}/{name}" if rel else name))
                    removed.append(self.path(f"{rel}/{name}" if rel else name))
        for tag in self.listdir(CKPT):  # an upload that died before its meta.json
            if is_tag(tag) and not self.exists(f"{CKPT}/{tag}/meta.json"):
                self.rmtree(f"{CKPT}/{tag}")
                removed.append(self.path(f"{CKPT}/{tag}"))
        if removed:
            log.info("removed leftovers of an earlier writer: %s", ", ".join(removed))
        return removed


def finite_json(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None, and each dict holding one gaining
    "nonfinite": [its keys] (a record says what was not a number, in JSON every reader accepts)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        out = {k: finite_json(v) for k, v in obj.items()}
        bad = [k for k, v in obj.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            out["nonfinite"] = bad
        return out
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """json.dumps of finite_json(obj): never a NaN or Infinity literal."""
    return json.dumps(finite_json(obj), allow_nan=False, default=_json_default, **kw)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # tensors, numpy arrays and scalars
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__}")


# --- cheap status reads for launchers' status rows (read-only) --------------------------------------------------
TAIL_BYTES = 16384  # the end of metrics.jsonl that holds the last few records


def _tail_records(data: bytes | None, cut: bool) -> list[dict]:
    """The complete records in the end of metrics.jsonl (`cut`: the first line may be a part of one)."""
    lines = (data or b"").decode("utf-8", errors="replace").splitlines()
    return list(_records(lines[1:] if cut and lines else lines))


class RowReader:
    """Reads what a status row needs from many run dirs: one listing per folder of run dirs (object storage) or a
    few stats per run (disk), then only the files that the listing says matter, in parallel. `files(run)` is the
    listing of one run dir: relative path -> {"size", "mtime"}; claim files beside the run dirs come with it."""

    def __init__(self, run_dirs: Iterable[str], workers: int = 16):
        self.run_dirs = [storage.normalize(str(d)) for d in run_dirs]
        self.workers = workers
        self._listing: dict[str, dict[str, dict]] = {}
        self._siblings: dict[str, dict[str, list[tuple[str, dict]]]] = {}  # parent -> run name -> names beside it

    # --- listings -------------------------------------------------------------------------------------------------
    def _list_remote_parent(self, parent: str) -> None:
        def go() -> dict:
            fs, path = storage.filesystem(parent)
            fs.invalidate_cache(path)
            try:
                return fs.find(path, detail=True)
            except FileNotFoundError as e:
                if storage._error_code(e) == "NoSuchBucket":
                    raise
                return {}

        found = storage.with_retries(go, parent, "list")
        fs, base = storage.filesystem(parent)
        base = base.rstrip("/")
        top: list[tuple[str, dict]] = []
        for key, info in found.items():
            rel = key[len(base) :].lstrip("/")
            head, _, rest = rel.partition("/")
            meta = {"size": info.get("size") or 0, "mtime": _mtime(info)}
            if rest:
                self._listing.setdefault(storage.join(parent, head), {})[rest] = meta
            else:
                top.append((head, meta))
        self._siblings[parent] = _by_run_name(top)

    def _list_local(self, run_dir: str) -> dict[str, dict]:
        out: dict[str, dict] = {}
        try:
            top = os.listdir(run_dir)
        except OSError:
            top = []
        for rel in (FINAL, METRICS, CONFIG, HISTORY, *(n for n in top if is_lock_name(n))):
            try:
                s = os.stat(os.path.join(run_dir, rel))
            except OSError:
                continue
            out[rel] = {"size": s.st_size, "mtime": s.st_mtime}
        ckpt = os.path.join(run_dir, CKPT)
        for tag in os.listdir(ckpt) if os.path.isdir(ckpt) else ():
            if is_tag(tag) and os.path.exists(os.path.join(ckpt, tag, "meta.json")):
                out[f"{CKPT}/{tag}/meta.json"] = {"size": 0, "mtime": 0.0}
        return out

    def prefetch(self) -> None:
        parents = sorted({storage.dirname(d) for d in self.run_dirs if storage.is_url(d)})
        for p in parents:  # one (paginated) listing per folder of run dirs
            self._list_remote_parent(p)
        for p in sorted({storage.dirname(d) for d in self.run_dirs if not storage.is_url(d)}):
            try:
                names = os.listdir(p)
            except OSError:
                names = []
            beside = [n for n in names if ".claim-" in n]  # only the claims beside the run dirs are ever asked for
            self._siblings[p] = _by_run_name(
                [(n, {"size": 0, "mtime": _local_mtime(os.path.join(p, n))}) for n in beside]
            )

    def files(self, run_dir: str) -> dict[str, dict]:
        if storage.is_url(run_dir):
            return self._listing.get(run_dir, {})
        return self._list_local(run_dir)

    def siblings(self, run_dir: str) -> list[tuple[str, dict]]:
        """Names beside the run dir that start with its name (its claims), with their info."""
        return self._siblings.get(storage.dirname(run_dir), {}).get(storage.basename(run_dir), [])

    # --- one run --------------------------------------------------------------------------------------------------
    def status(self, run_dir: str, steps: int | None, details: bool = True) -> RunStatus:
        """The same answer as RunDir(run_dir).status(steps), from the listing plus the files that matter; the
        recent metrics records go to extra["recent"] (stall rules), the start history to extra["starts"]. Without
        `details` the state, checkpoint and holder only (no metrics or history read: `add_details` later)."""
        rd, files = RunDir(run_dir), self.files(run_dir)
        st = RunStatus(PENDING, steps=steps)
        st.extra["files"] = files
        tags = [k.split("/")[1] for k in files if k.startswith(f"{CKPT}/") and k.endswith("/meta.json")]
        tags = sorted((t for t in tags if is_tag(t)), key=step_of)
        st.checkpoint = tags[-1] if tags else None
        if FINAL in files:
            st.final = rd.read_json(FINAL)
        if _finished(st.final, steps):
            st.state, st.step = DONE, st.final.get("step")
            return st
        if any(is_lock_name(n) for n in files):  # a lease file is there: who holds it is RunDir.holder()'s to say
            st.holder = rd.holder([n for n in files if "/" not in n])
        if _judge(st, started=METRICS in files or CONFIG in files):
            return st
        if details or st.holder is not None:  # a live trainer: its steps tell whether it is stalled
            self.add_details(run_dir, st)
        elif st.checkpoint:
            st.step = step_of(st.checkpoint)
        return st

    def add_details(self, run_dir: str, st: RunStatus) -> RunStatus:
        """The last logged steps (step, loss, stall rules) and the start history (world sizes) of a run."""
        if st.extra.get("detailed"):
            return st
        rd, files = RunDir(run_dir), st.extra.get("files") or self.files(run_dir)
        st.extra["detailed"] = True
        if st.state in (DONE, DIVERGED):  # its final.json has the step and loss; only the world sizes to add
            if HISTORY in files:
                st.extra["starts"] = rd.starts()
            return st
        if METRICS in files:
            size = int(files[METRICS].get("size") or 0)
            recent = _tail_records(rd.read_tail(METRICS, TAIL_BYTES, size if rd.remote else None), size > TAIL_BYTES)
            st.extra["recent"] = recent[-8:]
            st.last = recent[-1] if recent else None
        if HISTORY in files:
            st.extra["starts"] = rd.starts()
        st.step = (st.last or {}).get("step")
        if st.step is None and st.checkpoint:
            st.step = step_of(st.checkpoint)
        return st

    def statuses(self, steps: dict[str, int | None], details: bool = False) -> dict[str, RunStatus]:
        """run dir -> its status (steps: run dir -> the train.steps it is judged against), read in parallel."""
        from concurrent.futures import ThreadPoolExecutor

        self.prefetch()
        with ThreadPoolExecutor(max_workers=max(1, min(self.workers, len(self.run_dirs) or 1))) as pool:
            out = list(pool.map(lambda d: self.status(d, steps.get(d), details), self.run_dirs))
        return dict(zip(self.run_dirs, out, strict=True))


def _by_run_name(entries: list[tuple[str, dict]]) -> dict[str, list[tuple[str, dict]]]:
    """Names beside the run dirs (their claims, `<run>.claim-...`), by run dir name: one look-up per run."""
    out: dict[str, list[tuple[str, dict]]] = {}
    for name, info in entries:
        if ".claim-" in name:
            out.setdefault(name.split(".claim-", 1)[0], []).append((name, info))
    return out


def _mtime(info: dict) -> float:
    t = info.get("LastModified") or info.get("mtime") or info.get("created")
    if hasattr(t, "timestamp"):
        return float(t.timestamp())
    return float(t) if isinstance(t, (int, float)) else 0.0


def _local_mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0
