"""A run's record never lies (issue #20): fenced writes, verified checkpoints, no training on NaN, config changes
applied or refused whole, damaged data that ends the run. Real trainer processes, on local disk and the S3 server.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from ditscale.io import storage
from ditscale.io.rundir import RunDir
from tests import trainers as T

pytestmark = pytest.mark.slow
LEASE = 6.0  # s: the paused trainer must lose it in a test's time (margin 1.5 s)


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity literals, as jq and JavaScript do."""

    def refuse(c):
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(text, parse_constant=refuse)


def snapshot(url: str) -> dict[str, str]:
    """Every file of a run dir (its checkpoints' staging area excepted) -> a hash of its bytes."""
    out = {}
    for rel in storage.find(url):
        if "/.staging/" in f"/{rel}":
            continue
        data = storage.read_bytes_or_none(storage.join(url, rel))
        out[rel] = hashlib.sha1(data or b"").hexdigest()
    return out


def stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------------- fencing
@pytest.mark.parametrize(
    ("store", "points"),
    [("local", ["step", "log", "sample", "checkpoint", "publish"]), ("s3", ["step", "publish"])],
)
def test_a_paused_trainer_writes_nothing_after_losing_its_lease(
    tmp_path, digits8_dir, warm_deepspeed, store, points, request
):
    """For each pause point, on a run dir of its own (all at once): trainer A pauses itself (SIGSTOP) at that point
    of step 4, past its lease; B takes the run over and finishes it; A is woken: it exits with 4 (lease lost) and
    not one file of the run dir changes after that, `latest` never moves back, every kept checkpoint is B's."""
    base = request.getfixturevalue("s3_server").bucket() if store == "s3" else str(tmp_path)
    runs = {p: storage.join(base, f"run-{p}") for p in points}
    cfg = T.tiny_config(
        tmp_path / "c.yaml",
        str(digits8_dir / "manifest.json"),
        run={"name": "t", "seed": 0, "lease_seconds": LEASE},
        train={"steps": 8},
        checkpoint={"every": 1, "keep": 3},
        log={"every": 1, "sample_every": 1},
    )
    paused = {p: T.alone(cfg, runs[p], env={f"DITSCALE_TEST_PAUSE_{p.upper()}": "3"}, delay=0.2) for p in points}
    for p, a in paused.items():
        assert T.wait_until(lambda a=a: stopped(a.pid) or a.proc.poll() is not None, timeout=900), p
        assert stopped(a.pid), (p, a.output[-3000:])
    time.sleep(LEASE + 1)  # every A's heartbeat is now older than its lease
    takers = {p: T.alone(cfg, runs[p]) for p in points}
    for p, b in takers.items():
        assert "took over the lease of a dead trainer" in T.run_ok(b, timeout=900), p
    before = {p: snapshot(runs[p]) for p in points}
    for a in paused.values():
        os.kill(a.pid, signal.SIGCONT)
    for p, a in paused.items():
        rc, out = a.finish(timeout=600)
        assert rc == 4 and "lease" in out[-2000:], (p, out[-3000:])
        assert snapshot(runs[p]) == before[p], p  # not one byte written by A after its loss
        lines = storage.read_text(storage.join(runs[p], "metrics.jsonl")).splitlines()
        steps = [strict_json(x)["step"] for x in lines]
        assert steps == sorted(set(steps)) and steps[-1] == 8, (p, steps)  # strictly increasing, to the end
        rd = RunDir(runs[p])
        assert rd.latest_hint() == "step_00000008" and rd.final()["gen"] == 2, p
        gens = {t: rd.read_json(f"checkpoints/{t}/meta.json")["lease_gen"] for t in rd.complete_tags()}
        assert set(gens.values()) == {2}, (p, gens)  # the kept checkpoints are all B's


# ------------------------------------------------------------------------------------------------------- integrity
def _damage(ck: Path, how: str) -> str:
    """Damage checkpoint folder `ck`; the name of the file that was damaged."""
    train = sorted(ck.glob("train-*.safetensors"))[0]
    if how == "flip":
        data = bytearray(train.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 256] = os.urandom(256)
        train.write_bytes(bytes(data))
        return train.name
    if how == "truncate":
        train.write_bytes(train.read_bytes()[: len(train.read_bytes()) // 3])
        return train.name
    if how == "ema":
        ema = ck / "ema.safetensors"
        data = bytearray(ema.read_bytes())
        data[-300:-44] = bytes(256)
        ema.write_bytes(bytes(data))
        return ema.name
    (ck / "meta.json").write_text("{ not json")
    return "meta.json"


def test_a_damaged_checkpoint_is_named_and_the_newest_intact_one_resumes(tmp_path, digits8_dir, warm_deepspeed):
    """One run to step 6 (checkpoints 2, 4, 6); per kind of damage to step 6 a copy of it resumes to step 8 (all at
    once) from step 4, naming the damaged file, with the losses of an undisturbed resume from step 4."""
    import shutil

    cfg = T.tiny_config(
        tmp_path / "c.yaml",
        str(digits8_dir / "manifest.json"),
        train={"steps": 6},
        checkpoint={"every": 2, "keep": 3},
        log={"sample_every": 0},
    )
    T.run_ok(T.alone(cfg, tmp_path / "run"))
    (tmp_path / "run" / "final.json").unlink()
    kinds = ["flip", "truncate", "ema", "meta"]
    for name in ["ref", *kinds]:
        shutil.copytree(tmp_path / "run", tmp_path / name)
    shutil.rmtree(tmp_path / "ref" / "checkpoints" / "step_00000006")  # the undisturbed resume from step 4
    damaged = {how: _damage(tmp_path / how / "checkpoints" / "step_00000006", how) for how in kinds}
    procs = {name: T.alone(cfg, tmp_path / name, "train.steps=8") for name in ["ref", *kinds]}
    outs = {name: T.run_ok(p) for name, p in procs.items()}
    ref = T.losses(tmp_path / "ref")[4:]
    for how in kinds:
        out = outs[how]
        assert "step_00000006" in out and damaged[how] in out and "skipping it" in out, how
        assert "resumed at step 4" in out, how
        assert T.losses(tmp_path / how)[4:] == ref, how  # steps 5..8, float for float
        names = sorted(p.name for p in (tmp_path / how / "checkpoints").iterdir() if p.name.startswith("step_"))
        assert names == ["step_00000004", "step_00000006", "step_00000008"], how  # step 4 never pruned


def test_export_of_a_damaged_ema_is_a_named_error(tmp_path, digits8_dir, warm_deepspeed):
    import subprocess
    import sys

    cfg = T.tiny_config(tmp_path / "c.yaml", str(digits8_dir / "manifest.json"), train={"steps": 2})
    T.run_ok(T.alone(cfg, tmp_path / "run"))
    ema = tmp_path / "run" / "checkpoints" / "step_00000002" / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:1000])
    cmd = [sys.executable, "-m", "ditscale", "export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "m.pt")]
    p = subprocess.run(cmd, cwd=T.ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "ema.safetensors has 1000 bytes" in p.stderr and "no intact checkpoint" in p.stderr


# ------------------------------------------------------------------------------------------------------ non-finite
def test_a_diverging_run_stops_and_is_recorded_as_diverged(tmp_path, digits8_dir, warm_deepspeed):
    cfg = T.tiny_config(
        tmp_path / "c.yaml",
        str(digits8_dir / "manifest.json"),
        optim={"lr": 1e6},
        train={"steps": 12},
        checkpoint={"every": 1, "keep": 20},
        log={"every": 4, "sample_every": 0},
    )
    run = tmp_path / "run"
    rc, out = T.alone(cfg, run).finish()
    assert rc == 3, out[-3000:]
    final = strict_json((run / "final.json").read_text())
    assert final["diverged"] is True and final["finished"] is False
    bad = final["step"]
    assert f"diverged at step {bad}" in out
    for line in (run / "metrics.jsonl").read_text().splitlines():  # strict JSON; nothing logged at or after it
        assert strict_json(line)["step"] < bad
    tags = RunDir(str(run)).complete_tags()
    assert tags and all(int(t[5:]) < bad for t in tags) and RunDir(str(run)).latest_hint() in tags
    assert RunDir(str(run)).status(12).state == "diverged"
    rc, out = T.alone(cfg, run).finish()  # the same config again: refused, nothing retried
    assert rc == 3 and "would diverge again" in out
    # A fix resumes from the checkpoint before the divergence (here one made by a test hook at step 5: lr=1e6
    # ruins the weights before they stop being finite, so no lr saves that run).
    cfg = T.tiny_config(tmp_path / "c2.yaml", str(digits8_dir / "manifest.json"), train={"steps": 8},
                        checkpoint={"every": 1, "keep": 20}, log={"sample_every": 0})  # fmt: skip
    rc, out = T.alone(cfg, tmp_path / "hooked", env={"DITSCALE_TEST_NONFINITE_AT": "5"}).finish()
    assert rc == 3 and "diverged at step 5" in out
    out = T.run_ok(T.alone(cfg, tmp_path / "hooked", "--allow-config-change", "optim.lr=5e-5"))
    assert "resumed at step 4" in out and strict_json((tmp_path / "hooked" / "final.json").read_text())["finished"]


@pytest.mark.parametrize("stage", [0, 2])
def test_skip_mode_skips_non_finite_steps_and_counts_them(tmp_path, digits8_dir, warm_deepspeed, stage):
    cfg = T.tiny_config(
        tmp_path / "c.yaml",
        str(digits8_dir / "manifest.json"),
        train={"steps": 6, "zero_stage": stage, "nonfinite": "skip", "max_skipped_steps": 2},
        checkpoint={"every": 2},
        log={"every": 1, "sample_every": 0},
    )
    out = T.run_ok(T.alone(cfg, tmp_path / "run", env={"DITSCALE_TEST_NONFINITE_AT": "3,4"}))
    assert out.count("update skipped") == 2
    recs = [strict_json(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in recs] == [0, 0, 1, 1, 0, 0]
    assert [r["loss"] is None for r in recs] == [False, False, True, True, False, False]
    assert all(r["loss"] is not None and r["loss"] == r["loss"] for r in recs if r["skipped_steps"] == 0)
    assert strict_json((tmp_path / "run" / "final.json").read_text())["skipped_steps"] == 2
    rc, out = T.alone(cfg, tmp_path / "again", env={"DITSCALE_TEST_NONFINITE_AT": "2,3,4"}).finish()
    assert rc == 3 and "3 non-finite steps in a row" in out


# ------------------------------------------------------------------------------------------------- config changes
def test_an_accepted_config_change_is_what_the_next_step_uses(tmp_path, digits8_dir, warm_deepspeed):
    cfg = T.tiny_config(
        tmp_path / "c.yaml",
        str(digits8_dir / "manifest.json"),
        optim={"lr": 1e-3},
        train={"steps": 2},
        log={"every": 1},
    )
    run = tmp_path / "run"
    T.run_ok(T.alone(cfg, run))
    T.run_ok(T.alone(cfg, run, "--allow-config-change", "optim.lr=5e-4", "optim.warmup_steps=8", "train.steps=4"))
    lrs = [(r["step"], r["lr"]) for r in map(strict_json, (run / "metrics.jsonl").read_text().splitlines())]
    # steps 1-2 at 1e-3; from step 3 the new rate with the new warm-up at optimizer step 2, 3: 5e-4 x 3/8, x 4/8
    assert lrs[:2] == [(1, 1e-3), (2, 1e-3)]
    assert lrs[2][0] == 3 and abs(lrs[2][1] - 5e-4 * 3 / 8) < 1e-12 and abs(lrs[3][1] - 5e-4 * 4 / 8) < 1e-12
    history = [json.loads(x) for x in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["event"] == "changed" and history[-1]["changes"]["optim.lr"] == [1e-3, 5e-4]


@pytest.mark.parametrize(
    "change",
    [
        ["--allow-config-change", "model.num_classes=12"],
        ["optim.lr=0.5"],
        ["--allow-config-change", "train.zero_stage=9"],
    ],
    ids=["fixed-key", "not-allowed", "invalid"],
)
def test_a_refused_resume_leaves_the_run_dir_as_it_was(tmp_path, digits8_dir, warm_deepspeed, change):
    cfg = T.tiny_config(tmp_path / "c.yaml", str(digits8_dir / "manifest.json"), train={"steps": 2})
    run = tmp_path / "run"
    T.run_ok(T.alone(cfg, run))
    before = snapshot(str(run))
    rc, out = T.alone(cfg, run, *change, "train.steps=4").finish()
    assert rc == 2, out[-2000:]
    key = change[-1].split("=")[0]
    assert key in out
    after = snapshot(str(run))
    after = {k: v for k, v in after.items() if not k.startswith("lock.")}  # the lease of the refused start
    assert after == {k: v for k, v in before.items() if not k.startswith("lock.")}
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 2


# ---------------------------------------------------------------------------------------------------- damaged data
def test_wholly_damaged_data_stops_with_the_shards_named_and_logged_once(tmp_path, digits8_dir, warm_deepspeed):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(digits8_dir, data)
    cfg = T.tiny_config(tmp_path / "c.yaml", str(data / "manifest.json"), train={"steps": 4}, checkpoint={"every": 2})
    T.run_ok(T.alone(cfg, tmp_path / "run", "train.steps=2"))
    shards = sorted(data.glob("train-*.tar"))
    for s in shards:
        s.write_bytes(s.read_bytes()[:1536])  # one sample header and a half: damaged
    rc, out = T.alone(cfg, tmp_path / "run").finish(timeout=600)
    assert rc == 2 and "damaged shards, more than data.max_damaged_shards=0" in out, out[-3000:]
    assert "stopped at step 2 (checkpoint saved)" in out
    named = [s.name for s in shards if s.name in out]
    assert named, out[-3000:]
    for s in named:  # each damaged shard is logged once, not once per attempt
        assert sum(f"shard {s}" in ln or f"/{s} is truncated" in ln for ln in out.splitlines()) <= 2, s
    assert RunDir(str(tmp_path / "run")).latest_tag() == "step_00000002"
