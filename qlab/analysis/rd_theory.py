"""Rate and distortion of a clipped, uniformly quantised Gaussian — exact and approximate.

Our quantiser (the records' SDClip): clip c = kσ, R = 2^(b−1) − 1, step s = c/R,
q = clamp(round(w/s), −R, R). The end codes ±R absorb the tails. PR #1394's entropy
approximation H ≈ b − log₂k + ½log₂(πe/2) instead assumes the bin width
l = 2c/2^b = c/2^(b−1) (``step="pr"``), slightly narrower than ours: for the same
(b, k) our entropy is lower by about log₂(2^(b−1)/R) (0.046 bits at b = 6, 0.42 at b = 2).
Under the PR convention (b, k) and (b+1, 2k) share the step, so their middle bins agree
exactly; under ours the steps differ by the factor (2R+1)/(2R).

Everything is for σ = 1 (entropy is scale-free; distortion scales with σ²).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.stats import norm

from qlab.errors import ConfigError

HALF_LOG2_PI_E_OVER_2 = 0.5 * math.log2(math.pi * math.e / 2)
GAUSS_DIFF_ENTROPY_BITS = 0.5 * math.log2(2 * math.pi * math.e)
ECSQ_GAP_BITS = 0.5 * math.log2(math.pi * math.e / 6)  # ≈ 0.254 bit
ECSQ_GAP_DB = 10 * math.log10(math.pi * math.e / 6)  # ≈ 1.53 dB


def _check(bits: int, k: float) -> None:
    if int(bits) != bits or not 2 <= bits <= 16:
        raise ConfigError(f"bits must be an integer in 2..16, got {bits}")
    if not (math.isfinite(k) and k > 0):
        raise ConfigError(f"clip multiple k must be finite and > 0, got {k}")


def quant_step(bits: int, k: float, step: str = "qlab") -> float:
    """Quantiser step for σ = 1: k/R (``"qlab"``, the records' SDClip) or k/2^(b−1) (``"pr"``)."""
    _check(bits, k)
    if step == "qlab":
        return k / (2 ** (bits - 1) - 1)
    if step == "pr":
        return k / 2 ** (bits - 1)
    raise ConfigError(f"step convention must be 'qlab' or 'pr', got {step!r}")


def bin_edges(bits: int, k: float, step: str = "qlab") -> tuple[np.ndarray, np.ndarray]:
    """Codes −R..R and their 2R+2 interval edges (±inf at the ends) for σ = 1."""
    s = quant_step(bits, k, step)
    r = 2 ** (bits - 1) - 1
    codes = np.arange(-r, r + 1)
    inner = (np.arange(-r, r) + 0.5) * s
    return codes, np.concatenate([[-np.inf], inner, [np.inf]])


def bin_probabilities(bits: int, k: float, step: str = "qlab") -> np.ndarray:
    """P(q = j) for j = −R..R under N(0, 1), end bins including the tails."""
    _, edges = bin_edges(bits, k, step)
    # Differences of the survival function on the right half keep tail bins accurate.
    upper = np.where(edges > 0, norm.sf(edges), 1.0 - norm.cdf(edges))
    return upper[:-1] - upper[1:]


def gaussian_quant_entropy(bits: int, k: float, step: str = "qlab") -> float:
    """Exact entropy (bits/symbol) of the clipped uniform quantiser applied to N(0, 1)."""
    p = bin_probabilities(bits, k, step)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def approx_entropy(bits: int, k: float) -> float:
    """PR #1394's high-resolution approximation b − log₂k + ½log₂(πe/2) (bin width c/2^(b−1))."""
    _check(bits, k)
    return bits - math.log2(k) + HALF_LOG2_PI_E_OVER_2


def approx_entropy_qlab(bits: int, k: float) -> float:
    """The same approximation h(X) − log₂ s with our step s = k/R."""
    return GAUSS_DIFF_ENTROPY_BITS - math.log2(quant_step(bits, k, "qlab"))


def gaussian_quant_mse(bits: int, k: float, step: str = "qlab") -> float:
    """Exact E[(w − s·q)²] for w ~ N(0, 1), summed in closed form over the bins.

    ∫_a^b (w − c)² φ = (1 + c²)(Φ(b) − Φ(a)) + (a − 2c)φ(a) − (b − 2c)φ(b).
    """
    s = quant_step(bits, k, step)
    codes, edges = bin_edges(bits, k, step)
    a, b, c = edges[:-1], edges[1:], codes * s
    mass = bin_probabilities(bits, k, step)
    # φ(±inf) = 0 kills the infinite edge terms; substitute 0 first to avoid inf·0.
    a_f, b_f = np.where(np.isfinite(a), a, 0.0), np.where(np.isfinite(b), b, 0.0)
    pa = np.where(np.isfinite(a), (a_f - 2 * c) * norm.pdf(a_f), 0.0)
    pb = np.where(np.isfinite(b), (b_f - 2 * c) * norm.pdf(b_f), 0.0)
    return float(np.sum((1 + c**2) * mass + pa - pb))


def gaussian_rd_bound(rate_bits: float, sigma2: float = 1.0) -> float:
    """Shannon's distortion–rate function of a Gaussian source: D(R) = σ²·2^(−2R)."""
    if rate_bits < 0 or sigma2 <= 0:
        raise ConfigError(f"need rate ≥ 0 and σ² > 0, got R={rate_bits}, σ²={sigma2}")
    return sigma2 * 2.0 ** (-2 * rate_bits)


def ecsq_high_rate(step: float, sigma2: float = 1.0) -> tuple[float, float]:
    """High-rate entropy-coded uniform quantiser: (rate h(X) − log₂ s, distortion s²/12).

    At equal rate its distortion sits 1.53 dB (πe/6) above D(R); at equal distortion it
    needs ~0.254 bit more than R(D).
    """
    if step <= 0 or sigma2 <= 0:
        raise ConfigError(f"need step > 0 and σ² > 0, got s={step}, σ²={sigma2}")
    return 0.5 * math.log2(2 * math.pi * math.e * sigma2) - math.log2(step), step**2 / 12


def approximation_table(bits=range(2, 9), ks=range(2, 31)) -> pd.DataFrame:
    """One row per (b, k): exact entropy under both step conventions, the approximations
    and their errors, clipped mass and exact MSE (σ = 1)."""
    rows = []
    for b in bits:
        for k in ks:
            exact_pr = gaussian_quant_entropy(b, k, "pr")
            exact = gaussian_quant_entropy(b, k, "qlab")
            approx = approx_entropy(b, k)
            approx_q = approx_entropy_qlab(b, k)
            rows.append(
                dict(
                    bits=b,
                    k=float(k),
                    step=quant_step(b, k),
                    exact_entropy=exact,
                    exact_entropy_pr=exact_pr,
                    approx_entropy=approx,
                    approx_entropy_qlab=approx_q,
                    error_pr=approx - exact_pr,
                    error_qlab=approx_q - exact,
                    error_vs_ours=approx - exact,
                    clipped_mass=float(2 * norm.sf(k)),
                    mse=gaussian_quant_mse(b, k),
                )
            )
    return pd.DataFrame(rows)


def rd_table(bits=range(2, 9), ks=(4.0, 8.0, 12.85, 20.0)) -> pd.DataFrame:
    """Exact (rate, distortion) of SDClip on N(0, 1) against D(R) and the ECSQ line."""
    rows = []
    for b in bits:
        for k in ks:
            rate, mse = gaussian_quant_entropy(b, k), gaussian_quant_mse(b, k)
            bound = gaussian_rd_bound(rate)
            _, ecsq = ecsq_high_rate(2 ** (GAUSS_DIFF_ENTROPY_BITS - rate))
            rows.append(
                dict(
                    bits=b,
                    k=float(k),
                    rate=rate,
                    mse=mse,
                    rd_bound=bound,
                    ecsq_mse=ecsq,
                    gap_db=10 * math.log10(mse / bound),
                )
            )
    return pd.DataFrame(rows)
