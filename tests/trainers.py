"""Starting real trainers from tests: torchrun or a single process, output read line by line, waits that return as
soon as their condition holds (bounded generously for a loaded 2-core machine; never asserted on)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 300  # s: process start + imports + DeepSpeed init on a loaded 2-core machine


def tiny_config(path: Path, digits: str, **sections) -> Path:
    """DiT-T/2 on 8x8 digits, 2 windowed blocks; `sections` update the YAML sections."""
    cfg = {
        "run": {"name": "t", "seed": 0},
        "model": {"variant": "DiT-T/2", "windows": "3,3,-,-", "input_size": 8, "in_channels": 1, "num_classes": 10},
        "diffusion": {"sample_steps": 5},
        "data": {"train": digits, "shuffle_buffer": 64},
        "train": {"steps": 8, "global_batch": 16, "micro_batch": 8, "zero_stage": 2},
        "checkpoint": {"every": 2, "keep": 2},
        "log": {"every": 1, "sample_every": 4, "metrics_port": 0, "progress": False},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


class Trainer:
    """A trainer process whose output is collected by a thread (so it never blocks on a full pipe)."""

    def __init__(self, cmd: list[str], env: dict | None = None):
        self.cmd = cmd
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, "MKL_CBWR": "AUTO", **(env or {})}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match:
        """The first output line matching `pattern`; fails the test if the process ends first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            while seen < len(self.lines):
                m = rx.search(self.lines[seen])
                seen += 1
                if m:
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                pytest.fail(f"trainer ended (rc {self.proc.returncode}) before {pattern!r}:\n{self.output[-4000:]}")
            time.sleep(0.05)
        pytest.fail(f"no {pattern!r} in {timeout}s:\n{self.output[-4000:]}")

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"trainer did not finish in {timeout}s:\n{self.output[-4000:]}")
        self._reader.join(timeout=60)
        return self.proc.returncode, self.output


def torchrun(config: Path, run_dir: Path | str, *overrides: str, delay: float = 0.0, nproc: int = 2,
             env: dict | None = None) -> Trainer:  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "ditscale", "train", "--config", str(config), "--run-dir", str(run_dir), *overrides]  # fmt: skip
    return Trainer(cmd, {"DITSCALE_TEST_STEP_DELAY": str(delay), **(env or {})})


def alone(config: Path, run_dir: Path | str, *overrides: str, delay: float = 0.0, env: dict | None = None) -> Trainer:
    """`python -m ditscale train` as a single process (no launcher)."""
    cmd = [sys.executable, "-m", "ditscale", "train", "--config", str(config), "--run-dir", str(run_dir), *overrides]
    return Trainer(cmd, {"DITSCALE_TEST_STEP_DELAY": str(delay), **(env or {})})


def run_ok(trainer: Trainer, timeout: float = 600) -> str:
    rc, out = trainer.finish(timeout)
    assert rc == 0, out[-6000:]
    return out


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())]


def wait_until(predicate, timeout: float = 120, poll: float = 0.1) -> bool:
    """True as soon as predicate() holds; False after `timeout` (a bound for loaded machines, not a target)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return bool(predicate())


def rank_pids(trainer: Trainer) -> dict[int, int]:
    """rank -> pid of the training processes torchrun started."""
    import psutil

    out = {}
    for child in psutil.Process(trainer.pid).children(recursive=True):
        try:
            env = child.environ()
        except (psutil.Error, OSError):
            continue
        if "RANK" in env and "ditscale" in " ".join(child.cmdline()):
            out[int(env["RANK"])] = child.pid
    return out


def pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
