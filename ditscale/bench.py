"""`python -m ditscale bench {attention,data,train,storage,gpu}`: benchmarks whose figures go to docs/benchmarks.md.

Each benchmark lives beside the code it measures and exposes `add_arguments(parser)` and `run(args)`.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "attention": ("ditscale.model.bench", "attention backends and whole-model time, windowed vs global"),
    "data": ("ditscale.data.bench", "shard decoding samples/s (local disk and S3) vs a one-file-per-image loader"),
    "train": ("ditscale.train.bench", "training images/s, step time, data-wait share; DeepSpeed vs plain loop"),
    "storage": ("ditscale.io.bench", "the trainer's start-up check that every shard exists (listing vs HEADs)"),
    "gpu": ("ditscale.bench_gpu", "every GPU check in one command: attention, DiT-XL/2 MFU, compile, the trainer"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module, help_) in BENCHES.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_bench_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ImportError:  # a benchmark whose module is not importable shows up without its options
            pass


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._bench_module).run(args) or 0)
