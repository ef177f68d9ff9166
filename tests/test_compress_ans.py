"""rANS codec: exact round trip, size vs order-0 entropy and vs brotli-11, corruption."""

from __future__ import annotations

import brotli
import numpy as np
import pytest

from qlab.compress.ans import ans_decode, ans_encode
from qlab.compress.codecs import get_codec
from qlab.compress.entropy import entropy_bits
from qlab.errors import ArtifactError, QuantError


def sdclip_codes(
    rows: int, cols: int, bits: int, k: float, seed: int = 0, laplace: bool = False
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.laplace(size=(rows, cols)) if laplace else rng.standard_normal((rows, cols))
    r = 2 ** (bits - 1) - 1
    s = k * w.std(axis=1, keepdims=True) / r
    return np.clip(np.round(w / s), -r, r).astype(np.int8)


@pytest.mark.parametrize(
    "codes",
    [
        np.zeros(0, dtype=np.int8),
        np.full((3, 5), -7, dtype=np.int8),
        np.array([-128, 127, 0, 5], dtype=np.int8),
        np.arange(-300, 300, dtype=np.int16).reshape(20, 30),
        np.arange(256, dtype=np.uint8),
        np.array(5, dtype=np.int8),
    ],
)
def test_round_trip_edge_cases(codes: np.ndarray) -> None:
    out = ans_decode(ans_encode(codes))
    assert out.dtype == codes.dtype and out.shape == codes.shape
    np.testing.assert_array_equal(out, codes)


@pytest.mark.parametrize(
    "bits,k,laplace", [(6, 12.85, False), (8, 20.0, False), (4, 6.0, True), (5, 30.0, False)]
)
def test_size_within_0p3_percent_of_entropy(bits: int, k: float, laplace: bool) -> None:
    codes = sdclip_codes(256, 512, bits, k, laplace=laplace)  # 131k symbols
    blob = ans_encode(codes)
    np.testing.assert_array_equal(ans_decode(blob), codes)
    ideal = entropy_bits(codes) / 8
    assert len(blob) <= 1.003 * ideal
    assert len(blob) >= ideal - 8  # cannot beat the order-0 entropy of its own model


def test_smaller_than_brotli11_on_quantised_gaussian() -> None:
    codes = sdclip_codes(256, 512, 6, 12.85, seed=1)
    assert len(ans_encode(codes)) < len(brotli.compress(codes.tobytes(), quality=11))


def test_byte_codec_is_order0_over_bytes() -> None:
    data = sdclip_codes(200, 1024, 6, 12.85).tobytes()  # 204,800 bytes
    codec = get_codec("ans")
    blob = codec.compress(data)
    assert codec.decompress(blob) == data
    assert len(blob) <= 1.003 * entropy_bits(np.frombuffer(data, np.uint8)) / 8


def test_rejects_float_codes() -> None:
    with pytest.raises(QuantError, match="int8"):
        ans_encode(np.zeros(4, dtype=np.float32))


def test_corrupt_streams_raise() -> None:
    blob = ans_encode(sdclip_codes(16, 256, 6, 12.85))
    with pytest.raises(ArtifactError, match="magic"):
        ans_decode(b"XANS" + blob[4:])
    with pytest.raises(ArtifactError, match="truncated"):
        ans_decode(blob[:-5])
    with pytest.raises(ArtifactError, match="trailing"):
        ans_decode(blob + b"\0")
    flipped = bytearray(blob)
    flipped[-9] ^= 0xFF
    try:
        out = ans_decode(bytes(flipped))
    except ArtifactError:
        return
    # A flipped payload bit that still decodes must at least change the result.
    assert not np.array_equal(out, ans_decode(blob))
