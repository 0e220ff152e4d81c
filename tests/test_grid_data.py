"""A grid's data recipe: parsing (errors name the grid file and key), the runs' data URLs derived from it, the
preparation plan (ready / missing / conflict, never rebuilt, one builder at a time), and where grid files are found.
No services; the digits source builds in a second."""

import json
import threading
import time
from pathlib import Path

import pytest

from ditscale import grid as G
from ditscale.errors import LaunchError
from ditscale.launch import prepare as P
from ditscale.launch.common import plan_grid, resolve_grid

ROOT = Path(__file__).resolve().parents[1]

GRID = """
name: t
config:
  model: {variant: DiT-T/2, input_size: 8, in_channels: 1, num_classes: 10}
  train: {steps: 10, global_batch: 8, micro_batch: 4}
vars: {data_root: DATA}
axes:
  windows: {key: model.windows, values: [global, "3x2@head"]}
  n: [20, 40]
  shuffle: {key: run.seed, values: [0, 1]}
data:
  source: digits
  root: "{data_root}/digits8"
  resolution: 8
  channels: 1
  sizes: [20, 40]
  seeds: [0, 1]
  pairs: [10]
  test_size: 100
  runs: {size: "{n}", seed: "{shuffle}"}
  resources: {cpus: 1}
"""


def _grid(tmp_path: Path, text: str = GRID, name: str = "g.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text.replace("DATA", str(tmp_path / "data")))
    return p


def test_recipe_derives_data_urls(tmp_path):
    runs = G.expand(_grid(tmp_path), run_root=str(tmp_path / "runs"))
    assert len(runs) == 8
    r = next(r for r in runs if r.id == "t-3x2@head-40-1")
    root = tmp_path / "data" / "digits8"
    assert r.config.data.train == str(root / "n40-s1" / "manifest.json") and r.subset == "n40-s1"
    assert r.config.data.test == str(root / "n40-s1" / "test" / "manifest.json")
    rec = r.recipe
    assert [s.name for s in rec.subsets] == ["n20-s0", "n20-s1", "n40-s0", "n40-s1", "pair10-s0"]
    assert rec.full_manifest == str(root / "full" / "manifest.json")
    assert rec.build_command() == ["python", "-m", "ditscale", "data", "build", "digits", "--out", str(root / "full"),
                                   "--resolution", "8", "--channels", "1", "--no-progress"]  # fmt: skip
    assert rec.subset_command(rec.subsets[-1])[-3:] == ["--test-size", "100", "--pair"]
    assert str(root / "pair10-s0" / "s2" / "manifest.json") in rec.outputs()


def test_pair_role_and_relative_root(tmp_path, monkeypatch):
    text = GRID.replace('runs: {size: "{n}", seed: "{shuffle}"}', 'runs: {size: 10, seed: 0, pair: "{half}"}')
    text = text.replace("  n: [20, 40]\n  shuffle: {key: run.seed, values: [0, 1]}", "  half: [s1, s2]")
    text = text.replace("data_root: DATA", "data_root: rel")
    monkeypatch.chdir(tmp_path)
    runs = G.expand(_grid(tmp_path, text))
    assert [r.config.data.train for r in runs][:2] == [
        str(tmp_path / "rel" / "digits8" / "pair10-s0" / "s1" / "manifest.json"),
        str(tmp_path / "rel" / "digits8" / "pair10-s0" / "s2" / "manifest.json"),
    ]  # a relative root resolves against the working directory, as run_dir does
    assert runs[1].config.data.test == str(tmp_path / "rel" / "digits8" / "pair10-s0" / "test" / "manifest.json")


@pytest.mark.parametrize(
    "old, new, match",
    [
        ("  resolution: 8\n", "  resolution: 8\n  resolutoin: 8\n", r"g.yaml.*data.resolutoin"),
        ('  root: "{data_root}/digits8"\n', "", r"g.yaml.*data.root is missing"),
        ("sizes: [20, 40]", "sizes: [20, -4]", r"g.yaml.*data.sizes: -4"),
        ("source: digits", "source: cifar10", r"data.source 'cifar10' is unknown"),
        ("source: digits", "source: celeba", r"data.src is missing.*--var celeba_src="),
        ("  channels: 1\n", "  channels: 2\n", r"data.channels must be 1 or 3"),
        ("seeds: [0, 1]", "seeds: [0]", r"run 't-global-20-1'.*data.runs picks subset 'n20-s1'.*n20-s0"),
        ("resources: {cpus: 1}", "resources: {gpus: 1}", r"data.resources"),
        ("  shuffle: {key", "  shuffle: {key", None),
    ],
)
def test_recipe_errors_name_file_and_key(tmp_path, old, new, match):
    text = GRID.replace(old, new)
    assert text != GRID or match is None
    if match is None:
        G.expand(_grid(tmp_path, text))
        return
    with pytest.raises(LaunchError, match=match):
        G.expand(_grid(tmp_path, text))


def test_recipe_and_set_data_train_conflict(tmp_path):
    with pytest.raises(LaunchError, match=r"data.train is derived from the grid's data recipe"):
        G.expand(_grid(tmp_path, GRID + 'set: {data.train: "x/manifest.json"}\n'))


def test_plan_prepare_verify_never_rebuild(tmp_path, capsys):
    one_seed = (
        GRID.replace("pairs: [10]", "pairs: []")
        .replace("seeds: [0, 1]", "seeds: [0]")
        .replace("values: [0, 1]}", "values: [0]}")
    )
    g = _grid(tmp_path, one_seed)
    plan = plan_grid(str(g), run_root=str(tmp_path / "runs"))
    dp = plan.data
    assert [s.name for s in dp.todo] == ["build", "n20-s0", "n40-s0"]
    assert all(s.needs == ["build"] for s in dp.todo[1:]) and not dp.blocked and not dp.conflicts
    text = P.format_data_plan(dp, {"build": "here"})
    assert "build" in text and "missing -> here" in text and dp.todo[1].shell in text
    out = P.prepare_locally(dp, parallel=2, log_dir=tmp_path / "logs")
    assert out == {"build": "built", "n20-s0": "built", "n40-s0": "built"}
    m = json.loads((tmp_path / "data" / "digits8" / "n40-s0" / "manifest.json").read_text())
    assert m["subset"]["size"] == 40 and m["subset"]["seed"] == 0 and m["num_samples"] == 40
    assert (tmp_path / "logs" / "prepare-n40-s0.log").is_file()

    again = plan_grid(str(g), run_root=str(tmp_path / "runs")).data  # everything verifies: nothing to do
    assert again.todo == [] and all(s.state == P.READY for s in again.steps)
    stamp = (tmp_path / "data" / "digits8" / "n20-s0" / "manifest.json").stat().st_mtime_ns
    assert P.prepare_locally(again) == {}
    assert P.run_step(again.steps[1]) == P.READY  # verified, not run
    assert (tmp_path / "data" / "digits8" / "n20-s0" / "manifest.json").stat().st_mtime_ns == stamp

    # something else at a subset's place: a conflict, named, never overwritten
    other = one_seed.replace("sizes: [20, 40]", "sizes: [25, 40]").replace("n: [20, 40]", "n: [25, 40]")
    (tmp_path / "data" / "digits8" / "n20-s0").rename(tmp_path / "data" / "digits8" / "n25-s0")
    dp = plan_grid(str(_grid(tmp_path, other, "h.yaml")), run_root=str(tmp_path / "runs2")).data
    bad = [s for s in dp.steps if s.state == P.CONFLICT]
    assert [s.name for s in bad] == ["n25-s0"] and "subset.size=20 but the recipe asks for 25" in bad[0].problem
    with pytest.raises(LaunchError, match=r"(?s)never overwritten.*n25-s0"):
        P.check_ready(dp)


def test_missing_source_names_paths_and_commands(tmp_path):
    text = GRID.replace("source: digits", 'source: celeba\n  src: "{celeba_src}"')
    plan = plan_grid(str(_grid(tmp_path, text)), run_root=str(tmp_path / "runs"))
    dp = plan.data
    assert [s.name for s in dp.blocked][:2] == ["build", "n20-s0"]
    with pytest.raises(LaunchError) as e:
        P.check_ready(dp)
    msg = str(e.value)
    root = tmp_path / "data" / "digits8"
    assert "--var celeba_src=PATH" in msg and f"missing {root / 'full' / 'manifest.json'}" in msg
    assert f"missing {root / 'n40-s1' / 'manifest.json'}, {root / 'n40-s1' / 'test' / 'manifest.json'}" in msg
    assert f"python -m ditscale data build celeba --src '<celeba_src>' --out {root / 'full'}" in msg
    assert f"python -m ditscale data subset --manifest {root / 'full' / 'manifest.json'} --size 40 --seed 1" in msg
    # given the location, the plan can run (the build step is runnable)
    plan = plan_grid(str(_grid(tmp_path, text)), vars={"celeba_src": "/datasets/celeba"})
    assert not plan.data.blocked and "--src /datasets/celeba" in plan.data.steps[0].shell


def test_prebuilt_manifest(tmp_path, digits8_dir):
    """data.manifest: shards built elsewhere; the subsets are made from them, a missing one is named."""
    text = GRID.replace("  source: digits\n", f"  manifest: {tmp_path / 'elsewhere' / 'manifest.json'}\n")
    dp = plan_grid(str(_grid(tmp_path, text))).data
    assert dp.steps[0].kind == "external" and [s.name for s in dp.blocked][:2] == ["shards", "n20-s0"]
    assert "MISSING, cannot be built: shards built elsewhere (data.manifest)" in P.format_data_plan(dp)
    with pytest.raises(LaunchError, match=r"data.manifest .*elsewhere/manifest.json does not exist"):
        P.check_ready(dp)
    text = GRID.replace("  source: digits\n", f"  manifest: {digits8_dir / 'manifest.json'}\n")
    text = text.replace("sizes: [20, 40]", "sizes: [20]").replace("n: [20, 40]", "n: [20]").replace("pairs: [10]", "")
    text = text.replace("seeds: [0, 1]", "seeds: [0]").replace("values: [0, 1]}", "values: [0]}")
    dp = plan_grid(str(_grid(tmp_path, text))).data
    assert [s.name for s in dp.todo] == ["n20-s0"] and dp.steps[0].state == P.READY
    assert P.prepare_locally(dp) == {"n20-s0": "built"}


def test_run_step_waits_for_another_builder(tmp_path):
    """Two launchers needing the same data: the second waits on the lease, then finds it ready (built once)."""
    from ditscale.io.lock import Lease

    dp = plan_grid(str(_grid(tmp_path, GRID.replace("pairs: [10]", "pairs: []")))).data
    build = dp.steps[0]
    lease = Lease(str(Path(build.out) / P.LOCK_NAME), 60, what="data folder", keep=False).acquire()

    def other_launcher():
        time.sleep(1.0)
        from ditscale.data import build_shards

        build_shards("digits", None, build.out, 8, channels=1, progress=False)
        lease.release()

    t = threading.Thread(target=other_launcher)
    t.start()
    try:
        assert P.run_step(build, poll_s=0.2) == P.READY  # waited, verified, did not run the command
    finally:
        t.join()
    assert not list(Path(build.out).glob("_prepare.lock*"))  # the data folder holds data only


def test_resolve_grid_outside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, default = resolve_grid(None)
    assert default and path == str(ROOT / "configs" / "grids" / "celeba32.yaml")
    assert resolve_grid("digits-placement") == (str(ROOT / "configs" / "grids" / "digits-placement.yaml"), False)
    assert resolve_grid("configs/grids/digits-test.yaml")[0] == str(ROOT / "configs" / "grids" / "digits-test.yaml")
    (tmp_path / "mine.yaml").write_text("axes: {}\n")
    assert resolve_grid("mine.yaml") == ("mine.yaml", False)
    with pytest.raises(LaunchError, match=r"grid file 'nope' not found \(looked at nope, "):
        resolve_grid("nope")


def test_study_grids_recipes():
    for name in ("celeba32", "imagenet32", "lsun-church32", "lsun-bedroom32", "lsun-bridge32", "lsun-tower32"):
        runs = G.expand(ROOT / "configs" / "grids" / f"{name}.yaml", validate=False)
        rec = runs[0].recipe
        assert rec.src is None and rec.src_vars and rec.resolution == 32 and len(rec.subsets) == 9
        assert {r.subset for r in runs} == {s.name for s in rec.subsets}
    runs = G.expand(ROOT / "configs" / "grids" / "digits-placement.yaml", validate=False)
    assert len(runs) == 12 and {r.subset for r in runs} == {"n30-s0", "n30-s1", "n30-s2"}
    assert {r.config.model.windows for r in runs} == {"global", "3x2@head", "3x2@mix", "3x2@tail"}
    runs = G.expand(ROOT / "configs" / "grids" / "digits-placement-n100.yaml", validate=False)
    assert len(runs) == 6 and {r.subset for r in runs} == {"n100-s0", "n100-s1", "n100-s2"}


def test_source_paths_are_checked_at_plan_time(tmp_path):
    """Every source path a missing step reads is checked before anything runs (and in --dry-run), named with the
    --var that gives it (issue #22 item 2)."""
    text = GRID.replace("source: digits", 'source: folder\n  src: "{images}"')
    plan = plan_grid(str(_grid(tmp_path, text)), vars={"images": str(tmp_path / "nope")})
    with pytest.raises(LaunchError, match=r"data.src .*nope \(--var images\) does not exist"):
        P.check_sources(plan.data)
    (tmp_path / "a-file").write_text("x")
    plan = plan_grid(str(_grid(tmp_path, text)), vars={"images": str(tmp_path / "a-file")})
    with pytest.raises(LaunchError, match=r"data.src .*a-file \(--var images\): expected a directory"):
        P.check_sources(plan.data)
    (tmp_path / "imgs").mkdir()
    P.check_sources(plan_grid(str(_grid(tmp_path, text)), vars={"images": str(tmp_path / "imgs")}).data)
    r = _launcher("local", "--grid", _grid(tmp_path, text), "--var", f"images={tmp_path / 'nope'}", "--dry-run")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_model_against_data_at_plan_time(tmp_path, digits8_dir):
    """The model must fit its data: channels, size and classes of the manifest, or of the recipe for data not yet
    built; every mismatch is named before anything is submitted, also by --dry-run (issue #23)."""
    bad = GRID.replace("in_channels: 1, num_classes: 10", "in_channels: 3, num_classes: 10")
    with pytest.raises(LaunchError, match=r"model.in_channels=3 but data.train .* has 1 channels"):
        plan_grid(str(_grid(tmp_path, bad)))
    text = GRID.replace("  source: digits\n", f"  manifest: {digits8_dir / 'manifest.json'}\n")
    few = text.replace("num_classes: 10}", "num_classes: 2}")
    (tmp_path / "data").mkdir(exist_ok=True)
    with pytest.raises(LaunchError, match=r"model.num_classes=2 but data.train .* has 10 classes"):
        plan_grid(str(_grid(tmp_path, few)))
    r = _launcher("local", "--grid", _grid(tmp_path, few), "--dry-run")
    assert r.returncode == 2 and "model.num_classes=2" in r.stderr


def _launcher(name: str, *args):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    argv = [sys.executable, str(root / "launchers" / f"{name}_grid.py"), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=300, env=env)
