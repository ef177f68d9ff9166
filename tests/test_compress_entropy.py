"""Exact empirical entropies against direct loops and known distributions."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from qlab.compress.entropy import entropy_bits, order0_entropy, order1_entropy, row_entropy, symbol_entropies
from qlab.errors import QuantError


def direct_entropy(values) -> float:
    counts = Counter(values)
    n = sum(counts.values())
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def direct_order1(rows: np.ndarray) -> float:
    pairs = Counter((int(r[t - 1]), int(r[t])) for r in rows for t in range(1, len(r)))
    prev = Counter()
    for (a, _), c in pairs.items():
        prev[a] += c
    n = sum(pairs.values())
    return -sum(c / n * math.log2(c / prev[a]) for (a, _), c in pairs.items())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_direct_loops(seed: int) -> None:
    rng = np.random.default_rng(seed)
    codes = rng.integers(-5, 6, size=(7, 40)).astype(np.int8)
    codes[2] = 3  # a constant row
    assert order0_entropy(codes) == pytest.approx(direct_entropy(codes.ravel().tolist()), abs=1e-12)
    assert row_entropy(codes) == pytest.approx(
        np.mean([direct_entropy(r.tolist()) for r in codes]), abs=1e-12
    )
    assert order1_entropy(codes) == pytest.approx(direct_order1(codes), abs=1e-12)
    assert entropy_bits(codes) == pytest.approx(codes.size * direct_entropy(codes.ravel().tolist()))


def test_known_distributions() -> None:
    assert order0_entropy(np.arange(256, dtype=np.int16)) == pytest.approx(8.0)
    assert order0_entropy(np.full(100, 4, dtype=np.int8)) == 0.0
    assert order0_entropy(torch.tensor([0, 0, 1, 2], dtype=torch.int8)) == pytest.approx(1.5)
    rng = np.random.default_rng(0)
    uniform = rng.integers(0, 16, size=(64, 4096))
    assert order0_entropy(uniform) == pytest.approx(4.0, abs=2e-3)
    assert order1_entropy(uniform) == pytest.approx(4.0, abs=2e-2)


def test_order1_sees_markov_structure() -> None:
    rows = np.tile(np.array([0, 1, 2, 3], dtype=np.int8), (10, 50))  # deterministic successor
    assert order0_entropy(rows) == pytest.approx(2.0)
    assert order1_entropy(rows) == pytest.approx(0.0, abs=1e-12)


def test_row_entropy_of_distinct_rows() -> None:
    rows = np.stack([np.zeros(8), np.arange(8)]).astype(np.int8)
    assert row_entropy(rows) == pytest.approx(1.5)
    assert order0_entropy(rows) > row_entropy(rows)


def test_float_input_raises() -> None:
    with pytest.raises(QuantError, match="integer"):
        order0_entropy(np.zeros(3))
    with pytest.raises(QuantError, match="at least 2"):
        order1_entropy(np.zeros((3, 1), dtype=np.int8))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int64])
def test_one_pass_entropies_equal_the_three_plain_functions(dtype) -> None:
    """The entropy report's bounded-memory path and the plain estimators: one idea, one answer."""
    g = torch.Generator().manual_seed(3)
    lo, hi = (-31, 32) if dtype == torch.int8 else (-3000, 3000)
    codes = (torch.randn(37, 53, generator=g) * hi / 4).round().clamp(lo, hi).to(dtype)
    h0, h_row, h1 = symbol_entropies(codes)
    arr = codes.numpy()
    assert h0 == pytest.approx(order0_entropy(arr), abs=1e-12)
    assert h_row == pytest.approx(row_entropy(arr), abs=1e-12)
    assert h1 == pytest.approx(order1_entropy(arr), abs=1e-12)
    assert math.isnan(symbol_entropies(codes.to(torch.int16), order1_max=100)[2])  # the cap holds
