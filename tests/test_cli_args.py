"""Command lines take paths as given and `key=value` overrides before or after the options.

A path is never a YAML value or a template: `--run-dir "runs/a #2"` trains in `runs/a #2` (YAML would read
`runs/a`, the `#2` a comment), `--run-root "x {id}"` keeps its braces. Overrides may follow any option
(argparse alone stops collecting them at the first option after them)."""

from __future__ import annotations

import json
import sys

import pytest

from ditscale.cli import build_parser, main
from tests.trainers import alone, run_ok, tiny_config

ODD = "a #2 {id} 'q' \"d\" x: y"  # a comment mark, braces, quotes, a colon and spaces: all part of the name


def parse(monkeypatch, argv: list[str]):
    monkeypatch.setattr(sys, "argv", ["ditscale", *argv])  # build_parser adds only the chosen command's options
    return build_parser().parse_args(argv)


@pytest.mark.parametrize(
    "argv, dest",
    [
        (["train", "--config", ODD, "--run-dir", ODD], ("config", "run_dir")),
        (["export", "--run", ODD, "--out", ODD], ("run", "out")),
        (["sample", "--run", ODD, "--out", ODD], ("run", "out")),
        (["eval", "psnr-gap", "--run", ODD, "--train", ODD, "--test", ODD], ("run", "train", "test")),
        (["eval", "pair", "--runs", ODD, ODD, "--out", ODD], ("out",)),
        (["eval", "fid", "--run", ODD, "--inception-weights", ODD, "--ref", ODD, "--cache", ODD], ("run", "cache")),
        (["eval", "study", "--out", ODD], ("out",)),
        (["report", "--grid", ODD, "--out", ODD], ("out",)),
        (["data", "build", "folder", "--src", ODD, "--out", ODD, "--resolution", "8"], ("src", "out")),
        (["data", "subset", "--manifest", ODD, "--size", "3", "--out", ODD], ("manifest", "out")),
        (["grid", ODD, "--run-root", ODD, "--collect", ODD], ("grid", "run_root", "collect")),
    ],
)
def test_path_options_are_taken_as_given(monkeypatch, argv, dest):
    args = parse(monkeypatch, argv)
    for d in dest:
        assert getattr(args, d) == ODD, d


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "a.b=1", "--config", "c.yaml", "c.d=2", "--run-dir", "r", "e.f=3", "--allow-config-change", "g.h=4"],
        ["grid", "g.yaml", "a.b=1", "--run-root", "r", "c.d=2", "--json", "e.f=3", "g.h=4"],
        ["bench", "train", "a.b=1", "--config", "c.yaml", "c.d=2", "--steps", "1", "e.f=3", "g.h=4"],
    ],
)
def test_overrides_before_and_after_options(monkeypatch, argv):
    args = parse(monkeypatch, argv)
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=3", "g.h=4"]


def test_grid_run_root_is_literal_and_overrides_follow_options(capsys, tmp_path):
    root = tmp_path / ODD
    argv = ["grid", "digits-test", "train.steps=7", "--run-root", str(root), "--json", "log.every=3"]
    assert main(argv) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [r["run_dir"] for r in runs] == [str(root / r["id"]) for r in runs] and len(runs) == 2
    assert {(r["config"]["train"]["steps"], r["config"]["log"]["every"]) for r in runs} == {(7, 3)}


@pytest.mark.slow
def test_train_run_dir_is_literal(tmp_path, digits8_dir):
    """Two runs whose names YAML would both read as `runs/a`: each trains in its own folder, and the second is not
    taken for the finished first. Overrides come after --run-dir."""
    config = tiny_config(tmp_path / "c.yaml", str(digits8_dir / "manifest.json"),
                         train={"steps": 2, "global_batch": 8, "micro_batch": 8, "zero_stage": 0},
                         checkpoint={"every": 2, "keep": 1}, log={"sample_every": 0})  # fmt: skip
    runs = tmp_path / "runs"
    for name in ("a #1", "a #2 {id}"):
        out = run_ok(alone(config, runs / name, "train.steps=2", env={"OMP_NUM_THREADS": "1"}))
        assert "already finished" not in out
        final = json.loads((runs / name / "final.json").read_text())
        assert final["step"] == 2
    assert sorted(p.name for p in runs.iterdir()) == ["a #1", "a #2 {id}"]
