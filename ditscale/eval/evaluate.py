"""Evaluating trained runs, as library functions: psnr_gap, pair, locality, fid, jacobian.

Each reads a run's checkpoint (EMA weights by default; local or s3://), writes `{run}/eval/<metric>.json` and PNG
figures beside it (what `ditscale report` and the launchers' --collect read) and returns the result.
`python -m ditscale eval ...` (ditscale.cli.eval) is the command line over them.
"""

from __future__ import annotations

import logging

import torch

from ditscale.distenv import detect
from ditscale.errors import ConfigError, DataError
from ditscale.eval import common, psnr
from ditscale.eval import fid as fid_metric
from ditscale.eval import jacobian as jac
from ditscale.eval import locality as attention_locality
from ditscale.eval import pair as pair_test
from ditscale.io.rundir import RunDir
from ditscale.train.sampling import draw

log = logging.getLogger("ditscale.eval")
METRICS = ("psnr_gap", "pair", "locality", "fid", "jacobian")


# ------------------------------------------------------------------------------------------------ helpers
def _meta(run_dir: str, cfg, metric: str, tag: str | None, ema: bool, seed: int) -> dict:
    n_train = None
    try:
        n_train = common.manifest_of(cfg.data.train).get("num_samples") if cfg.data.train else None
    except Exception:  # the numbers stay useful without it
        pass

    step = RunDir(run_dir).latest_tag()
    return {
        "metric": metric,
        "run": run_dir,
        "name": cfg.run.name,
        "variant": cfg.model.variant,
        "windows": cfg.model.windows,
        "input_size": cfg.model.input_size,
        "n_train": n_train,
        "checkpoint": tag or step,
        "ema": bool(ema),
        "seed": seed,
    }


def generate(
    model,
    cfg,
    labels: torch.Tensor,
    *,
    steps: int,
    method: str = "ddim",
    noise=None,
    generator=None,
    cfg_scale: float = 1.0,
) -> torch.Tensor:
    """Samples in [-1, 1] through the one sampling path (ditscale.train.sampling.draw)."""

    return draw(
        model, cfg, labels, steps=steps, method=method, noise=noise, generator=generator, cfg_scale=cfg_scale
    ).clamp(-1, 1)


# ------------------------------------------------------------------------------------------------ metrics
def psnr_gap(
    run: str,
    *,
    k: int = 300,
    points: int = 50,
    train: str | None = None,
    test: str | None = None,
    batch_size: int = 256,
    ema: bool = True,
    tag: str | None = None,
    seed: int = 0,
    device: str = "auto",
) -> dict:
    """One-step denoising PSNR of K train and K held-out images at `points` timesteps; the average gap."""

    cfg, model = common.load_run(run, ema=ema, tag=tag, device=common.resolve_device(device))
    train_url = train or cfg.data.train
    test_url = test or cfg.data.test
    if not test_url:
        raise DataError(f"run {run!r} has no data.test in its config: pass --test MANIFEST (held-out shards)")
    train = common.load_images(train_url, k, model=model)
    test = common.load_images(test_url, k, model=model)
    overlap = set(train[2]) & set(test[2]) if _same_source(train_url, test_url) else set()
    if overlap:
        log.warning("train and test shards share %d indices: the gap is underestimated", len(overlap))
    diffusion = common.make_diffusion(cfg)
    res = psnr.psnr_gap(model, diffusion, train[:2], test[:2], num_points=points, batch_size=batch_size, seed=seed)
    res = {**_meta(run, cfg, "psnr_gap", tag, ema, seed), "train_shards": train_url, "test_shards": test_url, **res}
    common.write_result(run, "psnr_gap", res)
    common.save_figure(
        psnr.plot_psnr(res, f"{cfg.run.name}: {cfg.model.variant} {cfg.model.windows}"),
        common.join(common.eval_dir(run), "psnr_gap.png"),
    )
    print(f"avg PSNR gap {res['avg_gap']:.3f} dB (train {res['avg_train_psnr']:.2f}, test {res['avg_test_psnr']:.2f})")
    return res


def _same_source(a: str, b: str) -> bool:
    try:
        return common.manifest_of(a).get("source") == common.manifest_of(b).get("source")
    except Exception:
        return False


def pair(
    runs: tuple[str, str],
    *,
    samples: int = 100,
    steps: int = 50,
    batch_size: int = 100,
    out: str | None = None,
    ema: bool = True,
    tag: str | None = None,
    seed: int = 0,
    device: str = "auto",
) -> dict:
    """The two-model test on disjoint subsets: the same noise, DDIM eta 0; paired and nearest-train similarity."""

    run_a, run_b = runs
    device = common.resolve_device(device)
    cfg_a, model_a = common.load_run(run_a, ema=ema, tag=tag, device=device)
    cfg_b, model_b = common.load_run(run_b, ema=ema, tag=tag, device=device)
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
    ids_a, ids_b = pair_test.subset_ids(man_a), pair_test.subset_ids(man_b)
    if ids_a is not None and ids_b is not None:
        how = "manifest indices"
    else:  # every sample carries its source index: shared indices with identical pixels are the same image
        how = "source indices and pixels of the samples"
        ids_a = pair_test.shared_samples(train_a[2], train_a[0], train_b[2], train_b[0])
        ids_b = ids_a
    pair_test.check_disjoint(ids_a, ids_b, cfg_a.data.train, cfg_b.data.train)
    g = torch.Generator().manual_seed(seed)
    shape = (samples, model_a.in_channels, model_a.input_size, model_a.input_size)
    noise = torch.randn(shape, generator=g)
    nc = max(int(getattr(model_a, "num_classes", 1)), 1)
    labels = torch.arange(samples) % nc
    sa, sb = [], []
    for i in range(0, samples, batch_size):
        sl = slice(i, i + batch_size)
        sa.append(generate(model_a, cfg_a, labels[sl], steps=steps, method="ddim", noise=noise[sl]))
        sb.append(generate(model_b, cfg_b, labels[sl], steps=steps, method="ddim", noise=noise[sl]))
    sa, sb = torch.cat(sa), torch.cat(sb)
    stats = pair_test.pair_stats(sa, sb, train_a[0], train_b[0])
    res = {
        "metric": "pair",
        "runs": [run_a, run_b],
        "variant": cfg_a.model.variant,
        "windows": [cfg_a.model.windows, cfg_b.model.windows],
        "n_train": [len(train_a[0]), len(train_b[0])],
        "disjoint_by": how,
        "samples": samples,
        "sampler": f"ddim{steps} eta=0",
        "seed": seed,
        "ema": bool(ema),
        **pair_test.summarise(stats),
        "paired": stats["paired"].tolist(),
        "nearest_a": stats["nearest_a"].tolist(),
        "nearest_b": stats["nearest_b"].tolist(),
    }
    title = f"two-model test: N={len(train_a[0])}, {cfg_a.model.variant} {cfg_a.model.windows}"
    outs = [out] if out else [common.eval_dir(run_a), common.eval_dir(run_b)]
    for out in outs:
        common.write_json(common.join(out, "pair.json"), res)
        common.save_figure(pair_test.plot_pair(stats, sa, sb, title), common.join(out, "pair.png"))
    ps, ns = res["paired_similarity"], res["nearest_train_similarity"]
    print(
        f"paired cos sim mean {ps['mean']:.3f} (median {ps['median']:.3f}); nearest-train cos sim mean {ns['mean']:.3f}"
    )
    return res


def _ints(spec, what: str) -> list[int]:
    if not isinstance(spec, str):  # a list from the library API
        spec = ",".join(str(x) for x in spec)
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} {spec!r}: expected comma-separated integers") from None


def locality(
    run: str,
    *,
    images: int = 32,
    timesteps: str = "250,500,750",
    split: str = "test",
    train: str | None = None,
    test: str | None = None,
    data: str | None = None,
    ema: bool = True,
    tag: str | None = None,
    seed: int = 0,
    device: str = "auto",
) -> dict:
    """Per-block attention distance and k x k mass at the given timesteps; attention-map figures.

    `split` picks the images: the held-out set (`test`, or the run's data.test) or the training set. A run without
    a held-out set is refused for split test rather than measured on its training images. `data` is the old name
    of the chosen split's manifest."""

    cfg, model = common.load_run(run, ema=ema, tag=tag, device=common.resolve_device(device))
    if split == "test":
        url = data or test or cfg.data.test
        if not url:
            raise DataError(
                f"run {run!r} has no data.test (held-out shards) in its config: pass --test MANIFEST, "
                "or --split train to measure on its training images"
            )
    else:
        url = data or train or cfg.data.train
    images, labels, _ = common.load_images(url, images, model=model)
    diffusion = common.make_diffusion(cfg)
    ts = _ints(timesteps, "--timesteps")
    bad = [t for t in ts if not 0 <= t < diffusion.num_timesteps]
    if bad:
        raise ConfigError(f"--timesteps {bad}: expected values in [0, {diffusion.num_timesteps - 1}]")
    res, maps = attention_locality.locality(model, diffusion, images, common.model_labels(model, labels), ts, seed=seed)
    res = {**_meta(run, cfg, "locality", tag, ema, seed), "split": split, "data": url, **res}
    common.write_result(run, "locality", res)
    h, w = res["grid"]
    name = f"{cfg.run.name}: {cfg.model.variant} {cfg.model.windows}"
    for t in ts:
        common.save_figure(
            attention_locality.plot_maps(maps[t], h, w, f"{name}, t={t}"),
            common.join(common.eval_dir(run), f"attention_t{t}.png"),
        )
    common.save_figure(attention_locality.plot_locality(res, name), common.join(common.eval_dir(run), "locality.png"))
    for b in res["blocks"]:
        print(
            f"block {b['block']}: mean distance {b['mean_distance']:.2f} tokens, 3x3 mass {b['mass_3x3']:.3f}, "
            f"5x5 {b['mass_5x5']:.3f}, 7x7 {b['mass_7x7']:.3f}"
        )
    return res


def _init_distributed():
    import torch.distributed as dist

    env = detect()
    if env.is_distributed and not dist.is_initialized():
        env.export()
        dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size)
        return True
    return False


def fid(
    run: str,
    *,
    samples: int = 1000,
    features: str = "inception",
    inception_weights: str | None = None,
    classifier: str | None = None,
    ref: str | None = None,
    ref_limit: int | None = None,
    method: str = "ddim",
    steps: int = 50,
    cfg_scale: float = 1.0,
    batch_size: int = 100,
    cache: str | None = None,
    ema: bool = True,
    tag: str | None = None,
    seed: int = 0,
    device: str = "auto",
) -> dict:
    """FID of generated samples against the reference shards (Inception, pixel or classifier features; ranks split
    the samples). `features` may name several networks, comma-separated ("classifier,pixels"): the samples are
    drawn once and each network's FID is written to its own file. With classifier features it also reports how
    many class-conditional samples the classifier assigns to the class they were drawn for (`sample_accuracy`).
    Returns the result (several: {features: result})."""
    from pathlib import Path

    import torch.distributed as dist

    kinds = [k.strip() for k in features.split(",") if k.strip()]
    if not kinds or len(set(kinds)) != len(kinds):
        raise ConfigError(f"--features {features!r}: expected one or more of inception, pixels, classifier")
    started = _init_distributed()
    try:
        device = common.resolve_device(device)
        cfg, model = common.load_run(run, ema=ema, tag=tag, device=device)
        ref_url = ref or cfg.data.train
        if not ref_url:
            raise DataError(f"run {run!r} has no data.train: pass --ref MANIFEST")
        common.check_compatible(model, common.manifest_of(ref_url), ref_url)
        extractors = [fid_metric.make_extractor(k, inception_weights, classifier) for k in kinds]
        rank = dist.get_rank() if dist.is_initialized() else 0
        refs = []
        if rank == 0:  # compute (or read) the cached reference statistics once
            for kind, extractor in zip(kinds, extractors, strict=True):
                refs.append(
                    fid_metric.reference_stats(
                        ref_url,
                        fid_metric.features_key(kind, extractor),
                        extractor,
                        limit=ref_limit,
                        cache=Path(cache) if cache else None,
                        device=device,
                    )
                )
        if dist.is_initialized():
            dist.barrier()
        nc = max(int(getattr(model, "num_classes", 1)), 1)

        def draw(m, labels, noise, g):
            return generate(m, cfg, labels, steps=steps, method=method, noise=noise, generator=g, cfg_scale=cfg_scale)

        concat = fid_metric.Concat(extractors)  # one set of samples, every network's features side by side
        joined = fid_metric.sample_features(
            model,
            draw,
            concat,
            samples,
            num_classes=nc,
            batch_size=batch_size,
            seed=seed,
            device=device,
        )
        if rank != 0:
            return {}
        world = dist.get_world_size() if dist.is_initialized() else 1
        results = {}
        for kind, extractor, feats, (mu_r, sig_r, info) in zip(
            kinds, extractors, concat.split(joined), refs, strict=True
        ):
            value = fid_metric.fid_from_features(feats, mu_r, sig_r)
            res = {
                **_meta(run, cfg, "fid", tag, ema, seed),
                "fid": value,
                "features": kind,
                "samples": len(feats),
                "reference": ref_url,
                "reference_images": info["num_images"],
                "reference_cache": info["path"],
                "sampler": f"{method}{steps}",
                "cfg_scale": cfg_scale,
                "world_size": world,
            }
            if kind == "pixels":
                res["note"] = "pixel features: not comparable to Inception FIDs"
            if kind == "classifier":
                drawn_for = torch.arange(len(feats)) % nc
                predicted = extractor.logits(torch.from_numpy(feats)).argmax(1)
                res["sample_accuracy"] = float((predicted == drawn_for).double().mean())
                res["classifier"] = {k: extractor.meta.get(k) for k in ("path", "sha256", "test_accuracy")}
                res["note"] = "features of a classifier trained on this dataset: not comparable to Inception FIDs"
            common.write_result(run, "fid" if kind == "inception" else f"fid_{kind}", res)
            acc = f", {res['sample_accuracy']:.1%} of samples classified as drawn" if "sample_accuracy" in res else ""
            print(f"FID ({kind}) {value:.4f} from {len(feats)} samples vs {info['num_images']} reference images{acc}")
            results[kind] = res
        return results[kinds[0]] if len(kinds) == 1 else results
    finally:
        if started:
            dist.destroy_process_group()


def jacobian(
    run: str,
    *,
    sigma: float | None = None,
    t: int | None = None,
    index: int = 0,
    top: int = 8,
    method: str = "auto",
    train: str | None = None,
    test: str | None = None,
    ema: bool = True,
    tag: str | None = None,
    seed: int = 0,
    device: str = "auto",
) -> dict:
    """The denoiser Jacobian at one noise level: spectrum and eigenvectors, on one train and one held-out image.
    A run without a held-out set (data.test, or --test) is refused: the comparison is the point."""

    cfg, model = common.load_run(run, ema=ema, tag=tag)
    train_url, test_url = train or cfg.data.train, test or cfg.data.test
    if not test_url:
        raise DataError(
            f"run {run!r} has no data.test (held-out shards) in its config: pass --test MANIFEST; the Jacobian "
            "is compared between a training and a held-out image"
        )
    diffusion = common.make_diffusion(cfg)
    t = t if t is not None else jac.timestep_for_sigma(diffusion, sigma if sigma else 0.3)
    if not 0 <= t < diffusion.num_timesteps:
        raise ConfigError(f"--t {t}: expected a timestep in [0, {diffusion.num_timesteps - 1}]")
    results, summaries = {}, {}
    splits = [("train", train_url), ("test", test_url)]
    for split, url in splits:
        if not url:
            continue
        images, labels, idx = common.load_images(url, index + 1, model=model)
        if len(images) <= index:
            raise DataError(f"--index {index}: shard set {url!r} holds only {len(images)} images")
        label = int(common.model_labels(model, labels)[index])
        r = jac.denoiser_jacobian(model, diffusion, images[index], label, t, seed=seed, method=method)
        r["clean"] = images[index]
        results[split] = r
        summaries[split] = {"index": idx[index], **jac.summary(r, top)}
    res = {**_meta(run, cfg, "jacobian", tag, ema, seed), "t": t, "sigma": jac.sigma_of(diffusion, t), **summaries}
    common.write_result(run, "jacobian", res)
    common.save_figure(
        jac.plot_jacobian(results, top, f"{cfg.run.name}: denoiser Jacobian, t={t}"),
        common.join(common.eval_dir(run), "jacobian.png"),
    )
    for split, s in summaries.items():
        print(
            f"{split}: lambda_0 {s['top'][0]:.3f}, trace {s['trace']:.2f}, effective dim {s['effective_dim']:.1f}, "
            f"asymmetry {s['asymmetry']:.3f}"
        )
    return res
