"""Hadamard rotation: orthogonality, exact inverse, outlier spreading, kurtosis."""

from __future__ import annotations

import pytest
import torch
from scipy.linalg import hadamard as scipy_hadamard

from qlab.analysis.geometry import excess_kurtosis
from qlab.analysis.rotation import rotation_report
from qlab.errors import QuantError
from qlab.quant.rotation import (
    hadamard_matrix,
    make_rotation,
    quantize_rotated,
    rotate,
    unrotate,
)
from qlab.quant.rtn import quantize_rtn
from qlab.quant.tensor import dequantize


@pytest.mark.parametrize("n", [1, 2, 4, 16, 64])
def test_hadamard_matches_scipy_and_is_orthogonal(n):
    h = hadamard_matrix(n)
    assert torch.allclose(h, torch.from_numpy(scipy_hadamard(n)).double() / n**0.5)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_hadamard_rejects_non_power_of_two():
    with pytest.raises(QuantError, match="power of two"):
        hadamard_matrix(12)
    with pytest.raises(QuantError, match="does not divide"):
        make_rotation(96, block_size=64)
    with pytest.raises(QuantError, match="power of two"):
        make_rotation(96, block_size=48)


@pytest.mark.parametrize(
    ("n", "block_size", "blocks"), [(96, None, (64, 32)), (100, None, (64, 32, 4)), (96, 32, (32,) * 3)]
)
def test_rotation_orthogonal_and_exactly_invertible(n, block_size, blocks):
    rot = make_rotation(n, seed=7, block_size=block_size)
    assert rot.blocks == blocks
    q = rot.matrix()
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    w = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(rot.rotate(w), w @ q, atol=1e-12)  # matches the explicit matrix
    assert torch.allclose(rot.unrotate(rot.rotate(w)), w, atol=1e-12)
    assert torch.allclose(
        unrotate(rotate(w, seed=7, block_size=block_size), seed=7, block_size=block_size), w
    )


def test_sign_flips_are_seeded():
    a, b, c = make_rotation(32, seed=1), make_rotation(32, seed=1), make_rotation(32, seed=2)
    assert torch.equal(a.signs, b.signs) and not torch.equal(a.signs, c.signs)
    assert set(a.signs.tolist()) <= {-1.0, 1.0}
    assert torch.equal(make_rotation(32).signs, torch.ones(32))


def test_rotation_lowers_max_error_with_outliers():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g)
    w[:, 3] *= 25  # an outlier input channel
    plain = dequantize(quantize_rtn(w, 4))
    q = quantize_rotated(w, 4, seed=0)
    assert q.scheme == "rotated"
    rotated = dequantize(q)
    assert rotated.shape == w.shape
    assert (rotated - w).abs().max() < 0.5 * (plain - w).abs().max()
    assert excess_kurtosis(rotate(w, seed=0)) < excess_kurtosis(w) / 5
    table = rotation_report({"w": w, "g": torch.randn(8, 64, generator=g)}, bits=4)
    row = table.set_index("name").loc["w"]
    assert row["kurtosis_rotated"] < row["kurtosis"] and row["max_err_rotated"] < row["max_err"]


def test_rotation_input_checks():
    with pytest.raises(QuantError, match="cannot act"):
        make_rotation(8).rotate(torch.randn(2, 4))
    with pytest.raises(QuantError, match="NaN"):
        rotate(torch.tensor([[float("nan"), 1.0]]))
