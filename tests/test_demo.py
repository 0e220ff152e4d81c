"""The README's first command, shortened: `python -m ditscale.demo` trains, judges its samples with a logistic
regression trained on the real digits and prints that score, and the next step it prints (eval psnr-gap on the
held-out digits) works on the run it made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ditscale.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_demo_prints_the_recognisability_score_and_working_next_steps(tmp_path, digits8_dir, warm_deepspeed):
    run = tmp_path / "demo"
    cmd = [sys.executable, "-m", "ditscale.demo", "--nproc", "1", "--data", str(digits8_dir), "--run-dir", str(run)]
    cmd += ["train.steps=4", "train.zero_stage=0", "checkpoint.every=4", "log.sample_every=0", "log.metrics_port=0"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = r.stdout
    assert "% of 100 class-conditional samples (ddpm50 cfg_scale=3.0) are classified as the digit" in out
    assert "logistic regression with 96.6% accuracy on the 297 held-out real digits" in out
    assert (run / "samples" / "judged.png").stat().st_size > 0
    assert f"eval psnr-gap --run {run}" in out
    assert main(["eval", "psnr-gap", "--run", str(run), "--k", "20", "--points", "3"]) == 0  # data.test is set


def test_judge_scores_real_digits_as_themselves(digits8_dir):
    """The judge itself: the real held-out digits, passed off as samples, are classified as drawn ~97% of the time."""
    from ditscale.eval.common import load_images
    from ditscale.eval.recognise import fit_judge

    judge, acc = fit_judge(str(digits8_dir / "manifest.json"), str(digits8_dir / "test" / "manifest.json"))
    x, y, _ = load_images(str(digits8_dir / "test" / "manifest.json"))
    assert acc == pytest.approx(float((judge.predict(x.flatten(1).numpy()) == y.numpy()).mean()))
    assert acc > 0.95
