from __future__ import annotations

import json

import numpy as np
import pytest

from qlab.data import corpus, embedded
from qlab.data.corpus import build_dataset, build_from_folder, default_dataset
from qlab.data.embedded import clean_text, embedded_documents, embedded_titled_documents
from qlab.data.shards import read_shard
from qlab.errors import DataError

DOCS = [f"Document number {i} talks about tokenizers, shards and loaders.\nLine two." for i in range(30)]


def test_embedded_corpus_size_split_and_determinism():
    docs = embedded_titled_documents()
    titles = [t for t, _ in docs]
    assert titles == sorted(titles) and len(set(titles)) == len(titles)
    assert any(t == "topic:assignment" for t in titles)
    assert not any(
        t.split(":")[1].split(".")[0] in ("antigravity", "this", "tkinter", "idlelib") for t in titles
    )
    train, val = embedded_documents()
    size = sum(len(d.encode()) for d in train + val)
    assert 1_000_000 < size < 4_000_000
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.10
    embedded._cached_documents.cache_clear()  # re-extract in a fresh subprocess
    assert embedded_documents() == (train, val)


def test_clean_text():
    assert clean_text("a\r\nb\t|x       y   \n\n\n\n\nz\x07") == "a\nb   |x    y\n\nz"


def test_build_dataset_layout_and_content(tmp_path):
    info = build_dataset(DOCS[:25], DOCS[25:], tmp_path / "ds", vocab_size=300, shard_tokens=500)
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["vocab_size"] == info.vocab_size == 300
    assert len(info.train_files) > 1 and info.train_files[0].name == "train_000000.bin"
    train = np.concatenate([read_shard(f) for f in info.train_files])
    assert len(train) == meta["train_tokens"] == info.train_tokens
    assert all(read_shard_len == 500 for read_shard_len in map(len, map(read_shard, info.train_files[:-1])))
    assert int((train == 1).sum()) == 25 and train[0] == 1  # one BOS per document, no EOS
    assert int((train == 2).sum()) == 0
    from qlab.data.tokenizer import load_tokenizer

    sp = load_tokenizer(info.tokenizer_path)
    docs = [sp.decode(part.tolist()) for part in np.split(train, np.flatnonzero(train == 1))[1:]]
    assert docs == DOCS[:25]
    # rebuilding with an existing tokenizer removes stale shards
    again = build_dataset(DOCS[:25], DOCS[25:], tmp_path / "ds", tokenizer=info.tokenizer_path, force=True)
    assert len(again.train_files) == 1 and again.train_tokens == meta["train_tokens"]


def test_build_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="validation"):
        build_dataset(DOCS, [], tmp_path / "x", vocab_size=300)
    with pytest.raises(DataError, match="nope.model"):
        build_dataset(DOCS, DOCS[:1], tmp_path / "x", tokenizer=tmp_path / "nope.model")


def test_build_from_folder_txt_and_jsonl(tmp_path, tiny_dataset):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(10):
        (src / "sub" / f"doc{i}.txt").write_text(DOCS[i])
    lines = [json.dumps({"text": d}) for d in DOCS[10:]] + [""]
    (src / "more.jsonl").write_text("\n".join(lines))
    (src / "ignored.csv").write_text("a,b")
    docs = corpus.read_folder_documents(src)
    assert len(docs) == 30 and docs[0][0] == "more.jsonl:1"
    info = build_from_folder(src, tiny_dataset.tokenizer_path, tmp_path / "out")
    assert info.vocab_size == 512
    total_docs = sum(int((read_shard(f) == 1).sum()) for f in info.train_files + info.val_files)
    assert total_docs == 30 and info.val_tokens > 0
    assert info.meta["train_docs"] + info.meta["val_docs"] == 30


def test_folder_errors(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"a.jsonl:2"):
        corpus.read_folder_documents(src)
    (src / "a.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: invalid JSON"):
        corpus.read_folder_documents(src)
    (src / "a.jsonl").unlink()
    (src / "only.txt").write_text("one document")
    with pytest.raises(DataError, match="at least 2"):
        corpus.read_folder_documents(src)


def test_default_dataset_caches_and_rebuilds(tmp_path, monkeypatch):
    calls = []

    def small_docs():
        calls.append(1)
        return DOCS[:25], DOCS[25:]

    monkeypatch.setattr(corpus, "embedded_documents", small_docs)
    monkeypatch.setattr(corpus, "corpus_fingerprint", lambda: "fp")
    first = default_dataset(tmp_path, vocab_size=300)
    assert first.root == tmp_path / "embedded_sp300" and first.meta["source"] == "embedded"
    again = default_dataset(tmp_path, vocab_size=300)
    assert len(calls) == 1 and again.train_files == first.train_files
    meta_path = first.root / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "python_version": "2.7.18"}))
    default_dataset(tmp_path, vocab_size=300)
    assert len(calls) == 2
    assert json.loads(meta_path.read_text())["python_version"] != "2.7.18"
    monkeypatch.setenv("QLAB_CACHE", str(tmp_path / "env"))
    assert default_dataset(vocab_size=300).root == tmp_path / "env" / "embedded_sp300"
