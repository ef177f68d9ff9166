"""Centered kernel alignment (Kornblith et al. 2019) between sets of activations.

CKA(X, Y) = HSIC(K, L) / √(HSIC(K, K)·HSIC(L, L)) with K, L the n×n Gram matrices of the
rows of X (n, d₁) and Y (n, d₂) — the same n examples seen by two layers or models.

* kernel ``"linear"``: K = X Xᵀ; ``"rbf"``: K_ij = exp(−‖xᵢ − xⱼ‖² / (2σ²)) with
  σ = ``sigma_factor`` × the median off-diagonal pairwise distance.
* biased HSIC: tr(K H L H) / (n−1)², H = I − 11ᵀ/n (the scale cancels in CKA). Linear
  biased CKA equals PR #2011's feature-space form ‖YᵀX‖_F² / (‖XᵀX‖_F ‖YᵀY‖_F) on
  column-centred features, which is used here when d₁ + d₂ < n (faster).
* debiased: the unbiased HSIC estimator of Song et al. 2012 (as used by Nguyen et al.
  2021): with K̃, L̃ the Grams with zeroed diagonals,
  HSIC_u = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3)); needs n ≥ 4.

Everything is computed in float64. Inputs of shape (B, T, d) are folded to (B·T, d).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

from qlab.analysis.activations import flatten_tokens
from qlab.errors import DataError, NumericalError

__all__ = ["cka", "cka_matrix", "cka_across", "gram", "hsic"]

KERNELS = ("linear", "rbf")


def _features(x: torch.Tensor, name: str) -> torch.Tensor:
    return flatten_tokens(torch.as_tensor(x), name).double()


def gram(x: torch.Tensor, kernel: str = "linear", sigma_factor: float = 1.0) -> torch.Tensor:
    """The n×n Gram matrix of the rows of ``x`` (float64, not centred)."""
    x = _features(x, "gram input")
    if kernel == "linear":
        return x @ x.T
    if kernel != "rbf":
        raise DataError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if not sigma_factor > 0:
        raise DataError(f"sigma_factor must be > 0, got {sigma_factor}")
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
    d2.fill_diagonal_(0.0)
    n = x.shape[0]
    off = d2[~torch.eye(n, dtype=torch.bool)]
    median = float(np.median(off.sqrt().numpy()))  # averages the middle pair, like numpy
    if median <= 0:
        raise NumericalError("RBF CKA: median pairwise distance is 0 (most rows identical)")
    sigma = sigma_factor * median
    return torch.exp(-d2 / (2.0 * sigma * sigma))


def _center(k: torch.Tensor) -> torch.Tensor:
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def hsic(k: torch.Tensor, l: torch.Tensor, debiased: bool = False) -> float:
    """HSIC of two Gram matrices: biased tr(KHLH)/(n−1)² or the unbiased estimator."""
    if k.shape != l.shape or k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise DataError(
            f"HSIC needs two n×n Gram matrices of equal size, got {tuple(k.shape)}, {tuple(l.shape)}"
        )
    n = k.shape[0]
    if not debiased:
        return float((_center(k) * _center(l)).sum()) / (n - 1) ** 2
    if n < 4:
        raise DataError(f"debiased HSIC needs n ≥ 4 examples, got {n}")
    k0 = k.clone().fill_diagonal_(0.0)
    l0 = l.clone().fill_diagonal_(0.0)
    term1 = float((k0 * l0).sum())  # tr(K̃L̃) for symmetric L̃
    term2 = float(k0.sum()) * float(l0.sum()) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * float(k0.sum(0) @ l0.sum(1))
    return (term1 + term2 - term3) / (n * (n - 3))


def _ratio(xy: float, xx: float, yy: float) -> float:
    if xx <= 0 or yy <= 0:
        raise NumericalError(
            f"CKA undefined: self-similarity HSIC is {xx:.3g} / {yy:.3g} (zero-variance or too few examples)"
        )
    return xy / math.sqrt(xx * yy)


def _linear_feature_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    xc = x - x.mean(0, keepdim=True)
    yc = y - y.mean(0, keepdim=True)
    num = float((xc.T @ yc).square().sum())
    return _ratio(num, float((xc.T @ xc).square().sum()), float((yc.T @ yc).square().sum()))


def cka(
    x: torch.Tensor,
    y: torch.Tensor,
    kernel: str = "linear",
    debiased: bool = False,
    sigma_factor: float = 1.0,
) -> float:
    """CKA between activations x (n, d₁) and y (n, d₂) of the same n examples."""
    fx, fy = _features(x, "CKA x"), _features(y, "CKA y")
    if fx.shape[0] != fy.shape[0]:
        raise DataError(f"CKA needs the same examples in x and y: {fx.shape[0]} vs {fy.shape[0]} rows")
    if kernel == "linear" and not debiased and fx.shape[1] + fy.shape[1] < fx.shape[0]:
        return _linear_feature_cka(fx, fy)
    k, l = gram(fx, kernel, sigma_factor), gram(fy, kernel, sigma_factor)
    return _ratio(hsic(k, l, debiased), hsic(k, k, debiased), hsic(l, l, debiased))


def _prepared(acts: Mapping[str, torch.Tensor], kernel: str, debiased: bool, sigma_factor: float) -> dict:
    """Per activation: its (centred unless debiased) Gram matrix and self-HSIC."""
    if not acts:
        raise DataError("CKA: no activations given")
    grams = {
        name: gram(_features(a, f"activation {name!r}"), kernel, sigma_factor) for name, a in acts.items()
    }
    sizes = {g.shape[0] for g in grams.values()}
    if len(sizes) != 1:
        raise DataError(f"CKA: activations cover different numbers of examples {sorted(sizes)}")
    return {name: (g, hsic(g, g, debiased)) for name, g in grams.items()}


def _pair(a: tuple, b: tuple, debiased: bool) -> float:
    return _ratio(hsic(a[0], b[0], debiased), a[1], b[1])


def cka_matrix(
    acts: Mapping[str, torch.Tensor],
    kernel: str = "linear",
    debiased: bool = False,
    sigma_factor: float = 1.0,
) -> pd.DataFrame:
    """Square CKA table between every pair of named activations (layers of one model, or
    one layer of several variants — ``df.to_dict()`` gives PR #2011's cka_pairwise.json schema)."""
    prep = _prepared(acts, kernel, debiased, sigma_factor)
    names = list(prep)
    df = pd.DataFrame(index=pd.Index(names), columns=pd.Index(names), dtype=float)
    for i, a in enumerate(names):
        for b in names[i:]:
            v = _pair(prep[a], prep[b], debiased)
            df.loc[a, b] = df.loc[b, a] = v
    return df


def cka_across(
    acts_a: Mapping[str, torch.Tensor],
    acts_b: Mapping[str, torch.Tensor],
    kernel: str = "linear",
    debiased: bool = False,
    sigma_factor: float = 1.0,
) -> pd.DataFrame:
    """CKA of every activation of A (rows) against every activation of B (columns),
    e.g. the layers of a float model against those of its quantised copy."""
    pa = _prepared(acts_a, kernel, debiased, sigma_factor)
    pb = _prepared(acts_b, kernel, debiased, sigma_factor)
    na, nb = next(iter(pa.values()))[0].shape[0], next(iter(pb.values()))[0].shape[0]
    if na != nb:
        raise DataError(f"CKA: A and B cover different numbers of examples ({na} vs {nb})")
    df = pd.DataFrame(index=pd.Index(list(pa)), columns=pd.Index(list(pb)), dtype=float)
    for a, ga in pa.items():
        for b, gb in pb.items():
            df.loc[a, b] = _pair(ga, gb, debiased)
    return df
