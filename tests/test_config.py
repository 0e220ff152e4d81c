"""The run-config schema: validation names the key, overrides, the shipped configs, and the trainer's early checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from ditscale.cli import main as cli_main
from ditscale.config import Config, config_from_dict, dump_config, load_config, parse_overrides
from ditscale.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "grids" not in p.parts)


def test_defaults_follow_dit():
    cfg = Config()
    assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0.0 and cfg.train.ema_decay == 0.9999
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_overrides_are_yaml_values(tmp_path):
    cfg = load_config(
        None, ["train.steps=100", "model.windows=local*@mix", "optim.betas=[0.9,0.99]", "run.dir=s3://b/r"]
    )
    assert cfg.train.steps == 100 and cfg.model.windows == "local*@mix"
    assert cfg.optim.betas == (0.9, 0.99) and cfg.run.dir == "s3://b/r"
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["train.stepz=10"], ["unknown key", "train.stepz", "did you mean 'train.steps'?"]),
        (["trian.steps=10"], ["unknown key", "trian", "did you mean 'train'?"]),
        (["train.lr=0.1"], ["unknown key 'train.lr' (did you mean 'optim.lr'?)"]),
        (["log.colour=1"], ["unknown key 'log.colour' (valid keys of log: every, sample_every"]),
        (["train.steps=many"], ["train.steps"]),
        (["train.zero_stage=4"], ["train.zero_stage"]),
        (["train.precision=fp16"], ["train.precision"]),
        (["train.global_batch=24", "train.micro_batch=16"], ["global_batch 24", "micro_batch 16"]),
        (["steps"], ["key=value"]),
    ],
)
def test_bad_keys_and_types_are_named(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    for w in words:
        assert w in str(e.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 10\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'train.lr'"):
        load_config(bad)


def test_train_command_stops_on_a_bad_config_before_heavy_work(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  variant: DiT-T/2\n  windowz: local\n")
    assert cli_main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'model.windowz'" in err and "Traceback" not in err
    assert cli_main(["train", "--config", str(bad), "model.windowz=null", "train.steps=-1"]) == 2
    assert "train.steps" in capsys.readouterr().err


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_shipped_configs_are_valid(path):
    from ditscale.model import DiT_models

    cfg = load_config(path)
    assert cfg.model.variant in DiT_models
    with torch.device("meta"):  # checks the window spec against the depth without allocating weights
        model = cfg.model.build()
    assert len(model.windows) == model.depth
    if cfg.model.windows != "global":
        assert any(w is not None for w in model.windows)


def test_study_configs_cover_every_dataset_variant_and_window():
    study = [load_config(p) for p in RUN_CONFIGS if "study" in p.relative_to(ROOT).parts]
    combos = {(Path(c.data.train).parts[1], c.model.variant, c.model.windows) for c in study}
    datasets = {"celeba32", "imagenet32", "lsun-church32", "lsun-bedroom32", "lsun-bridge32", "lsun-tower32"}
    windows = {"global", "local@head", "local@mix", "local@tail", "local*@head", "local*@mix", "local*@tail"}
    assert combos == {(d, v, w) for d in datasets for v in ("DiT-XS/1", "DiT-S/1") for w in windows}


def test_demo_and_xl_configs():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert demo.train.zero_stage == 2 and demo.model.windows != "global"
    assert demo.train.global_batch == 2 * demo.train.micro_batch  # 2 processes, no accumulation
    assert demo.data.test.endswith("test/manifest.json")  # the printed next steps (eval psnr-gap) need it
    xl = load_config(ROOT / "configs" / "dit-xl2-latents256.yaml")
    assert (xl.model.variant, xl.model.input_size, xl.model.in_channels, xl.data.kind) == ("DiT-XL/2", 32, 4, "latents")


@pytest.fixture(scope="module")
def digits8(digits8_dir) -> str:
    return str(digits8_dir / "manifest.json")


def _tiny(digits8: str, *overrides: str) -> Config:
    base = [
        "model.variant=DiT-T/2", "model.input_size=8", "model.in_channels=1", "model.num_classes=10",
        f"data.train={digits8}", "train.global_batch=16", "train.micro_batch=8",
    ]  # fmt: skip
    return load_config(None, base + list(overrides))


def test_trainer_checks_config_against_data_and_world(digits8):
    from ditscale.train.trainer import validate

    assert validate(_tiny(digits8), world_size=2)["num_classes"] == 10
    cases = [
        (("model.in_channels=3",), 2, "model.in_channels=3"),
        (("model.input_size=16",), 2, "model.input_size=16"),
        (("model.num_classes=5",), 2, "model.num_classes=5"),
        (("data.kind=latents",), 2, "data.kind"),
        (("model.variant=DiT-Q/3",), 2, "model.variant 'DiT-Q/3'"),
        (("model.windows=local@head",), 2, "local@head"),  # 6 windowed blocks, depth 4
        ((), 4, "train.global_batch=16"),  # 16 is not a multiple of 8 x 4
        (("data.train=/nonexistent/manifest.json",), 2, "/nonexistent/manifest.json"),
        (("data.train=",), 2, "data.train"),
    ]
    for overrides, world, words in cases:
        with pytest.raises(Exception) as e:
            validate(_tiny(digits8, *overrides), world_size=world)
        assert words in str(e.value), (overrides, str(e.value))
        assert type(e.value).__module__ == "ditscale.errors"
