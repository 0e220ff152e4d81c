"""`python -m ditscale bench attention`: forward+backward time of each attention backend vs dense attention, and of
a whole small DiT with k=3 windows on every block vs the global model.

Timings are interleaved round-robin (every configuration runs once per round), so that load from other processes
on a shared machine hits all of them alike; the table shows the median over rounds.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch

from ditscale.model import autotune
from ditscale.model.attention import choose_tile, qkv_attention
from ditscale.model.dit import DiT


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_CLOCK = time.perf_counter


def _time_round_robin(fns: dict[str, callable], repeat: int, device: torch.device, warmup: int = 2) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            _sync(device)
            t0 = _CLOCK()
            fn()
            _sync(device)
            times[name].append((_CLOCK() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _attention_rows(n: int, windows: list[int], args, device: torch.device) -> list[tuple]:
    side = math.isqrt(n)
    if side * side != n:
        raise SystemExit(f"--tokens {n}: expected a square number of tokens")
    grid = (side, side)
    # every backend starts from the packed projection (B, N, 3, heads, d) and returns (B, N, heads * d), as in a block
    qkv = torch.randn(args.batch, n, 3, args.heads, args.head_dim, device=device, requires_grad=True)
    g = torch.randn(args.batch, n, args.heads * args.head_dim, device=device)

    def fwd_bwd(window, backend):
        def run():
            torch.autograd.backward(qkv_attention(qkv, grid, window, backend), g)
            qkv.grad = None

        return run

    fns = {("global", "sdpa (dense)"): fwd_bwd(None, "auto")}
    for w in windows:
        fns[(w, "sdpa_mask")] = fwd_bwd(w, "sdpa_mask")
        fns[(w, "halo")] = fwd_bwd(w, "halo")
        if device.type == "cuda":
            fns[(w, "flex")] = fwd_bwd(w, "flex")
    repeat = args.repeat if n <= 1024 else max(2, args.repeat // 3)
    med = _time_round_robin(fns, repeat, device, warmup=2 if n <= 1024 else 1)  # the warm-up measures the tiles
    dense = med[("global", "sdpa (dense)")]
    rows = []
    for (w, backend), ms in med.items():
        note = ""
        if backend == "halo" and w != "global":
            note = tile_note(side, w, args.heads, args.head_dim, torch.float32, device, args.batch)
        rows.append((n, w, backend, ms, ms / dense, note))
    return rows


def tile_note(
    side: int, w: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, batch: int
) -> str:
    """The halo tile in use for this problem, with the times that chose it (tile: fwd+bwd CPU or GPU ms)."""
    if (w - 1) // 2 >= side - 1:
        return "window covers grid: global"
    t = choose_tile(side, side, w, heads, head_dim, dtype, device, batch)
    key = autotune.make_key(
        "halo", device, grid=f"{side}x{side}", k=w, heads=heads, d=head_dim, dtype=str(dtype).removeprefix("torch.")
    )
    times = autotune.timings(key)
    note = f"tile {t}" if t else "dense fallback"
    if times:
        note += " (measured: " + ", ".join(f"{c or 'dense'} {ms:.1f}" for c, ms in sorted(times.items())) + ")"
    return note


def _model_rows(args, device: torch.device) -> list[tuple]:
    torch.manual_seed(0)
    kw = dict(input_size=32, patch_size=1, in_channels=3, hidden_size=252, depth=4, num_heads=4, num_classes=10)
    models = {
        "global": DiT(**kw, windows=None).to(device),
        "k=3 on every block (halo)": DiT(**kw, windows=[3] * 4, attention_backend="halo").to(device),
        "k=3 on every block (sdpa_mask)": DiT(**kw, windows=[3] * 4, attention_backend="sdpa_mask").to(device),
    }
    if device.type == "cuda":
        models["k=3 on every block (flex)"] = DiT(**kw, windows=[3] * 4, attention_backend="flex").to(device)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def step(m):
        def run():
            m.zero_grad(set_to_none=True)
            m(x, t, y).square().mean().backward()

        return run

    med = _time_round_robin({name: step(m) for name, m in models.items()}, args.model_repeat, device)
    base = med["global"]
    return [(name, ms, ms / base) for name, ms in med.items()]


def run(args) -> int:
    global _CLOCK
    _CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autotune.forget(refresh=args.retune)
    for w in args.windows:
        if w < 1 or w % 2 == 0:
            raise SystemExit(f"--windows {w}: window sizes must be odd and >= 1")
    for n in args.tokens:
        if n < 1 or math.isqrt(n) ** 2 != n:
            raise SystemExit(f"--tokens {n}: expected a square number of tokens (a square grid)")
    name = autotune.device_name(device)
    print(
        f"# bench attention: torch {torch.__version__}, device {device} ({name}), {torch.get_num_threads()} threads; "
        f"batch {args.batch}, heads {args.heads}, head dim {args.head_dim}, fp32, forward+backward, "
        f"median of {args.repeat} interleaved rounds, {args.clock} clock; load average {_load()}\n"
    )
    if not args.no_attention:
        print("| tokens | window | backend | fwd+bwd ms | vs dense | note |")
        print("|---:|---:|---|---:|---:|---|")
    for n in [] if args.no_attention else args.tokens:
        for n_, w, backend, ms, ratio, note in _attention_rows(n, args.windows, args, device):
            print(f"| {n_} | {w} | {backend} | {ms:.1f} | {ratio:.2f}x | {note} |", flush=True)
    if not args.no_model:
        print(
            f"\n# whole model: DiT depth 4, hidden 252, 4 heads, 32x32x3 pixels, patch 1 (1024 tokens), batch "
            f"{args.batch}; forward+backward, median of {args.model_repeat} interleaved rounds, {args.clock} clock\n"
        )
        print("| model | fwd+bwd ms | vs global |")
        print("|---|---:|---:|")
        for label, ms, ratio in _model_rows(args, device):
            print(f"| {label} | {ms:.1f} | {ratio:.2f}x |", flush=True)
    print(f"\n# load average at the end: {_load()}")
    return 0


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"
