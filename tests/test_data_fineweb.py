from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from qlab.data import fineweb
from qlab.data.fineweb import download_fineweb, remote_files
from qlab.data.shards import read_shard, write_shard
from qlab.errors import ConfigError, DataError


@pytest.fixture()
def fake_hub(tmp_path, tokenizer_1024):
    """A local directory laid out like the hub repo: datasets/datasets/... and datasets/tokenizers/."""
    hub = tmp_path / "hub"
    data = hub / "datasets" / "datasets" / "fineweb10B_sp1024"
    for i in range(3):
        write_shard(data / f"fineweb_train_{i:06d}.bin", np.full(40 + i, i))
    write_shard(data / "fineweb_val_000000.bin", np.arange(30))
    (hub / "datasets" / "tokenizers").mkdir(parents=True)
    shutil.copy(tokenizer_1024, hub / "datasets" / "tokenizers" / "fineweb_1024_bpe.model")
    manifest = {"datasets": [{"name": "fineweb10B_sp1024", "stats": {"files_train": 3, "files_val": 1}}]}
    (hub / "datasets" / "manifest.json").write_text(json.dumps(manifest))
    calls: list[str] = []

    def fetch(remote: str):
        calls.append(remote)
        return hub / remote

    return hub, fetch, calls


def test_remote_paths():
    files = remote_files("sp8192", 2)
    assert files == [
        "datasets/tokenizers/fineweb_8192_bpe.model",
        "datasets/datasets/fineweb10B_sp8192/fineweb_val_000000.bin",
        "datasets/datasets/fineweb10B_sp8192/fineweb_train_000000.bin",
        "datasets/datasets/fineweb10B_sp8192/fineweb_train_000001.bin",
    ]
    assert remote_files("sp1024", 0, prefix="")[0] == "tokenizers/fineweb_1024_bpe.model"
    with pytest.raises(ConfigError, match="sp4096"):
        remote_files("sp4096", 1)


def test_download_from_fake_hub(tmp_path, fake_hub):
    hub, fetch, calls = fake_hub
    out = tmp_path / "out"
    info = download_fineweb("sp1024", 2, out, fetch=fetch)
    assert len(calls) == 5 and calls[0] == "datasets/manifest.json"
    assert info.root == out / "datasets" / "fineweb10B_sp1024" and info.vocab_size == 1024
    assert [read_shard(f).tolist()[0] for f in info.train_files] == [0, 1]
    assert info.val_tokens == 30
    assert info.tokenizer_path == out / "tokenizers" / "fineweb_1024_bpe.model"
    # a second call keeps valid files and fetches only what is new
    calls.clear()
    download_fineweb("sp1024", 3, out, fetch=fetch)
    assert calls == ["datasets/manifest.json", "datasets/datasets/fineweb10B_sp1024/fineweb_train_000002.bin"]


def test_manifest_decides_what_a_repository_holds(tmp_path, fake_hub, monkeypatch):
    hub, fetch, _ = fake_hub
    with pytest.raises(DataError, match="has 3 train shards, 4 were requested"):
        download_fineweb("sp1024", 4, tmp_path / "o", fetch=fetch)
    with pytest.raises(DataError, match="lists no dataset fineweb10B_sp8192.*--repo kevclark"):
        download_fineweb("sp8192", 1, tmp_path / "o", fetch=fetch)
    (hub / "datasets" / "manifest.json").write_text("{" * 100_000)
    with pytest.raises(DataError, match="manifest.json unreadable"):
        download_fineweb("sp1024", 1, tmp_path / "o", fetch=fetch)


def test_default_repository_per_variant():
    from qlab.data.fineweb import default_repo

    assert default_repo("sp1024", env={}) == "willdepueoai/parameter-golf"
    assert default_repo("sp8192", env={}) == "kevclark/parameter-golf"
    assert default_repo("sp8192", env={"MATCHED_FINEWEB_REPO_ID": "me/mine"}) == "me/mine"


def test_corrupt_download_rejected(tmp_path, fake_hub):
    hub, fetch, _ = fake_hub
    bad = hub / "datasets" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin"
    bad.write_bytes(bad.read_bytes()[:-4])
    with pytest.raises(DataError, match="fineweb_train_000001.bin is invalid.*truncated"):
        download_fineweb("sp1024", 2, tmp_path / "out", fetch=fetch)
    assert not (tmp_path / "out" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin").exists()
    with pytest.raises(DataError, match="no file"):
        download_fineweb("sp1024", 1, tmp_path / "o2", fetch=lambda remote: tmp_path / "missing")


def test_missing_huggingface_hub_is_clear(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name == "huggingface_hub":
            raise ImportError("no module named huggingface_hub")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(DataError, match="huggingface_hub"):
        fineweb.download_fineweb("sp1024", 1, tmp_path)
