"""`python -m ditscale checkpoint {verify,convert} RUN_DIR`: look after a run's checkpoints.

verify   every checkpoint of the run: its step, what wrote it, and whether every file matches the size and
         checksum meta.json records (exit 0 when the newest is intact, 1 when only older ones are, 2 when none)
convert  rewrite the newest checkpoint of an older ditscale (DeepSpeed's per-rank files) as format 2, which
         resumes on any world size and ZeRO stage. It starts the world size that wrote it on this machine (CPU
         processes, gloo) and needs the run's data.train manifest to be readable.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from ditscale.errors import DitscaleError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("verify", help="check every checkpoint's files against meta.json")
    p.add_argument("run", help="run directory (local or s3://)")
    p = sub.add_parser("convert", help="rewrite an older ditscale's checkpoint as format 2 (resumes anywhere)")
    p.add_argument("run", help="run directory (local or s3://)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def _verify(run: str) -> int:
    # lazy: torch at start-up
    from ditscale.io.rundir import RunDir
    from ditscale.train.checkpoint import Checkpoint

    rundir = RunDir(run)
    tags = rundir.complete_tags()
    if not tags:
        print(f"{run}: no checkpoint")
        return 2
    intact = []
    for tag in tags:
        try:
            ck = Checkpoint.read(rundir, tag)
            ck.verify()
            m = ck.meta
            how = f"{m.get('world_size')} processes, ZeRO-{m.get('zero_stage')}"
            fmt = "older layout (convert to resume elsewhere)" if ck.legacy else f"{len(m.get('files', {}))} files"
            print(f"{tag}  intact   {how}, {fmt}")
            intact.append(tag)
        except DitscaleError as e:
            print(f"{tag}  DAMAGED  {e}")
    if not intact:
        return 2
    return 0 if intact[-1] == tags[-1] else 1


def _convert(run: str) -> int:
    # lazy: torch at start-up
    from ditscale.io.rundir import RunDir
    from ditscale.train.checkpoint import newest_intact

    ck, _ = newest_intact(RunDir(run))
    if ck is None:
        print(f"error: {run}: no intact checkpoint to convert", file=sys.stderr)
        return 2
    if not ck.legacy:
        print(f"{ck.where} is already format 2: nothing to do")
        return 0
    world = int(ck.meta.get("world_size") or 1)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    cmd = [*launcher, "-m", "ditscale", "checkpoint", "convert", "--worker", run]
    print(f"converting {ck.where} on {world} local processes (the world size that wrote it)")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, env=env)


def _worker(run: str) -> int:
    # lazy: torch at start-up
    from ditscale.config import config_from_dict
    from ditscale.io.rundir import RunDir
    from ditscale.train.checkpoint import newest_intact
    from ditscale.train.trainer import run_conversion

    ck, _ = newest_intact(RunDir(run))
    tree = ck.meta["config"]
    tree["run"]["dir"] = run
    tree["log"].update(metrics_port=0, sample_every=0, loggers=[], progress=False)
    tag = run_conversion(config_from_dict(tree, origin=f"{ck.where}/meta.json"))
    print(f"converted {run}/checkpoints/{tag} to format 2")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "verify":
        return _verify(args.run)
    return _worker(args.run) if args.worker else _convert(args.run)
