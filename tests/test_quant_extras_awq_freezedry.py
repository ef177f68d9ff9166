"""AWQ-lite (output error with outlier channels) and freeze-dry (LSQ + skip rule)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qlab.errors import QuantError
from qlab.quant.awq import awq_quantize, awq_search_alpha, channel_scales
from qlab.quant.freezedry import freeze_dry, freeze_dry_table, neighbour_coefficients
from qlab.quant.rtn import quantize_rtn
from qlab.quant.tensor import dequantize


def _outlier_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 64, generator=g)
    x[:, [3, 17, 40]] *= 30.0
    w = torch.randn(24, 64, generator=g)
    return x, w


def test_channel_scales_formula():
    m = torch.tensor([1.0, 4.0, 16.0])
    s = channel_scales(m, alpha=0.5)
    raw = m.sqrt()
    assert torch.allclose(s, raw / (raw.max() * raw.min()).sqrt(), rtol=1e-3)
    assert torch.allclose(channel_scales(m, alpha=0.0), torch.ones(3))


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_lowers_output_error_with_outlier_channels(bits):
    x, w = _outlier_inputs()
    ref = x @ w.T
    q = awq_quantize(w, x.abs().mean(dim=0), bits)
    assert q.scheme == "awq" and q.meta["channel_scales"].shape == (64,)
    deq = dequantize(q)
    # folding back by hand gives the same tensor
    inner = dequantize(quantize_rtn(w * q.meta["channel_scales"].float(), bits))
    assert torch.allclose(deq, inner / q.meta["channel_scales"].float())
    err_awq = torch.linalg.norm(ref - x @ deq.T)
    err_rtn = torch.linalg.norm(ref - x @ dequantize(quantize_rtn(w, bits)).T)
    assert err_awq < 0.85 * err_rtn


def test_awq_alpha_search_picks_minimum():
    x, w = _outlier_inputs(1)
    best, table = awq_search_alpha(w, x, 4, alphas=(0.0, 0.25, 0.5))
    assert best == table.loc[table.output_error.idxmin(), "alpha"]
    assert table.set_index("alpha").output_error[best] <= table.set_index("alpha").output_error[0.0]


def test_awq_errors():
    w = torch.randn(4, 8)
    with pytest.raises(QuantError, match="input channels"):
        awq_quantize(w, torch.ones(7), 4)
    with pytest.raises(QuantError, match="non-negative"):
        awq_quantize(w, -torch.ones(8), 4)
    with pytest.raises(QuantError, match="all zeros"):
        awq_quantize(w, torch.zeros(8), 4)


def test_freeze_dry_coefficients_match_numpy_lstsq():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 7, generator=g, dtype=torch.float64)
    w[:, 4] = w[:, 2]  # column 3's neighbours collinear: rank-deficient, minimum-norm solution
    coeffs = neighbour_coefficients(w)
    wn = w.numpy()
    for j in range(1, 6):
        sol = np.linalg.lstsq(np.stack([wn[:, j - 1], wn[:, j + 1]], 1), wn[:, j], rcond=None)[0]
        assert np.allclose(coeffs[j].numpy(), sol, atol=1e-9)
    assert torch.equal(coeffs[0], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(coeffs[6], torch.zeros(2, dtype=torch.float64))


def test_freeze_dry_drops_predictable_elements():
    g = torch.Generator().manual_seed(1)
    rows, cols = 64, 40
    w = torch.randn(rows, cols, generator=g) * 0.02
    # odd columns are (almost) the mean of their neighbours
    for j in range(1, cols - 1, 2):
        w[:, j] = 0.5 * (w[:, j - 1] + w[:, j + 1]) + 0.001 * torch.randn(rows, generator=g)
    r = freeze_dry(w, threshold=0.005)
    assert not r.skipped and r.drop_fraction > 0.3
    assert torch.allclose(r.coeffs[1], torch.tensor([0.5, 0.5], dtype=torch.float64), atol=0.05)
    # dropped elements never have a dropped left or right neighbour, and edges are never dropped
    assert not (r.mask[:, 1:] & r.mask[:, :-1]).any()
    assert not r.mask[:, 0].any() and not r.mask[:, -1].any()
    err = (r.reconstruction - w).abs()
    assert torch.equal(err[~r.mask], torch.zeros_like(err[~r.mask]))
    assert err[r.mask].max() < 0.005 + 1e-6
    hist = r.residual_histogram(bins=21)
    assert hist["count"].sum() == rows * (cols - 2)
    assert r.residuals.shape == (rows, cols - 2)


def test_freeze_dry_five_percent_skip_rule():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(50, 30, generator=g)  # residuals ~ 1 ≫ 0.005: ~0.3% would drop
    r = freeze_dry(w)
    assert 0 < r.candidate_fraction < 0.05
    assert r.skipped and r.drop_fraction == 0.0 and not r.mask.any()
    assert torch.equal(r.reconstruction, w)
    # the same matrix passes the rule once the threshold lets ≥ 5% drop
    loose = freeze_dry(w, threshold=0.2)
    assert not loose.skipped and loose.drop_fraction >= 0.05
    # a rule of 0 never skips; table reports one row per matrix
    assert not freeze_dry(w, min_drop_fraction=0.0).skipped
    table = freeze_dry_table({"a": w, "b": torch.zeros(3), "c": w * 0.001})
    assert list(table["name"]) == ["a", "c"] and list(table["skipped"]) == [True, False]


def test_freeze_dry_errors():
    with pytest.raises(QuantError, match="2-D"):
        freeze_dry(torch.randn(5))
    with pytest.raises(QuantError, match="NaN"):
        freeze_dry(torch.tensor([[1.0, float("inf"), 0.0]]))
    with pytest.raises(QuantError, match="threshold"):
        freeze_dry(torch.randn(4, 4), threshold=0.0)
