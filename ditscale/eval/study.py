"""`python -m ditscale eval study --out DIR`: the small-scale study of docs/results.md, end to end, on CPU.

On the 1,797 sklearn digits at 8x8 (1,500 train / 297 test; nothing downloaded), with a pixel-space DiT-T/1
(patch 1, 64 tokens, hidden 96, depth 4):
1. memorisation vs generalisation: global attention on N=10 and on larger N (two disjoint subsets of each size for
   the two-model test, plus the full 1,500 training images for the PSNR gap);
2. local windows vs global attention at an intermediate N, over several data shuffles.
Runs are trained one after another as single processes (`python -m ditscale train`, ZeRO stage 0), then each is
evaluated (psnr-gap, locality, jacobian, fid with pixel features; pair for the disjoint pairs) and
`ditscale report` lays the grid out. Finished runs and evaluations are reused, so the command can be rerun.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ditscale.data import build_shards, make_subset
from ditscale.eval import evaluate as evaluations
from ditscale.eval import report
from ditscale.io import storage
from ditscale.io.rundir import RunDir

log = logging.getLogger("ditscale.eval.study")


@dataclass
class StudyOptions:
    """The study's settings (the command line: python -m ditscale eval study --help)."""

    out: str = "runs/study"  # data, runs and the report
    steps: int = 1000  # training steps per run
    small_steps: int = 0  # training steps of the two N=small runs (0: steps)
    batch: int = 32
    lr: float = 1e-3
    variant: str = "DiT-T/1"
    small: int = 10  # the memorising training-set size
    large: int = 750  # size of each disjoint subset of the generalising pair
    mid: int = 100  # the intermediate N of the window comparison
    local: str = "3x2@head"  # window spec of the local model
    shuffles: int = 1  # data shuffles per configuration at mid
    full: bool = True  # also train on all 1,500 training images
    k: int = 150  # images per split for the PSNR gap
    points: int = 25  # timesteps for the PSNR gap
    samples: int = 100  # samples for the pair test and pixel FID
    sample_steps: int = 25  # DDIM steps for the pair test and FID samples
    threads: int = 1
    ema_decay: float = 0.999
    ema: bool = False  # evaluate the EMA weights (default: the raw weights)
    only: str | None = None  # comma-separated run ids: train (and evaluate) only these
    train_only: bool = False
    dry_run: bool = False


def _config(args, name: str, run_dir: Path, train: str, test: str, windows: str, seed: int, steps: int = 0) -> dict:
    steps = steps or args.steps
    return {
        "run": {"name": name, "seed": seed, "dir": str(run_dir)},
        "model": {
            "variant": args.variant,
            "windows": windows,
            "input_size": 8,
            "in_channels": 1,
            "num_classes": 10,
            "learn_sigma": True,
        },
        "diffusion": {"loss": "hybrid", "num_timesteps": 1000, "sample_steps": 50},
        "data": {"train": train, "test": test, "flip": False, "shuffle_buffer": 100},
        "optim": {"lr": args.lr, "warmup_steps": 50},
        "train": {
            "steps": steps,
            "global_batch": args.batch,
            "micro_batch": args.batch,
            "zero_stage": 0,
            "precision": "fp32",
            "ema_decay": args.ema_decay,
        },
        "checkpoint": {"every": steps, "keep": 1},
        "log": {"every": 100, "sample_every": 0, "metrics_port": 0, "progress": False},
    }


def plan(args) -> tuple[list[dict], list[tuple[str, str]], dict]:
    """(runs, pairs, data): the runs to train, the (A, B) run ids for the two-model test, the subsets to build."""
    out = Path(args.out)
    data = out / "data"
    full = str(data / "digits8" / "manifest.json")
    test = str(data / "digits8" / "test" / "manifest.json")
    subsets = {}  # url -> (size, seed, pair)
    runs, pairs = [], []

    def add(rid, train, windows, seed, steps=0):
        runs.append(
            {
                "id": rid,
                "dir": str(out / "runs" / rid),
                "config": _config(args, rid, out / "runs" / rid, train, test, windows, seed, steps),
            }
        )

    for n in (args.small, args.large):
        base = data / f"pair-n{n}"
        subsets[str(base)] = (n, 0, True)
        steps = (args.small_steps or args.steps) if n == args.small else args.steps
        add(f"global-n{n}-a", str(base / "s1" / "manifest.json"), "global", 0, steps)
        add(f"global-n{n}-b", str(base / "s2" / "manifest.json"), "global", 0, steps)
        pairs.append((f"global-n{n}-a", f"global-n{n}-b"))
    if args.full:
        add("global-n1500", full, "global", 0)
    for s in range(args.shuffles):
        base = data / f"n{args.mid}-s{s}"
        subsets[str(base)] = (args.mid, s, False)
        for windows in ("global", args.local):
            tag = "global" if windows == "global" else "local"
            add(f"{tag}-n{args.mid}-s{s}", str(base / "manifest.json"), windows, s)
    return runs, pairs, {"root": str(data / "digits8"), "subsets": subsets, "full": full}


def _build_data(d: dict, runs: list[dict]) -> None:
    if not Path(d["full"]).is_file():
        build_shards("digits", None, d["root"], resolution=8, channels=1, progress=False)
    needed = {r["config"]["data"]["train"] for r in runs}
    for url, (n, seed, pair) in d["subsets"].items():
        marker = Path(url) / ("s1" if pair else "") / "manifest.json"
        if not any(x.startswith(url + "/") for x in needed):
            continue
        if not marker.is_file():
            make_subset(d["full"], n, url, seed=seed, pair=pair)


def _train(run: dict, threads: int) -> float:
    d = Path(run["dir"])
    if RunDir(run["dir"]).is_done(run["config"]["train"]["steps"]):
        return 0.0
    d.mkdir(parents=True, exist_ok=True)
    cfg_file = d.parent / f"{run['id']}.yaml"
    storage.write_text(str(cfg_file), yaml.safe_dump(run["config"], sort_keys=False))
    env = {"OMP_NUM_THREADS": str(threads)}
    import os

    t0 = time.perf_counter()
    with open(d.parent / f"{run['id']}.log", "w") as logf:
        rc = subprocess.call(
            [sys.executable, "-m", "ditscale", "train", "--config", str(cfg_file)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    if rc != 0:
        raise RuntimeError(f"training {run['id']} failed (rc {rc}); see {d.parent / (run['id'] + '.log')}")
    return time.perf_counter() - t0


def run_study(args: StudyOptions) -> int:
    import torch

    torch.set_num_threads(args.threads)
    runs, pairs, data = plan(args)
    if args.dry_run:
        for r in runs:
            print(r["id"], r["config"]["data"]["train"], r["config"]["model"]["windows"])
        print("pairs:", pairs)
        return 0
    out = Path(args.out)
    all_runs = runs
    if args.only:
        keep = set(args.only.split(","))
        runs = [r for r in runs if r["id"] in keep]
        pairs = [p for p in pairs if set(p) <= keep]
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file() else {}
    _build_data(data, runs)
    for r in runs:
        took = _train(r, args.threads)
        if took:
            timings[r["id"]] = {"train_s": round(took, 1)}
            storage.write_text(str(out / "timings.json"), json.dumps(timings, indent=2))
        log.info("trained %s in %.0fs", r["id"], took)
    if args.train_only:
        return 0

    ema = args.ema
    for r in runs:
        ev, run = Path(r["dir"]) / "eval", r["dir"]
        t0 = time.perf_counter()
        todo = {
            "psnr_gap": lambda run=run: evaluations.psnr_gap(run, k=args.k, points=args.points, ema=ema),
            "locality": lambda run=run: evaluations.locality(run, images=64, ema=ema),
            "jacobian": lambda run=run: evaluations.jacobian(run, sigma=0.3, ema=ema),
            "fid_pixels": lambda run=run: evaluations.fid(
                run,
                features="pixels",
                samples=args.samples,
                steps=args.sample_steps,
                ref=data["full"],
                cache=str(out / "cache"),
                ema=ema,
            ),
        }
        for name, evaluate in todo.items():
            if not (ev / f"{name}.json").is_file():
                evaluate()
        timings.setdefault(r["id"], {})["eval_s"] = round(time.perf_counter() - t0, 1)
    for a, b in pairs:
        da, db = (next(r["dir"] for r in all_runs if r["id"] == x) for x in (a, b))
        if not (Path(da) / "eval" / "pair.json").is_file():
            evaluations.pair((da, db), samples=args.samples, steps=args.sample_steps, ema=ema)

    found, _ = report.discover(str(out / "runs"))
    report.build_report(found, str(out / "report"), "Small-scale study: digits 8x8, " + args.variant)
    storage.write_text(str(out / "timings.json"), json.dumps(timings, indent=2))
    print(f"wrote {out / 'report' / 'report.md'}")
    return 0
