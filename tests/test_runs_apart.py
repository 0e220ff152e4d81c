"""Two runs of one config (the same run.name, another --run-dir and seed) trained at the same time, scraped by a
REAL Prometheus: they are two runs everywhere.

- every series carries its run's run_id (one per run dir) beside the shared name;
- every dashboard panel shows both (GPU memory, never measured on CPU, shows neither), the loss panel two series;
- the grid table's five queries return two rows, each with its own seed, while they train and after they ended;
  the join the dashboard used before (on the name) fails on the same data with Prometheus' many-to-many error;
- the alerts fire once per run: this Prometheus loads ditscale's rules with the data-wait and straggler thresholds
  lowered to 0 and their `for:` removed (everything else as shipped), so both alerts fire for both runs at once.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ditscale.io.rundir import run_id
from tests import trainers as T
from tests.plugins.prometheus import RULES, PrometheusServer, find_prometheus, free_port
from tests.plugins.prometheus import WAIT_S as PROM_WAIT_S
from tests.test_dashboard import dashboard, grid_rows, to_prometheus, unmeasured_panels

pytestmark = [pytest.mark.slow, pytest.mark.prometheus]

NAME = "twin"
STEPS = 40
DELAY_S = 0.5  # per step: both runs train at the same time for ~20 s, many scrapes (500 ms) after their first loss


@dataclass
class Twin:
    run_dir: Path
    seed: int
    port: int
    trainer: T.Trainer | None = None
    body: str = ""  # the last /metrics body with a loss sample

    @property
    def run_id(self) -> str:
        return run_id(str(self.run_dir))


@dataclass
class TwoRuns:
    prometheus: PrometheusServer
    runs: list[Twin]
    alive_at: float | None  # the last time both answered /metrics with a loss

    @property
    def ids(self) -> set[str]:
        return {r.run_id for r in self.runs}


def lowered_rules(path: Path) -> Path:
    """ditscale's rules with DitscaleDataWaitHigh and DitscaleStraggler firing at any value, without delay."""
    text = RULES.read_text()
    out = text.replace("> 0.2\n        for: 10m\n", ">= 0\n").replace("> 1.3\n        for: 10m\n", ">= 0\n")
    assert out.count(">= 0\n") == 2, "the shipped rules changed: update lowered_rules"
    path.write_text(out)
    return path


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


@pytest.fixture(scope="module")
def two_runs(digits8_dir, warm_deepspeed, tmp_path_factory):
    binary = find_prometheus()
    if binary is None:
        from tests.needs import skip_or_fail

        skip_or_fail("Debian's prometheus binary is not installed (apt-get install prometheus; .ci/setup --services)")
    root = tmp_path_factory.mktemp("two-runs")
    cfg = T.tiny_config(
        root / "config.yaml",
        str(digits8_dir / "manifest.json"),
        run={"name": NAME},
        train={"steps": STEPS},
        checkpoint={"every": STEPS // 2, "keep": 1},
        log={"every": 1, "sample_every": 0, "metrics_addr": "127.0.0.1"},
    )
    runs = [Twin(root / "a", seed=0, port=free_port()), Twin(root / "b", seed=1, port=free_port())]
    prom = PrometheusServer(
        binary=binary,
        root=Path(tempfile.mkdtemp(prefix="ditscale-prom-twins-")),
        port=free_port(),
        rule_files=[lowered_rules(root / "lowered.rules.yaml")],
    )
    prom.targets = {"ditscale": [f"127.0.0.1:{r.port}" for r in runs]}
    prom.start()
    alive_at = None
    try:
        for r in runs:
            overrides = (f"run.seed={r.seed}", f"log.metrics_port={r.port}")
            r.trainer = T.alone(cfg, r.run_dir, *overrides, delay=DELAY_S, env={"OMP_NUM_THREADS": "1"})
        try:
            while any(r.trainer.proc.poll() is None for r in runs):
                bodies = [_scrape(r.port) for r in runs]
                for r, body in zip(runs, bodies, strict=True):
                    if body and "ditscale_train_loss{" in body:
                        r.body = body
                if all(b and "ditscale_train_loss{" in b for b in bodies):
                    alive_at = time.time()
                time.sleep(0.2)
        finally:
            ended = [r.trainer.finish() for r in runs]
        for rc, out in ended:
            assert rc == 0, out[-6000:]
        yield TwoRuns(prom, runs, alive_at)
    finally:
        prom.stop()
        shutil.rmtree(prom.root, ignore_errors=True)


def _ids(result: list[dict]) -> set[str]:
    return {s["metric"].get("run_id") for s in result}


def test_each_run_exports_its_own_run_id_under_the_shared_name(two_runs):
    from prometheus_client.parser import text_string_to_metric_families

    assert two_runs.alive_at is not None, "the two runs never answered /metrics with a loss at the same time"
    assert len(two_runs.ids) == 2
    for r in two_runs.runs:
        samples = [
            s for f in text_string_to_metric_families(r.body) for s in f.samples if s.name.startswith("ditscale_")
        ]
        assert samples and all(s.labels["run_id"] == r.run_id and s.labels["run"] == NAME for s in samples)
        (info,) = [s for s in samples if s.name == "ditscale_run_info"]
        assert info.labels["seed"] == str(r.seed)


def test_every_panel_shows_both_runs(two_runs):
    """At the last moment both were alive, every panel's query returns both run_ids (a panel of a value never
    measured on this machine returns nothing); the loss panel is two series, both named `twin`."""
    prom, at = two_runs.prometheus, two_runs.alive_at
    assert at is not None
    prom.wait_for(f'last_over_time(ditscale_train_loss{{run="{NAME}"}}[10m])', lambda r: _ids(r) == two_runs.ids)
    unmeasured = unmeasured_panels({r.run_id: r.body for r in two_runs.runs})
    wrong = []
    for p in dashboard()["panels"]:
        for t in p["targets"]:
            if t.get("instant"):
                continue  # the grid table: next test
            result = prom.query(to_prometheus(t["expr"]), time_s=at)
            want = set() if p["title"] in unmeasured else two_runs.ids
            if _ids(result) != want:
                wrong.append((p["title"], t["refId"], sorted(_ids(result)), [s["metric"] for s in result]))
    assert not wrong, f"panels that do not show the two runs apart at t={at}: {wrong}"
    (loss_panel,) = [p for p in dashboard()["panels"] if p["title"] == "Loss per run"]
    loss = prom.query(to_prometheus(loss_panel["targets"][0]["expr"]), time_s=at)
    assert len(loss) == 2 and {s["metric"]["run"] for s in loss} == {NAME}, loss


def test_grid_table_has_a_row_per_run_while_they_train_and_after(two_runs):
    """The grid table's five queries, evaluated by the real Prometheus: two rows, each with its run's seed, running
    while they train and ended at 100% after; the join on the name the table used before fails on the same data."""
    prom, at = two_runs.prometheus, two_runs.alive_at
    assert at is not None
    seeds = {r.run_id: str(r.seed) for r in two_runs.runs}
    rows = grid_rows(prom, at)
    assert set(rows) == two_runs.ids, rows
    for rid, row in rows.items():
        assert row["run"] == NAME and row["seed"] == seeds[rid] and row["dataset"] == "digits8", row
        assert set("ABCDE") <= set(row) and row["E"] == 1 and 0 < row["B"] <= 1, row

    by_name = (
        "last_over_time((max by (run, variant, windows, data_size) (ditscale_train_step))[1h:]) * on (run) "
        "group_left (dataset, seed) group by (run, dataset, seed) (last_over_time(ditscale_run_info[1h]))"
    )
    with pytest.raises(RuntimeError, match="many-to-many|duplicate series"):
        prom.query(by_name, time_s=at)

    prom.wait_for(f'ditscale_train_step{{run="{NAME}"}}', lambda r: not r)  # both exporters gone, series stale
    rows = grid_rows(prom, time.time())
    assert set(rows) == two_runs.ids, rows
    for rid, row in rows.items():
        assert row["seed"] == seeds[rid] and row["A"] == STEPS and row["B"] == 1.0 and row["E"] == 0, row


def test_alerts_fire_once_per_run(two_runs):
    """With the thresholds lowered, DitscaleDataWaitHigh and DitscaleStraggler fire for each run apart: two alerts
    each, named `twin`, one per run_id (the rules as shipped would merge nothing either: they group by run_id)."""
    prom = two_runs.prometheus
    for alert in ("DitscaleDataWaitHigh", "DitscaleStraggler"):
        fired = prom.wait_for(
            f'last_over_time(ALERTS{{alertname="{alert}", alertstate="firing"}}[1h])',
            lambda r: _ids(r) == two_runs.ids,
            timeout=PROM_WAIT_S,
        )
        assert len(fired) == 2 and {s["metric"]["run"] for s in fired} == {NAME}, fired
    rules = prom.api("rules")["groups"]
    assert all(r["health"] in ("ok", "unknown") and not r.get("lastError") for g in rules for r in g["rules"]), rules


def test_promtool_accepts_the_lowered_rules(tmp_path):
    """The rules this module's Prometheus loads are valid (the same file as shipped, thresholds aside)."""
    from tests.test_alerts import promtool

    cmd = [promtool(), "check", "rules", str(lowered_rules(tmp_path / "r.yaml"))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=PROM_WAIT_S)
    assert r.returncode == 0, r.stdout + r.stderr
    shipped = yaml.safe_load(RULES.read_text())["groups"]
    lowered = yaml.safe_load((tmp_path / "r.yaml").read_text())["groups"]
    assert [r.get("alert") or r["record"] for g in shipped for r in g["rules"]] == [
        r.get("alert") or r["record"] for g in lowered for r in g["rules"]
    ]
