"""`python -m ditscale bench launch`: how long --dry-run and --status of a large grid take (issue #22 item 5).

Writes a grid of N runs (DiT-T/2, one axis of seeds) whose run dirs live under --root (a local folder or s3://...,
e.g. the loopback S3 server), fills them like a grid in mid-flight (a third finished: config, history, metrics,
a checkpoint, final.json and an ended claim; a third resumable: the same without final.json; a third never
started; a launch record in the log dir as the launch that started them writes it), then times, each --repeat
times (the best is reported, with the median):
- dry-run: the launcher's whole --dry-run (expand and validate the grid, read the run dirs and claims, print the
  plan: launchers/local_grid.py --dry-run in-process);
- status: the launcher's --status (the same reads judged against the launched steps, rows, the summary).
Figures go to docs/benchmarks.md with the CPU (lscpu) and the load average.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ditscale.io import storage
from ditscale.launch import records

GRID = """
name: {name}
config:
  model: {{variant: DiT-T/2, input_size: 8, in_channels: 1, num_classes: 10, windows: global}}
  data: {{train: "{data}/manifest.json"}}
  train: {{steps: 60, global_batch: 8, micro_batch: 4}}
  log: {{every: 10, sample_every: 0, metrics_port: 0, progress: false}}
run_dir: "{root}/{{id}}"
resources: {{nodes: 1, gpus_per_node: 0, tasks_per_node: 1, cpus_per_task: 1}}
axes:
  seed: {{key: run.seed, values: {values}, prefix: s}}
"""


def _fill(run_dir: str, i: int) -> None:
    """A run in mid-flight: done (i % 3 == 0), resumable (1), never started (2)."""
    kind = i % 3
    if kind == 2:
        return
    now = time.time()
    step = 60 if kind == 0 else 30
    files = {
        "config.yaml": "run: {name: x}\n",
        "config_history.jsonl": json.dumps({"event": "created", "step": 0, "world_size": 1, "zero_stage": 0}) + "\n",
        "metrics.jsonl": "".join(
            json.dumps({"step": s, "loss": 1.0 / s, "time": now - 60 + s, "step_time": 0.1}) + "\n"
            for s in range(10, step + 1, 10)
        ),
        f"checkpoints/step_{step:08d}/meta.json": "{}",
        f"checkpoints/step_{step:08d}/model.safetensors": "x" * 64,
    }
    if kind == 0:
        files["final.json"] = json.dumps({"finished": True, "step": 60, "loss": 0.02, "world_size": 1})
    for rel, text in files.items():
        storage.write_text(storage.join(run_dir, rel), text)
    claim = {"backend": "local", "run": run_dir, "steps": 60, "ended": now, "host": "elsewhere", "pid": 1}
    storage.write_text(f"{run_dir}.claim-000001.ended.json", json.dumps(claim))  # its launcher saw it end


def _time(fn, repeat: int) -> tuple[float, float, float]:
    """(best wall time, median wall time, CPU time of this process in the best round): on a loaded 2-core
    machine the wall clock mostly measures waiting; the CPU time says what the work costs."""
    times = []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(io.StringIO()):
            fn()
        times.append((time.perf_counter() - t, time.process_time() - c))
    best = min(times)
    return best[0], statistics.median(t for t, _ in times), best[1]


def run(args) -> int:
    main = args.launcher_main  # the launcher command's entry point (ditscale.cli.launch.main), as users run it
    root = args.root.rstrip("/")
    work = Path(tempfile.mkdtemp(prefix="ditscale-bench-launch-"))
    data = work / "data"
    from ditscale.data import build_shards  # lazy: torch at import

    with contextlib.redirect_stdout(io.StringIO()):
        build_shards("digits", None, str(data), resolution=8, channels=1, progress=False, limit=64)
    grid = work / "big.yaml"
    grid.write_text(GRID.format(name=f"bench{args.runs}", data=data, root=root, values=list(range(args.runs))))
    storage.makedirs(root)
    if not args.no_fill:
        t = time.perf_counter()
        dirs = [f"{root}/bench{args.runs}-s{i}" for i in range(args.runs)]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda a: _fill(*a), zip(dirs, range(args.runs), strict=True)))
        print(f"filled {args.runs} run dirs under {root} in {time.perf_counter() - t:.1f} s")

    ids = [f"bench{args.runs}-s{i}" for i in range(args.runs) if i % 3 != 2]  # the launch that started them
    records.write_launch(work / "log", {"backend": "local", "grid": str(grid), "runs": dict.fromkeys(ids),
                                        "steps": dict.fromkeys(ids, 60)})  # fmt: skip
    common = ["--grid", str(grid), "--log-dir", str(work / "log")]
    rows = {}
    for what, argv in (("dry-run", [*common, "--dry-run"]), ("status", [*common, "--status"])):
        if args.only and what != args.only:
            continue
        best, med, cpu = _time(lambda a=argv: main("local", a), args.repeat)
        rows[what] = (best, med, cpu)
        print(f"{what:<8} {args.runs} runs under {root}: best {best:.2f} s (CPU {cpu:.2f} s), median {med:.2f} s "
              f"({args.repeat} runs)")  # fmt: skip
    load = os.getloadavg()[0]
    print(f"load average (1 min) {load:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": args.runs, "root": root, "load": load, **rows}, indent=1))
    return 0
