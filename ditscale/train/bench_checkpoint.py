"""`python -m ditscale bench checkpoint`: what verified, elastic checkpoints cost.

* hash: the checkpoint of a model of N parameters (default DiT-XL/2's 675,129,632) written the way the trainer
  writes it (fp32 master weights and both AdamW moments, then the EMA, as safetensors files of at most 1 GiB,
  fsync'ed), timed with and without the XXH3-128 checksum meta.json records; sha256 and blake2b timed on the same
  bytes, for the choice. The tensors are made one file at a time, so any size fits in memory.
* resume: real trainers on this machine (gloo, CPU) save a checkpoint of `--variant`, then resume it on the same
  world size and stage, on another world size and at another ZeRO stage; each resume's time is the trainer's own
  log line ("resumed from ... in X s").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import xxhash
from safetensors.torch import save as save_safetensors

from ditscale.data import build_shards
from ditscale.train.checkpoint import FILE_BYTES

DIT_XL2_PARAMS = 675_129_632


def _chunks(params: int):
    """Tensor dicts of at most FILE_BYTES each that add up to a checkpoint of `params` parameters: 3 train-state
    tensors per parameter (param, exp_avg, exp_avg_sq) and the EMA copy, all fp32."""
    per_file = FILE_BYTES // 4
    left = 4 * params
    g = torch.Generator().manual_seed(0)
    i = 0
    while left > 0:
        n = min(per_file, left)
        yield {f"t{i}": torch.randn(n, generator=g)}
        left -= n
        i += 1


def bench_hash(params: int, where: Path) -> dict:
    write_s = hash_s = sha_s = blake_s = 0.0
    total = 0
    first = True
    for i, tensors in enumerate(_chunks(params)):
        t0 = time.perf_counter()
        data = save_safetensors(tensors)
        with open(where / f"f{i}.safetensors", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        t1 = time.perf_counter()
        xxhash.xxh3_128_hexdigest(data)
        t2 = time.perf_counter()
        write_s += t1 - t0
        hash_s += t2 - t1
        total += len(data)
        if first:  # the alternatives, on the first file only (their cost scales the same way)
            t3 = time.perf_counter()
            hashlib.sha256(data).hexdigest()
            t4 = time.perf_counter()
            hashlib.blake2b(data).hexdigest()
            t5 = time.perf_counter()
            sha_s, blake_s, first_bytes = t4 - t3, t5 - t4, len(data)
            first = False
        (where / f"f{i}.safetensors").unlink()
    scale = total / first_bytes
    return {
        "params": params,
        "bytes": total,
        "write_s": write_s,
        "xxh3_s": hash_s,
        "xxh3_share": hash_s / (write_s + hash_s),
        "xxh3_gb_s": total / hash_s / 1e9,
        "sha256_share_est": sha_s * scale / (write_s + sha_s * scale),
        "blake2b_share_est": blake_s * scale / (write_s + blake_s * scale),
    }


def _train(cfg: Path, run: Path, nproc: int, *overrides: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    else:
        cmd = [sys.executable]
    cmd += ["-m", "ditscale", "train", "--config", str(cfg), "--run-dir", str(run), *overrides]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
    return p.stdout + p.stderr


def bench_resume(variant: str, where: Path, repeat: int) -> dict:
    data = where / "digits32"
    build_shards("digits", None, str(data), resolution=32, channels=3, progress=False)
    cfg = where / "c.yaml"
    tree = {
        "model": {"variant": variant, "input_size": 32, "in_channels": 3, "num_classes": 10},
        "data": {"train": str(data / "manifest.json"), "shuffle_buffer": 64},
        "train": {"steps": 1, "global_batch": 2, "micro_batch": 1, "zero_stage": 2},
        "checkpoint": {"every": 1, "keep": 1},
        "log": {"every": 1, "sample_every": 0, "metrics_port": 0, "progress": False},
    }
    cfg.write_text(json.dumps(tree))
    base = where / "base"
    _train(cfg, base, 1)
    cases = {
        "same (1 process, ZeRO-2)": (1, 2),
        "other world size (2 processes)": (2, 2),
        "other stage (ZeRO-3)": (1, 3),
    }
    out: dict = {"variant": variant}
    rx = re.compile(r"resumed from .* in ([0-9.]+) s: found and verified in ([0-9.]+) s, loaded in ([0-9.]+) s")
    for name, (nproc, stage) in cases.items():
        times = []
        for _ in range(repeat):
            run = where / "resume"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(base, run)
            (run / "final.json").unlink()
            log = _train(cfg, run, nproc, "train.steps=2", f"train.zero_stage={stage}")
            m = rx.search(log)
            if m is None:
                raise RuntimeError(f"no resume line in the trainer's log:\n{log[-3000:]}")
            times.append([float(v) for v in m.groups()])
        out[name] = {k: statistics.median(t[i] for t in times) for i, k in enumerate(("total_s", "verify_s", "load_s"))}
    return out


def run(args) -> int:
    where = Path(args.dir or tempfile.mkdtemp(prefix="ditscale-bench-ckpt-"))
    where.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    try:
        if "hash" in args.parts:
            res["hash"] = h = bench_hash(args.params, where)
            print(f"bench checkpoint hash: {h['params']:,} parameters -> {h['bytes'] / 1e9:.2f} GB of safetensors")
            xxh = f"XXH3-128 {h['xxh3_s']:.2f} s ({h['xxh3_gb_s']:.1f} GB/s)"
            print(f"  write + fsync {h['write_s']:.1f} s, {xxh}: {100 * h['xxh3_share']:.1f}% of the save")
            print(f"  sha256 would be {100 * h['sha256_share_est']:.1f}%, blake2b {100 * h['blake2b_share_est']:.1f}%")
        if "resume" in args.parts:
            res["resume"] = r = bench_resume(args.variant, where, args.repeat)
            print(f"bench checkpoint resume: {r['variant']} (median of {args.repeat})")
            for name, t in r.items():
                if isinstance(t, dict):
                    parts = f"verify {t['verify_s']:.2f} s, load {t['load_s']:.2f} s"
                    print(f"  {name:32s} {t['total_s']:6.2f} s  ({parts})")
    finally:
        if not args.dir:
            shutil.rmtree(where, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0
