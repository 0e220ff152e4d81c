"""A real Prometheus server for tests: Debian's /usr/bin/prometheus on a free loopback port.

The session fixture `prometheus_server` writes a temp config (1 s scrape interval), starts the binary with its own
TSDB dir and `--web.enable-lifecycle`, waits for /-/ready, and stops it by PID at the end (SIGTERM, then SIGKILL).
The server loads ditscale's recording and alerting rules (k8s/rules/ditscale.rules.yaml), as a deployed one would.
`server.set_targets({"job": ["127.0.0.1:port", ...]})` rewrites the scrape config and reloads it (POST
/-/reload); `server.query(expr)` runs an instant query; `server.wait_for(expr, ...)` polls the query API and
returns as soon as the condition holds, for up to WAIT_S (120 s): a freshly started server syncs its first
targets after ~6 s and a reloaded one after ~1 s on a quiet machine, far later on a loaded 2-core one.
Skips with the reason when the binary is missing, and fails instead under CI=true (`.ci/setup --services`
installs Debian's `prometheus`).

Run `python tests/plugins/prometheus.py HOST:PORT ...` to start a server scraping those targets by hand.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.needs import skip_or_fail
from tests.ports import free_port

SCRAPE_INTERVAL = "500ms"
WAIT_S = 120.0  # the longest any wait here lasts; every wait returns as soon as its condition holds
RULES = Path(__file__).resolve().parents[2] / "k8s" / "rules" / "ditscale.rules.yaml"


def find_prometheus() -> str | None:
    return shutil.which("prometheus") or ("/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None)


def _http(url: str, data: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@dataclass
class PrometheusServer:
    binary: str
    root: Path
    port: int
    proc: subprocess.Popen | None = None
    targets: dict[str, list[str]] = field(default_factory=dict)
    rule_files: list[Path] = field(default_factory=list)
    file_sd: dict[str, list[str]] = field(default_factory=dict)  # job -> file_sd_configs files (globs)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.root / "prometheus.yml"

    @property
    def log_path(self) -> Path:
        return self.root / "prometheus.log"

    def _write_config(self) -> None:
        lines = [
            "global:",
            f"  scrape_interval: {SCRAPE_INTERVAL}",
            f"  scrape_timeout: {SCRAPE_INTERVAL}",
            f"  evaluation_interval: {SCRAPE_INTERVAL}",
        ]
        if self.rule_files:
            lines += ["rule_files:"] + [f"  - {json.dumps(str(f))}" for f in self.rule_files]
        lines.append("scrape_configs:")
        for job, targets in self.targets.items():
            lines += [
                f"  - job_name: {json.dumps(job)}",
                "    static_configs:",
                f"      - targets: {json.dumps(targets)}",
            ]
        for job, files in self.file_sd.items():
            lines += [
                f"  - job_name: {json.dumps(job)}",
                "    file_sd_configs:",
                f"      - files: {json.dumps(files)}",
                "        refresh_interval: 1s",
            ]
        if not self.targets and not self.file_sd:
            lines[-1] = "scrape_configs: []"
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.config_path)

    def start(self, timeout: float = WAIT_S) -> None:
        self._write_config()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                "--storage.tsdb.retention.time=1d",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if _http(self.url + "/-/ready", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prometheus not ready on {self.url} after {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def reload(self) -> None:
        status, body = _http(self.url + "/-/reload", data=b"", timeout=WAIT_S)
        if status != 200:
            raise RuntimeError(f"prometheus reload failed ({status}): {body[:500]!r}\n{self.log_tail()}")

    def set_targets(self, targets: dict[str, list[str]], file_sd: dict[str, list[str]] | None = None) -> None:
        """Replace the scrape config with `{job_name: ["host:port", ...]}` (and file_sd jobs: `{job_name:
        ["<dir>/*.json", ...]}`, the only way to find targets whose ports are picked at run time) and reload."""
        self.targets = {job: list(t) for job, t in targets.items()}
        self.file_sd = {job: list(f) for job, f in (file_sd or {}).items()}
        self._write_config()
        self.reload()

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?" + urllib.parse.urlencode(params)
        status, body = _http(url, timeout=WAIT_S)
        out = json.loads(body)
        if out.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params} -> {status}: {out.get('errorType')}: {out.get('error')}")
        return out["data"]

    def query(self, expr: str, time_s: float | None = None) -> list[dict]:
        """Instant query; returns the result list ([{"metric": {...}, "value": [t, "v"]}, ...])."""
        params = {"query": expr}
        if time_s is not None:
            params["time"] = f"{time_s:.3f}"
        return self.api("query", **params)["result"]

    def wait_for(
        self, expr: str, predicate=bool, timeout: float = WAIT_S, interval: float = 0.5, time_s: float | None = None
    ) -> list[dict]:
        """Poll an instant query (at time_s, default now) until predicate(result) holds; returns the result as
        soon as it does (raises TimeoutError after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while True:
            result = self.query(expr, time_s=time_s)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"prometheus query {expr!r} did not satisfy the condition in {timeout} s; last result {result}; "
                    f"targets {self.api('targets')['activeTargets']}"
                )
            time.sleep(interval)


@pytest.fixture(scope="session")
def prometheus_server():
    binary = find_prometheus()
    if binary is None:
        skip_or_fail("Debian's prometheus binary is not installed (apt-get install prometheus; .ci/setup --services)")
    root = Path(tempfile.mkdtemp(prefix="ditscale-prom-"))
    server = PrometheusServer(binary=binary, root=root, port=free_port(), rule_files=[RULES])
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # python tests/plugins/prometheus.py 127.0.0.1:9400 127.0.0.1:9401
    srv = PrometheusServer(
        find_prometheus() or "prometheus", Path(tempfile.mkdtemp(prefix="ditscale-prom-")), 9090, rule_files=[RULES]
    )
    srv.targets = {"ditscale": sys.argv[1:]}
    srv.start()
    print(f"prometheus on {srv.url} (pid {srv.proc.pid}) scraping {sys.argv[1:]}; Ctrl-C stops it")
    try:
        srv.proc.wait()
    except KeyboardInterrupt:
        srv.stop()


# --------------------------------------------------------------------------------------------------------------
# The Kubernetes Job's command, run locally under the real Prometheus (shared by test_k8s, test_dashboard and
# test_prometheus: one 2-rank training run per session).

K8S_JOB = Path(__file__).resolve().parents[2] / "k8s" / "30-job.yaml"
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand_k8s_vars(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command/args: defined names are replaced, $$ escapes, others stay."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, text)


def job_container(path: Path = K8S_JOB) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    (job,) = [d for d in docs if d.get("kind") == "Job"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def job_command(overrides: dict[str, str], path: Path = K8S_JOB) -> list[str]:
    """The Job container's command + args with its env substituted the way the kubelet does it.

    Plain `value:` env entries come from the manifest; `overrides` replace them (and stand in for the values that
    Kubernetes fills in at run time: JOB_COMPLETION_INDEX from the pod annotation, secrets)."""
    container = job_container(path)
    env = {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}
    env.update(overrides)
    argv = list(container.get("command", [])) + list(container.get("args", []))
    return [expand_k8s_vars(a, env) for a in argv]


@dataclass
class TrainingRun:
    prometheus: PrometheusServer
    run_name: str
    run_dir: Path
    config_path: Path
    argv: list[str]
    returncode: int
    output: str
    metrics_ports: list[int]
    scrapes: dict[int, str]  # local rank -> last /metrics body seen while the run was alive
    alive_at: float | None  # wall-clock time (s since the epoch) of the last /metrics scrape that answered


def _tiny_config(repo: Path, shards: str, run_dir: Path, run_name: str, metrics_port: int) -> dict:
    demo = repo / "configs" / "demo.yaml"
    tree = yaml.safe_load(demo.read_text()) if demo.is_file() else {}
    tree = tree or {}
    tree.setdefault("run", {}).update(name=run_name, dir=str(run_dir), seed=0)
    model = tree.setdefault("model", {})
    # DiT-T/2 on 8x8 digits: 4x4 tokens, depth 4; 3x3 local windows in the first two blocks
    model.update(variant="DiT-T/2", input_size=8, in_channels=1, num_classes=10, windows="3,3,-,-")
    tree.setdefault("data", {}).update(train=shards, num_workers=0)
    tree["data"].pop("test", None)
    tree.setdefault("diffusion", {}).update(num_timesteps=100, sample_steps=5)
    train = tree.setdefault("train", {})
    train.update(steps=TRAIN_STEPS, global_batch=16, micro_batch=8, precision="fp32", compile=False)
    tree.setdefault("optim", {})
    tree.setdefault("checkpoint", {}).update(every=TRAIN_STEPS // 2, keep=2)
    # loopback only: the tests' exporters are never reachable from outside this machine (log.metrics_addr)
    tree.setdefault("log", {}).update(
        every=1, sample_every=0, metrics_port=metrics_port, metrics_addr="127.0.0.1", progress=False
    )
    return tree


TRAIN_STEPS = 100
TRAIN_TIMEOUT_S = 420


@pytest.fixture(scope="session")
def monitored_training(prometheus_server, tmp_path_factory, repo_root, digits8_dir) -> TrainingRun:
    """The Job's command (read out of k8s/30-job.yaml, env substituted, 1 node x 2 processes, master 127.0.0.1)
    runs a tiny 2-rank training on digits shards while the real Prometheus scrapes both ranks' /metrics."""
    try:
        import ditscale.cli.train  # noqa: F401
        from ditscale.model import DiT_models  # noqa: F401
    except ImportError as e:
        pytest.skip(f"the trainer or the data package is not importable yet: {e}")
    root = tmp_path_factory.mktemp("k8s-run")
    manifest = digits8_dir / "manifest.json"
    assert manifest.is_file(), f"no digits shards at {manifest}"
    run_name = "k8s-e2e"
    metrics_port = free_port(consecutive=2)
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(_tiny_config(repo_root, str(manifest), root / "run", run_name, metrics_port)))

    argv = job_command(
        {
            "NNODES": "1",
            "GPUS_PER_NODE": "2",
            "JOB_COMPLETION_INDEX": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "DITSCALE_CONFIG": str(config_path),
        }
    )
    ports = [metrics_port, metrics_port + 1]
    prometheus_server.set_targets({"ditscale": [f"127.0.0.1:{p}" for p in ports]})

    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""), OMP_NUM_THREADS="1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    log_path = root / "train.log"
    scrapes: dict[int, str] = {}
    alive_at = None
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + TRAIN_TIMEOUT_S
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                for i, p in enumerate(ports):  # a direct /metrics scrape of each rank while it is alive
                    try:
                        status, body = _http(f"http://127.0.0.1:{p}/metrics", timeout=1)
                        if status == 200 and b"ditscale_train_loss{" in body:
                            scrapes[i] = body.decode()
                            alive_at = time.time()
                    except OSError:
                        pass
                time.sleep(0.3)
        finally:
            if proc.poll() is None:  # timed out: stop the whole torchrun process group, by its PID
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=WAIT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
    output = log_path.read_text(errors="replace")
    return TrainingRun(
        prometheus=prometheus_server,
        run_name=run_name,
        run_dir=root / "run",
        config_path=config_path,
        argv=argv,
        returncode=proc.returncode,
        output=output,
        metrics_ports=ports,
        scrapes=scrapes,
        alive_at=alive_at,
    )
