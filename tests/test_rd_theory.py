"""Exact Gaussian quantiser entropy/distortion vs numerical integration and the PR's approximation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate
from scipy.stats import norm

from qlab.analysis.rd_theory import (
    ECSQ_GAP_BITS,
    ECSQ_GAP_DB,
    approx_entropy,
    approximation_table,
    bin_probabilities,
    ecsq_high_rate,
    gaussian_quant_entropy,
    gaussian_quant_mse,
    gaussian_rd_bound,
    quant_step,
)
from qlab.errors import ConfigError


def quad_bins(bits: int, k: float, step: str) -> tuple[np.ndarray, float]:
    """Independent slow reference: integrate φ and (w − qs)²φ over each bin with quad."""
    s, r = quant_step(bits, k, step), 2 ** (bits - 1) - 1
    probs, mse = [], 0.0
    for j in range(-r, r + 1):
        lo = -np.inf if j == -r else (j - 0.5) * s
        hi = np.inf if j == r else (j + 0.5) * s
        probs.append(integrate.quad(norm.pdf, lo, hi, epsabs=1e-14)[0])
        mse += integrate.quad(lambda w, c=j * s: (w - c) ** 2 * norm.pdf(w), lo, hi, epsabs=1e-14)[0]
    return np.array(probs), mse


@pytest.mark.parametrize(
    "bits,k,step", [(2, 3.0, "qlab"), (4, 6.0, "qlab"), (6, 12.85, "qlab"), (5, 20.0, "pr")]
)
def test_exact_entropy_and_mse_match_quadrature(bits: int, k: float, step: str) -> None:
    p_ref, mse_ref = quad_bins(bits, k, step)
    p = bin_probabilities(bits, k, step)
    np.testing.assert_allclose(p, p_ref, atol=1e-10)
    h_ref = -sum(x * math.log2(x) for x in p_ref if x > 0)
    assert gaussian_quant_entropy(bits, k, step) == pytest.approx(h_ref, abs=1e-8)
    assert gaussian_quant_mse(bits, k, step) == pytest.approx(mse_ref, rel=1e-7)


def test_matches_monte_carlo_sdclip() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal(2_000_000)
    r, k = 31, 12.85
    q = np.clip(np.round(w / (k / r)), -r, r)
    counts = np.bincount((q + r).astype(int), minlength=2 * r + 1) / w.size
    h = -(counts[counts > 0] * np.log2(counts[counts > 0])).sum()
    assert gaussian_quant_entropy(6, k) == pytest.approx(h, abs=5e-3)


def test_approximation_within_0p05_bits_when_bins_small_and_clip_wide() -> None:
    table = approximation_table(bits=range(2, 9), ks=range(2, 31))
    table["l"] = table["k"] / 2 ** (table["bits"] - 1)
    good = table[(table["l"] <= 0.9) & (table["k"] >= 4)]
    assert len(good) > 50
    assert good["error_pr"].abs().max() < 0.05
    # Against our own step (c/R), the PR formula overestimates by ≈ log2(2^(b−1)/R).
    six = table[(table["bits"] == 6) & (table["k"] == 8)].iloc[0]
    assert six["error_vs_ours"] == pytest.approx(math.log2(32 / 31), abs=5e-3)
    assert abs(approx_entropy(6, 12.85) - 3.3635) < 1e-3  # 6 − 3.6836 + 1.0471 (hand computed)


@pytest.mark.parametrize("bits,k", [(3, 4.0), (4, 12.85), (5, 8.0)])
def test_middle_bins_of_b_plus_1_2k_match(bits: int, k: float) -> None:
    small = bin_probabilities(bits, k, "pr")
    big = bin_probabilities(bits + 1, 2 * k, "pr")
    r_small, r_big = len(small) // 2, len(big) // 2
    middle = big[r_big - r_small + 1 : r_big + r_small]
    np.testing.assert_allclose(small[1:-1], middle, rtol=1e-12)  # interior bins identical
    assert gaussian_quant_entropy(bits + 1, 2 * k, "pr") >= gaussian_quant_entropy(bits, k, "pr")
    # Under our step s = c/R the two steps differ by (2R+1)/(2R): close but not identical.
    ours_small, ours_big = bin_probabilities(bits, k), bin_probabilities(bits + 1, 2 * k)
    assert not np.allclose(ours_small[1:-1], ours_big[r_big - r_small + 1 : r_big + r_small], rtol=1e-6)


def test_rate_distortion_lines() -> None:
    assert gaussian_rd_bound(2.0, 4.0) == pytest.approx(4.0 / 16)
    assert abs(ECSQ_GAP_DB - 1.533) < 1e-3  # 10·log10(πe/6)
    assert abs(ECSQ_GAP_BITS - 0.2546) < 1e-3  # ½·log2(πe/6)
    rate, dist = ecsq_high_rate(0.05)
    assert dist == pytest.approx(0.05**2 / 12)
    assert 10 * math.log10(dist / gaussian_rd_bound(rate)) == pytest.approx(ECSQ_GAP_DB, abs=1e-9)
    # At b = 8, k = 8 our quantiser sits on the high-rate ECSQ line (1.53 dB above D(R)).
    h, d = gaussian_quant_entropy(8, 8.0), gaussian_quant_mse(8, 8.0)
    assert 10 * math.log10(d / gaussian_rd_bound(h)) == pytest.approx(ECSQ_GAP_DB, abs=0.02)
    assert d == pytest.approx(quant_step(8, 8.0) ** 2 / 12, rel=1e-3)


@pytest.mark.parametrize(
    "bits,k,step", [(1, 4.0, "qlab"), (4, 0.0, "qlab"), (4, float("nan"), "qlab"), (4, 4.0, "x")]
)
def test_bad_arguments(bits: int, k: float, step: str) -> None:
    with pytest.raises(ConfigError):
        gaussian_quant_entropy(bits, k, step)
