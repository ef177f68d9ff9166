"""qlab's own artifact format: named raw arrays + a JSON header, no pickle anywhere.

Layout (version 2, written)::

    b"QLAB" | version u16 LE | flags u16 LE | header length u64 LE | SHA-256 of the
    stored header (32 bytes) | header (brotli-11 compressed JSON when flags bit 0 is set,
    else UTF-8 JSON) | payload

Version 1 (still read) had no flags and no header hash: ``b"QLAB" | version u16 |
header length u64 | UTF-8 JSON | payload``, and stored every array's offset.

The payload is the concatenation of every array's raw little-endian bytes (each array
starting at an 8-byte aligned offset, in header order), then optionally byte-shuffled
and compressed with any codec of :mod:`qlab.compress.codecs`. The header lists, per
entry, its kind and JSON fields (``None`` fields are left out) and, per array, dtype,
shape and length in the *raw* payload (offsets follow from the order and the
alignment); it also carries the codec, the policy (once, not per tensor), user
``extra`` and the SHA-256 of both the stored and the raw payload. With the header hash
in the prefix, every byte of the file is covered: a tampered, truncated or
mis-described file is always caught.

Why compress the header: it is ~450 B of JSON per tensor (names, shapes, quantizer
meta), ~50 KB for the record model, ≈ 0.3 % of the 16 MB cap; brotli-11 brings that to
~1 KB, since the entries repeat the same keys and values.

Entries may be torch tensors, numpy arrays, :class:`qlab.quant.tensor.QuantizedTensor`
or :class:`qlab.quant.policy.Passthrough`; dataclasses are split into their tensor
fields (arrays) and other fields (JSON) by :func:`to_arrays` / :func:`from_arrays`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
import re
import struct
import sys
from pathlib import Path
from typing import Any

import brotli
import numpy as np
import torch

from qlab.checks import is_int, parse_json
from qlab.compress.codecs import get_codec
from qlab.compress.symbols import decode_symbols, encode_symbols
from qlab.errors import ArtifactError, ConfigError, QlabError
from qlab.io.atomic import atomic_write_bytes
from qlab.io.formats import MAX_TENSORS

MAGIC = b"QLAB"
VERSION = 2
READ_VERSIONS = (1, 2)
_PREFIX_V1 = struct.Struct("<4sHQ")
_PREFIX = struct.Struct("<4sHHQ32s")
FLAG_BROTLI_HEADER = 1
_KNOWN_FLAGS = FLAG_BROTLI_HEADER
_ALIGN = 8
# codec="ans": quantized codes coded symbol by symbol (qlab.compress.symbols), the rest
# of the payload pooled and compressed with REST_CODEC (+ byte shuffle).
SYMBOL_CODEC = "ans"
REST_CODEC = "brotli-11"
_SYMBOL_DTYPES = ("int8", "int16", "uint8")
# Only these classes are ever rebuilt from a file: the header names a kind, never a class.
_KINDS = {
    "quantized": ("qlab.quant.tensor", "QuantizedTensor"),
    "passthrough": ("qlab.quant.policy", "Passthrough"),
}
_TORCH_DTYPES = {
    str(d).replace("torch.", ""): d
    for d in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    )
}


def _kind_of(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, np.ndarray):
        return "ndarray"
    for kind, (module, cls) in _KINDS.items():
        if type(value).__name__ == cls and type(value).__module__ == module:
            return kind
    raise ConfigError(
        f"artifact entry of type {type(value).__name__} is not storable "
        "(expected Tensor, ndarray, QuantizedTensor or Passthrough)"
    )


def to_arrays(value: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Split an entry into ``(kind, {role: array}, json_fields)``."""
    kind = _kind_of(value)
    if kind in ("tensor", "ndarray"):
        return kind, {"data": value}, {}
    arrays, fields = {}, {}
    for f in dataclasses.fields(value):
        v = getattr(value, f.name)
        if isinstance(v, (torch.Tensor, np.ndarray)):
            arrays[f.name] = v
        elif v is None:
            continue  # from_arrays restores absent fields as None
        else:
            fields[f.name] = list(v) if isinstance(v, tuple) else v
            if isinstance(v, tuple):
                fields.setdefault("__tuples__", []).append(f.name)
    return kind, arrays, fields


def from_arrays(kind: str, arrays: dict[str, Any], fields: dict[str, Any], where: str) -> Any:
    """Rebuild an entry written by :func:`to_arrays` (only registered kinds)."""
    if kind in ("tensor", "ndarray"):
        if "data" not in arrays:
            raise ArtifactError(f"{where}: a {kind} entry needs its 'data' array")
        return arrays["data"]
    if kind not in _KINDS:
        raise ArtifactError(f"{where}: unknown entry kind {kind!r}")
    module, cls_name = _KINDS[kind]
    cls = getattr(importlib.import_module(module), cls_name)
    fields = dict(fields)
    tuples = fields.pop("__tuples__", [])
    if not isinstance(tuples, list) or not all(
        isinstance(n, str) and isinstance(fields.get(n), list) for n in tuples
    ):
        raise ArtifactError(f"{where}: field '__tuples__' must name list-valued fields")
    for name in tuples:
        fields[name] = tuple(fields[name])
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in {**fields, **arrays}.items() if k in names}
    for name in names - kwargs.keys():
        kwargs[name] = None  # optional tensor fields that were None are simply absent
    try:
        obj = cls(**kwargs)
        validate = getattr(obj, "validate", None)
        if validate is not None:
            validate()  # the class checks its own fields (types, ranges, sizes)
        return obj
    except TypeError as exc:
        raise ArtifactError(f"{where}: cannot rebuild {cls_name} ({exc})") from exc
    except QlabError as exc:
        raise ArtifactError(f"{where}: {exc}") from None


def _array_bytes(a: Any) -> tuple[str, list[int], bytes]:
    if isinstance(a, torch.Tensor):
        t = a.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return str(t.dtype).replace("torch.", ""), list(t.shape), raw
    arr = np.ascontiguousarray(a)
    arr = arr.astype(arr.dtype.newbyteorder("<")) if arr.dtype.byteorder == ">" else arr
    return "np:" + arr.dtype.str, list(arr.shape), arr.tobytes()


def _array_from(dtype: str, shape: list[int], raw: bytes, where: str) -> Any:
    if dtype.startswith("np:"):
        try:
            np_dtype = np.dtype(dtype[3:])
        except TypeError as exc:
            raise ArtifactError(f"{where}: unknown numpy dtype {dtype!r}") from exc
        if np_dtype.hasobject:
            raise ArtifactError(f"{where}: object arrays are not allowed")
        _check_len(raw, shape, np_dtype.itemsize, where)
        return np.frombuffer(raw, dtype=np_dtype).reshape(shape).copy()
    if dtype not in _TORCH_DTYPES:
        raise ArtifactError(f"{where}: unknown dtype {dtype!r}")
    torch_dtype = _TORCH_DTYPES[dtype]
    _check_len(raw, shape, torch.empty(0, dtype=torch_dtype).element_size(), where)
    if not raw:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch_dtype).reshape(shape)


def _check_len(raw: bytes, shape: list[int], itemsize: int, where: str) -> None:
    want = int(np.prod(shape, dtype=np.int64)) * itemsize
    if len(raw) != want:
        raise ArtifactError(f"{where}: {len(raw)} bytes, but shape {shape} needs {want}")


def encode_artifact(
    tensors: dict[str, Any],
    *,
    policy: Any = None,
    codec: str = "brotli-11",
    shuffle: bool = True,
    extra: dict | None = None,
    compress_header: bool = True,
) -> bytes:
    """The bytes :func:`write_artifact` writes (useful for in-memory size accounting)."""
    if sys.byteorder != "little":
        raise ArtifactError("qlab artifacts are written on little-endian hosts only")
    entries, chunks, symbol_arrays, offset = [], [], [], 0
    for name, value in tensors.items():
        kind, arrays, fields = to_arrays(value)
        described = {}
        for role, a in arrays.items():
            dtype, shape, raw = _array_bytes(a)
            pad = (-offset) % _ALIGN
            chunks.append(b"\0" * pad + raw)
            if _symbol_coded(kind, role, dtype):
                symbol_arrays.append((str(name), a, offset + pad, len(raw)))
            offset += pad + len(raw)
            described[role] = {"dtype": dtype, "shape": shape, "length": len(raw)}
        entries.append({"name": str(name), "kind": kind, "fields": fields, "arrays": described})
    raw_payload = b"".join(chunks)
    if dataclasses.is_dataclass(policy) and not isinstance(policy, type):
        policy = dataclasses.asdict(policy)
    if codec == SYMBOL_CODEC:
        rest = get_codec(REST_CODEC, shuffle=shuffle)
        payload, symbols = _encode_symbol_payload(raw_payload, symbol_arrays, rest)
        spec, layout = SYMBOL_CODEC, {"symbols": symbols}
    else:
        c = get_codec(codec, shuffle=shuffle)
        payload, spec, layout = c.compress(raw_payload), c.spec, {}
    header = {
        "format": "qlab-artifact",
        "version": VERSION,
        "codec": spec,
        **layout,
        "policy": policy,
        "extra": extra or {},
        "tensors": entries,
        "raw_length": len(raw_payload),
        "payload_length": len(payload),
        "raw_sha256": hashlib.sha256(raw_payload).hexdigest(),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    try:
        # Insertion order, not sort_keys: the order of each entry's arrays is the layout order.
        head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"artifact header (policy/extra/fields) is not JSON-serialisable: {exc}") from exc
    flags = FLAG_BROTLI_HEADER if compress_header else 0
    if compress_header:
        head = brotli.compress(head, quality=11)
    prefix = _PREFIX.pack(MAGIC, VERSION, flags, len(head), hashlib.sha256(head).digest())
    return prefix + head + payload


def _symbol_coded(kind: str, role: str, dtype: str) -> bool:
    return kind == "quantized" and role == "codes" and dtype in _SYMBOL_DTYPES


def role_key(name: str) -> str:
    """A tensor's role across layers (``blocks.3.attn.c_k.weight`` → ``blocks.#.attn.c_k.weight``):
    the previous tensor of the same role seeds the symbol coder's model."""
    return re.sub(r"\d+", "#", name)


def _encode_symbol_payload(
    raw: bytes, coded: list[tuple[str, Any, int, int]], rest_codec: Any
) -> tuple[bytes, dict]:
    """Payload of the ``ans`` layout: each code array's symbol stream, then the remaining
    raw bytes (scales, passthrough tensors, padding) compressed together."""
    streams, lengths, pieces, pos = [], [], [], 0
    previous: dict[str, np.ndarray] = {}
    for name, a, start, length in coded:
        codes = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        stream = encode_symbols(codes, context=previous.get(role_key(name)))
        previous[role_key(name)] = codes
        streams.append(stream)
        lengths.append([name, len(stream)])
        pieces.append(raw[pos:start])
        pos = start + length
    pieces.append(raw[pos:])
    rest = rest_codec.compress(b"".join(pieces))
    return b"".join(streams) + rest, {
        "streams": lengths,
        "rest_codec": rest_codec.spec,
        "rest_length": len(rest),
    }


def write_artifact(
    path: str | os.PathLike,
    tensors: dict[str, Any],
    *,
    policy: Any = None,
    codec: str = "brotli-11",
    shuffle: bool = True,
    extra: dict | None = None,
) -> Path:
    """Write ``tensors`` atomically as a qlab artifact; returns the path."""
    data = encode_artifact(tensors, policy=policy, codec=codec, shuffle=shuffle, extra=extra)
    return atomic_write_bytes(path, data)


def read_artifact(path: str | os.PathLike) -> tuple[dict[str, Any], dict]:
    """Read and verify an artifact; returns ``(entries by name, header)``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read artifact ({exc.strerror})") from exc
    return decode_artifact(data, where=str(path))


MAX_RAW_BYTES = 1 << 30  # 1 GiB of raw tensors: ~25x the record model's
MAX_HEADER_BYTES = 64 << 20


def decode_artifact(data: bytes, where: str = "<bytes>") -> tuple[dict[str, Any], dict]:
    """Parse and verify artifact bytes (see :func:`read_artifact`)."""
    header, payload, layout_end = _split(data, where)
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise ArtifactError(f"{where}: payload SHA-256 mismatch (file corrupted or tampered with)")
    declared = header.get("raw_length")
    if isinstance(declared, bool) or not isinstance(declared, int) or not 0 <= declared <= MAX_RAW_BYTES:
        raise ArtifactError(f"{where}: header field 'raw_length' must be an int in [0, {MAX_RAW_BYTES:,}]")
    if layout_end is not None and layout_end != declared:  # before a byte is decoded
        raise ArtifactError(f"{where}: header arrays end at byte {layout_end}, 'raw_length' says {declared}")
    raw = _decode_payload(header, payload, declared, where)
    if len(raw) != header.get("raw_length") or hashlib.sha256(raw).hexdigest() != header.get("raw_sha256"):
        raise ArtifactError(f"{where}: decompressed payload does not match its recorded length/SHA-256")
    out = {}
    for entry in _entries(header, where):
        name = entry["name"]
        arrays = {}
        for role, spec in entry["arrays"].items():
            lo, n = int(spec["offset"]), int(spec["length"])
            if lo < 0 or n < 0 or lo + n > len(raw):
                raise ArtifactError(
                    f"{where}: tensor {name!r}/{role} range [{lo}, {lo + n}) is outside "
                    f"the {len(raw)}-byte payload"
                )
            arrays[role] = _array_from(
                spec["dtype"], spec["shape"], raw[lo : lo + n], f"{where}: {name}/{role}"
            )
        out[name] = from_arrays(entry["kind"], arrays, entry.get("fields", {}), f"{where}: {name}")
    if layout_end is not None and layout_end != len(raw):
        raise ArtifactError(
            f"{where}: header arrays end at byte {layout_end}, the raw payload has {len(raw)}"
        )
    return out, header


def artifact_header(data: bytes, where: str = "<bytes>") -> dict:
    """The verified header of artifact bytes, without decoding the payload."""
    return _split(data, where)[0]


def _decode_payload(header: dict, payload: bytes, declared: int, where: str) -> bytes:
    """The raw payload: decompressed (never past ``declared`` bytes: a bomb stops there)."""
    codec = header.get("codec")
    if "symbols" not in header:
        return _codec(codec, where).decompress(payload, max_output=declared) if codec else payload
    layout = header["symbols"]
    try:
        streams = [(str(n), int(k)) for n, k in layout["streams"]]
        rest_codec, rest_length = _codec(layout["rest_codec"], where), int(layout["rest_length"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{where}: header field 'symbols' is malformed ({exc})") from exc
    total = sum(k for _, k in streams) + rest_length
    if any(k < 0 for _, k in streams) or rest_length < 0 or total != len(payload):
        raise ArtifactError(
            f"{where}: symbol stream lengths do not add up to the {len(payload)}-byte payload"
        )
    specs = {e["name"]: e["arrays"].get("codes") for e in _entries(header, where)}
    raw, filled, pos = bytearray(declared), [], 0
    previous: dict[str, np.ndarray] = {}
    for name, k in streams:
        spec = specs.get(name)
        if spec is None or spec["offset"] + spec["length"] > declared:
            raise ArtifactError(f"{where}: symbol stream for {name!r} names no code array inside the payload")
        try:
            stream, context = payload[pos : pos + k], previous.get(role_key(name))
            codes = decode_symbols(stream, max_symbols=spec["length"], context=context)
        except ArtifactError as exc:
            raise ArtifactError(f"{where}: {name}/codes: {exc}") from None
        if str(codes.dtype) != spec["dtype"] or list(codes.shape) != spec["shape"]:
            raise ArtifactError(
                f"{where}: {name}/codes: stream holds {codes.dtype} {list(codes.shape)}, "
                f"header says {spec['dtype']} {spec['shape']}"
            )
        previous[role_key(name)] = codes
        raw[spec["offset"] : spec["offset"] + spec["length"]] = codes.tobytes()
        filled.append((spec["offset"], spec["length"]))
        pos += k
    rest = rest_codec.decompress(payload[pos:], max_output=declared)
    _fill_rest(raw, sorted(filled), rest, where)
    return bytes(raw)


def _codec(spec: Any, where: str) -> Any:
    try:
        return get_codec(spec)
    except ConfigError as exc:
        raise ArtifactError(f"{where}: header names an unknown codec ({exc})") from None


def _fill_rest(raw: bytearray, filled: list[tuple[int, int]], rest: bytes, where: str) -> None:
    """Put the pooled bytes back into the gaps the code arrays leave."""
    pos, cursor = 0, 0
    for start, length in [*filled, (len(raw), 0)]:
        if start < cursor:
            raise ArtifactError(f"{where}: symbol-coded arrays overlap")
        gap = start - cursor
        if pos + gap > len(rest):
            raise ArtifactError(f"{where}: pooled payload is shorter than the arrays it must fill")
        raw[cursor:start] = rest[pos : pos + gap]
        pos, cursor = pos + gap, start + length
    if pos != len(rest):
        raise ArtifactError(f"{where}: pooled payload has {len(rest) - pos} bytes no array claims")


def _split(data: bytes, where: str) -> tuple[dict, bytes, int | None]:
    """(header with every array's offset, stored payload, end of the derived layout (v2))."""
    if len(data) < _PREFIX_V1.size:
        raise ArtifactError(
            f"{where}: truncated ({len(data)} bytes, shorter than the {_PREFIX_V1.size}-byte prefix)"
        )
    magic, version = struct.unpack_from("<4sH", data)
    if magic != MAGIC:
        raise ArtifactError(f"{where}: bad magic {magic!r} (expected {MAGIC!r}; not a qlab artifact)")
    if version not in READ_VERSIONS:
        raise ArtifactError(
            f"{where}: unsupported artifact version {version} (expected one of {READ_VERSIONS})"
        )
    head, end = _read_header_v1(data, where) if version == 1 else _read_header_v2(data, where)
    header = parse_json(head, f"{where}: header", ArtifactError)
    if not isinstance(header, dict) or header.get("format") != "qlab-artifact":
        raise ArtifactError(f"{where}: header is not a qlab-artifact header")
    if not isinstance(header.get("extra", {}), dict):
        raise ArtifactError(f"{where}: header field 'extra' must be an object")
    payload = data[end:]
    if len(payload) != header.get("payload_length"):
        raise ArtifactError(
            f"{where}: payload is {len(payload)} bytes, header says "
            f"{header.get('payload_length')} (truncated or padded file)"
        )
    layout_end = _assign_offsets(header, where) if version >= 2 else None
    return header, payload, layout_end


def _header_slice(data: bytes, start: int, head_len: int, where: str) -> tuple[bytes, int]:
    end = start + head_len
    if end > len(data):
        raise ArtifactError(
            f"{where}: truncated header (needs {head_len} bytes, file has {len(data) - start})"
        )
    return data[start:end], end


def _read_header_v1(data: bytes, where: str) -> tuple[bytes, int]:
    _, _, head_len = _PREFIX_V1.unpack_from(data)
    return _header_slice(data, _PREFIX_V1.size, head_len, where)


def _read_header_v2(data: bytes, where: str) -> tuple[bytes, int]:
    """The header JSON bytes (verified against the prefix's SHA-256, decompressed) and its end."""
    if len(data) < _PREFIX.size:
        raise ArtifactError(
            f"{where}: truncated header ({len(data)} bytes, shorter than the {_PREFIX.size}-byte prefix)"
        )
    _, _, flags, head_len, digest = _PREFIX.unpack_from(data)
    if flags & ~_KNOWN_FLAGS:
        raise ArtifactError(f"{where}: unknown header flags {flags:#06x} (known: {_KNOWN_FLAGS:#06x})")
    head, end = _header_slice(data, _PREFIX.size, head_len, where)
    if hashlib.sha256(head).digest() != digest:
        raise ArtifactError(f"{where}: header SHA-256 mismatch (file corrupted or tampered with)")
    if flags & FLAG_BROTLI_HEADER:
        try:
            head = get_codec("brotli").decompress(head, max_output=MAX_HEADER_BYTES)
        except ArtifactError as exc:
            raise ArtifactError(f"{where}: compressed header does not decompress ({exc})") from exc
    return head, end


def _assign_offsets(header: dict, where: str) -> int:
    """Version 2 stores no offsets: each array starts at the next 8-byte boundary, in order."""
    offset = 0
    for e in _entries(header, where, need_offset=False):
        for spec in e["arrays"].values():
            n = spec["length"]
            if not isinstance(n, int) or n < 0:
                raise ArtifactError(f"{where}: tensor {e['name']!r} has a bad array length {n!r}")
            offset += (-offset) % _ALIGN
            spec["offset"] = offset
            offset += n
    return offset


def _entries(header: dict, where: str, need_offset: bool = True) -> list[dict]:
    entries = header.get("tensors")
    if not isinstance(entries, list):
        raise ArtifactError(f"{where}: header 'tensors' list is malformed")
    if len(entries) > MAX_TENSORS:
        raise ArtifactError(
            f"{where}: {len(entries):,} tensors, over qlab's limit of {MAX_TENSORS:,} per file"
        )
    ok = all(
        isinstance(e, dict) and {"name", "kind", "arrays"} <= e.keys() and isinstance(e["arrays"], dict)
        for e in entries
    )
    if not ok:
        raise ArtifactError(f"{where}: header 'tensors' list is malformed")
    keys = {"dtype", "shape", "length"} | ({"offset"} if need_offset else set())
    names = set()
    for e in entries:
        if not isinstance(e["name"], str) or not isinstance(e["kind"], str) or e["name"] in names:
            raise ArtifactError(
                f"{where}: tensor names and kinds must be strings, names unique ({e['name']!r})"
            )
        names.add(e["name"])
        if not isinstance(e.get("fields", {}), dict):
            raise ArtifactError(f"{where}: tensor {e['name']!r}: 'fields' must be an object")
        for role, spec in e["arrays"].items():
            if not isinstance(spec, dict) or not keys <= spec.keys():
                raise ArtifactError(f"{where}: tensor {e['name']!r}/{role} lacks {'/'.join(sorted(keys))}")
            shape = spec["shape"]
            ints = [spec["length"]] + ([spec["offset"]] if need_offset else [])
            if (
                not isinstance(spec["dtype"], str)
                or not isinstance(shape, list)
                or len(shape) > 64
                or not all(is_int(d) and 0 <= d < 2**62 for d in shape)
                or math.prod(max(d, 1) for d in shape) >= 2**62
                or not all(is_int(n) and 0 <= n < 2**62 for n in ints)
            ):
                raise ArtifactError(
                    f"{where}: tensor {e['name']!r}/{role}: malformed dtype, shape, offset or length"
                )
    return entries
