"""The trainer for real: 2 processes under torchrun on CPU (gloo), DeepSpeed ZeRO-2 and ZeRO-3, tiny DiT-T/2 on
8x8 digits shards. Checkpoints, exact resume (the same floats), SIGTERM, `kill -9` of one rank, /metrics over HTTP.

All runs share one reference run (ZeRO-2, 8 steps, a checkpoint every 2 steps, every step logged); every
interrupted-and-resumed run must reproduce its losses exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from tests import trainers as T
from tests.ports import free_port
from tests.trainers import ROOT, losses, tiny_config

pytestmark = pytest.mark.slow

STEPS = 8


@pytest.fixture(scope="module")
def digits(digits8_dir) -> str:
    return str(digits8_dir / "manifest.json")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, digits) -> Path:
    return tiny_config(tmp_path_factory.mktemp("cfg") / "tiny.yaml", digits)


def wait_for_step(run_dir: Path, step: int, trainer: T.Trainer) -> None:
    trainer.wait_for(rf"step {step}/{STEPS} ")
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) >= step


def run_ok(config: Path, run_dir: Path | str, *overrides: str) -> str:
    return T.run_ok(T.torchrun(config, run_dir, *overrides))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config_file, warm_deepspeed) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    run_ok(config_file, run_dir)
    return run_dir


def test_zero2_run_layout(reference):
    final = json.loads((reference / "final.json").read_text())
    assert final["finished"] is True and final["step"] == STEPS
    assert [s for s, _ in losses(reference)] == list(range(1, STEPS + 1))
    ckpts = sorted(p.name for p in (reference / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000006", "step_00000008"]  # keep: 2
    assert (reference / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    files = {p.name for p in (reference / "checkpoints" / "step_00000008").iterdir()}
    # each rank wrote its share of the full per-parameter state; meta.json lists every file with its checksum
    assert files == {"ema.safetensors", "meta.json", "train-00000-000.safetensors", "train-00001-000.safetensors"}
    meta = json.loads((reference / "checkpoints" / "step_00000008" / "meta.json").read_text())
    assert meta["format"] == 2 and set(meta["files"]) == files - {"meta.json"} and meta["samples"] == 8 * 16
    assert meta["world_size"] == 2 and meta["zero_stage"] == 2 and meta["lease_gen"] == 1
    assert (reference / "samples" / "step_00000004.png").is_file()
    assert (reference / "samples" / "step_00000008.png").is_file()
    saved = yaml.safe_load((reference / "config.yaml").read_text())
    assert saved["model"]["windows"] == "3,3,-,-" and saved["run"]["dir"] == str(reference)
    history = [json.loads(x) for x in (reference / "config_history.jsonl").read_text().splitlines()]
    assert [(h["event"], h["step"], h["world_size"]) for h in history] == [("created", 0, 2)]
    assert json.loads((reference / "lock.00000001.json").read_text())["released"]  # released at the end


def test_exact_resume(tmp_path, config_file, reference):
    run_dir = tmp_path / "resumed"
    run_ok(config_file, run_dir, "train.steps=3")
    run_ok(config_file, run_dir)  # resumes from step 3 (the final checkpoint of the first part)
    assert losses(run_dir) == losses(reference)  # bit-for-bit


def test_rerun_of_finished_run_is_a_no_op(config_file, reference):
    before = (reference / "metrics.jsonl").read_text()
    out = run_ok(config_file, reference)
    assert "already finished" in out
    assert (reference / "metrics.jsonl").read_text() == before


def test_zero3(tmp_path, config_file, reference):
    from ditscale.train.checkpoint import load_for_eval, load_state_for_eval

    run_dir = tmp_path / "zero3"
    run_ok(config_file, run_dir, "train.zero_stage=3", "train.steps=4", "log.sample_every=0")
    ref = dict(losses(reference))
    for step, loss in losses(run_dir):
        assert loss == pytest.approx(ref[step], rel=1e-5)
    cfg, model = load_for_eval(str(run_dir))
    assert cfg.train.zero_stage == 3 and not model.training
    _, raw, tag = load_state_for_eval(str(run_dir), ema=False)
    assert tag == "step_00000004" and set(raw) == set(model.state_dict())
    # the partitions of both ranks, whole in the checkpoint: `ditscale export --raw` gives exactly those weights
    export = [sys.executable, "-m", "ditscale", "export", "--run", str(run_dir), "--raw", "--out", str(tmp_path / "r")]
    assert subprocess.run(export, cwd=ROOT, capture_output=True, timeout=600).returncode == 0
    ours = torch.load(tmp_path / "r.pt", weights_only=True)
    ours.pop("ditscale_windows", None)  # ditscale's marker of a windowed model (not a weight)
    assert set(ours) == set(raw) and all(torch.equal(raw[k], ours[k]) for k in ours)
    ema = load_state_for_eval(str(run_dir))[1]
    assert not torch.equal(ema["blocks.0.attn.qkv.weight"], raw["blocks.0.attn.qkv.weight"])  # raw, not the EMA


def test_sigterm_checkpoints_and_resumes_with_metrics_endpoint(tmp_path, config_file, reference):
    run_dir = tmp_path / "sigterm"
    port = free_port()
    proc = T.torchrun(config_file, run_dir, f"log.metrics_port={port}", delay=1.5)
    wait_for_step(run_dir, 3, proc)
    # Scrape both ranks' exporters over HTTP while the run is going.
    for rank in (0, 1):
        body = urllib.request.urlopen(f"http://127.0.0.1:{port + rank}/metrics", timeout=10).read().decode()
        for name in (
            "ditscale_train_loss",
            "ditscale_train_step",
            "ditscale_samples_total",
            "ditscale_images_per_second",
            "ditscale_step_time_seconds_bucket",
            "ditscale_data_wait_seconds_total",
            "ditscale_grad_norm",
            "ditscale_learning_rate",
            "ditscale_gpu_memory_allocated_bytes",
            "ditscale_gpu_memory_reserved_bytes",
            "ditscale_checkpoint_seconds_count",
            "ditscale_skipped_samples_total",
        ):
            assert name in body, name
        assert f'rank="{rank}"' in body and 'variant="DiT-T/2"' in body and 'windows="3,3,-,-"' in body
        assert 'data_size="' in body and 'run="t"' in body
    pids = T.rank_pids(proc)
    assert set(pids) == {0, 1}
    os.kill(pids[1], signal.SIGTERM)  # one rank only: all ranks must agree to stop at the same step
    rc, out = proc.finish(timeout=300)
    assert rc == 0, out[-6000:]
    assert not (run_dir / "final.json").exists()
    stopped = losses(run_dir)[-1][0]
    assert stopped < STEPS
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
    run_ok(config_file, run_dir)
    assert losses(run_dir) == losses(reference)
    assert json.loads((run_dir / "final.json").read_text())["finished"] is True


def test_kill9_of_one_rank_then_resume(tmp_path, config_file, reference):
    run_dir = tmp_path / "kill9"
    proc = T.torchrun(config_file, run_dir, delay=1.5)
    wait_for_step(run_dir, 3, proc)  # a complete checkpoint (step 2) exists
    pids = T.rank_pids(proc)
    os.kill(pids[1], signal.SIGKILL)
    rc, out = proc.finish(timeout=300)
    assert rc != 0
    assert not (run_dir / "final.json").exists()
    from ditscale.io.rundir import RunDir

    tag = RunDir(str(run_dir)).latest_tag()
    assert tag is not None and int(tag[5:]) >= 2
    run_ok(config_file, run_dir)
    assert losses(run_dir) == losses(reference)


def test_run_dir_on_object_storage(s3_server, tmp_path, config_file, reference):
    """run.dir = s3://...: checkpoints uploaded (meta.json, then `latest`), resume downloads them."""
    from ditscale.io.rundir import RunDir
    from ditscale.train.checkpoint import load_for_eval

    url = s3_server.bucket() + "/runs/tiny"
    run_ok(config_file, url, "train.steps=4", "log.sample_every=4")
    rd = RunDir(url)
    assert rd.latest_tag() == "step_00000004" and rd.exists("samples/step_00000004.png")
    assert rd.exists("config.yaml") and rd.exists("checkpoints/step_00000004/train-00001-000.safetensors")
    run_ok(config_file, url, "train.steps=6")
    rows = [json.loads(x) for x in rd.read_text("metrics.jsonl").splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == losses(reference)[:6]
    assert json.loads(rd.read_text("final.json"))["step"] == 6
    cfg, model = load_for_eval(url)
    assert cfg.run.dir == url and not model.training


def test_single_process_then_export_and_sample(tmp_path, config_file, warm_deepspeed):
    """`python -m ditscale train` alone (no launcher), then `export` and `sample` from the run directory."""
    import torch
    from safetensors.torch import load_file

    from ditscale.model import load_exported
    from ditscale.train.checkpoint import load_for_eval

    run_dir = tmp_path / "alone"
    env = {**os.environ, "MKL_CBWR": "AUTO"}
    base = [sys.executable, "-m", "ditscale"]
    # One process, gradient accumulation 2 (16 = 8 x 2 x 1), activation checkpointing, LR warm-up.
    train = [*base, "train", "--config", str(config_file), "--run-dir", str(run_dir), "train.steps=2",
             "train.activation_checkpointing=true", "optim.warmup_steps=4", "log.sample_every=0"]  # fmt: skip
    out = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert json.loads((run_dir / "final.json").read_text())["world_size"] == 1
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["samples"], r["lr"]) for r in rows] == [(1, 16, 2.5e-5), (2, 32, 5e-5)]
    assert "accum 2" in out.stderr
    export = [*base, "export", "--run", str(run_dir), "--out", str(tmp_path / "w" / "ema.pt")]
    assert subprocess.run(export, cwd=ROOT, env=env, capture_output=True, timeout=300).returncode == 0
    cfg, ema_model = load_for_eval(str(run_dir))
    model = load_exported(tmp_path / "w" / "ema.pt")  # the exact windowed model, from the exported files alone
    assert model.windows == cfg.model.build().windows == [3, 3, None, None]
    pt = torch.load(tmp_path / "w" / "ema.pt", weights_only=True)  # reference names, plus the windows entry that
    assert pt.pop("ditscale_windows").tolist() == [3, 3, 0, 0]  # keeps a strict reference load from passing
    st = load_file(str(tmp_path / "w" / "ema.safetensors"))
    for k, v in ema_model.state_dict().items():
        assert torch.equal(st[k], v) and torch.equal(pt[k], v) and torch.equal(model.state_dict()[k], v)
    sample = [*base, "sample", "--run", str(run_dir), "--out", str(tmp_path / "grid.png"), "--n", "4", "--steps", "3"]
    assert subprocess.run(sample, cwd=ROOT, env=env, capture_output=True, timeout=300).returncode == 0
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_bench_train(tmp_path, config_file, warm_deepspeed):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "ditscale", "bench", "train", "--config", str(config_file), "--steps", "2",
           "--rounds", "1", "--warmup", "1", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["plain_images_per_s"] > 0 and res["deepspeed_images_per_s"] > 0 and 0 <= res["data_wait_share"] < 1
    assert "DeepSpeed" in proc.stdout and "data wait" in proc.stdout
