"""Parameter Golf .ptz artifacts: round trip and refusal of unsafe pickles."""

from __future__ import annotations

import io
import lzma
import os
from pathlib import Path

import brotli
import pytest
import torch

from qlab.compress.ptz import read_ptz, write_ptz
from qlab.compress.shuffle import shuffle
from qlab.errors import ArtifactError, CheckpointError


def quant_obj() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "quantized": {"w": torch.randint(-31, 32, (8, 16), generator=g, dtype=torch.int8)},
        "scales": {"w": torch.rand(8, 1, generator=g).half()},
        "passthrough": {"g": torch.randn(4, generator=g).half()},
        "meta": {"bits": 6, "k": 12.85, "names": ["w"]},
    }


def assert_tree_equal(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_tree_equal(a[k], b[k])
    else:
        assert a == b


@pytest.mark.parametrize("codec,shuffle_on", [("brotli-11", True), ("brotli-9", False), ("lzma", True)])
def test_round_trip(tmp_path: Path, codec: str, shuffle_on: bool) -> None:
    obj = quant_obj()
    path = write_ptz(obj, tmp_path / "m.ptz", codec=codec, shuffle=shuffle_on)
    assert_tree_equal(obj, read_ptz(path))


def test_reads_record_style_bytes(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save(quant_obj(), buf)
    (tmp_path / "r.ptz").write_bytes(brotli.compress(shuffle(buf.getvalue(), 2), quality=5))
    (tmp_path / "x.ptz").write_bytes(lzma.compress(buf.getvalue(), preset=6))
    assert_tree_equal(quant_obj(), read_ptz(tmp_path / "r.ptz"))
    assert_tree_equal(quant_obj(), read_ptz(tmp_path / "x.ptz"))


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_pickle_is_refused_without_side_effect(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2), "evil": _Evil(str(marker))}, buf)
    (tmp_path / "evil.ptz").write_bytes(brotli.compress(shuffle(buf.getvalue()), quality=1))
    with pytest.raises(CheckpointError, match="evil.ptz"):
        read_ptz(tmp_path / "evil.ptz")
    assert not marker.exists()


def test_garbage_and_missing(tmp_path: Path) -> None:
    (tmp_path / "g.ptz").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ArtifactError, match="g.ptz"):
        read_ptz(tmp_path / "g.ptz")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_ptz(tmp_path / "none.ptz")
    (tmp_path / "t.ptz").write_bytes(brotli.compress(b"PK\x03\x04 not a zip", quality=1))
    with pytest.raises(CheckpointError, match="t.ptz"):
        read_ptz(tmp_path / "t.ptz")
