"""qlab artifact container: bit-exact round trips and every corruption path."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import brotli
import numpy as np
import pytest
import torch

from qlab.compress.container import decode_artifact, encode_artifact, read_artifact, write_artifact
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


# The file layouts, written out independently of qlab.compress.container:
# v2: b"QLAB" | u16 version | u16 flags | u64 header length | 32-byte SHA-256 of the stored
#     header | header (brotli JSON if flags & 1) | payload; arrays carry no offsets.
# v1: b"QLAB" | u16 version | u64 header length | JSON header (offsets included) | payload.
V2 = struct.Struct("<4sHHQ32s")


def _unpack_v2(data: bytes) -> tuple[bytes, bytes]:
    """(header JSON bytes, payload) of a v2 artifact."""
    magic, version, flags, n, digest = V2.unpack_from(data)
    assert (magic, version, flags) == (b"QLAB", 2, 1)
    head = data[V2.size : V2.size + n]
    assert hashlib.sha256(head).digest() == digest
    return brotli.decompress(head), data[V2.size + n :]


def _pack_v2(head_json: bytes, payload: bytes, compress: bool = True) -> bytes:
    head = brotli.compress(head_json) if compress else head_json
    return V2.pack(b"QLAB", 2, int(compress), len(head), hashlib.sha256(head).digest()) + head + payload


def _to_v1(data: bytes) -> bytes:
    """The same artifact in the version-1 layout (explicit offsets, plain JSON header)."""
    head, payload = _unpack_v2(data)
    header = json.loads(head)
    offset = 0
    for e in header["tensors"]:
        for spec in e["arrays"].values():
            offset += (-offset) % 8
            spec["offset"] = offset
            offset += spec["length"]
    header["version"] = 1
    raw = json.dumps(header, sort_keys=True).encode()
    return struct.pack("<4sHQ", b"QLAB", 1, len(raw)) + raw + payload


def _rewrite_v1_header(data: bytes, edit) -> bytes:
    (n,) = struct.unpack_from("<Q", data, 6)
    header = json.loads(data[14 : 14 + n])
    edit(header)
    head = json.dumps(header).encode()
    return data[:6] + struct.pack("<Q", len(head)) + head + data[14 + n :]


def test_bad_json(tmp_path: Path) -> None:
    _, data = _artifact(tmp_path)
    head, payload = _unpack_v2(data)
    _expect(tmp_path, _pack_v2(b"#" + head[1:], payload), "JSON")
    old = _to_v1(data)
    (n,) = struct.unpack_from("<Q", old, 6)
    broken = old[:14] + b"#" + old[15 : 14 + n] + old[14 + n :]
    _expect(tmp_path, broken, "JSON")


def test_tampered_payload_byte(tmp_path: Path) -> None:
    _, data = _artifact(tmp_path)
    tampered = bytearray(data)
    tampered[-10] ^= 0x01
    _expect(tmp_path, bytes(tampered), "SHA-256")


def _rewrite_header(data: bytes, edit) -> bytes:
    """Edit the header of a v2 artifact and re-pack it consistently (a mis-described file)."""
    head, payload = _unpack_v2(data)
    header = json.loads(head)
    edit(header)
    return _pack_v2(json.dumps(header).encode(), payload)


def test_wrong_lengths_in_header(tmp_path: Path) -> None:
    _, data = _artifact(tmp_path)

    def bad_shape(h):
        h["tensors"][0]["arrays"]["data"]["shape"] = [6, 7]

    def bad_range(h):
        h["tensors"][0]["arrays"]["data"]["offset"] = 10**9

    def bad_length(h):
        h["tensors"][0]["arrays"]["data"]["length"] = 10**9

    def dropped_entry(h):
        h["tensors"].pop()  # every remaining array checks out, but payload bytes go undescribed

    _expect(tmp_path, _rewrite_header(data, bad_shape), "needs")
    _expect(tmp_path, _rewrite_v1_header(_to_v1(data), bad_range), "outside")  # v1 stores offsets
    _expect(
        tmp_path, _rewrite_header(data, bad_length), "end at byte"
    )  # v2: the layout must match raw_length
    _expect(tmp_path, _rewrite_header(data, dropped_entry), "end at byte")


def test_unknown_kind_never_imports(tmp_path: Path) -> None:
    _, data = _artifact(tmp_path)

    def evil(h):
        h["tensors"][-1]["kind"] = "os.system"

    _expect(tmp_path, _rewrite_header(data, evil), "unknown entry kind")


def test_header_bytes_are_covered_by_the_prefix_hash(tmp_path: Path) -> None:
    _, data = _artifact(tmp_path)
    (n,) = struct.unpack_from("<Q", data, 8)
    for pos in (V2.size, V2.size + n // 2, V2.size + n - 1, 20):  # header start/middle/end, the hash itself
        flipped = bytearray(data)
        flipped[pos] ^= 0x04
        _expect(tmp_path, bytes(flipped), "header SHA-256")
    _expect(tmp_path, data[:6] + struct.pack("<H", 6) + data[8:], "flags")
    _expect(tmp_path, data[:4] + struct.pack("<H", 3) + data[6:], "version")
    head, payload = _unpack_v2(data)
    garbage = V2.pack(b"QLAB", 2, 1, 9, hashlib.sha256(b"not-brotl").digest()) + b"not-brotl" + payload
    _expect(tmp_path, garbage, "decompress")


def test_old_version_and_plain_header_still_read(tmp_path: Path) -> None:
    tensors = sample_tensors()
    data = encode_artifact(tensors, policy={"p": 1}, codec="zstd")
    head, payload = _unpack_v2(data)
    for variant in (_to_v1(data), _pack_v2(head, payload, compress=False)):
        (tmp_path / "v.qlab").write_bytes(variant)
        out, header = read_artifact(tmp_path / "v.qlab")
        assert list(out) == list(tensors) and header["policy"] == {"p": 1}
        for name in tensors:
            assert_same(tensors[name], out[name])
    plain = encode_artifact(tensors, policy={"p": 1}, codec="zstd", compress_header=False)
    assert struct.unpack_from("<H", plain, 6)[0] == 0 and plain[V2.size :].startswith(b"{")


def test_header_is_compressed_and_slim(tmp_path: Path) -> None:
    from qlab.config import get_preset
    from qlab.model.gpt import GPT
    from qlab.quant.policy import get_policy, quantize_state_dict

    torch.manual_seed(0)
    pol = get_policy("record_small")
    qsd = quantize_state_dict(GPT(get_preset("tiny")).state_dict(), pol)
    data = encode_artifact(qsd, policy=pol.to_dict(), codec="raw", shuffle=False)
    (n,) = struct.unpack_from("<Q", data, 8)
    v1_head = struct.unpack_from("<Q", _to_v1(data), 6)[0]
    head, _ = _unpack_v2(data)
    entries = json.dumps(json.loads(head)["tensors"])
    assert '"offset"' not in entries and "null" not in entries  # derivable / default fields are left out
    assert V2.size + n < 0.1 * (14 + v1_head), (n, v1_head)  # brotli: > 10x smaller than v1
    assert (V2.size + n) / len(qsd) < 40  # bytes per tensor entry, policy included (v1: ~400)
    out, _ = read_artifact(write_artifact(tmp_path / "m.qlab", qsd, policy=pol.to_dict(), codec="zstd"))
    for name, q in qsd.items():
        assert_same(q, out[name]) if hasattr(q, "codes") else assert_same(q.data, out[name].data)


def test_missing_file_and_unserialisable_inputs(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="cannot read"):
        read_artifact(tmp_path / "missing.qlab")
    with pytest.raises(ConfigError, match="not storable"):
        write_artifact(tmp_path / "x.qlab", {"a": [1, 2]})
    with pytest.raises(ConfigError, match="JSON"):
        write_artifact(tmp_path / "x.qlab", {"a": torch.zeros(2)}, extra={"f": object()})
    assert not (tmp_path / "x.qlab").exists()


def _ans_artifact() -> tuple[dict, bytes]:
    tensors = sample_tensors()
    return tensors, encode_artifact(tensors, policy={"p": 1}, codec="ans")


def test_ans_layout_codes_symbols_and_pools_the_rest() -> None:
    tensors, data = _ans_artifact()
    out, header = decode_artifact(data)
    for name in tensors:
        assert_same(tensors[name], out[name])
    layout = header["symbols"]
    assert [n for n, _ in layout["streams"]] == ["qt", "qt_group"]  # only quantized codes
    assert layout["rest_codec"] == "brotli-11+shuffle"
    assert sum(k for _, k in layout["streams"]) + layout["rest_length"] == header["payload_length"]


def _rewrite_header(data: bytes, edit) -> bytes:
    """Re-encode the header with ``edit`` applied and the prefix hash recomputed."""
    _, version, flags, head_len, _ = struct.unpack_from("<4sHHQ32s", data)
    start = struct.calcsize("<4sHHQ32s")
    header = json.loads(brotli.decompress(data[start : start + head_len]))
    edit(header)
    head = brotli.compress(json.dumps(header).encode())
    prefix = struct.pack("<4sHHQ32s", b"QLAB", version, flags, len(head), hashlib.sha256(head).digest())
    return prefix + head + data[start + head_len :]


def _merge_streams(header: dict) -> None:
    streams = header["symbols"]["streams"]  # one stream claims the bytes of both
    header["symbols"]["streams"] = [[streams[0][0], streams[0][1] + streams[1][1]]]


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda h: h["symbols"].update(rest_length=h["symbols"]["rest_length"] + 1), "add up"),
        (
            lambda h: h["symbols"].update(streams=[["nope", 10]] + h["symbols"]["streams"][1:]),
            "add up|names no",
        ),
        (lambda h: h["symbols"]["streams"][1].__setitem__(0, "qt"), "overlap|qt/codes"),
        (lambda h: h["symbols"].update(rest_codec="nonsense"), "codec"),
        (lambda h: h["symbols"].pop("streams"), "malformed"),
        (_merge_streams, "trailing"),
    ],
)
def test_ans_layout_rejects_a_lying_header(edit, match: str) -> None:
    _, data = _ans_artifact()
    with pytest.raises(ArtifactError, match=match):
        decode_artifact(_rewrite_header(data, edit))


def test_ans_layout_is_smaller_than_brotli_on_trained_like_codes() -> None:
    g = torch.Generator().manual_seed(1)
    spread = torch.logspace(0, 1, 256)  # columns with different spreads, as GPTQ leaves them
    codes = (torch.randn(512, 256, generator=g) * spread).round().clamp(-31, 31).to(torch.int8)
    q = QuantizedTensor(
        codes=codes, scale=torch.ones(512, 1).half(), zero=None, bits=6, shape=(512, 256), scheme="int"
    )
    small = encode_artifact({"w": q}, codec="ans")
    assert len(small) < 0.97 * len(encode_artifact({"w": q}, codec="brotli-11"))
