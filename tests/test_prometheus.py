"""A REAL Prometheus server (Debian's binary, tests/plugins/prometheus.py) scrapes real exporters.

- the fixture itself, against a tiny prometheus_client exporter process started here;
- a 2-rank training run (the Kubernetes Job's own command, see tests/plugins/prometheus.py::monitored_training):
  the query API returns loss and throughput series with a `rank` label for both ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.plugins.prometheus import WAIT_S
from tests.ports import free_port

pytestmark = [pytest.mark.slow, pytest.mark.prometheus]

EXPORTER = textwrap.dedent(
    """
    import sys, time
    from prometheus_client import Counter, Gauge, start_http_server
    loss = Gauge("ditscale_train_loss", "loss", ["run", "rank"])
    samples = Counter("ditscale_samples", "samples", ["run", "rank"])
    start_http_server(int(sys.argv[1]), addr="127.0.0.1")
    for r in ("0", "1"):
        loss.labels(run="fixture", rank=r).set(0.25 + int(r))
    while True:
        for r in ("0", "1"):
            samples.labels(run="fixture", rank=r).inc(8)
        time.sleep(0.2)
    """
)


@pytest.fixture
def exporter():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", EXPORTER, str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def test_fixture_scrapes_an_exporter_and_answers_queries(prometheus_server, exporter):
    prometheus_server.set_targets({"fixture": [exporter]})
    result = prometheus_server.wait_for(
        'ditscale_train_loss{run="fixture"}', lambda r: {s["metric"].get("rank") for s in r} == {"0", "1"}
    )
    values = {s["metric"]["rank"]: float(s["value"][1]) for s in result}
    assert values == {"0": 0.25, "1": 1.25}
    assert all(s["metric"]["job"] == "fixture" and s["metric"]["instance"] == exporter for s in result)
    rates = prometheus_server.wait_for(
        'sum by (rank) (rate(ditscale_samples_total{run="fixture"}[5s]))',
        lambda r: len(r) == 2 and all(float(s["value"][1]) > 0 for s in r),
    )
    assert {s["metric"]["rank"] for s in rates} == {"0", "1"}
    # Reloading to an empty target set works too (lifecycle API).
    prometheus_server.set_targets({})
    assert prometheus_server.api("status/config")["yaml"].count("job_name") == 0


def test_fixture_reports_a_bad_query(prometheus_server):
    with pytest.raises(RuntimeError, match="bad_data"):
        prometheus_server.query("sum by (")


def test_training_run_is_scraped_with_rank_labels(monitored_training):
    prom = monitored_training.prometheus
    run = monitored_training.run_name
    # asked at the time the run was last seen alive: on a loaded machine the shared run may have ended more than
    # 10 minutes before this test gets to ask (its targets are gone by then)
    at = monitored_training.alive_at
    assert at is not None, monitored_training.output[-4000:]
    loss = prom.wait_for(
        f'last_over_time(ditscale_train_loss{{run="{run}"}}[10m])',
        lambda r: {s["metric"].get("rank") for s in r} >= {"0", "1"},
        time_s=at,
    )
    for s in loss:
        assert float(s["value"][1]) > 0, s
        assert {"run", "variant", "windows", "data_size", "rank"} <= set(s["metric"]), s["metric"]
    # rates over [5m] at the same time
    throughput = prom.wait_for(
        f'sum by (rank) (rate(ditscale_samples_total{{run="{run}"}}[5m]))',
        lambda r: {s["metric"].get("rank") for s in r} >= {"0", "1"} and all(float(s["value"][1]) > 0 for s in r),
        time_s=at,
    )
    assert len(throughput) == 2
    total = prom.query(f'sum(rate(ditscale_samples_total{{run="{run}"}}[5m]))', time_s=at)
    assert total and float(total[0]["value"][1]) > 0
    if os.environ.get("DITSCALE_TEST_VERBOSE"):
        print(loss, throughput)
