"""LR warm-down, Muon momentum warm-up, loop switch, training budget, and the weight EMA."""

from __future__ import annotations

import pytest
import torch

from qlab.errors import CheckpointError, ConfigError
from qlab.train.ema import EMA
from qlab.train.schedule import (
    looping_enabled,
    lr_multiplier,
    muon_momentum,
    progress_fraction,
    training_budget_seconds,
)


def test_lr_flat_then_linear_warmdown():
    wd = 0.667
    assert lr_multiplier(0.0, wd) == 1.0
    assert lr_multiplier(0.332, wd) == 1.0
    # halfway through the warm-down the multiplier is one half; at the end zero
    assert lr_multiplier(1 - wd / 2, wd) == pytest.approx(0.5)
    assert lr_multiplier(1.0, wd) == 0.0
    assert lr_multiplier(0.9, wd) == pytest.approx(0.1 / 0.667)
    assert lr_multiplier(0.7, 0.0) == 1.0


def test_progress_by_wallclock_or_steps():
    budget = training_budget_seconds(600.0, 12.0)
    assert budget == 588.0
    assert training_budget_seconds(0.0, 12.0) == 0.0
    # wallclock budget: 294 s of 588 is half way even though few of 20000 steps are done
    assert progress_fraction(100, 20000, 294.0, budget) == pytest.approx(0.5)
    # no budget: step fraction
    assert progress_fraction(25, 100, 1e9, 0.0) == 0.25
    assert progress_fraction(200, 100, 0.0, 0.0) == 1.0


def test_muon_momentum_warmup():
    assert muon_momentum(0, 0.92, 0.99, 1500) == pytest.approx(0.92)
    assert muon_momentum(750, 0.92, 0.99, 1500) == pytest.approx(0.955)
    assert muon_momentum(1500, 0.92, 0.99, 1500) == pytest.approx(0.99)
    assert muon_momentum(9000, 0.92, 0.99, 1500) == pytest.approx(0.99)
    assert muon_momentum(3, 0.92, 0.99, 0) == 0.99


def test_looping_switch():
    assert not looping_enabled(0.49, 0.5)
    assert looping_enabled(0.5, 0.5)
    assert looping_enabled(0.0, 0.0)


def test_ema_matches_recurrence_in_fp32():
    lin = torch.nn.Linear(3, 2).to(torch.bfloat16)
    ema = EMA(lin, 0.9)
    expected = {k: v.float().clone() for k, v in lin.state_dict().items()}
    for i in range(4):
        with torch.no_grad():
            for p in lin.parameters():
                p.add_(0.25 * (i + 1))
        ema.update(lin)
        for k, v in lin.state_dict().items():
            expected[k] = 0.9 * expected[k] + 0.1 * v.float()
    for k, v in ema.state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-6)
    assert ema.weights_like(lin)["weight"].dtype == torch.bfloat16


def test_ema_swap_restores_raw_weights():
    lin = torch.nn.Linear(2, 2)
    ema = EMA(lin, 0.5)
    raw = {k: v.clone() for k, v in lin.state_dict().items()}
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin)
    after = {k: v.clone() for k, v in lin.state_dict().items()}
    with ema.swapped_into(lin):
        torch.testing.assert_close(lin.weight, raw["weight"] + 0.5)
    assert torch.equal(lin.weight, after["weight"])


def test_ema_rejects_bad_decay_and_mismatched_state():
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="ema_decay"):
        EMA(lin, 1.0)
    ema = EMA(lin, 0.99)
    with pytest.raises(CheckpointError, match="missing"):
        ema.load_state_dict({"weight": torch.zeros(2, 2)})
