"""Adaptive symbol coder: exact round trip, size against order-0 and against an
independent ideal code length, each context model where it pays, corrupt streams."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qlab.compress import symbols as S
from qlab.compress.entropy import entropy_bits
from qlab.compress.symbols import decode_symbols, encode_symbols
from qlab.errors import ArtifactError, QuantError
from tests.test_compress_ans import sdclip_codes


@pytest.mark.parametrize(
    "codes",
    [
        np.zeros(0, dtype=np.int8),
        np.zeros((0, 4), dtype=np.int8),
        np.full((3, 5), -7, dtype=np.int8),
        np.array([-128, 127, 0, 5], dtype=np.int8),
        np.arange(-300, 300, dtype=np.int16).reshape(20, 30),
        np.arange(256, dtype=np.uint8),
        np.array(5, dtype=np.int8),
        np.arange(24, dtype=np.int8).reshape(2, 3, 4),
        sdclip_codes(1, 5000, 6, 12.85),
        sdclip_codes(3000, 3, 6, 12.85),
    ],
)
def test_round_trip_edge_cases(codes: np.ndarray) -> None:
    out = decode_symbols(encode_symbols(codes))
    assert out.dtype == codes.dtype and out.shape == codes.shape
    np.testing.assert_array_equal(out, codes)


@pytest.mark.parametrize("groups", S.GROUP_CHOICES)
@pytest.mark.parametrize("references", [False, True])
def test_every_model_round_trips(groups: int, references: bool) -> None:
    codes = _structured(300, 96, seed=groups)
    blob = encode_symbols(codes, groups=groups, references=references)
    np.testing.assert_array_equal(decode_symbols(blob), codes)


def _ideal_adaptive_bytes(sym: np.ndarray, m: int, centre: int, width: float) -> float:
    """Code length of the G = 1 model computed independently: per block, −log2 of the
    normalised (counts so far + prior) probability of every symbol, summed."""
    prior = S.prior_weights(m, centre, width)
    counts, bits = np.zeros(m), 0.0
    for r0, r1 in S.row_blocks(*sym.shape):
        p = (counts + prior) / (counts + prior).sum()
        block = sym[r0:r1].reshape(-1)
        bits += -np.log2(p[block]).sum()
        counts += np.bincount(block, minlength=m)
    return bits / 8


def test_size_matches_the_ideal_adaptive_code_length() -> None:
    codes = sdclip_codes(256, 512, 6, 12.85)
    lo = int(codes.min())
    sym = codes.astype(np.int64) - lo
    m = int(sym.max()) + 1
    centre = int(round(float(sym.mean())))
    width = float(np.float16(np.abs(sym - centre).mean()))
    ideal = _ideal_adaptive_bytes(sym, m, centre, width)
    blob = encode_symbols(codes, groups=1, references=False)
    words = len(blob) - 24  # stream header ≤ 24 bytes here
    # rANS with 24-bit quantised probabilities costs a hair over the ideal length
    assert ideal - 8 <= words <= ideal * 1.0005 + 8


@pytest.mark.parametrize("bits,k", [(6, 12.85), (8, 20.0), (5, 30.0)])
def test_within_0p3_percent_of_order0_on_iid_codes(bits: int, k: float) -> None:
    codes = sdclip_codes(256, 512, bits, k)  # no structure: only the adaptive cost shows
    assert len(encode_symbols(codes)) <= 1.003 * entropy_bits(codes) / 8


def _structured(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Columns with different spreads (as GPTQ with act-order leaves them)."""
    rng = np.random.default_rng(seed)
    spread = np.exp(rng.uniform(np.log(1.0), np.log(10.0), cols))
    return np.clip(np.round(rng.standard_normal((rows, cols)) * spread), -31, 31).astype(np.int8)


def test_column_groups_beat_order0_when_columns_differ() -> None:
    codes = _structured(512, 256)
    order0 = entropy_bits(codes) / 8
    plain = len(encode_symbols(codes, groups=1))
    grouped = len(encode_symbols(codes, groups=8))
    assert grouped < 0.97 * order0 < plain
    assert len(encode_symbols(codes)) == grouped  # the encoder's own choice finds it


def test_row_references_code_near_duplicate_rows() -> None:
    rng = np.random.default_rng(3)
    base = sdclip_codes(200, 128, 8, 20.0)
    dup = base[rng.integers(0, 200, 300)].astype(np.int16) + rng.integers(-1, 2, (300, 128))
    codes = np.clip(np.concatenate([base, dup]), -127, 127).astype(np.int8)
    without = len(encode_symbols(codes, references=False))
    with_refs = encode_symbols(codes)
    np.testing.assert_array_equal(decode_symbols(with_refs), codes)
    assert len(with_refs) < 0.7 * without
    refs = S.find_references(codes.astype(np.int32) - int(codes.min()), -int(codes.min()))
    assert (refs[:200] < 0).mean() > 0.95 and (refs[200:] >= 0).all()
    assert (refs < np.arange(len(refs))).all()  # always an earlier row


def test_references_are_dropped_when_they_do_not_pay() -> None:
    codes = sdclip_codes(256, 64, 6, 12.85)
    assert encode_symbols(codes) == encode_symbols(codes, references=False)


def test_context_seeds_the_model_and_must_match() -> None:
    prev, codes = sdclip_codes(64, 128, 6, 12.85, seed=1), sdclip_codes(64, 128, 6, 12.85, seed=2)
    cold = encode_symbols(codes)
    warm = encode_symbols(codes, context=prev)
    assert len(warm) < len(cold)
    np.testing.assert_array_equal(decode_symbols(warm, context=prev), codes)
    wrong = decode_symbols_or_error(warm, context=None)
    assert wrong is None or not np.array_equal(wrong, codes)


def decode_symbols_or_error(blob: bytes, context: np.ndarray | None) -> np.ndarray | None:
    try:
        return decode_symbols(blob, context=context)
    except ArtifactError:
        return None


def test_prior_is_deterministic_rational_arithmetic() -> None:
    # the same pseudo-counts by hand for m = 5, centre 2, width 1 (no exp/log involved)
    d = np.arange(5) - 2.0
    p = (1.0 / (1.0 + d * d / 3.0)) ** 2
    np.testing.assert_array_equal(S.prior_weights(5, 2, 1.0), p * (S.PRIOR_WEIGHT / p.sum()))
    assert math.isclose(S.prior_weights(63, 31, 5.0).sum(), S.PRIOR_WEIGHT)


def test_row_blocks_cover_rows_and_grow() -> None:
    blocks = S.row_blocks(1000, 64)
    assert blocks[0] == (0, S.FIRST_BLOCK // 64) and blocks[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
    sizes = [b - a for a, b in blocks[:-1]]
    assert sizes == sorted(sizes) and max(sizes) * 64 <= S.MAX_BLOCK
    assert S.row_blocks(3, 100_000) == [(0, 1), (1, 2), (2, 3)]


def test_bad_input_is_refused() -> None:
    with pytest.raises(QuantError, match="int8, int16 or uint8"):
        encode_symbols(np.zeros(4, dtype=np.float32))
    with pytest.raises(QuantError, match="groups"):
        encode_symbols(np.zeros((4, 4), dtype=np.int8), groups=3)


def test_corrupt_streams_raise_artifact_error() -> None:
    codes = _structured(200, 64)
    blob = encode_symbols(codes)
    with pytest.raises(ArtifactError, match="bad magic"):
        decode_symbols(b"XXXX" + blob[4:])
    with pytest.raises(ArtifactError, match="version"):
        decode_symbols(blob[:4] + b"\x09" + blob[5:])
    with pytest.raises(ArtifactError, match="more than"):
        decode_symbols(blob, max_symbols=100)
    with pytest.raises(ArtifactError, match="trailing"):
        decode_symbols(blob + b"\0")
    for cut in (3, 8, 12, len(blob) // 2, len(blob) - 1):
        with pytest.raises(ArtifactError):
            decode_symbols(blob[:cut])
    rng = np.random.default_rng(0)
    for _ in range(50):  # flipped payload bytes: an error or wrong codes, never a crash
        bad = bytearray(blob)
        bad[rng.integers(20, len(bad))] ^= 1 << int(rng.integers(8))
        out = decode_symbols_or_error(bytes(bad), None)
        assert out is None or out.shape == codes.shape
