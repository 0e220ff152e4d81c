"""Grid expansion, validation (errors name the run and the key), and the results table on synthetic run dirs."""

import json
from pathlib import Path

import pytest

from ditscale import grid as G
from ditscale import results
from ditscale.cli import main as cli_main
from ditscale.errors import LaunchError
from ditscale.io.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
GRIDS = ROOT / "configs" / "grids"
STUDY = ["celeba32", "imagenet32", "lsun-church32", "lsun-bedroom32", "lsun-bridge32", "lsun-tower32"]
WINDOWS = ["global", "local@head", "local@mix", "local@tail", "local*@head", "local*@mix", "local*@tail"]


def _grid(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "g.yaml"
    p.write_text(text)
    return p


BASE = """
name: t
config:
  model: {variant: DiT-T/2, input_size: 8, in_channels: 1, num_classes: 10}
  data: {train: "{data_root}/manifest.json"}
  train: {steps: 10, global_batch: 8, micro_batch: 4}
vars: {data_root: /nonexistent}
"""


def test_format_label():
    assert G.format_label(10000) == "1e4"
    assert G.format_label(1000) == "1e3"
    assert G.format_label(100000) == "1e5"
    assert G.format_label(5000) == "5e3"
    assert G.format_label(1234) == "1234"
    assert G.format_label(7) == "7"
    assert G.format_label("DiT-XS/1") == "xs1"
    assert G.format_label("local@head") == "local@head"
    assert G.format_label("local*@mix") == "localstar@mix"
    assert G.format_label(True) == "true"


@pytest.mark.parametrize("name", STUDY)
def test_study_grids(name, tmp_path):
    runs = G.expand(GRIDS / f"{name}.yaml", run_root=str(tmp_path))
    assert len(runs) == 7 * 3 * 3
    ids = [r.id for r in runs]
    assert len(set(ids)) == len(ids)
    assert f"{name}-xs1-local@head-n1e4-s0" in ids
    assert f"{name}-xs1-localstar@tail-n1e5-s2" in ids
    assert {r.config.model.windows for r in runs} == set(WINDOWS)
    r = next(r for r in runs if r.id == f"{name}-xs1-local@mix-n1e3-s1")
    data = Path("data").absolute() / name  # the data recipe's root: {data_root}/<grid name>, from the cwd
    assert r.config.data.train == str(data / "n1000-s1" / "manifest.json") and r.subset == "n1000-s1"
    assert r.config.data.test == str(data / "n1000-s1" / "test" / "manifest.json")
    assert [s.name for s in r.recipe.subsets][:3] == ["n1000-s0", "n1000-s1", "n1000-s2"]
    assert len(r.recipe.subsets) == 9 and r.recipe.src is None and r.recipe.resolution == 32
    assert r.config.run.seed == 1 and r.config.run.name == r.id
    assert r.config.model.variant == "DiT-XS/1"
    assert r.run_dir == str(tmp_path / r.id) and r.config.run.dir == r.run_dir
    assert r.resources["gpus_per_node"] == 8 and r.num_tasks == 8
    assert (r.config.model.num_classes == 1000) == (name == "imagenet32")


def test_digits_test_grid(tmp_path):
    runs = G.expand(GRIDS / "digits-test.yaml", vars={"data_root": "/d"}, run_root=str(tmp_path))
    assert [r.id for r in runs] == ["digits-t2-3x2@head-nodes1", "digits-t2-3x2@head-nodes2"]
    assert [r.resources["nodes"] for r in runs] == [1, 2]
    assert [r.num_tasks for r in runs] == [1, 2]
    assert runs[0].config.data.train == "/d/manifest.json"
    assert runs[1].values == {"variant": "DiT-T/2", "windows": "3x2@head", "nodes": 2}


def test_vars_overrides_and_mapping_axis(tmp_path):
    p = _grid(
        tmp_path,
        BASE
        + """
id: "{grid}-{ds}-{windows}"
axes:
  ds:
    a: {model.num_classes: 3, data.train: "{data_root}/a/manifest.json"}
    b: {model.num_classes: 4}
  windows: {key: model.windows, values: [global, "3x2@tail"]}
""",
    )
    runs = G.expand(p, vars={"data_root": "s3://bkt/x"}, overrides=["train.steps=3"], run_root="s3://bkt/runs")
    assert [r.id for r in runs] == ["t-a-global", "t-a-3x2@tail", "t-b-global", "t-b-3x2@tail"]
    assert runs[0].config.model.num_classes == 3 and runs[2].config.model.num_classes == 4
    assert runs[0].config.data.train == "s3://bkt/x/a/manifest.json"
    assert runs[2].config.data.train == "s3://bkt/x/manifest.json"
    assert all(r.config.train.steps == 3 for r in runs)
    assert runs[1].run_dir == "s3://bkt/runs/t-a-3x2@tail"


def test_bad_value_names_run_and_key(tmp_path):
    p = _grid(tmp_path, BASE + "axes:\n  steps: {key: train.steps, values: [10, -5], prefix: steps}\n")
    with pytest.raises(LaunchError) as e:
        G.expand(p)
    msg = str(e.value)
    assert "t-steps-5" in msg and "train.steps" in msg


def test_bad_window_spec_names_run_and_key(tmp_path):
    p = _grid(tmp_path, BASE + "axes:\n  windows: {key: model.windows, values: [global, local@middle]}\n")
    with pytest.raises(LaunchError) as e:
        G.expand(p)
    assert "t-local@middle" in str(e.value) and "model.windows" in str(e.value)


def test_too_many_windows_for_depth(tmp_path):
    p = _grid(tmp_path, BASE + "axes:\n  windows: {key: model.windows, values: [local@head]}\n")
    with pytest.raises(LaunchError, match=r"t-local@head.*model.windows"):
        G.expand(p)


def test_unknown_key_and_resources(tmp_path):
    p = _grid(tmp_path, BASE + "set: {train.stepz: 3}\n")
    with pytest.raises(LaunchError, match=r"run 't'.*train.stepz"):
        G.expand(p)
    p = _grid(tmp_path, BASE + "axes:\n  n: {key: resources.nodez, values: [1]}\n")
    with pytest.raises(LaunchError, match="resources.nodez"):
        G.expand(p)
    p = _grid(tmp_path, BASE + "axes:\n  n: {key: resources.nodes, values: [0]}\n")
    with pytest.raises(LaunchError, match=r"t-0.*resources.nodes"):
        G.expand(p)


def test_duplicate_ids_and_bad_files(tmp_path):
    p = _grid(tmp_path, BASE + 'id: "same"\naxes:\n  s: {key: run.seed, values: [0, 1]}\n')
    with pytest.raises(LaunchError, match="duplicate run id"):
        G.expand(p)
    with pytest.raises(LaunchError, match="does not exist"):
        G.expand(tmp_path / "missing.yaml")
    p = _grid(tmp_path, BASE + "axez: {}\n")
    with pytest.raises(LaunchError, match="axez"):
        G.expand(p)


def test_check_data_names_run_and_key(tmp_path):
    runs = G.expand(_grid(tmp_path, BASE + "axes:\n  s: {key: run.seed, values: [0]}\n"))
    with pytest.raises(LaunchError) as e:
        G.check_data(runs)
    assert "t-0" in str(e.value) and "data.train" in str(e.value) and "/nonexistent/manifest.json" in str(e.value)


def test_every_bad_run_reported_at_once(tmp_path):
    """Config, window-spec and data problems of several runs come back in one error, one line per run."""
    from ditscale.launch.common import plan_grid

    axes = (
        "axes:\n  windows: {key: model.windows, values: [global, local@head, 3x2@head]}\n"
        "  steps: {key: train.steps, values: [10, -1], prefix: steps}\n"
    )
    with pytest.raises(LaunchError) as e:
        plan_grid(_grid(tmp_path, BASE + axes))
    lines = str(e.value).splitlines()
    assert lines[0] == "6 problems in the grid:", lines
    body = "\n".join(lines[1:])
    for bad_steps in ("t-global-steps-1", "t-local@head-steps-1", "t-3x2@head-steps-1"):
        (line,) = [x for x in lines if x.startswith(f"  run '{bad_steps}': ")]
        assert "train.steps" in line
    assert "run 't-local@head-steps10': model.windows 'local@head'" in body
    # data: the first unreadable manifest is explained once, later runs point at it
    assert "run 't-global-steps10': data.train '/nonexistent/manifest.json' cannot be read: " in body
    assert "run 't-3x2@head-steps10': data.train '/nonexistent/manifest.json' cannot be read (as above)" in body


# --- results table on synthetic run dirs ---------------------------------------------------------------------
def _fake_runs(tmp_path):
    p = _grid(tmp_path, BASE + "axes:\n  s: {key: run.seed, values: [0, 1, 2, 3], prefix: s}\n")
    runs = G.expand(p, run_root=str(tmp_path / "runs"))
    done, resumable, started, _pending = (Path(r.run_dir) for r in runs)
    for d in (done, resumable, started):
        d.mkdir(parents=True)
        (d / "config.yaml").write_text("{}\n")
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "images_per_second": 10.0}) for s in (5, 10)]
    (done / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (done / "final.json").write_text(json.dumps({"step": 10, "loss": 0.1, "images_per_second": 12.5, "finished": True}))
    (done / "eval").mkdir()
    (done / "eval" / "psnr_gap.json").write_text(json.dumps({"gap": 1.5, "per_t": {"300": 1.2}, "curve": [1, 2]}))
    (resumable / "checkpoints" / "step_00000005").mkdir(parents=True)
    (resumable / "checkpoints" / "step_00000005" / "meta.json").write_text('{"step": 5}')
    (resumable / "checkpoints" / "latest").write_text("step_00000005\n")
    (resumable / "metrics.jsonl").write_text(lines[0] + "\n" + '{"step": 7, "lo')  # torn last line
    return runs


def test_run_states_and_status(tmp_path):
    runs = _fake_runs(tmp_path)
    rows = results.run_states(runs, {runs[1].id: "RUNNING job 7_1"})
    assert [r["state"] for r in rows] == ["done", "resumable", "started", "pending"]
    assert rows[0]["step"] == 10 and rows[1]["step"] == 5 and rows[1]["checkpoint"] == "step_00000005"
    text = results.format_status(rows)
    assert "RUNNING job 7_1" in text and "10/10" in text and "5/10" in text
    assert "4 runs: 1 done, 1 pending, 1 resumable, 1 started" in text
    done = RunDir(runs[0].run_dir)
    assert done.is_done(10) and not RunDir(runs[1].run_dir).is_done(10)
    assert not done.is_done(20)  # train.steps raised: the run continues
    assert results.run_states(runs[:1])[0]["state"] == "done"


def test_collect_csv_json_markdown(tmp_path):
    runs = _fake_runs(tmp_path)
    table = results.collect(runs)
    assert table[0]["loss"] == 0.1 and table[0]["psnr_gap.gap"] == 1.5 and table[0]["psnr_gap.per_t.300"] == 1.2
    assert "psnr_gap.curve" not in table[0]
    assert table[1]["state"] == "resumable" and table[3]["state"] == "pending"
    paths = results.write_table(table, tmp_path / "out")
    assert [p.name for p in paths] == ["results.csv", "results.json", "results.md"]
    csv_text = paths[0].read_text().splitlines()
    assert csv_text[0].startswith("run,state,step,loss,images_per_second,axis.s")
    assert len(csv_text) == 5
    assert json.loads(paths[1].read_text())[0]["run"] == "t-s0"
    md = paths[2].read_text()
    assert md.startswith("| run | state |") and "| t-s0 | done |" in md


def test_grid_command(tmp_path, capsys):
    rc = cli_main(["grid", str(GRIDS / "digits-test.yaml"), "--run-root", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "digits-t2-3x2@head-nodes2" in out and "2 runs in grid 'digits'" in out
    rc = cli_main(["grid", str(GRIDS / "digits-test.yaml"), "--run-root", str(tmp_path), "--status"])
    assert rc == 0 and "2 runs: 2 pending" in capsys.readouterr().out
    rc = cli_main(["grid", str(GRIDS / "digits-test.yaml"), "--check-data", "--var", "data_root=/nope"])
    err = capsys.readouterr().err
    assert rc == 2 and "digits-t2-3x2@head-nodes1" in err and "data.train" in err
