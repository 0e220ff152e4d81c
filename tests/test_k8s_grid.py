"""Kubernetes grids (launchers/k8s_grid.py, ditscale.launch.k8s), validated offline: no control plane runs here.

- every rendered manifest validates strictly against the Kubernetes 1.30 .. 1.37 schemas (kubernetes-validate);
- the PodMonitor and the PrometheusRule validate against the Prometheus Operator's own CRD schemas, as shipped
  (generated from the operator's CRDs) by cloudcoil-models-prometheus-operator, strictly (no unknown field);
- each run is wired like the one-run example in k8s/ (rendezvous through its headless Service, node count, its
  ConfigMap holds a valid run config), data steps are Jobs applied first and a run whose data is being prepared
  waits for it; finished runs and runs claimed by another launcher are not rendered; kustomize/ lists the files;
- k8s/ itself stays the one-run example (tests/test_k8s.py).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import ValidationError

from ditscale.config import config_from_dict
from ditscale.launch import claim as C
from ditscale.launch.k8s import dns_name
from tests.needs import import_or_fail

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launchers" / "k8s_grid.py"
VERSIONS = [f"1.{m}" for m in range(30, 38)]
CRD_KINDS = {"PodMonitor", "PrometheusRule"}

GRID = """
name: kube
config:
  model: {variant: DiT-T/2, input_size: 8, in_channels: 1, num_classes: 10, windows: "3x2@head"}
  train: {steps: 60, global_batch: 8, micro_batch: 4}
  log: {every: 5, sample_every: 0, metrics_port: 9400, progress: false}
vars: {data_root: DATA}
resources: {nodes: 1, gpus_per_node: 1, cpus_per_task: 4, mem_gb: 16, timeout_min: 60}
axes:
  windows: {key: model.windows, values: [global, "3x2@head"]}
  nodes: {key: resources.nodes, values: [1, 2], prefix: nodes}
data:
  source: digits
  root: "{data_root}/digits8"
  resolution: 8
  channels: 1
  sizes: [40]
"""


def launcher(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LAUNCHER), *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, Path, dict[str, list[dict]], str]:
    tmp = tmp_path_factory.mktemp("k8s-grid")
    grid = tmp / "kube.yaml"
    grid.write_text(GRID.replace("DATA", str(tmp / "data")))
    runs = tmp / "runs"
    # one run finished, one claimed by a live launcher (this process): neither is rendered
    done = runs / "kube-global-nodes1"
    done.mkdir(parents=True)
    (done / "final.json").write_text('{"finished": true, "step": 60, "loss": 0.5}')
    ok, _ = C.try_claim(str(runs / "kube-global-nodes2"), {"backend": "local", "log_dir": ""}, lambda c: True)
    assert ok
    r = launcher("--grid", grid, "--run-root", runs, "--out", tmp / "out", "--image", "registry.example/ditscale:1")
    assert r.returncode == 0, r.stderr[-3000:]
    files = {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted((tmp / "out").glob("*.yaml"))}
    return tmp, runs, files, r.stdout


def _docs(files) -> list[tuple[str, dict]]:
    return [(name, d) for name, docs in files.items() for d in docs]


def test_renders_the_unfinished_unclaimed_runs_data_first(rendered):
    tmp, runs, files, out = rendered
    assert list(files) == sorted(files)  # the order kubectl apply -f DIR/ applies them: namespace, data, runs
    assert list(files)[:3] == ["00-namespace.yaml", "10-data-build.yaml", "10-data-n40-s0.yaml"]
    assert list(files)[-2:] == ["30-podmonitor.yaml", "31-prometheus-rules.yaml"]
    runs_rendered = [n for n in files if n.startswith("20-run-")]
    assert len(runs_rendered) == 2 and all("3x2-head" in n for n in runs_rendered), list(files)
    assert "skip kube-global-nodes2: claimed by local" in out
    kust = yaml.safe_load((tmp / "out" / "kustomize" / "kustomization.yaml").read_text())
    assert kust["resources"] == [f"../{n}" for n in files]
    assert not (tmp / "data").exists()  # rendering prepares nothing


@pytest.mark.parametrize("version", VERSIONS)
def test_every_core_manifest_validates_strict(rendered, version):
    checked = 0
    for name, doc in _docs(rendered[2]):
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} ({version}): {e.path}: {e.message}")
        checked += 1
    assert checked == 1 + 2 + 3 * 2  # namespace, 2 data jobs, (ConfigMap, Service, Job) x 2 runs


@functools.cache
def _crd_schema(kind: str) -> dict:
    """The operator's CRD schema of a kind (generated models of cloudcoil-models-prometheus-operator), made strict:
    an object with listed properties accepts no other field (as the API server's field validation does)."""
    v1 = import_or_fail("cloudcoil.models.prometheus_operator.v1", "test")
    schema = getattr(v1, kind).model_json_schema(by_alias=True)

    def strict(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for v in node.values():
                strict(v)
        elif isinstance(node, list):
            for v in node:
                strict(v)

    strict(schema)
    return schema


def _crd_errors(doc: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(_crd_schema(doc["kind"]))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_monitoring_validates_against_the_operator_crd_schemas(rendered):
    docs = [d for _, d in _docs(rendered[2]) if d["kind"] in CRD_KINDS]
    assert sorted(d["kind"] for d in docs) == ["PodMonitor", "PrometheusRule"]
    for d in docs:
        assert _crd_errors(d) == [], d["kind"]
    # the same check on k8s/ (the one-run example), and a typo is caught
    for f in ("40-podmonitor.yaml", "45-prometheus-rules.yaml"):
        (doc,) = [d for d in yaml.safe_load_all((ROOT / "k8s" / f).read_text()) if d]
        assert _crd_errors(doc) == [], f
    (pm,) = [d for d in docs if d["kind"] == "PodMonitor"]
    bad = yaml.safe_load(yaml.safe_dump(pm))
    bad["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    assert any("intervall" in e for e in _crd_errors(bad))
    bad["spec"]["podMetricsEndpoints"][0] = {"port": 9400}  # a port name, not a number
    assert _crd_errors(bad)


def test_each_run_is_wired_like_the_one_run_example(rendered):
    tmp, runs, files, _ = rendered
    for name in [n for n in files if n.startswith("20-run-")]:
        cm, svc, job = files[name]
        jname = job["metadata"]["name"]
        nodes = 2 if "nodes2" in name else 1
        assert len(jname) <= 50 and jname == dns_name(f"kube-3x2@head-nodes{nodes}")
        spec, pod = job["spec"], job["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nodes
        assert pod["subdomain"] == svc["metadata"]["name"] == jname and svc["spec"]["selector"] == {"job-name": jname}
        assert env["MASTER_ADDR"] == f"{jname}-0.{jname}" and env["NNODES"] == str(nodes)
        assert c["image"] == "registry.example/ditscale:1"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["resources"]["requests"]["memory"] == "16Gi"
        cfg = config_from_dict(yaml.safe_load(cm["data"]["config.yaml"]), origin=name)
        assert cfg.run.dir == str(runs / f"kube-3x2@head-nodes{nodes}") and cfg.run.name.startswith("kube-3x2@head")
        (vol,) = [v for v in pod["volumes"] if "configMap" in v]
        assert vol["configMap"]["name"] == cm["metadata"]["name"]
        # its data is being prepared: the pod waits for the subset's manifest
        (wait,) = pod["initContainers"]
        assert wait["command"][-1] == cfg.data.train and "storage.exists" in wait["command"][2]
    (build,), (subset,) = files["10-data-build.yaml"], files["10-data-n40-s0.yaml"]
    argv = build["spec"]["template"]["spec"]["containers"][0]
    assert argv["command"] + argv["args"][:3] == ["python", "-m", "ditscale", "data"]
    assert subset["spec"]["template"]["spec"]["initContainers"][0]["command"][-1].endswith("full/manifest.json")


def test_dry_run_and_status_without_a_cluster(rendered, tmp_path):
    tmp, runs, _, _ = rendered
    grid = tmp / "kube.yaml"
    r = launcher("--grid", grid, "--run-root", runs, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "1 finished, 1 queued or running elsewhere, 2 to render (k8s)" in r.stdout
    assert "missing -> a Job of its own, applied first" in r.stdout and "dry run: nothing started" in r.stdout
    st = launcher("--grid", grid, "--run-root", runs, "--status")
    assert st.returncode == 0 and "4 runs: 1 done, 3 pending" in st.stdout, st.stdout
    r = launcher("--grid", grid, "--run-root", runs)
    assert r.returncode == 2 and "--out DIR is required" in r.stderr
