"""`python -m ditscale eval {psnr-gap,pair,locality,fid,jacobian} ...`: evaluate trained runs.

Each metric reads the run's checkpoint (EMA weights by default; local or s3://), writes
`{run}/eval/<metric>.json` and PNG figures beside it (what `ditscale report` and the launchers' --collect read).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from ditscale.errors import ConfigError, DataError
from ditscale.eval import common

log = logging.getLogger("ditscale.eval")
METRICS = ("psnr-gap", "pair", "locality", "fid", "jacobian")


def _common(p: argparse.ArgumentParser, run: bool = True) -> None:
    if run:
        p.add_argument("--run", required=True, help="run directory (local or s3://) with checkpoints/")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights (default)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: checkpoints/latest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: this rank's GPU if any, else CPU)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="metric", metavar="METRIC", required=True)

    p = sub.add_parser("psnr-gap", help="one-step denoising PSNR of train vs test images; the average gap")
    _common(p)
    p.add_argument("--k", type=int, default=300, help="images per split (K)")
    p.add_argument("--points", type=int, default=50, help="evenly spaced timesteps")
    p.add_argument("--train", default=None, help="training shards manifest (default: the run's data.train)")
    p.add_argument("--test", default=None, help="held-out shards manifest (default: the run's data.test)")
    p.add_argument("--batch-size", type=int, default=256)

    p = sub.add_parser("pair", help="two-model test on disjoint subsets: same noise, DDIM eta=0")
    _common(p, run=False)
    p.add_argument("--runs", nargs=2, required=True, metavar=("A", "B"))
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--out", default=None, help="directory for pair.json/png (default: eval/ of both runs)")

    p = sub.add_parser("locality", help="per-block attention distance and k x k mass; attention-map figures")
    _common(p)
    p.add_argument("--images", type=int, default=32, help="images averaged over")
    p.add_argument("--timesteps", default="250,500,750", help="comma-separated timesteps of the noisy inputs")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--data", default=None, help="shards manifest (default: the run's data.<split>)")

    p = sub.add_parser("fid", help="FID of generated samples against the dataset's shards")
    _common(p)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--features", choices=("inception", "pixels"), default="inception")
    p.add_argument(
        "--inception-weights",
        default=None,
        help="local pt_inception-2015-12-05-6726825d.pth (default: $DITSCALE_INCEPTION_WEIGHTS or ~/.cache/ditscale/)",
    )
    p.add_argument("--ref", default=None, help="reference shards manifest (default: the run's data.train)")
    p.add_argument("--ref-limit", type=int, default=None, help="use only the first N reference images")
    p.add_argument("--method", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--cache", default=None, help="reference-statistics cache dir (default: $DITSCALE_CACHE)")

    p = sub.add_parser("jacobian", help="denoiser Jacobian at one noise level: spectrum and eigenvectors")
    _common(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sigma", type=float, default=None, help="noise level in [-1,1]-image units (default 0.3)")
    g.add_argument("--t", type=int, default=None, help="timestep instead of --sigma")
    p.add_argument("--index", type=int, default=0, help="which train and test image (position in index order)")
    p.add_argument("--top", type=int, default=8, help="eigenvector images shown")
    p.add_argument("--method", choices=("auto", "jacrev", "rows"), default="auto")

    from ditscale.eval.study import add_study_arguments

    p = sub.add_parser("study", help="the small-scale digits study of docs/results.md (data, training, evals)")
    add_study_arguments(p)


# ------------------------------------------------------------------------------------------------ helpers
def _meta(run_dir: str, cfg, args, metric: str) -> dict:
    n_train = None
    try:
        n_train = common.manifest_of(cfg.data.train).get("num_samples") if cfg.data.train else None
    except Exception:  # the numbers stay useful without it
        pass
    from ditscale.io.rundir import RunDir

    step = RunDir(run_dir).latest_tag()
    return {
        "metric": metric,
        "run": run_dir,
        "name": cfg.run.name,
        "variant": cfg.model.variant,
        "windows": cfg.model.windows,
        "input_size": cfg.model.input_size,
        "n_train": n_train,
        "checkpoint": args.tag or step,
        "ema": bool(args.ema),
        "seed": args.seed,
    }


def generate(model, cfg, labels: torch.Tensor, *, steps: int, method: str = "ddim", noise=None, generator=None,
             cfg_scale: float = 1.0) -> torch.Tensor:  # fmt: skip
    """Samples in [-1, 1] through the one sampling path (ditscale.train.sampling.draw)."""
    from ditscale.train.sampling import draw

    return draw(
        model, cfg, labels, steps=steps, method=method, noise=noise, generator=generator, cfg_scale=cfg_scale
    ).clamp(-1, 1)


def _timed(fn):
    def wrapper(args):
        t0 = time.perf_counter()
        res = fn(args)
        log.info("eval %s done in %.1fs", args.metric, time.perf_counter() - t0)
        return res

    return wrapper


# ------------------------------------------------------------------------------------------------ metrics
def run_psnr_gap(args) -> dict:
    from ditscale.eval.psnr import plot_psnr, psnr_gap

    cfg, model = common.load_run(args.run, ema=args.ema, tag=args.tag, device=common.resolve_device(args.device))
    train_url = args.train or cfg.data.train
    test_url = args.test or cfg.data.test
    if not test_url:
        raise DataError(f"run {args.run!r} has no data.test in its config: pass --test MANIFEST (held-out shards)")
    train = common.load_images(train_url, args.k, model=model)
    test = common.load_images(test_url, args.k, model=model)
    overlap = set(train[2]) & set(test[2]) if _same_source(train_url, test_url) else set()
    if overlap:
        log.warning("train and test shards share %d indices: the gap is underestimated", len(overlap))
    diffusion = common.make_diffusion(cfg)
    res = psnr_gap(
        model, diffusion, train[:2], test[:2], num_points=args.points, batch_size=args.batch_size, seed=args.seed
    )
    res = {**_meta(args.run, cfg, args, "psnr_gap"), "train_shards": train_url, "test_shards": test_url, **res}
    common.write_result(args.run, "psnr_gap", res)
    common.save_figure(
        plot_psnr(res, f"{cfg.run.name}: {cfg.model.variant} {cfg.model.windows}"),
        common.join(common.eval_dir(args.run), "psnr_gap.png"),
    )
    print(f"avg PSNR gap {res['avg_gap']:.3f} dB (train {res['avg_train_psnr']:.2f}, test {res['avg_test_psnr']:.2f})")
    return res


def _same_source(a: str, b: str) -> bool:
    try:
        return common.manifest_of(a).get("source") == common.manifest_of(b).get("source")
    except Exception:
        return False


def run_pair(args) -> dict:
    from ditscale.eval import pair

    run_a, run_b = args.runs
    device = common.resolve_device(args.device)
    cfg_a, model_a = common.load_run(run_a, ema=args.ema, tag=args.tag, device=device)
    cfg_b, model_b = common.load_run(run_b, ema=args.ema, tag=args.tag, device=device)
    for attr in ("input_size", "in_channels"):
        if getattr(model_a, attr) != getattr(model_b, attr):
            raise DataError(
                f"pair: runs {run_a!r} and {run_b!r} differ in {attr} "
                f"({getattr(model_a, attr)} vs {getattr(model_b, attr)}); the test needs the same shape"
            )
    if cfg_a.data.train == cfg_b.data.train:
        raise DataError(
            f"pair: runs {run_a!r} and {run_b!r} were trained on the same shards {cfg_a.data.train!r}; "
            "the two-model test needs disjoint subsets (shards/subset.py --pair)"
        )
    train_a = common.load_images(cfg_a.data.train, model=model_a)
    train_b = common.load_images(cfg_b.data.train, model=model_b)
    man_a, man_b = common.manifest_of(cfg_a.data.train), common.manifest_of(cfg_b.data.train)
    ids_a, ids_b = pair.subset_ids(man_a), pair.subset_ids(man_b)
    if ids_a is not None and ids_b is not None:
        how = "manifest indices"
    else:  # every sample carries its source index: shared indices with identical pixels are the same image
        how = "source indices and pixels of the samples"
        ids_a = pair.shared_samples(train_a[2], train_a[0], train_b[2], train_b[0])
        ids_b = ids_a
    pair.check_disjoint(ids_a, ids_b, cfg_a.data.train, cfg_b.data.train)
    g = torch.Generator().manual_seed(args.seed)
    shape = (args.samples, model_a.in_channels, model_a.input_size, model_a.input_size)
    noise = torch.randn(shape, generator=g)
    nc = max(int(getattr(model_a, "num_classes", 1)), 1)
    labels = torch.arange(args.samples) % nc
    sa, sb = [], []
    for i in range(0, args.samples, args.batch_size):
        sl = slice(i, i + args.batch_size)
        sa.append(generate(model_a, cfg_a, labels[sl], steps=args.steps, method="ddim", noise=noise[sl]))
        sb.append(generate(model_b, cfg_b, labels[sl], steps=args.steps, method="ddim", noise=noise[sl]))
    sa, sb = torch.cat(sa), torch.cat(sb)
    stats = pair.pair_stats(sa, sb, train_a[0], train_b[0])
    res = {
        "metric": "pair",
        "runs": [run_a, run_b],
        "variant": cfg_a.model.variant,
        "windows": [cfg_a.model.windows, cfg_b.model.windows],
        "n_train": [len(train_a[0]), len(train_b[0])],
        "disjoint_by": how,
        "samples": args.samples,
        "sampler": f"ddim{args.steps} eta=0",
        "seed": args.seed,
        "ema": bool(args.ema),
        **pair.summarise(stats),
        "paired": stats["paired"].tolist(),
        "nearest_a": stats["nearest_a"].tolist(),
        "nearest_b": stats["nearest_b"].tolist(),
    }
    title = f"two-model test: N={len(train_a[0])}, {cfg_a.model.variant} {cfg_a.model.windows}"
    outs = [args.out] if args.out else [common.eval_dir(run_a), common.eval_dir(run_b)]
    for out in outs:
        common.write_json(common.join(out, "pair.json"), res)
        common.save_figure(pair.plot_pair(stats, sa, sb, title), common.join(out, "pair.png"))
    ps, ns = res["paired_similarity"], res["nearest_train_similarity"]
    print(
        f"paired cos sim mean {ps['mean']:.3f} (median {ps['median']:.3f}); nearest-train cos sim mean {ns['mean']:.3f}"
    )
    return res


def _ints(spec: str, what: str) -> list[int]:
    try:
        return [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} {spec!r}: expected comma-separated integers") from None


def run_locality(args) -> dict:
    from ditscale.eval.locality import locality, plot_locality, plot_maps

    cfg, model = common.load_run(args.run, ema=args.ema, tag=args.tag, device=common.resolve_device(args.device))
    url = args.data or (cfg.data.test if args.split == "test" else cfg.data.train) or cfg.data.train
    images, labels, _ = common.load_images(url, args.images, model=model)
    diffusion = common.make_diffusion(cfg)
    ts = _ints(args.timesteps, "--timesteps")
    bad = [t for t in ts if not 0 <= t < diffusion.num_timesteps]
    if bad:
        raise ConfigError(f"--timesteps {bad}: expected values in [0, {diffusion.num_timesteps - 1}]")
    res, maps = locality(model, diffusion, images, common.model_labels(model, labels), ts, seed=args.seed)
    res = {**_meta(args.run, cfg, args, "locality"), "data": url, **res}
    common.write_result(args.run, "locality", res)
    h, w = res["grid"]
    name = f"{cfg.run.name}: {cfg.model.variant} {cfg.model.windows}"
    for t in ts:
        common.save_figure(
            plot_maps(maps[t], h, w, f"{name}, t={t}"), common.join(common.eval_dir(args.run), f"attention_t{t}.png")
        )
    common.save_figure(plot_locality(res, name), common.join(common.eval_dir(args.run), "locality.png"))
    for b in res["blocks"]:
        print(
            f"block {b['block']}: mean distance {b['mean_distance']:.2f} tokens, 3x3 mass {b['mass_3x3']:.3f}, "
            f"5x5 {b['mass_5x5']:.3f}, 7x7 {b['mass_7x7']:.3f}"
        )
    return res


def _init_distributed():
    import torch.distributed as dist

    from ditscale.distenv import detect

    env = detect()
    if env.is_distributed and not dist.is_initialized():
        env.export()
        dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size)
        return True
    return False


def run_fid(args) -> dict:
    from pathlib import Path

    import torch.distributed as dist

    from ditscale.eval import fid

    started = _init_distributed()
    try:
        device = common.resolve_device(args.device)
        cfg, model = common.load_run(args.run, ema=args.ema, tag=args.tag, device=device)
        ref_url = args.ref or cfg.data.train
        if not ref_url:
            raise DataError(f"run {args.run!r} has no data.train: pass --ref MANIFEST")
        common.check_compatible(model, common.manifest_of(ref_url), ref_url)
        extractor = fid.make_extractor(args.features, args.inception_weights)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:  # compute (or read) the cached reference statistics once
            mu_r, sig_r, info = fid.reference_stats(
                ref_url,
                args.features,
                extractor,
                limit=args.ref_limit,
                cache=Path(args.cache) if args.cache else None,
                device=device,
            )
        if dist.is_initialized():
            dist.barrier()
        nc = max(int(getattr(model, "num_classes", 1)), 1)

        def draw(m, labels, noise, g):
            return generate(
                m, cfg, labels, steps=args.steps, method=args.method, noise=noise, generator=g, cfg_scale=args.cfg_scale
            )

        feats = fid.sample_features(
            model,
            draw,
            extractor,
            args.samples,
            num_classes=nc,
            batch_size=args.batch_size,
            seed=args.seed,
            device=device,
        )
        if rank != 0:
            return {}
        value = fid.fid_from_features(feats, mu_r, sig_r)
        world = dist.get_world_size() if dist.is_initialized() else 1
        res = {
            **_meta(args.run, cfg, args, "fid"),
            "fid": value,
            "features": args.features,
            "samples": len(feats),
            "reference": ref_url,
            "reference_images": info["num_images"],
            "reference_cache": info["path"],
            "sampler": f"{args.method}{args.steps}",
            "cfg_scale": args.cfg_scale,
            "world_size": world,
        }
        if args.features == "pixels":
            res["note"] = "pixel features: not comparable to Inception FIDs"
        common.write_result(args.run, "fid" if args.features == "inception" else "fid_pixels", res)
        print(f"FID ({args.features}) {value:.4f} from {len(feats)} samples vs {info['num_images']} reference images")
        return res
    finally:
        if started:
            dist.destroy_process_group()


def run_jacobian(args) -> dict:
    from ditscale.eval import jacobian as jac

    cfg, model = common.load_run(args.run, ema=args.ema, tag=args.tag)
    diffusion = common.make_diffusion(cfg)
    t = args.t if args.t is not None else jac.timestep_for_sigma(diffusion, args.sigma if args.sigma else 0.3)
    if not 0 <= t < diffusion.num_timesteps:
        raise ConfigError(f"--t {t}: expected a timestep in [0, {diffusion.num_timesteps - 1}]")
    results, summaries = {}, {}
    splits = [("train", cfg.data.train), ("test", cfg.data.test)]
    for split, url in splits:
        if not url:
            continue
        images, labels, idx = common.load_images(url, args.index + 1, model=model)
        if len(images) <= args.index:
            raise DataError(f"--index {args.index}: shard set {url!r} holds only {len(images)} images")
        label = int(common.model_labels(model, labels)[args.index])
        r = jac.denoiser_jacobian(model, diffusion, images[args.index], label, t, seed=args.seed, method=args.method)
        r["clean"] = images[args.index]
        results[split] = r
        summaries[split] = {"index": idx[args.index], **jac.summary(r, args.top)}
    res = {**_meta(args.run, cfg, args, "jacobian"), "t": t, "sigma": jac.sigma_of(diffusion, t), **summaries}
    common.write_result(args.run, "jacobian", res)
    common.save_figure(
        jac.plot_jacobian(results, args.top, f"{cfg.run.name}: denoiser Jacobian, t={t}"),
        common.join(common.eval_dir(args.run), "jacobian.png"),
    )
    for split, s in summaries.items():
        print(
            f"{split}: lambda_0 {s['top'][0]:.3f}, trace {s['trace']:.2f}, effective dim {s['effective_dim']:.1f}, "
            f"asymmetry {s['asymmetry']:.3f}"
        )
    return res


def run_study(args) -> int:
    from ditscale.eval.study import run_study as _run

    return _run(args)


RUNNERS = {
    "psnr-gap": run_psnr_gap,
    "pair": run_pair,
    "locality": run_locality,
    "fid": run_fid,
    "jacobian": run_jacobian,
    "study": run_study,
}


def run(args) -> int:
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    _timed(RUNNERS[args.metric])(args)
    return 0
