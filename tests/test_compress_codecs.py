"""Byte shuffle framing and the codec registry."""

from __future__ import annotations

import numpy as np
import pytest

from qlab.compress.codecs import available_codecs, get_codec
from qlab.compress.shuffle import shuffle, unshuffle
from qlab.errors import ArtifactError, ConfigError


@pytest.mark.parametrize("n", [0, 1, 2, 7, 64, 1001])
@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_shuffle_round_trip(n: int, stride: int) -> None:
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    framed = shuffle(data, stride)
    assert framed[:5] == b"BSHF" + bytes([stride])
    assert unshuffle(framed) == data


def test_shuffle_stride2_is_even_then_odd_bytes() -> None:
    assert shuffle(b"abcdefg", 2) == b"BSHF\x02" + b"aceg" + b"bdf"
    assert shuffle(b"abcdef", 3) == b"BSHF\x03" + b"ad" + b"be" + b"cf"


def test_shuffle_rejects_bad_input() -> None:
    with pytest.raises(ConfigError):
        shuffle(b"abc", 0)
    with pytest.raises(ArtifactError, match="BSHF"):
        unshuffle(b"NOPE\x02abc")


SPECS = ["brotli-5", "brotli-11+shuffle", "lzma", "lzma-9e", "zstd-19", "zstd-3+shuffle4", "ans", "raw"]


@pytest.mark.parametrize("spec", SPECS)
def test_codec_round_trip(spec: str) -> None:
    rng = np.random.default_rng(0)
    data = np.clip(np.round(rng.standard_normal(20_000) * 3), -31, 31).astype(np.int8).tobytes() + b"tail"
    codec = get_codec(spec)
    assert codec.decompress(codec.compress(data)) == data
    assert get_codec(codec.spec).spec == codec.spec
    if spec != "raw":
        assert len(codec.compress(data)) < len(data)


def test_spec_parsing_and_defaults() -> None:
    assert get_codec("brotli").spec == "brotli-11"
    assert get_codec("lzma").spec == "lzma-6"
    assert get_codec("zstd").spec == "zstd-19"
    assert get_codec("brotli", shuffle=True).spec == "brotli-11+shuffle"
    assert get_codec("zstd-3+shuffle4").shuffle_stride == 4
    assert set(available_codecs()) == {"ans", "brotli", "lzma", "raw", "zstd"}


@pytest.mark.parametrize("spec", ["gzip", "brotli-12", "lzma-10", "zstd-0", "ans-3", "brotli+shuffle0", ""])
def test_bad_specs_raise_config_error(spec: str) -> None:
    with pytest.raises(ConfigError):
        get_codec(spec)


@pytest.mark.parametrize("spec", ["brotli-11", "lzma", "zstd", "ans", "brotli-5+shuffle"])
def test_corrupt_input_names_codec(spec: str) -> None:
    codec = get_codec(spec)
    blob = codec.compress(bytes(range(256)) * 50)
    bad = blob[: len(blob) // 2]
    with pytest.raises(ArtifactError, match=spec.split("+")[0].split("-")[0]):
        codec.decompress(bad)
