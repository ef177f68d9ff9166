"""Regularizers of PAPERS.md §5: values on hand-made inputs computed by hand, and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import qlab.train as train_pkg
from qlab.config import ModelConfig
from qlab.errors import ConfigError, DataError
from qlab.model.gpt import GPT
from qlab.train import regularizers as R


class TwoMatrices(nn.Module):
    def __init__(self, a: list, b: list) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float32))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float32))
        self.bias = nn.Parameter(torch.tensor([5.0, -7.0]))  # 1-D: never a "matrix"


def _grad(fn, h: torch.Tensor) -> torch.Tensor:
    h = h.clone().requires_grad_(True)
    fn(h, None).backward()
    return h.grad


# ---- QAHSP ---------------------------------------------------------------------------------


def test_qahsp_value_is_mse_to_int6_grid():
    # max|h| = 31/16 → s = 1/16; h/s = 31, −1.6, 4.8, 0 → codes 31, −2, 5, 0.
    h = torch.tensor([[1.9375, -0.1], [0.3, 0.0]])
    expected = (0.025**2 + 0.0125**2) / 4
    assert R.qahsp(h, None).item() == pytest.approx(expected, rel=1e-5)
    assert R.qahsp_grid(h, None).item() == pytest.approx(expected, rel=1e-5)


def test_qahsp_as_written_has_zero_gradient_but_grid_variant_pulls_to_grid():
    h = torch.randn(3, 5, 8)
    assert R.qahsp(h, None).item() > 0
    assert torch.equal(_grad(R.qahsp, h), torch.zeros_like(h))
    g = _grad(R.qahsp_grid, h)
    h_q = R.int6_hidden_grid(h.reshape(-1, 8)).reshape(h.shape)
    torch.testing.assert_close(g, 2 * (h - h_q) / h.numel())


# ---- ES ------------------------------------------------------------------------------------


def test_es_two_and_three_rows_by_hand():
    assert R.embedding_spread(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), None).item() == pytest.approx(0.5)
    three = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # cos² pairs 0, ½, ½
    assert R.embedding_spread(three, None).item() == pytest.approx(1 / 3)


def test_es_uses_only_first_256_rows_and_flattens_batch():
    torch.manual_seed(0)
    h = torch.randn(256, 16)
    base = R.embedding_spread(h, None)
    more = torch.cat([h, torch.ones(40, 16)])
    assert R.embedding_spread(more, None).item() == pytest.approx(base.item(), rel=1e-6)
    assert R.embedding_spread(h.reshape(4, 64, 16), None).item() == pytest.approx(base.item(), rel=1e-6)
    assert _grad(R.embedding_spread, h).abs().sum() > 0
    with pytest.raises(DataError, match="ES"):
        R.embedding_spread(torch.ones(1, 4), None)


# ---- AOS, HSU ------------------------------------------------------------------------------


def test_aos_by_hand_and_gradient():
    h = torch.tensor([[1.0, -3.0], [2.0, 2.0]])  # rows: 3 − 2 = 1, 2 − 2 = 0
    assert R.activation_outlier_suppression(h, None).item() == pytest.approx(0.5)
    g = _grad(R.activation_outlier_suppression, h)
    # row 0: d/dh (max|h| − mean|h|)/2 = (sign·1 − sign·½)/2 at the max, −sign·¼ elsewhere
    torch.testing.assert_close(g, torch.tensor([[-0.25, -0.25], [0.0, 0.0]]))


def test_hsu_unbiased_variance_of_norms():
    h = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # norms 5, 1 → unbiased var 8
    assert R.hidden_state_uniformity(h, None).item() == pytest.approx(8.0)
    assert _grad(R.hidden_state_uniformity, h).abs().sum() > 0
    with pytest.raises(DataError, match="HSU"):
        R.hidden_state_uniformity(torch.ones(1, 1, 3), None)


# ---- SimCTG --------------------------------------------------------------------------------


def test_simctg_by_hand_within_sequences_only():
    orth = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cos 0 → max(0, ½ − 1 + 0) = 0
    assert R.simctg(orth, None).item() == pytest.approx(0.0, abs=1e-7)
    diag = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert R.simctg(diag, None).item() == pytest.approx(math.sqrt(0.5) - 0.5, rel=1e-5)
    # two sequences: identical pair → ½ each way; orthogonal pair → 0; no cross-sequence pairs
    batch = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])
    assert R.simctg(batch, None).item() == pytest.approx(0.25, rel=1e-5)
    assert R.simctg(diag, None, margin=0.0).item() == pytest.approx(0.0, abs=1e-7)
    assert _grad(R.simctg, torch.randn(2, 5, 4)).abs().sum() > 0
    with pytest.raises(DataError, match="SimCTG"):
        R.simctg(torch.ones(3, 1, 4), None)


# ---- weight regularizers ------------------------------------------------------------------


def test_wbc_by_hand_over_2d_parameters_only():
    m = TwoMatrices([[0.025, 0.05], [0.0125, 0.0]], [[0.025]])
    # sin²(π/2)=1, sin²(π)=0, sin²(π/4)=½, 0 → 0.375; second matrix → 1; the 1-D bias ignored
    assert R.weight_bucket_centre(None, m).item() == pytest.approx((0.375 + 1.0) / 2, abs=1e-6)
    R.weight_bucket_centre(None, m).backward()
    assert m.a.grad.abs().sum() > 0 and m.bias.grad is None


def test_wop_known_outlier():
    w = torch.zeros(10, 10)
    w[3, 7] = 10.0  # mean 0.1, unbiased var (99·0.01 + 9.9²)/99 = 1 → σ = 1, threshold 4
    m = TwoMatrices(w.tolist(), [[0.0, 0.0]])
    # matrix a: (10 − 4)²/100 = 0.36; matrix b: σ = 0, |w| = 0 → 0
    assert R.weight_outlier_penalty(None, m).item() == pytest.approx(0.18, rel=1e-5)
    R.weight_outlier_penalty(None, m).backward()
    assert m.a.grad[3, 7] > 0


def test_pcs_columnwise_max_variance():
    m = TwoMatrices([[1.0, -2.0], [3.0, 0.0]], [[1.0, 1.0, 1.0]])  # col max [3, 2] → var ½; [1,1,1] → 0
    assert R.per_channel_scale(None, m).item() == pytest.approx(0.25)
    R.per_channel_scale(None, m).backward()
    assert m.a.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="PCS"):
        R.per_channel_scale(None, TwoMatrices([[1.0], [2.0]], [[3.0]]))
    with pytest.raises(ConfigError, match="2-D"):
        R.weight_bucket_centre(None, nn.LayerNorm(4))


# ---- registry, specs, and the real model ------------------------------------------------


def test_parse_reg_spec_case_insensitive_and_errors():
    assert R.parse_reg_spec("QAHSP=0.01") == ("QAHSP", 0.01)
    assert R.parse_reg_spec("simctg=0.3") == ("SimCTG", 0.3)
    assert R.parse_reg_spec(" es =5e-2") == ("ES", 0.05)
    for bad, word in [("FOO=1", "FOO"), ("QAHSP", "QAHSP"), ("WOP=abc", "abc"), ("HSU=inf", "HSU=inf")]:
        with pytest.raises(ConfigError, match=word):
            R.parse_reg_spec(bad)


def test_build_regularizers_shares_the_trainer_registry():
    regs = R.build_regularizers({"es": 0.05, "WOP": 0.0, "Qahsp": 0.3})
    assert [(n, w) for n, w, _ in regs] == [("ES", 0.05), ("QAHSP", 0.3)]
    assert regs[0][2] is R.embedding_spread
    assert R.REGULARIZERS is train_pkg.REGULARIZERS  # one registry, the trainer's
    names = {"QAHSP", "QAHSP_GRID", "ES", "AOS", "HSU", "WBC", "WOP", "PCS", "SimCTG"}
    assert names <= set(R.REGULARIZERS)
    with pytest.raises(ConfigError, match="twice"):
        R.build_regularizers({"es": 1.0, "ES": 2.0})
    with pytest.raises(ConfigError, match="nope"):
        R.build_regularizers({"nope": 1.0})


def test_every_regularizer_on_the_gpt_is_finite_and_differentiable():
    cfg = ModelConfig(
        vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
        rope_dims=None, loop_layers=None, train_seq_len=16, eval_seq_len=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, 64, (2, 16))
    for name, weight, fn in R.build_regularizers({n: 1.0 for n in R.REGULARIZERS}):
        model.zero_grad()
        value = fn(model.final_hidden(idx), model)
        assert value.dim() == 0 and torch.isfinite(value), name
        (weight * value).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        total = sum(float(g.abs().sum()) for g in grads)
        assert (total == 0.0) == (name == "QAHSP"), name
