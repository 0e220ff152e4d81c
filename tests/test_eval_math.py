"""Fast unit tests of the evaluation math on hand-built tensors and tiny stand-in models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ditscale.diffusion import create_diffusion
from ditscale.errors import CheckpointError, DataError
from ditscale.eval import fid, jacobian, locality, pair, psnr


# --------------------------------------------------------------------------------------------- stand-in models
class Oracle(torch.nn.Module):
    """x0_hat = a fixed function of x_t expressed as the epsilon a DiT would output (2C channels, learned sigma).

    mode "memorise": the posterior mean of the empirical distribution of `train` (the ideal denoiser of the training
    set, i.e. a perfect memoriser); mode "shrink": x0_hat = c * x_t / sqrt(abar) (a linear, data-free denoiser)."""

    def __init__(self, diffusion, train=None, mode="memorise", c=0.5):
        super().__init__()
        self.ab = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float64)
        self.train_images = train
        self.mode, self.c = mode, c
        self.w = torch.nn.Parameter(torch.ones(()))  # something for the Jacobian to flow through

    def forward(self, x, t, y):
        ab = self.ab[t].view(-1, 1, 1, 1).to(x.dtype)
        if self.mode == "memorise":
            y_ = x / ab.sqrt()
            s2 = (1 - ab) / ab
            d = ((y_[:, None] - self.train_images[None]) ** 2).flatten(2).sum(-1)  # (B, K)
            w = torch.softmax(-d / (2 * s2.view(-1, 1)), dim=1)
            x0 = torch.einsum("bk,kchw->bchw", w, self.train_images)
        else:
            x0 = self.c * x / ab.sqrt()
        eps = (x - ab.sqrt() * x0 * self.w) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1)


@pytest.fixture(scope="module")
def diffusion():
    return create_diffusion()


# ------------------------------------------------------------------------------------------------------ psnr
def test_psnr_known_values():
    x = torch.zeros(2, 1, 4, 4)
    y = torch.full((2, 1, 4, 4), 0.2)  # mse 0.04, range 2 -> 10 log10(4 / 0.04) = 20 dB
    assert torch.allclose(psnr.psnr(x, y), torch.tensor([20.0, 20.0]), atol=1e-4)
    assert psnr.psnr(x, x)[0] > 100


def test_eval_timesteps():
    ts = psnr.eval_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 0 and ts[-1] == 999 and ts == sorted(set(ts))
    assert psnr.eval_timesteps(10, 50) == list(range(10))


def test_psnr_gap_memoriser_vs_linear(diffusion):
    g = torch.Generator().manual_seed(0)
    train = torch.rand(8, 1, 6, 6, generator=g) * 2 - 1
    test = torch.rand(8, 1, 6, 6, generator=g) * 2 - 1
    labels = torch.zeros(8, dtype=torch.long)
    mem = Oracle(diffusion, train, "memorise")
    r = psnr.psnr_gap(mem, diffusion, (train, labels), (test, labels), num_points=10)
    assert len(r["gap"]) == 10 and r["timesteps"][0] == 0
    assert r["avg_gap"] > 5  # a perfect memoriser: large gap
    assert r["gap"][0] > r["gap"][-1] or r["gap"][0] > 10
    lin = Oracle(diffusion, mode="shrink", c=0.7)
    r2 = psnr.psnr_gap(lin, diffusion, (train, labels), (train.clone(), labels), num_points=10)
    assert abs(r2["avg_gap"]) < 1e-6  # same images, same noise: exactly no gap
    # noise is fixed per (seed, t): the curve does not depend on the batch size
    a = psnr.psnr_curve(lin, diffusion, test, labels, [100, 500], batch_size=3)
    b = psnr.psnr_curve(lin, diffusion, test, labels, [100, 500], batch_size=8)
    assert torch.allclose(a, b)


# -------------------------------------------------------------------------------------------------- locality
def test_window_mask_clipped_at_border():
    m = locality.window_mask(5, 5, 3)
    assert int(m[12].sum()) == 9  # centre
    assert int(m[0].sum()) == 4  # corner: clipped, not shifted
    assert int(locality.window_mask(5, 5, 7)[0].sum()) == 16


def test_locality_stats_identity_uniform_and_shift():
    h = w = 4
    n = h * w
    ident = torch.eye(n)[None, None]
    s = locality.locality_stats(ident, h, w)
    assert s["mean_distance"] == 0 and s["mass_3x3"] == 1 and s["mass_7x7"] == 1
    uni = locality.uniform_reference(h, w)
    d = locality.distance_matrix(h, w)
    assert math.isclose(uni["mean_distance"], float(d.mean()), rel_tol=1e-6)
    assert math.isclose(uni["mass_3x3"], float(locality.window_mask(h, w, 3).float().mean()), rel_tol=1e-6)
    assert uni["mass_3x3"] < uni["mass_5x5"] < uni["mass_7x7"] == 1.0
    # every query attends two columns to the right (or itself at the right edge)
    p = torch.zeros(n, n)
    for q in range(n):
        r, c = divmod(q, w)
        p[q, r * w + c + 2 if c + 2 < w else q] = 1
    s = locality.locality_stats(p, h, w)
    assert math.isclose(s["mean_distance"], 2 * 8 / 16, rel_tol=1e-6)  # 8 of 16 queries move 2 tokens
    assert math.isclose(s["mass_3x3"], 0.5, rel_tol=1e-6) and s["mass_5x5"] == 1.0
    with pytest.raises(ValueError):
        locality.locality_stats(p, 3, 3)


def test_attention_entropy():
    n = 9
    assert math.isclose(locality.attention_entropy(torch.full((n, n), 1 / n)), math.log(n), rel_tol=1e-5)
    assert locality.attention_entropy(torch.eye(n)) < 1e-6


# ------------------------------------------------------------------------------------------------------- fid
def _gaussian(rng, d):
    a = rng.standard_normal((d, d))
    return rng.standard_normal(d), a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_closed_forms():
    from scipy import linalg

    rng = np.random.default_rng(0)
    d = 6
    mu1, s1 = _gaussian(rng, d)
    mu2, s2 = _gaussian(rng, d)
    r1 = linalg.sqrtm(s1).real
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(r1 @ s2 @ r1).real)
    assert math.isclose(fid.frechet_distance(mu1, s1, mu2, s2), want, rel_tol=1e-6)
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2 + ||mu1 - mu2||^2
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert math.isclose(fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), want, rel_tol=1e-6)
    assert fid.frechet_distance(mu1, s1, mu1, s1) < 1e-6
    with pytest.raises(ValueError):
        fid.frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def test_fid_from_features_identical_and_shifted_sets():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 4))
    mu, sig = fid.feature_stats(x)
    assert fid.fid_from_features(x, mu, sig) < 1e-8
    y = rng.standard_normal((2000, 4)) + np.array([1.0, 0, 0, 0])
    assert abs(fid.fid_from_features(y, mu, sig) - 1.0) < 0.15  # ||shift||^2 = 1, same covariance
    singular = np.repeat(x[:5, :1], 4, axis=1)  # rank-1 covariance still gives a finite number
    assert math.isfinite(fid.fid_from_features(singular, mu, sig))


def test_rank_share_covers_all_samples():
    for total in (0, 1, 7, 100):
        for world in (1, 2, 3, 8):
            shares = [fid.rank_share(total, r, world) for r in range(world)]
            assert sum(c for _, c in shares) == total
            assert [s for s, _ in shares] == [sum(c for _, c in shares[:r]) for r in range(world)]


def test_inception_definition_and_weights_file(tmp_path):
    net = fid.FIDInceptionV3()
    sd = net.state_dict()
    for key, shape in {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7c.branch3x3dbl_3b.bn.running_var": (384,),
        "fc.weight": (1008, 2048),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert sum(p.numel() for p in net.parameters()) == 23_850_960  # torchvision's 27,161,264 - aux + 8 fc rows
    with pytest.raises(CheckpointError, match="nope.pth"):
        fid.load_inception(str(tmp_path / "nope.pth"))
    path = tmp_path / "w.pth"
    torch.save({"module." + k: v for k, v in sd.items()}, path)
    loaded = fid.load_inception(str(path))
    torch.save({k: v for k, v in sd.items() if not k.startswith("Mixed_7c")}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="missing keys"):
        fid.load_inception(str(tmp_path / "bad.pth"))
    with torch.no_grad():
        feats = loaded(torch.rand(2, 1, 8, 8) * 2 - 1)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()


def test_pixel_features_and_sample_features_single_process():
    ext = fid.PixelFeatures(side=4)
    assert ext(torch.zeros(3, 1, 8, 8)).shape == (3, 16)
    calls = []

    def draw(model, labels, noise, g):
        calls.append(labels.tolist())
        return noise.tanh()

    f1 = fid.sample_features(None, draw, ext, 10, num_classes=3, shape=(1, 8, 8), batch_size=4, seed=0)
    f2 = fid.sample_features(None, draw, ext, 10, num_classes=3, shape=(1, 8, 8), batch_size=4, seed=0)
    assert f1.shape == (10, 16) and np.array_equal(f1, f2)
    assert calls[0] == [0, 1, 2, 0]


# ------------------------------------------------------------------------------------------------------ pair
def test_cosine_and_nearest():
    a = torch.tensor([[1.0, 0], [0, 1], [1, 1]])
    b = torch.tensor([[1.0, 0], [0, -1], [2, 2]])
    assert torch.allclose(pair.cosine(a, b), torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    v, i = pair.nearest(a, torch.tensor([[0.0, 3], [5, 0]]))
    assert i.tolist() == [1, 0, 0] and math.isclose(float(v[2]), 1 / math.sqrt(2), rel_tol=1e-9)


def test_disjointness_checks():
    assert pair.subset_ids({"indices": [3, 1, 2]}) == {1, 2, 3}
    assert pair.subset_ids({"subset": {"source_indices": [5]}}) == {5}
    assert pair.subset_ids({"num_samples": 3}) is None
    pair.check_disjoint({1, 2}, {3}, "a", "b")
    with pytest.raises(DataError, match="share 1 images"):
        pair.check_disjoint({1, 2}, {2, 3}, "a/manifest.json", "b/manifest.json")
    imgs = torch.rand(3, 1, 4, 4) * 2 - 1
    h = pair.image_hashes(imgs)
    assert len(set(h)) == 3 and pair.image_hashes(imgs[1:2].clone()) == h[1:2]


def test_pair_stats_summary():
    train_a = torch.randn(5, 1, 4, 4)
    train_b = torch.randn(5, 1, 4, 4)
    s = pair.pair_stats(train_a[:3], train_a[:3].clone(), train_a, train_b)
    summ = pair.summarise(s)
    assert math.isclose(summ["paired_similarity"]["mean"], 1.0, rel_tol=1e-9)
    assert math.isclose(summ["nearest_train_similarity_a"]["mean"], 1.0, rel_tol=1e-9)
    assert summ["nearest_train_similarity_b"]["mean"] < 1.0


# -------------------------------------------------------------------------------------------------- jacobian
def test_jacobian_of_linear_map_both_methods():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=g)
    x = torch.randn(6, generator=g)
    for method in ("jacrev", "rows"):
        assert torch.allclose(jacobian.jacobian(lambda v: A @ v, x, method), A, atol=1e-6)
    s = jacobian.spectrum(A)
    S = ((A + A.T) / 2).double()
    assert torch.allclose(s["eigenvalues"], torch.linalg.eigvalsh(S).flip(0), atol=1e-9)
    v0 = s["eigenvectors"][:, 0]
    assert torch.allclose(S @ v0, s["eigenvalues"][0] * v0, atol=1e-9)
    assert s["asymmetry"] > 0 and jacobian.spectrum(S)["asymmetry"] == 0


def test_denoiser_jacobian_of_linear_shrinkage(diffusion):
    model = Oracle(diffusion, mode="shrink", c=0.6)
    t = jacobian.timestep_for_sigma(diffusion, 0.3)
    assert abs(jacobian.sigma_of(diffusion, t) - 0.3) < 0.02
    res = jacobian.denoiser_jacobian(model, diffusion, torch.zeros(1, 3, 3), 0, t)
    # x0_hat = c * x_t / sqrt(abar) = c * y: J = c I in the clean-image scale
    assert torch.allclose(res["eigenvalues"], torch.full((9,), 0.6, dtype=torch.float64), atol=1e-5)
    assert res["linear_residual"] < 1e-5
    summ = jacobian.summary(res)
    assert summ["dim"] == 9 and abs(summ["effective_dim"] - 9) < 1e-4
    with pytest.raises(Exception, match="too large"):
        jacobian.denoiser_jacobian(model, diffusion, torch.zeros(3, 40, 40), 0, t)


def test_shared_samples_needs_same_index_and_pixels():
    imgs = torch.rand(4, 1, 3, 3) * 2 - 1
    other = torch.rand(4, 1, 3, 3) * 2 - 1
    assert pair.shared_samples([0, 1, 2, 3], imgs, [0, 1, 2, 3], other) == set()  # same indices, other source
    assert pair.shared_samples([0, 1, 2, 3], imgs, [2, 3, 4, 5], torch.cat([imgs[2:], other[:2]])) == {2, 3}
