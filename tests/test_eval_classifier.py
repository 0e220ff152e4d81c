"""The FID classifier (ditscale.eval.classifier): a deterministic recipe, a checked weights file, and its features
in `eval fid --features classifier` (with the share of samples classified as the class they were drawn for)."""

from __future__ import annotations

import json

import pytest
import torch

from ditscale.cli import main
from ditscale.errors import CheckpointError, DataError
from ditscale.eval.classifier import load_classifier, train_classifier


def test_the_recipe_rebuilds_the_same_weights(digits8_dir, tmp_path):
    data = str(digits8_dir / "manifest.json")
    a = train_classifier(data, str(tmp_path / "a"), epochs=2, batch_size=64)
    b = train_classifier(data, str(tmp_path / "b"), epochs=2, batch_size=64)
    assert a["sha256"] == b["sha256"], "same recipe, same weights"
    assert a["test"].endswith("test/manifest.json") and a["test_accuracy"] > 0.5  # 297 held-out digits
    assert (a["train_images"], a["resolution"], a["channels"], a["num_classes"]) == (1500, 8, 1, 10)
    c = train_classifier(data, str(tmp_path / "c"), epochs=2, batch_size=64, seed=1)
    assert c["sha256"] != a["sha256"]

    feats = load_classifier(str(tmp_path / "a"))
    x = torch.zeros(5, 1, 8, 8)
    f = feats(x)
    assert f.shape == (5, 64) and feats.logits(f).shape == (5, 10)
    with pytest.raises(DataError, match="trained on 1x8x8 images"):
        feats(torch.zeros(2, 1, 28, 28))

    weights = tmp_path / "a" / "classifier.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="differs"):
        load_classifier(str(tmp_path / "a"))
    with pytest.raises(CheckpointError, match="eval classifier --data"):
        load_classifier(str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_fid_with_classifier_features(digits8_dir, tmp_path, monkeypatch):
    from tests.test_eval_commands import _train

    monkeypatch.setenv("DITSCALE_CACHE", str(tmp_path / "cache"))
    full, test = str(digits8_dir / "manifest.json"), str(digits8_dir / "test" / "manifest.json")
    run = _train(tmp_path, "c", full, test)
    assert main(["eval", "classifier", "--data", full, "--out", str(tmp_path / "cls"), "--epochs", "1"]) == 0
    argv = ["eval", "fid", "--run", str(run), "--classifier", str(tmp_path / "cls"), "--samples", "20", "--steps", "3"]
    assert main([*argv, "--features", "classifier,pixels", "--ref-limit", "100"]) == 0  # one set of samples, two FIDs
    r = json.loads((run / "eval" / "fid_classifier.json").read_text())
    assert r["fid"] > 0 and r["samples"] == 20 and r["features"] == "classifier"
    assert 0 <= r["sample_accuracy"] <= 1 and r["classifier"]["sha256"]
    both = json.loads((run / "eval" / "fid_pixels.json").read_text())["fid"]
    assert main([*argv, "--features", "pixels", "--ref-limit", "100"]) == 0
    assert json.loads((run / "eval" / "fid_pixels.json").read_text())["fid"] == pytest.approx(both)  # same samples
    assert main(["eval", "fid", "--run", str(run), "--features", "classifier"]) == 2  # no --classifier: named error
