"""The README demo: `python -m ditscale.demo`.

Builds shards of the embedded sklearn digits (data/digits8, nothing downloaded) if they are missing, trains the
small local-window DiT of configs/demo.yaml with 2 processes under torchrun (DeepSpeed ZeRO-2, CPU), then prints
where the checkpoint, the sample grid and the metrics log are. Extra `key=value` arguments override the config.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ditscale.demo", description=__doc__.split("\n\n")[1])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--data", default="data/digits8", help="where the digits shards are (built if missing)")
    p.add_argument("--run-dir", help="default: runs/demo-<date>-<time>")
    p.add_argument("--nproc", type=int, default=2, help="processes (torchrun --nproc_per_node)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)

    from ditscale.cache import project_cache

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(project_cache() / "torch_extensions"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(project_cache() / "inductor"))
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")

    manifest = Path(args.data) / "manifest.json"
    if not manifest.is_file():
        print(f"[demo] building digits shards in {args.data} (1,797 sklearn digits, 8x8, grey)", flush=True)
        from ditscale.data import build_shards

        build_shards("digits", None, args.data, resolution=8, channels=1, progress=False)
    run_dir = Path(args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if not (Path(os.environ["TORCH_EXTENSIONS_DIR"])).exists():
        print("[demo] first run: DeepSpeed compiles its CPU communication op once (~1 minute)", flush=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(args.nproc),
        "-m",
        "ditscale",
        "train",
        "--config",
        args.config,
        "--run-dir",
        str(run_dir),
        f"data.train={manifest}",
        *args.overrides,
    ]
    print("[demo] " + " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd)
    if rc != 0:
        print(f"[demo] training failed (exit code {rc})", file=sys.stderr)
        return rc
    print_summary(run_dir, time.time() - t0)
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def print_summary(run_dir: Path, seconds: float) -> None:
    from ditscale.io.rundir import RunDir

    rd = RunDir(str(run_dir))
    final = rd.final() or {}
    tag = rd.latest_tag() or "?"
    grids = sorted((run_dir / "samples").glob("*.png"))
    print()
    print(
        f"[demo] done in {seconds:.0f} s: step {final.get('step')}, loss {final.get('loss', float('nan')):.4f}, "
        f"{final.get('images_per_second', 0):.0f} images/s"
    )
    print(f"  run directory : {run_dir}")
    print(f"  checkpoint    : {run_dir / 'checkpoints' / tag}")
    print(f"  sample grid   : {grids[-1] if grids else '(none)'}")
    print(f"  metrics log   : {run_dir / 'metrics.jsonl'}")
    print(f"  config        : {run_dir / 'config.yaml'}")
    print("  next          : python -m ditscale export --run", run_dir, "--out", run_dir / "ema.pt")
    print("                  python -m ditscale sample --run", run_dir, "--out", run_dir / "grid.png")


if __name__ == "__main__":
    sys.exit(main())
