"""One owner for a run, with real trainer processes: a held run dir refuses a second trainer (local and s3://), ranks
never outlive their launcher, config drift is refused (or allowed and recorded), `latest` of any content, a full
disk, an object-store outage during a save, shards missing at start and a data error mid-run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from ditscale.io.lock import Holder
from ditscale.io.rundir import RunDir
from tests import trainers as T
from tests.needs import skip_or_fail
from tests.trainers import losses, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(digits8_dir) -> str:
    return str(digits8_dir / "manifest.json")


@pytest.fixture(scope="module")
def config(tmp_path_factory, digits) -> Path:
    return tiny_config(tmp_path_factory.mktemp("cfg") / "tiny.yaml", digits, log={"sample_every": 0})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config, warm_deepspeed) -> Path:
    """8 steps by 2 processes: what every interrupted-and-resumed 2-process run must reproduce exactly."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    T.run_ok(T.torchrun(config, run_dir))
    return run_dir


def copy_shards(digits: str, dest: Path) -> Path:
    src = Path(digits).parent
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("test"))
    return dest / "manifest.json"


# ------------------------------------------------------------------------------------------------ one writer
def test_second_trainer_on_a_held_run_dir_exits_and_touches_nothing(tmp_path, config, warm_deepspeed):
    run_dir = tmp_path / "held"
    first = T.torchrun(config, run_dir, "train.steps=400", delay=0.5)  # runs until it is told to stop
    first.wait_for(r"step 2/400 ")
    holder = RunDir(str(run_dir)).holder()
    second = T.alone(config, run_dir, "train.steps=400")
    rc, out = second.finish(timeout=600)
    assert rc != 0
    assert f"run dir {run_dir} is held by a live trainer: pid {holder.pid} on {holder.host}, since" in out
    assert first.proc.poll() is None  # the first run went on
    for pid in T.rank_pids(first).values():
        os.kill(pid, signal.SIGTERM)
    T.run_ok(first)
    steps = [s for s, _ in losses(run_dir)]
    assert steps == list(range(1, steps[-1] + 1))  # no duplicate or out-of-order rows
    assert RunDir(str(run_dir)).latest_tag() == f"step_{steps[-1]:08d}" and RunDir(str(run_dir)).holder() is None


def test_held_and_stale_locks_on_object_storage(s3_server, tmp_path, config, warm_deepspeed):
    url = s3_server.bucket() + "/runs/held"
    rd = RunDir(url)
    with rd.lease(60):  # a live holder (this test process), heartbeating to the real S3 server
        rc, out = T.alone(config, url, "train.steps=2").finish(timeout=600)
    assert rc != 0 and f"run dir {url} is held by a live trainer: pid {os.getpid()}" in out
    assert rd.listdir() == ["lock.00000001.json"]  # the refused trainer wrote nothing (that is our released lease)
    now = time.time()  # a holder on another host whose heartbeat stopped 10 minutes ago: dead
    dead = Holder("d" * 32, "gone-host", 77, now - 3600, now - 600, 120, gen=1)
    rd.write_bytes("lock.00000001.json", dead.to_json())
    out = T.run_ok(T.alone(config, url, "train.steps=2"))
    assert "took over the lease of a dead trainer (pid 77 on gone-host" in out
    assert rd.is_done(2) and rd.holder() is None and rd.final()["gen"] == 2


def test_kill9_of_torchrun_stops_every_rank_and_frees_the_lock(tmp_path, config, reference):
    run_dir = tmp_path / "orphans"
    launcher = T.torchrun(config, run_dir, delay=1.5)
    launcher.wait_for(r"step 2/8 ")
    ranks = T.rank_pids(launcher)
    assert set(ranks) == {0, 1}
    t0 = time.monotonic()
    os.kill(launcher.pid, signal.SIGKILL)  # the launcher alone: its ranks are re-parented to init
    assert T.wait_until(lambda: not any(T.pid_alive(p) for p in ranks.values()), timeout=120), launcher.output[-3000:]
    print(f"ranks gone {time.monotonic() - t0:.1f} s after kill -9 of torchrun")
    assert "launcher (pid" in launcher.output and "died" in launcher.output
    assert RunDir(str(run_dir)).holder() is None
    T.run_ok(T.torchrun(config, run_dir))  # resumes from the checkpoint the ranks wrote on their way out
    assert losses(run_dir) == losses(reference)


# ------------------------------------------------------------------------------------------------ config drift
def test_config_drift_is_refused_then_allowed_and_recorded(tmp_path, config, warm_deepspeed):
    run_dir = tmp_path / "drift"
    T.run_ok(T.alone(config, run_dir, "train.steps=2"))
    rc, out = T.alone(config, run_dir, "model.windows=global", "optim.lr=0.01", "train.steps=3").finish()
    assert rc != 0
    assert "model.windows: '3,3,-,-' -> 'global'" in out and "optim.lr: 0.0001 -> 0.01" in out
    assert "--allow-config-change" in out
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["windows"] == "3,3,-,-" and saved["train"]["steps"] == 2  # untouched
    T.run_ok(T.alone(config, run_dir, "train.steps=3"))  # raising train.steps is always allowed
    T.run_ok(T.alone(config, run_dir, "--allow-config-change", "optim.lr=0.01", "train.steps=4"))
    history = [json.loads(x) for x in (run_dir / "config_history.jsonl").read_text().splitlines()]
    assert [(h["event"], h["step"]) for h in history] == [("created", 0), ("resumed", 2), ("changed", 3)]
    assert history[-1]["changes"] == {"optim.lr": [0.0001, 0.01], "train.steps": [3, 4]}
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 0.01
    assert [s for s, _ in losses(run_dir)] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------ latest, leftovers
def test_latest_of_any_content_and_dead_writers_leftovers(tmp_path, config, warm_deepspeed):
    import sys

    run_dir = tmp_path / "junk"
    T.run_ok(T.alone(config, run_dir, "train.steps=4"))
    (run_dir / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00\x01 not a tag")
    (run_dir / "checkpoints" / ".staging" / "step_00000006").mkdir(parents=True)
    (run_dir / "checkpoints" / ".staging" / "step_00000006" / "half.pt").write_bytes(b"x")
    (run_dir / "checkpoints" / ".latest.tmp4242").write_text("step_00000006")
    base = [sys.executable, "-m", "ditscale"]
    for cmd in (["export", "--run", str(run_dir), "--out", str(tmp_path / "w" / "ema.pt")],
                ["sample", "--run", str(run_dir), "--out", str(tmp_path / "g.png"), "--n", "2", "--steps", "2"],
                ["eval", "locality", "--run", str(run_dir), "--split", "train", "--images", "2",
                 "--timesteps", "500"]):  # fmt: skip
        p = subprocess.run(base + cmd, cwd=T.ROOT, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((run_dir / "eval" / "locality.json").read_text())["checkpoint"] == "step_00000004"
    out = T.run_ok(T.alone(config, run_dir, "train.steps=5"))
    assert "resumed at step 4" in out
    assert not (run_dir / "checkpoints" / ".latest.tmp4242").exists()
    assert not (run_dir / "checkpoints" / ".staging" / "step_00000006").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000005"


# ------------------------------------------------------------------------------------------------ failing saves
def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode == 0


def test_disk_full_during_a_save_names_the_path_and_keeps_the_last_checkpoint(tmp_path, config, warm_deepspeed):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "20m"):  # one 14 MB checkpoint fits, the second does not
        skip_or_fail("needs root and mount(8) for a small tmpfs")
    try:
        run_dir = disk / "run"
        rc, out = T.alone(config, run_dir, "train.steps=4", "checkpoint.keep=1").finish()
        assert rc != 0
        assert f"checkpoint {run_dir}/checkpoints/step_00000004: writing failed: No space left on device" in out
        assert "the newest complete checkpoint is still step_00000002" in out
        assert "Traceback" not in out.split("error:")[-1]
        rd = RunDir(str(run_dir))
        assert (
            rd.latest_tag() == "step_00000002"
            and not (run_dir / "checkpoints" / ".staging" / "g1" / "step_00000004").exists()
        )
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
        T.run_ok(T.alone(config, run_dir, "train.steps=4", "checkpoint.keep=1"))
        assert rd.is_done(4) and [s for s, _ in losses(run_dir)] == [1, 2, 3, 4]
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_store_outage_during_a_save(s3_proxy, tmp_path, config, warm_deepspeed):
    """A 10 s outage of the real S3 server (behind a proxy) during a save is survived, and the losses are those of
    an undisturbed run; a longer outage than the retry budget ends the run with a named error and the previous
    checkpoint intact."""
    reference = tmp_path / "reference"
    T.run_ok(T.alone(config, reference, "train.steps=6"))
    url = s3_proxy.bucket() + "/runs/outage"
    env = {**s3_proxy.env, "DITSCALE_STORAGE_RETRY_SECONDS": "90"}
    trainer = T.alone(config, url, "train.steps=6", delay=1.0, env=env)
    trainer.wait_for(r"step 3/6 ")
    s3_proxy.outage(10.0)  # the step-4 checkpoint is uploaded during it
    out = T.run_ok(trainer)
    assert "retry" in out
    rd = RunDir(url)
    assert rd.is_done(6) and [(r["step"], r["loss"]) for r in rd.records()] == losses(reference)

    url = s3_proxy.bucket() + "/runs/long-outage"
    env = {**s3_proxy.env, "DITSCALE_STORAGE_RETRY_SECONDS": "4"}
    trainer = T.alone(config, url, "train.steps=6", delay=1.0, env=env)
    trainer.wait_for(r"step 3/6 ")
    s3_proxy.outage(600)
    rc, out = trainer.finish()
    s3_proxy.restore()
    assert rc != 0
    assert f"checkpoint {url}/checkpoints/step_00000004: uploading failed: cannot upload to {url}/checkpoints/" in out
    assert "the newest complete checkpoint is still step_00000002" in out
    assert RunDir(url).latest_tag() == "step_00000002"


# ------------------------------------------------------------------------------------------------ data
def test_missing_shard_is_an_error_before_the_first_step(tmp_path, digits, config):
    manifest = copy_shards(digits, tmp_path / "shards")
    gone = sorted(manifest.parent.glob("*.tar"))[3]
    gone.unlink()
    run_dir = tmp_path / "run"
    rc, out = T.alone(config, run_dir, f"data.train={manifest}").finish()
    assert rc != 0 and f"shards are missing: {gone}" in out
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


def test_data_error_mid_run_checkpoints_the_last_finished_step(tmp_path, digits, config, warm_deepspeed):
    manifest = copy_shards(digits, tmp_path / "shards")
    saved = tmp_path / "saved"
    run_dir = tmp_path / "run"
    overrides = (f"data.train={manifest}", "train.steps=40", "checkpoint.every=100")
    trainer = T.alone(config, run_dir, *overrides, delay=0.2)
    trainer.wait_for(r"step 2/40 ")
    shutil.copytree(manifest.parent, saved)
    for p in manifest.parent.glob("*.tar"):
        p.unlink()  # the store loses its shards while the run is on them
    rc, out = trainer.finish()
    assert rc != 0 and "does not exist" in out and "checkpoint saved" in out
    last = losses(run_dir)[-1][0]
    assert RunDir(str(run_dir)).latest_tag() == f"step_{last:08d}"  # the last finished step was kept
    for p in saved.glob("*.tar"):
        shutil.copy(p, manifest.parent / p.name)
    out = T.run_ok(T.alone(config, run_dir, *overrides))
    assert f"resumed at step {last}" in out and RunDir(str(run_dir)).is_done(40)
