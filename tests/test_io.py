"""ditscale.io: the storage module (local paths and the real S3 server), the run dir's state, and its lock."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from ditscale.errors import LeaseLostError, RunLockedError, StorageError
from ditscale.io import storage
from ditscale.io.lock import Holder, Lease
from ditscale.io.rundir import DONE, PENDING, RESUMABLE, RUNNING, STARTED, RunDir

WAIT_S = 120  # waits for a condition return as soon as it holds; this is only the bound on a loaded machine


def _wait(predicate, timeout=WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    """A directory URL on local disk, or a fresh bucket on the real (moto) S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_server").bucket() + "/store"


# ---------------------------------------------------------------------------------------------------- storage
def test_write_read_list_remove(base):
    url = storage.join(base, "a", "b.txt")
    assert storage.read_bytes_or_none(url) is None and not storage.exists(url)
    storage.write_text(url, "one")
    storage.write_text(url, "two")  # replaced atomically
    assert storage.read_text(url) == "two" and storage.exists(url)
    assert storage.listdir(storage.join(base, "a")) == ["b.txt"]  # no temporary file left beside it
    storage.write_bytes(storage.join(base, "a", "c", "d.bin"), b"\x00\xff")
    assert storage.find(storage.join(base, "a")) == ["b.txt", "c/d.bin"]
    assert storage.read_text(storage.join(base, "a", "c", "d.bin")) == "\x00\ufffd"  # undecodable: replaced
    assert storage.create_exclusive(storage.join(base, "x"), b"1") and not storage.create_exclusive(
        storage.join(base, "x"), b"2"
    )
    assert storage.read_bytes(storage.join(base, "x")) == b"1"
    storage.remove(url)
    storage.remove(url)  # a missing file is not an error
    storage.rmtree(storage.join(base, "a"))
    assert storage.listdir(storage.join(base, "a")) == []


def test_missing_lists_without_downloading(base):
    urls = [storage.join(base, "shards", f"s-{i:03d}.tar") for i in range(20)]
    for u in urls[::2]:
        storage.write_bytes(u, b"x")
    assert storage.missing(urls) == urls[1::2]
    assert storage.missing(urls[::2]) == []


def test_local_write_errors_name_the_path_and_the_os_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    full = tmp_path / "full"
    full.mkdir()
    if (
        os.geteuid() == 0
        and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)]).returncode == 0
    ):
        try:
            with pytest.raises(StorageError, match=rf"cannot write {full}/big: No space left on device"):
                storage.write_bytes(str(full / "big"), b"\0" * (1 << 20))
            assert os.listdir(full) == []  # the partial temporary file is gone
        finally:
            subprocess.run(["umount", str(full)], check=True)
    os.chmod(ro, 0o500)
    try:
        if os.geteuid() != 0:  # root writes anyway
            with pytest.raises(StorageError, match=rf"cannot write {ro}/f: Permission denied"):
                storage.write_bytes(str(ro / "f"), b"x")
    finally:
        os.chmod(ro, 0o700)


def test_remote_errors_retry_within_the_budget_then_name_the_url(monkeypatch, caplog):
    monkeypatch.setenv("DITSCALE_STORAGE_RETRY_SECONDS", "1.5")
    monkeypatch.setenv("DITSCALE_STORAGE_BACKOFF", "0.2")
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection refused")
        return "ok"

    with caplog.at_level(logging.WARNING):
        assert storage.with_retries(flaky, "s3://b/k", "read") == "ok"
    assert len(calls) == 3 and sum("retry" in r.getMessage() for r in caplog.records) == 2

    def down():
        raise ConnectionError("connection refused")

    with pytest.raises(StorageError, match=r"cannot write s3://b/k after \d+ attempt\(s\).*connection refused"):
        storage.with_retries(down, "s3://b/k", "write")

    def missing():
        raise FileNotFoundError("s3://b/k")

    calls.clear()
    with pytest.raises(FileNotFoundError):  # not transient: no retry, the caller decides
        storage.with_retries(missing, "s3://b/k")


def test_outage_shorter_than_the_budget_is_survived(s3_proxy, monkeypatch):
    """A real S3 server behind a proxy that refuses every connection for 3 s: a write during it retries."""
    monkeypatch.setenv("DITSCALE_STORAGE_RETRY_SECONDS", "60")
    url = s3_proxy.bucket() + "/k"
    s3_proxy.outage(3.0)
    t0 = time.monotonic()
    storage.write_bytes(url, b"after the outage")
    assert time.monotonic() - t0 > 0  # it returned (how long it took is recorded in docs, not asserted)
    assert storage.read_bytes(url) == b"after the outage"
    monkeypatch.setenv("DITSCALE_STORAGE_RETRY_SECONDS", "1")
    s3_proxy.outage(10.0)
    with pytest.raises(StorageError, match=rf"cannot write {url} after"):
        storage.write_bytes(url, b"during a long outage")
    s3_proxy.restore()
    assert storage.read_bytes(url) == b"after the outage"


# ---------------------------------------------------------------------------------------------------- run dir
def _checkpoint(rd: RunDir, step: int, complete: bool = True) -> None:
    rd.write_text(f"checkpoints/step_{step:08d}/rank_00000.pt", "x")
    if complete:
        rd.write_text(f"checkpoints/step_{step:08d}/meta.json", json.dumps({"step": step}))


def test_run_state_and_the_one_meaning_of_done(base):
    rd = RunDir(storage.join(base, "run"))
    assert rd.status(10).state == PENDING
    rd.write_text("config.yaml", "{}\n")
    assert rd.status(10).state == STARTED
    _checkpoint(rd, 4)
    _checkpoint(rd, 6, complete=False)
    rd.write_bytes("checkpoints/latest", b"\xff\xfe\x00")
    st = rd.status(10)
    assert (st.state, st.checkpoint, st.step) == (RESUMABLE, "step_00000004", 4)
    rd.write_json("final.json", {"finished": True, "step": 10, "loss": 0.5})
    assert rd.is_done(10) and rd.is_done(8) and not rd.is_done(12)  # train.steps raised: not done any more
    assert rd.status(10).state == DONE and rd.status(12).state == RESUMABLE
    with rd.lease(30) as lease:
        assert rd.status(12).state == RUNNING and rd.status(12).holder.pid == os.getpid()
        assert lease.held
    assert rd.status(12).state == RESUMABLE and not rd.exists("lock.json")


def test_metrics_records_skip_a_torn_line(base):
    rd = RunDir(storage.join(base, "run"))
    rd.write_text("metrics.jsonl", '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    assert rd.last_record()["step"] == 2 and [r["step"] for r in rd.records()] == [1, 2]


def test_leftovers_are_removed_by_the_holder(tmp_path):
    rd = RunDir(str(tmp_path / "run"))
    rd.write_text("checkpoints/.staging/step_00000008/mp_rank_00_model_states.pt", "half")
    rd.write_text("checkpoints/.latest.tmp12345", "step_0")  # an older writer's temporary file
    rd.write_text(".config.yaml.tmp-1-abcd", "x")
    rd.write_text("config.yaml", "{}\n")
    _checkpoint(rd, 2)
    _checkpoint(rd, 4, complete=False)  # an upload that died before its meta.json
    removed = rd.clean_leftovers()
    assert len(removed) == 4 and rd.listdir() == ["checkpoints", "config.yaml"]
    assert rd.listdir("checkpoints") == ["step_00000002"]


def test_config_history_records_changes(tmp_path):
    from ditscale.config import config_changes, load_config

    a = load_config(None, ["model.windows=3@head", "optim.lr=0.001", "train.steps=60"]).model_dump(mode="json")
    b = load_config(None, ["model.windows=global", "optim.lr=0.01", "train.steps=62", "log.every=5"])
    trained, free = config_changes(a, b.model_dump(mode="json"))
    assert trained == {"model.windows": ["3@head", "global"], "optim.lr": [0.001, 0.01]}
    assert free == {"log.every": [10, 5], "train.steps": [60, 62]}
    older = json.loads(json.dumps(a))
    del older["run"]["lease_seconds"]  # a key the schema gained later is no change
    assert config_changes(older, a) == ({}, {})


# ---------------------------------------------------------------------------------------------------- lock
def test_second_holder_is_refused_with_the_holder_named(base):
    url = storage.join(base, "run", "lock.json")
    with Lease(url, lease_s=30):
        with pytest.raises(RunLockedError) as e:
            Lease(url, lease_s=30).acquire()
        msg = str(e.value)
        assert storage.join(base, "run") in msg and f"pid {os.getpid()} on {socket.gethostname()}" in msg
        assert "since 20" in msg and "last heartbeat" in msg
    Lease(url, lease_s=30).acquire().release()  # free again


def test_stale_lock_is_taken_over_after_its_lease(base, caplog):
    url = storage.join(base, "run", "lock.json")
    first = storage.join(base, "run", "lock.00000001.json")
    now = time.time()
    storage.write_bytes(first, Holder("x" * 32, "another-host", 4242, now - 100, now, 2.0, gen=1).to_json())
    with pytest.raises(RunLockedError, match="pid 4242 on another-host"):
        Lease(url).acquire()  # within the holder's lease: refused
    assert _wait(lambda: not Holder.parse(storage.read_bytes(first)).alive())  # 2 s without a heartbeat
    with caplog.at_level(logging.WARNING), Lease(url) as lease:
        assert lease.took_over.pid == 4242 and lease.gen == 2  # the next generation: a new fencing token
        assert Lease(url).current().id == lease.me.id
    assert any("took over the lease of a dead trainer" in r.getMessage() for r in caplog.records)


def test_racing_starters_get_one_generation_each_and_one_wins(base):
    """Eight threads start at once on a free run dir: create-exclusive (O_EXCL locally, If-None-Match: * on S3)
    lets exactly one take generation 1; the others see a live holder and refuse."""
    import threading

    url = storage.join(base, "race", "lock.json")
    won, refused = [], []
    go = threading.Barrier(8)

    def start():
        go.wait()
        try:
            won.append(Lease(url, lease_s=60).acquire())
        except RunLockedError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert len(won) == 1 and len(refused) == 7 and won[0].gen == 1
        assert Lease(url).generations() == [1]
    finally:
        for lease in won:
            lease.release()


def test_a_live_holder_of_the_older_single_lock_file_is_respected(base):
    url = storage.join(base, "run", "lock.json")
    now = time.time()
    storage.write_bytes(url, Holder("z" * 32, "old-host", 77, now, now, 600).to_json())
    with pytest.raises(RunLockedError, match="an older ditscale"):
        Lease(url).acquire()
    storage.write_bytes(url, Holder("z" * 32, "old-host", 77, now - 900, now - 700, 600).to_json())  # dead
    with Lease(url) as lease:
        assert lease.gen == 1
    assert not storage.exists(url)  # the dead holder's file is gone


def test_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    url = str(tmp_path / "run" / "lock.json")
    code = (
        "import sys, time; from ditscale.io.lock import Lease; "
        f"Lease({url!r}, lease_s=600).acquire(); print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
            Lease(url).acquire()
    finally:
        proc.kill()  # kill -9: no release
        proc.wait()
    with Lease(url) as lease:  # the lease is 600 s, but the process is gone
        assert lease.took_over.pid == proc.pid


def test_junk_lock_file_is_nobody(base):
    url = storage.join(base, "run", "lock.json")
    storage.write_bytes(url, b"\xff not json")
    with Lease(url) as lease:
        assert lease.held and lease.took_over is None


def test_holder_learns_it_lost_the_lock_and_its_fence_closes(base):
    url = storage.join(base, "run", "lock.json")
    lease = Lease(url, lease_s=1.0).acquire()  # heartbeat every 0.5 s
    lease.check("write")  # provably held
    try:
        now = time.time()
        thief = Holder("y" * 32, "thief", 1, now, now, 600, gen=lease.gen + 1)
        storage.write_bytes(storage.join(base, "run", f"lock.{lease.gen + 1:08d}.json"), thief.to_json())
        assert _wait(lambda: lease.lost)
        with pytest.raises(LeaseLostError, match="taken over by pid 1 on thief"):
            lease.check("write metrics")
        mine = storage.read_bytes(storage.join(base, "run", f"lock.{lease.gen:08d}.json"))
        time.sleep(1.2)
        assert storage.read_bytes(storage.join(base, "run", f"lock.{lease.gen:08d}.json")) == mine  # no more beats
    finally:
        lease.release()
    assert Lease(url).current().host == "thief"  # not ours: release left it alone


def test_a_holder_that_cannot_confirm_its_lease_stops_writing(tmp_path):
    """No confirmed heartbeat for lease - margin seconds (a paused process, a store that does not answer): the fence
    closes, even though no other trainer has taken over yet."""
    lease = Lease(str(tmp_path / "run" / "lock.json"), lease_s=4.0).acquire()
    lease._stop.set()  # the heartbeat thread stops, as in a paused process
    lease._thread.join(timeout=10)
    lease.check()
    time.sleep(4.0 - lease.margin + 0.2)
    assert not lease.provable()
    with pytest.raises(LeaseLostError, match="no confirmed heartbeat"):
        lease.check("publish")
    lease.release()
