"""Every `python -m ditscale eval ...` command and `report` on tiny trained runs (digits 8x8, DiT-T/1, a few
steps, ZeRO stage 0, one process), plus the bad inputs: no checkpoint, overlapping pair, resolution mismatch,
missing Inception weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ditscale.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _train(tmp: Path, name: str, train: str, test: str, steps: int = 4) -> Path:
    run_dir = tmp / "runs" / name
    cfg = {
        "run": {"name": name, "seed": 0, "dir": str(run_dir)},
        "model": {"variant": "DiT-T/1", "windows": "3x2@head", "input_size": 8, "in_channels": 1, "num_classes": 10},
        "diffusion": {"sample_steps": 5},
        "data": {"train": train, "test": test, "flip": False, "shuffle_buffer": 10},
        "train": {
            "steps": steps,
            "global_batch": 4,
            "micro_batch": 4,
            "zero_stage": 0,
            "precision": "fp32",
            "ema_decay": 0.5,
        },
        "checkpoint": {"every": steps, "keep": 1},
        "log": {"every": 1, "sample_every": 0, "metrics_port": 0, "progress": False},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "ditscale", "train", "--config", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits8_dir):
    from ditscale.data import make_subset

    tmp = tmp_path_factory.mktemp("evalcmd")
    full = str(digits8_dir / "manifest.json")
    test = str(digits8_dir / "test" / "manifest.json")
    try:
        make_subset(full, 10, str(tmp / "pair"), seed=0, pair=True)
    except NotImplementedError:
        pytest.skip("ditscale.data.make_subset is not implemented yet")
    a = _train(tmp, "a", str(tmp / "pair" / "s1" / "manifest.json"), test)
    b = _train(tmp, "b", str(tmp / "pair" / "s2" / "manifest.json"), test)
    return {"tmp": tmp, "a": a, "b": b, "full": full, "test": test}


def _json(run: Path, name: str) -> dict:
    return json.loads((run / "eval" / f"{name}.json").read_text())


def test_each_eval_command_and_report(runs, tmp_path, monkeypatch):
    a, b = str(runs["a"]), str(runs["b"])
    monkeypatch.setenv("DITSCALE_CACHE", str(tmp_path / "cache"))
    assert main(["eval", "psnr-gap", "--run", a, "--k", "6", "--points", "3"]) == 0
    r = _json(runs["a"], "psnr_gap")
    assert len(r["gap"]) == 3 and r["num_train_images"] == 6 and r["n_train"] == 10
    assert abs(r["avg_gap"] - (r["avg_train_psnr"] - r["avg_test_psnr"])) < 1e-6

    assert main(["eval", "locality", "--run", a, "--images", "3", "--timesteps", "100,900"]) == 0
    r = _json(runs["a"], "locality")
    assert [x["block"] for x in r["blocks"]] == [0, 1, 2, 3] and r["grid"] == [8, 8]
    assert r["windows"] == [3, 3, None, None]
    assert r["blocks"][0]["mass_3x3"] == pytest.approx(1.0, abs=1e-5)  # a 3x3 window keeps all mass inside
    assert r["blocks"][3]["mass_3x3"] < 1.0
    assert (runs["a"] / "eval" / "attention_t100.png").stat().st_size > 0

    assert main(["eval", "jacobian", "--run", a, "--sigma", "0.5"]) == 0
    r = _json(runs["a"], "jacobian")
    assert r["train"]["dim"] == 64 and len(r["test"]["eigenvalues"]) == 64

    assert (
        main(
            [
                "eval",
                "fid",
                "--run",
                a,
                "--features",
                "pixels",
                "--samples",
                "6",
                "--steps",
                "3",
                "--ref",
                runs["full"],
                "--ref-limit",
                "40",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    r = _json(runs["a"], "fid_pixels")
    assert r["fid"] > 0 and r["samples"] == 6 and r["reference_images"] == 40
    assert (
        main(
            [
                "eval",
                "fid",
                "--run",
                a,
                "--features",
                "pixels",
                "--samples",
                "6",
                "--steps",
                "3",
                "--ref",
                runs["full"],
                "--ref-limit",
                "40",
            ]
        )
        == 0
    )
    r2 = _json(runs["a"], "fid_pixels")
    assert r2["fid"] == pytest.approx(r["fid"])  # same samples (DDIM, fixed noise) whatever the batch size

    assert main(["eval", "pair", "--runs", a, b, "--samples", "4", "--steps", "3"]) == 0
    for run in (runs["a"], runs["b"]):
        r = _json(run, "pair")
        assert len(r["paired"]) == 4 and -1 <= r["paired_similarity"]["mean"] <= 1
        assert (run / "eval" / "pair.png").stat().st_size > 0

    out = tmp_path / "report #1 {r}"  # taken as given
    assert main(["report", "--grid", str(runs["tmp"] / "runs"), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "PSNR gap" in text and "Two-model test" in text and "Attention locality" in text


def test_bad_inputs(runs, tmp_path, capsys):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    assert main(["eval", "psnr-gap", "--run", str(empty)]) == 2
    assert "checkpoint" in capsys.readouterr().err

    # the same images under another manifest path: the pair test refuses overlapping training sets
    shutil.copytree(runs["tmp"] / "pair" / "s1", tmp_path / "copy")
    twin = tmp_path / "twin"
    shutil.copytree(runs["a"], twin, ignore=shutil.ignore_patterns("eval"))
    for meta in twin.glob("checkpoints/*/meta.json"):
        m = json.loads(meta.read_text())
        m["config"]["data"]["train"] = str(tmp_path / "copy" / "manifest.json")
        meta.write_text(json.dumps(m))
    assert main(["eval", "pair", "--runs", str(runs["a"]), str(twin), "--samples", "2", "--steps", "2"]) == 2
    assert "disjoint" in capsys.readouterr().err
    assert main(["eval", "pair", "--runs", str(runs["a"]), str(runs["a"]), "--samples", "2"]) == 2
    assert "same shards" in capsys.readouterr().err

    from ditscale.data import build_shards

    build_shards("digits", None, str(tmp_path / "digits16"), resolution=16, channels=1, limit=200, progress=False)
    assert (
        main(
            [
                "eval",
                "psnr-gap",
                "--run",
                str(runs["a"]),
                "--test",
                str(tmp_path / "digits16" / "test" / "manifest.json"),
                "--k",
                "2",
                "--points",
                "2",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "resolution mismatch" in err and "digits16" in err

    missing = tmp_path / "no-such-weights.pth"
    assert main(["eval", "fid", "--run", str(runs["a"]), "--inception-weights", str(missing), "--samples", "2"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_eval_reads_and_writes_object_storage(runs, s3_server):
    bucket = s3_server.bucket()
    s3_server.fs.put(str(runs["a"]), f"{bucket[5:]}/a", recursive=True)
    url = f"{bucket}/a"
    assert main(["eval", "psnr-gap", "--run", url, "--k", "4", "--points", "2"]) == 0
    assert main(["eval", "locality", "--run", url, "--images", "2", "--timesteps", "500"]) == 0
    fs = s3_server.fs
    for name in ("psnr_gap.json", "psnr_gap.png", "locality.json", "attention_t500.png"):
        assert fs.exists(f"{bucket[5:]}/a/eval/{name}"), name
    r = json.loads(fs.cat(f"{bucket[5:]}/a/eval/psnr_gap.json"))
    assert r["run"] == url and len(r["gap"]) == 2


def test_fid_inception_path_with_a_local_weights_file(runs, tmp_path, monkeypatch):
    """The real pipeline with a randomly initialised FID Inception saved as a state dict (the real weights cannot
    be downloaded in tests): loads, extracts 2048-d features, caches the reference statistics."""
    import torch

    from ditscale.eval.fid import FIDInceptionV3

    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.manual_seed(0)
    torch.save(FIDInceptionV3().state_dict(), weights)
    monkeypatch.setenv("DITSCALE_INCEPTION_WEIGHTS", str(weights))
    argv = [
        "eval",
        "fid",
        "--run",
        str(runs["a"]),
        "--samples",
        "3",
        "--steps",
        "2",
        "--ref",
        runs["full"],
        "--ref-limit",
        "6",
        "--cache",
        str(tmp_path / "cache"),
    ]
    assert main(argv) == 0
    r = _json(runs["a"], "fid")
    assert r["features"] == "inception" and r["samples"] == 3 and r["reference_images"] == 6 and r["fid"] >= 0
    assert len(list((tmp_path / "cache" / "fid_stats").glob("inception-*.npz"))) == 1
