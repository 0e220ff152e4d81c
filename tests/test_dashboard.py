"""The Grafana dashboard: k8s/dashboards/ditscale.json is the source of truth.

- its structure (panels, variables, the data-source input the import dialog asks for) is what Grafana's JSON
  model expects;
- k8s/50-grafana-dashboard.yaml embeds exactly that JSON (regenerate with `python tests/test_dashboard.py`);
- every metric name in its PromQL is one the trainer exports (a real /metrics scrape of a short 2-rank run) or a
  series recorded by ditscale's rules (k8s/rules/ditscale.rules.yaml), and every label it groups, joins or filters
  by is on those metrics; every query groups by run_id (one per run dir) and joins on it, never on the name alone;
- every query parses and evaluates in a REAL Prometheus that scraped that run (and loaded the rules): while the
  run was alive every panel returns data, except those of values the run never measured (GPU memory on a CPU-only
  run), which return nothing rather than 0; after it ended (its exporter gone, its series stale) every panel's
  range query still does, and the grid table, an instant query over the dashboard's range, still lists the run.
Two concurrent runs of one config: tests/test_runs_apart.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ditscale.io.rundir import run_id

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "k8s" / "dashboards" / "ditscale.json"
CONFIGMAP = ROOT / "k8s" / "50-grafana-dashboard.yaml"
CONFIGMAP_HEADER = """\
# The Grafana dashboard (k8s/dashboards/ditscale.json, embedded verbatim; regenerate this file with
# `python tests/test_dashboard.py` after editing the JSON). The Grafana sidecar of kube-prometheus-stack loads
# ConfigMaps labelled grafana_dashboard: "1"; by default it only looks in Grafana's own namespace, so install
# with grafana.sidecar.dashboards.searchNamespace=ALL (or apply this file to Grafana's namespace). See
# docs/grafana.md.
apiVersion: v1
kind: ConfigMap
metadata:
  name: ditscale-grafana-dashboard
  namespace: ditscale
  labels:
    app.kubernetes.io/name: ditscale
    grafana_dashboard: "1"
  annotations:
    grafana_folder: ditscale
data:
  ditscale.json: |
"""
RULES = ROOT / "k8s" / "rules" / "ditscale.rules.yaml"
NAME = re.compile(r"(?<![\w:])[a-zA-Z_:][a-zA-Z0-9_:]*")
FUNCS_AND_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
VARIABLES = ("variant", "run", "run_id", "windows", "data_size", "rank")
GRID_AXES = {"variant", "dataset", "windows", "data_size", "seed"}
EXPECTED_PANELS = [
    "Grid overview",
    "Loss per run",
    "Throughput",
    "Step time p50 / p95",
    "Data-wait share",
    "Step time per rank (stragglers)",
    "GPU memory per rank",
    "Checkpoint duration",
    "Skipped samples",
]


def render_configmap(json_text: str) -> str:
    body = "".join(("    " + line if line else line) for line in json_text.splitlines(keepends=True))
    return CONFIGMAP_HEADER + body


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def exprs(d: dict | None = None) -> list[str]:
    d = d or dashboard()
    out = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            out.append(v["query"]["query"] if isinstance(v["query"], dict) else v["query"])
    return out


def metric_names(expr: str) -> set[str]:
    """ditscale series an expression reads: exported names (ditscale_...) and recorded ones (level:ditscale_...:op)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label values are not names
    return {n for n in NAME.findall(expr) if n.startswith("ditscale_") or (":" in n and "ditscale_" in n)}


def recorded_names() -> set[str]:
    return {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}


def label_names(expr: str) -> set[str]:
    """Labels used in by/without/on/ignoring/group_left/group_right clauses, {selectors} and label_values(...)."""
    names: set[str] = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        names |= {n.strip() for n in group.split(",") if n.strip()}
    for sel in re.findall(r"\{([^}]*)\}", expr):
        names |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", sel))
    m = re.match(r"label_values\(.*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)$", expr.strip())
    if m:
        names.add(m.group(1))
    return names - FUNCS_AND_KEYWORDS


def to_prometheus(expr: str) -> str:
    """Grafana variables -> plain PromQL for a direct query (All selected)."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$__interval", "15s")
    return re.sub(r"\$\{?(" + "|".join(VARIABLES) + r")\b\}?", ".*", expr)


def exported_names(scrape: str) -> tuple[set[str], set[str]]:
    """Sample names a /metrics body offers (declared families included) and the label names on them."""
    names: set[str] = set()
    labels: set[str] = set()
    for fam in text_string_to_metric_families(scrape):
        if fam.type == "counter":
            names |= {fam.name + "_total"}
        elif fam.type == "histogram":
            names |= {fam.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(fam.name)
        for s in fam.samples:
            names.add(s.name)
            labels |= set(s.labels)
    return names, labels


# ------------------------------------------------------------------------------------------------- structure


def test_dashboard_json_model():
    d = dashboard()
    assert d["uid"] == "ditscale-training" and d["title"] and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert list(variables) == ["datasource", *VARIABLES]
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in VARIABLES:
        v = variables[name]
        assert v["type"] == "query" and v["includeAll"] and v["multi"] and v["refresh"] == 2  # on time range change
        assert v["query"]["query"].startswith("label_values(") and v["query"]["query"].endswith(f", {name})")
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    titles = [p["title"] for p in d["panels"]]
    for want in EXPECTED_PANELS:
        assert any(t.startswith(want) for t in titles), f"missing panel {want!r} in {titles}"
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["refId"] and t["expr"]
            # every panel follows the variables, so the dashboard filters as a whole; rank wherever the series
            # have ranks (run-level recorded series have none)
            wanted = VARIABLES if not all(n.startswith("run:") for n in metric_names(t["expr"])) else VARIABLES[:-1]
            for sel in re.findall(r"(?:ditscale_[a-z0-9_]+|:[a-z0-9_]+)\{([^}]*)\}", t["expr"]):
                assert all(f'{v}=~"${v}"' in sel for v in wanted), (p["title"], t["expr"])


def test_import_asks_for_the_data_source():
    """Grafana's import dialog shows a picker for every `__inputs` entry and writes the chosen data source where
    ${DS_PROMETHEUS} stands: the datasource variable's default, which every panel and variable query uses."""
    d = dashboard()
    (inp,) = d["__inputs"]
    assert inp["name"] == "DS_PROMETHEUS" and inp["type"] == "datasource" and inp["pluginId"] == "prometheus"
    text = DASHBOARD.read_text()
    assert set(re.findall(r"\$\{(DS_[A-Z_]+)\}", text)) == {"DS_PROMETHEUS"}
    ds = d["templating"]["list"][0]
    assert ds["current"]["value"] == "${DS_PROMETHEUS}"
    requires = {(r["type"], r["id"]) for r in d["__requires"]}
    assert ("datasource", "prometheus") in requires
    assert {("panel", p["type"]) for p in d["panels"]} <= requires


def test_units():
    by_title = {p["title"].split(" (")[0]: p for p in dashboard()["panels"]}
    assert by_title["Throughput"]["fieldConfig"]["defaults"]["unit"] == "count:images/s"  # 1.2K images/s
    assert by_title["Data-wait share of step time"]["fieldConfig"]["defaults"]["unit"] == "percentunit"
    grid = by_title["Grid overview"]
    units = {
        o["matcher"]["options"]: prop["value"]
        for o in grid["fieldConfig"]["overrides"]
        for prop in o["properties"]
        if prop["id"] == "unit"
    }
    assert units["Images/s"] == "count:images/s" and units["Progress"] == "percentunit"


def test_grid_table_groups_by_the_grid_axes_over_the_dashboard_range():
    """One row per run, keyed by its run_id: every value is aggregated by run_id only and reads the last value in
    the time range, so finished runs stay; the run's name and grid cell come from its latest ditscale_run_info in
    the range (one series per run_id by construction, so the join never meets two matches)."""
    (grid,) = [p for p in dashboard()["panels"] if p["title"].startswith("Grid overview")]
    assert grid["type"] == "table"
    for t in grid["targets"]:
        assert t["instant"] is True and t["format"] == "table"
        assert "[$__range:]" in t["expr"]  # last_over_time over the dashboard's range
        join = "* on (run_id) group_left (run, variant, windows, data_size, dataset, seed) "
        assert join in t["expr"] and "ditscale_run_info" in t["expr"]
        assert "topk by (run_id) (1, " in t["expr"]  # the run's latest labels only
        values = t["expr"].split(join)[0]
        assert re.findall(r"\b(?:max|avg) by \(([^)]*)\)", values) and all(
            g == "run_id" for g in re.findall(r"\b(?:max|avg) by \(([^)]*)\)", values)
        ), t["expr"]
    organize = next(x for x in grid["transformations"] if x["id"] == "organize")["options"]
    assert GRID_AXES | {"run", "run_id"} <= set(organize["renameByName"])
    assert [x["id"] for x in grid["transformations"]][0] == "merge"


def test_every_query_tells_runs_apart_by_run_id():
    """Each aggregation keeps run_id (run beside it where the legend names the run) and every join matches on
    run_id: two runs of one config (same run name) are never merged, averaged or joined to each other's labels."""
    for e in exprs():
        if e.startswith("label_values("):
            continue
        for group in re.findall(r"\b(?:sum|avg|max|min|count|quantile|topk|group) by \(([^)]*)\)", e):
            assert "run_id" in [x.strip() for x in group.split(",")], (group, e)
        for on in re.findall(r"\bon \(([^)]*)\)", e):
            assert on.strip() == "run_id", e
    for p in dashboard()["panels"]:
        for t in p["targets"]:
            assert not t.get("legendFormat") or "{{run_id}}" in t["legendFormat"], (p["title"], t["legendFormat"])


def test_dashboard_promql_shapes():
    d = dashboard()
    by_title = {p["title"].split(" (")[0]: p for p in d["panels"]}
    thr = by_title["Throughput"]["targets"][0]["expr"]
    assert thr.startswith("sum by (run_id, run) (rate(ditscale_samples_total{")
    st = [t["expr"] for t in by_title["Step time p50 / p95"]["targets"]]
    assert any(e.startswith("histogram_quantile(0.5,") for e in st)
    assert any(e.startswith("histogram_quantile(0.95,") for e in st)
    assert all("ditscale_step_time_seconds_bucket" in e and "le)" in e for e in st)
    strag = by_title["Step time per rank"]["targets"][0]["expr"]
    assert "by (run_id, run, rank)" in strag and "run_rank:ditscale_step_time_seconds:mean5m" in strag
    ratio = by_title["Straggler ratio"]["targets"][0]["expr"]
    assert "run:ditscale_step_time_seconds:straggler_ratio5m" in ratio  # the series the alert uses
    wait = [t["expr"] for t in by_title["Data-wait share of step time"]["targets"]]
    assert all("run_rank:ditscale_data_wait:ratio5m" in e for e in wait)
    assert "by (run_id, run, rank)" in by_title["GPU memory per rank"]["targets"][0]["expr"]
    assert by_title["GPU memory per rank"]["fieldConfig"]["defaults"]["unit"] == "bytes"


def test_configmap_embeds_exactly_the_dashboard_json():
    text = DASHBOARD.read_text()
    assert CONFIGMAP.read_text() == render_configmap(text), "regenerate with `python tests/test_dashboard.py`"
    (cm,) = [d for d in yaml.safe_load_all(CONFIGMAP.read_text()) if d]
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["ditscale.json"] == text
    assert json.loads(cm["data"]["ditscale.json"]) == dashboard()


def test_label_and_metric_extraction_helpers():
    e = 'sum by (run, le) (rate(ditscale_step_time_seconds_bucket{run=~"$run", rank!="0"}[$__rate_interval]))'
    assert metric_names(e) == {"ditscale_step_time_seconds_bucket"}
    assert label_names(e) == {"run", "le", "rank"}
    j = 'max by (run) (run:ditscale_x:r5m{run=~"a"}) * on (run) group_left (seed) ditscale_run_info{variant="b"}'
    assert metric_names(j) == {"run:ditscale_x:r5m", "ditscale_run_info"}
    assert label_names(j) == {"run", "seed", "variant"}
    assert label_names('label_values(ditscale_train_loss{run=~"$run"}, windows)') == {"run", "windows"}
    assert to_prometheus(e).endswith('{run=~".*", rank!="0"}[1m]))')
    assert to_prometheus('x{run=~"$run", run_id=~"${run_id}"}') == 'x{run=~".*", run_id=~".*"}'


@pytest.mark.slow
@pytest.mark.prometheus
def test_every_dashboard_query_parses_in_real_prometheus(prometheus_server):
    for expr in exprs():
        m = re.match(r"label_values\((.*),\s*(\w+)\)$", expr)
        prometheus_server.query(to_prometheus(m.group(1) if m else expr))  # raises on a PromQL parse error


# ------------------------------------------------------------------------------- against the real trainer


@pytest.mark.slow
@pytest.mark.prometheus
def test_every_dashboard_metric_is_exported_by_the_trainer(monitored_training):
    assert monitored_training.scrapes, f"no /metrics scrape while the run was alive:\n{monitored_training.output}"
    names: set[str] = set()
    labels: set[str] = set()
    for body in monitored_training.scrapes.values():
        n, lab = exported_names(body)
        names |= n
        labels |= lab
    used = set().union(*(metric_names(e) for e in exprs()))
    assert used, "the dashboard uses no ditscale_ metric"
    recorded = {n for n in used if ":" in n}
    assert recorded <= recorded_names(), f"recorded series no rule defines: {recorded - recorded_names()}"
    missing = sorted(used - recorded - names)
    assert not missing, f"dashboard metrics the trainer does not export: {missing}; exported: {sorted(names)}"
    used_labels = set().union(*(label_names(e) for e in exprs()))
    assert not sorted(used_labels - labels), f"labels not on the trainer's metrics: {used_labels - labels}"


@pytest.mark.slow
@pytest.mark.prometheus
def unmeasured_panels(scrapes: dict) -> set[str]:
    """Panels of values a run never measured, which must stay empty (absent, not 0): GPU memory without a GPU."""
    bodies = "".join(scrapes.values())
    return set() if "ditscale_gpu_memory_allocated_bytes{" in bodies else {"GPU memory per rank"}


def test_every_dashboard_query_returns_data_from_real_prometheus(monitored_training):
    """Every panel query and variable, evaluated by the real Prometheus at the last moment the run was scraped
    alive, returns series (the run's series go stale once it exits, so 'now' would be too late); the panels of
    values the run never measured (GPU memory on this CPU-only machine) return none, not 0."""
    run, prom = monitored_training, monitored_training.prometheus
    assert run.alive_at is not None, f"the run never answered on /metrics:\n{run.output[-4000:]}"
    prom.wait_for(f'last_over_time(ditscale_train_loss{{run="{run.run_name}"}}[10m])')
    at = run.alive_at
    d = dashboard()
    empty, unmeasured = [], unmeasured_panels(run.scrapes)
    for p in d["panels"]:
        for t in p["targets"]:
            result = prom.query(to_prometheus(t["expr"]), time_s=at)  # raises on a PromQL error
            if p["title"] in unmeasured:
                assert not result, f"{p['title']}: a value this run never measured has samples: {result}"
            elif not result:
                empty.append((p["title"], t["refId"], t["expr"]))
    assert not empty, f"panel queries without data at t={at}: {empty}"
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            m = re.match(r"label_values\((.*),\s*(\w+)\)$", v["query"]["query"])
            series, label = to_prometheus(m.group(1)), m.group(2)
            found = prom.api("series", **{"match[]": series, "start": f"{at - 600:.3f}", "end": f"{at:.3f}"})
            assert {s.get(label) for s in found} - {None, ""}, f"variable {v['name']}: no {label} values"

    def values(expr: str) -> dict[str, float]:
        return {s["metric"].get("run", ""): float(s["value"][1]) for s in prom.query(expr, time_s=at)}

    by_title = {p["title"]: p for p in d["panels"]}
    loss = values(to_prometheus(by_title["Loss per run"]["targets"][0]["expr"]))
    assert 0 < loss[run.run_name] < 10, loss
    thr = values(to_prometheus(by_title["Throughput (images/s)"]["targets"][0]["expr"]))
    assert thr[run.run_name] > 0, thr
    step = values(to_prometheus(by_title["Step"]["targets"][0]["expr"]))
    assert step[run.run_name] >= 1, step
    ratio = values(to_prometheus(by_title["Straggler ratio (slowest / median rank)"]["targets"][0]["expr"]))
    assert ratio[run.run_name] >= 1, ratio


def grid_rows(prom, time_s: float) -> dict[str, dict]:
    """The grid table as Grafana's merge transformation builds it: run_id -> {run, axes..., A: value, B: ...}."""
    (grid,) = [p for p in dashboard()["panels"] if p["title"].startswith("Grid overview")]
    rows: dict[str, dict] = {}
    for t in grid["targets"]:
        for s in prom.query(to_prometheus(t["expr"]), time_s=time_s):
            row = rows.setdefault(s["metric"]["run_id"], {})
            for k, v in s["metric"].items():
                assert row.setdefault(k, v) == v, (k, row, s)  # the same cell in every query: merge joins them
            row[t["refId"]] = float(s["value"][1])
    return rows


@pytest.mark.slow
@pytest.mark.prometheus
def test_dashboard_after_the_run_ended_keeps_it(monitored_training):
    """Once the trainer exited (its exporter is gone, Prometheus marked its series stale), an instant query of the
    raw series is empty, but the grid table still lists the run with its grid cell, final step, progress 100%,
    loss and state 'ended', every panel's range query over the time range still returns its data, and every
    variable still offers the run's values."""
    run, prom = monitored_training, monitored_training.prometheus
    assert run.returncode == 0 and run.alive_at is not None, run.output[-4000:]
    # stale: the exporter is gone (wait, up to WAIT_S, for the failed scrape or the removed target to show)
    prom.wait_for(f'ditscale_train_step{{run="{run.run_name}"}}', lambda r: not r)
    now = time.time()
    rows = grid_rows(prom, now)
    assert run_id(str(run.run_dir)) in rows, f"the grid table lost the finished run: {rows}"
    row = rows[run_id(str(run.run_dir))]
    steps = yaml.safe_load(run.config_path.read_text())["train"]["steps"]
    assert GRID_AXES | {"run"} <= set(row) and row["run"] == run.run_name, row
    assert row["dataset"] == "digits8" and row["seed"] == "0" and row["variant"] == "DiT-T/2", row
    manifest = json.loads(Path(yaml.safe_load(run.config_path.read_text())["data"]["train"]).read_text())
    assert row["data_size"] == str(manifest["num_samples"]), row
    assert row["A"] == steps and row["B"] == 1.0, row  # last step, progress
    assert 0 < row["C"] < 10 and row["D"] > 0, row  # loss, images/s
    assert row["E"] == 0, row  # ended
    d = dashboard()
    start = run.alive_at - 600
    empty, unmeasured = [], unmeasured_panels(run.scrapes)
    for p in d["panels"]:
        for t in p["targets"]:
            if t.get("instant") or p["title"] in unmeasured:
                continue  # the grid table, checked above; panels of values never measured (checked while alive)
            found = prom.api(
                "query_range", query=to_prometheus(t["expr"]), start=f"{start:.3f}", end=f"{now:.3f}", step="1"
            )["result"]
            if not any(s["metric"].get("run") == run.run_name for s in found):
                empty.append((p["title"], t["refId"]))
    assert not empty, f"panels without the ended run's data over the time range: {empty}"
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            m = re.match(r"label_values\((.*),\s*(\w+)\)$", v["query"]["query"])
            found = prom.api("series", **{"match[]": to_prometheus(m.group(1)), "start": f"{start:.3f}",
                                          "end": f"{now:.3f}"})  # fmt: skip
            assert {s.get(m.group(2)) for s in found} - {None, ""}, f"variable {v['name']}: no values after the run"


@pytest.mark.slow
@pytest.mark.prometheus
def test_grid_table_while_the_run_was_alive(monitored_training):
    run, prom = monitored_training, monitored_training.prometheus
    assert run.alive_at is not None, run.output[-4000:]
    prom.wait_for(f'last_over_time(ditscale_train_loss{{run="{run.run_name}"}}[10m])')
    row = grid_rows(prom, run.alive_at)[run_id(str(run.run_dir))]
    assert row["E"] == 1 and 0 < row["B"] <= 1 and row["A"] >= 1, row  # running, part way


if __name__ == "__main__":  # regenerate k8s/50-grafana-dashboard.yaml from the JSON
    CONFIGMAP.write_text(render_configmap(DASHBOARD.read_text()))
    print(f"wrote {CONFIGMAP}")


def test_grid_queries_keep_runs_of_one_name_apart_and_a_changed_run_whole(tmp_path):
    """The five grid-table queries, evaluated by promtool on input series: two runs of one config (name "twin",
    seeds 0 and 1, two run_ids) are two rows with their own seed; a run resumed with another seed (its exporter's
    label set changes at minute 15) is one row with its current seed. No query fails."""
    from tests.test_alerts import WAIT_S, promtool

    axes = 'run="twin",variant="DiT-T/2",windows="global",data_size="1000",rank="0"'
    series = []
    for rid, steps in (("a", "0+1x30"), ("b", "0+2x30")):
        series += [
            (f'ditscale_train_step{{run_id="{rid}",{axes}}}', steps),
            (f'ditscale_train_planned_steps{{run_id="{rid}",{axes}}}', "100x30"),
            (f'ditscale_train_loss{{run_id="{rid}",{axes}}}', "0.5x30"),
            (f'ditscale_images_per_second{{run_id="{rid}",{axes}}}', "80x30"),
            (
                f'ditscale_run_info{{run_id="{rid}",{axes},dataset="digits8",seed="{"0" if rid == "a" else "1"}"}}',
                "1x30",
            ),
        ]
    resumed = axes.replace('run="twin"', 'run="again"')
    series += [
        (f'ditscale_train_step{{run_id="c",{resumed}}}', "0+1x10 _x4 10+1x15"),
        (f'ditscale_train_planned_steps{{run_id="c",{resumed}}}', "100x10 _x4 100x15"),
        (f'ditscale_train_loss{{run_id="c",{resumed}}}', "0.5x10 _x4 0.4x15"),
        (f'ditscale_images_per_second{{run_id="c",{resumed}}}', "80x10 _x4 80x15"),
        (f'ditscale_run_info{{run_id="c",{resumed},dataset="digits8",seed="0"}}', "1x10"),
        (f'ditscale_run_info{{run_id="c",{resumed},dataset="digits8",seed="5"}}', "_x15 1x15"),
    ]
    row = (
        'run="{run}",run_id="{rid}",variant="DiT-T/2",windows="global",data_size="1000",dataset="digits8",seed="{seed}"'
    )
    rows = {"a": ("twin", "0"), "b": ("twin", "1"), "c": ("again", "5")}
    step_at_30m = {"a": 30, "b": 60, "c": 25}
    (grid,) = [p for p in dashboard()["panels"] if p["title"].startswith("Grid overview")]
    tests = []
    for t in grid["targets"]:
        samples = []
        for rid, (run, seed) in rows.items():
            value = {"A": step_at_30m[rid], "B": step_at_30m[rid] / 100, "C": 0.5 if rid != "c" else 0.4, "D": 80}
            labels = "{" + row.format(run=run, rid=rid, seed=seed) + "}"
            samples.append({"labels": labels, "value": value.get(t["refId"], 1)})
        tests.append({"expr": to_prometheus(t["expr"]), "eval_time": "30m", "exp_samples": samples})
    spec = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "promql_expr_test": tests,
            }
        ],
    }
    (tmp_path / "grid.test.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    r = subprocess.run(
        [promtool(), "test", "rules", "grid.test.yaml"], capture_output=True, text=True, timeout=WAIT_S, cwd=tmp_path
    )
    assert r.returncode == 0, r.stdout + r.stderr
