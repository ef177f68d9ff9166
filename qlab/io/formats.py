"""Low-level, validating readers for the file formats a checkpoint can come in.

Two ideas live here, both below the public API of :mod:`qlab.loaders.readers`:

* **safetensors** is parsed by hand (u64 little-endian header length, a JSON header
  mapping names to ``dtype`` / ``shape`` / ``data_offsets``, then raw little-endian
  data) so every corruption gets a clear :class:`CheckpointError`, and each tensor is
  read with a plain positioned read into a fresh buffer. No mapping of the file stays
  alive, so the resident set holds one tensor at a time however large the file is
  (a memory-mapped reader keeps every page it has touched resident until unmapped).
* **torch** files are loaded with ``weights_only=True`` (memory-mapped when the zip
  format allows it), wrappers like ``{"state_dict": ...}`` are unwrapped, and pages
  of the mapping can be handed back to the kernel once a tensor has been copied out.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import pickle
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from qlab.checks import is_int, parse_json
from qlab.errors import CheckpointError

__all__ = [
    "SAFETENSORS_DTYPES",
    "SafetensorsEntry",
    "read_safetensors_header",
    "read_safetensors_tensor",
    "load_torch_file",
    "release_pages",
    "normalize_tensor",
]

# Header sizes above this are refused (the reference implementation uses the same cap):
# a corrupt length field must not make us allocate gigabytes.
MAX_HEADER_BYTES = 100_000_000
# Tensors one file may hold: a 70B-parameter Llama has ~720, so this bounds the per-entry
# work a header of many tiny entries can ask for (every format's reader checks it).
MAX_TENSORS = 65_536

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _st, _attr in [
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),
]:
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_st] = getattr(torch, _attr)

_FP8 = {getattr(torch, a) for a in dir(torch) if a.startswith("float8_")}

# The dtypes a file may name ("float16", "torch.bfloat16"): a fixed table, so a hostile
# string never reaches getattr(torch, ...) (which would hand back any torch attribute).
DTYPES_BY_NAME: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
               torch.int16, torch.int8, torch.uint8, torch.bool)
}  # fmt: skip


def dtype_from_name(name: object, where: str) -> torch.dtype:
    """The torch dtype a file names; CheckpointError naming ``where`` for anything else."""
    dt = DTYPES_BY_NAME.get(name.removeprefix("torch.")) if isinstance(name, str) else None
    if dt is None:
        raise CheckpointError(f"{where}: unknown dtype {name!r} (known: {sorted(DTYPES_BY_NAME)})")
    return dt


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor's header record; ``begin``/``end`` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_safetensors_header(path: str | os.PathLike) -> list[SafetensorsEntry]:
    """Parse and validate a safetensors header; entries come back in storage order."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path}: truncated safetensors file ({size} bytes; the 8-byte header length is missing)"
                )
            n = int.from_bytes(prefix, "little")
            if n > size - 8:
                raise CheckpointError(
                    f"{path}: safetensors header length field says {n} bytes but the file has only "
                    f"{size - 8} bytes after it (truncated or not a safetensors file)"
                )
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: safetensors header of {n} bytes exceeds {MAX_HEADER_BYTES}")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from e
    header = parse_json(raw, f"{path}: safetensors header", CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object but {type(header).__name__}")
    data_start = 8 + n
    records = [(k, v) for k, v in header.items() if k != "__metadata__"]
    check_entry_count(len(records), str(path))
    entries = [_parse_entry(path, name, rec, data_start, size) for name, rec in records]
    entries.sort(key=lambda e: (e.begin, e.end))
    _check_no_overlap(path, entries)
    return entries


def check_entry_count(n: int, where: str) -> None:
    """CheckpointError when a file declares more than MAX_TENSORS entries."""
    if n > MAX_TENSORS:
        raise CheckpointError(f"{where}: {n:,} tensors, over qlab's limit of {MAX_TENSORS:,} per file")


def _parse_entry(path: Path, name: str, rec: object, data_start: int, size: int) -> SafetensorsEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(rec, dict) or not {"dtype", "shape", "data_offsets"} <= rec.keys():
        raise CheckpointError(f"{where}: header record must hold dtype, shape and data_offsets, got {rec!r}")
    dtype, shape, offs = rec["dtype"], rec["shape"], rec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{where}: unsupported dtype {dtype!r} (supported: {', '.join(sorted(SAFETENSORS_DTYPES))})"
        )
    if not isinstance(shape, list) or not all(is_int(d) and 0 <= d < 2**62 for d in shape) or len(shape) > 64:
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if math.prod(max(d, 1) for d in shape) >= 2**62:  # torch overflows computing numel
        raise CheckpointError(f"{where}: shape {shape!r} is too large")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(is_int(o) and o >= 0 for o in offs)
        or offs[0] > offs[1]
    ):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end], 0 <= begin <= end, got {offs!r}")
    entry = SafetensorsEntry(name, dtype, tuple(shape), data_start + offs[0], data_start + offs[1])
    expected = entry.numel * entry.torch_dtype.itemsize
    if entry.end - entry.begin != expected:
        raise CheckpointError(
            f"{where}: data_offsets span {entry.end - entry.begin} bytes, "
            f"but {dtype} {list(shape)} needs {expected}"
        )
    if entry.end > size:
        raise CheckpointError(
            f"{where}: data ends at byte {entry.end} but the file has {size} bytes (truncated file)"
        )
    return entry


def _check_no_overlap(path: Path, entries: list[SafetensorsEntry]) -> None:
    for a, b in zip(entries, entries[1:]):
        if b.begin < a.end and b.begin != b.end:
            raise CheckpointError(f"{path}: tensors {a.name!r} and {b.name!r} overlap in the data section")


def read_safetensors_tensor(f, entry: SafetensorsEntry, path: str | os.PathLike) -> torch.Tensor:
    """Read one tensor from the open binary file ``f`` into a new, owned CPU tensor.

    ``f`` is best opened unbuffered (``buffering=0``): the bytes then go straight from
    the kernel into the tensor, with no intermediate copy.
    """
    nbytes = entry.end - entry.begin
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = buf.numpy().data  # a writable memoryview of the tensor's bytes
    f.seek(entry.begin)
    got = 0
    while got < nbytes:  # one read() returns at most ~2 GiB on Linux
        n = f.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{path}: tensor {entry.name!r}: file ended after {got} of {nbytes} bytes")
        got += n
    t = buf.view(entry.torch_dtype).reshape(entry.shape)
    if sys.byteorder == "big":  # safetensors data is little-endian
        t = torch.from_numpy(t.numpy().byteswap())
    return t


def load_torch_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], bool]:
    """Load a torch checkpoint safely; returns (flat tensor dict, whether it is memory-mapped).

    ``weights_only=True`` refuses pickles that would run arbitrary code; that refusal is
    reported as a CheckpointError saying the file was refused as unsafe.
    """
    path = Path(path)
    mapped = zipfile.is_zipfile(path)  # mmap needs the zip format of torch >= 1.6
    return flatten_state(weights_only_load(path, str(path), mapped=mapped), path), mapped


def weights_only_load(source: str | os.PathLike | BinaryIO, where: str, mapped: bool = False) -> Any:
    """``torch.load(..., weights_only=True)`` of a file or stream: the one place qlab calls it.
    A refused global or a corrupt stream is a CheckpointError of one line (torch's own
    message runs to seven, and advises ``weights_only=False``, which qlab never repeats)."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(str(e))
        if _needs_code(reason):
            raise CheckpointError(
                f"{where}: refused as unsafe: loading it would need arbitrary code, which "
                f"weights_only=True forbids ({reason})"
            ) from None
        raise CheckpointError(f"{where}: not a readable torch checkpoint ({reason})") from None
    except Exception as e:  # torch raises many types on corrupt input; none should escape raw
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{where}: not a readable torch checkpoint ({type(e).__name__}: {first})"
        ) from None


def _unpickler_reason(msg: str) -> str:
    """The one informative line of torch's long weights-only error message."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error:" in ln:
            rest = ln.split("WeightsUnpickler error:", 1)[1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else ln)
    # torch >= 2.6 words it differently: the refused GLOBAL is on a line of its own, after
    # a paragraph that advises weights_only=False (advice qlab must not repeat).
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln or "unsupported" in ln:
            return ln
    return next(
        (ln for ln in lines if not ln.startswith("Weights only load failed")), lines[0] if lines else msg
    )


def _needs_code(reason: str) -> bool:
    # The restricted unpickler names the global/class/callable it refused to resolve;
    # other failures ("Unsupported operand …") mean the bytes are simply not a pickle.
    r = reason.lower()
    return any(w in r for w in ("global", "reduce", "class", "callable"))


# Keys under which training scripts nest the weights; the first present one is unwrapped.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "ema", "weights", "params")


def flatten_state(obj: object, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Unwrap ``{"model": {...}}``-style wrappers, then flatten nested dicts with dots.

    Non-tensor leaves (step counters, config strings) are dropped: they are not weights.
    """
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    out: dict[str, torch.Tensor] = {}
    try:
        _flatten_into(obj, "", out)
    except RecursionError:
        raise CheckpointError(f"{path}: the checkpoint's dicts are nested too deeply") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if not out:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors (keys: {list(obj)[:10]})")
    for name, t in out.items():
        if t.layout != torch.strided:  # sparse / nested tensors: not weights qlab can analyse
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported layout {t.layout}")
    return out


def _flatten_into(obj: Mapping, prefix: str, out: dict[str, torch.Tensor]) -> None:
    for k, v in obj.items():
        if not isinstance(k, (str, int)):
            raise CheckpointError(f"checkpoint key {k!r} under {prefix or 'the top level'!r} is not a string")
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            out[name] = v
        elif isinstance(v, Mapping):
            _flatten_into(v, name + ".", out)


def normalize_tensor(t: torch.Tensor, name: str, path: str | os.PathLike) -> torch.Tensor:
    """Refuse dtypes analysis cannot use; widen fp8 to float32 (few torch ops accept fp8)."""
    if t.is_complex():
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported complex dtype {t.dtype}")
    if t.is_quantized:
        raise CheckpointError(f"{path}: tensor {name!r} is a torch quantized tensor ({t.dtype}), unsupported")
    if t.dtype in _FP8:
        return t.to(torch.float32)
    return t


_libc = None


def release_pages(t: torch.Tensor) -> None:
    """Tell the kernel the pages under a *memory-mapped, read-only* tensor are not needed.

    Only call this on tensors backed by a private file mapping that nobody wrote to:
    the kernel drops the pages from the resident set and re-reads them from the file
    if they are touched again, so values stay correct while RSS stays bounded.
    """
    global _libc
    if not sys.platform.startswith("linux") or t.numel() == 0:
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = t.untyped_storage().data_ptr()
    end = start + t.untyped_storage().nbytes()
    lo = -(-start // page) * page  # whole pages only: neighbours' partial pages are left alone
    hi = (end // page) * page
    if hi > lo:
        _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED
