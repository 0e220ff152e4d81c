"""`python -m ditscale eval {psnr-gap,pair,locality,fid,jacobian,study} ...`: evaluate trained runs.

Each metric reads the run's checkpoint (EMA weights by default; local or s3://), writes
`{run}/eval/<metric>.json` and PNG figures beside it (what `ditscale report` and the launchers' --collect read).
The work is done by ditscale.eval.evaluate; this module only parses the command line.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import time

log = logging.getLogger("ditscale.eval")


def _common(p: argparse.ArgumentParser, run: bool = True) -> None:
    if run:
        p.add_argument("--run", required=True, help="run directory (local or s3://) with checkpoints/")
    p.add_argument(
        "--ema", action=argparse.BooleanOptionalAction, default=True, help="the EMA weights (--no-ema: the raw ones)"
    )
    p.add_argument(
        "--tag", default=None, help="checkpoint tag, e.g. step_00001000 (default: the newest complete checkpoint)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (and sample) draws")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: this rank's GPU if any, else CPU)")


def _data(p: argparse.ArgumentParser) -> None:
    """--train / --test: the same names, meaning the same thing, in every command that reads a run's images."""
    p.add_argument("--train", default=None, help="training shards manifest (default: the run's data.train)")
    p.add_argument(
        "--test",
        default=None,
        help="held-out shards manifest (default: the run's data.test; a run without one is refused, never "
        "silently measured on training images)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="metric", metavar="METRIC", required=True)

    p = sub.add_parser("psnr-gap", help="one-step denoising PSNR of train vs test images; the average gap")
    _common(p)
    p.add_argument("--k", type=int, default=300, help="images per split (K): the first K of each, in index order")
    p.add_argument("--points", type=int, default=50, help="evenly spaced timesteps the PSNR is measured at")
    _data(p)
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")

    p = sub.add_parser("pair", help="two-model test on disjoint subsets: same noise, DDIM eta=0")
    _common(p, run=False)
    p.add_argument("--runs", nargs=2, required=True, metavar=("A", "B"), help="two runs trained on disjoint subsets")
    p.add_argument("--samples", type=int, default=100, help="sample pairs drawn from the same noise")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--batch-size", type=int, default=100, help="samples per sampling batch")
    p.add_argument("--out", default=None, help="directory for pair.json/png (default: eval/ of both runs)")

    p = sub.add_parser("locality", help="per-block attention distance and k x k mass; attention-map figures")
    _common(p)
    p.add_argument("--images", type=int, default=32, help="images averaged over (the first, in index order)")
    p.add_argument("--timesteps", default="250,500,750", help="comma-separated timesteps of the noisy inputs")
    p.add_argument("--split", choices=("test", "train"), default="test", help="measure on held-out or training images")
    _data(p)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)  # the old name of --test / --train

    p = sub.add_parser("fid", help="FID of generated samples against the dataset's shards")
    _common(p)
    p.add_argument("--samples", type=int, default=1000, help="generated samples (class i %% num_classes)")
    p.add_argument(
        "--features",
        default="inception",
        help="feature network: inception (FID-Inception-v3), pixels, or classifier (--classifier); several "
        "comma-separated (classifier,pixels) share one set of samples",
    )
    p.add_argument(
        "--inception-weights",
        default=None,
        help="local pt_inception-2015-12-05-6726825d.pth (default: $DITSCALE_INCEPTION_WEIGHTS or ~/.cache/ditscale/)",
    )
    p.add_argument(
        "--classifier",
        default=None,
        help="--features classifier: the folder written by `eval classifier` (a small CNN trained on the dataset)",
    )
    p.add_argument("--ref", default=None, help="reference shards manifest (default: the run's data.train)")
    p.add_argument("--ref-limit", type=int, default=None, help="use only the first N reference images")
    p.add_argument("--method", choices=("ddim", "ddpm"), default="ddim", help="sampler (DDIM: eta 0)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--batch-size", type=int, default=100, help="samples per sampling batch")
    p.add_argument(
        "--cache", default=None, help="reference-statistics cache dir (default: $DITSCALE_CACHE or ~/.cache/ditscale)"
    )

    p = sub.add_parser("jacobian", help="denoiser Jacobian at one noise level: spectrum and eigenvectors")
    _common(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sigma", type=float, default=None, help="noise level in [-1,1]-image units (default 0.3)")
    g.add_argument("--t", type=int, default=None, help="timestep instead of --sigma")
    p.add_argument("--index", type=int, default=0, help="which train and test image (position in index order)")
    p.add_argument("--top", type=int, default=8, help="eigenvector images shown")
    p.add_argument("--method", choices=("auto", "jacrev", "rows"), default="auto", help="how the Jacobian is built")
    _data(p)

    p = sub.add_parser("classifier", help="train the small classifier whose features --features classifier uses")
    p.add_argument("--data", required=True, help="training shards manifest (its held-out split is the test set)")
    p.add_argument("--out", required=True, help="folder for classifier.safetensors and classifier.json")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one-cycle schedule)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="only the first N training images (quick trials)")

    p = sub.add_parser("study", help="the small-scale digits study of docs/results.md (data, training, evals)")
    add_study_arguments(p)


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/study", help="directory for data, runs and the report")
    p.add_argument("--steps", type=int, default=1000, help="training steps per run")
    p.add_argument("--small-steps", type=int, default=0, help="training steps of the two N=--small runs (0: --steps)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--variant", default="DiT-T/1")
    p.add_argument("--small", type=int, default=10, help="the memorising training-set size")
    p.add_argument("--large", type=int, default=750, help="size of each disjoint subset of the generalising pair")
    p.add_argument("--mid", type=int, default=100, help="the intermediate N of the window comparison")
    p.add_argument("--local", default="3x2@head", help="window spec of the local model (one entry per block)")
    p.add_argument("--shuffles", type=int, default=1, help="data shuffles per configuration at --mid")
    p.add_argument(
        "--full", action=argparse.BooleanOptionalAction, default=True, help="also train on all 1,500 training images"
    )
    p.add_argument("--k", type=int, default=150, help="images per split for the PSNR gap")
    p.add_argument("--points", type=int, default=25, help="timesteps for the PSNR gap")
    p.add_argument("--samples", type=int, default=100, help="samples for the pair test and pixel FID")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps for the pair test and FID samples")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="evaluate the EMA weights (default: the raw weights; an EMA of decay 0.999 over 1,000 steps still "
        "carries ~37%% of the initial weights)",
    )
    p.add_argument("--only", default=None, help="comma-separated run ids: train (and evaluate) only these")
    p.add_argument("--train-only", action="store_true", help="train, do not evaluate")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")


def run(args: argparse.Namespace) -> int:
    import torch

    from ditscale.eval import evaluate  # lazy: torch at start-up

    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.metric == "classifier":
        from ditscale.eval.classifier import train_classifier  # lazy: torch at start-up

        meta = train_classifier(
            args.data,
            args.out,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            limit=args.limit,
        )
        print(f"classifier: test accuracy {meta['test_accuracy']}, sha256 {meta['sha256'][:16]}, in {args.out}")
        return 0
    if args.metric == "study":
        from ditscale.eval.study import StudyOptions, run_study  # lazy: torch at start-up

        fields = StudyOptions.__dataclass_fields__
        return run_study(StudyOptions(**{k: v for k, v in vars(args).items() if k in fields}))
    fn = getattr(evaluate, args.metric.replace("-", "_"))
    params = inspect.signature(fn).parameters
    fn(**{k: v for k, v in vars(args).items() if k in params})
    log.info("eval %s done in %.1fs", args.metric, time.perf_counter() - t0)
    return 0
