"""brotli-11 size prediction: Huffman lengths, and ±1 % of the real size on SDClip codes."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
import torch

from qlab.compress.predict import (
    huffman_bits,
    huffman_lengths,
    measure_compressed_bytes,
    predict_compressed_bytes,
    predict_table,
    synthetic_state,
)
from qlab.quant.policy import Passthrough


def test_huffman_lengths_known_cases() -> None:
    np.testing.assert_array_equal(huffman_lengths(np.array([1, 1, 2, 4])), [3, 3, 2, 1])
    np.testing.assert_array_equal(huffman_lengths(np.array([0, 5, 0])), [0, 1, 0])
    assert huffman_bits(np.array([8, 8, 8, 8])) == 64


def test_huffman_cost_matches_merge_sum_and_respects_limit() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 1000, 40)
    heap = list(counts.tolist())
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:  # optimal Huffman cost = sum of all merge weights
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    assert huffman_bits(counts) == total
    skewed = 2 ** np.arange(30)  # unlimited Huffman would need 29-bit codes
    lengths = huffman_lengths(skewed)
    assert lengths.max() <= 15
    assert np.sum(2.0**-lengths) <= 1.0 + 1e-12  # Kraft: still a prefix code


@pytest.mark.parametrize("dist,bits,k", [("gauss", 6, 12.85), ("laplace", 8, 20.0), ("gauss", 5, 30.0)])
def test_prediction_within_one_percent(dist: str, bits: int, k: float) -> None:
    state = synthetic_state(dist, bits, k, rows=256, cols=512, seed=3)
    state["pt"] = Passthrough(data=torch.randn(64).half(), kind="fp16", dtype="float32", shape=(64,))
    real = measure_compressed_bytes(state)
    assert abs(predict_compressed_bytes(state) / real - 1) < 0.01


def test_constant_rows_and_low_entropy_fallback() -> None:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-20, 21, (256, 512), generator=g, dtype=torch.int8)
    codes[::4] = 0
    state = {"w": {"q": codes, "scale": torch.rand(256, 1, generator=g).half()}}
    table = predict_table(state)
    assert table.loc[table["name"] == "w.q", "constant_rows"].item() == 64
    assert abs(predict_compressed_bytes(state) / measure_compressed_bytes(state) - 1) < 0.02
    sparse = (torch.rand(512, 512, generator=g) < 0.05).to(torch.int8)  # p(0) = 0.95: LZ territory
    table = predict_table({"w": sparse})
    assert table["method"].item() == "sampled"
