"""The loggers behind one interface: a real training run writes TensorBoard event files (read back with
TensorBoard's own reader) and an offline W&B run (its .wandb file read back record by record); the plain log line;
a missing optional package names its extra."""

from __future__ import annotations

import glob
import json
import struct
import zlib
from pathlib import Path

import pytest

from ditscale.errors import ConfigError
from tests import trainers as T
from tests.needs import import_or_fail
from tests.trainers import tiny_config


def read_wandb_history(path: str) -> list[dict]:
    """The history rows of a .wandb file: a LevelDB-style log (32 KiB blocks of crc32/length/type records) of
    wandb_internal Record protobufs, as wandb's own datastore writes it."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = open(path, "rb").read()
    assert raw[:4] == b":W&B" and struct.unpack("<HB", raw[4:7]) == (0xBEE1, 0), "not a .wandb log"
    rows, pos, buf, block = [], 7, b"", 32768
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # the rest of a block too short for a header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data = raw[pos + 7 : pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + data) & 0xFFFFFFFF == crc, f"bad checksum at {pos}"
        pos += 7 + length
        buf = data if kind in (1, 2) else buf + data  # full, first | middle, last
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


@pytest.mark.slow
def test_tensorboard_and_wandb_offline(tmp_path, digits8_dir, warm_deepspeed):
    import_or_fail("tensorboard", "tensorboard")
    import_or_fail("wandb", "wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tmp_path / "c.yaml", str(digits8_dir / "manifest.json"))
    run_dir = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    loggers = "log.loggers=[prometheus,jsonl,tensorboard,wandb]"
    T.run_ok(T.alone(cfg, run_dir, "train.steps=4", "log.sample_every=2", loggers, env=env))
    jsonl = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert {"train/loss", "train/lr", "train/images_per_second", "train/grad_norm"} <= set(acc.Tags()["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in jsonl
    ]
    assert [e.step for e in acc.Images("samples")] == [2, 4]

    (wandb_file,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = [r for r in read_wandb_history(wandb_file) if "train/loss" in r]
    assert [(r["_step"], r["train/loss"]) for r in rows] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in jsonl
    ]
    images = [r for r in read_wandb_history(wandb_file) if r.get("samples/_type") == "image-file"]
    assert [r["_step"] for r in images] == [2, 4]
    run_files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "files"))[0]
    assert all((Path(run_files) / r["samples/path"]).is_file() for r in images)


def test_missing_logger_package_names_the_extra():
    from ditscale.train.loggers import _require

    with pytest.raises(ConfigError, match=r"pip install 'ditscale\[nosuch\]'"):
        _require("ditscale_no_such_module", "nosuch")


def test_plain_log_line():
    from ditscale.train.loggers import format_line

    rec = {"step": 40, "loss": 0.12341, "images_per_second": 512.3, "lr": 1e-3, "grad_norm": 0.41234,
           "data_wait_share": 0.032, "step_time": 0.25}  # fmt: skip
    line = format_line(rec, 300)
    assert line == "step 40/300 loss 0.1234 img/s 512.3 lr 1.00e-03 grad_norm 0.412 data_wait 3.2% eta 00:01:05"
    assert format_line({**rec, "grad_norm": None, "step_time": 0.0}, 300).endswith("grad_norm - data_wait 3.2% eta ?")


def test_every_logger_implements_the_protocol(tmp_path):
    """jsonl, prometheus, tensorboard, wandb and the console declare the Logger protocol and have its methods;
    make_loggers builds Loggers only."""
    from ditscale.config import load_config
    from ditscale.distenv import DistEnv
    from ditscale.io.rundir import RunDir
    from ditscale.observability import Metrics
    from ditscale.train import loggers as L

    for cls in (L.JsonlLogger, L.PrometheusLogger, L.TensorBoardLogger, L.WandbLogger, L.ConsoleLogger):
        assert L.Logger in cls.__mro__ and issubclass(cls, L.Logger), cls
        for name in ("log", "image", "sync", "close"):
            assert name in vars(cls), (cls, name)  # implemented, not the protocol's empty default
    cfg = load_config(None, ["log.loggers=[jsonl,prometheus]", "log.metrics_port=0", "log.progress=false"])
    metrics = Metrics({k: "x" for k in ("run_id", "run", "variant", "windows", "data_size", "rank")})
    run = L.RunValues(cfg.run.name, cfg.train.steps, cfg.train.global_batch, cfg.model_dump(mode="json"))
    made = L.make_loggers(cfg.log, run, RunDir(str(tmp_path / "run")), DistEnv(), metrics, start_step=0)
    assert [type(lg).__name__ for lg in made] == ["JsonlLogger", "PrometheusLogger", "ConsoleLogger"]
    assert all(isinstance(lg, L.Logger) for lg in made)
    for lg in made:
        lg.close()


class _Recorder:
    """A logger that keeps what it is given (declares nothing: the protocol is structural)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def log(self, step, record):
        self.calls.append(("log", step, dict(record)))

    def image(self, step, tag, path):
        self.calls.append(("image", step, tag))

    def sync(self):
        self.calls.append(("sync",))

    def close(self):
        self.calls.append(("close",))


class _NoNormEngine:
    """What TrainLog asks of the DeepSpeed engine: the global gradient norm, here None (none computed)."""

    def get_global_grad_norm(self):
        return None


def test_train_log_drives_its_loggers_and_exports_only_measured_values(tmp_path):
    """TrainLog talks to its loggers through the protocol only; before the first log step the exporter has no loss
    (absent, not 0), and a log step without a gradient norm leaves the norm absent while the record says None."""
    import torch

    from ditscale.config import load_config
    from ditscale.distenv import DistEnv
    from ditscale.io.rundir import RunDir
    from ditscale.train.loggers import Logger, RunValues, TrainLog

    cfg = load_config(None, ["log.every=2", "log.loggers=[prometheus]", "log.metrics_port=0", "train.steps=4"])
    labels = {"run_id": "feedbeef", "run": "r", "variant": "DiT-T/2", "windows": "global", "data_size": "8"}
    run = RunValues(cfg.run.name, cfg.train.steps, cfg.train.global_batch, {})
    tl = cfg.log.build(run, DistEnv(), RunDir(str(tmp_path / "run")), torch.device("cpu"), {**labels, "rank": "0"}, 0)
    assert isinstance(tl, TrainLog)  # the logging part is built from its own section
    rec = _Recorder()
    assert isinstance(rec, Logger)
    tl.loggers.append(rec)
    reg = tl.metrics.registry
    sample = {**labels, "rank": "0"}
    try:
        tl.after_step(1, torch.tensor(0.5), 0.1, 0.01, 1e-3, _NoNormEngine(), loader=None)
        assert reg.get_sample_value("ditscale_train_step", sample) == 1
        assert reg.get_sample_value("ditscale_train_loss", sample) is None  # no log step yet
        tl.after_step(2, torch.tensor(0.25), 0.1, 0.01, 1e-3, _NoNormEngine(), loader=None)
        assert reg.get_sample_value("ditscale_train_loss", sample) == 0.375
        assert reg.get_sample_value("ditscale_grad_norm", sample) is None
        tl.image(2, "samples", tmp_path / "g.png")
        tl.sync()
    finally:
        tl.close()
    kinds = [c[0] for c in rec.calls]
    assert kinds == ["log", "image", "sync", "close"], rec.calls
    assert rec.calls[0][1] == 2 and rec.calls[0][2]["grad_norm"] is None and rec.calls[0][2]["loss"] == 0.375
