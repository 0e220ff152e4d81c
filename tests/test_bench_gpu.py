"""`python -m ditscale bench gpu` in its tiny CPU form: every section runs, errors and budgets are recorded per
section, results are written as JSON and markdown. (The figures themselves need a GPU; tests never assert on time.)"""

import argparse
import json

import pytest

from ditscale import bench_gpu
from ditscale.cli.bench import ARGUMENTS


def _args(tmp_path, *argv):
    p = argparse.ArgumentParser()
    ARGUMENTS["gpu"](p)
    return p.parse_args(["--out", str(tmp_path), "--device", "cpu", *argv])


def _read(tmp_path):
    return json.loads((tmp_path / "bench-gpu.json").read_text())


def test_tiny_attention_and_model_sections(tmp_path):
    assert bench_gpu.run(_args(tmp_path, "--only", "a,b,c,d")) == 0
    data = _read(tmp_path)
    assert data["machine"]["tiny"] is True and data["machine"]["torch"]
    secs = data["sections"]
    assert [k for k in secs] == ["a", "b", "c", "d"] and all(s["status"] == "ok" for s in secs.values())
    a = secs["a"]["rows"]
    assert {r["backend"] for r in a} == {"flex", "halo"} and all(r["ok"] for r in a)
    assert all(isinstance(r["bwd_maxdiff"], float) for r in a if r["backend"] == "halo")
    assert {r["backend"] for r in secs["b"]["rows"]} == {"sdpa (dense, flash)", "sdpa_mask", "halo"}
    for key in "cd":
        rows = secs[key]["rows"]
        assert [(r["windows"], r["mode"]) for r in rows] == [
            ("global", "eager"), ("3,5@head", "eager"), ("global", "compiled"), ("3,5@head", "compiled")
        ]  # fmt: skip
        assert all(r["images_per_s"] > 0 and r["tflops"] > 0 and "error" not in r for r in rows)
        assert any("3,5@head / global" in s for s in secs[key]["summary"])
    md = (tmp_path / "bench-gpu.md").read_text()
    assert "## a. correctness" in md and "| tokens | k | dtype | backend |" in md


def test_a_failing_section_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("flex exploded")

    monkeypatch.setattr(bench_gpu, "check_correctness", broken)
    assert bench_gpu.run(_args(tmp_path, "--only", "ab")) == 1
    secs = _read(tmp_path)["sections"]
    assert secs["a"]["status"] == "error" and "flex exploded" in secs["a"]["error"]
    assert secs["b"]["status"] == "ok"


def test_an_exhausted_budget_is_recorded(tmp_path):
    assert bench_gpu.run(_args(tmp_path, "--only", "c", "--budget", "1")) == 0
    rows = _read(tmp_path)["sections"]["c"]["rows"]
    assert rows and all("skipped" in r for r in rows)  # every variant names what it would have needed


@pytest.mark.slow
def test_tiny_trainer_section(tmp_path):
    """Two `python -m ditscale train` processes (gloo, fp32): 4 steps, then resumed to 6."""
    assert bench_gpu.run(_args(tmp_path, "--only", "e")) == 0
    sec = _read(tmp_path)["sections"]["e"]
    assert sec["status"] == "ok", sec
    checks = sec["rows"][-1]
    assert checks["losses_finite"] and checks["resumed_not_restarted"] and checks["last_step"] == 6


def test_compiled_falls_back_to_graph_breaks_and_says_so(tmp_path, monkeypatch):
    def fake_step(model, batch, device, steps, warmup, compiled):
        if compiled and compiled[1]:
            raise RuntimeError("graph break in flex")
        return {"step_ms": 1.0, "images_per_s": 100.0 if compiled else 50.0, "warmup_s": 0.0, "loss": 1.0}

    monkeypatch.setattr(bench_gpu, "time_model_step", fake_step)
    assert bench_gpu.run(_args(tmp_path, "--only", "d")) == 0
    rows = _read(tmp_path)["sections"]["d"]["rows"]
    assert [(r["windows"], r["mode"], "error" in r) for r in rows] == [
        ("global", "eager", False), ("3,5@head", "eager", False),
        ("global", "compiled, fullgraph", True), ("global", "compiled (graph breaks)", False),
        ("3,5@head", "compiled, fullgraph", True), ("3,5@head", "compiled (graph breaks)", False),
    ]  # fmt: skip
    assert "graph break in flex" in rows[2]["error"]
    assert "compiled: 3,5@head / global images/s = 1.00" in " ".join(_read(tmp_path)["sections"]["d"]["summary"])
