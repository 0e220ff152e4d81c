"""Attention for DiT blocks: global, or a border-clipped k x k window on the 2-D token grid.

A query at grid position (r, c) attends exactly to the keys (r', c') with |r - r'| <= (k-1)/2 and
|c - c'| <= (k-1)/2 (a Chebyshev ball, clipped at the border, never shifted). Backends, all with the same semantics:

* `sdpa_mask`: dense `scaled_dot_product_attention` with a boolean (N, N) window mask. The reference: it states the
  semantics plainly and does all N^2 work.
* `halo`: query tiles of t x t tokens against keys from the (t + k - 1)^2 halo around each tile, as small batched
  matmuls with a per-tile additive mask (HaloNet-style). Cost O(N (t+k-1)^2) instead of O(N^2). A custom autograd
  function keeps every matmul on contiguous tiles and folds the halo gradients back with a few strided adds.
  Works for any grid and any k (k larger than the grid included). CPU default.
* `flex`: FlexAttention with a block-sparse BlockMask cached per (H, W, k, device), compiled on CUDA. On CPU it runs
  forward only (eager), for testing. CUDA default.
* global blocks (window None) always use plain `scaled_dot_product_attention` (flash / efficient kernels on GPU).

`auto` picks flex on CUDA and halo elsewhere.
"""

from __future__ import annotations

import math
import os
import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F

from ditscale.errors import ConfigError
from ditscale.model import autotune

BACKENDS = ("auto", "sdpa_mask", "flex", "halo")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention_backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "flex" if device.type == "cuda" else "halo"
    return backend


# --------------------------------------------------------------------------------------------------------------------
# Reference: dense SDPA with a boolean window mask
# --------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _window_mask_cached(h: int, w: int, k: int, device: torch.device) -> torch.Tensor:
    r = (k - 1) // 2
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return ((rows[:, None] - rows[None, :]).abs() <= r) & ((cols[:, None] - cols[None, :]).abs() <= r)


def window_mask(h: int, w: int, k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean (N, N) mask, True where query i may attend to key j (row-major tokens on an h x w grid)."""
    return _window_mask_cached(h, w, k, torch.device(device))


def sdpa_mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], window: int):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(grid[0], grid[1], window, q.device))


# --------------------------------------------------------------------------------------------------------------------
# Halo tiles (CPU)
# --------------------------------------------------------------------------------------------------------------------

_TILE_CANDIDATES = (4, 6, 8, 12, 16)
# A cost model, used as the prior of the measurement (its order, its tie-break), and alone where nothing is measured
# (grids under MEASURE_MIN_TOKENS, DITSCALE_HALO_TILE=model): padded tokens x halo keys x a per-tile-size factor
# (small tiles make small, less efficient matmuls) plus a fixed overhead, against N^2 x a factor for dense masked
# SDPA. Rough fits to fwd+bwd CPU times of this kernel (1024 tokens, k = 3 and 7, batch 1-2, a 2-core Xeon, torch
# 2.13); the measurement decides where it matters.
_TILE_EFFICIENCY = {4: 2.2, 6: 1.4, 8: 1.0, 12: 0.7, 16: 0.65}
_DENSE_EFFICIENCY = 0.42
_TILE_OVERHEAD = 6000
MEASURE_MIN_TOKENS = 256  # smaller grids: the cost model alone (dense masked SDPA almost always; deterministic)
MEASURE_MAX_BATCH = 8  # the tiles are timed at the caller's batch, up to this


def estimate_cost(h: int, w: int, k: int, t: int) -> float:
    """Estimated fwd+bwd cost of tile side t (0: dense masked SDPA) in the cost model's units."""
    if t == 0:
        return _DENSE_EFFICIENCY * (h * w) ** 2
    n_tiles = math.ceil(h / t) * math.ceil(w / t)
    return n_tiles * t * t * (t + k - 1) ** 2 * _TILE_EFFICIENCY[t] + _TILE_OVERHEAD


def tile_candidates(h: int, w: int, k: int) -> list[int]:
    """Tile sides worth timing for a k x k window on an h x w grid; 0 stands for dense masked SDPA, kept where the
    grid is not much larger than the smallest halo (beyond that dense cannot win, and is slow to time)."""
    tiles = [t for t in _TILE_CANDIDATES if t <= max(h, w) and math.ceil(h / t) * math.ceil(w / t) >= 2]
    if not tiles or h * w <= 8 * (tiles[0] + k - 1) ** 2:
        tiles.insert(0, 0)
    return tiles


def estimate_tile(h: int, w: int, k: int) -> int:
    """The cost model's tile side for a k x k window on an h x w grid, or 0 when dense masked attention is cheaper."""
    return min(tile_candidates(h, w, k), key=lambda t: (estimate_cost(h, w, k, t), t))


@torch.compiler.assume_constant_result  # torch.compile runs it at trace time (a constant in the graph, no break)
def choose_tile(
    h: int,
    w: int,
    k: int,
    heads: int | None = None,
    head_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    batch: int = 1,
) -> int:
    """The tile side t for a k x k window on an h x w grid, or 0 for dense masked attention.

    Timed once per (grid, k, heads, head dim, dtype, device) on random data: forward + backward of every candidate
    at the batch of the call that asks first, up to MEASURE_MAX_BATCH (the halo copies outgrow the caches as the
    batch grows, which can change the winner); see ditscale.model.autotune. Cached in memory and on disk. The cost
    model alone without heads/head_dim, for grids under MEASURE_MIN_TOKENS tokens, or with
    DITSCALE_HALO_TILE=model; DITSCALE_HALO_TILE=T forces T.
    """
    mode = os.environ.get("DITSCALE_HALO_TILE", "auto").strip().lower()
    if mode not in ("", "auto", "model"):
        try:
            return int(mode)
        except ValueError:
            raise ConfigError(f"DITSCALE_HALO_TILE={mode!r}: expected auto, model or a tile side (0: dense)") from None
    cands = tile_candidates(h, w, k)
    if mode == "model" or heads is None or head_dim is None or h * w < MEASURE_MIN_TOKENS or len(cands) == 1:
        return estimate_tile(h, w, k)
    device = torch.device(device)
    key = autotune.make_key(
        "halo", device, grid=f"{h}x{w}", k=k, heads=heads, d=head_dim, dtype=str(dtype).removeprefix("torch.")
    )

    def make_run(t: int):
        # a private generator: timing must not move the global RNG (exact resume, reproducible runs)
        gen = torch.Generator(device=device).manual_seed(0)
        b = max(1, min(batch, MEASURE_MAX_BATCH))
        qkv = torch.randn(b, h * w, 3, heads, head_dim, generator=gen, device=device, dtype=dtype).requires_grad_()
        grad = torch.randn(b, h * w, heads, head_dim, generator=gen, device=device, dtype=dtype)

        def run():
            halo_qkv_attention(qkv, (h, w), k, tile=t).backward(grad)
            qkv.grad = None

        return run

    prior = lambda t: estimate_cost(h, w, k, t)
    return autotune.choose(key, cands, make_run, prior, device, {"batch": max(1, min(batch, MEASURE_MAX_BATCH))})


@lru_cache(maxsize=64)
def _halo_bias(h: int, w: int, k: int, t: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (nT, t*t, th*th): 0 where tile query a may attend halo key c, -inf elsewhere.

    Keys outside the grid and outside the query's window are masked. Padding queries (beyond the grid) see every
    halo key, so that their softmax is finite; their outputs are dropped.
    """
    r = (k - 1) // 2
    th = t + 2 * r
    n_h, n_w = -(-h // t), -(-w // t)

    def axis(n_tiles: int, size: int) -> torch.Tensor:
        tile = torch.arange(n_tiles)[:, None]
        q = tile * t + torch.arange(t)[None, :]  # (n, t) query coordinate
        kk = tile * t + torch.arange(th)[None, :] - r  # (n, th) key coordinate
        ok = ((q[:, :, None] - kk[:, None, :]).abs() <= r) & (kk[:, None, :] >= 0) & (kk[:, None, :] < size)
        return ok | (q[:, :, None] >= size)

    rows, cols = axis(n_h, h), axis(n_w, w)  # (n_h, t, th), (n_w, t, th)
    ok = rows[:, None, :, None, :, None] & cols[None, :, None, :, None, :]  # (n_h, n_w, t, t, th, th)
    ok = ok.reshape(n_h * n_w, t * t, th * th)
    bias = torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, float("-inf"))
    return bias.to(device)


def _tile(x: torch.Tensor, t: int, n_h: int, n_w: int) -> torch.Tensor:
    """Grid layout (B, H, W, h, d) (any strides) -> contiguous tiles (B, h, nT, t*t, d), zero-padded; one copy when
    the grid is a multiple of t."""
    b, hh, ww, nh, d = x.shape
    if n_h * t != hh or n_w * t != ww:
        x = F.pad(x, (0, 0, 0, 0, 0, n_w * t - ww, 0, n_h * t - hh))
    out = x.new_empty(b, nh, n_h, n_w, t, t, d)
    out.copy_(x.unflatten(2, (n_w, t)).unflatten(1, (n_h, t)).permute(0, 5, 1, 3, 2, 4, 6))
    return out.view(b, nh, n_h * n_w, t * t, d)


def _untile(xt: torch.Tensor, t: int, n_h: int, n_w: int, out: torch.Tensor) -> torch.Tensor:
    """Tiles (B, h, nT, t*t, d) -> grid layout `out` (B, H, W, h, d) (any strides), dropping the padding."""
    b, nh, _, _, d = xt.shape
    hh, ww = out.shape[1], out.shape[2]
    src = xt.view(b, nh, n_h, n_w, t, t, d).permute(0, 2, 4, 3, 5, 1, 6)  # (B, n_h, t, n_w, t, h, d)
    if n_h * t == hh and n_w * t == ww:
        out.unflatten(2, (n_w, t)).unflatten(1, (n_h, t)).copy_(src)
    else:
        out.copy_(src.reshape(b, n_h * t, n_w * t, nh, d)[:, :hh, :ww])
    return out


def _halos(kv: torch.Tensor, t: int, r: int, n_h: int, n_w: int) -> torch.Tensor:
    """k and v in grid layout (B, H, W, 2, h, d) (any strides) -> contiguous halos (2, B, h, nT, th*th, d),
    th = t + 2r: the neighbourhood of every tile, zero outside the grid.

    Two copies: into a zero-bordered head-major grid (2, B, h, Hp, Wp, d), where a halo row is th*d contiguous
    floats, then every tile's halo out of it (long contiguous runs instead of one run of d per key)."""
    b, hh, ww, _, nh, d = kv.shape
    th = t + 2 * r
    hp, wp = n_h * t + 2 * r, n_w * t + 2 * r
    grid = kv.new_empty(2, b, nh, hp, wp, d)
    grid[:, :, :, :r].zero_()
    grid[:, :, :, r + hh :].zero_()
    grid[:, :, :, r : r + hh, :r].zero_()
    grid[:, :, :, r : r + hh, r + ww :].zero_()
    grid[:, :, :, r : r + hh, r : r + ww].copy_(kv.permute(3, 0, 4, 1, 2, 5))
    out = kv.new_empty(2, b, nh, n_h, n_w, th, th, d)
    out.copy_(grid.unfold(3, th, t).unfold(4, th, t).permute(0, 1, 2, 3, 4, 6, 7, 5))
    return out.view(2, b, nh, n_h * n_w, th * th, d)


def _fold(g: torch.Tensor, t: int, r: int, n_h: int, n_w: int, out: torch.Tensor) -> torch.Tensor:
    """Adjoint of _halos: halo gradients (2, B, h, nT, th*th, d) -> summed into grid layout `out` (B, H, W, 2, h, d).

    The halo offsets [0, th) of each axis are cut into chunks of t; for one pair of chunks (rows, columns) the tiles
    land on disjoint positions of the padded grid, so each pair is one strided copy (the first) or add (the others).
    """
    two, b, nh, _, _, d = g.shape
    hh, ww = out.shape[1], out.shape[2]
    th = t + 2 * r
    nc = -(-th // t)
    g = g.view(two, b, nh, n_h, n_w, th, th, d)
    grid = g.new_empty(two, b, nh, n_h + nc, t, n_w + nc, t, d)
    grid[:, :, :, n_h:].zero_()  # the first chunk pair covers [0, n_h t) x [0, n_w t)
    grid[:, :, :, :n_h, :, n_w:].zero_()
    for i in range(nc):
        si = min(t, th - i * t)
        for j in range(nc):
            sj = min(t, th - j * t)
            src = g[:, :, :, :, :, i * t : i * t + si, j * t : j * t + sj].permute(0, 1, 2, 3, 5, 4, 6, 7)
            dst = grid[:, :, :, i : i + n_h, :si, j : j + n_w, :sj]
            if i == 0 and j == 0:
                dst.copy_(src)
            else:
                dst.add_(src)
    grid = grid.view(two, b, nh, (n_h + nc) * t, (n_w + nc) * t, d)
    out.copy_(grid[:, :, :, r : r + hh, r : r + ww].permute(1, 3, 4, 0, 2, 5))
    return out


class _HaloAttention(torch.autograd.Function):
    """qkv (B, N, 3, heads, d) -> attention output (B, N, heads, d); N = H*W tokens, row-major."""

    @staticmethod
    def forward(ctx, qkv, grid, window, t):
        with torch.autocast(qkv.device.type, enabled=False):  # compute in qkv's dtype, as the backward does
            return _HaloAttention._forward(ctx, qkv, grid, window, t)

    @staticmethod
    def _forward(ctx, qkv, grid, window, t):
        b, n, _, nh, d = qkv.shape
        hh, ww = grid
        r = (window - 1) // 2
        n_h, n_w = -(-hh // t), -(-ww // t)
        z, tt, th2 = b * nh * n_h * n_w, t * t, (t + 2 * r) ** 2  # batched matmuls: z tiles of tt queries, th2 keys
        # torch.compile traces the mask's construction into the graph (a small fused kernel) rather than the cache
        make_bias = _halo_bias.__wrapped__ if torch.compiler.is_compiling() else _halo_bias
        bias = make_bias(hh, ww, window, t, qkv.device, qkv.dtype)  # (nT, tt, th2)
        x = qkv.view(b, hh, ww, 3, nh, d)
        qt = _tile(x[:, :, :, 0], t, n_h, n_w).view(z, tt, d)
        kt, vt = (a.view(z, th2, d) for a in _halos(x[:, :, :, 1:], t, r, n_h, n_w).unbind(0))
        s = torch.baddbmm(qt.new_empty(()), qt, kt.transpose(1, 2), beta=0, alpha=d**-0.5)
        s.view(b * nh, n_h * n_w, tt, th2).add_(bias)
        p = torch.softmax(s, dim=-1)
        del s
        ot = torch.bmm(p, vt).view(b, nh, n_h * n_w, tt, d)
        ctx.save_for_backward(qt, kt, vt, p)
        ctx.meta = (hh, ww, r, t, n_h, n_w)
        return _untile(ot, t, n_h, n_w, qkv.new_empty(b, hh, ww, nh, d)).view(b, n, nh, d)

    @staticmethod
    def backward(ctx, grad_out):
        qt, kt, vt, p = ctx.saved_tensors  # (z, tt, d), (z, th2, d), (z, th2, d), (z, tt, th2)
        hh, ww, r, t, n_h, n_w = ctx.meta
        b, n, nh, d = grad_out.shape
        got = _tile(grad_out.reshape(b, hh, ww, nh, d), t, n_h, n_w).view(qt.shape)
        dkv = kt.new_empty((2,) + kt.shape)  # dk, dv: halo gradients, folded back onto the grid below
        torch.bmm(p.transpose(1, 2), got, out=dkv[1])
        dp = torch.bmm(got, vt.transpose(1, 2))
        ds = torch._softmax_backward_data(dp, p, -1, p.dtype)  # P * (dP - rowsum(dP * P)), one fused pass
        del dp
        ds.mul_(d**-0.5)  # the scale of q k^T, once for dq and dk
        torch.bmm(ds.transpose(1, 2), qt, out=dkv[0])
        dqt = torch.bmm(ds, kt).view(b, nh, n_h * n_w, t * t, d)
        dqkv = grad_out.new_empty(b, hh, ww, 3, nh, d)
        _untile(dqt, t, n_h, n_w, dqkv[:, :, :, 0])
        _fold(dkv.view(2, b, nh, n_h * n_w, -1, d), t, r, n_h, n_w, dqkv[:, :, :, 1:])
        return dqkv.view(b, n, 3, nh, d), None, None, None


def halo_qkv_attention(qkv: torch.Tensor, grid: tuple[int, int], window: int, tile: int | None = None):
    """Windowed attention by halo tiles from the packed projection qkv (B, N, 3, heads, d) -> (B, N, heads, d).

    `tile` overrides the automatic tile size; a window covering the grid runs global SDPA, a grid too small for
    tiles runs the masked dense path."""
    hh, ww = grid
    if (window - 1) // 2 >= max(hh, ww) - 1:  # the window covers the whole grid from every position: global
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    if tile is None:
        b = qkv.shape[0] if isinstance(qkv.shape[0], int) else 1  # (symbolic under torch.compile's dynamic shapes)
        tile = choose_tile(hh, ww, window, qkv.shape[3], qkv.shape[4], qkv.dtype, qkv.device, b)
    t = tile
    if t == 0:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return sdpa_mask_attention(q, k, v, grid, window).transpose(1, 2)
    return _HaloAttention.apply(qkv.contiguous(), (hh, ww), window, t)


def halo_attention(q, k, v, grid: tuple[int, int], window: int, tile: int | None = None) -> torch.Tensor:
    """Windowed attention by halo tiles; q, k, v (B, heads, H*W, d) -> (B, heads, H*W, d)."""
    qkv = torch.stack([q, k, v], dim=0).permute(1, 3, 0, 2, 4)  # (B, N, 3, heads, d)
    return halo_qkv_attention(qkv, grid, window, tile).transpose(1, 2)


# --------------------------------------------------------------------------------------------------------------------
# FlexAttention (CUDA; CPU forward only)
# --------------------------------------------------------------------------------------------------------------------

_BLOCK_MASKS: dict = {}
_COMPILED_FLEX = None


def _block_mask(hh: int, ww: int, window: int, device: torch.device):
    key = (hh, ww, window, str(device))
    bm = _BLOCK_MASKS.get(key)
    if bm is None:
        from torch.nn.attention.flex_attention import create_block_mask

        r = (window - 1) // 2

        def mask_mod(b, h, q_idx, kv_idx):
            return ((q_idx // ww - kv_idx // ww).abs() <= r) & ((q_idx % ww - kv_idx % ww).abs() <= r)

        bm = create_block_mask(mask_mod, B=None, H=None, Q_LEN=hh * ww, KV_LEN=hh * ww, device=device)
        _BLOCK_MASKS[key] = bm
    return bm


def flex_attention(q, k, v, grid: tuple[int, int], window: int) -> torch.Tensor:
    """Block-sparse FlexAttention; compiled on CUDA, eager (forward only, unfused) elsewhere."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention as _flex

    if q.device.type != "cuda" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ConfigError(
            f"attention_backend 'flex' on {q.device.type}: FlexAttention has no backward there (torch "
            f"{torch.__version__}); use 'halo' (or 'auto') for training, 'flex' on CPU only under torch.no_grad()"
        )
    bm = _block_mask(grid[0], grid[1], window, q.device)
    compiling = torch.compiler.is_compiling()  # inside a compiled model: flex is traced into its graph as it is
    if q.device.type == "cuda":
        if _COMPILED_FLEX is None and not compiling:
            _COMPILED_FLEX = torch.compile(_flex, dynamic=False)
        run = _flex if compiling else _COMPILED_FLEX
        d = q.shape[-1]
        if d < 16 or d & (d - 1):  # the Triton kernels want a power-of-two head dim (DiT-XS has 63): zero-pad
            dp = max(16, 1 << (d - 1).bit_length())
            q, k, v = (F.pad(x, (0, dp - d)) for x in (q, k, v))
            return run(q, k, v, block_mask=bm, scale=d**-0.5)[..., :d]
        return run(q, k, v, block_mask=bm)
    if compiling:
        return _flex(q, k, v, block_mask=bm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _flex(q, k, v, block_mask=bm)


# --------------------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------------------


def qkv_attention(qkv: torch.Tensor, grid: tuple[int, int], window: int | None, backend: str = "auto") -> torch.Tensor:
    """Attention from the packed projection qkv (B, N, 3, heads, d) -> (B, N, heads * d) (what the DiT block uses)."""
    b, n, _, nh, d = qkv.shape
    if window is not None and resolve_backend(backend, qkv.device) == "halo":
        return halo_qkv_attention(qkv, grid, window).reshape(b, n, nh * d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return attention(q, k, v, grid, window, backend).transpose(1, 2).reshape(b, n, nh * d)


def attention(q, k, v, grid: tuple[int, int], window: int | None, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the whole grid (window None) or a k x k window; q, k, v (B, heads, N, d)."""
    if window is None:
        return F.scaled_dot_product_attention(q, k, v)
    backend = resolve_backend(backend, q.device)
    if backend == "sdpa_mask":
        return sdpa_mask_attention(q, k, v, grid, window)
    if backend == "halo":
        return halo_attention(q, k, v, grid, window)
    return flex_attention(q, k, v, grid, window)


def attention_probs(q, k, grid: tuple[int, int], window: int | None) -> torch.Tensor:
    """Explicit attention probabilities (B, heads, N, N) (for capture_attention; O(N^2) memory)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if window is not None:
        s = s.masked_fill(~window_mask(grid[0], grid[1], window, q.device), float("-inf"))
    return s.softmax(dim=-1)
