"""Kubernetes manifests (k8s/), the image definition and the kustomize overlay.

- every file at the top of k8s/ is a Kubernetes resource (`kubectl apply -f k8s/` applies them all);
- every core resource validates against the Kubernetes 1.30 .. 1.37 schemas in strict mode (kubernetes-validate).
  The CRDs are not in those schemas: the PodMonitors (monitoring.coreos.com/v1) are checked structurally against
  the pods they scrape (the Job's, the KubeRay workers'); the PrometheusRule in tests/test_alerts.py; RayJob
  (ray.io/v1) structurally, and its head/worker pod templates strictly as core PodTemplates;
- the Indexed Job is wired as documented (node rank, master through the headless Service, GPUs, /dev/shm,
  secrets by reference, restart and rendezvous bounds, non-root read-only pods);
- `kubectl kustomize` renders the overlay offline and the result validates too;
- README's Kubernetes section can be followed as written: one image setting reaches every manifest, the shard
  paths it builds are the ConfigMap's, the monitoring prerequisites are stated;
- the Job's command, with its env substituted, runs the 2-rank training locally (slow; shared run with the
  Prometheus tests, see tests/plugins/prometheus.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

from ditscale.config import config_from_dict
from tests.plugins.prometheus import expand_k8s_vars, job_command, skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
VERSIONS = [f"1.{m}" for m in range(30, 38)]
CRDS = {
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("ray.io/v1", "RayJob"),
}
DEFAULT_IMAGE = "ghcr.io/ditscale/ditscale:0.1.0"


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def top_level() -> dict[str, list[dict]]:
    return {p.name: load(p) for p in sorted(K8S.iterdir()) if p.is_file()}


def all_docs() -> list[tuple[str, dict]]:
    files = [p for p in sorted(K8S.iterdir()) if p.is_file()] + sorted((K8S / "ray").glob("*.yaml"))
    return [(str(p.relative_to(ROOT)), d) for p in files for d in load(p)]


def by_kind(kind: str, name: str | None = None) -> dict:
    (doc,) = [
        d
        for _, d in all_docs()
        if d["kind"] == kind
        and not d["metadata"]["name"].endswith("dashboard")
        and (name is None or d["metadata"]["name"] == name)
    ]
    return doc


def job() -> dict:
    return by_kind("Job")


def container() -> dict:
    (c,) = job()["spec"]["template"]["spec"]["containers"]
    return c


def env_values(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def validate_core(doc: dict, version: str, where: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except ValidationError as e:
        pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: {e.path}: {e.message}")


# ------------------------------------------------------------------------------------------- schema checks


def test_top_of_k8s_holds_only_kubernetes_resources():
    files = top_level()
    assert files, "k8s/ is empty"
    for name, docs in files.items():
        assert name.endswith((".yaml", ".yml", ".json")), f"k8s/{name}: kubectl apply -f k8s/ reads only yaml/json"
        assert "kustomization" not in name.lower(), f"k8s/{name}: overlays belong in k8s/overlays/"
        assert docs, f"k8s/{name} holds no resource"
        for d in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(d), f"k8s/{name}: not a Kubernetes resource"
    kinds = sorted(d["kind"] for docs in files.values() for d in docs)
    assert kinds == sorted(["Namespace", "ConfigMap", "ConfigMap", "Service", "Job", "PodMonitor", "PrometheusRule"])
    assert "Secret" not in kinds  # credentials are created by the user (docs/kubernetes.md), never committed
    # the namespace sorts first, so that `kubectl apply -f k8s/` creates it before what lives in it
    first = next(iter(files.values()))
    assert first[0]["kind"] == "Namespace"
    ns = first[0]["metadata"]["name"]
    for _, d in all_docs():
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == ns, d["metadata"]["name"]


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_strict(version):
    checked, crds = 0, []
    for where, doc in all_docs():
        key = (doc["apiVersion"], doc["kind"])
        if key in CRDS:
            with pytest.raises(SchemaNotFoundError):  # not in the core schemas: checked structurally below
                kubernetes_validate.validate(doc, version, strict=True)
            crds.append(doc["kind"])
            continue
        validate_core(doc, version, where)
        checked += 1
    assert checked == 5 and sorted(crds) == ["PodMonitor", "PodMonitor", "PrometheusRule", "RayJob"]


@pytest.mark.parametrize("version", VERSIONS)
def test_rayjob_pod_templates_validate_strict(version):
    spec = by_kind("RayJob")["spec"]["rayClusterSpec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for i, t in enumerate(templates):
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"rayjob-{i}"}, "template": t}
        validate_core(doc, version, "k8s/ray/rayjob.yaml")


def test_validator_rejects_a_broken_job():
    bad = json.loads(json.dumps(job()))
    bad["spec"]["backoffLimit"] = "eight"
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(bad, "1.30", strict=True)
    bad = json.loads(json.dumps(job()))
    bad["spec"]["template"]["spec"]["containers"][0]["gpus"] = 8  # strict: unknown field
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(bad, "1.37", strict=True)


# ------------------------------------------------------------------------------------------ the Indexed Job


def test_indexed_job_rendezvous_through_the_headless_service():
    j, svc, c = job(), by_kind("Service"), container()
    spec, pod = j["spec"], j["spec"]["template"]["spec"]
    env = env_values(c)
    nodes = int(env["NNODES"])
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == nodes >= 2
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"job-name": j["metadata"]["name"]}
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert env["MASTER_ADDR"] == f"{j['metadata']['name']}-0.{svc['metadata']['name']}"
    assert int(env["MASTER_PORT"]) in [p["port"] for p in svc["spec"]["ports"]]
    assert int(env["MASTER_PORT"]) in [p["containerPort"] for p in c["ports"]]
    (idx,) = [e for e in c["env"] if e["name"] == "JOB_COMPLETION_INDEX"]
    assert (
        idx["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    argv = c["command"] + c["args"]
    assert argv[0] == "torchrun"
    for flag, var in [
        ("--nnodes", "NNODES"),
        ("--nproc_per_node", "GPUS_PER_NODE"),
        ("--node_rank", "JOB_COMPLETION_INDEX"),
        ("--master_addr", "MASTER_ADDR"),
        ("--master_port", "MASTER_PORT"),
    ]:
        assert f"{flag}=$({var})" in argv, flag
    assert argv[argv.index("-m") :] == ["-m", "ditscale", "train", "--config", "$(DITSCALE_CONFIG)"]
    # bounded rendezvous: an Indexed Job is not gang-scheduled
    assert "--rdzv_conf=timeout=$(RDZV_TIMEOUT_SECONDS)" in argv
    assert 60 <= int(env["RDZV_TIMEOUT_SECONDS"]) <= 3600
    # every $(VAR) in the command is defined in the container env (else Kubernetes leaves it verbatim)
    names = {e["name"] for e in c["env"]}
    assert set(re.findall(r"\$\(([A-Za-z_]\w*)\)", " ".join(argv))) <= names


def test_job_restarts_failed_pods_to_resume():
    spec = job()["spec"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy; the Job controller replaces the pod
    assert spec["backoffLimit"] >= 2 * int(env_values(container())["NNODES"])
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert pod["terminationGracePeriodSeconds"] >= 60  # SIGTERM -> checkpoint at the end of the step
    assert "activeDeadlineSeconds" not in spec  # a multi-day training is not killed by a deadline
    assert "--max_restarts=0" in container()["args"]


def test_job_resources_volumes_and_security():
    j, c = job(), container()
    pod = j["spec"]["template"]["spec"]
    gpus = int(env_values(c)["GPUS_PER_NODE"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == gpus
    metrics_ports = [p for p in c["ports"] if p["name"].startswith("metrics-")]
    assert len(metrics_ports) == gpus
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in vols[mounts["/tmp"]]  # writable scratch under a read-only root
    for key in ("HOME", "XDG_CACHE_HOME", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "MPLCONFIGDIR"):
        assert env_values(c)[key].startswith("/tmp"), key
    psc, csc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"]["drop"] == ["ALL"] and not csc.get("privileged")


def test_secrets_by_reference_only():
    for where, doc in all_docs():
        text = json.dumps(doc)
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), where
        for c in _containers(doc):
            for e in c.get("env", []):
                if e["name"].startswith("AWS_"):
                    assert "value" not in e and e["valueFrom"]["secretKeyRef"]["name"] == "ditscale-s3", (where, e)
    names = {e["name"] for e in container()["env"]}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= names


def _containers(doc: dict) -> list[dict]:
    found = []

    def walk(x):
        if isinstance(x, dict):
            if "containers" in x and isinstance(x["containers"], list):
                found.extend(x["containers"])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc)
    return found


def test_configmap_holds_a_valid_run_config_on_object_storage():
    (cm,) = [d for _, d in all_docs() if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {})]
    cfg = config_from_dict(yaml.safe_load(cm["data"]["config.yaml"]), origin="k8s/10-config.yaml")
    assert cfg.run.dir.startswith("s3://") and cfg.data.train.startswith("s3://")
    # the model and its window spec build (the trainer would stop at start-up otherwise)
    from ditscale.model import create_model

    m = cfg.model
    model = create_model(
        m.variant, input_size=m.input_size, in_channels=m.in_channels, num_classes=m.num_classes, windows=m.windows
    )
    assert any(w is not None for w in model.windows), "the k8s run config should train with local windows"
    c, pod = container(), job()["spec"]["template"]["spec"]
    env = env_values(c)
    config_path = Path(env["DITSCALE_CONFIG"])
    (vol,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"]]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
    assert Path(mount["mountPath"]) / "config.yaml" == config_path and mount["readOnly"]
    world = int(env["NNODES"]) * int(env["GPUS_PER_NODE"])
    assert cfg.train.global_batch % (cfg.train.micro_batch * world) == 0
    ports = sorted(p["containerPort"] for p in c["ports"] if p["name"].startswith("metrics-"))
    assert ports == list(range(cfg.log.metrics_port, cfg.log.metrics_port + len(ports)))


def test_podmonitor_scrapes_every_rank_of_the_job():
    pm, c = by_kind("PodMonitor", "ditscale-train"), container()
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    labels = job()["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    named = {p["name"] for p in c["ports"]}
    endpoints = pm["spec"]["podMetricsEndpoints"]
    assert {e["port"] for e in endpoints} == {p for p in named if p.startswith("metrics-")}
    for e in endpoints:
        assert set(e) <= {"port", "path", "interval", "scrapeTimeout", "honorLabels", "relabelings"}
        assert e["path"] == "/metrics" and re.fullmatch(r"\d+[smh]", e["interval"])
    assert "release" in pm["metadata"]["labels"]  # kube-prometheus-stack's default podMonitorSelector


def _selects(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        value, op = labels.get(e["key"]), e["operator"]
        if (op == "In" and value not in e["values"]) or (op == "NotIn" and value in e["values"]):
            return False
        if (op == "Exists" and value is None) or (op == "DoesNotExist" and value is not None):
            return False
    return True


def _pod_templates() -> dict[str, dict]:
    """component label -> pod template of every pod ditscale creates (the Job's, the Ray head's, the workers')."""
    spec = by_kind("RayJob")["spec"]["rayClusterSpec"]
    templates = [job()["spec"]["template"], spec["headGroupSpec"]["template"]]
    templates += [g["template"] for g in spec["workerGroupSpecs"]]
    return {t["metadata"]["labels"]["app.kubernetes.io/component"]: t for t in templates}


def test_every_training_pod_is_scraped_by_exactly_one_podmonitor():
    monitors = [d for _, d in all_docs() if d["kind"] == "PodMonitor"]
    scraped = {"trainer": 0, "ray-worker": 0, "ray-head": 0}
    for pm in monitors:
        for component, t in _pod_templates().items():
            if _selects(pm["spec"]["selector"], t["metadata"]["labels"]):
                scraped[component] += 1
                names = {p["name"] for c in t["spec"]["containers"] for p in c.get("ports", [])}
                assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= names, (pm["metadata"]["name"], names)
    assert scraped == {"trainer": 1, "ray-worker": 1, "ray-head": 0}  # the head trains nothing (num-gpus 0)


def test_ray_grid_workers_expose_every_rank_of_a_run():
    """Every grid run's ranks (workers-per-run of them on one 8-GPU worker pod) listen on log.metrics_port + local
    rank: the worker pods declare exactly those ports and the grid PodMonitor scrapes them."""
    from ditscale.grid import expand

    rj, pm = by_kind("RayJob"), by_kind("PodMonitor", "ditscale-grid")
    argv = rj["spec"]["entrypoint"].split()
    workers = int(argv[argv.index("--workers-per-run") + 1])
    runs = expand(ROOT / argv[argv.index("--grid") + 1], vars={"data_root": "s3://ditscale/shards"}, validate=False)
    (base,) = {r.config.log.metrics_port for r in runs}
    assert base > 0, "grid runs must export metrics"
    for g in rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        (c,) = g["template"]["spec"]["containers"]
        gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus == workers  # one run per worker pod: its local ranks are 0 .. workers-1
        ports = {p["name"]: p["containerPort"] for p in c["ports"] if p["name"].startswith("metrics-")}
        assert ports == {f"metrics-{i}": base + i for i in range(gpus)}
        assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} == set(ports)
    for e in pm["spec"]["podMetricsEndpoints"]:
        assert e["path"] == "/metrics" and re.fullmatch(r"\d+[smh]", e["interval"])
    assert "release" in pm["metadata"]["labels"]


# ------------------------------------------------------------------------------ README's Kubernetes section


def readme_kubernetes() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Kubernetes")
    return text[start : text.index("\n## ", start + 5)]


def test_readme_sets_the_image_in_one_place_for_every_manifest(tmp_path):
    """The section's IMAGE=... line, its docker build/push and its one command that points the manifests at
    $IMAGE: run on a copy of k8s/, every container of every manifest (top, ray/, overlays) pulls $IMAGE."""
    section = readme_kubernetes()
    assert re.search(r"^IMAGE=\S+", section, re.M), "README: set IMAGE once"
    assert 'docker build -f k8s/image/Dockerfile -t "$IMAGE" .' in section and 'docker push "$IMAGE"' in section
    (line,) = [ln for ln in section.splitlines() if DEFAULT_IMAGE in ln and "$IMAGE" in ln]
    images = {c["image"] for _, d in all_docs() for c in _containers(d)}
    assert images == {DEFAULT_IMAGE}
    shutil.copytree(K8S, tmp_path / "k8s")
    mine = "registry.example.com/team/ditscale:0.1.0-test"
    r = subprocess.run(["bash", "-c", line], cwd=tmp_path, env={"IMAGE": mine, "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    found = {
        c.get("image")  # overlay patches name a container without an image: they keep the base's
        for f in (tmp_path / "k8s").rglob("*.yaml")
        for d in load(f)
        if isinstance(d, dict)
        for c in _containers(d)
    }
    assert found - {None} == {mine}
    assert DEFAULT_IMAGE not in "".join(f.read_text() for f in (tmp_path / "k8s").rglob("*.yaml"))


def test_readme_shard_paths_are_the_configmaps():
    """`data build --out URL` writes the train split's manifest at URL/manifest.json and the test split's at
    URL/test/manifest.json: exactly the ConfigMap's data.train and data.test. The grid's subsets go where the
    RayJob's data_root points the grid."""
    from ditscale.data.convert import split_url
    from ditscale.grid import expand

    section = readme_kubernetes()
    (out,) = re.findall(r"ditscale data build celeba .*--out (\S+)", section)
    (cm,) = [d for _, d in all_docs() if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {})]
    data = yaml.safe_load(cm["data"]["config.yaml"])["data"]
    assert data["train"] == split_url(out, "train", "train") + "/manifest.json"
    assert data["test"] == split_url(out, "test", "train") + "/manifest.json"
    (subset,) = re.findall(r"ditscale data subset --manifest (\S+)[^;]*?--out (\S+)", section)
    assert subset[0] == data["train"]
    argv = by_kind("RayJob")["spec"]["entrypoint"].split()
    data_root = next(a.split("=", 1)[1] for a in argv if a.startswith("data_root="))
    runs = expand(ROOT / argv[argv.index("--grid") + 1], vars={"data_root": data_root}, validate=False)
    for r in runs:
        n, s = r.values["n"], r.config.run.seed
        subset_dir = subset[1].replace("$n", str(n)).replace("$s", str(s))
        assert r.config.data.train == f"{subset_dir}/manifest.json", r.id
        assert r.config.data.test == f"{subset_dir}/test/manifest.json", r.id


def test_readme_states_the_monitoring_prerequisites():
    section = readme_kubernetes()
    for crd in ("podmonitors.monitoring.coreos.com", "prometheusrules.monitoring.coreos.com"):
        assert crd in section, crd
    assert "release: kube-prometheus-stack" in section
    assert "podMonitorSelectorNilUsesHelmValues=false" in section and "ruleSelectorNilUsesHelmValues=false" in section
    assert "grafana.sidecar.dashboards.searchNamespace=ALL" in section
    for path in re.findall(r"kubectl apply -f ([^\s`]+)", section):
        assert (ROOT / path).exists(), f"README applies {path}, which does not exist"
    labelled = [d for _, d in all_docs() if d["kind"] in ("PodMonitor", "PrometheusRule")]
    assert all(d["metadata"]["labels"]["release"] == "kube-prometheus-stack" for d in labelled)


# ------------------------------------------------------------------------------------- RayJob and the image


def test_rayjob_runs_the_ray_grid_launcher():
    rj = by_kind("RayJob")
    spec = rj["spec"]
    assert set(spec) <= {
        "entrypoint", "submissionMode", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "backoffLimit",
        "rayClusterSpec", "runtimeEnvYAML", "activeDeadlineSeconds", "suspend", "clusterSelector",
    }  # fmt: skip
    argv = spec["entrypoint"].split()
    assert argv[:2] == ["python", "launchers/ray_grid.py"]
    launcher = ROOT / argv[1]
    assert launcher.is_file(), "launchers/ray_grid.py (launcher engineer) is missing"
    grid = argv[argv.index("--grid") + 1]
    assert (ROOT / grid).is_file(), f"the RayJob's grid {grid} does not exist"
    helptext = subprocess.run(
        [sys.executable, str(launcher), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    ).stdout
    for flag in [a for a in argv if a.startswith("--")]:
        assert flag in helptext, f"ray_grid.py has no {flag} option"
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= {"rayVersion", "headGroupSpec", "workerGroupSpecs", "enableInTreeAutoscaling"}
    dockerfile = (K8S / "image" / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={cluster['rayVersion']}" in dockerfile
    assert set(cluster["headGroupSpec"]) <= {"rayStartParams", "template", "serviceType"}
    for g in cluster["workerGroupSpecs"]:
        assert set(g) <= {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"}
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        gpus = g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert str(gpus) == argv[argv.index("--workers-per-run") + 1]


def test_image_is_built_on_the_tested_torch():
    """The image's PyTorch is the release the tests run on (major.minor), a CUDA build, the devel flavour (nvcc for
    DeepSpeed ops built on first use)."""
    import torch

    dockerfile = (K8S / "image" / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:(\d+)\.(\d+)\.\d+-cuda[\d.]+-cudnn\d+-devel$", dockerfile, re.M)
    assert base, "ARG BASE_IMAGE=pytorch/pytorch:X.Y.Z-cudaA.B-cudnnN-devel"
    assert base.groups() == tuple(torch.__version__.split(".")[:2])


def test_image_definition_and_references():
    dockerfile = (K8S / "image" / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile, re.M).group(1)
    assert base.startswith("pytorch/pytorch:") and "cuda" in base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.M)
    user = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert user and user[-1].split(":")[0] == "1000"
    for src in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which does not exist"
    assert re.search(r"pip install[^\n]*\.", dockerfile)
    images = {c["image"] for _, d in all_docs() for c in _containers(d)}
    assert len(images) == 1, images  # one image, built from k8s/image/Dockerfile
    uids = {
        d_spec["securityContext"]["runAsUser"]
        for _, d in all_docs()
        for d_spec in _pod_specs(d)
    }  # fmt: skip
    assert uids == {1000}


def _pod_specs(doc: dict) -> list[dict]:
    found = []

    def walk(x):
        if isinstance(x, dict):
            if "containers" in x and "securityContext" in x:
                found.append(x)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc)
    return found


# ------------------------------------------------------------------------------------------ kustomize overlay


def _kustomize_binary() -> list[str] | None:
    kubectl = shutil.which("kubectl")
    if kubectl:
        r = subprocess.run([kubectl, "kustomize", "--help"], capture_output=True, text=True)
        if r.returncode == 0 and "load-restrictor" in r.stdout:
            return [kubectl, "kustomize"]
    kustomize = shutil.which("kustomize")
    return [kustomize, "build"] if kustomize else None


@pytest.mark.parametrize("overlay", sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir()))
def test_overlay_renders_offline_and_validates(overlay):
    tool = _kustomize_binary()
    if tool is None:
        skip_or_fail("no kubectl with kustomize (>= 1.14) or kustomize binary on PATH")
    r = subprocess.run(
        tool + ["--load-restrictor=LoadRestrictionsNone", str(K8S / "overlays" / overlay)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    base_kinds = sorted(d["kind"] for docs in top_level().values() for d in docs)
    assert sorted(d["kind"] for d in docs) == base_kinds
    for version in VERSIONS:
        for d in docs:
            if (d["apiVersion"], d["kind"]) not in CRDS:
                validate_core(d, version, f"overlay {overlay}")
    (j,) = [d for d in docs if d["kind"] == "Job"]
    (c,) = j["spec"]["template"]["spec"]["containers"]
    env = env_values(c)
    assert j["spec"]["completions"] == j["spec"]["parallelism"] == int(env["NNODES"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == int(env["GPUS_PER_NODE"])
    (pm,) = [d for d in docs if d["kind"] == "PodMonitor"]
    assert len(pm["spec"]["podMetricsEndpoints"]) == int(env["GPUS_PER_NODE"])  # one scrape per local rank
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d["data"]]
    train = yaml.safe_load(cm["data"]["config.yaml"])["train"]
    assert train["global_batch"] % (train["micro_batch"] * int(env["NNODES"]) * int(env["GPUS_PER_NODE"])) == 0
    assert env["MASTER_ADDR"] == f"{j['metadata']['name']}-0.{j['spec']['template']['spec']['subdomain']}"


# ------------------------------------------------------------------------------ the command, run for real


def test_job_command_substitution():
    argv = job_command({"NNODES": "1", "GPUS_PER_NODE": "2", "JOB_COMPLETION_INDEX": "0", "MASTER_ADDR": "127.0.0.1"})
    assert argv[:6] == [
        "torchrun", "--nnodes=1", "--nproc_per_node=2", "--node_rank=0", "--master_addr=127.0.0.1",
        "--master_port=29500",
    ]  # fmt: skip
    assert argv[-5:] == ["-m", "ditscale", "train", "--config", "/etc/ditscale/config.yaml"]
    assert expand_k8s_vars("$(A)-$$(A)-$(B)", {"A": "x"}) == "x-$(A)-$(B)"


@pytest.mark.slow
@pytest.mark.prometheus
def test_job_command_runs_the_training_locally(monitored_training):
    """The manifest's own command (1 node x 2 processes, master 127.0.0.1) trains the tiny config to the end."""
    run = monitored_training
    assert run.argv[0] == "torchrun" and "--nproc_per_node=2" in run.argv and "--node_rank=0" in run.argv
    assert run.argv[-5:] == ["-m", "ditscale", "train", "--config", str(run.config_path)]
    assert run.returncode == 0, run.output[-6000:]
    final = json.loads((run.run_dir / "final.json").read_text())
    assert final["finished"] is True and final["step"] == yaml.safe_load(run.config_path.read_text())["train"]["steps"]
    assert (run.run_dir / "checkpoints" / "latest").is_file()
