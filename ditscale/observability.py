"""What a training run tells the outside world: Prometheus metrics and sample-grid images (the loggers that use
them are in ditscale.train.loggers).

Prometheus: every rank serves /metrics on `log.metrics_addr`, port `log.metrics_port + local_rank` (0 = off),
with labels run_id, run, variant, windows, data_size, rank. `run_id` is the run's identity (one per run dir,
ditscale.io.rundir.run_id): two runs of one config share `run` (cfg.run.name) but never `run_id`, so every
dashboard query, recording rule and alert groups and joins by `run_id`. Names follow Prometheus conventions
(ditscale_ prefix, base units, _total for counters). `ditscale_run_info` (value 1) adds the labels of the run that
are not on every series (dataset, seed), and `ditscale_train_planned_steps` the steps the run trains for:
dashboards join on `run_id` to group by them, and alerts tell a finished run (step = planned steps) from one that
died. A value that was not measured is absent, never 0: the loss, throughput, learning rate and gradient norm
have no sample until a log step reports them (no gradient norm at all where DeepSpeed computes none), GPU memory
none without a GPU. So that Prometheus sees the final step at all, a finished run's exporter stays up until every
client that scrapes it regularly has fetched it once more (Metrics.close()).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from pathlib import Path

import numpy as np

from ditscale.io import storage

log = logging.getLogger(__name__)

LABELS = ("run_id", "run", "variant", "windows", "data_size", "rank")
INFO_LABELS = ("dataset", "seed")  # on ditscale_run_info only
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, math.inf)
CKPT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, math.inf)
FINAL_SCRAPE_TIMEOUT_S = 120.0  # the longest a finished run waits for its scrapers (Metrics.close())


class ScrapeLog:
    """Who fetched /metrics when: (client address, user agent) -> its last scrape times.

    A client that scraped twice or more is a regular scraper (a Prometheus, every `interval`); `waiting_for(since)`
    lists those that have not scraped since `since` while their next scrape is still due (within 2.5 intervals of
    their last one), so a finished run waits for Prometheus but not for a one-off `curl`."""

    def __init__(self):
        self._lock = threading.Lock()
        self._times: dict[tuple[str, str], list[float]] = {}

    def record(self, client: tuple[str, str], t: float | None = None) -> None:
        with self._lock:
            times = self._times.setdefault(client, [])
            times.append(time.monotonic() if t is None else t)
            del times[:-3]

    def waiting_for(self, since: float, now: float | None = None) -> list[tuple[str, str]]:
        now = time.monotonic() if now is None else now
        with self._lock:
            return [
                client
                for client, t in self._times.items()
                if len(t) >= 2 and t[-1] < since and now <= t[-1] + 2.5 * (t[-1] - t[-2]) + 1.0
            ]


def _serve(registry, port: int, addr: str, scrapes: ScrapeLog):
    """prometheus_client's WSGI exposition in a daemon thread, noting who scrapes (what start_http_server does,
    plus the ScrapeLog)."""
    import socket
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

    class Server(ThreadingWSGIServer):
        pass

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format, *args):
            pass

    family, _, _, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    Server.address_family = family  # :: needs AF_INET6
    app = make_wsgi_app(registry)

    def noted(environ, start_response):
        scrapes.record((environ.get("REMOTE_ADDR", ""), environ.get("HTTP_USER_AGENT", "")))
        return app(environ, start_response)

    httpd = make_server(sockaddr[0], port, noted, Server, handler_class=QuietHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True, name=f"metrics-{port}").start()
    return httpd


class Unmeasured:
    """A labelled gauge whose series exists only once it is set: until then /metrics declares the family (HELP and
    TYPE) but has no sample, so Prometheus and the dashboard see "no value" instead of a 0 never measured."""

    def __init__(self, family, labels: dict[str, str]):
        self.family, self.labels = family, labels

    def set(self, value: float) -> None:
        self.family.labels(**self.labels).set(value)


class Metrics:
    """The contract's Prometheus metrics for one rank, in a private registry, served over HTTP when port > 0."""

    def __init__(
        self,
        labels: dict[str, str],
        port: int = 0,
        addr: str = "0.0.0.0",
        info: dict[str, str] | None = None,
        planned_steps: int | None = None,
        start_step: int = 0,
    ):
        """labels: LABELS' values; info: INFO_LABELS' values (dataset, seed) for ditscale_run_info;
        planned_steps: train.steps; start_step: the steps done when this process starts (a resume's checkpoint).
        All are set before the server starts, so every scrape has them."""
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r, names = self.registry, list(LABELS)

        missing = set(LABELS) - set(labels)
        if missing:
            raise ValueError(f"Metrics labels lack {sorted(missing)} (every series carries {', '.join(LABELS)})")
        labels = {k: str(labels[k]) for k in LABELS}

        def g(name: str, doc: str):
            return Gauge(name, doc, names, registry=r).labels(**labels)

        def unmeasured(name: str, doc: str) -> Unmeasured:
            return Unmeasured(Gauge(name, doc, names, registry=r), labels)

        def c(name: str, doc: str):  # prometheus_client appends _total to counter names itself
            return Counter(name.removesuffix("_total"), doc, names, registry=r).labels(**labels)

        self.loss = unmeasured("ditscale_train_loss", "training loss (mean over ranks and the last logging window)")
        self.step = g("ditscale_train_step", "optimizer steps completed")
        self.step.set(start_step)
        self.samples = c("ditscale_samples_total", "training samples consumed by all ranks")
        self.images_per_second = unmeasured("ditscale_images_per_second", "training throughput of the whole job")
        self.step_time = Histogram(
            "ditscale_step_time_seconds",
            "wall time of one optimizer step on this rank",
            names,
            buckets=STEP_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.data_wait = c("ditscale_data_wait_seconds_total", "time this rank waited for the data loader")
        # absent where DeepSpeed computes no norm (e.g. ZeRO-0 in fp32: the optimizer reports none)
        self.grad_norm = unmeasured("ditscale_grad_norm", "global gradient norm before clipping")
        self.learning_rate = unmeasured("ditscale_learning_rate", "learning rate")
        self.gpu_allocated = unmeasured("ditscale_gpu_memory_allocated_bytes", "GPU memory allocated by tensors")
        self.gpu_reserved = unmeasured(
            "ditscale_gpu_memory_reserved_bytes", "GPU memory reserved by the caching allocator"
        )
        self.checkpoint_time = Histogram(
            "ditscale_checkpoint_seconds",
            "wall time of one checkpoint save",
            names,
            buckets=CKPT_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.skipped = c("ditscale_skipped_samples_total", "corrupt samples skipped by this rank's loader")
        info = {k: str((info or {}).get(k, "")) for k in INFO_LABELS}
        self.run_info = Gauge(
            "ditscale_run_info", "the run's labels (value 1): dataset, seed", names + list(INFO_LABELS), registry=r
        ).labels(**labels, **info)
        self.run_info.set(1)
        self.planned_steps = g("ditscale_train_planned_steps", "optimizer steps the run trains for (train.steps)")
        if planned_steps is not None:
            self.planned_steps.set(planned_steps)
        self._skipped_seen = 0
        self._labels = dict(labels)
        self.scrapes = ScrapeLog()
        self.server = None
        self.port, self.addr = port, addr
        if port:
            try:
                self.server = _serve(self.registry, port, addr, self.scrapes)
                log.info("Prometheus metrics on http://%s:%d/metrics", addr, port)
            except OSError as e:
                log.warning("Prometheus exporter not started: port %d unavailable (%s)", port, e)

    def set_skipped(self, total: int) -> None:
        if total > self._skipped_seen:
            self.skipped.inc(total - self._skipped_seen)
            self._skipped_seen = total

    def update_gpu_memory(self) -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.gpu_allocated.set(torch.cuda.memory_allocated())
            self.gpu_reserved.set(torch.cuda.memory_reserved())

    def finished(self) -> bool:
        """The step gauge reached the planned steps."""
        planned = self.registry.get_sample_value("ditscale_train_planned_steps", self._labels)
        step = self.registry.get_sample_value("ditscale_train_step", self._labels)
        return bool(planned) and step is not None and step >= planned

    def close(self, final_scrape_timeout: float = FINAL_SCRAPE_TIMEOUT_S) -> None:
        """Stop serving. A finished run first waits (at most final_scrape_timeout) until each regular scraper has
        fetched the final values: otherwise Prometheus keeps an earlier step as the run's last one, and neither
        the dashboard nor the alerts can tell the finished run from one that died. Unscraped, interrupted or
        failed runs stop at once."""
        if self.server is None:
            return
        if self.finished():
            since = time.monotonic()
            while time.monotonic() < since + final_scrape_timeout and self.scrapes.waiting_for(since):
                time.sleep(0.05)
        self.server.shutdown()
        self.server.server_close()
        self.server = None


def grid_image(images, nrow: int | None = None, pad: int = 2):
    """(N, C, H, W) tensor/array in [-1, 1] -> a PIL image grid (C = 1 grey, 3 RGB; others: first 3 channels)."""
    from PIL import Image

    x = np.asarray(images.detach().float().cpu() if hasattr(images, "detach") else images, dtype=np.float32)
    n, c, h, w = x.shape
    if c not in (1, 3):  # e.g. 4-channel latents: show the first three channels, each rescaled
        x = x[:, :3]
        lo = x.min(axis=(0, 2, 3), keepdims=True)
        hi = x.max(axis=(0, 2, 3), keepdims=True)
        x = (x - lo) / np.maximum(hi - lo, 1e-8) * 2 - 1
        c = 3
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    grid = np.zeros((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = (
            x[i] + 1
        ) / 2
    arr = (np.clip(grid, 0, 1) * 255 + 0.5).astype(np.uint8)
    if c == 1:
        return Image.fromarray(np.ascontiguousarray(arr[0]))
    return Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)))


def save_grid(images, path: Path | str, nrow: int | None = None, scale: int = 1) -> Path | str:
    """Write the grid image (format from the suffix, PNG by default) to a local path or URL, atomically: under a
    temporary name, then renamed into place, so a killed writer never leaves a truncated image at `path`.
    Returns `path` (a Path when local)."""
    import io

    from PIL import Image

    img = grid_image(images, nrow=nrow)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    target = os.fspath(path)
    fmt = Image.registered_extensions().get(os.path.splitext(target)[1].lower(), "PNG")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    storage.write_bytes(target, buf.getvalue())
    return Path(target) if storage.is_local(target) else target
