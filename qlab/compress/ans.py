"""Order-0 entropy coding of integer code tensors with rANS (``constriction``).

Stream layout (all integers LEB128 varints unless noted)::

    b"QANS" | version u8 | dtype id u8 | ndim | shape… | zigzag(lo) | m | used bitmap
           | counts of used symbols | n_words | words (u32 LE)

The model is the tensor's own histogram over ``lo .. lo+m-1``: a bitmap of the symbols
that occur plus their exact counts (varints, ~2 bytes per used symbol). Decoder and
encoder rebuild the same ``Categorical`` from those counts, so the coded size is the
order-0 entropy plus the table and at most a couple of 32-bit words: within 0.1 % of
n·H0 for tensors of 100k symbols and more. Exact counts (rather than coarsely
quantised ones) cost a few dozen bytes and remove the KL penalty of a rounded model.
"""

from __future__ import annotations

import math

import constriction
import numpy as np

from qlab.errors import ArtifactError, QuantError

MAGIC = b"QANS"
VERSION = 1
_DTYPES: dict[int, np.dtype] = {1: np.dtype(np.int8), 2: np.dtype(np.int16), 3: np.dtype(np.uint8)}
_DTYPE_IDS = {v: k for k, v in _DTYPES.items()}


_COUNT_CHUNK = 1 << 20


def chunked_bincount(values: np.ndarray, m: int) -> np.ndarray:
    """``np.bincount(values, minlength=m)`` in slices: bincount widens its input to int64,
    which for one huge segment would be the decoder's largest allocation."""
    flat = values.reshape(-1)
    counts = np.zeros(m, dtype=np.int64)
    for i in range(0, flat.size, _COUNT_CHUNK):
        counts += np.bincount(flat[i : i + _COUNT_CHUNK], minlength=m)[:m]
    return counts


def _categorical(counts: np.ndarray):
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def _put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError("varint must be non-negative")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


class _Reader:
    """Cursor over a byte string that raises ArtifactError on truncation."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ArtifactError(f"{self.what}: stream truncated at byte {self.pos} (needed {n} more)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise ArtifactError(f"{self.what}: malformed varint at byte {self.pos}")


def _zigzag(v: int) -> int:
    return 2 * v if v >= 0 else -2 * v - 1


def _unzigzag(z: int) -> int:
    return z // 2 if z % 2 == 0 else -(z + 1) // 2


def write_prelude(out: bytearray, magic: bytes, version: int, codes: np.ndarray, what: str) -> None:
    """``magic | version u8 | dtype id u8 | ndim | shape…``: how each code stream starts."""
    if codes.dtype not in _DTYPE_IDS:
        raise QuantError(f"{what}: codes must be int8, int16 or uint8, got {codes.dtype}")
    out += magic + bytes([version, _DTYPE_IDS[codes.dtype], codes.ndim])
    for dim in codes.shape:
        _put_varint(out, dim)


def read_prelude(r: _Reader, magic: bytes, version: int) -> tuple[np.dtype, tuple[int, ...]]:
    """Check magic and version of a stream written by :func:`write_prelude`; (dtype, shape)."""
    if r.take(len(magic)) != magic:
        raise ArtifactError(f"{r.what}: bad magic (expected {magic!r})")
    got, dtype_id, ndim = r.take(3)
    if got != version:
        raise ArtifactError(f"{r.what}: unsupported version {got} (expected {version})")
    if dtype_id not in _DTYPES:
        raise ArtifactError(f"{r.what}: unknown dtype id {dtype_id}")
    return _DTYPES[dtype_id], tuple(r.varint() for _ in range(ndim))


def ans_encode(codes: np.ndarray) -> bytes:
    """Entropy-code an int8/int16/uint8 array with its own order-0 model; shape kept."""
    codes = np.asarray(codes)
    out = bytearray()
    write_prelude(out, MAGIC, VERSION, codes, "ans_encode")
    flat = codes.reshape(-1).astype(np.int32)
    if flat.size == 0:
        return bytes(out)
    lo = int(flat.min())
    sym = flat - lo
    counts = np.bincount(sym)
    _put_varint(out, _zigzag(lo))
    _put_varint(out, counts.size)
    out += np.packbits(counts > 0, bitorder="little").tobytes()
    for c in counts[counts > 0].tolist():
        _put_varint(out, c)
    words = _encode_symbols(sym, counts)
    _put_varint(out, words.size)
    out += words.astype("<u4").tobytes()
    return bytes(out)


def _encode_symbols(sym: np.ndarray, counts: np.ndarray) -> np.ndarray:
    if counts.size == 1:  # a constant tensor carries no information beyond its table
        return np.zeros(0, dtype=np.uint32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(np.ascontiguousarray(sym, dtype=np.int32), _categorical(counts))
    return coder.get_compressed()


def ans_decode(data: bytes, max_symbols: int | None = None) -> np.ndarray:
    """Invert :func:`ans_encode` exactly (same values, dtype and shape); a stream declaring
    more than ``max_symbols`` symbols is refused before anything is allocated."""
    r = _Reader(data, "ans stream")
    dtype, shape = read_prelude(r, MAGIC, VERSION)
    n = math.prod(shape)
    if max_symbols is not None and n > max_symbols:
        raise ArtifactError(
            f"ans stream: shape {shape} declares more than the {max_symbols:,} symbols allowed"
        )
    if n == 0:
        if r.pos != len(data):  # an empty tensor is its prelude alone
            raise ArtifactError(f"ans stream: {len(data) - r.pos} bytes after an empty shape {shape}")
        return np.zeros(shape, dtype=dtype)
    lo = _unzigzag(r.varint())
    m = r.varint()
    used = np.unpackbits(np.frombuffer(r.take((m + 7) // 8), np.uint8), count=m, bitorder="little")
    counts = np.zeros(m, dtype=np.int64)
    counts[used.astype(bool)] = [r.varint() for _ in range(int(used.sum()))]
    if m == 0 or int(counts.sum()) != n:
        raise ArtifactError(f"ans stream: frequency table sums to {int(counts.sum())}, expected {n}")
    n_words = r.varint()
    words = np.frombuffer(r.take(4 * n_words), dtype="<u4").astype(np.uint32)
    if r.pos != len(data):
        raise ArtifactError(f"ans stream: {len(data) - r.pos} trailing bytes after the payload")
    sym = _decode_symbols(words, counts, n)
    info = np.iinfo(dtype)
    if lo < info.min or lo + m - 1 > info.max:
        raise ArtifactError(f"ans stream: symbol range [{lo}, {lo + m - 1}] does not fit {dtype}")
    sym += lo  # int32 in place: symbols and lo both fit the int16 range
    return sym.astype(dtype).reshape(shape)


def _decode_symbols(words: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
    if counts.size == 1:
        if words.size:
            raise ArtifactError("ans stream: constant tensor must carry no payload words")
        return np.zeros(n, dtype=np.int32)
    try:  # the coder itself refuses some word sequences (one ending in a zero word)
        coder = constriction.stream.stack.AnsCoder(words)
        sym = coder.decode(_categorical(counts), n)
    except (ValueError, RuntimeError) as exc:
        raise ArtifactError(f"ans stream: payload does not decode ({exc})") from exc
    if not coder.is_empty():
        raise ArtifactError("ans stream: payload left undecoded words (corrupt stream)")
    if np.any(chunked_bincount(sym, counts.size) != counts):
        raise ArtifactError("ans stream: decoded symbols disagree with the frequency table (corrupt)")
    return sym


def ans_compress_bytes(data: bytes) -> bytes:
    """Order-0 rANS over byte values: the generic ``ans`` codec of the registry."""
    return ans_encode(np.frombuffer(data, dtype=np.uint8))


def ans_decompress_bytes(data: bytes, max_bytes: int | None = None) -> bytes:
    """Invert :func:`ans_compress_bytes`; never more than ``max_bytes`` of output."""
    out = ans_decode(data, max_symbols=max_bytes)
    if out.dtype != np.uint8 or out.ndim != 1:
        raise ArtifactError("ans stream: expected a 1-D uint8 byte stream")
    return out.tobytes()
