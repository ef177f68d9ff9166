"""Hidden-state geometry against direct formulas and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from qlab.analysis import geometry as G
from qlab.analysis.spectra import entropy_effective_rank
from qlab.errors import DataError, NumericalError


def _iso_by_steps(x: np.ndarray) -> float:
    """IsoScore following Rudman et al.'s steps with an SVD rotation and np.cov."""
    xc = x - x.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=True)
    rotated = xc @ vt.T
    var = np.diag(np.cov(rotated.T))
    n = len(var)
    var_hat = var * math.sqrt(n) / np.linalg.norm(var)
    delta = np.linalg.norm(var_hat - 1) / math.sqrt(2 * (n - math.sqrt(n)))
    return ((n - delta**2 * (n - math.sqrt(n))) ** 2 - n) / (n * (n - 1))


def test_isoscore_extremes_and_steps():
    rng = np.random.default_rng(0)
    iso = rng.standard_normal((4000, 16))
    assert G.isoscore(torch.from_numpy(iso)) > 0.97
    rank1 = np.outer(rng.standard_normal(300), rng.standard_normal(16))
    assert G.isoscore(torch.from_numpy(rank1)) < 1e-6
    aniso = rng.standard_normal((500, 10)) * np.arange(1, 11) @ np.linalg.qr(rng.standard_normal((10, 10)))[0]
    assert G.isoscore(torch.from_numpy(aniso)) == pytest.approx(_iso_by_steps(aniso), rel=1e-8)
    assert 0.05 < G.isoscore(torch.from_numpy(aniso)) < 0.9


def test_isoscore_rotation_invariant():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 8)) * np.array([5, 4, 3, 2, 1, 1, 1, 1])
    q = np.linalg.qr(rng.standard_normal((8, 8)))[0]
    assert G.isoscore(torch.from_numpy(x @ q)) == pytest.approx(G.isoscore(torch.from_numpy(x)), rel=1e-9)


def test_mean_abs_cosine_by_hand():
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    c = 1 / math.sqrt(2)
    # off-diagonal |cos|: (0, c, c) each twice; divided by n² = 9 like PR #2011
    assert G.mean_abs_cosine(h) == pytest.approx(4 * c / 9)
    assert G.mean_abs_cosine(torch.tensor([[1.0, 0.0], [0.0, 0.0]])) == pytest.approx(0.0)


def test_effective_rank_of_centred_states():
    rng = np.random.default_rng(2)
    n, s = 50, np.array([5.0, 3.0, 1.0, 0.5])
    basis = rng.standard_normal((n, 5))
    basis[:, 0] = 1.0
    q = np.linalg.qr(basis)[0][:, 1:]  # orthonormal columns ⟂ 1 → already centred
    v = np.linalg.qr(rng.standard_normal((6, 4)))[0]
    h = q @ np.diag(s) @ v.T + 7.0  # the offset is removed by centring
    p = s / s.sum()
    assert G.effective_rank(torch.from_numpy(h)) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-8)
    assert G.effective_rank(torch.from_numpy(h)) == pytest.approx(entropy_effective_rank(s), rel=1e-8)


def test_kurtosis_against_scipy():
    rng = np.random.default_rng(3)
    h = rng.standard_t(5, size=(64, 32))
    assert G.excess_kurtosis(torch.from_numpy(h)) == pytest.approx(
        scipy.stats.kurtosis(h.ravel(), fisher=True, bias=True), rel=1e-10
    )
    np.testing.assert_allclose(
        G.token_kurtosis(torch.from_numpy(h)).numpy(), scipy.stats.kurtosis(h, axis=1), rtol=1e-8
    )
    # m4/m2² − 3 by hand on a tiny vector
    v = np.array([0.0, 0.0, 0.0, 4.0])
    c = v - v.mean()
    assert G.excess_kurtosis(torch.from_numpy(v)) == pytest.approx((c**4).mean() / (c**2).mean() ** 2 - 3)


def test_norm_stats_and_histograms():
    rng = np.random.default_rng(4)
    h = rng.standard_normal((30, 5)) * 3
    stats = G.norm_stats(torch.from_numpy(h))
    norms = np.linalg.norm(h, axis=1)
    assert stats["norm_mean"] == pytest.approx(norms.mean())
    assert stats["norm_var"] == pytest.approx(norms.var(ddof=1))
    assert stats["max_abs"] == pytest.approx(np.abs(h).max())
    ch = G.coordinate_histogram(torch.from_numpy(h), bins=10)
    assert ch["count"].sum() == 150 and len(ch) == 10
    assert (ch["density"] * (ch["bin_right"] - ch["bin_left"])).sum() == pytest.approx(1.0)
    nh = G.norm_histogram(torch.from_numpy(h))
    assert nh["count"].sum() == 30 and set(nh["quantity"]) == {"l2_norm"}


def test_pca3():
    rng = np.random.default_rng(5)
    h = rng.standard_normal((400, 6)) * np.array([10.0, 5.0, 2.0, 0.1, 0.1, 0.1])
    df = G.pca3(torch.from_numpy(h))
    assert list(df.columns) == ["token", "pc1", "pc2", "pc3"] and len(df) == 400
    evr = df.attrs["explained_variance_ratio"]
    assert evr[0] > evr[1] > evr[2] and sum(evr) == pytest.approx(1.0, abs=1e-3)
    assert df["pc1"].var(ddof=0) * 400 == pytest.approx(df.attrs["singular_values"][0] ** 2, rel=1e-9)
    assert abs(np.corrcoef(df["pc1"], h[:, 0])[0, 1]) > 0.99
    small = G.pca3(torch.randn(5, 2))  # only 2 components: the third is padded
    assert (small["pc3"] == 0).all()


def test_metrics_dict_and_errors():
    h = torch.randn(2, 16, 8)  # (B, T, d) folds to 32 tokens
    m = G.hidden_state_metrics(h)
    assert m["n_tokens"] == 32 and m["dim"] == 8
    for key in ("isoscore", "mean_abs_cos", "eff_rank", "norm_var", "norm_mean", "max_abs", "kurtosis"):
        assert math.isfinite(m[key])
    with pytest.raises(DataError):
        G.hidden_state_metrics(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))
    with pytest.raises(DataError):
        G.isoscore(torch.randn(5))
    with pytest.raises(NumericalError):
        G.isoscore(torch.ones(10, 4))
    with pytest.raises(NumericalError):
        G.excess_kurtosis(torch.ones(10))


def test_pca3_in_a_reference_basis():
    rng = np.random.default_rng(6)
    ref = torch.from_numpy(rng.standard_normal((300, 5)) * np.array([8.0, 4.0, 2.0, 0.5, 0.1]))
    same = G.pca3(ref, basis_of=ref)
    own = G.pca3(ref)
    for c in ("pc1", "pc2", "pc3"):  # U·S and the projection on V agree up to rounding
        assert np.allclose(same[c].abs(), own[c].abs(), atol=1e-9)
    shifted = G.pca3(ref + 0.01, basis_of=ref)  # a shift by 0.01·1 moves each point by V₃ᵀ·0.01·1
    vh = torch.linalg.svd(ref - ref.mean(0), full_matrices=False).Vh
    expect = (0.01 * torch.ones(5, dtype=torch.float64)) @ vh[:3].T
    diff = shifted[["pc1", "pc2", "pc3"]].to_numpy() - same[["pc1", "pc2", "pc3"]].to_numpy()
    assert np.allclose(diff, expect.numpy()[None, :], atol=1e-9)
    with pytest.raises(DataError):
        G.pca3(ref, basis_of=torch.randn(10, 4))
