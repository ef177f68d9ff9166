"""Parameter Golf ``.ptz`` artifacts: brotli/lzma → optional ``BSHF`` unshuffle → torch.load.

The records write ``brotli11(BSHF(torch.save(obj)))`` (lzma in some). Reading never
unpickles arbitrary objects: ``torch.load(..., weights_only=True)`` refuses any global
outside torch's allow-list, and that refusal becomes a :class:`CheckpointError`.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from qlab.compress.codecs import get_codec
from qlab.compress.shuffle import is_shuffled, unshuffle
from qlab.errors import ArtifactError, CheckpointError, ConfigError
from qlab.io.atomic import atomic_write_bytes

_XZ_MAGIC = b"\xfd7zXZ\x00"
# A .ptz states no size; the record's is ~40 MB raw, so 256 MiB bounds what a bomb can take.
MAX_PTZ_RAW_BYTES = 256 << 20
_ZIP_MAGIC = b"PK\x03\x04"


def decompress_ptz(data: bytes, where: str = "<bytes>") -> bytes:
    """Return the ``torch.save`` bytes inside a ``.ptz`` blob (codec detected, shuffle undone)."""
    if data.startswith(_XZ_MAGIC):
        try:
            raw = get_codec("lzma").decompress(data, max_output=MAX_PTZ_RAW_BYTES)
        except ArtifactError as exc:
            raise ArtifactError(f"{where}: {exc}") from exc
    elif data.startswith(_ZIP_MAGIC) or is_shuffled(data):
        raw = data  # stored uncompressed
    else:
        try:
            raw = get_codec("brotli").decompress(data, max_output=MAX_PTZ_RAW_BYTES)
        except ArtifactError as exc:
            if "limit" in str(exc):
                raise ArtifactError(f"{where}: {exc}") from exc
            raise ArtifactError(
                f"{where}: neither brotli, lzma nor an uncompressed torch.save stream"
            ) from exc
    return unshuffle(raw) if is_shuffled(raw) else raw


def load_ptz_bytes(data: bytes, where: str = "<bytes>") -> Any:
    """Decode a ``.ptz`` blob into its object tree (tensors, dicts, lists, numbers, strings)."""
    raw = decompress_ptz(data, where)
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{where}: refused to unpickle (not a weights-only object tree): {exc}"
        ) from exc
    except (RuntimeError, EOFError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{where}: not a readable torch.save stream ({exc})") from exc


def read_ptz(path: str | os.PathLike) -> Any:
    """Read a Parameter Golf ``.ptz`` file safely; returns the saved state dict / object tree."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read .ptz artifact ({exc.strerror})") from exc
    return load_ptz_bytes(data, str(path))


def ptz_bytes(obj: Any, codec: str = "brotli-11", shuffle: bool = True) -> bytes:
    """``codec(BSHF(torch.save(obj)))`` — the records' serialisation, in memory."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return get_codec(codec, shuffle=shuffle).compress(buf.getvalue())


def write_ptz(obj: Any, path: str | os.PathLike, codec: str = "brotli-11", shuffle: bool = True) -> Path:
    """Write ``obj`` as a ``.ptz`` artifact (atomic); returns the path."""
    if get_codec(codec).spec.split("-")[0] not in ("brotli", "lzma", "raw"):
        raise ConfigError(f"{path}: .ptz readers expect brotli or lzma, not {codec!r}")
    return atomic_write_bytes(path, ptz_bytes(obj, codec, shuffle))
