from __future__ import annotations

import numpy as np
import pytest

from qlab.data import shards
from qlab.data.shards import HEADER_BYTES, MAGIC, read_shard, read_shard_header, write_shard
from qlab.errors import DataError


def _raw_shard(path, header_values, tokens):
    header = np.zeros(256, dtype="<i4")
    header[: len(header_values)] = header_values
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())
    return path


def test_round_trip_bytes_and_values(tmp_path):
    tokens = np.array([0, 1, 2, 65535, 300, 7], dtype=np.int64)
    path = write_shard(tmp_path / "s.bin", tokens)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * len(tokens)
    assert np.frombuffer(raw[:12], dtype="<i4").tolist() == [MAGIC, 1, len(tokens)]
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").tolist() == tokens.tolist()
    assert read_shard_header(path) == len(tokens)
    for mmap in (True, False):
        got = read_shard(path, vocab_size=65536, mmap=mmap)
        assert got.dtype == np.uint16 and got.tolist() == tokens.tolist()
    assert isinstance(read_shard(path), np.memmap)


def test_empty_shard(tmp_path):
    path = write_shard(tmp_path / "e.bin", [])
    assert read_shard_header(path) == 0
    assert len(read_shard(path)) == 0


@pytest.mark.parametrize(
    "tokens",
    [np.array([1, 65536]), np.array([-1, 3]), np.zeros((2, 2), dtype=np.int64), np.array([0.5])],
)
def test_write_rejects_bad_tokens(tmp_path, tokens):
    with pytest.raises(DataError, match="bad.bin"):
        write_shard(tmp_path / "bad.bin", tokens)
    assert not (tmp_path / "bad.bin").exists()


@pytest.mark.parametrize(
    "header,tokens,message",
    [
        ([12345, 1, 3], [1, 2, 3], "magic"),
        ([MAGIC, 2, 3], [1, 2, 3], "version"),
        ([MAGIC, 1, 5], [1, 2, 3], "truncated"),
        ([MAGIC, 1, 2], [1, 2, 3], "size mismatch"),
        ([MAGIC, 1, -1], [], "negative"),
    ],
)
def test_corrupt_headers(tmp_path, header, tokens, message):
    path = _raw_shard(tmp_path / "corrupt.bin", header, tokens)
    for fn in (read_shard_header, read_shard):
        with pytest.raises(DataError, match=message) as err:
            fn(path)
        assert "corrupt.bin" in str(err.value)


def test_short_header_and_missing(tmp_path):
    short = tmp_path / "short.bin"
    short.write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="short.bin.*truncated"):
        read_shard(short)
    with pytest.raises(DataError, match="nope.bin.*not found"):
        read_shard(tmp_path / "nope.bin")


def test_token_out_of_vocab_found_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "_CHECK_CHUNK", 4)  # force several chunks
    tokens = np.arange(11) % 5
    tokens[9] = 7
    path = write_shard(tmp_path / "v.bin", tokens)
    read_shard(path, vocab_size=8)
    with pytest.raises(DataError, match=r"v.bin: token id 7 at position 9 .*vocab_size 6"):
        read_shard(path, vocab_size=6)
    with pytest.raises(DataError, match="v.bin"):
        read_shard(path, vocab_size=6, mmap=False)
