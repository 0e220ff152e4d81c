"""The launch layer's pieces that need no service: node and worker ranges, failure lines, exit codes, Kubernetes
names, the summary of a large grid's status, and a claim that ends (renamed, so a listing says the run is free)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from ditscale.errors import LaunchError
from ditscale.launch import claim as C
from ditscale.launch import records, rows
from ditscale.launch.k8s import dns_name, label_value


def test_slurm_node_range():
    from ditscale.launch.slurm import parse_nodes

    assert parse_nodes(None) == (None, None) and parse_nodes("2") == (None, 2) and parse_nodes("1-4") == (1, 4)
    for bad in ("0", "x", "3-1", "1-"):
        with pytest.raises(LaunchError, match="--nodes"):
            parse_nodes(bad)


def test_slurm_node_range_reaches_sbatch_and_submitit_counts_an_int():
    from types import SimpleNamespace

    from submitit.slurm.slurm import _make_sbatch_string

    from ditscale.launch.slurm import SlurmOptions, executor_parameters

    res = {"nodes": 2, "nodes_min": 1, "cpus_per_task": 1, "timeout_min": 5, "gpus_per_node": 0}
    run = SimpleNamespace(resources=res, tasks_per_node=1, grid="g")
    params = executor_parameters(run, SlurmOptions(partition="gpu", log_dir=Path("/tmp/x")))
    assert params["nodes"] == 2  # submitit multiplies it into the number of result files
    script = _make_sbatch_string(command="true", folder="/tmp/x", nodes=params["nodes"],
                                 additional_parameters=params["additional_parameters"])  # fmt: skip
    assert "#SBATCH --nodes=1-2" in script.splitlines() and "#SBATCH --nodes=2" not in script


def test_ray_worker_range(tmp_path):
    from ditscale.launch.common import plan_grid
    from ditscale.launch.ray import RayOptions, worker_range, workers_of

    grid = tmp_path / "g.yaml"
    grid.write_text(
        "name: w\nconfig:\n  model: {variant: DiT-T/2, input_size: 8, in_channels: 1, num_classes: 10}\n"
        "  data: {train: x/manifest.json}\nresources: {nodes: 2, tasks_per_node: 2}\naxes:\n  s: [0]\n"
    )
    (run,) = plan_grid(str(grid), check_data=False, read_state=False).runs
    assert worker_range(run, RayOptions()) == 4 and workers_of(run, RayOptions())[0] == 4
    assert worker_range(run, RayOptions(min_workers=2)) == (2, 4) and workers_of(run, RayOptions(min_workers=2))[0] == 2
    assert worker_range(run, RayOptions(min_workers=8)) == 4  # no fewer than asked: a fixed group


def test_failure_lines_and_exit_codes():
    log = "Traceback (most recent call last):\n  ...\nditscale.errors.ConfigError: model.num_classes=1 but x has 10\n"
    assert records.last_error_line(log) == "ConfigError: model.num_classes=1 but x has 10"
    torchrun = log + "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n=====\nfoo FAILED\n"
    assert records.last_error_line(torchrun) == "ConfigError: model.num_classes=1 but x has 10"
    assert records.last_error_line("x\nerror: run dir r is held by a live trainer\n").startswith("error: run dir")
    assert records.last_error_line("all good\n") is None
    assert (
        records.exit_text(-signal.SIGKILL) == "killed by SIGKILL"
        and records.exit_text(137) == "exit code 137 (SIGKILL)"
    )
    assert records.exit_text(2) == "exit code 2"


def test_kubernetes_names():
    assert dns_name("digits") == "digits"
    name = dns_name("digits-t2-3x2@head-nodes1")
    assert name.startswith("digits-t2-3x2-head-nodes1-") and len(name) <= 50
    long = dns_name("celeba32-xs1-localstar@head-n1e5-s2-" + "x" * 60)
    assert len(long) <= 50 and long[0].isalnum() and long[-1].isalnum()
    assert dns_name("a@b") != dns_name("a.b")  # sanitised alike, told apart by the hash
    assert label_value("grid") == "grid" and len(label_value("r@" * 40)) <= 63


def test_large_grid_status_is_a_summary():
    def row(i, state, why=""):
        return {"run": f"r{i}", "state": state, "step": 1, "steps": 2, "checkpoint": None, "scheduler": "x",
                "loss": None, "world": "", "why": why, "run_dir": ""}  # fmt: skip

    table = [row(i, "done") for i in range(60)] + [row(60, "failed", "exit code 1: ConfigError: x")]
    text = rows.format_rows(table)
    assert text.startswith("61 runs: 60 done, 1 failed") and "1 need attention" in text
    assert "ConfigError" in text and "r5 " not in text and "(--all shows all 61 rows)" in text
    assert "r5 " in rows.format_rows(table, full=True)


def test_an_ended_claim_is_named_so(tmp_path):
    run = str(tmp_path / "r0")
    ok, cl = C.try_claim(run, {"backend": "local"}, lambda c: True)
    assert ok and os.listdir(tmp_path) == ["r0.claim-000001.json"]
    assert C.try_claim(run, {"backend": "local"}, lambda c: True)[0] is False  # live
    C.end(cl, rc=1, why="exit code 1")
    assert os.listdir(tmp_path) == ["r0.claim-000001.ended.json"]
    assert C.parse_listing(os.listdir(tmp_path)) == {"r0": (1, True)}
    got = C.current([run])[run]
    assert got.ended and got.data["why"] == "exit code 1" and got.data["rc"] == 1
    ok, cl2 = C.try_claim(run, {"backend": "local"}, lambda c: True)  # free: taken over without asking anyone
    assert ok and cl2.gen == 2 and os.listdir(tmp_path) == ["r0.claim-000002.json"]
