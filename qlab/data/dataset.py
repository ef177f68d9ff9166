"""Open a tokenized dataset directory (qlab's layout or Parameter Golf's).

qlab layout: ``tokenizer.model``, ``train_%06d.bin``, ``val_%06d.bin``, ``meta.json``.
Parameter Golf layout: ``datasets/fineweb10B_sp{V}/fineweb_{train,val}_%06d.bin`` and
``tokenizers/fineweb_{V}_bpe.model``, given the root or the ``fineweb10B_sp{V}`` folder.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlab.data.shards import read_shard_header
from qlab.errors import DataError

META_NAME = "meta.json"
TOKENIZER_NAME = "tokenizer.model"
_PG_DIR = re.compile(r"fineweb10B_sp(\d+)$")


@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset's shards and tokenizer live, and its vocabulary size."""

    root: Path
    train_files: tuple[Path, ...]
    val_files: tuple[Path, ...]
    tokenizer_path: Path
    vocab_size: int
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def train_tokens(self) -> int:
        return sum(read_shard_header(p) for p in self.train_files)

    @property
    def val_tokens(self) -> int:
        return sum(read_shard_header(p) for p in self.val_files)


def open_dataset(path: str | os.PathLike, vocab_size: int | None = None) -> DatasetInfo:
    """Locate shards and tokenizer under ``path``; validate headers, vocab and presence."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: dataset directory not found")
    if (path / TOKENIZER_NAME).exists() or any(path.glob("train_*.bin")) or any(path.glob("val_*.bin")):
        return _open_qlab(path, vocab_size)
    return _open_parameter_golf(path, vocab_size)


def read_meta(root: Path) -> dict[str, Any]:
    """meta.json of a qlab dataset, or {} when absent; DataError when unreadable."""
    meta_path = root / META_NAME
    if not meta_path.exists():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta_path}: unreadable dataset metadata ({exc})") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: expected a JSON object")
    return meta


def _open_qlab(root: Path, vocab_size: int | None) -> DatasetInfo:
    meta = read_meta(root)
    tok = root / TOKENIZER_NAME
    declared = meta.get("vocab_size")
    return _finish(
        root,
        sorted(root.glob("train_*.bin")),
        sorted(root.glob("val_*.bin")),
        tok,
        vocab_size,
        declared,
        meta,
    )


def _open_parameter_golf(path: Path, vocab_size: int | None) -> DatasetInfo:
    if _PG_DIR.search(path.name):
        data_dir = path
    else:
        search = path / "datasets" if (path / "datasets").is_dir() else path
        found = sorted(p for p in search.glob("fineweb10B_sp*") if p.is_dir() and _PG_DIR.search(p.name))
        if vocab_size is not None:
            found = [p for p in found if int(_PG_DIR.search(p.name).group(1)) == vocab_size]
        if not found:
            raise DataError(
                f"{path}: no dataset found (expected tokenizer.model + train_/val_*.bin, or "
                f"datasets/fineweb10B_sp{{V}}/ with tokenizers/fineweb_{{V}}_bpe.model)"
            )
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DataError(f"{path}: several datasets ({names}); pass vocab_size to pick one")
        data_dir = found[0]
    v = int(_PG_DIR.search(data_dir.name).group(1))
    tok = data_dir.parent.parent / "tokenizers" / f"fineweb_{v}_bpe.model"
    return _finish(
        data_dir,
        sorted(data_dir.glob("fineweb_train_*.bin")),
        sorted(data_dir.glob("fineweb_val_*.bin")),
        tok,
        vocab_size,
        v,
        {"source": "parameter-golf"},
    )


def _finish(root, train, val, tok, vocab_size, declared, meta) -> DatasetInfo:
    if not tok.is_file():
        raise DataError(f"{root}: tokenizer model {tok} not found")
    if not val:
        raise DataError(f"{root}: no validation shards found")
    if vocab_size is not None and declared is not None and int(declared) != vocab_size:
        raise DataError(f"{root}: dataset vocab_size is {declared}, but {vocab_size} was requested")
    if declared is None and vocab_size is None:
        from qlab.data.tokenizer import load_tokenizer

        declared = load_tokenizer(tok).vocab_size()
    for p in (*train, *val):
        read_shard_header(p)
    return DatasetInfo(root, tuple(train), tuple(val), tok, int(vocab_size or declared), meta)
