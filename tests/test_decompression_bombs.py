"""Decompression is bounded: a bomb stops at the declared (or capped) size, in bounded memory."""

from __future__ import annotations

import resource

import brotli
import pytest

from qlab.compress.codecs import get_codec
from qlab.compress.container import decode_artifact
from qlab.compress.ptz import MAX_PTZ_RAW_BYTES, load_ptz_bytes
from qlab.errors import ArtifactError

BOMB_RAW = 600 << 20  # 600 MiB of zeros compress to well under 1 MB


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return brotli.compress(b"\0" * BOMB_RAW, quality=1)


@pytest.mark.parametrize("codec", ["brotli", "lzma-1", "zstd-1"])
def test_each_codec_stops_at_the_limit(codec):
    c = get_codec(codec)
    data = c.compress(b"\0" * (4 << 20))
    assert c.decompress(data, max_output=4 << 20) == b"\0" * (4 << 20)
    with pytest.raises(ArtifactError, match="limit"):
        c.decompress(data, max_output=1 << 20)


def test_ptz_bomb_is_refused_in_bounded_memory(bomb):
    assert len(bomb) < 2 << 20 and BOMB_RAW > MAX_PTZ_RAW_BYTES
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ArtifactError, match="limit"):
        load_ptz_bytes(bomb, "bomb.ptz")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 2 * MAX_PTZ_RAW_BYTES / 2**20 + 64, grown_mib


def _artifact_with_payload(payload: bytes, raw_length: int) -> bytes:
    """A version-2 .qlab whose header (hashes consistent) claims ``raw_length`` raw bytes."""
    import hashlib
    import json

    from qlab.compress import container as C

    # one byte array as long as the claim, so the layout agrees and the decoder is reached
    ok = isinstance(raw_length, int) and not isinstance(raw_length, bool) and 0 <= raw_length < 2**40
    array = {"dtype": "np:|u1", "shape": [raw_length], "length": raw_length}
    tensors = [{"name": "w", "kind": "ndarray", "fields": {}, "arrays": {"data": array}}] if ok else []
    header = {"format": "qlab-artifact", "version": C.VERSION, "codec": "brotli-11", "policy": None,
              "extra": {}, "tensors": tensors, "raw_length": raw_length, "payload_length": len(payload),
              "raw_sha256": "0" * 64, "payload_sha256": hashlib.sha256(payload).hexdigest()}  # fmt: skip
    head = json.dumps(header).encode()
    return C._PREFIX.pack(C.MAGIC, C.VERSION, 0, len(head), hashlib.sha256(head).digest()) + head + payload


@pytest.mark.parametrize("claimed", [4, 1 << 20])
def test_qlab_artifact_inflates_no_further_than_its_header(bomb, claimed):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ArtifactError, match="limit"):
        decode_artifact(_artifact_with_payload(bomb, claimed), "bomb.qlab")
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 64


def test_qlab_header_raw_length_is_type_checked(bomb):
    for bad in (-1, 2**62, "4", True):
        with pytest.raises(ArtifactError, match="raw_length"):
            decode_artifact(_artifact_with_payload(bomb, bad), "bad.qlab")
