"""Spectral fingerprints: hand-computed spectra, WeightWatcher α, Δσ%."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qlab.analysis import spectra
from qlab.errors import DataError, NumericalError


def _matrix(s: list[float], rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """U·diag(s)·Vᵀ with random orthonormal U (rows × m) and V (cols × m)."""
    g = torch.Generator().manual_seed(seed)
    m = len(s)
    u, _ = torch.linalg.qr(torch.randn(rows, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, m, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


S8 = [8.0, 4.0, 2.0, 1.0, 1.0, 0.5, 0.25, 0.1]


def test_weight_family_and_layer():
    assert spectra.weight_family("blocks.3.attn.c_q.weight") == "q"
    assert spectra.weight_family("blocks.3.attn.c_k.weight") == "k"
    assert spectra.weight_family("blocks.3.attn.c_v.weight") == "v"
    assert spectra.weight_family("blocks.3.attn.proj.weight") == "attn_out"
    assert spectra.weight_family("blocks.10.mlp.fc.weight") == "mlp_in"
    assert spectra.weight_family("blocks.10.mlp.proj.weight") == "mlp_out"
    assert spectra.weight_family("tok_emb.weight") == "embedding"
    assert spectra.weight_family("lm_head.weight") == "embedding"
    assert spectra.weight_family("blocks.0.attn_scale") is None
    assert spectra.weight_family("skip_weights") is None
    assert spectra.layer_index("blocks.10.mlp.fc.weight") == 10
    assert spectra.layer_index("tok_emb.weight") is None


def test_scalar_metrics_by_hand():
    w = _matrix(S8, 12, 8)
    s = spectra.singular_values({"w": w})["w"].numpy()
    np.testing.assert_allclose(s, S8, rtol=1e-10)
    a = np.array(S8)
    assert spectra.stable_rank(s) == pytest.approx((a**2).sum() / 64.0)
    p = a / a.sum()
    assert spectra.entropy_effective_rank(s) == pytest.approx(math.exp(-sum(pi * math.log(pi) for pi in p)))
    # m = 8, tail_start 1/8 → tail = indices 1..7
    expected = np.mean([-math.log10(x / 8.0) for x in S8[1:]])
    assert spectra.flatness(s) == pytest.approx(expected)
    # tail_start 0.5 → indices 4..7
    assert spectra.flatness(s, tail_start=0.5) == pytest.approx(
        np.mean([-math.log10(x / 8.0) for x in S8[4:]])
    )
    # order does not matter, and the normalised curve gives the same flatness
    assert spectra.flatness(a[::-1].copy()) == pytest.approx(expected)
    assert spectra.flatness(a / 8.0) == pytest.approx(expected)


def test_flat_spectrum_extremes():
    ones = np.ones(16)
    assert spectra.entropy_effective_rank(ones) == pytest.approx(16.0)
    assert spectra.stable_rank(ones) == pytest.approx(16.0)
    assert spectra.flatness(ones) == pytest.approx(0.0)
    spike = np.array([1.0] + [0.0] * 15)
    assert spectra.entropy_effective_rank(spike) == pytest.approx(1.0)
    assert spectra.flatness(spike) == pytest.approx(8.0)  # clipped at 1e-8


def test_batched_equals_per_matrix():
    sd = {f"blocks.{i}.attn.c_q.weight": torch.randn(32, 24) for i in range(3)}
    sd["tok_emb.weight"] = torch.randn(50, 24)
    a = spectra.singular_values(sd, batched=True)
    b = spectra.singular_values(sd, batched=False)
    assert list(a) == list(sd)
    for k in sd:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-12)


def _slow_ww_alpha(evals: np.ndarray) -> tuple[float, float, float]:
    """Literal transcription of WeightWatcher's standard fit loop (one candidate at a time)."""
    x = np.sort(evals[evals > 1e-5])
    n_all = len(x)
    best = (np.inf, None, None)
    for i in range(n_all - 1):
        xmin = x[i]
        n = n_all - i
        alpha = 1 + n / np.sum(np.log(x[i:] / xmin))
        d = 1.0
        if alpha > 1:
            d = max(abs(1 - (x[i + k] / xmin) ** (1 - alpha) - k / n) for k in range(n))
        if d < best[0]:
            best = (d, alpha, xmin)
    return best[1], best[2], best[0]


def test_alpha_matches_slow_reference():
    rng = np.random.default_rng(1)
    evals = rng.pareto(2.0, size=80) + 0.5
    fit = spectra.powerlaw_alpha(evals)
    alpha, xmin, d = _slow_ww_alpha(evals)
    assert fit.alpha == pytest.approx(alpha, rel=1e-10)
    assert fit.xmin == pytest.approx(xmin)
    assert abs(fit.D - d) <= 1e-9 * d
    assert fit.n_tail == int((np.sort(evals) >= xmin).sum())


@pytest.mark.parametrize("alpha_true", [2.5, 4.0])
def test_alpha_recovers_pareto_exponent(alpha_true):
    # classical Pareto with density ∝ λ^(−α): numpy's Lomax + 1 with shape a = α − 1
    rng = np.random.default_rng(7)
    evals = (rng.pareto(alpha_true - 1.0, size=3000) + 1.0) * 0.3
    fit = spectra.powerlaw_alpha(torch.from_numpy(evals))
    assert abs(fit.alpha - alpha_true) < 0.1
    assert fit.sigma == pytest.approx((fit.alpha - 1) / math.sqrt(fit.n_tail))


def test_alpha_small_n_rule():
    rng = np.random.default_rng(3)
    evals = rng.pareto(1.5, size=15) + 1.0
    fit = spectra.powerlaw_alpha(evals)
    x = np.sort(evals)
    best = None
    for i in range(len(x) - 1):
        n = len(x) - i
        s = np.log(x[i:] / x[i]).sum()
        if n < 8:
            continue
        a = 1 + (n - 1) / s
        d = np.max(np.abs(np.arange(n) / n - (1 - (x[i:] / x[i]) ** (1 - a))))
        if best is None or d < best[0]:  # WW 0.7.7 finally selects by minimum D
            best = (d, a, x[i])
    assert fit.alpha == pytest.approx(best[1])
    assert fit.xmin == pytest.approx(best[2])


def test_alpha_errors():
    with pytest.raises(NumericalError):
        spectra.powerlaw_alpha(np.array([1e-9, 1e-8, 2.0]))
    with pytest.raises(DataError):
        spectra.powerlaw_alpha(np.array([1.0, np.nan, 2.0]))


def _layers_sd(spectra_per_layer: list[list[float]], family: str = "c_q") -> dict[str, torch.Tensor]:
    return {
        f"blocks.{i}.attn.{family}.weight": _matrix(s, 10, 8, seed=i) for i, s in enumerate(spectra_per_layer)
    }


def test_summary_and_table():
    sd = _layers_sd([S8])
    sd["blocks.0.attn_scale"] = torch.ones(8)  # 1-D: skipped
    sd["codes"] = torch.ones(4, 4, dtype=torch.int8)  # integer: skipped
    summary = spectra.spectral_summary(sd)
    assert list(summary["name"]) == ["blocks.0.attn.c_q.weight"]
    row = summary.iloc[0]
    assert (row["family"], row["layer"], row["rows"], row["cols"], row["rank"]) == ("q", 0, 10, 8, 8)
    assert row["sigma_max"] == pytest.approx(8.0)
    assert row["frobenius"] == pytest.approx(math.sqrt(sum(x * x for x in S8)))
    assert row["stable_rank"] == pytest.approx(spectra.stable_rank(np.array(S8)))
    table = spectra.spectrum_table(sd)
    assert len(table) == 8
    np.testing.assert_allclose(table["sigma_norm"], np.array(S8) / 8.0, rtol=1e-9)
    np.testing.assert_allclose(table["eigenvalue"], np.array(S8) ** 2, rtol=1e-9)


def test_family_average_and_flatness():
    s1 = [4.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    s2 = [2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.5]
    fam = spectra.family_spectra(_layers_sd([s1, s2]))
    expected = (np.array(s1) / 4.0 + np.array(s2) / 2.0) / 2
    np.testing.assert_allclose(fam["sigma_norm"], expected, rtol=1e-9)
    np.testing.assert_allclose(fam["sigma"], (np.array(s1) + np.array(s2)) / 2, rtol=1e-9)
    summ = spectra.family_summary(_layers_sd([s1, s2]), fit_alpha=False).iloc[0]
    assert summ["flatness"] == pytest.approx(np.mean(-np.log10(expected[1:])))
    per = [spectra.flatness(np.array(s)) for s in (s1, s2)]
    assert summ["flatness_mean"] == pytest.approx(np.mean(per))
    assert summ["n_matrices"] == 2


def test_zero_matrix_left_out_of_family():
    sd = _layers_sd([S8])
    sd["blocks.1.attn.c_q.weight"] = torch.zeros(10, 8)
    assert spectra.family_summary(sd, fit_alpha=False).iloc[0]["n_matrices"] == 1
    summary = spectra.spectral_summary(sd)
    assert math.isnan(summary.set_index("name").loc["blocks.1.attn.c_q.weight", "stable_rank"])


def test_differential_by_hand():
    sd = _layers_sd([S8])
    ref = {k: v / 1.25 for k, v in sd.items()}  # every σ scaled by 0.8 → Δ = +25 %
    diff = spectra.spectral_differential(sd, ref)
    np.testing.assert_allclose(diff["delta_pct"], 25.0, rtol=1e-9)
    a = {"blocks.0.mlp.fc.weight": torch.diag(torch.tensor([4.0, 2.0, 1.0]))}
    b = {"blocks.0.mlp.fc.weight": torch.diag(torch.tensor([2.0, 2.0, 2.0]))}
    d = spectra.spectral_differential(a, b, by="matrix")
    np.testing.assert_allclose(d["delta_pct"], [100.0, 0.0, -50.0], rtol=1e-9)
    d_norm = spectra.spectral_differential(a, b, by="matrix", normalized=True)
    np.testing.assert_allclose(d_norm["delta_pct"], [0.0, -50.0, -75.0], rtol=1e-9)
    smooth = spectra.spectral_differential(a, b, by="matrix", smooth=3)
    np.testing.assert_allclose(smooth["delta_pct"], [50.0, 50.0 / 3, -25.0], rtol=1e-9)


def test_bad_inputs():
    with pytest.raises(DataError):
        spectra.spectral_summary({"w": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])})
    with pytest.raises(DataError):
        spectra.spectral_summary({"v": torch.ones(5)})
    with pytest.raises(DataError):
        spectra.flatness(np.ones(4), tail_start=1.5)
    with pytest.raises(NumericalError):
        spectra.stable_rank(np.zeros(3))
    with pytest.raises(DataError):
        spectra.spectral_differential(_layers_sd([S8]), _layers_sd([S8]), by="row")
    with pytest.raises(DataError):
        spectra.family_spectra(_layers_sd([S8]), families=["nope"])
