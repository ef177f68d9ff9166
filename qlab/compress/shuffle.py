"""Byte shuffle as the Parameter Golf records serialise: ``BSHF`` + stride byte + planes.

Stride ``n`` regroups the stream into ``n`` planes, plane ``i`` holding every byte whose
index is ``i`` mod ``n`` (``data[i::n]``): with stride 2 the even bytes come first, then
the odd bytes. For fp16 tensors this separates the noisy low mantissa bytes from the
compressible sign/exponent bytes, which is why brotli likes the shuffled stream better.
When the length is not a multiple of ``n`` the first planes are one byte longer.
"""

from __future__ import annotations

import numpy as np

from qlab.errors import ArtifactError, ConfigError

MAGIC = b"BSHF"
HEADER_LEN = len(MAGIC) + 1


def shuffle(data: bytes, stride: int = 2) -> bytes:
    """Return ``BSHF`` + stride byte + the byte planes ``data[0::n] + data[1::n] + …``."""
    if not 1 <= stride <= 255:
        raise ConfigError(f"byte-shuffle stride must be in 1..255, got {stride}")
    buf = np.frombuffer(data, dtype=np.uint8)
    planes = np.concatenate([buf[i::stride] for i in range(stride)]) if buf.size else buf
    return MAGIC + bytes([stride]) + planes.tobytes()


def is_shuffled(data: bytes) -> bool:
    """True when ``data`` starts with the ``BSHF`` header."""
    return len(data) >= HEADER_LEN and data[:4] == MAGIC


def unshuffle(data: bytes) -> bytes:
    """Invert :func:`shuffle`; the stride is read from the header."""
    if not is_shuffled(data):
        raise ArtifactError("byte-shuffled stream: missing 'BSHF' header")
    stride = data[4]
    if stride == 0:
        raise ArtifactError("byte-shuffled stream: stride byte is 0")
    buf = np.frombuffer(data, dtype=np.uint8, offset=HEADER_LEN)
    n = buf.size
    out = np.empty(n, dtype=np.uint8)
    start = 0
    for i in range(stride):
        length = (n - i + stride - 1) // stride if n > i else 0
        out[i::stride] = buf[start : start + length]
        start += length
    return out.tobytes()
