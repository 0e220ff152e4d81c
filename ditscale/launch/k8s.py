"""Kubernetes grids: one Indexed Job + headless Service + ConfigMap per run, rendered into a folder for
`kubectl apply -f DIR/` (K8sBackend, ditscale.launch.backend).

The manifests of each run are those of the one-run example in k8s/ (k8s/10-config.yaml, 20-service.yaml,
30-job.yaml: the same torchrun command, rendezvous through the headless Service, restarts, security, secrets by
reference), with the run's name, config, node count, GPUs and CPUs put in. The grid gets one PodMonitor (its
trainers' pods, by the label ditscale.io/grid) and ditscale's PrometheusRule (k8s/45-prometheus-rules.yaml).
The grid's missing data steps become Jobs of their own, first in file order; a training pod whose data is being
prepared waits for it in an init container (as a subset job waits for the shard build). Finished runs and runs
that another launcher claimed or a live trainer holds are not rendered; a rendered run resumes from its run dir
like every other. Rendering submits nothing, so it claims no run: the trainer's lease keeps one writer per run
dir. `kustomize/kustomization.yaml` lists the same files for `kubectl kustomize`.

Files (applied in name order): 00-namespace.yaml, 10-data-<step>.yaml, 20-run-<name>.yaml, 30-podmonitor.yaml,
31-prometheus-rules.yaml. `--status` reads the run dirs and, where `kubectl` reaches a cluster, its Jobs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ditscale.errors import LaunchError
from ditscale.grid import RunSpec
from ditscale.launch import claim as C
from ditscale.launch.backend import Backend, Capabilities
from ditscale.launch.common import Plan, checkout_root, results_dir
from ditscale.launch.prepare import check_ready
from ditscale.launch.rows import View

GRID_LABEL, RUN_LABEL = "ditscale.io/grid", "ditscale.io/run"
NAME_MAX = 50  # pod hostnames are <job>-<index> (at most 63 characters)
WAIT_FOR = (
    "import sys, time\n"
    "from ditscale.io import storage\n"
    "print('waiting for', sys.argv[1], flush=True)\n"
    "while not storage.exists(sys.argv[1]):\n"
    "    time.sleep(15)\n"
)


@dataclass
class K8sOptions:
    out: Path | None
    log_dir: Path
    namespace: str = "ditscale"
    image: str | None = None  # default: the image of k8s/30-job.yaml
    secret: str = "ditscale-s3"


def dns_name(text: str, limit: int = NAME_MAX) -> str:
    """A DNS-1123 label from a run id ('digits-t2-3x2@head-nodes1' -> 'digits-t2-3x2-head-nodes1'); a hash keeps
    long or altered names apart."""
    name = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-") or "run"
    if name != text or len(name) > limit:
        digest = hashlib.sha1(text.encode()).hexdigest()[:6]
        name = f"{name[: limit - 7].rstrip('-')}-{digest}" if len(name) > limit or name != text.lower() else name
    return name


def label_value(text: str) -> str:
    """A label value (at most 63 of [A-Za-z0-9_.-], alphanumeric at both ends)."""
    v = re.sub(r"[^A-Za-z0-9_.-]", "_", text).strip("_.-")
    if len(v) > 63 or v != text:
        v = f"{v[:54].strip('_.-')}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return v


def _template(name: str) -> list[dict]:
    path = checkout_root() / "k8s" / name
    if not path.is_file():
        raise LaunchError(f"{path} not found: the Kubernetes backend renders from the k8s/ example of the checkout")
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _only(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d.get("kind") == kind]
    return copy.deepcopy(doc)


def _set_env(container: dict, name: str, value: str) -> None:
    for e in container.setdefault("env", []):
        if e["name"] == name:
            e.clear()
            e.update({"name": name, "value": value})
            return
    container["env"].append({"name": name, "value": value})


def _wait_container(image: str, url: str, like: dict) -> dict:
    """An init container that waits until a manifest exists (data prepared by another Job)."""
    env = [e for e in like.get("env", []) if e["name"].startswith("AWS_") or e["name"] in ("HOME", "PYTHONUNBUFFERED")]
    return {
        "name": "wait-for-data",
        "image": image,
        "command": ["python", "-c", WAIT_FOR, url],
        "env": env,
        "securityContext": copy.deepcopy(like.get("securityContext", {})),
        "volumeMounts": [m for m in like.get("volumeMounts", []) if m["mountPath"] == "/tmp"],
    }


class Renderer:
    """The manifests of a plan's runs, from the k8s/ example."""

    def __init__(self, plan: Plan, opts: K8sOptions):
        self.plan, self.opts = plan, opts
        self.job_t = _only(_template("30-job.yaml"), "Job")
        self.svc_t = _only(_template("20-service.yaml"), "Service")
        self.cm_t = _only(_template("10-config.yaml"), "ConfigMap")
        self.image = opts.image or self.job_t["spec"]["template"]["spec"]["containers"][0]["image"]
        self.grid_label = label_value(plan.name)
        self.names: dict[str, str] = {}
        for r in plan.runs:
            name = dns_name(r.id)
            if name in self.names.values():
                name = dns_name(r.id + "#")  # a collision after sanitising: the hash tells them apart
            self.names[r.id] = name

    def _meta(self, doc: dict, name: str, run: RunSpec | None = None) -> None:
        doc["metadata"]["name"] = name
        doc["metadata"]["namespace"] = self.opts.namespace
        labels = doc["metadata"].setdefault("labels", {})
        labels[GRID_LABEL] = self.grid_label
        if run is not None:
            labels[RUN_LABEL] = label_value(run.id)

    def _secrets(self, container: dict) -> None:
        for e in container.get("env", []):
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                ref["name"] = self.opts.secret

    def run_docs(self, run: RunSpec, wait_for: str | None) -> list[dict]:
        name, res = self.names[run.id], run.resources
        nodes, per_node = int(res["nodes"]), run.tasks_per_node
        gpus, cpus = int(res.get("gpus_per_node") or 0), per_node * int(res.get("cpus_per_task") or 1)
        cm = copy.deepcopy(self.cm_t)
        self._meta(cm, f"{name}-config", run)
        cm["data"] = {"config.yaml": yaml.safe_dump(run.config_dict(), sort_keys=False)}
        svc = copy.deepcopy(self.svc_t)
        self._meta(svc, name, run)
        svc["spec"]["selector"] = {"job-name": name}
        job = copy.deepcopy(self.job_t)
        self._meta(job, name, run)
        spec = job["spec"]
        spec["completions"] = spec["parallelism"] = nodes
        spec["backoffLimit"] = max(int(spec.get("backoffLimit") or 0), 4 * nodes)
        pod = spec["template"]["spec"]
        spec["template"]["metadata"].setdefault("labels", {}).update(
            {GRID_LABEL: self.grid_label, RUN_LABEL: label_value(run.id)}
        )
        pod["subdomain"] = name
        (c,) = pod["containers"]
        c["image"] = self.image
        self._secrets(c)
        _set_env(c, "NNODES", str(nodes))
        _set_env(c, "GPUS_PER_NODE", str(per_node))  # torchrun's --nproc_per_node: one process per task
        _set_env(c, "MASTER_ADDR", f"{name}-0.{name}")
        c["ports"] = [p for p in c["ports"] if not p["name"].startswith("metrics-")] + [
            {"name": f"metrics-{i}", "containerPort": 9400 + i} for i in range(max(1, per_node))
        ]
        req, lim = c["resources"]["requests"], c["resources"]["limits"]
        req["cpu"] = str(cpus)
        for d in (req, lim):
            d.pop("nvidia.com/gpu", None)
            d.pop("memory", None)
            if gpus:
                d["nvidia.com/gpu"] = gpus
            if res.get("mem_gb"):
                d["memory"] = f"{int(res['mem_gb'])}Gi"
        if not gpus:
            pod.pop("tolerations", None)
        for v in pod["volumes"]:
            if "configMap" in v:
                v["configMap"]["name"] = f"{name}-config"
        if wait_for:
            pod["initContainers"] = [_wait_container(self.image, wait_for, c)]
        return [cm, svc, job]

    def data_docs(self, step, wait_for: str | None) -> dict:
        """A Job that runs one data step (`python -m ditscale data ...`), once."""
        job = copy.deepcopy(self.job_t)
        name = dns_name(f"data-{self.plan.name}-{step.name}")
        self._meta(job, name)
        job["metadata"]["labels"]["app.kubernetes.io/component"] = "data"
        spec = job["spec"]
        for k in ("completionMode", "completions", "parallelism", "podFailurePolicy"):
            spec.pop(k, None)
        spec["backoffLimit"] = 2
        pod = spec["template"]["spec"]
        spec["template"]["metadata"]["labels"] = {"app.kubernetes.io/name": "ditscale", GRID_LABEL: self.grid_label,
                                                  "app.kubernetes.io/component": "data"}  # fmt: skip
        for k in ("subdomain", "tolerations"):
            pod.pop(k, None)
        pod["restartPolicy"] = "Never"
        (c,) = pod["containers"]
        c["name"], c["image"] = "data", self.image
        self._secrets(c)
        argv = ["python", *step.command[1:]] if step.command[0] == "python" else list(step.command)
        c["command"], c["args"] = argv[:1], argv[1:]
        c["env"] = [e for e in c["env"] if e["name"] not in ("NNODES", "GPUS_PER_NODE", "JOB_COMPLETION_INDEX",
                                                               "MASTER_ADDR", "MASTER_PORT", "RDZV_TIMEOUT_SECONDS",
                                                               "DITSCALE_CONFIG")]  # fmt: skip
        c.pop("ports", None)
        cpus = int(self.plan.data.recipe.resources["cpus"])
        c["resources"] = {"requests": {"cpu": str(cpus)}}
        if self.plan.data.recipe.resources.get("mem_gb"):
            mem = f"{int(self.plan.data.recipe.resources['mem_gb'])}Gi"
            c["resources"] = {"requests": {"cpu": str(cpus), "memory": mem}, "limits": {"memory": mem}}
        c["volumeMounts"] = [m for m in c["volumeMounts"] if m["mountPath"] in ("/tmp", "/dev/shm")]
        pod["volumes"] = [v for v in pod["volumes"] if "configMap" not in v]
        if wait_for:
            pod["initContainers"] = [_wait_container(self.image, wait_for, c)]
        return job

    def monitoring(self) -> tuple[dict, dict]:
        pm = _only(_template("40-podmonitor.yaml"), "PodMonitor")
        self._meta(pm, dns_name(f"ditscale-{self.plan.name}"))
        pm["spec"]["selector"] = {"matchLabels": {GRID_LABEL: self.grid_label,
                                                  "app.kubernetes.io/component": "trainer"}}  # fmt: skip
        rules = _only(_template("45-prometheus-rules.yaml"), "PrometheusRule")
        rules["metadata"]["namespace"] = self.opts.namespace
        return pm, rules

    def files(self, todo: list[RunSpec]) -> dict[str, list[dict]]:
        """File name -> its documents, in the order `kubectl apply -f DIR/` applies them."""
        ns = _only(_template("00-namespace.yaml"), "Namespace")
        ns["metadata"]["name"] = self.opts.namespace
        out: dict[str, list[dict]] = {"00-namespace.yaml": [ns]}
        preparing: dict[str, str] = {}  # step name -> the manifest it writes (what waits for it)
        dp = self.plan.data
        if dp is not None:
            check_ready(dp)
            build = next((s for s in dp.todo if s.kind == "build"), None)
            for s in dp.todo:
                wait = build.manifests[0] if build is not None and s is not build else None
                out[f"10-data-{dns_name(s.name)}.yaml"] = [self.data_docs(s, wait)]
                preparing[s.name] = s.manifests[0]
        for r in todo:
            step = (r.subset or "").split("/")[0]
            wait = r.config.data.train if step in preparing else None
            out[f"20-run-{self.names[r.id]}.yaml"] = self.run_docs(r, wait)
        pm, rules = self.monitoring()
        out["30-podmonitor.yaml"] = [pm]
        out["31-prometheus-rules.yaml"] = [rules]
        return out


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the run's config.yaml, the wait script) as literal blocks: readable in the files."""


_Dumper.add_representer(
    str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None)
)


def write(out: Path, files: dict[str, list[dict]]) -> list[Path]:
    """Write the files (replacing an earlier rendering of the grid) and kustomize/kustomization.yaml."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("[0-9][0-9]-*.yaml"):
        old.unlink()
    paths = []
    for name, docs in files.items():
        p = out / name
        p.write_text(yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False))
        paths.append(p)
    kust = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [f"../{n}" for n in files],
    }
    (out / "kustomize").mkdir(exist_ok=True)
    (out / "kustomize" / "kustomization.yaml").write_text(
        "# kubectl kustomize --load-restrictor=LoadRestrictionsNone DIR/kustomize | kubectl apply -f -\n"
        + yaml.safe_dump(kust, sort_keys=False)
    )
    return paths


class K8sBackend(Backend):
    """Render a grid of ditscale trainings for Kubernetes: an Indexed Job + headless Service + ConfigMap per run.

    `kubectl apply -f DIR/` submits it: the namespace, the data-preparation Jobs, the runs (whose pods wait for their
    data), a PodMonitor and the PrometheusRule. Finished runs and runs another launcher claimed are left out; a run
    resumes from its run dir (s3://...), so rendering and applying again after a failure trains only what is missing.

      python launchers/k8s_grid.py --grid digits-placement --run-root s3://bucket/runs --out k8s-grid
      kubectl apply -f k8s-grid/
      python launchers/k8s_grid.py --grid digits-placement --run-root s3://bucket/runs --status
    """

    name = "k8s"
    caps = Capabilities("render", blocking=False, requeue=True, data_as_jobs=True, node_range=False, claims=False)
    dry_run_help = "print the plan; write nothing"
    status_help = "show each run's state (run dirs; the Jobs where kubectl reaches a cluster)"

    @classmethod
    def add_arguments(cls, p) -> None:
        p.add_argument("--out", help="folder to write the manifests to (needed to render)")
        p.add_argument("--namespace", default="ditscale", help="namespace of everything rendered (ditscale)")
        p.add_argument("--image", help="trainer image (default: the one in k8s/30-job.yaml)")
        p.add_argument("--secret", default="ditscale-s3", help="Secret holding the AWS_* keys (ditscale-s3)")

    @classmethod
    def check_args(cls, args) -> None:
        if not (args.status or args.collect or args.dry_run or args.out):
            raise LaunchError("--out DIR is required to render the manifests")

    @classmethod
    def from_args(cls, args, plan: Plan) -> K8sBackend:
        base = results_dir(plan.runs, plan.name)
        out = Path(args.out).absolute() if args.out else None
        return cls(K8sOptions(out, Path(args.log_dir or base / "_k8s").absolute(), args.namespace, args.image,
                              args.secret))  # fmt: skip

    def describe_run(self, r: RunSpec) -> str:
        res = r.resources
        return (
            f"job={dns_name(r.id)} nodes={res['nodes']} tasks/node={r.tasks_per_node} "
            f"gpus/node={res.get('gpus_per_node') or 0}"
        )

    def data_how(self, plan: Plan) -> dict[str, str]:
        return {s.name: "a Job of its own, applied first" for s in plan.data.todo} if plan.data is not None else {}

    def start(self, plan: Plan, todo: list[RunSpec], claims: dict[str, C.Claim]) -> dict[str, Any]:
        files = Renderer(plan, self.opts).files(todo)
        paths = write(self.opts.out, files)
        print(f"wrote {len(paths)} files for {len(todo)} run(s) to {self.opts.out}: kubectl apply -f {self.opts.out}/")
        return {r.id: dns_name(r.id) for r in todo}

    def claim_alive(self, claim: C.Claim) -> bool | None:
        return C.process_alive(claim.data)

    def stop(self, runs: list[RunSpec], claims: dict[str, C.Claim | None]) -> list[str]:
        """Deleting a run's Job sends its pods SIGTERM: each trainer checkpoints at the end of its step."""
        names = [dns_name(r.id) for r in runs]
        print(f"kubectl delete job -n {self.opts.namespace} " + " ".join(names))
        return []

    def views(self, runs: list[RunSpec], claims: dict[str, C.Claim | None]) -> dict[str, View]:
        """The Jobs of the grid, where kubectl reaches a cluster (else nothing: the run dirs say it all)."""
        if not shutil.which("kubectl") or not runs:
            return {}
        grid = label_value(runs[0].grid)
        try:
            cmd = ["kubectl", "get", "jobs", "-n", self.opts.namespace, "-l", f"{GRID_LABEL}={grid}", "-o", "json"]
            r = subprocess.run([*cmd, "--request-timeout=10s"], capture_output=True, text=True, timeout=30)
            items = json.loads(r.stdout).get("items", []) if r.returncode == 0 else []
        except (OSError, subprocess.SubprocessError, ValueError):
            return {}
        by_run = {(j["metadata"].get("labels") or {}).get(RUN_LABEL): j for j in items}
        out = {}
        for run in runs:
            j = by_run.get(label_value(run.id))
            if j is None:
                continue
            st = j.get("status") or {}
            conds = {c["type"]: c for c in st.get("conditions", []) if c.get("status") == "True"}
            name = j["metadata"]["name"]
            if "Failed" in conds:
                out[run.id] = View(f"Job {name} failed", why=conds["Failed"].get("message"), failed=True)
            elif "Complete" in conds:
                out[run.id] = View(f"Job {name} complete")
            else:
                active = int(st.get("active") or 0)
                out[run.id] = View(f"Job {name}: {active} pod(s) active", live=True, running=active > 0)
        return out
