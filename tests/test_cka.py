"""CKA: invariances, and agreement with slow explicit-centering / U-statistic HSIC."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from qlab.analysis import cka as C
from qlab.errors import DataError, NumericalError


def _data(n=40, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, 5, generator=g, dtype=torch.float64) + 0.7 * torch.randn(n, 5, generator=g)
    return x, y


def _slow_gram(x: np.ndarray, kernel: str, factor: float = 1.0) -> np.ndarray:
    n = len(x)
    if kernel == "linear":
        return np.array([[x[i] @ x[j] for j in range(n)] for i in range(n)])
    d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(n)] for i in range(n)])
    sigma = factor * np.median(d[~np.eye(n, dtype=bool)])
    return np.exp(-(d**2) / (2 * sigma**2))


def _slow_hsic(k: np.ndarray, l: np.ndarray) -> float:
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def _slow_cka(x, y, kernel="linear", factor=1.0):
    k, l = _slow_gram(x.numpy(), kernel, factor), _slow_gram(y.numpy(), kernel, factor)
    return _slow_hsic(k, l) / math.sqrt(_slow_hsic(k, k) * _slow_hsic(l, l))


def _ustat_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """Unbiased HSIC as the U-statistic over ordered 4-tuples of distinct indices."""
    n = len(k)
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
        count += 1
    return total / count


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_matches_slow_centering_matrix(kernel):
    x, y = _data()
    assert C.cka(x, y, kernel=kernel) == pytest.approx(_slow_cka(x, y, kernel), rel=1e-10)


def test_feature_space_path_matches_gram_path():
    x, y = _data(n=60, d=4)  # d1 + d2 < n → feature-space formula
    assert C.cka(x, y) == pytest.approx(_slow_cka(x, y), rel=1e-10)


def test_unbiased_hsic_equals_u_statistic():
    x, y = _data(n=7, d=3, seed=2)
    k, l = C.gram(x), C.gram(y)
    assert C.hsic(k, l, debiased=True) == pytest.approx(_ustat_hsic(k.numpy(), l.numpy()), rel=1e-9)
    kr = C.gram(x, "rbf")
    assert C.hsic(kr, l, debiased=True) == pytest.approx(_ustat_hsic(kr.numpy(), l.numpy()), rel=1e-9)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_self_similarity_and_symmetry(kernel, debiased):
    x, y = _data()
    assert C.cka(x, x, kernel=kernel, debiased=debiased) == pytest.approx(1.0, abs=1e-12)
    assert C.cka(x, y, kernel=kernel, debiased=debiased) == pytest.approx(
        C.cka(y, x, kernel=kernel, debiased=debiased), rel=1e-12
    )


@pytest.mark.parametrize("debiased", [False, True])
def test_linear_invariances(debiased):
    x, y = _data()
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    base = C.cka(x, y, debiased=debiased)
    assert C.cka(x @ q, y, debiased=debiased) == pytest.approx(base, rel=1e-10)
    assert C.cka(3.7 * x, 0.2 * y, debiased=debiased) == pytest.approx(base, rel=1e-10)
    assert C.cka(x + 5.0, y, debiased=debiased) == pytest.approx(base, rel=1e-10)  # centring


def test_rbf_wide_kernel_approaches_linear():
    x, y = _data()
    assert C.cka(x, y, kernel="rbf", sigma_factor=300.0) == pytest.approx(C.cka(x, y), abs=1e-3)


def test_independent_data_low_cka_and_debiasing():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(50, 40, generator=g)
    y = torch.randn(50, 40, generator=g)
    biased = C.cka(x, y)
    unbiased = C.cka(x, y, debiased=True)
    assert biased > 0.4  # the biased estimator is inflated when d ~ n
    assert abs(unbiased) < 0.1


def test_matrix_and_across():
    x, y = _data()
    acts = {"a": x, "b": y, "c": x[:, :3].reshape(2, 20, 3)}  # (B, T, d) folds to (40, 3)
    m = C.cka_matrix(acts)
    assert list(m.index) == ["a", "b", "c"] and list(m.columns) == ["a", "b", "c"]
    np.testing.assert_allclose(np.diag(m.to_numpy()), 1.0, atol=1e-12)
    np.testing.assert_allclose(m.to_numpy(), m.to_numpy().T)
    assert m.loc["a", "b"] == pytest.approx(C.cka(x, y))
    assert m.loc["a", "c"] == pytest.approx(C.cka(x, x[:, :3]))
    across = C.cka_across({"fp": x}, {"q1": y, "q2": x}, debiased=True)
    assert across.shape == (1, 2)
    assert across.loc["fp", "q2"] == pytest.approx(1.0)
    assert across.loc["fp", "q1"] == pytest.approx(C.cka(x, y, debiased=True))
    assert set(m.to_dict()) == {"a", "b", "c"}  # PR #2011 cka_pairwise.json schema


def test_errors():
    x, y = _data()
    with pytest.raises(DataError):
        C.cka(x, y[:10])
    with pytest.raises(DataError):
        C.cka(x, y, kernel="poly")
    with pytest.raises(NumericalError):
        C.cka(torch.ones(40, 3), y)
    with pytest.raises(DataError):
        C.cka(x[:3], y[:3], debiased=True)
    with pytest.raises(DataError):
        C.cka(torch.full((40, 6), float("nan")), y)
    with pytest.raises(DataError):
        C.cka_across({"a": x}, {"b": y[:20]})
