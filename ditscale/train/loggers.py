"""What a training run reports, and when: the logging window and the loggers it writes to.

`TrainLog` is the trainer's part. Every step it updates host-side counters (Prometheus step, samples, step time,
data wait) and adds the step's loss to a device-side sum; only every `log.every` steps (and at the end or on a
stop) does it read device values back (the one host sync of the step, all-reduced over ranks) and write a record
to each logger. Every logger implements the `Logger` protocol below; `log.loggers` chooses them:
- "jsonl": metrics.jsonl in the run dir (rank 0; a resume drops the lines after its checkpoint);
- "prometheus": /metrics on every rank (ditscale.observability.Metrics);
- "tensorboard": event files in <run dir>/tensorboard (rank 0; extra `ditscale[tensorboard]`);
- "wandb": a W&B run, online or WANDB_MODE=offline (rank 0; extra `ditscale[wandb]`);
- the console: a tqdm bar when log.progress is on and stderr is a terminal, else one plain line per record
  (greppable: `step 40/300 loss 0.1234 img/s 512.3 lr 1.00e-03 grad_norm 0.41 data_wait 3.2% eta 0:01:05`).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

import torch

from ditscale.distenv import free_port
from ditscale.errors import ConfigError, StorageError
from ditscale.io import storage
from ditscale.io.rundir import METRICS, dumps
from ditscale.observability import Metrics

if TYPE_CHECKING:
    from ditscale.config import LogSection


class RunValues(NamedTuple):
    """What the logging part uses from outside its section: the run's name, planned steps and global batch, and
    the whole config as data (W&B records it with the run)."""

    name: str
    steps: int
    global_batch: int
    config: dict


log = logging.getLogger("ditscale.train")


@runtime_checkable
class Logger(Protocol):
    """Where the trainer's records go. TrainLog calls these on the ranks `make_loggers` gives the logger to."""

    def log(self, step: int, record: dict) -> None:
        """One record of a log step: step, loss, images_per_second, step_time, data_wait_share, lr, grad_norm
        (None when not computed), samples, skipped, time."""
        ...

    def image(self, step: int, tag: str, path: Path) -> None:
        """A sample grid saved at `path` (a PNG) at `step`."""
        ...

    def sync(self) -> None:
        """Make what was logged durable in the run dir (called with each checkpoint; uploads for URL run dirs)."""
        ...

    def close(self) -> None:
        """The run ends: flush and release; nothing is logged after."""
        ...


class JsonlLogger(Logger):
    """metrics.jsonl, one record per line, flushed per line; uploaded with each checkpoint for URL run dirs."""

    def __init__(self, rundir, start_step: int):
        self.rundir, self.rel = rundir, METRICS
        self.path = rundir.local_file(METRICS)
        text = rundir.read_text(METRICS) if rundir.remote else None
        if text is not None:
            self.path.write_text(text)
        if self.path.is_file():  # a resumed run repeats the steps after its checkpoint: drop them
            kept = [ln for ln in self.path.read_text().splitlines() if _step_of(ln) <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self.f = open(self.path, "a")

    def log(self, step: int, record: dict) -> None:
        self.rundir.guard("append to metrics.jsonl")
        self.f.write(dumps(record) + "\n")
        self.f.flush()

    def image(self, step: int, tag: str, path: Path) -> None:
        pass

    def sync(self) -> None:
        """Upload (URL run dirs); a store that is down is not fatal here: the next sync carries the lines."""

        if not self.f.closed:
            self.f.flush()
        try:
            self.rundir.upload(self.rel)
        except StorageError as e:
            log.warning("metrics.jsonl not uploaded this time: %s", e)

    def close(self) -> None:
        self.f.close()
        self.sync()


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", math.inf)
    except ValueError:
        return math.inf


class PrometheusLogger(Logger):
    """The record's gauges on this rank's /metrics (counters and histograms are updated every step). A value the
    record does not have (grad_norm None: no norm computed) is not set, so it stays absent rather than 0."""

    def __init__(self, metrics):
        self.m = metrics

    def log(self, step: int, record: dict) -> None:
        m = self.m
        if record.get("loss") is not None:  # None: every step of the window was skipped (non-finite)
            m.loss.set(record["loss"])
        m.images_per_second.set(record["images_per_second"])
        m.learning_rate.set(record["lr"])
        if record.get("grad_norm") is not None:
            m.grad_norm.set(record["grad_norm"])
        m.set_skipped(record.get("skipped", 0))
        m.update_gpu_memory()

    def image(self, step: int, tag: str, path: Path) -> None:
        pass

    def sync(self) -> None:
        pass  # Prometheus scrapes; nothing to write

    def close(self) -> None:
        pass  # the exporter is TrainLog's (Metrics.close waits for the final scrape)


class ConsoleLogger(Logger):
    """A progress bar on a terminal; otherwise (Slurm logs, kubectl logs) one plain line per record."""

    def __init__(self, total: int, start: int, progress: bool):
        self.total, self.bar = total, None
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
        self.last = start

    def log(self, step: int, record: dict) -> None:
        r = record
        if self.bar is not None:
            self.bar.set_postfix(loss=_num(r["loss"], ".4f"), img_s=f"{r['images_per_second']:.1f}", refresh=False)
            self.bar.update(step - self.last)
        else:
            log.info(format_line(r, self.total))
        self.last = step

    def image(self, step: int, tag: str, path: Path) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_line(r: dict, total: int) -> str:
    gn = r.get("grad_norm")
    eta = (total - r["step"]) * r["step_time"] if r.get("step_time") else float("nan")
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
    days = int(eta // 86400) if math.isfinite(eta) else 0
    return (
        f"step {r['step']}/{total} loss {_num(r['loss'], '.4f')} img/s {r['images_per_second']:.1f} lr {r['lr']:.2e} "
        f"grad_norm {'-' if gn is None else f'{gn:.3g}'} data_wait {100 * r['data_wait_share']:.1f}% "
        f"eta {f'{days}d ' if days else ''}{eta_s}"
    )


SCALARS = ("loss", "images_per_second", "step_time", "data_wait_share", "lr", "grad_norm")


def _require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            f"log.loggers includes {extra!r} but {module} is not installed: pip install 'ditscale[{extra}]' ({e})"
        ) from None


class TensorBoardLogger(Logger):
    """TensorBoard event files in <run dir>/tensorboard (scalars under train/, sample grids as images, and the run's
    config: as hparams, one flat key per field for the HPARAMS tab, and as YAML text under config). A resumed run
    purges the events after its checkpoint, so the curves have no repeated steps."""

    def __init__(self, rundir, start_step: int):
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.rundir, self.rel = rundir, "tensorboard"
        self.writer = SummaryWriter(str(rundir.local_file(self.rel)), purge_step=start_step + 1 if start_step else None)
        self._write_config(start_step)

    def _write_config(self, step: int) -> None:
        """The config the trainer recorded in the run dir (config.yaml, written before the loggers start)."""
        from torch.utils.tensorboard.summary import hparams

        text, tree = self.rundir.read_text("config.yaml"), self.rundir.saved_config()
        if not text or not isinstance(tree, dict):
            return
        flat: dict = {}

        def walk(prefix: str, node) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:  # hparams take numbers, strings and booleans; lists and nulls as their text
                flat[prefix] = node if isinstance(node, (int, float, str, bool)) else str(node)

        walk("", tree)
        for summary in hparams(flat, {"train/loss": None}):  # the metric is the train/loss scalar of this run
            self.writer.file_writer.add_summary(summary)
        indented = "\n".join("    " + line for line in text.splitlines())  # markdown code block
        self.writer.add_text("config", indented, step)

    def log(self, step: int, record: dict) -> None:
        for k in SCALARS:
            if record.get(k) is not None:
                self.writer.add_scalar(f"train/{k}", record[k], step)

    def image(self, step: int, tag: str, path: Path) -> None:
        import numpy as np
        from PIL import Image

        self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def sync(self) -> None:
        self.writer.flush()
        if self.rundir.remote:
            self.rundir.upload_tree(self.rundir.local / self.rel, self.rel)

    def close(self) -> None:
        self.writer.close()
        if self.rundir.remote:
            self.rundir.upload_tree(self.rundir.local / self.rel, self.rel)


class WandbLogger(Logger):
    """Weights & Biases: one W&B run per ditscale run (its id is the run's run_id, so a resumed run continues
    it). Works offline (WANDB_MODE=offline: files under <run dir>/wandb, `wandb sync` them later)."""

    def __init__(self, project: str, name: str, config: dict, rundir):
        self.wandb = _require("wandb", "wandb")
        where = rundir.local_file("wandb").parent  # W&B writes its wandb/ folder there
        self.run = self.wandb.init(
            project=project, name=name, id=rundir.run_id, resume="allow", dir=str(where), config=config
        )

    def log(self, step: int, record: dict) -> None:
        self.run.log({f"train/{k}": record[k] for k in SCALARS if record.get(k) is not None}, step=step)

    def image(self, step: int, tag: str, path: Path) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def sync(self) -> None:
        pass  # W&B uploads (or, offline, writes) by itself

    def close(self) -> None:
        self.run.finish()


def make_loggers(log: LogSection, run: RunValues, rundir, denv, metrics, start_step: int) -> list[Logger]:
    """The loggers of `log.loggers` for this rank (all but Prometheus on rank 0 only), then the console."""
    out: list[Logger] = []
    for name in log.loggers:
        if name == "prometheus" and metrics is not None:
            out.append(PrometheusLogger(metrics))
        elif not denv.is_main:
            continue
        elif name == "jsonl":
            out.append(JsonlLogger(rundir, start_step))
        elif name == "tensorboard":
            out.append(TensorBoardLogger(rundir, start_step))
        elif name == "wandb":
            out.append(WandbLogger(log.wandb_project, run.name, run.config, rundir))
    if denv.is_main:
        out.append(ConsoleLogger(run.steps, start_step, log.progress))
    return out


def start_metrics(
    log: LogSection, steps: int, denv, labels: dict[str, str], info: dict[str, str] | None = None, start_step: int = 0
):
    """This rank's Prometheus exporter on log.metrics_port + local rank; when that port is taken (another run on
    the same node), on a free port instead, so runs never clash: the endpoint is published (file_sd), not guessed."""

    kw = {"info": info, "planned_steps": steps, "start_step": start_step}
    if not log.metrics_port or "prometheus" not in log.loggers:
        return Metrics(labels, port=0, **kw)
    addr = log.metrics_addr
    m = Metrics(labels, port=log.metrics_port + denv.local_rank, addr=addr, **kw)
    if m.server is None:
        m.close()
        m = Metrics(labels, port=free_port(host=""), addr=addr, **kw)
    return m


class FileSD:
    """A Prometheus file_sd target for this rank's exporter: `<log.file_sd>/<run>-rank<r>-<run_id>.json`, written
    when the exporter starts and removed when the run ends. Point a scrape config's `file_sd_configs` at
    `<dir>/*.json`. Its target labels `ditscale_run_id`, `ditscale_run` and `ditscale_rank` land on the target's
    `up` series too, so a target that is down still says which run it served; two runs of one name in one folder
    get two files (the launchers drop a run's leftovers with the glob `<run>-rank*.json`)."""

    def __init__(self, directory: str, metrics, labels: dict[str, str]):
        import os
        import socket

        self.url = None
        if not directory or metrics.server is None:
            return
        addr = metrics.addr
        host = os.environ.get("DITSCALE_METRICS_HOST") or (
            socket.gethostname() if addr in ("", "0.0.0.0", "::") else addr
        )
        target = {
            "targets": [f"{host}:{metrics.port}"],
            "labels": {
                "ditscale_run_id": labels["run_id"],
                "ditscale_run": labels["run"],
                "ditscale_rank": labels["rank"],
            },
        }
        self.url = storage.join(directory, f"{labels['run']}-rank{labels['rank']}-{labels['run_id']}.json")
        storage.write_text(self.url, json.dumps([target], indent=1) + "\n")

    def close(self) -> None:
        if self.url:
            storage.remove(self.url)
            self.url = None


class TrainLog:
    """The logging window of the trainer: accumulates on the device, reads back on log steps only."""

    def __init__(
        self,
        log: LogSection,
        run: RunValues,
        denv,
        rundir,
        device: torch.device,
        labels: dict[str, str],
        start_step: int,
        info: dict[str, str] | None = None,
        tokens: dict | None = None,
    ):
        self.every, self.steps_planned, self.global_batch = log.every, run.steps, run.global_batch
        self.denv, self.device = denv, device
        self.tokens = tokens or {}  # written into every record (the lease generation that wrote it)
        self.metrics = start_metrics(log, run.steps, denv, labels, info, start_step)
        self.file_sd = FileSD(log.file_sd, self.metrics, labels)
        self.loggers: list[Logger] = make_loggers(log, run, rundir, denv, self.metrics, start_step)
        self.per_rank_samples = run.global_batch // max(denv.world_size, 1)
        self.last: dict | None = None
        self._reset()

    def _reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)  # sum of step losses of the window, on the device
        self.steps, self.losses, self.time, self.wait = 0, 0, 0.0, 0.0

    def should_log(self, step: int) -> bool:
        return step % self.every == 0 or step >= self.steps_planned

    def after_step(self, step: int, step_loss: torch.Tensor, seconds: float, wait: float, lr: float, engine, loader):
        m = self.metrics
        m.step.set(step)
        m.samples.inc(self.per_rank_samples)
        m.step_time.observe(seconds)
        m.data_wait.inc(wait)
        if step_loss is not None:  # None: a step skipped for a non-finite loss (train.nonfinite=skip)
            self.loss += step_loss  # no .item(): a GPU keeps running ahead
            self.losses += 1
        self.steps += 1
        self.time += seconds
        self.wait += wait
        self.lr = lr
        if self.should_log(step):
            self.flush(step, engine, loader)

    def flush(self, step: int, engine, loader) -> dict | None:
        """Write the window's record (collective: the loss is averaged over ranks). Host sync happens here."""
        import torch.distributed as dist

        if self.steps == 0:
            return None
        loss = self.loss.detach().float().clone()
        if self.denv.world_size > 1:
            dist.all_reduce(loss)
        gn = engine.get_global_grad_norm()
        n = self.steps
        rec = {
            "step": step,
            "loss": loss.item() / self.denv.world_size / self.losses if self.losses else None,
            "images_per_second": n * self.global_batch / max(self.time, 1e-9),
            "step_time": self.time / n,
            "data_wait_share": self.wait / max(self.time, 1e-9),
            "lr": self.lr,
            "grad_norm": None if gn is None else float(gn),
            "samples": int(getattr(loader, "samples", step * self.global_batch)),
            "skipped": int(getattr(loader, "skipped", 0)),
            "skipped_steps": n - self.losses,
            "time": time.time(),
            **self.tokens,
        }
        for lg in self.loggers:
            lg.log(step, rec)
        self.last = rec
        self._reset()
        return rec

    def image(self, step: int, tag: str, path: Path) -> None:
        for lg in self.loggers:
            lg.image(step, tag, path)

    def sync(self) -> None:
        """Make what was logged durable in the run dir (called with each checkpoint)."""
        for lg in self.loggers:
            lg.sync()

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()
        self.file_sd.close()
        self.metrics.close()
