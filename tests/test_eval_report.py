"""`ditscale report` on hand-written run dirs (config.yaml + eval/*.json): tables, relative FID change, plots."""

from __future__ import annotations

import json

import pytest
import yaml

from ditscale.errors import ConfigError
from ditscale.eval import report


def _run(root, name, windows, n, seed, gap, fid=None, loc=None):
    d = root / name
    (d / "eval").mkdir(parents=True)
    (d / "config.yaml").write_text(
        yaml.safe_dump(
            {"run": {"name": name, "seed": seed, "dir": str(d)}, "model": {"variant": "DiT-T/1", "windows": windows}}
        )
    )
    (d / "eval" / "psnr_gap.json").write_text(
        json.dumps({"avg_gap": gap, "avg_train_psnr": 20 + gap, "avg_test_psnr": 20.0, "n_train": n})
    )
    if fid is not None:
        (d / "eval" / "fid_pixels.json").write_text(json.dumps({"fid": fid, "n_train": n}))
    if loc is not None:
        blocks = [{"block": b, "mean_distance": v, "mass_3x3": 0.5} for b, v in enumerate(loc)]
        (d / "eval" / "locality.json").write_text(
            json.dumps({"blocks": blocks, "uniform": {"mean_distance": 3.0}, "n_train": n})
        )
    return d


def test_report_tables_and_plots(tmp_path):
    grid = tmp_path / "grid"
    _run(grid, "g-n10-s0", "global", 10, 0, 8.0, fid=10.0, loc=[2.0, 2.5])
    _run(grid, "g-n10-s1", "global", 10, 1, 6.0, fid=12.0)
    _run(grid, "l-n10-s0", "local@head", 10, 0, 5.0, fid=8.8, loc=[0.8, 1.9])
    _run(grid, "l-n1000-s0", "local@head", 1000, 0, 0.5, fid=3.0)
    _run(grid, "t-n10-s0", "local@tail", 10, 0, 9.0)
    (grid / "pending").mkdir()
    (grid / "pending" / "config.yaml").write_text("run: {name: pending}\nmodel: {windows: global}\n")
    runs, name = report.discover(str(grid))
    assert len(runs) == 6 and name == "grid"
    text = report.build_report(runs, str(tmp_path / "out"), "t")
    assert "7.00 ± 1.41 (2)" in text  # global N=10 gap over two seeds
    assert "8.80 (-20.0%)" in text  # local FID vs mean global FID 11.0: one number format per metric
    assert "| DiT-T/1 | N=10 | PSNR gap | 7.00 ± 1.41 (2) | 5.00 |  | 9.00 |" in text  # placement row
    assert "Mean attention distance" in text and "0.80" in text
    assert "pending" in text  # listed as a run without results
    for png in ("psnr_gap_vs_n.png", "fid_pixels.png", "locality.png", "report.md"):
        assert (tmp_path / "out" / png).stat().st_size > 0


def test_report_errors(tmp_path):
    with pytest.raises(ConfigError):
        report.discover(str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="no runs"):
        report.report([str(tmp_path)])


def test_study_plan_is_disjoint_and_consistent():
    from ditscale.eval.study import StudyOptions, plan

    runs, pairs, data = plan(StudyOptions(out="x"))
    ids = [r["id"] for r in runs]
    assert len(ids) == len(set(ids)) == 7
    assert pairs == [("global-n10-a", "global-n10-b"), ("global-n750-a", "global-n750-b")]
    by = {r["id"]: r["config"] for r in runs}
    assert by["global-n10-a"]["data"]["train"] != by["global-n10-b"]["data"]["train"]
    assert by["local-n100-s0"]["model"]["windows"] == "3x2@head"
    assert by["local-n100-s0"]["data"]["train"] == by["global-n100-s0"]["data"]["train"]
    assert {c["train"]["steps"] for c in by.values()} == {1000}
    assert all(c["data"]["flip"] is False and c["train"]["zero_stage"] == 0 for c in by.values())
    from ditscale.config import config_from_dict

    for c in by.values():
        config_from_dict(c)  # every generated config validates


# ------------------------------------------------------------------------------------------ training section


def _log(run_dir, losses, every=10, final=True):
    """metrics.jsonl as the trainer writes it (a torn last line included), a sample grid, final.json."""
    lines = [json.dumps({"step": (i + 1) * every, "loss": v, "images_per_second": 100.0}) for i, v in enumerate(losses)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 99')
    if final:
        final_rec = {"step": len(losses) * every, "loss": losses[-1], "finished": True}
        (run_dir / "final.json").write_text(json.dumps(final_rec))
    from PIL import Image

    (run_dir / "samples").mkdir(exist_ok=True)
    for step in (every, len(losses) * every):
        Image.new("L", (8, 8), color=step % 256).save(run_dir / "samples" / f"step_{step:08d}.png")


def test_report_loss_curves_and_sample_grids(tmp_path):
    grid = tmp_path / "grid"
    a = _run(grid, "g-n10-s0", "global", 10, 0, 8.0)
    b = _run(grid, "l-n10-s0", "local@head", 10, 0, 5.0)
    c = _run(grid, "l-n10-s1", "local@head", 10, 1, 5.5)
    _run(grid, "g-n1000-s0", "global", 1000, 0, 1.0)  # no metrics.jsonl: pending, no curve
    _log(a, [1.0, 0.5, 0.25, float("nan"), 0.2])
    _log(b, [1.0, 0.4, 0.2])
    _log(c, [1.0, 0.45], final=False)
    d = _run(grid, "l-n10-s2", "local@head", 10, 2, 5.2)
    _log(d, [1.0, 0.3])
    (d / "final.json").write_text(json.dumps({"step": 20, "loss": 0.3, "finished": False, "diverged": True}))
    starts = [(0, 2, 1, 2), (20, 2, 1, 2), (30, 1, 1, 3), (40, 4, 2, 3)]  # a requeue that kept its world size
    (a / "config_history.jsonl").write_text(
        "".join(
            json.dumps({"event": "start", "step": st, "world_size": w, "nodes": no, "zero_stage": z}) + "\n"
            for st, w, no, z in starts
        )
    )
    runs, _ = report.discover(str(grid))
    assert report.read_loss_curve(str(a)) == [(10, 1.0), (20, 0.5), (30, 0.25), (50, 0.2)]  # NaN and torn line out
    out = tmp_path / "out"
    text = report.build_report(runs, str(out), "t")
    assert "## Training" in text
    world = "2x ZeRO-2 from 0, 1x ZeRO-3 from 30, 4x ZeRO-3 on 2 nodes from 40"  # the world-size history
    assert f"| g-n10-s0 | DiT-T/1 | global | N=10 | 0 |  | done | 50 | 0.2000 | {world} |" in text
    assert "| l-n10-s1 | DiT-T/1 | local@head | N=10 | 1 |  | started | 20 | 0.4500 |  |" in text
    assert "| l-n10-s2 | DiT-T/1 | local@head | N=10 | 2 |  | diverged | 20 | 0.3000 |  |" in text
    assert "| g-n1000-s0 | DiT-T/1 | global | N=1e3 | 0 |  | pending |  |  |  |" in text
    assert "![training loss against step, DiT-T/1](loss_DiT-T_1.png)" in text
    assert (out / "loss_DiT-T_1.png").stat().st_size > 0
    # newest grid of each run, copied next to report.md, one column per window configuration
    assert (out / "samples" / "g-n10-s0.png").read_bytes() == (a / "samples" / "step_00000050.png").read_bytes()
    assert "| DiT-T/1 N=10 s0 | ![g-n10-s0](samples/g-n10-s0.png) | ![l-n10-s0](samples/l-n10-s0.png) |" in text
    assert "| DiT-T/1 N=10 s1 |  | ![l-n10-s1](samples/l-n10-s1.png) |" in text
    assert text.index("## Training") < text.index("## PSNR gap against N")


def test_report_reads_run_dirs_in_object_storage(s3_server, tmp_path):
    """A grid whose runs live in s3:// (moto on loopback): curves, final.json and sample grids come through fsspec."""
    bucket = s3_server.bucket()
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(
        yaml.safe_dump(
            {
                "name": "s3grid",
                "config": {"model": {"variant": "DiT-T/2", "input_size": 8, "in_channels": 1, "num_classes": 10}},
                "run_dir": f"{bucket}/runs/{{id}}",
                "axes": {
                    "windows": {"key": "model.windows", "values": ["global", "3x2@head"]},
                    "n": [10, 100],
                },
            }
        )
    )
    from ditscale.grid import expand

    specs = expand(str(grid_file))
    assert len(specs) == 4
    for i, r in enumerate(specs):
        local = tmp_path / "stage" / r.id
        local.mkdir(parents=True)
        _log(local, [1.0, 0.5 - 0.1 * i], final=i != 3)
        s3_server.fs.put(str(local) + "/", r.run_dir.removeprefix("s3://") + "/", recursive=True)
    runs, name = report.discover(str(grid_file))
    assert name == "g" and {r.n for r in runs} == {10, 100}
    assert report.read_loss_curve(specs[1].run_dir) == [(10, 1.0), (20, 0.4)]
    text = report.build_report(runs, str(tmp_path / "out"), "s3")
    assert (tmp_path / "out" / "loss_DiT-T_2.png").stat().st_size > 0
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 4
    assert text.count("| done |") == 3 and text.count("| started |") == 1


def test_report_grid_is_a_folder_of_run_dirs_on_s3(s3_server, tmp_path):
    """`report --grid s3://bucket/runs`: the run roots the launchers (and the RayJob) write, found by one listing
    (issue #22 item 8); the report goes beside them unless --out says otherwise."""
    import subprocess
    import sys

    root = s3_server.bucket() + "/runs"
    for name, windows, n in (("g-n10-s0", "global", 10), ("l-n10-s0", "local@head", 10)):
        local = _run(tmp_path / "stage", name, windows, n, 0, 5.0 if windows == "global" else 3.0)
        _log(local, [1.0, 0.5])
        s3_server.fs.put(str(local) + "/", f"{root}/{name}/".removeprefix("s3://"), recursive=True)
    runs, name = report.discover(root)
    assert name == "runs" and sorted(r.id for r in runs) == ["g-n10-s0", "l-n10-s0"]
    assert {r.run_dir for r in runs} == {f"{root}/g-n10-s0", f"{root}/l-n10-s0"}
    r = subprocess.run([sys.executable, "-m", "ditscale", "report", "--grid", root], capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"wrote {root}/report/report.md" in r.stdout
    assert "| g-n10-s0 |" in (s3_server.fs.cat(f"{root}/report/report.md".removeprefix("s3://")).decode())
    with pytest.raises(ConfigError, match="nothing there"):
        report.discover(s3_server.bucket() + "/nothing")


def test_report_spread_and_paired_difference(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"  # two grids reported together
    for s, (g, h, t) in enumerate([(2.0, 1.5, 2.5), (1.0, 0.9, 1.2), (1.5, 1.3, 1.2)]):
        _run(a, f"g-n30-s{s}", "global", 30, s, g, fid=4.0 + s)
        _run(a, f"h-n30-s{s}", "3x2@head", 30, s, h, fid=4.0)
        _run(b, f"t-n30-s{s}", "3x2@tail", 30, s, t)
    from ditscale.cli import main

    assert main(["report", "--grid", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Per configuration: mean, spread, paired difference to global" in text
    assert "| DiT-T/1 | N=30 | global | 3 | 1.50 ± 0.50 [1.00..2.00] |  | 20.00 ± 0.00 [20.00..20.00] |  |" in text
    # head - global per shuffle: -0.5, -0.1, -0.2 -> mean -0.27, all three lower
    assert "| 3x2@head | 3 | 1.23 ± 0.31 [0.90..1.50] | -0.27 ± 0.21 [-0.50..-0.10] (3/3 lower) |" in text
    assert "| 3x2@tail | 3 | 1.63 ± 0.75 [1.20..2.50] | 0.13 ± 0.40 [-0.30..0.50] (1/3 lower) |" in text
    assert "| 0.00 ± 0.00 [0.00..0.00] (0/3 higher) |" in text  # the test PSNR is the same in every run
    assert "5.00 ± 1.00 [4.00..6.00]" in text  # global's pixel FID over its three shuffles
    assert "| 4.00 ± 0.00 [4.00..4.00] | -1.00 ± 1.00 [-2.00..0.00] (2/3 lower) |" in text  # head's, paired
    assert (tmp_path / "out" / "psnr_gap_paired.png").stat().st_size > 0 and "psnr_gap_paired.png" in text


def test_report_keeps_every_varying_axis_apart(tmp_path):
    """Runs that differ in an axis besides windows, N and seed (nodes=1 / nodes=2) are separate configurations:
    their own rows, their own global baseline, their own colour; every line has markers."""
    runs = []
    for nodes, gaps in ((1, (2.0, 1.0)), (2, (4.0, 3.0))):
        for w, gap in zip(("global", "3x2@head"), gaps, strict=True):
            d = _run(tmp_path / "g", f"{w}-nodes{nodes}", w, 30, 0, gap, fid=gap)
            evals = report._read_evals(str(d))
            runs.append(report.RunInfo(d.name, str(d), "DiT-T/1", w, 0, 30, evals, {"windows": w, "nodes": nodes}))
    assert {r.config for r in runs} == {"global nodes=1", "3x2@head nodes=1", "global nodes=2", "3x2@head nodes=2"}
    text = report.build_report(runs, str(tmp_path / "out"), "t")
    assert "| DiT-T/1 | N=30 | 3x2@head nodes=2 | 1 | 3.00 | -1.00 (1/1 lower) |" in text  # vs global nodes=2
    assert "| DiT-T/1 | N=30 | 3x2@head nodes=1 | 1 | 1.00 | -1.00 (1/1 lower) |" in text
    order = report._windows_order(r.config for r in runs)
    styles = [report._style(order.index(r.config), 0) for r in runs]
    assert len({(s["color"], s["marker"]) for s in styles}) == 4 and all(s["marker"] for s in styles)


def test_psnr_curves_paired_against_global(tmp_path):
    """The curve figure: train/test PSNR, held-out PSNR minus global's on the same shuffle, and the gap."""
    runs = []
    for seed in (0, 1):
        for w, shift in (("global", 0.0), ("local@head", 0.5)):
            d = _run(tmp_path / "g", f"{w}-s{seed}", w, 10, seed, 1.0)
            ev = json.loads((d / "eval" / "psnr_gap.json").read_text())
            ev.update(timesteps=[0, 500, 999], train_psnr=[30.0, 15.0, 8.0], gap=[0.5, 1.0, 0.2])
            ev["test_psnr"] = [29.5 + shift, 14.0 + shift + seed, 7.8 + shift]
            (d / "eval" / "psnr_gap.json").write_text(json.dumps(ev))
    runs, _ = report.discover(str(tmp_path / "g"))
    assert report.plot_curves(runs, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 0
