"""qlab artifact container: bit-exact round trips and every corruption path."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from qlab.compress.container import read_artifact, write_artifact
from qlab.errors import ArtifactError, ConfigError
from qlab.quant.tensor import QuantizedTensor


def sample_tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-31, 32, (16, 64), generator=g, dtype=torch.int8)
    return {
        "fp16": torch.randn(5, 7, generator=g).half(),
        "fp32": torch.randn(3, generator=g),
        "bf16": torch.randn(4, 4, generator=g).bfloat16(),
        "int8": codes,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "np": np.arange(12, dtype=np.int16).reshape(3, 4),
        "qt": QuantizedTensor(
            codes=codes,
            scale=torch.rand(16, 1, generator=g).half(),
            zero=None,
            bits=6,
            shape=(16, 64),
            scheme="int",
            meta={"k": 12.85},
        ),
        "qt_group": QuantizedTensor(
            codes=codes,
            scale=torch.rand(16, 2, generator=g).half(),
            zero=torch.zeros(16, 2).half(),
            bits=4,
            shape=(16, 64),
            scheme="int",
            group_size=32,
            codebook=torch.linspace(-1, 1, 16),
        ),
    }


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, QuantizedTensor):
        for f in ("codes", "scale", "zero", "codebook"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None) == (y is None)
            if x is not None:
                assert_same(x, y)
        assert (a.bits, a.shape, a.scheme, a.group_size, a.meta) == (
            b.bits,
            b.shape,
            b.scheme,
            b.group_size,
            b.meta,
        )
        assert isinstance(b.shape, tuple)


@pytest.mark.parametrize(
    "codec,shuffle", [("brotli-11", True), ("lzma", False), ("ans", False), ("raw", True)]
)
def test_round_trip_bit_exact(tmp_path: Path, codec: str, shuffle: bool) -> None:
    tensors = sample_tensors()
    path = write_artifact(
        tmp_path / "a.qlab",
        tensors,
        policy={"matrix": "int6"},
        codec=codec,
        shuffle=shuffle,
        extra={"note": "x"},
    )
    out, header = read_artifact(path)
    assert list(out) == list(tensors)
    for name in tensors:
        assert_same(tensors[name], out[name])
    assert header["policy"] == {"matrix": "int6"} and header["extra"] == {"note": "x"}
    assert header["codec"].startswith(codec.split("-")[0])


def _artifact(tmp_path: Path) -> tuple[Path, bytes]:
    path = write_artifact(tmp_path / "a.qlab", sample_tensors())
    return path, path.read_bytes()


def _expect(tmp_path: Path, data: bytes, match: str) -> None:
    bad = tmp_path / "bad.qlab"
    bad.write_bytes(data)
    with pytest.raises(ArtifactError, match=match) as info:
        read_artifact(bad)
    assert "bad.qlab" in str(info.value)


def test_bad_magic(tmp_path: Path) -> None:
    _, data = _artifact(tmp_path)
    _expect(tmp_path, b"NOPE" + data[4:], "magic")


def test_truncations(tmp_path: Path) -> None:
    _, data = _artifact(tmp_path)
    _expect(tmp_path, data[:6], "truncated")
    _expect(tmp_path, data[:40], "truncated header")
    _expect(tmp_path, data[:-3], "payload is")


def test_bad_json(tmp_path: Path) -> None:
    _, data = _artifact(tmp_path)
    (n,) = struct.unpack_from("<Q", data, 6)
    broken = data[:14] + b"#" + data[15 : 14 + n] + data[14 + n :]
    _expect(tmp_path, broken, "JSON")


def test_tampered_payload_byte(tmp_path: Path) -> None:
    _, data = _artifact(tmp_path)
    tampered = bytearray(data)
    tampered[-10] ^= 0x01
    _expect(tmp_path, bytes(tampered), "SHA-256")


def _rewrite_header(data: bytes, edit) -> bytes:
    (n,) = struct.unpack_from("<Q", data, 6)
    header = json.loads(data[14 : 14 + n])
    edit(header)
    head = json.dumps(header).encode()
    return data[:6] + struct.pack("<Q", len(head)) + head + data[14 + n :]


def test_wrong_lengths_in_header(tmp_path: Path) -> None:
    _, data = _artifact(tmp_path)

    def bad_shape(h):
        h["tensors"][0]["arrays"]["data"]["shape"] = [6, 7]

    def bad_range(h):
        h["tensors"][0]["arrays"]["data"]["offset"] = 10**9

    _expect(tmp_path, _rewrite_header(data, bad_shape), "needs")
    _expect(tmp_path, _rewrite_header(data, bad_range), "outside")


def test_unknown_kind_never_imports(tmp_path: Path) -> None:
    _, data = _artifact(tmp_path)

    def evil(h):
        h["tensors"][-1]["kind"] = "os.system"

    _expect(tmp_path, _rewrite_header(data, evil), "unknown entry kind")


def test_missing_file_and_unserialisable_inputs(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="cannot read"):
        read_artifact(tmp_path / "missing.qlab")
    with pytest.raises(ConfigError, match="not storable"):
        write_artifact(tmp_path / "x.qlab", {"a": [1, 2]})
    with pytest.raises(ConfigError, match="JSON"):
        write_artifact(tmp_path / "x.qlab", {"a": torch.zeros(2)}, extra={"f": object()})
    assert not (tmp_path / "x.qlab").exists()
