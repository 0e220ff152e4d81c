"""`python -m ditscale bench gpu`: every GPU check in one command, about 8 minutes on one H100/H200.

Sections (pick with --only a,c,e). Each runs in its own try/except with its own time budget: an error or an
exhausted budget is recorded and the next section starts. Results are written after every row to
OUT/bench-gpu.json and OUT/bench-gpu.md, and progress goes to stdout as it happens.

  a  correctness: flex and halo against masked SDPA, forward output and q/k/v gradients, max abs difference to an
     fp32 masked-SDPA reference, next to masked SDPA's own difference in the same dtype; 1024 and 4096 tokens,
     k in {3, 7, 13}, bf16 and fp32.
  b  attention time, forward + backward, bf16: dense SDPA (flash), SDPA with the window mask, flex block-sparse (as
     the model calls it, head dim padded to a power of two), halo; 1024 and 4096 tokens, k in {3, 5, 7, 13}.
  c  DiT-XL/2 on 32x32x4 latents, 1000 classes, bf16 autocast, AdamW, the diffusion loss; global vs local@head,
     eager vs torch.compile: images/s, peak memory, MFU. FLOPs per trained image: DiT.flops_per_image() (matmul
     FLOPs, 3x the forward; DiT-XL/2 global: 711.7 GFLOP; windowed blocks count only the keys each query sees), over
     the card's dense bf16 peak (H100 SXM / H200: 989 TFLOP/s; --peak-tflops otherwise).
  d  DiT-XS/1 on 32x32x3 pixels (1024 tokens), same step: images/s, global vs local@head, eager vs compiled.
  e  the trainer itself, as a user runs it: `python -m ditscale train` (under torchrun with several GPUs) for 20
     steps on digit shards the check builds (DiT-S/2, local@head, ZeRO-2, bf16 on GPUs: NCCL), then again with
     train.steps=30: every logged loss finite, checkpoints written, and the second run resumed from the first's
     checkpoint (which it leaves untouched) instead of starting again.

Without CUDA (or with --tiny) each section runs a tiny version in seconds: small shapes, fp32, no flex backward
(FlexAttention has none on CPU), torch.compile with the aot_eager backend, gloo and fp32 in e.
Targets on an H100/H200: flex >= 3x masked SDPA at 1024 tokens for k <= 7; local@head DiT-XL/2 not slower than
global; DiT-XL/2 >= 40% MFU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from ditscale.io import storage

SECTIONS = {
    "a": "correctness: flex / halo vs masked SDPA",
    "b": "attention time (fwd+bwd)",
    "c": "DiT-XL/2 training step, 32x32x4 latents",
    "d": "DiT-XS/1 training step, 32x32 pixels",
    "e": "the trainer: 20 steps, checkpoint, resume",
}
BUDGET = {"a": 70, "b": 60, "c": 210, "d": 60, "e": 80}  # seconds of the default --budget 480, scaled with it
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------------------------
# Results: JSON + markdown, rewritten after every row
# --------------------------------------------------------------------------------------------------------------------


class Results:
    def __init__(self, out: Path, machine: dict, budget: float):
        self.out = out
        self.data = {"machine": machine, "budget_s": budget, "sections": {}}
        out.mkdir(parents=True, exist_ok=True)

    def section(self, key: str) -> dict:
        return self.data["sections"].setdefault(key, {"title": SECTIONS[key], "status": "running", "rows": []})

    def row(self, key: str, row: dict) -> None:
        self.section(key)["rows"].append(row)
        print(f"[{key}] " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
        self.write()

    def write(self) -> None:
        storage.write_text(str(self.out / "bench-gpu.json"), json.dumps(self.data, indent=1, default=str) + "\n")
        (self.out / "bench-gpu.md").write_text(markdown(self.data))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}".rstrip("0").rstrip(".")
    return str(v)


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = ["# python -m ditscale bench gpu", "", "| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in m.items()]
    for key, sec in data["sections"].items():
        lines += ["", f"## {key}. {sec['title']}: {sec['status']} ({_fmt(sec.get('seconds', 0.0))} s)", ""]
        if sec.get("error"):
            lines += ["```", sec["error"].strip(), "```", ""]
        if sec.get("summary"):
            lines += [f"- {s}" for s in sec["summary"]] + [""]
        cols: list = []
        for r in sec["rows"]:  # one table per run of rows with the same columns
            if list(r) != cols:
                cols = list(r)
                lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines.append("| " + " | ".join(_fmt(v)[:400].replace("|", "/") for v in r.values()) + " |")
    return "\n".join(lines) + "\n"


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def need(self, seconds: float, what: str) -> None:
        if self.left() < seconds:
            raise OutOfBudget(f"{what}: needs ~{seconds:.0f} s, {max(self.left(), 0):.0f} s left in this section")


class OutOfBudget(Exception):
    pass


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def machine_info(device) -> dict:
    import torch

    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu": _cpu_name(),
        "cpu cores": os.cpu_count(),
        "device": str(device),
        "when (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            gpu=p.name,
            gpus=torch.cuda.device_count(),
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
        with contextlib.suppress(Exception):
            import triton

            info["triton"] = triton.__version__
    with contextlib.suppress(OSError, AttributeError):
        info["load average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, warmup: int = 2, iters: int = 5, repeat: int = 3) -> float:
    """Median over `repeat` of the mean time of `iters` calls (ms), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        out.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(out)


def _maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------------
# a. correctness
# --------------------------------------------------------------------------------------------------------------------


def check_correctness(res: Results, budget: Budget, device, tiny: bool) -> None:
    import torch

    from ditscale.model.attention import attention  # lazy: torch (this module imports it only inside its checks)

    if tiny:
        b, h, d, sides, windows, dtypes = 1, 2, 8, (8, 16), (3, 7), (torch.float32,)
    else:  # DiT-XL/2's heads (16 x 72)
        b, h, d, sides, windows, dtypes = 2, 16, 72, (32, 64), (3, 7, 13), (torch.float32, torch.bfloat16)
    backends = ["flex", "halo"]
    flex_bwd = device.type == "cuda"
    summary = res.section("a").setdefault("summary", [])
    worst: dict = {}
    for side in sides:
        n = side * side
        for k in windows:
            for dtype in dtypes:
                budget.need(5 if tiny else 15, f"{n} tokens k={k}")
                g = torch.Generator(device=device).manual_seed(0)
                q, kk, v, go = (torch.randn(b, h, n, d, generator=g, device=device) for _ in range(4))

                def run(backend, dt, grads=True, q=q, kk=kk, v=v, go=go, side=side, k=k):
                    xs = [x.to(dt).requires_grad_(grads) for x in (q, kk, v)]
                    with torch.set_grad_enabled(grads):
                        out = attention(*xs, (side, side), k, backend)
                    if not grads:
                        return out.detach(), None
                    gs = torch.autograd.grad(out, xs, go.to(dt))
                    return out.detach(), gs

                ref, ref_g = run("sdpa_mask", torch.float32)  # the reference: masked SDPA in fp32
                same, same_g = run("sdpa_mask", dtype)  # masked SDPA's own rounding in this dtype
                base = {"tokens": n, "k": k, "dtype": str(dtype).removeprefix("torch.")}
                for backend in backends:
                    grads = backend != "flex" or flex_bwd
                    try:
                        out, gs = run(backend, dtype, grads)
                    except Exception as e:  # one backend failing must not hide the others
                        res.row("a", dict(base, backend=backend, error=f"{type(e).__name__}: {e}"[:300], ok=False))
                        worst[(backend, base["dtype"])] = False
                        continue
                    row = dict(
                        base, backend=backend, fwd_maxdiff=_maxdiff(out, ref), sdpa_mask_fwd_maxdiff=_maxdiff(same, ref)
                    )
                    if gs is not None:
                        row["bwd_maxdiff"] = max(_maxdiff(a, r) for a, r in zip(gs, ref_g, strict=True))
                        row["sdpa_mask_bwd_maxdiff"] = max(_maxdiff(a, r) for a, r in zip(same_g, ref_g, strict=True))
                    else:
                        row["bwd_maxdiff"] = "n/a (no flex backward on cpu)"
                    # pass: within 1e-4 in fp32, else within 4x masked SDPA's own error in this dtype (+1e-3)
                    tol_f = 1e-4 if dtype == torch.float32 else 4 * row["sdpa_mask_fwd_maxdiff"] + 1e-3
                    ok = row["fwd_maxdiff"] <= tol_f
                    if gs is not None:
                        tol_b = 1e-4 * max(1.0, max(r.abs().max().item() for r in ref_g))
                        if dtype != torch.float32:
                            tol_b = 4 * row["sdpa_mask_bwd_maxdiff"] + 1e-3
                        ok = ok and row["bwd_maxdiff"] <= tol_b
                    row["ok"] = ok
                    res.row("a", row)
                    key = (backend, base["dtype"])
                    worst[key] = worst.get(key, True) and ok
                del q, kk, v, go, ref, ref_g, same, same_g
                _free(device)
    summary += [f"{bk} {dt}: {'all within tolerance' if ok else 'MISMATCH'}" for (bk, dt), ok in worst.items()]


# --------------------------------------------------------------------------------------------------------------------
# b. attention time
# --------------------------------------------------------------------------------------------------------------------


def time_attention(res: Results, budget: Budget, device, tiny: bool) -> None:
    import torch

    from ditscale.model.attention import attention  # lazy: torch (this module imports it only inside its checks)

    if tiny:
        b, h, d, sides, windows, dtype = 1, 2, 8, (16,), (3,), torch.float32
        backends = ["sdpa_mask", "halo"]
    else:
        # 1024 tokens (the target) first, then DiT-XL/2's 256 and 4096
        b, h, d, sides, windows, dtype = 8, 16, 72, (32, 16, 64), (3, 5, 7, 13), torch.bfloat16
        backends = ["sdpa_mask", "flex", "flex, head dim unpadded", "halo"]
    summary = res.section("b").setdefault("summary", [])
    for side in sides:
        n = side * side
        g = torch.Generator(device=device).manual_seed(0)
        q, kk, v = (torch.randn(b, h, n, d, generator=g, device=device, dtype=dtype).requires_grad_() for _ in range(3))
        go = torch.randn(b, h, n, d, generator=g, device=device, dtype=dtype)

        def fwd_bwd(window, backend, q=q, kk=kk, v=v, go=go, side=side):
            def run():
                if backend == "flex, head dim unpadded":  # can flex take d = 72 as it is? (the model pads to 128)
                    out = _flex_unpadded(q, kk, v, side, window)
                else:
                    out = attention(q, kk, v, (side, side), window, backend)
                torch.autograd.backward(out, go)
                q.grad = kk.grad = v.grad = None

            return run

        budget.need(5, f"{n} tokens")
        dense = time_ms(fwd_bwd(None, "auto"), device)
        res.row("b", {"tokens": n, "k": "global", "backend": "sdpa (dense, flash)", "ms": dense})
        for k in windows:
            times = {}
            for backend in backends:
                budget.need(5, f"{backend} {n} tokens k={k}")
                try:
                    times[backend] = time_ms(fwd_bwd(k, backend), device)
                except Exception as e:  # one backend failing must not hide the others
                    res.row("b", {"tokens": n, "k": k, "backend": backend, "error": f"{type(e).__name__}: {e}"[:300]})
                    continue
                row = {
                    "tokens": n,
                    "k": k,
                    "backend": backend,
                    "ms": times[backend],
                    "speedup_vs_dense": dense / times[backend],
                }
                if backend != "sdpa_mask" and "sdpa_mask" in times:
                    row["speedup_vs_sdpa_mask"] = times["sdpa_mask"] / times[backend]
                res.row("b", row)
            if "flex" in times and "sdpa_mask" in times and n == 1024 and k <= 7:
                s = times["sdpa_mask"] / times["flex"]
                summary.append(
                    f"flex vs masked SDPA, 1024 tokens, k={k}: {s:.2f}x (target >= 3x: {'' if s >= 3 else 'not '}met)"
                )
        del q, kk, v, go
        _free(device)


_FLEX_UNPADDED = None


def _flex_unpadded(q, k, v, side: int, window: int):
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    from ditscale.model.attention import _block_mask  # lazy: torch (this module imports it only inside its checks)

    global _FLEX_UNPADDED
    if _FLEX_UNPADDED is None:
        _FLEX_UNPADDED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_UNPADDED(q, k, v, block_mask=_block_mask(side, side, window, q.device))


# --------------------------------------------------------------------------------------------------------------------
# c, d. a DiT training step (plain PyTorch: bf16 autocast, fused AdamW, the diffusion loss)
# --------------------------------------------------------------------------------------------------------------------


def time_model_step(model, batch: int, device, steps: int, warmup: int, compiled: tuple[str, bool] | None) -> dict:
    """ms per training step (after `warmup` steps, which include any compilation), images/s, peak memory.
    `compiled`: (torch.compile backend, fullgraph) or None for eager."""
    import torch

    from ditscale.diffusion import create_diffusion  # lazy: torch (this module imports it only inside its checks)

    torch.manual_seed(0)
    m = model.to(device).train()
    opt = torch.optim.AdamW(
        m.parameters(), lr=1e-4, weight_decay=0, **({"fused": True} if device.type == "cuda" else {})
    )
    fn = m
    if compiled:
        fn = torch.compile(m, backend=compiled[0], fullgraph=compiled[1])
    diffusion = create_diffusion("")
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, m.in_channels, m.input_size, m.input_size, generator=g, device=device)
    y = torch.randint(0, m.num_classes, (batch,), generator=g, device=device)
    t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=g, device=device)
    noise = torch.randn(x.shape, generator=g, device=device)
    bf16 = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion.training_losses(fn, x, t, {"y": y}, noise=noise)["loss"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    _sync(device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    out = {"step_ms": dt * 1e3, "images_per_s": batch / dt, "warmup_s": first, "loss": loss.item()}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def model_section(key: str, res: Results, budget: Budget, device, tiny: bool, args) -> None:
    import torch

    from ditscale.model import DiT_models  # lazy: torch (this module imports it only inside its checks)

    if key == "c":
        batch = args.xl_batch
        if batch is None:
            big = device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory >= 100 * 2**30
            batch = 128 if big else 64
        variant, size, chans, classes = "DiT-XL/2", 32, 4, 1000
        if tiny:
            variant, size, batch = "DiT-T/2", 8, 4
    else:
        variant, size, chans, classes, batch = "DiT-XS/1", 32, 3, 10, args.xs_batch
        if tiny:
            variant, size, batch = "DiT-T/1", 8, 4
    steps, warmup = (2, 1) if tiny else (10, 3)
    peak = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    backend = "inductor" if device.type == "cuda" else "aot_eager"  # CPU: trace and run, without a C++ build
    summary = res.section(key).setdefault("summary", [])
    found: dict = {}
    local = "3,5@head" if tiny else "local@head"  # the tiny variants have 4 blocks
    for mode in ("eager", "compiled"):
        for windows in ("global", local):
            need = 10 if tiny else (30 if mode == "eager" else 90)
            label = mode
            try:
                budget.need(need, f"{variant} {windows} {mode}")
                model = DiT_models[variant](input_size=size, in_channels=chans, num_classes=classes, windows=windows)
                compiled = (backend, True) if mode == "compiled" else None
                try:
                    r = time_model_step(model, batch, device, steps, warmup, compiled)
                except Exception as e:
                    if mode != "compiled" or budget.left() < need:
                        raise
                    # fullgraph failed (a graph break on this device): say so, then measure with breaks allowed
                    res.row(
                        key,
                        {
                            "model": variant,
                            "windows": windows,
                            "mode": "compiled, fullgraph",
                            "error": f"{type(e).__name__}: {e}"[:400],
                        },
                    )
                    model = DiT_models[variant](
                        input_size=size, in_channels=chans, num_classes=classes, windows=windows
                    )
                    label = "compiled (graph breaks)"
                    r = time_model_step(model, batch, device, steps, warmup, (backend, False))
            except OutOfBudget as e:
                res.row(key, {"model": variant, "windows": windows, "mode": label, "skipped": str(e)})
                continue
            except Exception as e:
                res.row(
                    key,
                    {"model": variant, "windows": windows, "mode": label, "error": f"{type(e).__name__}: {e}"[:400]},
                )
                continue
            finally:
                model = None
                _free(device)
            with torch.device("meta"):  # the FLOP count needs the architecture, not the weights
                flops = DiT_models[variant](input_size=size, in_channels=chans, num_classes=classes, windows=windows)
            tflops = flops.flops_per_image() * r["images_per_s"] / 1e12
            row = {"model": variant, "windows": windows, "mode": label, "batch": batch, **r, "tflops": tflops}
            if peak:
                row["mfu"] = tflops / peak
            res.row(key, row)
            found[(windows, mode)] = row
    for mode in ("eager", "compiled"):
        g, w = found.get(("global", mode)), found.get((local, mode))
        if g and w:
            ratio = w["images_per_s"] / g["images_per_s"]
            summary.append(f"{mode}: {local} / global images/s = {ratio:.2f} (target for DiT-XL/2: >= 1)")
    mfus = [r["mfu"] for r in found.values() if r.get("mfu") is not None]
    if mfus:
        summary.append(f"best MFU {max(mfus):.1%} (target for DiT-XL/2: >= 40%)")


# --------------------------------------------------------------------------------------------------------------------
# e. the trainer, as a subprocess
# --------------------------------------------------------------------------------------------------------------------


def trainer_section(res: Results, budget: Budget, device, tiny: bool) -> None:
    import torch

    from ditscale.data import build_shards  # lazy: torch (this module imports it only inside its checks)

    work = Path(tempfile.mkdtemp(prefix="ditscale-gpu-check-"))
    try:
        gpus = torch.cuda.device_count() if device.type == "cuda" else 1
        size, chans = (8, 1) if tiny else (32, 3)
        t0 = time.perf_counter()
        build_shards("digits", None, str(work / "digits"), size, channels=chans, progress=False)
        res.row("e", {"stage": "shards", "seconds": time.perf_counter() - t0, "images": "1,797 digits", "size": size})
        micro = 8 if tiny else 64
        steps1, steps2, every = (4, 6, 2) if tiny else (20, 30, 10)
        cfg = {
            "run": {"name": "gpu-check", "seed": 0, "dir": str(work / "run")},
            "model": {
                "variant": "DiT-T/1" if tiny else "DiT-S/2",
                "windows": "3,5@head" if tiny else "local@head",
                "input_size": size,
                "in_channels": chans,
                "num_classes": 10,
            },
            "diffusion": {"sample_steps": 10},
            "data": {"train": str(work / "digits" / "manifest.json"), "shuffle_buffer": 100, "flip": False},
            "train": {
                "steps": steps1,
                "global_batch": micro * gpus,
                "micro_batch": micro,
                "zero_stage": 2,
                "precision": "auto",
            },
            "checkpoint": {"every": every, "keep": 3},
            "log": {"every": 1, "sample_every": 0, "metrics_port": 0, "progress": False},
        }
        cfg_path = work / "config.json"  # JSON is YAML
        cfg_path.write_text(json.dumps(cfg, indent=1))
        cmd = [sys.executable, "-m", "ditscale", "train", "--config", str(cfg_path)]
        if gpus > 1:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={gpus}",
                "-m",
                "ditscale",
                "train",
                "--config",
                str(cfg_path),
            ]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        run_dir = work / "run"
        first = _train(res, cmd, env, budget, f"train {steps1} steps", tiny)
        ckpts = _checkpoints(run_dir)
        second = _train(res, [*cmd, f"train.steps={steps2}"], env, budget, f"resume to {steps2} steps", tiny)
        after = _checkpoints(run_dir)
        losses = {}
        with open(run_dir / "metrics.jsonl") as f:
            for ln in f:
                rec = json.loads(ln)
                if "loss" in rec:
                    losses[int(rec["step"])] = float(rec["loss"])
        finite = bool(losses) and all(math.isfinite(v) for v in losses.values())
        untouched = [n for n, mt in ckpts.items() if after.get(n) == mt]
        new = sorted(set(after) - set(ckpts))
        resumed = bool(ckpts) and len(untouched) == len(ckpts) and bool(new)
        ips = [json.loads(ln).get("images_per_second") for ln in open(run_dir / "metrics.jsonl")]
        ips = [x for x in ips if isinstance(x, (int, float))]
        res.row(
            "e",
            {
                "stage": "checks",
                "losses_logged": len(losses),
                "last_step": max(losses, default=0),
                "losses_finite": finite,
                "loss_first": losses.get(min(losses, default=0)),
                "loss_last": losses.get(max(losses, default=0)),
                "checkpoints_after_first": " ".join(ckpts),
                "checkpoints_after_resume": " ".join(after),
                "resumed_not_restarted": resumed,
                "median_images_per_s": statistics.median(ips) if ips else None,
                "processes": gpus,
                "backend": "nccl" if device.type == "cuda" else "gloo",
            },
        )
        ok = first == 0 and second == 0 and finite and resumed and max(losses, default=0) == steps2
        res.section("e")["summary"] = [f"trainer: {'ok' if ok else 'FAILED'} (exit codes {first}, {second})"]
        if not ok:
            raise RuntimeError("trainer check failed: see the rows (exit codes, losses, checkpoints) and the log tails")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _checkpoints(run_dir: Path) -> dict[str, int]:
    """Checkpoint directories (whatever their naming) and their modification times."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def _train(res: Results, cmd: list[str], env: dict, budget: Budget, stage: str, tiny: bool) -> int:
    budget.need(15 if tiny else 40, stage)
    t0 = time.perf_counter()
    print(f"[e] $ {' '.join(cmd)}", flush=True)
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(budget.left(), 10))
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, f"{e.stdout or ''}{e.stderr or ''}"
        out = out.decode() if isinstance(out, bytes) else out
    tail = [ln for ln in out.splitlines() if ln.strip() and "[WARNING]" not in ln][-12:]
    res.row("e", {"stage": stage, "exit_code": rc, "seconds": time.perf_counter() - t0, "log_tail": " // ".join(tail)})
    return rc


# --------------------------------------------------------------------------------------------------------------------


def run(args) -> int:
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = args.tiny or device.type != "cuda"
    only = [s for s in args.only.replace(",", "") if s in SECTIONS]
    if not only:
        raise SystemExit(f"--only {args.only!r}: expected letters among {''.join(SECTIONS)}")
    # Every shape, dtype and head dim compiles flex once more: allow more than dynamo's default 8 per function.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    threads = torch.get_num_threads()
    if tiny and device.type == "cpu":  # tiny shapes gain nothing from threads, and lose much on a busy machine
        torch.set_num_threads(1)
    try:
        return _run(args, device, tiny, only)
    finally:
        torch.set_num_threads(threads)


def _run(args, device, tiny: bool, only: list[str]) -> int:
    import torch

    res = Results(Path(args.out), machine_info(device) | {"tiny": tiny}, args.budget)
    print(
        f"bench gpu: sections {''.join(only)}, budget {args.budget:.0f} s, out {args.out}, "
        f"{'tiny' if tiny else 'full'} on {device}",
        flush=True,
    )
    failed = []
    for key in only:
        budget = Budget(args.budget * BUDGET[key] / sum(BUDGET[k] for k in only))
        sec = res.section(key)
        print(f"== {key}. {SECTIONS[key]} (budget {budget.left():.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            # a compares fp32 results to 1e-4: no TF32 there; the timed sections use TF32 for fp32 work, as training
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = key != "a"
            if key == "a":
                check_correctness(res, budget, device, tiny)
            elif key == "b":
                time_attention(res, budget, device, tiny)
            elif key in "cd":
                model_section(key, res, budget, device, tiny, args)
            else:
                trainer_section(res, budget, device, tiny)
            sec["status"] = "ok"
        except OutOfBudget as e:
            sec["status"] = "partial (time budget)"
            sec["error"] = str(e)
        except Exception as e:
            sec["status"] = "error"
            sec["error"] = "".join(traceback.format_exception(e)[-6:])[-2000:]
            failed.append(key)
            print(sec["error"], flush=True)
        sec["seconds"] = time.perf_counter() - t0
        res.write()
        _free(device)
    print(f"bench gpu: wrote {Path(args.out) / 'bench-gpu.json'} and bench-gpu.md", flush=True)
    return 1 if failed else 0
