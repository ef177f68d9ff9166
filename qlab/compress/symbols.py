"""Adaptive, column-conditioned entropy coding of integer code tensors (rANS).

:mod:`qlab.compress.ans` codes a tensor with its own order-0 histogram, sent as a
table. For the small matrices of a 16 MB model the table costs 0.2–1.6 % of the codes,
and a single histogram ignores what GPTQ leaves behind: input channels (columns) whose
codes spread differently. This coder sends no table. It walks the tensor in row
blocks and codes each block with counts of everything already coded (a backward-
adaptive model both sides rebuild), starting from a smooth prior; and it can split the
columns into ``G`` groups by how widely their codes have spread so far, one adaptive
model per group. The encoder tries each ``G`` in :data:`GROUP_CHOICES` and keeps the
shortest stream, so ``G = 1`` (plain adaptive order-0) is the fallback.

Stream layout (integers LEB128 varints unless noted)::

    b"QSYM" | version u8 | dtype id u8 | ndim | shape… | zigzag(lo) | m | zigzag(centre − lo)
            | prior width (fp16 LE) | G | n_refs | n_refs × (row gap, rows back)
            | residual prior width (fp16 LE, when n_refs > 0) | n_words | words (u32 LE)

Row references are the row-similarity model: a row close to an earlier one (trained
embeddings hold near-duplicate rows for tokens the data rarely shows) is coded as its
difference from that row, with its own adaptive model; the index pairs are counted in
the stream, and the encoder keeps them only when the stream gets shorter.

Everything a decoder computes from the stream is integer arithmetic or IEEE float64
``+ − × ÷`` on the same inputs (no ``exp``/``log``, whose last bit may differ between
libm builds), so encoder and decoder build bit-identical models on every platform.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import constriction
import numpy as np
import torch

from qlab.compress.ans import (
    _COUNT_CHUNK,
    _put_varint,
    _Reader,
    _unzigzag,
    _zigzag,
    chunked_bincount,
    read_prelude,
    write_prelude,
)
from qlab.errors import ArtifactError, QuantError

MAGIC = b"QSYM"
VERSION = 1
GROUP_CHOICES = (1, 2, 4, 8)
FIRST_BLOCK = 256  # symbols in the first block; each next block doubles, up to MAX_BLOCK
MAX_BLOCK = 1 << 15
# Weight of the prior, in symbols: enough to code the first block sensibly, small enough
# to vanish against the counts after it (tuned on the demo checkpoint; 1–8 are within 0.01 %).
PRIOR_WEIGHT = 4.0
# Weight, in symbols, of a context tensor's histogram (the same role in the previous
# layer): the first blocks of a small matrix then start from a near-right model.
WARM_WEIGHT = 1024.0


def matrix_view(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) the coder walks: rows = first axis, columns = the rest (1-D: n × 1)."""
    n = math.prod(shape)
    if len(shape) >= 2 and shape[0] > 0:
        return shape[0], n // shape[0]
    return n, 1


def row_blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    """Row ranges of the adaptive blocks: ~FIRST_BLOCK symbols, doubling to MAX_BLOCK."""
    blocks, r, target = [], 0, FIRST_BLOCK
    while r < rows:
        step = max(1, target // max(cols, 1))
        blocks.append((r, min(rows, r + step)))
        r += step
        target = min(2 * target, MAX_BLOCK)
    return blocks


def prior_weights(m: int, centre: int, width: float) -> np.ndarray:
    """Student-t (ν = 3) shaped pseudo-counts over the m symbols, summing to PRIOR_WEIGHT.

    Rational in the distance to the centre, so both sides compute it bit-identically."""
    d = np.arange(m, dtype=np.float64) - float(centre)
    w = 3.0 * width * width
    p = 1.0 / (1.0 + d * d / w)
    p = p * p
    return p * (PRIOR_WEIGHT / p.sum())


class _AdaptiveModel:
    """The state both sides share: per-group counts and per-column spreads of coded rows."""

    def __init__(self, m: int, cols: int, groups: int, centre: int, prior: np.ndarray) -> None:
        self.m, self.cols, self.groups, self.centre = m, cols, groups, centre
        self.prior = prior
        self.counts = np.zeros((groups, m), dtype=np.int64)
        # per-column state only where columns are grouped: a one-group model of a wide
        # tensor would otherwise hold 16 bytes per column it never reads
        self.spread = np.zeros(cols if groups > 1 else 0, dtype=np.int64)
        self._index = np.arange(cols if groups > 1 else 0, dtype=np.int64)

    def column_groups(self) -> list[np.ndarray | slice]:
        """Columns of each group, ranked by spread so far (ties by index: deterministic);
        one group is every column (a slice: no index array as wide as the tensor)."""
        if self.groups == 1:
            return [slice(None)]
        # unique keys, so any sort algorithm yields the same order on every platform
        order = np.argsort(self.spread * self.cols + self._index)
        bounds = (np.arange(self.groups + 1) * self.cols) // self.groups
        return [np.sort(order[bounds[g] : bounds[g + 1]]) for g in range(self.groups)]

    def distribution(self, g: int) -> Any:
        return constriction.stream.model.Categorical(self.counts[g] + self.prior, perfect=False)

    def count(self, g: int, segment: np.ndarray) -> None:
        """Add the symbols just coded in group ``g`` to its counts."""
        self.counts[g] += chunked_bincount(segment, self.m)

    def spread_rows(self, block: np.ndarray) -> None:
        """Add a coded block's |symbol − centre| to each column's spread."""
        if self.groups > 1:
            self.spread += np.abs(block - self.centre).sum(axis=0)


def find_references(sym: np.ndarray, centre: int, gain: float = 0.5) -> np.ndarray:
    """For each row, an earlier row it is close to (−1: none): the nearest earlier row in
    L2, kept when its L1 residual is under ``gain`` × the row's own L1 spread."""
    rows, cols = sym.shape
    refs = np.full(rows, -1, dtype=np.int64)
    if rows < 2 or cols < 8:
        return refs
    x = torch.from_numpy(sym.astype(np.float32) - centre)
    sq = (x * x).sum(1)
    for r0 in range(1, rows, 1024):
        r1 = min(rows, r0 + 1024)
        d = sq[r0:r1, None] + sq[None, :r1] - 2 * (x[r0:r1] @ x[:r1].T)
        d[torch.arange(r1 - r0)[:, None] <= torch.arange(r1)[None, :] - r0] = float("inf")  # j < i only
        near = d.argmin(1).numpy()
        own = np.abs(sym[r0:r1] - centre).sum(1)
        resid = np.abs(sym[r0:r1] - sym[near]).sum(1)
        keep = resid < gain * own
        refs[r0:r1][keep] = near[keep]
    return refs


@dataclass
class _Model:
    """What the stream header fixes: alphabet, prior, column groups, row references."""

    m: int
    centre: int
    width: float
    groups: int
    refs: np.ndarray  # per row: index of the earlier row it is coded against, or −1
    res_width: float = 1.0
    warm: np.ndarray | None = None  # counts of a similar tensor coded before, over 0 … m − 1


def warm_counts(context: np.ndarray | None, lo: int, m: int) -> np.ndarray | None:
    """Histogram of ``context`` (a tensor both sides already hold) over lo … lo + m − 1."""
    if context is None:
        return None
    v = np.asarray(context).reshape(-1).astype(np.int64) - lo
    counts = np.bincount(v[(v >= 0) & (v < m)], minlength=m)
    return counts if counts.any() else None


def _walk(sym: np.ndarray, p: _Model, code: Callable) -> None:
    """Visit the segments in coding order, the one loop encoder and decoder share.

    ``code(expected, distribution, n)`` returns the segment's n symbols: the encoder
    reads them from ``expected()`` (and records them), the decoder decodes them; either
    way they are written into ``sym`` and update the adaptive counts."""
    rows, cols = sym.shape
    prior = prior_weights(p.m, p.centre, p.width)
    if p.warm is not None:  # start from a similar tensor's histogram instead of from scratch
        prior = prior + p.warm * (WARM_WEIGHT / float(p.warm.sum()))
    model = _AdaptiveModel(p.m, cols, p.groups, p.centre, prior)
    res_m = 2 * p.m - 1  # residual against the reference row, shifted to 0 … 2m − 2
    res_prior = prior_weights(res_m, p.m - 1, p.res_width)
    res_counts = np.zeros(res_m, dtype=np.int64)
    is_ref = p.refs >= 0
    for r0, r1 in row_blocks(rows, cols):
        ref_rows = np.flatnonzero(is_ref[r0:r1]) + r0
        direct = slice(r0, r1) if not ref_rows.size else np.flatnonzero(~is_ref[r0:r1]) + r0
        n_direct = r1 - r0 - ref_rows.size
        for g, cols_g in enumerate(model.column_groups()):
            width = cols if isinstance(cols_g, slice) else cols_g.size
            if not (width and n_direct):
                continue
            if p.groups == 1 and isinstance(direct, slice):
                seg = code(lambda d=direct: sym[d], model.distribution(g), n_direct * cols)
                sym[direct] = seg.reshape(n_direct, cols)
            else:
                rows_g = np.arange(r0, r1)[~is_ref[r0:r1]]
                index = (rows_g, slice(None)) if isinstance(cols_g, slice) else np.ix_(rows_g, cols_g)
                seg = code(lambda i=index: sym[i], model.distribution(g), n_direct * width)
                sym[index] = seg.reshape(n_direct, width)
            model.count(g, seg)
        if ref_rows.size:
            dist = constriction.stream.model.Categorical(res_counts + res_prior, perfect=False)
            seg = code(lambda rr=ref_rows: sym[rr] - sym[p.refs[rr]] + (p.m - 1), dist, ref_rows.size * cols)
            res = seg.reshape(ref_rows.size, cols) - (p.m - 1)
            for i, r in enumerate(ref_rows):  # in row order: a reference may be a row just rebuilt
                sym[r] = sym[p.refs[r]] + res[i]
            res_counts += chunked_bincount(seg, res_m)
        model.spread_rows(sym[r0:r1])


def _encode_with(sym: np.ndarray, p: _Model) -> np.ndarray:
    segments = []

    def record(expected: Callable, dist: Any, n: int) -> np.ndarray:
        seg = np.ascontiguousarray(expected(), dtype=np.int32).reshape(-1)
        segments.append((seg, dist))
        return seg

    _walk(sym.copy(), p, record)
    coder = constriction.stream.stack.AnsCoder()
    for seg, dist in reversed(segments):  # a stack: the first segment is pushed last
        coder.encode_reverse(seg, dist)
    return coder.get_compressed()


def _fp16(x: float) -> float:
    return float(np.float16(max(x, 0.5)))


def encode_symbols(
    codes: np.ndarray,
    groups: int | None = None,
    references: bool = True,
    context: np.ndarray | None = None,
) -> bytes:
    """Entropy-code an int8/int16/uint8 array.

    ``groups=None`` tries each of GROUP_CHOICES and keeps the shortest; ``references``
    also tries coding rows against a similar earlier row (kept only when shorter);
    ``context`` is a similar tensor the decoder will hold (pass the same one to
    :func:`decode_symbols`), whose histogram seeds the adaptive model."""
    codes = np.asarray(codes)
    out = bytearray()
    write_prelude(out, MAGIC, VERSION, codes, "symbol coder")
    if codes.size == 0:
        return bytes(out)
    flat = codes.reshape(-1).astype(np.int64)
    lo, m = int(flat.min()), int(flat.max() - flat.min()) + 1
    centre = min(max(int(round(float(flat.mean()))) - lo, 0), m - 1)
    sym = (flat - lo).reshape(matrix_view(codes.shape)).astype(np.int32)
    rows, cols = sym.shape
    choices = [g for g in GROUP_CHOICES if g <= cols] if groups is None else [groups]
    if any(g not in GROUP_CHOICES or g > cols for g in choices):
        raise QuantError(f"symbol coder: groups must be one of {GROUP_CHOICES} and ≤ the columns")
    no_refs = np.full(rows, -1, dtype=np.int64)
    width = _fp16(float(np.abs(sym - centre).mean()))
    warm = warm_counts(context, lo, m)
    best = _Model(m, centre, width, choices[0], no_refs, warm=warm)
    words = np.zeros(0, dtype=np.uint32)
    if m > 1:  # a constant tensor is its header
        tried = [(_encode_with(sym, _Model(m, centre, width, g, no_refs, warm=warm)), g) for g in choices]
        words, g = min(tried, key=lambda t: (t[0].size, t[1]))
        best.groups = g
        refs = find_references(sym, centre) if references else no_refs
        if (refs >= 0).any():
            ref_rows = np.flatnonzero(refs >= 0)
            res_width = _fp16(float(np.abs(sym[ref_rows] - sym[refs[ref_rows]]).mean()))
            with_refs = _Model(m, centre, width, g, refs, res_width, warm)
            cand = _encode_with(sym, with_refs)
            if cand.size * 4 + _refs_bytes(refs) < words.size * 4:
                best, words = with_refs, cand
    _put_varint(out, _zigzag(lo))
    _put_varint(out, m)
    _put_varint(out, _zigzag(centre))
    out += np.float16(best.width).tobytes()
    _put_varint(out, best.groups)
    _put_refs(out, best)
    _put_varint(out, words.size)
    out += words.astype("<u4").tobytes()
    return bytes(out)


def _refs_bytes(refs: np.ndarray) -> int:
    probe = bytearray()
    _put_refs(probe, _Model(2, 0, 1.0, 1, refs))
    return len(probe)


def _put_refs(out: bytearray, p: _Model) -> None:
    ref_rows = np.flatnonzero(p.refs >= 0)
    _put_varint(out, ref_rows.size)
    prev = -1
    for r in ref_rows.tolist():
        _put_varint(out, r - prev - 1)
        _put_varint(out, r - int(p.refs[r]) - 1)
        prev = r
    if ref_rows.size:
        out += np.float16(p.res_width).tobytes()


def decode_symbols(
    data: bytes, max_symbols: int | None = None, context: np.ndarray | None = None
) -> np.ndarray:
    """Invert :func:`encode_symbols` (given the same ``context``); refuse streams of more
    than ``max_symbols`` symbols."""
    r = _Reader(data, "symbol stream")
    dtype, shape = read_prelude(r, MAGIC, VERSION)
    n = math.prod(shape)
    if max_symbols is not None and n > max_symbols:
        raise ArtifactError(
            f"symbol stream: shape {shape} holds more than the {max_symbols:,} symbols allowed"
        )
    if n == 0:
        if r.pos != len(data):  # an empty tensor is its prelude alone
            raise ArtifactError(f"symbol stream: {len(data) - r.pos} bytes after an empty shape {shape}")
        return np.zeros(shape, dtype=dtype)
    rows, cols = matrix_view(shape)
    lo, p = _read_model(r, dtype, rows, cols)
    work = decode_work_bytes(n, cols, p.groups)
    if work > MAX_DECODE_WORK_BYTES:
        raise ArtifactError(
            f"symbol stream: shape {shape} needs ~{work / 2**30:.1f} GiB to decode, over qlab's "
            f"{MAX_DECODE_WORK_BYTES / 2**30:.0f} GiB bound per tensor"
        )
    p.warm = warm_counts(context, lo, p.m)
    words = np.frombuffer(r.take(4 * r.varint()), dtype="<u4").astype(np.uint32)
    if r.pos != len(data):
        raise ArtifactError(f"symbol stream: {len(data) - r.pos} trailing bytes after the payload")
    if p.m == 1:
        if words.size:
            raise ArtifactError("symbol stream: a constant tensor must carry no payload words")
        return np.full(shape, lo, dtype=dtype)
    sym = np.zeros((rows, cols), dtype=np.int32)
    try:  # the coder itself refuses some word sequences (one ending in a zero word)
        coder = constriction.stream.stack.AnsCoder(words)
        _walk(sym, p, lambda expected, dist, k: _decode_in_slices(coder, dist, k))
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise ArtifactError(f"symbol stream: payload does not decode ({exc})") from exc
    if not coder.is_empty():
        raise ArtifactError("symbol stream: payload left undecoded words (corrupt stream)")
    if sym.min() < 0 or sym.max() >= p.m:  # a corrupt residual can step outside the alphabet
        raise ArtifactError(f"symbol stream: decoded symbols leave the range [0, {p.m})")
    sym += lo  # in place: symbols and lo both fit the int16 range, so int32 cannot overflow
    return sym.astype(dtype).reshape(shape)


def _decode_in_slices(coder: Any, dist: Any, k: int) -> np.ndarray:
    """``coder.decode(dist, k)`` a slice at a time into one array: the same symbols (a stack
    pops them in order), without the coder's own k-sized buffer beside the result."""
    out = np.empty(k, dtype=np.int32)
    for i in range(0, k, _COUNT_CHUNK):
        out[i : i + _COUNT_CHUNK] = coder.decode(dist, min(_COUNT_CHUNK, k - i))
    return out


# Working memory of a decode, per symbol: the int32 symbol matrix, the int32 segment being
# decoded and the result in its own dtype (measured: 8.1–8.5 B/symbol on an int8
# [1, 2^24] stream); per column, the group model's spreads, ranks and orders when G > 1.
DECODE_BYTES_PER_SYMBOL = 9
DECODE_BYTES_PER_GROUPED_COLUMN = 40
MAX_DECODE_WORK_BYTES = 1 << 30


def decode_work_bytes(n: int, cols: int, groups: int) -> int:
    """Bytes a decode of ``n`` symbols in ``cols`` columns and ``groups`` groups allocates."""
    return DECODE_BYTES_PER_SYMBOL * n + (DECODE_BYTES_PER_GROUPED_COLUMN * cols if groups > 1 else 0)


def _fp16_field(r: _Reader, what: str) -> float:
    value = float(np.frombuffer(r.take(2), dtype="<f2")[0])
    if not (math.isfinite(value) and value > 0):
        raise ArtifactError(f"symbol stream: {what} must be a positive finite fp16, got {value}")
    return value


def _read_model(r: _Reader, dtype: np.dtype, rows: int, cols: int) -> tuple[int, _Model]:
    lo, m, centre = _unzigzag(r.varint()), r.varint(), _unzigzag(r.varint())
    info = np.iinfo(dtype)
    if m < 1 or lo < info.min or lo + m - 1 > info.max or not 0 <= centre < m:
        raise ArtifactError(
            f"symbol stream: symbol range lo={lo}, m={m}, centre={centre} does not fit {dtype}"
        )
    width = _fp16_field(r, "prior width")
    groups = r.varint()
    if groups not in GROUP_CHOICES or groups > cols:
        raise ArtifactError(f"symbol stream: {groups} column groups for {cols} columns")
    refs = np.full(rows, -1, dtype=np.int64)
    n_refs, row = r.varint(), -1
    if n_refs > rows:
        raise ArtifactError(f"symbol stream: {n_refs} reference rows in a {rows}-row tensor")
    for _ in range(n_refs):
        row += r.varint() + 1
        back = r.varint() + 1
        if row >= rows or back > row:
            raise ArtifactError(f"symbol stream: row {row} cannot refer {back} rows back")
        refs[row] = row - back
    res_width = _fp16_field(r, "residual width") if n_refs else 1.0
    return lo, _Model(m, centre, width, groups, refs, res_width)
