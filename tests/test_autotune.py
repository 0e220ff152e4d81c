"""Halo tile choice by measurement: cached per process and on disk, deterministic on ties, safe for concurrent
writers, invisible to the global RNG. Tests never assert on which tile is fastest (that is the machine's answer)."""

import importlib
import json
import subprocess
import sys

import pytest
import torch

from ditscale.errors import ConfigError
from ditscale.io import storage
from ditscale.model import autotune

A = importlib.import_module("ditscale.model.attention")  # (ditscale.model.attention is also a function's name)


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    path = tmp_path / "autotune.json"
    monkeypatch.setenv("DITSCALE_AUTOTUNE_CACHE", str(path))
    monkeypatch.delenv("DITSCALE_HALO_TILE", raising=False)
    monkeypatch.setattr(autotune, "_cpu_load", lambda: 0.0)  # a quiet machine, whatever the test machine's load
    autotune.forget()
    yield path
    autotune.forget()


def test_measured_once_then_memory_then_disk(cache, monkeypatch):
    rng = torch.get_rng_state()
    t = A.choose_tile(16, 16, 3, 2, 8, torch.float32, "cpu")
    assert torch.equal(torch.get_rng_state(), rng)  # timing used its own generator: runs stay reproducible
    assert t in A.tile_candidates(16, 16, 3)
    (key,) = json.loads(cache.read_text())["entries"]
    assert key.startswith("halo|grid=16x16|k=3|heads=2|d=8|dtype=float32|") and f"torch={torch.__version__}" in key
    assert "threads=" in key and set(autotune.timings(key)) <= set(A.tile_candidates(16, 16, 3))

    def no_timing(*a, **k):
        raise AssertionError("timed again")

    monkeypatch.setattr(autotune, "measure", no_timing)
    assert A.choose_tile(16, 16, 3, 2, 8, torch.float32, "cpu") == t  # this process: memory
    autotune.forget()
    assert A.choose_tile(16, 16, 3, 2, 8, torch.float32, "cpu") == t  # a new process: the disk
    with pytest.raises(AssertionError, match="timed again"):
        A.choose_tile(16, 16, 5, 2, 8, torch.float32, "cpu")  # another problem is timed


def test_forced_and_model_modes_and_small_grids(monkeypatch):
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: pytest.fail("timed"))
    assert A.choose_tile(8, 8, 3, 2, 8) == A.estimate_tile(8, 8, 3)  # under MEASURE_MIN_TOKENS: the cost model
    assert A.choose_tile(2, 2, 3, 2, 8) == 0  # one tile would cover the grid: dense masked attention
    monkeypatch.setenv("DITSCALE_HALO_TILE", "model")
    assert A.choose_tile(32, 32, 3, 2, 8) == A.estimate_tile(32, 32, 3) > 0
    monkeypatch.setenv("DITSCALE_HALO_TILE", "6")
    assert A.choose_tile(32, 32, 3, 2, 8) == 6
    monkeypatch.setenv("DITSCALE_HALO_TILE", "big")
    with pytest.raises(ConfigError, match="DITSCALE_HALO_TILE"):
        A.choose_tile(32, 32, 3, 2, 8)


def test_ties_go_to_the_cost_model():
    prior = {4: 3.0, 8: 1.0, 16: 2.0, 0: 9.0}.__getitem__
    assert autotune.pick({4: 1.00, 8: 1.04, 16: 1.2, 0: 5.0}, prior) == 8  # within 5%: the cost model's favourite
    assert autotune.pick({4: 1.00, 8: 1.10, 16: 1.2, 0: 5.0}, prior) == 4  # clearly faster: the measurement
    assert autotune.pick({4: 1.0, 6: 1.0}, lambda c: 1.0) == 4  # a full tie: the smaller value


def test_loaded_machine_keeps_its_choice_in_memory(cache, monkeypatch):
    monkeypatch.setattr(autotune, "_cpu_load", lambda: 1e6)
    t = A.choose_tile(16, 16, 3, 2, 8)
    assert not cache.exists() and A.choose_tile(16, 16, 3, 2, 8) == t


def test_measures_inside_inference_mode_and_autocast(cache):
    qkv = torch.randn(1, 256, 3, 2, 8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = A.halo_qkv_attention(qkv, (16, 16), 5)
    assert out.shape == (1, 256, 2, 8) and "k=5" in cache.read_text()


def test_unwritable_cache_still_chooses(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("DITSCALE_AUTOTUNE_CACHE", str(blocker / "sub" / "autotune.json"))  # parent is a file
    assert A.choose_tile(16, 16, 3, 2, 8) in A.tile_candidates(16, 16, 3)


WRITER = """
import sys, torch
from ditscale.model import autotune
autotune._cpu_load = lambda: 0.0  # write whatever the machine's load
i = int(sys.argv[1])
for j in range(5):
    autotune.choose(f"test|writer={i}|j={j}", [1, 2], lambda c: (lambda: None), float, torch.device("cpu"))
"""


def test_concurrent_writers_keep_a_valid_file(cache):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(i)]) for i in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 3
    entries = json.loads(cache.read_text())["entries"]  # never torn; the lock serialises read-modify-write
    assert {k.split("|")[1] + "|" + k.split("|")[2] for k in entries} == {
        f"writer={i}|j={j}" for i in range(3) for j in range(5)
    }
    assert not [p.name for p in cache.parent.iterdir() if storage.is_tmp_name(p.name)]  # no write left behind
