"""Damaged datasets end in a DataError naming the file and field, never in a wrong bpb."""

from __future__ import annotations

import json
import shutil

import pytest

from qlab.cli import main
from qlab.data.dataset import open_dataset
from qlab.errors import DataError


@pytest.fixture()
def copy(tiny_dataset, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(tiny_dataset.root, d)
    return d


def test_truncated_tokenizer_is_refused_not_scored(copy, capsys):
    tok = copy / "tokenizer.model"
    tok.write_bytes(tok.read_bytes()[:73])  # still parses as a small SentencePiece model
    with pytest.raises(DataError, match=r"tokenizer.*pieces.*vocab_size is 512|not a valid SentencePiece"):
        open_dataset(copy)
    assert main(["data", "info", str(copy)]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_a_build_killed_before_its_manifest_is_incomplete(copy):
    (copy / "meta.json").unlink()
    with pytest.raises(DataError, match="incomplete build"):
        open_dataset(copy)


@pytest.mark.parametrize("value", ["512", 512.7, 1e30, True, None, -3])
def test_meta_vocab_size_must_be_an_int(copy, value):
    meta = json.loads((copy / "meta.json").read_text())
    meta["vocab_size"] = value
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="meta.json: field 'vocab_size'"):
        open_dataset(copy)


def test_manifest_catches_missing_truncated_and_altered_shards(copy):
    val = sorted(copy.glob("val_*.bin"))[0]
    data = val.read_bytes()
    val.write_bytes(data[:-2])
    with pytest.raises(DataError, match="manifest says"):
        open_dataset(copy)
    val.write_bytes(data[:-2] + bytes([data[-2] ^ 1, data[-1]]))
    open_dataset(copy)  # same size: only a checksum sees the change
    with pytest.raises(DataError, match="checksums"):
        open_dataset(copy, verify=True)
    val.unlink()
    with pytest.raises(DataError, match="missing"):
        open_dataset(copy)
