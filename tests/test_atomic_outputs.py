"""Exports and samples are whole or absent: a real `python -m ditscale export` / `sample` killed with SIGKILL at each
rename of its output (tests/kill_points.py picks the moment) never leaves files of two exports that load as one,
nor a truncated image at the final path. Output paths carry a comment mark, braces and spaces (taken as given).

The run is real: DiT-T/2 on 8x8 digits, 4 steps, checkpoints at steps 2 and 4; the older export is of step 2,
the one killed while it replaces it is of step 4."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from ditscale.errors import CheckpointError
from ditscale.model import load_exported
from ditscale.model.export import read_export
from tests.trainers import Trainer, alone, run_ok, tiny_config

pytestmark = pytest.mark.slow
OLD, NEW = "step_00000002", "step_00000004"


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits8_dir):
    tmp = tmp_path_factory.mktemp("atomic")
    config = tiny_config(tmp / "c.yaml", str(digits8_dir / "manifest.json"),
                         train={"steps": 4, "global_batch": 8, "micro_batch": 8, "zero_stage": 0},
                         checkpoint={"every": 2, "keep": 2}, log={"sample_every": 0})  # fmt: skip
    run_dir = tmp / "run"
    run_ok(alone(config, run_dir, env={"OMP_NUM_THREADS": "1"}))
    # each checkpoint's EMA weights, exported whole (not killed): what a loaded export must equal exactly
    from ditscale.train.export import export

    weights = {}
    for tag in (OLD, NEW):
        paths = export(str(run_dir), str(tmp / "ref" / tag), tag=tag)[1]
        weights[tag] = read_export(paths["safetensors"])[0]
        weights[tag].pop("ditscale_windows")
    assert not all(torch.equal(weights[OLD][k], weights[NEW][k]) for k in weights[OLD])
    return {"dir": str(run_dir), "weights": weights}


def killed_at(point: str, watch: Path, *command: str) -> str:
    """Start `python -m ditscale COMMAND` that stops at `point` (tests/kill_points.py), SIGKILL it there; its output."""
    proc = Trainer([sys.executable, "-m", "tests.kill_points", point, str(watch), "--", *command],
                   {"OMP_NUM_THREADS": "1"})  # fmt: skip
    proc.wait_for(r"KILL POINT")
    os.killpg(proc.pid, signal.SIGKILL)
    rc, out = proc.finish(timeout=120)
    assert rc == -signal.SIGKILL, out
    return out


def same(state: dict, want: dict) -> bool:
    return set(state) == set(want) and all(torch.equal(state[k], want[k]) for k in want)


def check_whole(path: Path, weights: dict) -> str | None:
    """Load `path` as an export: either a named CheckpointError, or the weights of exactly the checkpoint its
    description names. Returns that tag (None when refused)."""
    try:
        state, meta = read_export(path)
    except CheckpointError as e:
        assert "does not belong to the export" in str(e) or "not found" in str(e), e
        return None
    state.pop("ditscale_windows", None)
    assert same(state, weights[meta["checkpoint"]]), f"{path}: weights of another export than {meta['checkpoint']}"
    return meta["checkpoint"]


# Renames done when killed (NAME.pt, then NAME.safetensors, then NAME.json) -> what each name loads: the tag of a
# whole export, or None for a named refusal (files of two exports). NAME.safetensors is whole by itself.
EXPECTED = {
    0: {"m.pt": OLD, "m.safetensors": OLD, "m.json": OLD, "m": OLD},
    1: {"m.pt": None, "m.safetensors": OLD, "m.json": OLD, "m": OLD},
    2: {"m.pt": None, "m.safetensors": NEW, "m.json": None, "m": None},
    3: {"m.pt": NEW, "m.safetensors": NEW, "m.json": NEW, "m": NEW},
}


@pytest.mark.parametrize("point, renamed", [("before:1", 0), ("before:2", 1), ("before:3", 2), ("after:3", 3)])
def test_export_killed_while_replacing_an_older_one(run, tmp_path, point, renamed):
    from ditscale.train.export import export

    out = tmp_path / "exports #2 {x}"
    export(run["dir"], str(out / "m.pt"), tag=OLD)
    killed_at(point, out, "export", "--run", run["dir"], "--out", str(out / "m.pt"), "--tag", NEW)
    got = {name: check_whole(out / name, run["weights"]) for name in EXPECTED[renamed]}
    assert got == EXPECTED[renamed]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["m.json", "m.pt", "m.safetensors"]
    # exporting again makes the set whole
    export(run["dir"], str(out / "m.pt"), tag=NEW)
    assert {check_whole(out / n, run["weights"]) for n in EXPECTED[3]} == {NEW}


@pytest.mark.parametrize("point", ["before:1", "after:1"])
def test_diffusers_export_killed_while_replacing_an_older_one(run, tmp_path, point):
    from tests.needs import import_or_fail

    import_or_fail("diffusers", "diffusers")
    from ditscale.interop.diffusers import read_diffusers
    from ditscale.train.export import export

    out = tmp_path / "hf #1 {y}"
    folder = out / "transformer"
    export(run["dir"], str(folder), tag=OLD, fmt="diffusers")
    cmd = ["export", "--run", run["dir"], "--out", str(folder), "--format", "diffusers", "--tag", NEW]
    killed_at(point, out, *cmd)
    config, _ = read_diffusers(folder)
    tag = config["_ditscale"]["checkpoint"]
    assert tag == (OLD if point == "before:1" else NEW)
    model = load_exported(folder)
    want = run["weights"][tag]
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items() if k != "pos_embed")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_sample_killed_before_its_image_is_in_place(run, tmp_path):
    from PIL import Image

    from ditscale.observability import save_grid

    out = tmp_path / "samples #3 {z}"
    old = save_grid(torch.zeros(4, 1, 8, 8), out / "grid.png")
    before = old.read_bytes()
    cmd = ["sample", "--run", run["dir"], "--out", str(out / "grid.png"), "--n", "4", "--steps", "2"]
    killed_at("before:1", out, *cmd)
    assert (out / "grid.png").read_bytes() == before  # the old image, whole; never a part of the new one
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == ["grid.png"]
    proc = Trainer([sys.executable, "-m", "ditscale", *cmd], {"OMP_NUM_THREADS": "1"})
    rc, log = proc.finish(timeout=600)
    assert rc == 0, log
    with Image.open(out / "grid.png") as img:
        img.verify()
    assert (out / "grid.png").read_bytes() != before and f"wrote {out / 'grid.png'} (4 samples" in log
