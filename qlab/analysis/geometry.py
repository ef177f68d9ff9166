"""Geometry of hidden states h ∈ R^{n×d} (PR #2011 "canonical metrics", PCA, distributions).

Inputs may be (n, d) or (B, T, d) (folded into tokens); all statistics are float64.

Two different things are called "isoscore" in the wild:

* :func:`isoscore` — IsoScore of Rudman et al. 2022 (Algorithm 1): rotate to principal
  axes, take the variance vector Σ_D (= covariance eigenvalues), normalise it to norm √d,
  isotropy defect δ = ‖Σ̂_D − 1‖ / √(2(d − √d)), and
  ι = ((d − δ²(d − √d))² − d) / (d(d − 1)) ∈ [0, 1]: 1 = isotropic, 0 = one direction.
  When n ≤ d the unused directions have zero variance (the score is then bounded by
  the sample rank), as with sklearn's PCA.
* :func:`mean_abs_cosine` — what PR #2011's scripts store under the key ``"isoscore"``:
  the mean of |cos(hᵢ, hⱼ)| over the n×n matrix with the diagonal zeroed (so divided
  by n², not n(n−1)). It measures *anisotropy* (higher = less isotropic).

Effective rank is :func:`qlab.analysis.spectra.entropy_effective_rank` of the singular
values of the *centred* states (as in PR #2011). ``norm_var`` is the unbiased (n−1)
variance of the token L2 norms, matching ``torch.var`` in the PR.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from qlab.analysis.activations import flatten_tokens
from qlab.analysis.spectra import entropy_effective_rank
from qlab.errors import DataError, NumericalError

__all__ = [
    "isoscore",
    "mean_abs_cosine",
    "effective_rank",
    "excess_kurtosis",
    "token_kurtosis",
    "norm_stats",
    "coordinate_histogram",
    "norm_histogram",
    "pca3",
    "hidden_state_metrics",
]


def _states(h: torch.Tensor) -> torch.Tensor:
    return flatten_tokens(torch.as_tensor(h)).double()


def isoscore(h: torch.Tensor) -> float:
    """IsoScore (Rudman et al. 2022) of the point cloud; see the module docstring."""
    x = _states(h)
    d = x.shape[1]
    if d < 2:
        raise DataError(f"IsoScore needs dimension ≥ 2, got {d}")
    xc = x - x.mean(0, keepdim=True)
    cov = xc.T @ xc / (x.shape[0] - 1)
    var = torch.linalg.eigvalsh(cov).clamp_min(0.0)  # variances along the principal axes
    norm = torch.linalg.vector_norm(var)
    if norm <= 0:
        raise NumericalError("IsoScore undefined: the hidden states have zero variance")
    var_hat = var * math.sqrt(d) / norm
    defect = float(torch.linalg.vector_norm(var_hat - 1.0)) / math.sqrt(2 * (d - math.sqrt(d)))
    score = ((d - defect**2 * (d - math.sqrt(d))) ** 2 - d) / (d * (d - 1))
    return float(min(1.0, max(0.0, score)))


def mean_abs_cosine(h: torch.Tensor) -> float:
    """PR #2011's "isoscore": mean |cos(hᵢ, hⱼ)| over all n² pairs, diagonal counted as 0.

    Like the PR's ``F.normalize``, a zero-norm row counts as cosine 0 with everything.
    """
    x = _states(h)
    u = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)
    sim = u @ u.T
    sim.fill_diagonal_(0.0)
    return float(sim.abs().mean())


def effective_rank(h: torch.Tensor, center: bool = True) -> float:
    """Entropy effective rank of the singular values of the (centred) states."""
    x = _states(h)
    if center:
        x = x - x.mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    if float(s.max()) <= 0:
        raise NumericalError("effective rank undefined: the hidden states have zero variance")
    return entropy_effective_rank(s)


def excess_kurtosis(x: torch.Tensor) -> float:
    """Fisher excess kurtosis m₄/m₂² − 3 of *all* values pooled (biased moments, as scipy)."""
    v = torch.as_tensor(x).double().flatten()
    if v.numel() < 2 or not bool(torch.isfinite(v).all()):
        raise DataError(f"excess_kurtosis: need ≥ 2 finite values, got {v.numel()}")
    c = v - v.mean()
    m2 = (c**2).mean()
    if float(m2) <= 0:
        raise NumericalError("excess_kurtosis undefined: zero variance")
    return float((c**4).mean() / m2**2 - 3.0)


def token_kurtosis(h: torch.Tensor) -> torch.Tensor:
    """Per-token excess kurtosis across the d coordinates, shape (n,).

    Its mean is PR #2011's depth-trajectory "kurtosis" (computed along the last axis,
    with +1e-12 in the denominator, so constant rows give −3 rather than NaN).
    """
    x = _states(h)
    c = x - x.mean(1, keepdim=True)
    m2 = (c**2).mean(1)
    m4 = (c**4).mean(1)
    return m4 / (m2**2 + 1e-12) - 3.0


def norm_stats(h: torch.Tensor) -> dict[str, float]:
    """Mean, unbiased variance and max of the token L2 norms, and max |h|."""
    x = _states(h)
    norms = torch.linalg.vector_norm(x, dim=1)
    return {
        "norm_mean": float(norms.mean()),
        "norm_var": float(norms.var()),
        "norm_max": float(norms.max()),
        "max_abs": float(x.abs().max()),
    }


def _histogram(values: np.ndarray, bins: int, value_name: str) -> pd.DataFrame:
    if bins < 1:
        raise DataError(f"bins must be ≥ 1, got {bins}")
    counts, edges = np.histogram(values, bins=bins)
    width = np.diff(edges)
    return pd.DataFrame(
        {
            "bin_left": edges[:-1],
            "bin_right": edges[1:],
            "count": counts,
            "density": counts / (counts.sum() * np.where(width > 0, width, 1.0)),
            "quantity": value_name,
        }
    )


def coordinate_histogram(h: torch.Tensor, bins: int = 60) -> pd.DataFrame:
    """Histogram of every coordinate value (PR #2011 "coordinate distribution", 60 bins)."""
    return _histogram(_states(h).flatten().numpy(), bins, "coordinate")


def norm_histogram(h: torch.Tensor, bins: int = 20) -> pd.DataFrame:
    """Histogram of the token L2 norms (PR #2011 "L2-norm distribution", 20 bins)."""
    return _histogram(torch.linalg.vector_norm(_states(h), dim=1).numpy(), bins, "l2_norm")


def pca3(h: torch.Tensor, basis_of: torch.Tensor | None = None) -> pd.DataFrame:
    """Projection of the centred states on their first 3 principal axes (U·S, as the PR).

    With ``basis_of`` (reference states of the same dimension, e.g. the unquantized
    model's on the same tokens) the axes and the centre are the reference's, so two
    variants' clouds share coordinates and their difference per token can be read off.

    One row per token: ``token``, ``pc1..pc3``. ``df.attrs`` holds
    ``explained_variance_ratio`` (3 floats: variance along each axis over the total
    about the centre) and ``singular_values`` (3 floats: the norm of each projection).
    Fewer than 3 available components are padded with zeros.
    """
    x = _states(h)
    ref = x if basis_of is None else _states(basis_of)
    if ref.shape[1] != x.shape[1]:
        raise DataError(f"pca3: states of dimension {x.shape[1]}, basis of dimension {ref.shape[1]}")
    centre = ref.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(ref - centre, full_matrices=False)
    if float((s**2).sum()) <= 0:
        raise NumericalError("pca3 undefined: the hidden states have zero variance")
    xc = x - centre
    k = min(3, s.numel())
    proj = torch.zeros(x.shape[0], 3, dtype=torch.float64)
    proj[:, :k] = xc @ vh[:k].T  # = U·S for the reference itself
    total = float((xc**2).sum())
    sv = [float(v) for v in torch.linalg.vector_norm(proj[:, :k], dim=0)] + [0.0] * (3 - k)
    df = pd.DataFrame(
        {"token": np.arange(x.shape[0]), "pc1": proj[:, 0], "pc2": proj[:, 1], "pc3": proj[:, 2]}
    )
    df.attrs["singular_values"] = sv
    df.attrs["explained_variance_ratio"] = [v * v / total if total > 0 else 0.0 for v in sv]
    return df


def hidden_state_metrics(h: torch.Tensor) -> dict[str, float]:
    """All scalar geometry metrics of one set of hidden states (PR #2011 canonical metrics+)."""
    x = _states(h)
    return {
        "n_tokens": int(x.shape[0]),
        "dim": int(x.shape[1]),
        "isoscore": isoscore(x),
        "mean_abs_cos": mean_abs_cosine(x),
        "eff_rank": effective_rank(x),
        **norm_stats(x),
        "kurtosis": excess_kurtosis(x),
        "token_kurtosis_mean": float(token_kurtosis(x).mean()),
    }
