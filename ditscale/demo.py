"""The README demo: `python -m ditscale.demo`.

Builds shards of the embedded sklearn digits (data/digits8, nothing downloaded) if they are missing, trains the
small local-window DiT of configs/demo.yaml with 2 processes under torchrun (DeepSpeed ZeRO-2, CPU), then judges
its samples: a logistic regression trained on the real digits (its held-out accuracy is printed) classifies 10
class-conditional samples of each digit, and the demo prints the share classified as the digit they were drawn
for. Last, where the checkpoint, the sample grids and the metrics log are. Extra `key=value` arguments override
the config.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from ditscale.cache import project_cache

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ditscale.demo", description=__doc__.split("\n\n")[1])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--data", default="data/digits8", help="where the digits shards are (built if missing)")
    p.add_argument("--run-dir", help="default: runs/demo-<date>-<time>")
    p.add_argument("--nproc", type=int, default=2, help="processes (torchrun --nproc_per_node)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(project_cache() / "torch_extensions"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(project_cache() / "inductor"))
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")

    manifest = Path(args.data) / "manifest.json"
    if not manifest.is_file():
        print(f"[demo] building digits shards in {args.data} (1,797 sklearn digits, 8x8, grey)", flush=True)
        from ditscale.data import build_shards  # lazy: torch at start-up

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
        f"data.test={Path(args.data) / 'test' / 'manifest.json'}",
        *args.overrides,
    ]
    print("[demo] " + " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd)
    if rc != 0:
        print(f"[demo] training failed (exit code {rc})", file=sys.stderr)
        return rc
    seconds = time.time() - t0
    judged = judge(run_dir, Path(args.data))
    print_summary(run_dir, seconds, judged)
    return 0


def judge(run_dir: Path, data: Path) -> dict | None:
    """Are the samples recognisable? (ditscale.eval.recognise; needs scikit-learn, which the demo data needs too)"""
    from ditscale.eval.recognise import judge_run  # lazy: torch at start-up

    print(
        "[demo] judging 100 class-conditional samples with a logistic regression trained on the real digits", flush=True
    )
    return judge_run(
        str(run_dir),
        str(data / "manifest.json"),
        str(data / "test" / "manifest.json"),
        grid=str(run_dir / "samples" / "judged.png"),
    )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def print_summary(run_dir: Path, seconds: float, judged: dict | None = None) -> None:
    from ditscale.io.rundir import RunDir  # lazy: fsspec at start-up

    rd = RunDir(str(run_dir))
    final = rd.final() or {}
    tag = rd.latest_tag() or "?"
    grids = sorted(p for p in (run_dir / "samples").glob("step_*.png"))
    print()
    print(
        f"[demo] done in {seconds:.0f} s: step {final.get('step')}, loss {final.get('loss', float('nan')):.4f}, "
        f"{final.get('images_per_second', 0):.0f} images/s"
    )
    if judged:
        print(
            f"[demo] recognisable samples: {judged['accuracy']:.0%} of {judged['samples']} class-conditional samples "
            f"({judged['sampler']}) are classified as the digit they were drawn for, by a logistic regression with "
            f"{judged['judge_test_accuracy']:.1%} accuracy on the 297 held-out real digits"
        )
    print(f"  run directory : {run_dir}")
    print(f"  checkpoint    : {run_dir / 'checkpoints' / tag}")
    print(f"  sample grid   : {grids[-1] if grids else '(none)'}")
    if judged and judged.get("grid"):
        print(f"  judged samples: {judged['grid']} (row d: ten samples drawn for digit d)")
    print(f"  metrics log   : {run_dir / 'metrics.jsonl'}")
    print(f"  config        : {run_dir / 'config.yaml'}")
    print("  next          : python -m ditscale export --run", run_dir, "--out", run_dir / "ema.pt")
    print("                  python -m ditscale sample --run", run_dir, "--out", run_dir / "grid.png")
    print("                  python -m ditscale eval psnr-gap --run", run_dir, "--k 297 --points 25")


if __name__ == "__main__":
    sys.exit(main())
