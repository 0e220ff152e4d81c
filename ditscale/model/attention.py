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
import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F

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

_TILE_CANDIDATES = (4, 5, 6, 7, 8, 10, 12, 16)
# relative per-FLOP cost of the batched matmuls by tile size (small tiles make small, less efficient matmuls);
# measured on a 2-core Xeon with torch 2.13 (see docs/benchmarks-model.md)
_TILE_EFFICIENCY = {4: 2.0, 5: 1.7, 6: 1.35, 7: 1.15, 8: 1.0, 10: 1.0, 12: 1.0, 16: 1.05}
_DENSE_EFFICIENCY = 0.6  # dense SDPA runs fused kernels: cheaper per FLOP than our tiles


def choose_tile(h: int, w: int, k: int) -> int:
    """The tile side t for a k x k window on an h x w grid, or 0 when dense masked attention is cheaper.

    Estimated cost: padded tokens x halo keys x a per-tile-size efficiency factor, against N^2 for dense.
    """
    r = (k - 1) // 2
    best_t, best_cost = 0, _DENSE_EFFICIENCY * (h * w) ** 2
    for t in _TILE_CANDIDATES:
        if t > max(h, w):
            continue
        n_tiles = math.ceil(h / t) * math.ceil(w / t)
        if n_tiles < 2:
            continue
        cost = n_tiles * t * t * min(t + 2 * r, h + 2 * r) * min(t + 2 * r, w + 2 * r) * _TILE_EFFICIENCY[t]
        if cost < best_cost:
            best_t, best_cost = t, cost
    return best_t


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


def _tile(x: torch.Tensor, t: int, n_h: int, n_w: int, scale: float | None = None) -> torch.Tensor:
    """(B, h, H, W, d) (any strides) -> contiguous (B, h, nT, t*t, d), zero-padded, optionally scaled (one pass)."""
    b, nh, hh, ww, d = x.shape
    if n_h * t != hh or n_w * t != ww:
        x = F.pad(x, (0, 0, 0, n_w * t - ww, 0, n_h * t - hh))
    out = x.new_empty(b, nh, n_h, n_w, t, t, d)
    src = x.view(b, nh, n_h, t, n_w, t, d).permute(0, 1, 2, 4, 3, 5, 6)
    if scale is None:
        out.copy_(src)
    else:
        torch.mul(src, scale, out=out)
    return out.view(b, nh, n_h * n_w, t * t, d)


def _untile(xt: torch.Tensor, t: int, n_h: int, n_w: int, hh: int, ww: int) -> torch.Tensor:
    """(B, h, nT, t*t, d) -> (B, h, H*W, d) as a view of a contiguous (B, H, W, h, d) buffer (so that the caller's
    transpose(1, 2).reshape(B, N, h*d) costs nothing)."""
    b, nh, _, _, d = xt.shape
    out = xt.new_empty(b, n_h, t, n_w, t, nh, d)
    out.copy_(xt.view(b, nh, n_h, n_w, t, t, d).permute(0, 2, 4, 3, 5, 1, 6))
    out = out.view(b, n_h * t, n_w * t, nh, d)
    if n_h * t != hh or n_w * t != ww:
        out = out[:, :hh, :ww].contiguous()
    return out.view(b, hh * ww, nh, d).transpose(1, 2)


def _halo(x: torch.Tensor, t: int, r: int, n_h: int, n_w: int) -> torch.Tensor:
    """(B, h, H, W, d) -> contiguous (B, h, nT, th*th, d): the (t+2r)^2 neighbourhood of every tile, zero outside."""
    b, nh, hh, ww, d = x.shape
    th = t + 2 * r
    xp = F.pad(x, (0, 0, r, n_w * t - ww + r, r, n_h * t - hh + r))
    halos = xp.unfold(2, th, t).unfold(3, th, t)  # (B, h, n_h, n_w, d, th, th): a view
    out = x.new_empty(b, nh, n_h, n_w, th, th, d)
    out.copy_(halos.permute(0, 1, 2, 3, 5, 6, 4))
    return out.view(b, nh, n_h * n_w, th * th, d)


def _fold(g: torch.Tensor, t: int, r: int, n_h: int, n_w: int, hh: int, ww: int) -> torch.Tensor:
    """Adjoint of _halo: (B, h, nT, th*th, d) -> (B, h, H, W, d), summing overlapping halos.

    Separable: first columns, then rows. Along an axis the halo offsets c in [0, th) are cut into chunks of t; within
    a chunk, tiles land on disjoint positions, so each chunk is one strided add.
    """
    b, nh, _, _, d = g.shape
    th = t + 2 * r
    nc = -(-th // t)
    g = g.view(b, nh, n_h, n_w, th, th, d)
    cols = g.new_zeros(b, nh, n_h, th, n_w + nc, t, d)
    for j in range(nc):
        span = min(t, th - j * t)
        cols[:, :, :, :, j : j + n_w, :span] += g[:, :, :, :, :, j * t : j * t + span].permute(0, 1, 2, 4, 3, 5, 6)
    cols = cols.view(b, nh, n_h, th, (n_w + nc) * t, d)
    rows = g.new_zeros(b, nh, n_h + nc, t, (n_w + nc) * t, d)
    for j in range(nc):
        span = min(t, th - j * t)
        rows[:, :, j : j + n_h, :span] += cols[:, :, :, j * t : j * t + span]
    rows = rows.view(b, nh, (n_h + nc) * t, (n_w + nc) * t, d)
    return rows[:, :, r : r + hh, r : r + ww]


class _HaloAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, grid, window, t):
        b, nh, n, d = q.shape
        hh, ww = grid
        r = (window - 1) // 2
        n_h, n_w = -(-hh // t), -(-ww // t)
        scale = d**-0.5
        bias = _halo_bias(hh, ww, window, t, q.device, q.dtype)
        qt = _tile(q.unflatten(2, (hh, ww)), t, n_h, n_w, scale)
        kt = _halo(k.unflatten(2, (hh, ww)), t, r, n_h, n_w)
        vt = _halo(v.unflatten(2, (hh, ww)), t, r, n_h, n_w)
        s = torch.matmul(qt, kt.transpose(-1, -2))
        s.add_(bias)
        p = torch.softmax(s, dim=-1)
        del s
        ot = torch.matmul(p, vt)
        ctx.save_for_backward(qt, kt, vt, p, ot)
        ctx.meta = (hh, ww, r, t, n_h, n_w, scale)
        return _untile(ot, t, n_h, n_w, hh, ww)

    @staticmethod
    def backward(ctx, grad_out):
        qt, kt, vt, p, ot = ctx.saved_tensors
        hh, ww, r, t, n_h, n_w, scale = ctx.meta
        b, nh, n, d = grad_out.shape
        got = _tile(grad_out.unflatten(2, (hh, ww)), t, n_h, n_w)
        dvt = torch.matmul(p.transpose(-1, -2), got)
        ds = torch.matmul(got, vt.transpose(-1, -2))
        ds.sub_((got * ot).sum(-1, keepdim=True)).mul_(p)  # softmax backward: P * (dP - rowsum(dO * O))
        dqt = torch.matmul(ds, kt).mul_(scale)
        dkt = torch.matmul(ds.transpose(-1, -2), qt)  # qt carries the scale already
        dq = _untile(dqt, t, n_h, n_w, hh, ww)
        dk = _fold(dkt, t, r, n_h, n_w, hh, ww).reshape(b, nh, n, d)
        dv = _fold(dvt, t, r, n_h, n_w, hh, ww).reshape(b, nh, n, d)
        return dq, dk, dv, None, None, None


def halo_attention(q, k, v, grid: tuple[int, int], window: int, tile: int | None = None) -> torch.Tensor:
    """Windowed attention by halo tiles; q, k, v (B, heads, H*W, d). `tile` overrides the automatic choice."""
    hh, ww = grid
    r = (window - 1) // 2
    if r >= max(hh, ww) - 1:  # the window covers the whole grid from every position: global attention
        return F.scaled_dot_product_attention(q, k, v)
    t = choose_tile(hh, ww, window) if tile is None else tile
    if t == 0:
        return sdpa_mask_attention(q, k, v, grid, window)
    return _HaloAttention.apply(q, k, v, (hh, ww), window, t)


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

    bm = _block_mask(grid[0], grid[1], window, q.device)
    if q.device.type == "cuda":
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(_flex, dynamic=False)
        return _COMPILED_FLEX(q, k, v, block_mask=bm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _flex(q, k, v, block_mask=bm)


# --------------------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------------------


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
