"""NF4 levels and blockwise scaling; Lloyd-Max fitting and codebook quantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm

from qlab.errors import QuantError
from qlab.quant.codebook import (
    NF4_LEVELS,
    fit_lloyd_max,
    quantize_codebook,
    quantize_lloyd_max,
    quantize_nf4,
)
from qlab.quant.tensor import dequantize


def qlora_normal_levels() -> np.ndarray:
    """QLoRA's NF4 construction, written from the paper's definition."""
    delta = 0.5 * (1 / 30 + 1 / 32)
    pos = norm.ppf(np.linspace(1 - delta, 0.5, 9)[:-1])  # 8 positive
    neg = -norm.ppf(np.linspace(1 - delta, 0.5, 8)[:-1])  # 7 negative
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    return v / v.max()


def test_nf4_levels_match_quantile_construction():
    ref = qlora_normal_levels()
    assert NF4_LEVELS.numel() == 16
    assert np.abs(NF4_LEVELS.numpy() - ref).max() < 1e-4
    assert (NF4_LEVELS > 0).sum() == 8 and (NF4_LEVELS < 0).sum() == 7 and (NF4_LEVELS == 0).sum() == 1


def test_nf4_blockwise_matches_slow_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 150, generator=g)  # 150 = 2 full blocks of 64 + a short block of 22
    q = quantize_nf4(w, block_size=64)
    assert q.scale.shape == (5, 3) and q.scale.dtype == torch.float16 and q.group_size == 64
    deq = dequantize(q)
    levels = NF4_LEVELS.double()
    for r in range(5):
        for c in range(150):
            lo = (c // 64) * 64
            absmax = w[r, lo : lo + 64].abs().max().item()
            s = q.scale[r, c // 64].item()
            assert s >= absmax and s - absmax <= absmax * 1e-3  # fp16 rounded up, no clipping
            x = w[r, c].item() / s
            expected = levels[(levels - x).abs().argmin()].item() * s
            assert abs(deq[r, c].item() - expected) < 1e-6
    assert (deq - w).abs().max() <= q.scale.float().max() * 0.2


def test_nf4_per_row_and_1d_and_zero_rows():
    w = torch.randn(4, 32)
    w[2] = 0
    q = quantize_nf4(w, per_row=True)
    assert q.scale.shape == (4, 1)
    deq = dequantize(q)
    assert torch.equal(deq[2], torch.zeros(32))
    # the row's absmax element is represented exactly (level ±1)
    i = w[0].abs().argmax()
    assert abs(deq[0, i] - w[0, i]) <= 1e-3 * w[0].abs().max()
    q1 = quantize_nf4(torch.randn(130), block_size=64)
    assert q1.scale.shape == (3,) and dequantize(q1).shape == (130,)


def test_nf4_rejects_bad_input():
    with pytest.raises(QuantError, match="NaN"):
        quantize_nf4(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(QuantError, match="block_size"):
        quantize_nf4(torch.randn(2, 8), block_size=0)
    with pytest.raises(QuantError):
        quantize_nf4(torch.zeros(0, 4))


def _best_uniform_mse(x: np.ndarray, k: int) -> float:
    """Best k-level uniform (midrise) quantizer over a fine grid of step sizes."""
    best = np.inf
    for step in np.linspace(0.01, 0.3, 300):
        levels = (np.arange(k) - (k - 1) / 2) * step
        idx = np.clip(np.round(x / step + (k - 1) / 2), 0, k - 1).astype(int)
        best = min(best, float(np.mean((x - levels[idx]) ** 2)))
    return best


def test_lloyd_max_beats_uniform_on_gaussian_and_is_monotone():
    x = torch.randn(40_000, generator=torch.Generator().manual_seed(1))
    fit = fit_lloyd_max(x, k=16)
    assert fit.converged
    mse = fit.history["mse"].to_numpy()
    assert np.all(np.diff(mse) <= 1e-15)  # never increases
    assert mse[-1] < mse[0]
    assert fit.mse < 0.97 * _best_uniform_mse(x.double().numpy(), 16)
    # the recorded MSE is the real quantization MSE of the fitted codebook
    q = quantize_codebook(x, fit.codebook)
    assert abs(float(((dequantize(q) - x) ** 2).mean()) - fit.mse) < 1e-6
    # known Lloyd-Max value for N(0,1), 16 levels: D ≈ 0.009497 (Max 1960)
    assert abs(fit.mse - 0.009497) < 0.0006


def test_lloyd_max_fixed_point_and_deterministic():
    x = torch.randn(5_000, generator=torch.Generator().manual_seed(2))
    a, b = fit_lloyd_max(x, k=8), fit_lloyd_max(x, k=8)
    assert torch.equal(a.codebook, b.codebook)
    # at convergence every level is the mean of its nearest-neighbour cell
    cb = a.codebook.double()
    xd = x.double()
    cell = (xd[:, None] - cb[None, :]).abs().argmin(dim=1)
    for i in range(8):
        assert abs(xd[cell == i].mean().item() - cb[i].item()) < 1e-5


def test_lloyd_max_two_levels_on_two_clusters():
    x = torch.cat([torch.full((100,), -1.0), torch.full((50,), 3.0), torch.tensor([-1.2, -0.8, 2.9, 3.1])])
    fit = fit_lloyd_max(x, k=2)
    assert torch.allclose(fit.codebook, torch.tensor([-1.0, 3.0]), atol=1e-6)


def test_global_lloyd_max_over_several_tensors():
    g = torch.Generator().manual_seed(3)
    ws = {"a": torch.randn(16, 64, generator=g) * 0.02, "b": torch.randn(8, 32, generator=g) * 5}
    qs, fit = quantize_lloyd_max(ws, k=64)
    assert fit.codebook.numel() == 64
    for name, w in ws.items():
        q = qs[name]
        assert (
            q.scheme == "codebook" and torch.equal(q.codebook, fit.codebook) and q.codes.dtype == torch.int8
        )
        rel = float(((dequantize(q) - w) ** 2).mean() / (w**2).mean())
        assert rel < 2e-3  # 64 levels: ~6 bits of precision


def test_codebook_index_above_127_round_trips():
    cb = torch.linspace(-1, 1, 256)
    x = cb[200:210].clone()
    q = quantize_codebook(x, cb)
    assert torch.allclose(dequantize(q), x)


def test_lloyd_max_and_codebook_errors():
    with pytest.raises(QuantError, match="k"):
        fit_lloyd_max(torch.randn(10), k=1)
    with pytest.raises(QuantError, match="distinct"):
        fit_lloyd_max(torch.ones(100), k=4)
    with pytest.raises(QuantError, match="increasing"):
        quantize_codebook(torch.randn(4), torch.tensor([1.0, 0.0]))
    with pytest.raises(QuantError, match="does not fit"):
        quantize_codebook(torch.randn(4, 8), torch.tensor([0.0, 1.0]), torch.ones(3, 1))
    with pytest.raises(QuantError, match="does not fit"):  # (rows,) would broadcast along columns
        quantize_codebook(torch.randn(4, 4), torch.tensor([0.0, 1.0]), torch.ones(4))
    with pytest.raises(QuantError, match="1-D or 2-D"):
        quantize_nf4(torch.randn(2, 2, 4))
