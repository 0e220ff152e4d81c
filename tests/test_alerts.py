"""ditscale's Prometheus rules: k8s/rules/ditscale.rules.yaml is the source of truth.

- `promtool check rules` accepts it, and `promtool test rules tests/rules/ditscale.test.yaml` passes: input series
  for every alert, firing and not firing, each with two runs of one config (same run name, two run_ids) that must
  alert apart (promtool comes with Debian's prometheus package); rules that group by the name only fail them;
- k8s/45-prometheus-rules.yaml (a PrometheusRule for the Prometheus Operator) embeds exactly its groups
  (regenerate with `python tests/test_alerts.py`);
- a real Prometheus loads the rules and evaluates every one of them without error while it scrapes a real
  training run (the shared 2-rank run of tests/plugins/prometheus.py); alerts on two concurrent runs of one config
  in a real Prometheus: tests/test_runs_apart.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "k8s" / "rules" / "ditscale.rules.yaml"
RULE_TESTS = ROOT / "tests" / "rules" / "ditscale.test.yaml"
PROMETHEUS_RULE = ROOT / "k8s" / "45-prometheus-rules.yaml"
PROMETHEUS_RULE_HEADER = """\
# ditscale's recording and alerting rules for the Prometheus Operator (kube-prometheus-stack): the groups of
# k8s/rules/ditscale.rules.yaml, embedded verbatim (regenerate this file with `python tests/test_alerts.py` after
# editing that one). kube-prometheus-stack only loads PrometheusRules labelled with its release name
# (`release: kube-prometheus-stack` by default): change the label to your release, or install the chart with
# prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false. Needs the operator's CRDs (docs/kubernetes.md).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: ditscale
  namespace: ditscale
  labels:
    app.kubernetes.io/name: ditscale
    release: kube-prometheus-stack
spec:
"""
ALERTS = {"DitscaleLossNotFinite", "DitscaleStepStalled", "DitscaleTargetDown", "DitscaleDataWaitHigh",
          "DitscaleStraggler"}  # fmt: skip


def render_prometheus_rule(rules_text: str) -> str:
    """The PrometheusRule: the header, then the rules file from `groups:` on, indented under `spec:`."""
    lines = rules_text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = "".join(("  " + line if line.strip() else line) for line in lines[start:])
    return PROMETHEUS_RULE_HEADER + body


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


WAIT_S = 120.0  # tests/plugins/prometheus.py's bound (not imported: this file also runs as a script)


def promtool() -> str:
    from tests.plugins.prometheus import skip_or_fail

    found = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").is_file() else None)
    if found is None:
        skip_or_fail("promtool is not installed (Debian's prometheus package; .ci/setup --services)")
    return found


def test_the_rules_are_the_issue_list():
    names = {r["alert"] for r in rules() if "alert" in r}
    assert names == ALERTS
    for r in rules():
        if "alert" in r:
            assert r["labels"]["severity"] in {"critical", "warning"}, r["alert"]
            assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        else:  # recording rules: level:metric:operations
            assert r["record"].count(":") == 2 and "ditscale_" in r["record"], r["record"]
    by = {r.get("alert"): r for r in rules()}
    assert "> 0.2" in by["DitscaleDataWaitHigh"]["expr"] and "> 1.3" in by["DitscaleStraggler"]["expr"]
    assert "[10m]" in by["DitscaleStepStalled"]["expr"] and by["DitscaleTargetDown"]["for"] == "10m"


def test_every_rule_groups_and_joins_by_run_id():
    """Run-level rules keep run_id in each aggregation (run beside it, for people) and match on run_id: two runs of
    one config never merge into one series or alert. The target-down alert is per scrape target (job, instance)."""
    for r in rules():
        expr = r["expr"]
        for group in re.findall(r"\b(?:sum|avg|max|min|count|quantile) by \(([^)]*)\)", expr):
            names = [x.strip() for x in group.split(",")]
            assert names[:2] == ["run_id", "run"] or names == ["run_id"], (r.get("alert") or r["record"], group)
        for on in re.findall(r"\bon \(([^)]*)\)", expr):
            assert on in ("run_id", "job, instance"), (r.get("alert") or r["record"], on)
        if "alert" in r and r["alert"] != "DitscaleTargetDown":
            assert "$labels.run_id" in r["annotations"]["summary"], r["alert"]


def test_promtool_check_rules():
    r = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=WAIT_S)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules())} rules found" in r.stdout


def test_promtool_unit_tests_pass():
    r = subprocess.run(
        [promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=WAIT_S, cwd=ROOT
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_is_unit_tested_firing_and_not_firing():
    spec = yaml.safe_load(RULE_TESTS.read_text())
    assert [str((RULE_TESTS.parent / f).resolve()) for f in spec["rule_files"]] == [str(RULES)]
    firing, quiet = set(), set()
    for group in spec["tests"]:
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert firing == ALERTS and quiet == ALERTS, (firing, quiet)
    records = {r["record"] for r in rules() if "record" in r}
    tested = {t["expr"].split("{")[0] for g in spec["tests"] for t in g.get("promql_expr_test", [])}
    assert records <= tested, records - tested


def test_promtool_unit_tests_catch_a_broken_rule(tmp_path):
    """The unit tests have teeth: the same tests against rules with a wrong threshold fail."""
    (tmp_path / "k8s" / "rules").mkdir(parents=True)
    (tmp_path / "tests" / "rules").mkdir(parents=True)
    (tmp_path / "k8s" / "rules" / RULES.name).write_text(RULES.read_text().replace("> 1.3", "> 1.6"))
    shutil.copy(RULE_TESTS, tmp_path / "tests" / "rules" / RULE_TESTS.name)
    r = subprocess.run(
        [promtool(), "test", "rules", f"tests/rules/{RULE_TESTS.name}"],
        capture_output=True, text=True, timeout=WAIT_S, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode != 0 and "DitscaleStraggler" in r.stdout + r.stderr


def test_promtool_unit_tests_catch_rules_that_merge_runs_of_one_name(tmp_path):
    """The unit tests' two runs of one config tell rules grouped by run_id from rules grouped by the name alone:
    the same tests fail against the rules with run_id taken out (merged alerts, a stall hidden by its twin)."""
    (tmp_path / "k8s" / "rules").mkdir(parents=True)
    (tmp_path / "tests" / "rules").mkdir(parents=True)
    merged = RULES.read_text().replace("by (run_id, run,", "by (run,").replace("(run_id)", "(run)")
    assert "by (run_id" not in merged and "on (run_id)" not in merged
    (tmp_path / "k8s" / "rules" / RULES.name).write_text(merged)
    shutil.copy(RULE_TESTS, tmp_path / "tests" / "rules" / RULE_TESTS.name)
    r = subprocess.run(
        [promtool(), "test", "rules", f"tests/rules/{RULE_TESTS.name}"],
        capture_output=True, text=True, timeout=WAIT_S, cwd=tmp_path,
    )  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    for alert in ALERTS - {"DitscaleTargetDown"}:
        assert f"alertname: {alert}," in out, (alert, out)


def test_prometheus_rule_embeds_exactly_the_rules_file():
    text = RULES.read_text()
    assert PROMETHEUS_RULE.read_text() == render_prometheus_rule(text), "regenerate: python tests/test_alerts.py"
    (pr,) = [d for d in yaml.safe_load_all(PROMETHEUS_RULE.read_text()) if d]
    assert pr["apiVersion"] == "monitoring.coreos.com/v1" and pr["kind"] == "PrometheusRule"
    assert pr["spec"] == yaml.safe_load(text)
    assert "release" in pr["metadata"]["labels"]  # kube-prometheus-stack's default ruleSelector


@pytest.mark.slow
@pytest.mark.prometheus
def test_real_prometheus_evaluates_every_rule_on_a_real_run(monitored_training):
    """The test Prometheus loaded the rules file; while and after it scraped the run every rule evaluated cleanly
    and the recorded series of the run exist."""
    prom, run = monitored_training.prometheus, monitored_training
    assert run.alive_at is not None, run.output[-4000:]
    groups = prom.api("rules")["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"]}
    assert loaded == {r.get("alert") or r["record"] for r in rules()}
    for g in groups:
        for r in g["rules"]:
            assert r["health"] in ("ok", "unknown") and not r.get("lastError"), r
    for rec in ("run_rank:ditscale_step_time_seconds:mean5m", "run:ditscale_step_time_seconds:straggler_ratio5m"):
        found = prom.wait_for(f'{rec}{{run="{run.run_name}"}}', time_s=run.alive_at)
        assert all(float(s["value"][1]) > 0 for s in found), found
    ranks = prom.query(f'run_rank:ditscale_data_wait:ratio5m{{run="{run.run_name}"}}', time_s=run.alive_at)
    assert {s["metric"]["rank"] for s in ranks} == {"0", "1"}
    assert all(0 <= float(s["value"][1]) <= 1 for s in ranks), ranks
    # a healthy run: its loss is finite, so the NaN alert never fired
    fired = prom.query(f'ALERTS{{alertname="DitscaleLossNotFinite",run="{run.run_name}"}}', time_s=run.alive_at)
    assert not fired, fired


if __name__ == "__main__":  # regenerate k8s/45-prometheus-rules.yaml from the rules file
    PROMETHEUS_RULE.write_text(render_prometheus_rule(RULES.read_text()))
    print(f"wrote {PROMETHEUS_RULE}")
