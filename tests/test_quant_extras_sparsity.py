"""2:4 sparsity: top-2 selection, 10-bit packing, exact byte count, round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qlab.errors import QuantError
from qlab.quant.sparsity import BITS_PER_BLOCK, PAIRS, Packed24, pack_24, sparsify_24, unpack_24


def slow_reference(w: torch.Tensor) -> torch.Tensor:
    """Element-by-element 2:4 + signed 3-bit per-row quantization (independent loops)."""
    out = torch.zeros_like(w, dtype=torch.float64)
    for r in range(w.shape[0]):
        absmax = max(abs(float(v)) for v in w[r])
        s = float(np.float16(absmax / 3)) or 1.0
        for b in range(0, w.shape[1], 4):
            vals = [float(v) for v in w[r, b : b + 4]]
            order = sorted(range(4), key=lambda i: (-abs(vals[i]), i))[:2]
            for i in order:
                out[r, b + i] = max(-3, min(3, round(vals[i] / s))) * s
    return out.float()


def test_pairs_are_the_six_combinations():
    assert len(PAIRS) == 6 and len(set(PAIRS)) == 6
    assert all(0 <= i < j < 4 for i, j in PAIRS)


def test_exactly_ten_bits_per_block_and_byte_count():
    for rows, cols in [(1, 4), (3, 8), (7, 12), (64, 64)]:
        w = torch.randn(rows, cols)
        p = pack_24(w)
        blocks = rows * cols // 4
        assert p.n_blocks == blocks
        assert len(p.payload) == math.ceil(BITS_PER_BLOCK * blocks / 8)
        assert p.nbytes == math.ceil(10 * blocks / 8) + 2 * rows
    # vs int6: 24 bits per block of 4
    assert BITS_PER_BLOCK == 4 + 3 + 3


def test_bitstream_layout_by_hand():
    # one row, one block: keep positions 1 and 3 (pair code 4), values -0.6 and 0.9
    w = torch.tensor([[0.1, -0.6, 0.05, 0.9]])
    p = pack_24(w)
    s = float(np.float16(0.9 / 3))
    q0, q1 = round(-0.6 / s), round(0.9 / s)
    bits = f"{PAIRS.index((1, 3)):04b}{q0 + 4:03b}{q1 + 4:03b}"
    assert len(p.payload) == 2
    assert format(p.payload[0], "08b") + format(p.payload[1], "08b")[:2] == bits
    assert format(p.payload[1], "08b")[2:] == "000000"  # zero padding


def test_round_trip_matches_slow_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(9, 20, generator=g)
    w[4] = 0.0  # zero row
    w[5, :4] = torch.tensor([0.5, -0.5, 0.5, 0.1])  # tie: lower positions win
    got = unpack_24(pack_24(w))
    assert torch.allclose(got, slow_reference(w), atol=1e-6)
    assert torch.equal(sparsify_24(w, quantize_values=True), got)
    # exactly two non-zeros per block at most, and the dense (unquantized) version keeps values
    dense = sparsify_24(w)
    assert ((dense.reshape(-1, 4) != 0).sum(1) <= 2).all()
    kept = dense != 0
    assert torch.equal(dense[kept], w[kept])


def test_unpack_rejects_truncated_or_corrupt():
    p = pack_24(torch.randn(2, 8))
    with pytest.raises(QuantError, match="payload has"):
        unpack_24(Packed24(p.payload[:-1], p.scales, p.shape))
    with pytest.raises(QuantError, match="corrupt"):
        unpack_24(Packed24(b"\xff" * len(p.payload), p.scales, p.shape))
    with pytest.raises(QuantError, match="scales"):
        unpack_24(Packed24(p.payload, p.scales[:1], p.shape))


def test_bad_shapes_and_values():
    with pytest.raises(QuantError, match="divisible by 4"):
        pack_24(torch.randn(3, 6))
    with pytest.raises(QuantError, match="2-D"):
        pack_24(torch.randn(8))
    with pytest.raises(QuantError, match="NaN"):
        pack_24(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
