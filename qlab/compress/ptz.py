"""Parameter Golf ``.ptz`` artifacts: brotli/lzma → optional ``BSHF`` unshuffle → torch.load.

The whole format in one place: the byte codec (the records write
``brotli11(BSHF(torch.save(obj)))``, lzma in some), :func:`ptz_tree` (a quantized state →
the ``{"w", "m"}`` tree PR #1394's own ``dequantize_mixed`` reads) and
:func:`decode_pg_tree` (any record's tree → tensors). Reading never unpickles arbitrary
objects: ``torch.load(..., weights_only=True)`` refuses any global outside torch's
allow-list, and that refusal becomes a :class:`CheckpointError`.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from qlab.compress.codecs import get_codec
from qlab.compress.shuffle import is_shuffled, unshuffle
from qlab.errors import ArtifactError, CheckpointError, ConfigError, QuantError
from qlab.io.atomic import atomic_write_bytes
from qlab.io.formats import check_entry_count, dtype_from_name, flatten_state, weights_only_load
from qlab.quant.policy import Passthrough
from qlab.quant.tensor import QuantizedTensor

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
    raw = unshuffle(raw) if is_shuffled(raw) else raw
    if raw.startswith(_ZIP_MAGIC):
        _check_zip(raw, where)
    return raw


def _check_zip(raw: bytes, where: str) -> None:
    """Bound a torch.save zip by its central directory before torch reads it: entries are
    inflated to their declared sizes, so a DEFLATE entry could otherwise take any amount."""
    try:
        infos = zipfile.ZipFile(io.BytesIO(raw)).infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, RecursionError) as exc:
        raise CheckpointError(f"{where}: not a readable torch.save zip ({exc})") from None
    check_entry_count(len(infos), where)
    total = sum(i.file_size for i in infos)
    if total > MAX_PTZ_RAW_BYTES:
        raise ArtifactError(
            f"{where}: zip entries declare {total:,} bytes, over the {MAX_PTZ_RAW_BYTES:,}-byte .ptz limit "
            "(a decompression bomb?)"
        )


def load_ptz_bytes(data: bytes, where: str = "<bytes>") -> Any:
    """Decode a ``.ptz`` blob into its object tree (tensors, dicts, lists, numbers, strings)."""
    return weights_only_load(io.BytesIO(decompress_ptz(data, where)), where)


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


# --------------------------------------------------------------------------- writing the tree
def ptz_tree(qstate: Mapping[str, Any]) -> dict[str, dict]:
    """Parameter Golf's ``{"w": tensors, "m": per-tensor info}`` tree of a quantized state.

    Symmetric per-row / per-tensor integer tensors become ``name.q`` + ``name.scale`` with
    the record's info string (``"gptq (int6)"``, ``"rtn (int8)"``); int8 passthroughs
    likewise; fp16/raw passthroughs and plain tensors are stored as is with an info string
    holding ``"passthrough"`` — so PR #1394's own ``dequantize_mixed`` reads the tree.
    Other schemes raise QuantError.
    """
    w: dict[str, torch.Tensor] = {}
    m: dict[str, Any] = {}
    for name, v in qstate.items():
        if isinstance(v, QuantizedTensor):
            if v.scheme != "int" or v.zero is not None or v.group_size is not None:
                raise QuantError(
                    f"tensor {name!r}: only symmetric per-row/per-tensor int codes fit a .ptz "
                    f"(got scheme {v.scheme!r}, zero={'yes' if v.zero is not None else 'no'}, "
                    f"group_size={v.group_size})"
                )
            w[name + ".q"], w[name + ".scale"] = v.codes, v.scale.reshape(-1)
            m[name] = f"{v.meta.get('method', 'rtn')} (int{v.bits})"
        elif isinstance(v, Passthrough) and v.kind.startswith("int8"):
            assert v.scale is not None  # every int8 passthrough kind carries its scale
            w[name + ".q"], w[name + ".scale"] = v.data, v.scale.reshape(-1)
            m[name] = "rtn (int8)"
        elif isinstance(v, Passthrough):
            w[name] = v.data
            m[name] = "passthrough (float16)" if v.kind == "fp16" else f"passthrough ({v.kind})"
        elif isinstance(v, torch.Tensor):
            w[name], m[name] = v, "passthrough"
        else:
            raise QuantError(f"tensor {name!r}: cannot export a {type(v).__name__} to .ptz")
    return {"w": w, "m": m}


# --------------------------------------------------------------------------- Parameter Golf trees
# The records torch.save one of two object trees into their .ptz artifacts:
#  * "int8_clean_per_row_v1" (baseline) / "mixed_intN_per_row_v1": {"__quant_format__",
#    "quantized": {name: int codes}, "scales": {name: per-row or scalar scale},
#    "dtypes", "passthrough": {name: tensor}, "passthrough_orig_dtypes"?, "qmeta"?};
#  * the int6 records: {"w": {name + ".q", name + ".scale", passthrough names},
#    "m": {name: "passthrough*" | {"type": "int5" | "int6" | "int8", ...}}}.
# Value = codes · scale, the scale broadcast over each row when it has a dimension.

_PG_PLAIN_KEYS = {"type", "bits", "scheme", "axis"}
# PR #1394 writes its per-tensor info as plain strings: "gptq (int6)", "passthrough (float16)".
_PG_ROW_SCALED = re.compile(r"^(gptq|rtn|int\d+|sdclip)\b.*$|^\w+ \(int\d+\)$")


def decode_pg_tree(obj: object, path: str | os.PathLike, raw_codes: bool) -> dict[str, torch.Tensor]:
    """Tensors of a .ptz object tree: Parameter Golf quantized formats or a plain state dict.

    Quantized entries come back dequantized to float32, or as their integer codes with
    ``raw_codes``; variants this reader does not know (LQER factors, grouped int4, …)
    are refused by name unless ``raw_codes`` is set.
    """
    if isinstance(obj, Mapping) and {"quantized", "scales", "passthrough"} <= obj.keys():
        return _decode_pg_clean(obj, path, raw_codes)
    if isinstance(obj, Mapping) and set(obj) == {"w", "m"}:
        w, m = _pg_table(obj, "w", path), _pg_table(obj, "m", path)
        return _decode_pg_mixed(w, m, path, raw_codes)
    return flatten_state(obj, path)


def _pg_table(obj: Mapping, field: str, path, values: type | None = None) -> Mapping:
    """``obj[field]``, checked to be a mapping with string keys (and ``values`` values):
    a tree of the right shape but the wrong types is a CheckpointError, not a traceback."""
    table = obj.get(field, {})
    if not isinstance(table, Mapping) or not all(isinstance(k, str) for k in table):
        raise CheckpointError(f"{path}: Parameter Golf field {field!r} must map tensor names to values")
    check_entry_count(len(table), f"{path}: field {field!r}")
    if values is not None:
        bad = next((k for k, v in table.items() if not isinstance(v, values)), None)
        if bad is not None:
            raise CheckpointError(
                f"{path}: {field}[{bad!r}] is a {type(table[bad]).__name__}, expected {values.__name__}"
            )
    return table


def _decode_pg_clean(obj: Mapping, path, raw_codes: bool) -> dict[str, torch.Tensor]:
    out = {}
    scales = _pg_table(obj, "scales", path, torch.Tensor)
    for name, q in _pg_table(obj, "quantized", path, torch.Tensor).items():
        if name not in scales:
            raise CheckpointError(f"{path}: Parameter Golf artifact lacks the scale of {name!r}")
        out[name] = q if raw_codes else _row_scaled(q, scales[name], name, path)
    orig = _pg_table(obj, "passthrough_orig_dtypes", path)
    for name, t in _pg_table(obj, "passthrough", path, torch.Tensor).items():
        out[name] = t.to(dtype_from_name(orig[name], f"{path}: {name}")) if name in orig else t
    return out


def _decode_pg_mixed(w: Mapping, meta: Mapping, path, raw_codes: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name, info in meta.items():
        if isinstance(info, str) and info.startswith("passthrough"):
            out[name] = _pg_get(w, name, path)
            continue
        q = _pg_get(w, name + ".q", path)
        if raw_codes:
            out[name] = q
        elif (isinstance(info, Mapping) and set(info) <= _PG_PLAIN_KEYS) or (
            isinstance(info, str) and _PG_ROW_SCALED.match(info)
        ):
            out[name] = _row_scaled(q, _pg_get(w, name + ".scale", path), name, path)
        else:
            raise CheckpointError(
                f"{path}: tensor {name!r} uses a Parameter Golf quantization variant this reader "
                f"cannot dequantize ({info!r}); read its codes with raw_codes=True"
            )
    return out


def _pg_get(w: Mapping, key: str, path) -> torch.Tensor:
    if key not in w or not isinstance(w[key], torch.Tensor):
        raise CheckpointError(f"{path}: Parameter Golf artifact lacks tensor {key!r}")
    return w[key]


def _row_scaled(q: torch.Tensor, s: torch.Tensor, name: str, path) -> torch.Tensor:
    if any(t.dtype.is_complex or t.dtype == torch.bool for t in (q, s)):
        raise CheckpointError(f"{path}: tensor {name!r}: codes {q.dtype} / scale {s.dtype} are not numbers")
    if s.ndim == 0 or s.numel() == 1:
        return q.float() * s.float().reshape(())
    if q.ndim == 0 or s.numel() != q.shape[0]:
        raise CheckpointError(
            f"{path}: tensor {name!r}: scale of shape {tuple(s.shape)} does not match the "
            f"{tuple(q.shape)[:1]} rows of its codes"
        )
    return q.float() * s.float().reshape(q.shape[0], *([1] * (q.ndim - 1)))
