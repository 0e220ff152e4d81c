"""The exporter: every series names its run (run_id beside run), a value not measured is absent (never 0), the
run-info and planned-steps gauges, the bind address (log.metrics_addr), the run identity (RunDir.run_id)."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from ditscale.config import config_from_dict
from ditscale.errors import ConfigError
from tests.ports import free_port

LABELS = {"run_id": "0123abcd", "run": "r1", "variant": "DiT-T/2", "windows": "local@head", "data_size": "1000"}
LABELS["rank"] = "0"
LAB = 'data_size="1000",rank="0",run="r1",run_id="0123abcd",variant="DiT-T/2",windows="local@head"'


def test_run_info_and_planned_steps_are_exported():
    from ditscale.observability import Metrics

    port = free_port()
    m = Metrics(LABELS, port=port, addr="127.0.0.1", info={"dataset": "celeba32", "seed": "2"}, planned_steps=400)
    try:
        assert m.server.server_address[0] == "127.0.0.1"
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=120).read().decode()
    finally:
        m.close()
    info = LAB.replace('rank="0"', 'dataset="celeba32",rank="0"').replace(
        'run_id="0123abcd"', 'run_id="0123abcd",seed="2"'
    )
    assert f"ditscale_run_info{{{info}}} 1.0" in body
    assert f"ditscale_train_planned_steps{{{LAB}}} 400.0" in body


def test_run_info_defaults_to_empty_labels_without_a_server():
    from ditscale.observability import Metrics

    m = Metrics(LABELS)  # port 0: no server, the registry still holds the series
    assert m.server is None
    text = "\n".join(
        f"{s.name}{s.labels}={s.value}" for fam in m.registry.collect() for s in fam.samples if "info" in s.name
    )
    assert "'dataset': ''" in text and "'seed': ''" in text and "=1.0" in text


def test_metrics_addr_setting():
    assert config_from_dict({}).log.metrics_addr == "0.0.0.0"
    assert config_from_dict({"log": {"metrics_addr": "127.0.0.1"}}).log.metrics_addr == "127.0.0.1"
    with pytest.raises(ConfigError, match="metrics_addr"):
        config_from_dict({"log": {"metrics_addr": ""}})


def test_metrics_server_binds_the_configured_address_only():
    """Bound to 127.0.0.1 the exporter answers on loopback; another local address of this machine is refused."""
    from ditscale.observability import Metrics

    other = _non_loopback_address()
    if other is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    port = free_port()
    m = Metrics(LABELS, port=port, addr="127.0.0.1")
    try:
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=120).status == 200
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://{other}:{port}/metrics", timeout=5)
    finally:
        m.close()


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent, only a route is chosen
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def test_scrape_log_waits_for_regular_scrapers_only():
    from ditscale.observability import ScrapeLog

    log = ScrapeLog()
    prom, curl = ("10.0.0.9", "Prometheus/2.42.0"), ("10.0.0.5", "curl/8.0")
    log.record(prom, 0.0)
    log.record(prom, 10.0)  # every 10 s
    log.record(curl, 5.0)  # once: not a regular scraper
    assert log.waiting_for(since=15.0, now=16.0) == [prom]  # its next scrape (t=20) is due
    assert log.waiting_for(since=15.0, now=40.0) == []  # overdue by far: it stopped scraping, do not wait
    log.record(prom, 20.0)
    assert log.waiting_for(since=15.0, now=21.0) == []  # it fetched the final values


def test_finished_run_serves_until_its_scraper_fetched_the_final_step():
    """close() of a finished run (step = planned steps) keeps /metrics up until the regular scraper came again."""
    import threading
    import time

    from ditscale.observability import Metrics

    port = free_port()
    m = Metrics(LABELS, port=port, addr="127.0.0.1", planned_steps=3)
    m.step.set(2)
    assert not m.finished()
    m.step.set(3)
    assert m.finished()
    got: list[tuple[float, str]] = []  # (request start, body) of every answered scrape
    stop = threading.Event()

    def scrape():
        while not stop.is_set():
            t0 = time.monotonic()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"User-Agent": "Prometheus/t"})
            try:
                got.append((t0, urllib.request.urlopen(req, timeout=10).read().decode()))
            except OSError:
                pass
            stop.wait(0.2)

    th = threading.Thread(target=scrape, daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 120
        while len(got) < 2 and time.monotonic() < deadline:  # a regular scraper: two scrapes at least
            time.sleep(0.05)
        assert len(got) >= 2
        closing = time.monotonic()
        m.close()
        assert m.server is None
        after = [body for t0, body in got if t0 >= closing]
        assert after and 'ditscale_train_step{data_size="1000",rank="0",run="r1"' in after[-1]
        assert after[-1].count(" 3.0\n") >= 2  # step and planned steps, both final
    finally:
        stop.set()
        th.join(timeout=120)


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _samples(body: str, name: str) -> list[str]:
    return [line for line in body.splitlines() if line.startswith(name + "{")]


def test_values_not_measured_are_absent_not_zero():
    """Before a log step reports them, the loss, throughput, learning rate and gradient norm have no sample (the
    family is declared, so the name is known); GPU memory has none without a GPU. The step is the run's own from
    the start (a resumed run's checkpoint step, not 0)."""
    from ditscale.observability import Metrics
    from ditscale.train.loggers import PrometheusLogger

    port = free_port()
    m = Metrics(LABELS, port=port, addr="127.0.0.1", planned_steps=400, start_step=120)
    unmeasured = ["ditscale_train_loss", "ditscale_images_per_second", "ditscale_learning_rate", "ditscale_grad_norm"]
    unmeasured += ["ditscale_gpu_memory_allocated_bytes", "ditscale_gpu_memory_reserved_bytes"]
    try:
        body = _scrape(port)
        for name in unmeasured:
            assert f"# TYPE {name} gauge" in body and not _samples(body, name), (name, body)
        assert f"ditscale_train_step{{{LAB}}} 120.0" in body
        # a log step of a run whose DeepSpeed computes no gradient norm (grad_norm None, ZeRO-0 in fp32)
        rec = {"loss": 0.25, "images_per_second": 80.0, "lr": 1e-3, "grad_norm": None, "skipped": 0}
        PrometheusLogger(m).log(121, rec)
        body = _scrape(port)
        assert f"ditscale_train_loss{{{LAB}}} 0.25" in body
        assert f"ditscale_learning_rate{{{LAB}}} 0.001" in body
        assert not _samples(body, "ditscale_grad_norm"), body
        PrometheusLogger(m).log(122, {**rec, "grad_norm": 0.5})
        assert f"ditscale_grad_norm{{{LAB}}} 0.5" in _scrape(port)
    finally:
        m.close()


def test_every_series_carries_the_run_id():
    from prometheus_client.parser import text_string_to_metric_families

    from ditscale.observability import Metrics

    port = free_port()
    m = Metrics(LABELS, port=port, addr="127.0.0.1", planned_steps=4)
    try:
        m.loss.set(1.0)
        m.step_time.observe(0.1)
        samples = [s for fam in text_string_to_metric_families(_scrape(port)) for s in fam.samples]
    finally:
        m.close()
    ours = [s for s in samples if s.name.startswith("ditscale_")]
    assert ours and all(s.labels.get("run_id") == "0123abcd" and s.labels.get("run") == "r1" for s in ours)
    with pytest.raises(ValueError, match="run_id"):
        Metrics({k: v for k, v in LABELS.items() if k != "run_id"})


def test_run_id_is_one_per_run_dir(tmp_path, monkeypatch):
    """The same place gives the same id (also written another way, or after a resume from another working
    directory); another run dir of the same config gives another one."""
    from ditscale.io.rundir import RunDir, run_id

    monkeypatch.chdir(tmp_path)
    a = RunDir("runs/a").run_id
    assert len(a) == 16 and int(a, 16) >= 0
    assert a == run_id(str(tmp_path / "runs" / "a")) == run_id(f"file://{tmp_path}/runs/a/") == run_id("./runs/a")
    assert a != run_id("runs/b")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert run_id("runs/a") != a  # another folder of the same relative name: another run
    assert run_id("s3://bucket/runs/a") == RunDir("s3://bucket/runs/a/").run_id != run_id("s3://bucket/runs/b")


@pytest.mark.slow
def test_a_real_run_exports_no_loss_before_its_first_log_step_and_no_grad_norm_at_zero_stage_0(
    tmp_path, digits8_dir, warm_deepspeed
):
    """`python -m ditscale train` at train.zero_stage=0 (fp32 on CPU: DeepSpeed's optimizer reports no gradient
    norm, get_global_grad_norm() is None) with log.every=3: every /metrics scrape before step 3 has the step but no
    loss sample; after it the loss is there and the gradient norm still is not (metrics.jsonl says null, the
    console `-`)."""
    import json
    import time

    from prometheus_client.parser import text_string_to_metric_families

    from tests import trainers as T

    port = free_port()
    cfg = T.tiny_config(
        tmp_path / "c.yaml",
        str(digits8_dir / "manifest.json"),
        train={"steps": 6, "zero_stage": 0},
        log={"every": 3, "sample_every": 0, "metrics_port": port, "metrics_addr": "127.0.0.1"},
    )
    run_dir = tmp_path / "run"
    trainer = T.alone(cfg, run_dir, delay=1.0, env={"OMP_NUM_THREADS": "1"})
    seen: list[dict[str, float]] = []  # each answered scrape: sample name -> value (ours, unlabelled by name)
    while trainer.proc.poll() is None:
        try:
            body = _scrape(port)
        except OSError:
            time.sleep(0.05)
            continue
        seen.append({s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples})
        time.sleep(0.05)
    T.run_ok(trainer)
    early = [s for s in seen if s["ditscale_train_step"] < 3]
    late = [s for s in seen if s["ditscale_train_step"] >= 3]
    assert early and late, f"scrapes: {len(seen)}, steps seen: {sorted({s['ditscale_train_step'] for s in seen})}"
    assert all("ditscale_train_loss" not in s and "ditscale_learning_rate" not in s for s in early), early[:3]
    assert all(s.get("ditscale_train_loss", 0) > 0 for s in late), late[:3]
    assert not any("ditscale_grad_norm" in s for s in seen), [s.get("ditscale_grad_norm") for s in seen][:5]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6] and all(r["grad_norm"] is None for r in records), records
    assert "grad_norm - " in trainer.output
