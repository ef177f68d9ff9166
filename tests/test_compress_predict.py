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


def _collapsed_embedding(seed: int = 0) -> torch.Tensor:
    """int8 codes of an embedding whose last 80 % of rows collapsed onto near-duplicates
    of one row (rare tokens of a trained tied embedding): brotli codes them as LZ copies."""
    g = torch.Generator().manual_seed(seed)
    free = torch.randint(-40, 41, (100, 256), generator=g, dtype=torch.int8)
    base = torch.randint(-40, 41, (1, 256), generator=g, dtype=torch.int16)
    jitter = (torch.rand(412, 256, generator=g) < 0.03).to(torch.int16)
    return torch.cat([free, (base + jitter).to(torch.int8)])


def test_lz_guard_measures_collapsed_rows_and_spares_plain_codes() -> None:
    g = torch.Generator().manual_seed(1)
    state = {
        "emb": {"q": _collapsed_embedding(), "scale": torch.rand(512, 1, generator=g).half()},
        "w": synthetic_state("gauss", 6, 12.85, rows=128, cols=256, seed=2)["w"],
    }
    real = measure_compressed_bytes(state)
    table = predict_table(state).set_index("name")
    assert table.loc["emb.q", "method"] == "measured"
    assert table.loc["w.q", "method"] == "huffman"  # match-free codes never pay for brotli
    naive = predict_table(state, lz_guard=False).set_index("name")
    assert naive.loc["emb.q", "method"] == "huffman"
    assert naive.loc["emb.q", "predicted_bytes"] > 1.5 * table.loc["emb.q", "predicted_bytes"]
    assert predict_compressed_bytes(state, lz_guard=False) > 1.1 * real
    assert abs(predict_compressed_bytes(state) / real - 1) < 0.01


def test_predict_leaf_pieces_add_up_to_predict_table() -> None:
    from qlab.compress.predict import pooled_bytes, predict_leaf, record_tree

    state = synthetic_state("laplace", 5, 8.0, rows=64, cols=128, seed=4)
    state["tiny"] = torch.arange(40, dtype=torch.float16)
    state["emb"] = _collapsed_embedding(5)
    table = predict_table(state).set_index("name")
    pool = [np.zeros(256, np.int64), np.zeros(256, np.int64)]
    pooled = {}
    for name, t in [("w.q", state["w"].codes), ("w.scale", state["w"].scale), ("gain", state["gain"]),
                    ("tiny", state["tiny"]), ("emb", state["emb"])]:  # fmt: skip
        row, p0, p1 = predict_leaf(name, record_tree(t))
        assert row["method"] == table.loc[name, "method"]
        if row["method"] == "pooled":
            pool[0] += p0
            pool[1] += p1
            pooled[name] = row["raw_bytes"]
        else:
            assert row["predicted_bytes"] == pytest.approx(table.loc[name, "predicted_bytes"])
    share = sum(pooled.values())
    for name, raw in pooled.items():
        assert table.loc[name, "predicted_bytes"] == pytest.approx(pooled_bytes(*pool) * raw / share)
    # Plane histograms by hand: fp16 bytes split into low and high planes.
    raw = state["gain"].view(torch.uint8).numpy()
    _, p0, p1 = predict_leaf("gain", state["gain"])
    np.testing.assert_array_equal(p0, np.bincount(raw[0::2], minlength=256))
    np.testing.assert_array_equal(p1, np.bincount(raw[1::2], minlength=256))
