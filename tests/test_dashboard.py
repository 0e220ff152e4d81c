"""The Grafana dashboard: k8s/dashboards/ditscale.json is the source of truth.

- its structure (panels, variables, datasource variable) is what Grafana's JSON model expects;
- k8s/50-grafana-dashboard.yaml embeds exactly that JSON (regenerate with `python tests/test_dashboard.py`);
- every metric name in its PromQL is one the trainer exports (a real /metrics scrape of a short 2-rank run), and
  every label it groups or filters by is on those metrics;
- every query parses and evaluates in a REAL Prometheus that scraped that run, and the main panels return data.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

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
METRIC = re.compile(r"\bditscale_[a-z0-9_]+\b")
FUNCS_AND_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
EXPECTED_PANELS = [
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
    return set(METRIC.findall(expr))


def label_names(expr: str) -> set[str]:
    """Labels used in by(...)/without(...) clauses, {selectors} and label_values(..., label)."""
    names: set[str] = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
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
    return re.sub(r"\$\{?(run|windows|data_size)\}?", ".*", expr)


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
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("run", "windows", "data_size"):
        v = variables[name]
        assert v["type"] == "query" and v["includeAll"] and v["multi"]
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
            # every panel follows the three variables, so the dashboard filters as a whole
            assert all(f'=~"${v}"' in t["expr"] for v in ("run", "windows", "data_size")), t["expr"]


def test_dashboard_promql_shapes():
    d = dashboard()
    by_title = {p["title"].split(" (")[0]: p for p in d["panels"]}
    thr = by_title["Throughput"]["targets"][0]["expr"]
    assert thr.startswith("sum by (run) (rate(ditscale_samples_total{")
    st = [t["expr"] for t in by_title["Step time p50 / p95"]["targets"]]
    assert any(e.startswith("histogram_quantile(0.5,") for e in st)
    assert any(e.startswith("histogram_quantile(0.95,") for e in st)
    assert all("ditscale_step_time_seconds_bucket" in e and "le)" in e for e in st)
    strag = by_title["Step time per rank"]["targets"][0]["expr"]
    assert "by (run, rank)" in strag
    assert "by (run, rank)" in by_title["GPU memory per rank"]["targets"][0]["expr"]
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
    assert label_names('label_values(ditscale_train_loss{run=~"$run"}, windows)') == {"run", "windows"}
    assert to_prometheus(e).endswith('{run=~".*", rank!="0"}[1m]))')


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
    missing = sorted(used - names)
    assert not missing, f"dashboard metrics the trainer does not export: {missing}; exported: {sorted(names)}"
    used_labels = set().union(*(label_names(e) for e in exprs()))
    assert not sorted(used_labels - labels), f"labels not on the trainer's metrics: {used_labels - labels}"


@pytest.mark.slow
@pytest.mark.prometheus
def test_every_dashboard_query_returns_data_from_real_prometheus(monitored_training):
    """Every panel query and variable, evaluated by the real Prometheus at the last moment the run was scraped
    alive, returns series (the run's series go stale once it exits, so 'now' would be too late)."""
    run, prom = monitored_training, monitored_training.prometheus
    assert run.alive_at is not None, f"the run never answered on /metrics:\n{run.output[-4000:]}"
    prom.wait_for(f'last_over_time(ditscale_train_loss{{run="{run.run_name}"}}[10m])')
    at = run.alive_at
    d = dashboard()
    empty = []
    for p in d["panels"]:
        for t in p["targets"]:
            result = prom.query(to_prometheus(t["expr"]), time_s=at)  # raises on a PromQL error
            if not result:
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


if __name__ == "__main__":  # regenerate k8s/50-grafana-dashboard.yaml from the JSON
    CONFIGMAP.write_text(render_configmap(DASHBOARD.read_text()))
    print(f"wrote {CONFIGMAP}")
