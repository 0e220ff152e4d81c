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
