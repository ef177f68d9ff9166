"""PR #2011 hidden-state quantizers and metrics, checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from qlab.analysis import hidden_quant as HQ
from qlab.errors import ConfigError, DataError


def test_sym_per_tensor_by_hand():
    h = torch.tensor([[7.0, -3.5], [1.2, 0.2]])
    # scale = 7/7 = 1; round half to even: −3.5 → −4
    assert torch.equal(HQ.quant_sym_per_tensor(h, 4), torch.tensor([[7.0, -4.0], [1.0, 0.0]]))
    # codes clamp at −R−1 = −8 like the PR (only reachable with R·s < max|h|, never here)
    assert HQ.quant_sym_per_tensor(torch.tensor([[-7.0, 7.0]]), 4).tolist() == [[-7.0, 7.0]]


def test_sym_per_row_by_hand():
    h = torch.tensor([[14.0, 3.0, -5.0], [0.7, 0.1, -0.35]])
    out = HQ.quant_sym_per_row(h, 4)  # scales 2.0 and 0.1
    torch.testing.assert_close(out, torch.tensor([[14.0, 4.0, -4.0], [0.7, 0.1, -0.4]]))
    zero_row = HQ.quant_sym_per_row(torch.zeros(1, 3), 8)
    assert torch.equal(zero_row, torch.zeros(1, 3))


def test_asym_per_row_by_hand():
    h = torch.tensor([[0.0, 1.5, 3.0]])
    # s = 3/15 = 0.2, z = round(0 − 8) = −8, codes = [0, 8, 15] − 8 → [−8, 0, 7]
    torch.testing.assert_close(HQ.quant_asym_per_row(h, 4), torch.tensor([[0.0, 1.6, 3.0]]))


def test_awq_lite_by_hand():
    h = torch.tensor([[4.0, 1.0], [-2.0, 0.5]], dtype=torch.float64)
    c = torch.tensor([[math.sqrt(3.0), math.sqrt(0.75)]], dtype=torch.float64)
    expected = HQ.quant_sym_per_row(h / c, 4) * c
    torch.testing.assert_close(HQ.quant_awq_lite(h, 4), expected)


def _gptq_lite_literal(h: torch.Tensor, bits=4, damping=0.1) -> torch.Tensor:
    """The PR's loop verbatim in spirit: error added to the whole remaining residual."""
    r = (1 << (bits - 1)) - 1
    res = h.clone()
    out = torch.zeros_like(h)
    scale = h.abs().amax(-1, keepdim=True).clamp_min(1e-8) / r
    for j in range(h.shape[1]):
        q = torch.round(res[:, j : j + 1] / scale).clamp(-r - 1, r) * scale
        out[:, j : j + 1] = q
        if j + 1 < h.shape[1]:
            res[:, j + 1 :] += (res[:, j : j + 1] - q) * damping
    return out


def test_gptq_lite_matches_literal_loop():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(16, 40, generator=g, dtype=torch.float64) ** 3
    torch.testing.assert_close(HQ.quant_gptq_lite(h), _gptq_lite_literal(h), rtol=1e-9, atol=1e-9)


def test_metrics_by_hand():
    h = torch.tensor([[3.0, 4.0, 0.0, 1.0], [1.0, 0.0, 2.0, 5.0], [0.0, 1.0, 1.0, 1.0]])
    m = HQ.hidden_quant_metrics(h, lambda x: x + 1.0)  # every token moves by ‖1‖ = 2
    assert m["l2_distortion"] == pytest.approx(2.0)
    norms = torch.linalg.vector_norm(h.double(), dim=1)
    assert m["rel_l2_distortion"] == pytest.approx(2.0 / float(norms.mean()))
    assert HQ.hidden_quant_metrics(h, lambda x: 2.0 * x)["cos_shift"] == pytest.approx(0.0, abs=1e-12)
    flip = HQ.hidden_quant_metrics(h, lambda x: -x)
    assert flip["cos_shift"] == pytest.approx(2.0)
    assert flip["l2_distortion"] == pytest.approx(float(2 * norms.mean()))


def test_table_orders_and_ranks_schemes():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(128, 64, generator=g) * 3
    table = HQ.hidden_quant_table(h)
    assert list(table["scheme"]) == list(HQ.HIDDEN_SCHEMES)
    assert len(table) == 7
    d = table.set_index("scheme")["l2_distortion"]
    assert d["int8 sym per-row"] < d["int6 sym per-row"] < d["int4 sym per-row"] < d["int4 sym per-tensor"]
    assert d["int4 asym per-row"] < d["int4 sym per-row"]
    c = table.set_index("scheme")["cos_shift"]
    assert c["int8 sym per-row"] < 1e-3 < c["int4 sym per-row"]
    assert ((table["isoscore_post"] >= 0) & (table["isoscore_post"] <= 1)).all()


def test_errors():
    with pytest.raises(ConfigError):
        HQ.hidden_quant_metrics(torch.randn(4, 4), "int3 magic")
    with pytest.raises(ConfigError):
        HQ.quant_sym_per_row(torch.randn(2, 2), 1)
    with pytest.raises(DataError):
        HQ.hidden_quant_metrics(torch.randn(4, 4), lambda x: x[:2])
    with pytest.raises(DataError):
        HQ.hidden_quant_table(torch.tensor([[float("nan"), 1.0], [1.0, 2.0]]))
