"""The exporter's run-info and planned-steps gauges, and the bind address (log.metrics_addr)."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from ditscale.config import config_from_dict
from ditscale.errors import ConfigError
from tests.ports import free_port

LABELS = {"run": "r1", "variant": "DiT-T/2", "windows": "local@head", "data_size": "1000", "rank": "0"}


def test_run_info_and_planned_steps_are_exported():
    from ditscale.observability import Metrics

    port = free_port()
    m = Metrics(LABELS, port=port, addr="127.0.0.1", info={"dataset": "celeba32", "seed": "2"}, planned_steps=400)
    try:
        assert m.server.server_address[0] == "127.0.0.1"
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        m.close()
    lab = 'data_size="1000",rank="0",run="r1",variant="DiT-T/2",windows="local@head"'
    info = 'data_size="1000",dataset="celeba32",rank="0",run="r1",seed="2",variant="DiT-T/2",windows="local@head"'
    assert f"ditscale_run_info{{{info}}} 1.0" in body
    assert f"ditscale_train_planned_steps{{{lab}}} 400.0" in body


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
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).status == 200
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
