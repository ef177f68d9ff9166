"""Open a tokenized dataset directory (qlab's layout or Parameter Golf's).

qlab layout: ``tokenizer.model``, ``train_%06d.bin``, ``val_%06d.bin``, ``meta.json``.
Parameter Golf layout: ``datasets/fineweb10B_sp{V}/fineweb_{train,val}_%06d.bin`` and
``tokenizers/fineweb_{V}_bpe.model``, given the root or the ``fineweb10B_sp{V}`` folder.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlab.checks import parse_json
from qlab.data.shards import read_shard_header
from qlab.data.tokenizer import load_tokenizer
from qlab.errors import DataError

META_NAME = "meta.json"
TOKENIZER_NAME = "tokenizer.model"
_PG_DIR = re.compile(r"fineweb10B_sp(\d+)$")
MAX_VOCAB = 65_536  # shards hold uint16 token ids


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


def open_dataset(path: str | os.PathLike, vocab_size: int | None = None, verify: bool = False) -> DatasetInfo:
    """Locate shards and tokenizer under ``path``; validate headers, vocab, tokenizer and the
    manifest (shard names and sizes; with ``verify`` also their SHA-256)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: dataset directory not found")
    if (path / TOKENIZER_NAME).exists() or any(path.glob("train_*.bin")) or any(path.glob("val_*.bin")):
        return _open_qlab(path, vocab_size, verify)
    return _open_parameter_golf(path, vocab_size)


def read_meta(root: Path) -> dict[str, Any]:
    """meta.json of a qlab dataset, or {} when absent; DataError when unreadable."""
    meta_path = root / META_NAME
    if not meta_path.exists():
        return {}
    try:
        text = meta_path.read_bytes()
    except OSError as exc:
        raise DataError(f"{meta_path}: unreadable dataset metadata ({exc.strerror})") from exc
    meta = parse_json(text, f"{meta_path}: dataset metadata", DataError)
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: expected a JSON object")
    return meta


def shard_manifest(root: Path) -> dict[str, dict[str, Any]]:
    """{shard file name: {"bytes", "sha256"}} of every train/val shard under ``root``."""
    out = {}
    for p in sorted([*root.glob("train_*.bin"), *root.glob("val_*.bin")]):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[p.name] = {"bytes": p.stat().st_size, "sha256": h.hexdigest()}
    return out


def _check_manifest(root: Path, meta: dict[str, Any], files: list[Path], verify: bool) -> None:
    """The shards on disk are exactly the manifest's, with its sizes (and checksums)."""
    manifest = meta.get("shards")
    if manifest is None:
        return  # datasets built before manifests: nothing to compare
    if not isinstance(manifest, dict) or not all(isinstance(v, dict) for v in manifest.values()):
        raise DataError(f"{root / META_NAME}: field 'shards' must map shard names to {{bytes, sha256}}")
    on_disk = {p.name for p in files}
    missing, extra = sorted(set(manifest) - on_disk), sorted(on_disk - set(manifest))
    if missing or extra:
        raise DataError(f"{root}: shards differ from the manifest: missing {missing[:4]}, extra {extra[:4]}")
    for p in files:
        want = manifest[p.name]
        if p.stat().st_size != want.get("bytes"):
            raise DataError(f"{p}: {p.stat().st_size} bytes, the manifest says {want.get('bytes')!r}")
    if verify:
        now = shard_manifest(root)
        bad = [n for n in manifest if now[n]["sha256"] != manifest[n].get("sha256")]
        if bad:
            raise DataError(f"{root}: shard checksums differ from the manifest: {bad[:4]}")


def _open_qlab(root: Path, vocab_size: int | None, verify: bool = False) -> DatasetInfo:
    if not (root / META_NAME).exists():
        raise DataError(
            f"{root}: no {META_NAME}: an incomplete build (killed before it finished?) or not a "
            "qlab dataset; rebuild it with `qlab data build` / `qlab data embedded`"
        )
    meta = read_meta(root)
    declared = meta.get("vocab_size")
    if isinstance(declared, bool) or not isinstance(declared, int) or not 2 <= declared <= MAX_VOCAB:
        where = root / META_NAME
        raise DataError(f"{where}: field 'vocab_size' must be an int in [2, {MAX_VOCAB}]: {declared!r}")
    train, val = sorted(root.glob("train_*.bin")), sorted(root.glob("val_*.bin"))
    _check_manifest(root, meta, [*train, *val], verify)
    return _finish(root, train, val, root / TOKENIZER_NAME, vocab_size, declared, meta)


def _pg_vocab(path: Path) -> int:
    # only called on names _PG_DIR has matched
    match = _PG_DIR.search(path.name)
    assert match is not None, path
    return int(match.group(1))


def _open_parameter_golf(path: Path, vocab_size: int | None) -> DatasetInfo:
    if _PG_DIR.search(path.name):
        data_dir = path
    else:
        search = path / "datasets" if (path / "datasets").is_dir() else path
        found = sorted(p for p in search.glob("fineweb10B_sp*") if p.is_dir() and _PG_DIR.search(p.name))
        if vocab_size is not None:
            found = [p for p in found if _pg_vocab(p) == vocab_size]
        if not found:
            raise DataError(
                f"{path}: no dataset found (expected tokenizer.model + train_/val_*.bin, or "
                f"datasets/fineweb10B_sp{{V}}/ with tokenizers/fineweb_{{V}}_bpe.model)"
            )
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DataError(f"{path}: several datasets ({names}); pass vocab_size to pick one")
        data_dir = found[0]
    v = _pg_vocab(data_dir)
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
    pieces = load_tokenizer(tok).vocab_size()
    if declared is not None and pieces != int(declared):
        # A truncated or foreign tokenizer still loads (e.g. as a 5-piece model) and its
        # byte tables would silently give bpb in the thousands.
        raise DataError(f"{tok}: the tokenizer has {pieces} pieces, the dataset's vocab_size is {declared}")
    declared = pieces if declared is None else declared
    for p in (*train, *val):
        read_shard_header(p)
    return DatasetInfo(root, tuple(train), tuple(val), tok, int(vocab_size or declared), meta)
