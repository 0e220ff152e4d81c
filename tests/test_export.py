"""Exports: reference-loadable files that a windowed model cannot pass as global, typed metadata, equal file
modes, `load_exported` rebuilding the exact model, and the `ditscale export` command."""

from __future__ import annotations

import hashlib
import json
import stat
import warnings

import pytest
import torch

from ditscale.errors import CheckpointError
from ditscale.model import DiT_models, load_exported, load_reference_state_dict, save_model
from ditscale.model.export import WINDOWS_KEY, model_spec, reference_note

ARCH = dict(input_size=8, in_channels=1, num_classes=10)


def tiny(windows="global", seed=0, **kw):
    """DiT-T/2 on a 4x4 token grid with random (not zero-initialised) weights, in eval mode."""
    torch.manual_seed(seed)
    model = DiT_models["DiT-T/2"](**{**ARCH, **kw}, windows=windows)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def inputs(n=3, channels=1):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, channels, 8, 8, generator=g)
    return x, torch.tensor([0, 400, 999][:n]), torch.tensor([1, 9, 10][:n])


def test_windowed_export_cannot_load_as_global_and_load_exported_rebuilds_it(tmp_path):
    model = tiny("3,5,-,3")
    paths = save_model(model, tmp_path / "w" / "ema.pt", variant="DiT-T/2", info={"weights": "ema"})
    assert {p.name for p in paths.values()} == {"ema.pt", "ema.safetensors", "ema.json"}

    # the reference's parameter names: a global model of the same size is the reference DiT (same modules); a
    # strict load fails on the windows entry instead of computing global attention with windowed weights
    sd = torch.load(paths["pt"], weights_only=True)
    assert sd[WINDOWS_KEY].tolist() == [3, 5, 0, 3]
    reference = DiT_models["DiT-T/2"](**ARCH)
    with pytest.raises(RuntimeError, match=WINDOWS_KEY):
        reference.load_state_dict(sd, strict=True)
    with pytest.raises(CheckpointError, match=r"windowed model .*'3,5,-,3'.*load_exported"):
        load_reference_state_dict(reference, sd)
    load_reference_state_dict(tiny("3,5,-,3", seed=1), sd)  # the same windows: fine

    x, t, y = inputs()
    with torch.no_grad():
        want = model(x, t, y)
    for p in (tmp_path / "w" / "ema", paths["pt"], paths["safetensors"], paths["json"]):
        got = load_exported(p)
        assert got.windows == [3, 5, None, 3] and not got.training
        with torch.no_grad():
            assert torch.equal(got(x, t, y), want), p

    note = reference_note(model_spec(model))
    assert "global attention" in note and "load_exported" in note and "3,5,-,3" in note


def test_export_json_is_typed_and_files_share_a_mode(tmp_path):
    paths = save_model(tiny("3,3"), tmp_path / "m", variant="DiT-T/2")
    meta = json.loads(paths["json"].read_text())
    assert meta["input_size"] == 8 and meta["in_channels"] == 1 and meta["num_classes"] == 10
    assert meta["learn_sigma"] is True and meta["reference_compatible"] is False
    assert meta["depth"] == 4 and meta["hidden_size"] == 96 and meta["mlp_ratio"] == 4.0
    assert meta["class_dropout_prob"] == pytest.approx(0.1) and meta["block_windows"] == [3, 3, None, None]
    assert meta["windows"] == "3x2" and meta["variant"] == "DiT-T/2" and meta["format"] == "ditscale-dit"
    modes = {p.suffix: stat.S_IMODE(p.stat().st_mode) for p in paths.values()}
    assert len(set(modes.values())) == 1, modes
    from safetensors import safe_open

    files = meta.pop("files")  # the size and sha256 of the weights files of this export
    for kind in ("pt", "safetensors"):
        data = paths[kind].read_bytes()
        assert files[kind] == {"name": f"m.{kind}", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with safe_open(str(paths["safetensors"]), framework="pt") as f:
        assert json.loads(f.metadata()["ditscale"]) == meta


def test_global_export_is_plain_reference_weights(tmp_path):
    model = tiny("global", class_dropout_prob=0.0)
    paths = save_model(model, tmp_path / "g.safetensors")
    sd = torch.load(paths["pt"], weights_only=True)
    assert WINDOWS_KEY not in sd and set(sd) == set(model.state_dict())
    DiT_models["DiT-T/2"](**ARCH, class_dropout_prob=0.0).load_state_dict(sd, strict=True)
    assert reference_note(model_spec(model)) is None
    got = load_exported(paths["json"])
    assert got.y_embedder.dropout_prob == 0.0 and got.windows == [None] * 4
    x, t, y = inputs()
    y = y.clamp(max=9)
    with torch.no_grad():
        assert torch.equal(got(x, t, y), model(x, t, y))


def test_exports_written_before_typed_metadata_still_load(tmp_path):
    from safetensors.torch import save_file

    model = tiny("3,3")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    old = {"variant": "DiT-T/2", "windows": "3,3", "input_size": "8", "in_channels": "1", "num_classes": "10",
           "learn_sigma": "True", "weights": "ema", "checkpoint": "step_00000004", "run": "runs/x"}  # fmt: skip
    save_file(state, str(tmp_path / "old.safetensors"), metadata=old)
    (tmp_path / "old.json").write_text(json.dumps(old))
    torch.save(state, tmp_path / "old.pt")
    x, t, y = inputs()
    for p in ("old.safetensors", "old.pt"):
        got = load_exported(tmp_path / p)
        assert got.windows == [3, 3, None, None]
        with torch.no_grad():
            assert torch.equal(got(x, t, y), model(x, t, y))
    torch.save(state, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="load_reference_state_dict"):
        load_exported(tmp_path / "bare.pt")


@pytest.fixture
def fake_run(monkeypatch):
    """`ditscale export` reads a run through ditscale.train.checkpoint.load_state_for_eval: serve a tiny model."""
    from ditscale.config import load_config
    from ditscale.train import checkpoint

    def serve(windows):
        cfg = load_config(None, ["model.variant=DiT-T/2", "model.input_size=8", "model.in_channels=1",
                                 "model.num_classes=10", f"model.windows={windows}"])  # fmt: skip
        model = tiny(windows)
        monkeypatch.setattr(
            checkpoint, "load_state_for_eval", lambda run, ema=True, tag=None: (cfg, model.state_dict(), "step_9")
        )
        return model

    return serve


@pytest.mark.parametrize("fmt", ["dit", "diffusers"])
def test_export_command_says_a_windowed_model_is_not_the_reference(tmp_path, capsys, fake_run, fmt):
    from ditscale.cli import main

    model = fake_run("3,5")
    out = tmp_path / ("ema.pt" if fmt == "dit" else "transformer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers' own deprecations, if any
        assert main(["export", "--run", "runs/fake", "--out", str(out), "--format", fmt]) == 0
    err = capsys.readouterr().err
    assert "global attention" in err and "3,5" in err
    assert ("load_exported" if fmt == "dit" else "load_diffusers") in err
    got = load_exported(out if fmt == "diffusers" else tmp_path / "ema.pt")
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.allclose(got(x, t, y), model(x, t, y), atol=1e-6)
    assert got.windows == [3, 5, None, None]
    if fmt == "dit":
        meta = json.loads((tmp_path / "ema.json").read_text())
        assert meta["checkpoint"] == "step_9" and meta["weights"] == "ema" and meta["run"] == "runs/fake"


def test_export_command_is_quiet_for_a_global_model(tmp_path, capsys, fake_run):
    from ditscale.cli import main

    fake_run("global")
    assert main(["export", "--run", "runs/fake", "--out", str(tmp_path / "g")]) == 0
    assert "note" not in capsys.readouterr().err
    assert WINDOWS_KEY not in torch.load(tmp_path / "g.pt", weights_only=True)


def test_export_to_object_storage_and_back(s3_server):
    """NAME may be an s3:// URL: the three files are written there (each one PUT) and load_exported reads them."""
    model = tiny("3,3")
    url = f"{s3_server.bucket()}/exports #1/m"
    paths = save_model(model, url + ".pt", variant="DiT-T/2")
    assert paths == {k: f"{url}.{k}" for k in ("pt", "safetensors", "json")}
    x, t, y = inputs()
    for name in (url, url + ".pt", url + ".safetensors", url + ".json"):
        with torch.no_grad():
            assert torch.equal(load_exported(name)(x, t, y), model(x, t, y)), name


def test_an_interrupted_export_over_an_old_style_one_leaves_no_description_that_vouches_for_it(tmp_path, monkeypatch):
    """NAME.json written before the checksums lists none: it is removed before the new files are renamed in, so a
    NAME.pt of the new export never loads with it."""
    from ditscale.io import storage

    old = tiny("3,3")
    save_model(old, tmp_path / "m", variant="DiT-T/2")
    meta = json.loads((tmp_path / "m.json").read_text())
    del meta["files"]
    (tmp_path / "m.json").write_text(json.dumps(meta))  # an export from before the checksums
    real, calls = storage.write_bytes, []

    def dies_after_the_first_file(url, data, *a, **kw):
        calls.append(url)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process ends here (tests/test_atomic_outputs.py kills real ones)
        return real(url, data, *a, **kw)

    monkeypatch.setattr(storage, "write_bytes", dies_after_the_first_file)
    with pytest.raises(KeyboardInterrupt):
        save_model(tiny("3,3", seed=5), tmp_path / "m", variant="DiT-T/2")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="no ditscale model description"):
        load_exported(tmp_path / "m.pt")  # the new weights, and no description of them
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path / "m.safetensors")(x, t, y), old(x, t, y))  # whole by itself
