"""LQER: 2-bit A packing, error reduction, top-N selection and the byte formula."""

from __future__ import annotations

import math

import pytest
import torch

from qlab.errors import QuantError
from qlab.quant.lqer import fit_low_rank, lqer_correct, lqer_table, pack_2bit, unpack_2bit
from qlab.quant.rtn import quantize_rtn
from qlab.quant.tensor import dequantize


def test_pack_2bit_by_hand_and_round_trip():
    codes = torch.tensor([-2, -1, 0, 1, 1])
    payload = pack_2bit(codes)
    # (c + 2) = 0,1,2,3 | 3 + padding → 0b00011011, 0b11000000
    assert payload == bytes([0b00011011, 0b11000000])
    assert torch.equal(unpack_2bit(payload, 5), codes)
    with pytest.raises(QuantError, match=r"\[-2, 1\]"):
        pack_2bit(torch.tensor([2]))
    with pytest.raises(QuantError, match="bytes"):
        unpack_2bit(payload, 9)


def _low_rank_plus_noise(rows, cols, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.1
    w += scale * torch.randn(rows, 2, generator=g) @ torch.randn(2, cols, generator=g)
    return w


def test_correction_reduces_error_and_packs_a():
    w = _low_rank_plus_noise(48, 96, 0)
    q = quantize_rtn(w, 3, granularity="tensor")  # coarse per-tensor grid leaves structured error
    deq = dequantize(q)
    c = fit_low_rank(w, deq, rank=4, name="w")
    e_before = torch.linalg.norm(w - deq)
    e_after = torch.linalg.norm(w - c.apply(deq))
    assert abs(c.err_before - float(e_before)) < 1e-4
    assert abs(c.err_after - float(e_after)) < 1e-3
    assert e_after < e_before
    a = c.a()
    assert a.shape == (48, 4)
    codes = torch.round(a / c.a_scale.float())
    assert codes.min() >= -2 and codes.max() <= 1  # A lives on the 2-bit grid [-2, 1]
    assert c.a_scale.dtype == torch.float16 and c.a_scale.dim() == 0
    assert c.b.bits == 4 and c.b.group_size == 64 and c.b.scale.shape == (4, 2)


def test_byte_count_formula():
    w = torch.randn(40, 130)
    c = fit_low_rank(w, dequantize(quantize_rtn(w, 3)), rank=4)
    a_bytes = math.ceil(40 * 4 * 2 / 8) + 2  # 2-bit A + one fp16 scale
    b_bytes = math.ceil(4 * 130 * 4 / 8) + 4 * math.ceil(130 / 64) * 2  # int4 B + fp16 group scales
    assert c.nbytes == a_bytes + b_bytes == 42 + 260 + 24


def test_top_n_by_error_norm_and_rank_cap():
    g = torch.Generator().manual_seed(1)
    weights = {f"m{i}": torch.randn(32, 64, generator=g) * (i + 1) for i in range(5)}
    weights["vec"] = torch.randn(64, generator=g) * 100  # not a matrix: never chosen
    weights["thin"] = torch.randn(3, 64, generator=g)
    quantized = {k: quantize_rtn(v, 3) for k, v in weights.items()}
    out = lqer_correct(weights, quantized, rank=4, top_n=3)
    assert list(out) == ["m4", "m3", "m2"]
    for name, c in out.items():
        assert c.err_after < c.err_before
        assert torch.allclose(c.apply(dequantize(quantized[name])), dequantize(quantized[name]) + c.delta())
    table = lqer_table(out)
    assert list(table["name"]) == ["m4", "m3", "m2"] and (table["err_after"] < table["err_before"]).all()
    # rank is capped by the matrix size; dequantized tensors are accepted too
    thin = lqer_correct({"thin": weights["thin"]}, {"thin": dequantize(quantized["thin"])}, rank=8)
    assert thin["thin"].rank == 3


def test_lqer_errors():
    w = torch.randn(8, 8)
    with pytest.raises(QuantError, match="no 2-D matrix"):
        lqer_correct({"a": w}, {"b": w})
    with pytest.raises(QuantError, match="shape"):
        lqer_correct({"a": w}, {"a": torch.randn(8, 4)})
    with pytest.raises(QuantError, match="NaN"):
        fit_low_rank(torch.full((4, 4), float("nan")), torch.zeros(4, 4))
    with pytest.raises(QuantError, match="rank"):
        fit_low_rank(w, w * 0.9, rank=0)
