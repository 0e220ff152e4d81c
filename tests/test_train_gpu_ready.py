"""The training step is ready for a GPU, checked on CPU: no host syncs outside log steps, bf16 autocast training,
and `train.compile=true` training a few steps."""

from __future__ import annotations

import collections
import json
import os
import traceback
from pathlib import Path

import pytest
import torch

from tests import trainers as T
from tests.needs import skip_or_fail
from tests.ports import free_port
from tests.trainers import tiny_config

SYNC_METHODS = ("item", "__int__", "__float__", "__bool__", "tolist", "cpu")
# Host reads of host tensors: on a GPU these never run per step. The diffusion checks timesteps only when they are on
# the CPU; DiT.check_inputs names a bad label exactly on the CPU, and on an accelerator once, then with a device-side
# assert (tests/test_compile.py checks that path: no graph break, no sync).
CPU_ONLY = {"_check_t", "check_inputs"}


@pytest.fixture
def in_process_group(monkeypatch):
    """A process group of one in this process (what `python -m ditscale train` alone joins)."""
    import torch.distributed as dist

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_no_host_sync_in_steps_that_do_not_log(tmp_path, digits8_dir, in_process_group, monkeypatch, warm_deepspeed):
    """Patch every tensor method that waits for the device (item, int(), float(), bool(), tolist, .cpu()) and count
    the calls that ditscale's own code makes while training, outside the log steps' flush and non-finite check (the
    places that read the loss and grad norm back) and outside checkpoints. There must be none. DeepSpeed's optimizer
    makes its own (its overflow guard reads the gradient norm); they are printed, not counted against us."""
    from ditscale.config import load_config
    from ditscale.train import trainer as trainer_mod
    from ditscale.train.checkpoint import Checkpointer
    from ditscale.train.loggers import TrainLog

    cfg_file = tiny_config(tmp_path / "c.yaml", str(digits8_dir / "manifest.json"))
    cfg = load_config(cfg_file, [f"run.dir={tmp_path / 'run'}", "train.steps=8", "log.every=4", "log.sample_every=0",
                                 "checkpoint.every=1000", "train.zero_stage=0"])  # fmt: skip
    allowed = [0]
    ours: collections.Counter = collections.Counter()
    theirs: collections.Counter = collections.Counter()
    training = [False]

    def allow(fn):
        def wrapper(*a, **k):
            allowed[0] += 1
            try:
                return fn(*a, **k)
            finally:
                allowed[0] -= 1

        return wrapper

    monkeypatch.setattr(TrainLog, "flush", allow(TrainLog.flush))
    monkeypatch.setattr(Checkpointer, "save", allow(Checkpointer.save))
    monkeypatch.setattr(trainer_mod.Trainer, "_finish", allow(trainer_mod.Trainer._finish))
    # the non-finite check reads its device-side mark back only where something leaves the process (log steps)
    monkeypatch.setattr(trainer_mod.Trainer, "_check_finite", allow(trainer_mod.Trainer._check_finite))
    real_train = trainer_mod.Trainer.train

    def train(self):
        training[0] = True
        try:
            return real_train(self)
        finally:
            training[0] = False

    monkeypatch.setattr(trainer_mod.Trainer, "train", train)
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _orig=original, _name=name, **k):
            caller = traceback.extract_stack(limit=2)[0]
            if training[0] and not allowed[0] and caller.name not in CPU_ONLY:
                where = (_name, os.path.relpath(caller.filename, T.ROOT), caller.lineno)
                (ours if "/ditscale/" in caller.filename and "site-packages" not in caller.filename else theirs)[
                    where
                ] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    result = trainer_mod.run_training(cfg)
    monkeypatch.undo()
    assert result["finished"] and result["step"] == 8
    print("syncs outside ditscale's code (DeepSpeed, torch.optim):", dict(theirs))
    assert not ours, f"host syncs in ditscale's training step: {dict(ours)}"


def _has_cpu_bf16() -> bool:
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()) or bool(
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )


def test_bf16_autocast_training_on_cpu(tmp_path, digits8_dir, warm_deepspeed):
    if not _has_cpu_bf16():
        pytest.skip("this CPU has no native bf16 (avx512_bf16 / AMX): bf16 training would only be emulated")
    cfg = tiny_config(tmp_path / "c.yaml", str(digits8_dir / "manifest.json"))
    run_dir = tmp_path / "bf16"
    out = T.run_ok(T.alone(cfg, run_dir, "train.steps=3", "train.precision=bf16", "log.sample_every=0"))
    assert "bf16" in out
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(0 < r["loss"] < 10 for r in rows)
    meta = json.loads((run_dir / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert meta["precision"] == "bf16"


def test_compiled_training_a_few_steps(tmp_path, digits8_dir, warm_deepspeed):
    if os.system("command -v g++ >/dev/null") != 0:
        skip_or_fail("torch.compile on CPU needs a C++ compiler (g++)")
    cfg = tiny_config(tmp_path / "c.yaml", str(digits8_dir / "manifest.json"))
    run_dir = tmp_path / "compiled"
    T.run_ok(T.alone(cfg, run_dir, "train.steps=3", "train.compile=true", "log.sample_every=0"), timeout=1200)
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(0 < r["loss"] < 10 for r in rows)
