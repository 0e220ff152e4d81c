"""`python -m ditscale bench {attention,data,train,storage,gpu,checkpoint,launch}`: the benchmarks' command lines.

Each benchmark's measuring code lives beside what it measures (ditscale.model.bench, ditscale.data.bench,
ditscale.train.bench, ditscale.io.bench, ditscale.bench_gpu) and exposes `run(args)`; this module only parses.
Figures go to docs/benchmarks.md with the machine and its load.
"""

from __future__ import annotations

import argparse
import importlib
import os

BENCHES = {
    "attention": ("ditscale.model.bench", "attention backends and whole-model time, windowed vs global"),
    "data": ("ditscale.data.bench", "shard decoding samples/s (local disk and S3) vs a one-file-per-image loader"),
    "train": ("ditscale.train.bench", "training images/s, step time, data-wait share; DeepSpeed vs plain loop"),
    "storage": ("ditscale.io.bench", "the trainer's start-up check that every shard exists (listing vs HEADs)"),
    "checkpoint": ("ditscale.train.bench_checkpoint", "checksum cost of a save; resume on another world size/stage"),
    "gpu": ("ditscale.bench_gpu", "every GPU check in one command: attention, DiT-XL/2 MFU, compile, the trainer"),
    "launch": ("ditscale.launch.bench", "--dry-run and --status of a large grid, run dirs on disk or S3"),
}


def _attention_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096], help="square token grids (N)")
    parser.add_argument("--windows", type=int, nargs="+", default=[3, 5, 7, 13], help="window sizes k (odd)")
    parser.add_argument("--repeat", type=int, default=7, help="timed rounds (median reported); 4096 uses fewer")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=63, help="63 = DiT-XS (hidden 252, 4 heads)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: perf_counter; cpu: process CPU time (with --threads 1, robust to other load on a shared machine)",
    )
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model comparison")
    parser.add_argument("--no-attention", action="store_true", help="skip the attention table")
    parser.add_argument("--model-repeat", type=int, default=7)
    parser.add_argument(
        "--retune", action="store_true", help="measure the halo tile choices again (replacing the on-disk cache)"
    )


def _data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=2000, help="images at 32x32 (256x256 uses a tenth)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (figures are divided by max(1, W))")
    p.add_argument("--resolutions", default="32,256")
    p.add_argument("--no-s3", action="store_true", help="skip the loopback S3 rows")
    p.add_argument("--dir", default=None, help="work folder (default: a temp folder, removed afterwards)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; the best of each is kept")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and loop (default 5)")
    parser.add_argument("--rounds", type=int, default=8, help="alternating plain/DeepSpeed rounds (default 8)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each loop's first round")
    parser.add_argument("--synthetic", action="store_true", help="random batches instead of data.train (no loader)")
    parser.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s of the GPU for MFU (default: by name)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def _storage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="a directory URL to fill with test objects (s3://bucket/prefix)")
    parser.add_argument("--shards", type=int, default=10_000, help="number of shard objects (default 10000)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions (default 5)")
    parser.add_argument("--json", help="also write the figures to this JSON file")


def _gpu_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench-gpu", help="output folder (default: $OUT)")
    parser.add_argument("--only", default="abcde", help="sections to run, e.g. a,b or ace (default: all)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all sections together (480)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the default without CUDA)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--xl-batch", type=int, help="DiT-XL/2 batch for section c (128 with >= 100 GiB, else 64)")
    parser.add_argument("--xs-batch", type=int, default=128, help="DiT-XS/1 batch for section d (128)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU for MFU (default: by name)")


def _checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", nargs="+", choices=["hash", "resume"], default=["hash", "resume"])
    parser.add_argument("--params", type=int, default=675_129_632, help="model size for hash (default DiT-XL/2)")
    parser.add_argument("--variant", default="DiT-B/2", help="model for resume (the largest that fits the machine)")
    parser.add_argument("--repeat", type=int, default=3, help="resumes per case (median reported)")
    parser.add_argument("--dir", default=None, help="work folder (default: a temp folder, removed afterwards)")
    parser.add_argument("--json", help="also write the figures to this JSON file")


def _launch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=1000, help="runs in the grid (default 1000)")
    p.add_argument("--root", required=True, help="where the run dirs go: a folder or s3://bucket/prefix")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions of each (default 3)")
    p.add_argument("--only", choices=["dry-run", "status"], help="time only one of them")
    p.add_argument("--no-fill", action="store_true", help="the run dirs are there already (an earlier call)")
    p.add_argument("--json", help="also write the figures to this JSON file")


ARGUMENTS = {
    "attention": _attention_arguments,
    "data": _data_arguments,
    "train": _train_arguments,
    "storage": _storage_arguments,
    "gpu": _gpu_arguments,
    "checkpoint": _checkpoint_arguments,
    "launch": _launch_arguments,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module, help_) in BENCHES.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_bench_module=module)
        ARGUMENTS[name](p)


def run(args: argparse.Namespace) -> int:
    if args.bench == "launch":  # it times the launcher command itself: handed in, the library imports no command
        from ditscale.cli.launch import main  # lazy: pydantic and fsspec at start-up (ditscale.grid)

        args.launcher_main = main
    return int(importlib.import_module(args._bench_module).run(args) or 0)
