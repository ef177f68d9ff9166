"""Shared fixtures: a tiny tokenized dataset built from a slice of the embedded corpus.

Torch is pinned to one intra-op thread for the whole suite: the tests use small
tensors, where a second OpenMP thread only adds synchronisation, and on a shared
2-core machine spin-waiting threads made small ops up to 10x slower.
"""

from __future__ import annotations

import pytest
import torch

from qlab.data.corpus import build_dataset
from qlab.data.dataset import DatasetInfo
from qlab.data.embedded import embedded_documents
from qlab.data.tokenizer import load_tokenizer

torch.set_num_threads(1)

TINY_TRAIN_BYTES = 300_000
TINY_VAL_BYTES = 30_000
TINY_VOCAB = 512


def _take(docs: list[str], budget: int) -> list[str]:
    out, used = [], 0
    for doc in docs:
        if used >= budget:
            break
        out.append(doc)
        used += len(doc.encode("utf-8"))
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> DatasetInfo:
    """~300 KB train / ~30 KB val of the embedded corpus, vocab 512 (builds in ~1 s)."""
    train, val = embedded_documents()
    out = tmp_path_factory.mktemp("tiny_dataset")
    return build_dataset(
        _take(train, TINY_TRAIN_BYTES), _take(val, TINY_VAL_BYTES), out, TINY_VOCAB, source="tiny-embedded"
    )


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dataset):
    """The tiny dataset's SentencePieceProcessor (vocab 512)."""
    return load_tokenizer(tiny_dataset.tokenizer_path)


@pytest.fixture(scope="session")
def tokenizer_1024(tmp_path_factory):
    """A 1024-piece tokenizer (the size Parameter Golf's sp1024 variant declares)."""
    from qlab.data.tokenizer import train_tokenizer

    train, _ = embedded_documents()
    return train_tokenizer(_take(train, TINY_TRAIN_BYTES), 1024, tmp_path_factory.mktemp("tok") / "t.model")
