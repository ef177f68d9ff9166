"""torch's own LAPACK called directly: the record's Hinv, bit for bit, or not at all."""

from __future__ import annotations

import pytest
import torch

from benchmarks.record_gptq import record_gptq
from qlab.quant import gptq, lapack


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n + 10, generator=g)
    return x @ x.T / n + 0.01 * torch.eye(n)


needs_lapack = pytest.mark.skipif(not lapack.available(), reason="torch's LAPACK symbols are not reachable")


@needs_lapack
@pytest.mark.parametrize("n", [lapack.MIN_DIRECT, 65, 300, 513])
def test_direct_calls_equal_torchs_three_calls_bit_for_bit(n):
    h = _spd(n, seed=n)
    h0 = h.clone()
    u, info = lapack.record_hinv_lapack(h)
    assert info == 0
    assert torch.equal(u, lapack.torch_record_hinv(h)[0])  # upper factor and zeros below, every bit
    assert torch.equal(h, h0)  # the input is not written


@needs_lapack
def test_a_matrix_that_is_not_positive_definite_reports_info():
    h = _spd(20)
    h[3, 3] = -1.0
    _, info = lapack.record_hinv_lapack(h)
    assert info > 0  # LAPACK's "leading minor not positive definite"


def test_tiny_matrices_go_through_torch():
    # for 3 ≤ n ≤ 11 the direct calls round differently from torch's: never used there
    assert not lapack.usable(_spd(7)) and not lapack.usable(_spd(lapack.MIN_DIRECT - 1))
    assert not lapack.usable(_spd(100).double())
    w = torch.randn(5, 7) * 0.02
    q = gptq.gptq_quantize(w, _spd(7), clip_params={"k": 12.85, "correction": 1})
    assert torch.equal(q.codes, record_gptq(w, _spd(7))[0])


def test_the_binding_switches_off_when_the_self_check_disagrees(monkeypatch):
    lapack.available.cache_clear()
    try:
        monkeypatch.setattr(lapack, "torch_record_hinv", lambda h: (torch.zeros_like(h), 0))
        assert not lapack.available()
    finally:
        monkeypatch.undo()
        lapack.available.cache_clear()


def test_gptq_gives_the_same_codes_with_and_without_the_binding(monkeypatch):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 200, generator=g) * 0.02
    h = _spd(200, seed=3)
    direct = gptq.gptq_quantize(w, h, clip_params={"k": 12.85, "correction": 1})
    monkeypatch.setattr(lapack, "available", lambda: False)
    through_torch = gptq.gptq_quantize(w, h, clip_params={"k": 12.85, "correction": 1})
    assert torch.equal(direct.codes, through_torch.codes)
    assert torch.equal(direct.scale, through_torch.scale)
