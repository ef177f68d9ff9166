"""Paired Δbpb between window layouts, on the targets both score; int6 vs 2:4 budget."""

from __future__ import annotations

import math

import pytest
import torch

from qlab.analysis.eval_levers import paired_on_common_tokens
from qlab.analysis.rd_compare import sparsity_budget
from qlab.errors import ConfigError


def test_pairing_uses_only_the_targets_both_layouts_score():
    tokens = torch.tensor([1, 5, 6, 7, 1, 8, 9, 2])  # two documents (BOS = 1 at 0 and 4)
    ref = (torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64), torch.ones(4), torch.tensor([1, 2, 5, 6]))
    # the other layout scores targets 2, 3, 5, 6: 3 has no reference score and is left out
    other = (
        torch.tensor([2.0, 9.0, 1.5, 1.0], dtype=torch.float64),
        torch.ones(4),
        torch.tensor([2, 3, 5, 6]),
    )
    delta, lo, hi = paired_on_common_tokens(ref, other, tokens, n_boot=0)
    # common targets 2, 5, 6: Δnll = 1 + 0.5 + 0 over 3 bytes
    assert delta == pytest.approx(1.5 / math.log(2) / 3)
    assert math.isnan(lo) and math.isnan(hi)  # no bootstrap asked for


def test_sparsity_budget_counts_blocks_and_errors():
    torch.manual_seed(0)
    sd = {"w": torch.randn(64, 128), "odd": torch.randn(64, 126), "small": torch.randn(4, 8)}
    df = sparsity_budget(sd, min_numel=1024).set_index("scheme")
    assert df.loc["int6", "nominal_bits_per_block"] == 24  # 4 weights × 6 bits
    # 2:4 keeps two of four weights: its error is at least the two smallest of each block
    w = sd["w"].reshape(-1, 4).abs().sort(dim=1).values[:, :2]
    floor = float((w**2).sum()) / float(((sd["w"] - sd["w"].mean()) ** 2).sum())
    assert df.loc["2:4", "rel_mse"] >= floor * 0.999 and df.loc["int6", "rel_mse"] < df.loc["2:4", "rel_mse"]
    with pytest.raises(ConfigError, match="divisible by 4"):
        sparsity_budget({"odd": sd["odd"]})
