"""Parameter Golf token shards: a 1024-byte int32 header, then uint16 tokens.

Header (256 little-endian int32): [0] magic 20240520, [1] version 1, [2] token count n.
The file is exactly 1024 + 2n bytes. Reading returns a read-only ``np.memmap`` so that
multi-gigabyte shards cost no memory until touched.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qlab.errors import DataError
from qlab.io.atomic import atomic_write

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
_CHECK_CHUNK = 1 << 24  # tokens per vectorised range check (32 MB of uint16)


def write_shard(path: str | os.PathLike, tokens: np.ndarray | list[int]) -> Path:
    """Atomically write ``tokens`` as a shard; every token must fit in uint16."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise DataError(f"{path}: shard tokens must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: shard tokens must be integers, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 0xFFFF):
        raise DataError(
            f"{path}: token ids must lie in [0, 65535] to fit uint16, got range [{arr.min()}, {arr.max()}]"
        )
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, arr.size
    payload = arr.astype(TOKEN_DTYPE, copy=False)

    def write(f) -> None:
        f.write(header.tobytes())
        f.write(payload.tobytes())

    return atomic_write(path, write)


def read_shard_header(path: str | os.PathLike) -> int:
    """Validate a shard's header and file size; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: shard file not found")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{path}: truncated shard ({size} bytes, header alone needs {HEADER_BYTES})")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != MAGIC:
        raise DataError(f"{path}: bad shard magic {int(header[0])} (expected {MAGIC})")
    if int(header[1]) != VERSION:
        raise DataError(f"{path}: unsupported shard version {int(header[1])} (expected {VERSION})")
    n = int(header[2])
    if n < 0:
        raise DataError(f"{path}: negative token count {n} in shard header")
    expected = HEADER_BYTES + 2 * n
    if size != expected:
        kind = "truncated shard" if size < expected else "shard size mismatch"
        raise DataError(f"{path}: {kind}: header says {n} tokens ({expected} bytes), file has {size} bytes")
    return n


def read_shard(path: str | os.PathLike, vocab_size: int | None = None, mmap: bool = True) -> np.ndarray:
    """Return a shard's tokens as uint16 (a read-only memmap unless ``mmap=False``).

    With ``vocab_size`` every token is checked to be < vocab_size (chunked, vectorised).
    """
    path = Path(path)
    n = read_shard_header(path)
    tokens: np.ndarray
    if mmap and n > 0:
        tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n,))
    else:
        with open(path, "rb") as f:
            f.seek(HEADER_BYTES)
            tokens = np.fromfile(f, dtype=TOKEN_DTYPE, count=n)
    if vocab_size is not None:
        check_token_range(tokens, vocab_size, path)
    return tokens


def check_token_range(tokens: np.ndarray, vocab_size: int, name: str | os.PathLike) -> None:
    """Raise DataError naming ``name`` if any token id is ≥ ``vocab_size``."""
    if vocab_size <= 0:
        raise DataError(f"{name}: vocab_size must be positive, got {vocab_size}")
    for start in range(0, len(tokens), _CHECK_CHUNK):
        chunk = np.asarray(tokens[start : start + _CHECK_CHUNK])
        top = int(chunk.max())
        if top >= vocab_size:
            pos = start + int(np.argmax(chunk >= vocab_size))
            raise DataError(
                f"{name}: token id {int(tokens[pos])} at position {pos} is out of range "
                f"for vocab_size {vocab_size}"
            )
