"""`python -m ditscale bench train --config FILE [--steps N] [--rounds R] [key=value ...]`

One process, the config's model and per-process micro-batch:
  * DeepSpeed (the config's ZeRO stage, precision, clipping, EMA) vs a plain PyTorch loop (AdamW, clip_grad_norm_,
    the same EMA, bf16 autocast on GPUs) on the same in-memory batches, alternating rounds of `--steps` steps:
    images/s, step time and DeepSpeed's overhead;
  * the DeepSpeed loop fed by the real loader (make_loader on data.train), in the same alternating rounds: the
    share of the step spent waiting for data;
  * on CUDA, model FLOPs utilisation (MFU) from an analytic FLOP count (DiT's "Gflops" x 2 x 3 for training).
Figures go to docs/benchmarks.md with the machine named.
"""

from __future__ import annotations

import json
import statistics
import time

from ditscale import distenv

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def train_flops_per_image(model) -> float:
    """Analytic training FLOPs per image (forward x 3): linear layers per token + attention scores/values."""
    n = (model.input_size // model.patch_size) ** 2
    d = model.pos_embed.shape[-1]  # hidden size
    per_block = 2 * 12 * d * d * n + 4 * n * n * d  # qkv+proj (4d^2) + mlp (8d^2); QK^T and AV
    embed = 2 * n * d * model.patch_size**2 * (model.in_channels + model.out_channels)
    return 3.0 * (model.depth * per_block + embed)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> int:
    import torch

    # lazy: torch at import, like `import torch` above
    from ditscale.config import load_config
    from ditscale.train import engine as eng
    from ditscale.train.ema import EMA
    from ditscale.train.step import diffusion_loss, model_fn
    from ditscale.train.trainer import validate

    cfg = load_config(args.config, list(args.overrides))
    # One process, no accumulation: the per-process micro-batch of the config is the batch of every step.
    cfg = load_config(args.config, [*args.overrides, f"train.global_batch={cfg.train.micro_batch}"])
    denv = distenv.DistEnv()
    eng.setup_process_env(denv)
    if not args.synthetic:
        validate(cfg, 1)
    device = eng.init_distributed(denv)
    eng.set_tf32(cfg.train.tf32)
    precision = eng.resolve_precision(cfg.train.precision)
    diffusion = cfg.diffusion.build(cfg.model.learn_sigma)
    b = cfg.train.micro_batch
    nb = args.warmup + args.steps
    m = cfg.model
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        shape = (b, m.in_channels, m.input_size, m.input_size)
        batches = [
            (torch.randn(shape, generator=g), torch.randint(0, m.num_classes, (b,), generator=g)) for _ in range(nb)
        ]
        it = None
    else:
        loader = cfg.data.loader(micro_batch=b, global_batch=b, seed=cfg.run.seed)
        it = iter(loader)
        batches = [next(it) for _ in range(nb)]
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    gen = torch.Generator(device=device).manual_seed(0)
    noise = [torch.randn(x.shape, device=device, generator=gen) for x, _ in batches]
    ts = [torch.randint(0, diffusion.num_timesteps, (b,), device=device, generator=gen) for _ in batches]

    # -- plain PyTorch ------------------------------------------------------------------------------------------
    torch.manual_seed(cfg.run.seed)
    plain = cfg.model.build().to(device).train()
    plain_ema = EMA(plain, cfg.train.ema_decay, device=device)
    if cfg.train.activation_checkpointing:
        eng.apply_activation_checkpointing(plain)
    opt = cfg.optim.optimizer([p for p in plain.parameters() if p.requires_grad], fused=device.type == "cuda")
    if cfg.train.compile:
        plain.compile()
    plain_fn = model_fn(plain, precision, device)

    def plain_step(i: int) -> None:
        x, y = batches[i]
        loss = diffusion_loss(plain_fn, diffusion, x, y, t=ts[i], noise=noise[i])
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        plain_ema.update(plain)

    # -- DeepSpeed ----------------------------------------------------------------------------------------------
    torch.manual_seed(cfg.run.seed)
    model = cfg.model.build().to(device)
    ds_ema = EMA(model, cfg.train.ema_decay, device=device)
    if cfg.train.activation_checkpointing:
        eng.apply_activation_checkpointing(model)
    engine, _, _ = cfg.train.engine(model, cfg.optim, 1)
    ds_fn = model_fn(engine, precision, device)
    zero3 = cfg.train.zero_stage == 3

    def ds_step(i: int, batch=None) -> None:
        x, y = batches[i] if batch is None else batch
        loss = diffusion_loss(ds_fn, diffusion, x, y, t=ts[i % nb], noise=noise[i % nb])
        engine.backward(loss)
        engine.step()
        ds_ema.update(engine.module, zero3=zero3)

    def timed(step_fn, first: int) -> list[float]:
        out = []
        for i in range(first, first + args.steps):
            _sync(device)
            t0 = time.perf_counter()
            step_fn(i)
            _sync(device)
            out.append(time.perf_counter() - t0)
        return out

    waits: list[float] = []

    def loader_step(i: int) -> None:  # DeepSpeed fed by the real loader: the data-wait share
        t0 = time.perf_counter()
        x, y = next(it)
        batch = (x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        waits.append(time.perf_counter() - t0)
        ds_step(i, batch)

    for i in range(args.warmup):
        plain_step(i)
        ds_step(i)
        if it is not None:
            loader_step(i)
    waits.clear()
    # Alternating rounds, so that the three loops share the machine's noise (shared CPUs, clocks).
    plain_times, ds_times, loader_times = [], [], []
    for _ in range(args.rounds):
        plain_times += timed(plain_step, args.warmup)
        ds_times += timed(ds_step, args.warmup)
        if it is not None:
            loader_times += timed(loader_step, args.warmup)
    if not loader_times:  # --synthetic: no loader, no data wait
        loader_times, waits = [float("nan")], [float("nan")]
    wait, total = sum(waits), sum(loader_times)  # data-wait share over all timed loader steps

    # What world-size-independent randomness costs: a timestep, label drop and noise drawn per sample from (seed,
    # element id), against one draw per micro-batch from a generator (before elastic resume).
    from ditscale.train.step import sample_randomness  # lazy: torch at import, like `import torch` above

    shape = tuple(batches[0][0].shape[1:])
    per_sample, per_batch = [], []
    for r in range(args.rounds * args.steps):
        ids = torch.arange(r * b, (r + 1) * b)
        _sync(device)
        t0 = time.perf_counter()
        sample_randomness(ids, cfg.run.seed, shape, diffusion.num_timesteps, m.class_dropout_prob, device)
        _sync(device)
        t1 = time.perf_counter()
        torch.randint(0, diffusion.num_timesteps, (b,), device=device, generator=gen)
        torch.randn((b, *shape), device=device, generator=gen)
        _sync(device)
        per_sample.append(t1 - t0)
        per_batch.append(time.perf_counter() - t1)

    t_plain, t_ds = statistics.median(plain_times), statistics.median(ds_times)
    res = {
        "config": args.config,
        "variant": cfg.model.variant,
        "windows": cfg.model.windows,
        "input_size": cfg.model.input_size,
        "batch": b,
        "zero_stage": cfg.train.zero_stage,
        "precision": precision,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "plain_step_s": t_plain,
        "deepspeed_step_s": t_ds,
        "plain_images_per_s": b / t_plain,
        "deepspeed_images_per_s": b / t_ds,
        "deepspeed_overhead": t_ds / t_plain - 1.0,
        "plain_step_min_s": min(plain_times),
        "deepspeed_step_min_s": min(ds_times),
        "deepspeed_overhead_min": min(ds_times) / min(plain_times) - 1.0,
        "loader_step_s": statistics.median(loader_times),
        "loader_images_per_s": b / statistics.median(loader_times),
        "data_wait_share": wait / total,
        "steps": args.steps,
        "rounds": args.rounds,
        "randomness_per_sample_s": statistics.median(per_sample),
        "randomness_per_batch_s": statistics.median(per_batch),
        "randomness_share": (statistics.median(per_sample) - statistics.median(per_batch)) / t_ds,
    }
    if device.type == "cuda":
        name = res["device"]
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        flops = train_flops_per_image(model) * (4 / 3 if cfg.train.activation_checkpointing else 1)
        res["train_tflops_per_image"] = flops / 1e12
        res["achieved_tflops"] = flops * res["deepspeed_images_per_s"] / 1e12
        res["mfu"] = res["achieved_tflops"] / peak if peak else None
        res["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    eng.shutdown(True)

    print(
        f"bench train: {res['variant']} ({res['windows']}), {res['input_size']}px, batch {b}, "
        f"ZeRO-{res['zero_stage']}, {precision}, {res['device']}"
    )
    print(f"  plain PyTorch : {t_plain * 1e3:8.1f} ms/step  {res['plain_images_per_s']:9.1f} images/s")
    print(
        f"  DeepSpeed     : {t_ds * 1e3:8.1f} ms/step  {res['deepspeed_images_per_s']:9.1f} images/s  "
        f"(overhead {100 * res['deepspeed_overhead']:+.1f}% on medians, "
        f"{100 * res['deepspeed_overhead_min']:+.1f}% on the fastest steps)"
    )
    print(
        f"  with loader   : {res['loader_step_s'] * 1e3:8.1f} ms/step  {res['loader_images_per_s']:9.1f} images/s  "
        f"(data wait {100 * res['data_wait_share']:.1f}% of the step)"
    )
    print(
        f"  randomness    : per sample {res['randomness_per_sample_s'] * 1e3:.2f} ms, per batch "
        f"{res['randomness_per_batch_s'] * 1e3:.2f} ms a micro-batch ({100 * res['randomness_share']:+.2f}% of the "
        "DeepSpeed step: the cost of world-size-independent noise)"
    )
    if "mfu" in res:
        mfu = f"{100 * res['mfu']:.1f}%" if res["mfu"] is not None else "n/a (pass --peak-tflops)"
        print(
            f"  MFU           : {mfu} ({res['achieved_tflops']:.1f} TFLOP/s, "
            f"{res['train_tflops_per_image'] * 1e3:.0f} GFLOP/image)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0
