"""Codec registry: ``get_codec("brotli-11+shuffle")`` → object with compress/decompress.

Spec grammar: ``<name>[-<level>][+shuffle[<stride>]]``. Names: ``brotli`` (quality,
default 11), ``lzma`` (preset, default 6; ``9e`` = 9 | PRESET_EXTREME), ``zstd`` (level,
default 19), ``ans`` (order-0 rANS over bytes, no level) and ``raw`` (identity).
``+shuffle`` applies the records' ``BSHF`` byte shuffle (stride 2 unless given) before
compressing and undoes it after decompressing.
"""

from __future__ import annotations

import io
import lzma
import re
from collections.abc import Callable
from dataclasses import dataclass

import brotli
import zstandard

from qlab.compress import ans as _ans
from qlab.compress.shuffle import shuffle as _shuffle
from qlab.compress.shuffle import unshuffle as _unshuffle
from qlab.errors import ArtifactError, ConfigError, QlabError

_SPEC = re.compile(r"^(?P<name>[a-z]+)(?:-(?P<level>\d+e?))?(?:\+shuffle(?P<stride>\d+)?)?$")


@dataclass(frozen=True)
class Codec:
    """A named, configured compressor; ``spec`` round-trips through :func:`get_codec`."""

    spec: str
    _compress: Callable[[bytes], bytes]
    _decompress: Callable[[bytes], bytes]
    shuffle_stride: int | None = None

    def compress(self, data: bytes) -> bytes:
        if self.shuffle_stride:
            data = _shuffle(data, self.shuffle_stride)
        return self._compress(data)

    def decompress(self, data: bytes, max_output: int | None = None) -> bytes:
        """Decompress; with ``max_output`` the output is produced in bounded steps and an
        input that would inflate past it is refused before it is (a decompression bomb)."""
        try:
            if max_output is None:
                out = self._decompress(data)
            else:
                # the byte-shuffle frame adds a few header bytes to the stored stream
                limit = max_output + (SHUFFLE_FRAME_BYTES if self.shuffle_stride else 0)
                out = bounded_decompress(self.spec.split("-")[0], data, limit, self._decompress)
            return _unshuffle(out) if self.shuffle_stride else out
        except QlabError as exc:
            raise ArtifactError(f"codec {self.spec!r}: {exc}") from exc
        except MemoryError:
            raise  # not a corrupt input: the CLI reports it as out of memory
        except Exception as exc:  # each backend raises its own error type on corrupt input
            raise ArtifactError(f"codec {self.spec!r}: corrupt or truncated input ({exc})") from exc


_STEP = 1 << 20
SHUFFLE_FRAME_BYTES = 16  # output produced per step while bounded


def _too_big(limit: int) -> ArtifactError:
    return ArtifactError(f"decompressed data would exceed the {limit:,}-byte limit (a decompression bomb?)")


def bounded_decompress(name: str, data: bytes, limit: int, fallback: Callable[[bytes], bytes]) -> bytes:
    """Decompress ``data`` with ``name``'s streaming decoder, never holding more than
    ``limit`` (+ one step) bytes of output; ArtifactError when the output would exceed it."""
    if name == "brotli":
        d = brotli.Decompressor()
        out = bytearray(d.process(data, output_buffer_limit=_STEP))
        while not d.is_finished():
            if len(out) > limit:
                raise _too_big(limit)
            piece = d.process(b"", output_buffer_limit=_STEP)
            if not piece and not d.is_finished():  # all input consumed, stream not ended
                raise ArtifactError("truncated brotli stream")
            out += piece
    elif name == "lzma":
        d = lzma.LZMADecompressor()
        out = bytearray(d.decompress(data, max_length=limit + 1))
        if not d.eof and len(out) <= limit:
            raise ArtifactError("truncated lzma stream")
    elif name == "zstd":
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as r:
            out = bytearray(r.read(limit + 1))
    elif name == "ans":  # the stream declares its length: refused before decoding
        out = bytearray(_ans.ans_decompress_bytes(data, max_bytes=limit))
    else:  # raw: the output is the input
        out = bytearray(fallback(data))
    if len(out) > limit:
        raise _too_big(limit)
    return bytes(out)


def _brotli(level: str | None) -> tuple[Callable, Callable, str]:
    q = 11 if level is None else int(level)
    if not 0 <= q <= 11:
        raise ConfigError(f"brotli quality must be 0..11, got {q}")
    return (lambda d: brotli.compress(d, quality=q)), brotli.decompress, f"brotli-{q}"


def _lzma(level: str | None) -> tuple[Callable, Callable, str]:
    level = level or "6"
    extreme = level.endswith("e")
    preset = int(level.rstrip("e"))
    if not 0 <= preset <= 9:
        raise ConfigError(f"lzma preset must be 0..9 (optionally with 'e'), got {level!r}")
    flags = preset | (lzma.PRESET_EXTREME if extreme else 0)
    return (lambda d: lzma.compress(d, preset=flags)), lzma.decompress, f"lzma-{level}"


def _zstd(level: str | None) -> tuple[Callable, Callable, str]:
    lv = 19 if level is None else int(level)
    if not 1 <= lv <= 22:
        raise ConfigError(f"zstd level must be 1..22, got {lv}")
    comp = zstandard.ZstdCompressor(level=lv)
    return comp.compress, lambda d: zstandard.ZstdDecompressor().decompress(d), f"zstd-{lv}"


def _no_level(name: str, comp: Callable, decomp: Callable) -> Callable:
    def make(level: str | None) -> tuple[Callable, Callable, str]:
        if level is not None:
            raise ConfigError(f"codec {name!r} takes no level, got {level!r}")
        return comp, decomp, name

    return make


_FACTORIES: dict[str, Callable[[str | None], tuple[Callable, Callable, str]]] = {
    "brotli": _brotli,
    "lzma": _lzma,
    "zstd": _zstd,
    "ans": _no_level("ans", _ans.ans_compress_bytes, _ans.ans_decompress_bytes),
    "raw": _no_level("raw", bytes, bytes),
}


def available_codecs() -> list[str]:
    """Names accepted as the first part of a codec spec."""
    return sorted(_FACTORIES)


def get_codec(spec: str | Codec, shuffle: bool | int = False) -> Codec:
    """Parse ``spec`` (e.g. ``"brotli-11+shuffle"``, ``"lzma-9e"``, ``"zstd"``).

    ``shuffle=True`` (or a stride) adds a byte shuffle when the spec has none.
    """
    if isinstance(spec, Codec):
        return spec
    m = _SPEC.match(spec.strip().lower()) if isinstance(spec, str) else None
    if m is None or m["name"] not in _FACTORIES:
        raise ConfigError(
            f"unknown codec spec {spec!r}; expected <name>[-level][+shuffle], "
            f"name one of {available_codecs()}"
        )
    comp, decomp, base = _FACTORIES[m["name"]](m["level"])
    stride = _stride(m, spec, shuffle)
    full = base + (f"+shuffle{stride}" if stride and stride != 2 else "+shuffle" if stride else "")
    return Codec(full, comp, decomp, stride)


def _stride(m: re.Match, spec: str, shuffle: bool | int) -> int | None:
    if m["stride"] is not None:
        stride = int(m["stride"])
    elif "+shuffle" in spec:
        stride = 2
    elif shuffle:
        stride = 2 if shuffle is True else int(shuffle)
    else:
        return None
    if not 1 <= stride <= 255:
        raise ConfigError(f"codec {spec!r}: shuffle stride must be 1..255, got {stride}")
    return stride
