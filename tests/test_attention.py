import pytest
import torch
import torch.nn.functional as F

from ditscale.errors import ConfigError
from ditscale.model.attention import (
    _fold,
    _halos,
    attention,
    choose_tile,
    flex_attention,
    halo_attention,
    qkv_attention,
    resolve_backend,
    sdpa_mask_attention,
    window_mask,
)

# (H, W, k): borders everywhere, odd and non-square grids, k larger than the grid, several tiles per side
CASES = [(7, 7, 3), (5, 9, 5), (4, 4, 7), (16, 16, 13), (9, 5, 3), (12, 10, 7), (6, 11, 9), (1, 6, 3)]


def _qkv(h, w, seed=0, b=2, heads=3, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, h * w, d, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def test_window_mask_is_the_clipped_chebyshev_ball():
    m = window_mask(4, 4, 3)
    # corner token (0, 0) sees the 2 x 2 block only (clipped, not shifted)
    assert m[0].view(4, 4).nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    # interior token (1, 2) sees its 3 x 3 neighbourhood
    assert int(m[1 * 4 + 2].sum()) == 9
    assert torch.equal(m, m.T)
    m5 = window_mask(5, 9, 5)
    r = torch.arange(45) // 9
    c = torch.arange(45) % 9
    expected = ((r[:, None] - r[None]).abs() <= 2) & ((c[:, None] - c[None]).abs() <= 2)
    assert torch.equal(m5, expected)


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize(
    "h,w,k,tile", [(h, w, k, t) for h, w, k in CASES for t in (None, 4, 5) if t is None or t <= max(h, w)]
)
def test_halo_matches_sdpa_mask(h, w, k, tile):
    q, kk, v = _qkv(h, w)
    ref = sdpa_mask_attention(q, kk, v, (h, w), k)
    out = halo_attention(q, kk, v, (h, w), k, tile=tile)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for a, b in zip(_grads(out, (q, kk, v)), _grads(ref, (q, kk, v)), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-5)


@pytest.mark.parametrize("h,w,k", [(7, 7, 3), (5, 9, 5), (10, 9, 7)])
def test_halo_float64_exact_and_gradcheck(h, w, k):
    q, kk, v = _qkv(h, w, b=1, heads=1, d=3, dtype=torch.float64)
    ref = sdpa_mask_attention(q, kk, v, (h, w), k)
    out = halo_attention(q, kk, v, (h, w), k, tile=4)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda a, b, c: halo_attention(a, b, c, (h, w), k, tile=4), (q, kk, v))


def test_fold_is_the_adjoint_of_halos():
    x = torch.randn(1, 7, 10, 2, 2, 3, dtype=torch.float64)  # (B, H, W, k|v, heads, d)
    for t, r in [(4, 1), (3, 2), (4, 3), (2, 3)]:
        n_h, n_w = -(-7 // t), -(-10 // t)
        y = torch.randn(2, 1, 2, n_h * n_w, (t + 2 * r) ** 2, 3, dtype=torch.float64)
        lhs = (_halos(x, t, r, n_h, n_w) * y).sum()
        rhs = (x * _fold(y, t, r, n_h, n_w, torch.empty_like(x))).sum()
        torch.testing.assert_close(lhs, rhs)


def test_halo_non_contiguous_qkv_like_the_model():
    # the model hands over views of one qkv tensor (B, N, 3, heads, d).permute(2, 0, 3, 1, 4)
    h, w, k = 6, 6, 3
    qkv = torch.randn(2, h * w, 3, 2, 4).permute(2, 0, 3, 1, 4).requires_grad_()
    q, kk, v = qkv.unbind(0)
    ref = sdpa_mask_attention(q, kk, v, (h, w), k)
    out = halo_attention(q, kk, v, (h, w), k, tile=4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    packed = qkv_attention(qkv.permute(1, 3, 0, 2, 4), (h, w), k, "halo")  # (B, N, heads * d)
    torch.testing.assert_close(packed, ref.transpose(1, 2).reshape(2, h * w, 8), atol=1e-5, rtol=0)
    (ga,) = _grads(out, (qkv,))
    (gb,) = _grads(ref, (qkv,))
    torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("h,w,k", [(7, 7, 3), (5, 9, 5), (4, 4, 7), (16, 16, 13)])
def test_flex_forward_matches_sdpa_mask_on_cpu(h, w, k):
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, kk, v = (x.detach() for x in _qkv(h, w))
    with torch.no_grad():
        ref = sdpa_mask_attention(q, kk, v, (h, w), k)
        out = flex_attention(q, kk, v, (h, w), k)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_flex_on_cpu_refuses_training():
    q, kk, v = _qkv(4, 4)
    with pytest.raises(ConfigError, match="no backward"):
        flex_attention(q, kk, v, (4, 4), 3)


def test_global_window_and_dispatch():
    q, kk, v = _qkv(4, 4)
    dense = F.scaled_dot_product_attention(q, kk, v)
    for backend in ("sdpa_mask", "halo", "auto"):
        torch.testing.assert_close(attention(q, kk, v, (4, 4), None, backend), dense)
    # a window that covers the grid from every position is global attention
    torch.testing.assert_close(halo_attention(q, kk, v, (4, 4), 7), dense, atol=1e-6, rtol=0)
    assert resolve_backend("auto", torch.device("cpu")) == "halo"
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    with pytest.raises(ValueError, match="attention_backend"):
        resolve_backend("natten", torch.device("cpu"))


def test_choose_tile():
    assert choose_tile(32, 32, 3) > 0 and choose_tile(32, 32, 7) > 0
    assert choose_tile(2, 2, 3) == 0  # one tile would cover the grid: dense masked attention
    for h, w, k in CASES:
        t = choose_tile(h, w, k)
        assert t == 0 or 4 <= t <= max(h, w)
