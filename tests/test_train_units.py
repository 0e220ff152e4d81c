"""Trainer parts that need no process group: run directories (local and fsspec URLs), checkpoint discovery, EMA,
activation checkpointing, the DeepSpeed config, warm-up, Prometheus exposition, JSON lines, sample grids."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest
import torch

from ditscale.config import load_config
from ditscale.errors import CheckpointError, ConfigError
from ditscale.io.rundir import RunDir, tag_for
from ditscale.train import engine as eng
from ditscale.train.checkpoint import load_for_eval
from ditscale.train.ema import EMA
from tests.ports import free_port


def _tiny_model(**kw):
    from ditscale.model import create_model

    torch.manual_seed(0)
    return create_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10, **kw)


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_rundir_roundtrip(tmp_path, kind):
    url = str(tmp_path / "run") if kind == "local" else f"memory://ditscale-test-{tmp_path.name}/run"
    rd = RunDir(url)
    assert rd.remote == (kind == "memory")
    rd.write_text("config.yaml", "a: 1\n")
    assert [n for n in rd.listdir() if n.startswith(".")] == []  # the atomic write left no temporary file
    assert rd.read_text("config.yaml") == "a: 1\n" and rd.exists("config.yaml")
    assert rd.read_text("nope.txt") is None and not rd.exists("nope.txt")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.pt").write_bytes(b"A")
    (src / "sub" / "b.pt").write_bytes(b"B")
    (src / "meta.json").write_text("{}")
    if rd.remote:
        rd.upload_tree(src, "checkpoints/step_00000001", skip=("meta.json",))
        assert not rd.exists("checkpoints/step_00000001/meta.json")
        dest = tmp_path / "dl"
        rd.download_tree("checkpoints/step_00000001", dest)
        assert (dest / "sub" / "b.pt").read_bytes() == b"B"
        rd.local_file("metrics.jsonl").write_text("{}\n")  # the writer makes the node-local mirror
        rd.upload("metrics.jsonl")
        assert rd.read_text("metrics.jsonl") == "{}\n"
    assert rd.listdir("checkpoints") == (["step_00000001"] if rd.remote else [])
    rd.rmtree("checkpoints")
    assert rd.listdir("checkpoints") == []


def _fake_checkpoint(rd: RunDir, step: int, complete: bool = True) -> None:
    rd.write_text(f"checkpoints/{tag_for(step)}/rank_00000.pt", "x")
    if complete:
        rd.write_text(f"checkpoints/{tag_for(step)}/meta.json", json.dumps({"step": step}))


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_latest_complete_checkpoint(tmp_path, kind):
    rd = RunDir(str(tmp_path / "run") if kind == "local" else f"memory://ditscale-latest-{tmp_path.name}/run")
    assert rd.latest_tag() is None
    _fake_checkpoint(rd, 2)
    _fake_checkpoint(rd, 4)
    _fake_checkpoint(rd, 6, complete=False)  # killed while writing: never taken
    rd.write_text("checkpoints/.staging/step_00000008/meta.json", "{}")
    assert rd.complete_tags() == ["step_00000002", "step_00000004"]
    assert rd.latest_tag() == "step_00000004"  # no `latest` file yet: the highest complete one
    for junk in (b"step_00000002", b"step_00000006", b"\xff\xfe\x00binary", b"", b"no such tag\n", b"step_99"):
        rd.write_bytes("checkpoints/latest", junk)  # stale, incomplete, undecodable, empty, garbage
        assert rd.latest_tag() == "step_00000004", junk


def test_load_for_eval_without_checkpoint_raises(tmp_path):
    with pytest.raises(CheckpointError, match="empty-run' does not exist"):
        load_for_eval(str(tmp_path / "empty-run"))
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        load_for_eval(str(tmp_path / "empty-run"))


def test_ema_matches_reference_update():
    model = _tiny_model()
    ema = EMA(model, decay=0.9)
    assert set(ema.state_dict()) == set(model.state_dict())
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, p in model.named_parameters():
        expected = before[name] * 0.9 + p.detach() * 0.1
        torch.testing.assert_close(ema.model.state_dict()[name], expected)
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training


def test_activation_checkpointing_keeps_names_and_gradients():
    a, b = _tiny_model(), _tiny_model()
    b.load_state_dict(a.state_dict())
    assert eng.apply_activation_checkpointing(b) == len(b.blocks)
    assert list(a.state_dict()) == list(b.state_dict())
    x, t, y = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    a.eval(), b.eval()
    a(x, t, y).square().mean().backward()
    b(x, t, y).square().mean().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_deepspeed_config_from_config():
    cfg = load_config(None, ["train.global_batch=64", "train.micro_batch=8", "train.zero_stage=3", "optim.grad_clip=0"])
    ds = eng.deepspeed_config(cfg.train, cfg.optim, world_size=2)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4 and ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_clipping"] == 0
    assert ds["bf16"]["enabled"] == torch.cuda.is_available()
    with pytest.raises(ConfigError, match="train.global_batch=64"):
        eng.grad_accumulation(cfg.train, world_size=3)


def test_warmup_factor():
    f = load_config(None, ["optim.warmup_steps=4"]).optim.lr_factor
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert load_config(None, []).optim.lr_factor(0) == 1.0


def test_prometheus_exporter_names_and_labels():
    from ditscale.observability import Metrics

    labels = {"run_id": "abc", "run": "r1", "variant": "DiT-T/2", "windows": "local@head", "data_size": "1000"}
    labels["rank"] = "0"
    port = free_port()
    m = Metrics(labels, port=port, addr="127.0.0.1")
    try:
        m.loss.set(0.5)
        m.step.set(3)
        m.samples.inc(48)
        m.step_time.observe(0.2)
        m.data_wait.inc(0.01)
        m.checkpoint_time.observe(1.5)
        m.set_skipped(2)
        m.set_skipped(2)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=120).read().decode()
    finally:
        m.close()
    lab = 'data_size="1000",rank="0",run="r1",run_id="abc",variant="DiT-T/2",windows="local@head"'
    for line in (
        f"ditscale_train_loss{{{lab}}} 0.5",
        f"ditscale_train_step{{{lab}}} 3.0",
        f"ditscale_samples_total{{{lab}}} 48.0",
        f"ditscale_skipped_samples_total{{{lab}}} 2.0",
        f"ditscale_step_time_seconds_count{{{lab}}} 1.0",
        f"ditscale_checkpoint_seconds_sum{{{lab}}} 1.5",
    ):
        assert line in body, line
    for name in ("ditscale_images_per_second", "ditscale_data_wait_seconds_total", "ditscale_grad_norm",
                 "ditscale_learning_rate", "ditscale_gpu_memory_allocated_bytes",
                 "ditscale_gpu_memory_reserved_bytes"):  # fmt: skip
        assert f"# TYPE {name.removesuffix('_total')}" in body


def test_exporter_on_a_busy_port_does_not_stop_training():
    from ditscale.observability import LABELS, Metrics

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        m = Metrics({k: "x" for k in LABELS}, port=s.getsockname()[1], addr="127.0.0.1")
        assert m.server is None
        m.close()


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_jsonl_truncates_steps_after_the_resumed_checkpoint(tmp_path, kind):
    from ditscale.train.loggers import JsonlLogger

    rd = RunDir(str(tmp_path / "run") if kind == "local" else f"memory://ditscale-jsonl-{tmp_path.name}/run")
    log = JsonlLogger(rd, start_step=0)
    for s in range(1, 6):
        log.log(s, {"step": s, "loss": float(s)})
    log.close()
    log = JsonlLogger(rd, start_step=3)
    log.log(4, {"step": 4, "loss": 40.0})
    log.close()
    assert [(r["step"], r["loss"]) for r in rd.records()] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB"), (4, "RGB")])
def test_sample_grid(tmp_path, channels, mode):
    from PIL import Image

    from ditscale.observability import save_grid

    path = save_grid(torch.rand(10, channels, 8, 8) * 2 - 1, tmp_path / "g.png", nrow=4, scale=2)
    img = Image.open(path)
    assert img.mode == mode and img.size == (2 * (4 * 10 + 2), 2 * (3 * 10 + 2))


def test_sampling_leaves_the_training_rng_alone():
    from ditscale.train.sampling import draw, grid_labels

    cfg = load_config(None, ["model.variant=DiT-T/2", "model.input_size=8", "model.in_channels=1",
                             "model.num_classes=10", "diffusion.sample_steps=3"])  # fmt: skip
    model = _tiny_model()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = draw(model, cfg, grid_labels(10, 4), seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = draw(model, cfg, grid_labels(10, 4), seed=5)
    assert torch.equal(a, b) and a.shape == (4, 1, 8, 8) and a.abs().max() <= 1


def test_stop_signals_are_recorded_not_fatal():
    import os
    import signal

    from ditscale.train import stop

    before = signal.getsignal(signal.SIGTERM)
    stop.install()
    try:
        assert stop.requested() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested() == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # the first request wins; the process keeps running
        assert stop.requested() == "SIGUSR1"
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) == before


def test_stale_build_lock_is_removed(tmp_path):
    import os
    import time

    fresh, stale = tmp_path / "a" / "lock", tmp_path / "b" / "lock"
    for p in (fresh, stale):
        p.parent.mkdir()
        p.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    eng._remove_stale_build_locks(tmp_path)
    assert fresh.exists() and not stale.exists()


def test_busy_metrics_port_falls_back_and_the_endpoint_is_published(tmp_path):
    from ditscale.distenv import DistEnv
    from ditscale.train.loggers import FileSD, start_metrics

    labels = {"run_id": "abc", "run": "r1", "variant": "DiT-T/2", "windows": "global", "data_size": "10", "rank": "0"}
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = load_config(None, [f"log.metrics_port={port}", f"log.file_sd={tmp_path / 'sd'}"])
        m = start_metrics(cfg.log, cfg.train.steps, DistEnv(), labels)
        try:
            assert m.server is not None and m.port != port  # another run holds the port: a free one instead
            sd = FileSD(cfg.log.file_sd, m, labels)
            target = json.loads((tmp_path / "sd" / "r1-rank0-abc.json").read_text())
            assert target[0]["targets"][0].endswith(f":{m.port}")
            assert target[0]["labels"] == {"ditscale_run_id": "abc", "ditscale_run": "r1", "ditscale_rank": "0"}
            body = urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=120).read().decode()
            assert 'run="r1"' in body
            sd.close()
            assert not (tmp_path / "sd" / "r1-rank0-abc.json").exists()
        finally:
            m.close()
