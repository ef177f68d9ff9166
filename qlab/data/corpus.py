"""Building tokenized datasets: from documents, from a folder, and the cached default.

Every build trains (or copies) a tokenizer, encodes each document BOS-prefixed with no
EOS (like FineWeb), writes shards, ``tokenizer.model`` and finally ``meta.json``, all
atomically, so a directory with meta.json is a complete dataset.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qlab.data.dataset import META_NAME, TOKENIZER_NAME, DatasetInfo, open_dataset, read_meta, shard_manifest
from qlab.data.embedded import corpus_fingerprint, embedded_documents, is_validation, python_version
from qlab.data.shards import write_shard
from qlab.data.tokenizer import BOS_ID, load_tokenizer, train_tokenizer
from qlab.errors import DataError
from qlab.io.atomic import atomic_write_bytes, atomic_write_json
from qlab.io.outputs import claim_output_dir

__all__ = [
    "build_dataset",
    "build_from_folder",
    "default_dataset",
    "embedded_documents",
    "read_folder_documents",
    "split_documents",
]

DEFAULT_SHARD_TOKENS = 100_000_000  # Parameter Golf's train shard size
_FORMAT = 1  # bump when the embedded corpus or the build procedure changes


def build_dataset(
    train_docs: Sequence[str],
    val_docs: Sequence[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 1024,
    tokenizer: str | os.PathLike | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    source: str = "custom",
    extra_meta: dict[str, Any] | None = None,
    force: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
) -> DatasetInfo:
    """Tokenize documents into a qlab dataset directory (shards, tokenizer.model, meta.json).

    Trains a tokenizer on ``train_docs`` unless ``tokenizer`` (a model path) is given.
    Each document is encoded BOS-prefixed with no EOS, like FineWeb. meta.json is written
    last, so its presence marks a complete build. A folder that already holds a dataset
    or other files is refused unless ``force`` (which then replaces only a dataset's own
    files); ``inputs`` (the source folder) are never written into.
    """
    start = time.perf_counter()
    if not train_docs or not val_docs:
        raise DataError(
            f"{out_dir}: need at least one train and one validation document "
            f"(got {len(train_docs)} train, {len(val_docs)} val)"
        )
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    out = Path(out_dir)
    tok_path = out / TOKENIZER_NAME
    # read before anything is replaced: rebuilding a dataset with its own tokenizer rewrites
    # the same bytes, so that one input may lie inside the folder --force replaces
    tok_bytes = None if tokenizer is None else _read_tokenizer(tokenizer)
    own = tokenizer is not None and Path(tokenizer).resolve() == tok_path.resolve()
    claim_output_dir(out, "data", [*inputs, None if own else tokenizer], force=force, makes="dataset")
    for stale in (out / META_NAME, *out.glob("train_*.bin"), *out.glob("val_*.bin")):
        stale.unlink(missing_ok=True)
    if tok_bytes is None:
        train_tokenizer(train_docs, vocab_size, tok_path)
    else:
        atomic_write_bytes(tok_path, tok_bytes)
    sp = load_tokenizer(tok_path)
    counts = {
        split: _write_split(sp, docs, out, split, shard_tokens)
        for split, docs in (("train", train_docs), ("val", val_docs))
    }
    meta = {
        "format": _FORMAT,
        "source": source,
        "vocab_size": sp.vocab_size(),
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "train_docs": len(train_docs),
        "val_docs": len(val_docs),
        "train_bytes": sum(len(d.encode("utf-8")) for d in train_docs),
        "val_bytes": sum(len(d.encode("utf-8")) for d in val_docs),
        "python_version": python_version(),
        "build_seconds": round(time.perf_counter() - start, 3),
        **(extra_meta or {}),
        # The manifest, written last: open_dataset checks that exactly these shards exist
        # with these sizes (and, with verify=True, these checksums).
        "shards": shard_manifest(out),
    }
    atomic_write_json(out / META_NAME, meta)
    return open_dataset(out)


def _read_tokenizer(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: tokenizer model not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the tokenizer model ({exc.strerror})") from None


def _write_split(sp, docs: Sequence[str], out: Path, split: str, shard_tokens: int) -> int:
    """Encode ``docs`` BOS-prefixed and write ``{split}_%06d.bin`` shards; return token count."""
    pending: list[np.ndarray] = []
    n_pending = total = index = 0
    for i in range(0, len(docs), 256):
        for ids in sp.encode(list(docs[i : i + 256])):
            pending.append(np.asarray([BOS_ID, *ids], dtype=np.uint16))
            n_pending += len(ids) + 1
        while n_pending >= shard_tokens:
            stream = np.concatenate(pending)
            write_shard(out / f"{split}_{index:06d}.bin", stream[:shard_tokens])
            pending, n_pending = [stream[shard_tokens:]], len(stream) - shard_tokens
            total, index = total + shard_tokens, index + 1
    if n_pending:
        write_shard(out / f"{split}_{index:06d}.bin", np.concatenate(pending))
        total += n_pending
    return total


def read_folder_documents(src_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """(title, text) for every .txt file (one document) and .jsonl line (field "text")."""
    src = Path(src_dir)
    if not src.is_dir():
        raise DataError(f"{src}: source folder not found")
    docs = []
    for path in sorted(p for p in src.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file()):
        rel = path.relative_to(src).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not valid UTF-8 ({exc})") from exc
        if path.suffix == ".txt":
            docs.append((rel, text))
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string field 'text'")
            docs.append((f"{rel}:{lineno}", record["text"]))
    docs = [(t, d) for t, d in docs if d.strip()]
    if len(docs) < 2:
        raise DataError(
            f"{src}: need at least 2 non-empty documents (.txt files or .jsonl lines), found {len(docs)}"
        )
    return docs


def split_documents(docs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Hash split of titled documents; guarantees at least one document on each side."""
    val_idx = {i for i, (title, _) in enumerate(docs) if is_validation(title)}
    if not val_idx:
        val_idx = {len(docs) - 1}
    if len(val_idx) == len(docs):
        val_idx.discard(0)
    train = [d for i, (_, d) in enumerate(docs) if i not in val_idx]
    val = [d for i, (_, d) in enumerate(docs) if i in val_idx]
    return train, val


def build_from_folder(
    src_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    vocab_size: int = 1024,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    force: bool = False,
) -> DatasetInfo:
    """Build a dataset from a folder of .txt / .jsonl files (~5% of documents to validation)."""
    train, val = split_documents(read_folder_documents(src_dir))
    return build_dataset(
        train,
        val,
        out_dir,
        vocab_size,
        tokenizer_path,
        shard_tokens,
        source=f"folder:{Path(src_dir).resolve()}",
        force=force,
        inputs=[src_dir],
    )


def default_cache_dir() -> Path:
    """``$QLAB_CACHE`` if set, else ``data/cache`` under the current directory."""
    env = os.environ.get("QLAB_CACHE")
    return Path(env) if env else Path.cwd() / "data" / "cache"


def default_dataset(cache_dir: str | os.PathLike | None = None, vocab_size: int = 1024) -> DatasetInfo:
    """The embedded corpus tokenized with vocab ``vocab_size``, built once into a cache.

    Reused while its meta.json matches this Python version, vocab, build format and
    corpus fingerprint; rebuilt otherwise.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = root / f"embedded_sp{vocab_size}"
    fingerprint = corpus_fingerprint()
    try:
        meta = read_meta(out)
    except DataError:
        meta = {}
    wanted = {
        "format": _FORMAT,
        "source": "embedded",
        "vocab_size": vocab_size,
        "python_version": python_version(),
        "corpus_sha256": fingerprint,
    }
    if meta and all(meta.get(k) == v for k, v in wanted.items()):
        try:
            return open_dataset(out, vocab_size)
        except DataError:
            pass  # damaged cache: rebuild below
    train, val = embedded_documents()
    # the cache folder is qlab's own: rebuilding it replaces nothing of the user's
    return build_dataset(
        train, val, out, vocab_size, source="embedded", extra_meta={"corpus_sha256": fingerprint}, force=True
    )
