from __future__ import annotations

import shutil

import numpy as np
import pytest

from qlab.data.dataset import open_dataset
from qlab.data.shards import write_shard
from qlab.errors import DataError


def _pg_layout(root, tokenizer, v=512):
    data = root / "datasets" / f"fineweb10B_sp{v}"
    write_shard(data / "fineweb_train_000000.bin", np.arange(100) % v)
    write_shard(data / "fineweb_train_000001.bin", np.arange(50) % v)
    write_shard(data / "fineweb_val_000000.bin", np.arange(70) % v)
    (root / "tokenizers").mkdir(parents=True)
    shutil.copy(tokenizer, root / "tokenizers" / f"fineweb_{v}_bpe.model")
    return data


def test_open_qlab_layout(tiny_dataset):
    info = open_dataset(tiny_dataset.root)
    assert info == tiny_dataset and info.vocab_size == 512
    assert info.meta["source"] == "tiny-embedded"
    with pytest.raises(DataError, match="1024 was requested"):
        open_dataset(tiny_dataset.root, vocab_size=1024)


def test_open_parameter_golf_layout(tmp_path, tiny_dataset):
    data = _pg_layout(tmp_path, tiny_dataset.tokenizer_path)
    for path in (tmp_path, tmp_path / "datasets", data):
        info = open_dataset(path)
        assert info.root == data and info.vocab_size == 512
        assert [f.name for f in info.train_files] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
        assert info.train_tokens == 150 and info.val_tokens == 70
    with pytest.raises(DataError, match="no dataset found"):
        open_dataset(tmp_path, vocab_size=1024)


def test_missing_pieces(tmp_path, tiny_dataset):
    data = _pg_layout(tmp_path, tiny_dataset.tokenizer_path)
    (data / "fineweb_val_000000.bin").unlink()
    with pytest.raises(DataError, match="no validation shards"):
        open_dataset(tmp_path)
    (tmp_path / "tokenizers" / "fineweb_512_bpe.model").unlink()
    with pytest.raises(DataError, match="fineweb_512_bpe.model not found"):
        open_dataset(tmp_path)
    with pytest.raises(DataError, match="not found"):
        open_dataset(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no dataset found"):
        open_dataset(empty)


def test_corrupt_shard_detected_on_open(tmp_path, tiny_dataset):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset.root, copy)
    val = sorted(copy.glob("val_*.bin"))[0]
    val.write_bytes(val.read_bytes()[:-2])
    with pytest.raises(DataError, match=val.name):
        open_dataset(copy)
