"""Exact empirical entropies of integer code tensors (bincount-based, no sampling).

These are the floor any order-0 / order-1 coder can reach on the codes themselves:
``entropy_bits`` is what an ideal per-tensor entropy coder would need, ``row_entropy``
what per-row models would reach, ``order1_entropy`` what conditioning on the previous
code in the same row could buy (≈ order-0 for i.i.d.-like weights). ``symbol_entropies``
gives all three at once with bounded memory (what the entropy report streams through);
the tests hold it to the three plain functions.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from qlab.errors import QuantError


def as_codes(codes: Any, name: str = "codes") -> np.ndarray:
    """Return an integer numpy view of a torch/numpy code tensor (raises on floats)."""
    if hasattr(codes, "detach"):
        codes = codes.detach().cpu().numpy()
    arr = np.asarray(codes)
    if not np.issubdtype(arr.dtype, np.integer):
        raise QuantError(f"{name}: entropy needs integer codes, got dtype {arr.dtype}")
    return arr


def entropy_from_counts(counts: np.ndarray, axis: int = -1) -> np.ndarray | float:
    """Shannon entropy in bits of histogram(s) ``counts`` along ``axis`` (0·log0 = 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(total > 0, counts / total, 0.0)
        terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    h = terms.sum(axis=axis)
    return float(h) if np.ndim(h) == 0 else h


# Codes spanning more levels than this are counted by sorting, not by a dense histogram
# (int64 "codes" near ±2⁶² would otherwise ask for 2⁶³ bins).
MAX_DENSE_RANGE = 1 << 24


def _span(arr: np.ndarray) -> tuple[int, int]:
    return (int(arr.min()), int(arr.max())) if arr.size else (0, -1)


def labels(codes: Any) -> tuple[np.ndarray, int]:
    """Codes as labels 0 … m−1 and the alphabet size m: the value minus the minimum when
    the codes span at most MAX_DENSE_RANGE levels, else the rank among distinct values
    (same entropies, bounded memory whatever the codes' range)."""
    arr = as_codes(codes)
    lo, hi = _span(arr)
    if hi - lo < MAX_DENSE_RANGE:
        return (arr.astype(np.int64) - lo) if arr.size else arr.astype(np.int64), hi - lo + 1
    _, inv, counts = np.unique(arr, return_inverse=True, return_counts=True)
    return inv.reshape(arr.shape).astype(np.int64), len(counts)


def histogram(codes: Any) -> tuple[np.ndarray, int]:
    """Counts of every value from ``min`` to ``max`` and the offset ``min``."""
    arr = as_codes(codes).reshape(-1)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64), 0
    lo, hi = _span(arr)
    if hi - lo >= MAX_DENSE_RANGE:
        raise QuantError(
            f"codes span [{lo}, {hi}]: more than {MAX_DENSE_RANGE:,} levels, too wide for a dense histogram"
        )
    return np.bincount(arr.astype(np.int64) - lo), lo


def order0_entropy(codes: Any) -> float:
    """Empirical order-0 entropy of all codes, in bits per symbol."""
    lab, m = labels(codes)
    return float(entropy_from_counts(np.bincount(lab.reshape(-1), minlength=m))) if lab.size else 0.0


def entropy_bits(codes: Any) -> float:
    """Total order-0 information ``n · H0`` in bits (the ideal per-tensor coded size)."""
    arr = as_codes(codes)
    return float(arr.size * order0_entropy(arr))


def _rows(codes: Any) -> np.ndarray:
    """Codes as (rows, columns) labels: rows = first axis (a 1-D tensor is one row)."""
    lab, _ = labels(codes)
    if lab.ndim == 0:
        return lab.reshape(1, 1)
    return lab.reshape(lab.shape[0], math.prod(lab.shape[1:])) if lab.ndim > 1 else lab.reshape(1, -1)


def row_entropy(codes: Any) -> float:
    """Mean over rows (first dim) of each row's own order-0 entropy, in bits/symbol."""
    sym = _rows(codes)
    if sym.size == 0:
        return 0.0
    m = int(sym.max()) + 1
    flat = (np.arange(sym.shape[0])[:, None] * m + sym).reshape(-1)
    counts = np.bincount(flat, minlength=sym.shape[0] * m).reshape(sym.shape[0], m)
    return float(np.mean(entropy_from_counts(counts, axis=1)))


def order1_entropy(codes: Any) -> float:
    """H(X_t | X_{t-1}) over consecutive pairs within each row, in bits/symbol.

    Computed as H(prev, cur) − H(prev) from the exact pair histogram.
    """
    sym = _rows(codes)
    if sym.shape[1] < 2 or sym.shape[0] == 0:
        raise QuantError(f"order1_entropy: needs rows of at least 2 codes, got shape {sym.shape}")
    m = int(sym.max()) + 1
    pairs = (sym[:, :-1] * m + sym[:, 1:]).reshape(-1)
    if m * m <= 1 << 24:
        joint = np.bincount(pairs, minlength=m * m)
    else:  # huge alphabets (int16): count only the pairs that occur
        _, joint = np.unique(pairs, return_counts=True)
    prev = np.bincount(sym[:, :-1].reshape(-1), minlength=m)
    return float(entropy_from_counts(joint)) - float(entropy_from_counts(prev))


# ---------------------------------------------------------------- all three in one pass
def _h_counts(counts: np.ndarray | torch.Tensor) -> float:
    """Entropy in bits/symbol of one histogram."""
    return float(entropy_from_counts(np.asarray(counts).reshape(-1)))


def _row_entropy_from_counts(c: np.ndarray, rows: int, cols: int) -> float:
    """Mean over rows of each row's entropy, from the nonzero (row, symbol) counts ``c``.

    Every row holds ``cols`` symbols, so mean_r H(row r) = log2(cols) − Σ c·log2(c) / (rows·cols).
    """
    c = c[c > 0].astype(np.float64)
    return math.log2(cols) - float((c * np.log2(c)).sum()) / (rows * cols)


def _byte_entropies(u: torch.Tensor) -> tuple[float, float, float]:
    """(order-0, mean per-row, order-1) of a (rows, cols) uint8 tensor, from two bincounts."""
    rows, cols = u.shape
    idx = torch.int32 if rows * 256 < 2**31 else torch.int64
    key = torch.arange(rows, dtype=idx).mul_(256).reshape(-1, 1) + u
    per_row = torch.bincount(key.reshape(-1), minlength=rows * 256).reshape(rows, 256).numpy()
    h_row = _row_entropy_from_counts(per_row.reshape(-1), rows, cols)
    h0 = _h_counts(per_row.sum(axis=0))
    if cols < 2:
        return h0, h_row, float("nan")
    pair = u[:, :-1].to(torch.int32).mul_(256).add_(u[:, 1:])
    joint = torch.bincount(pair.reshape(-1), minlength=65536).numpy().reshape(256, 256)
    return h0, h_row, _h_counts(joint) - _h_counts(joint.sum(axis=1))


def _sorted_counts(keys: np.ndarray) -> np.ndarray:
    return np.unique(keys, return_counts=True)[1]


def _wide_entropies(rows2: torch.Tensor, order1_max: int) -> tuple[float, float, float]:
    """The same three entropies for wider integer symbols, counted by sorting.

    The symbols are first relabelled 0..m−1 (m distinct values), so (row, symbol) and
    (previous, current) keys fit an int64 whatever the symbols' range.
    """
    rows, cols = rows2.shape
    _, inv, counts = np.unique(rows2.numpy().reshape(-1), return_inverse=True, return_counts=True)
    lab, m = inv.reshape(rows, cols).astype(np.int64, copy=False), len(counts)
    h0 = _h_counts(counts)
    h_row = _row_entropy_from_counts(_sorted_counts(np.arange(rows)[:, None] * m + lab), rows, cols)
    if cols < 2 or lab.size > order1_max:
        return h0, h_row, float("nan")
    prev = lab[:, :-1].reshape(-1)
    joint = _sorted_counts(prev * m + lab[:, 1:].reshape(-1))
    return h0, h_row, _h_counts(joint) - _h_counts(np.bincount(prev, minlength=m))


def symbol_entropies(sym: torch.Tensor | np.ndarray, order1_max: int = 1 << 20) -> tuple[float, float, float]:
    """(order-0, mean per-row, order-1) entropies in bits/symbol of a tensor's symbols —
    :func:`order0_entropy`, :func:`row_entropy` and :func:`order1_entropy` computed in one
    pass with bounded memory: bytes (int8 codes) by two bincounts, wider symbols (fp16
    passthroughs seen as int16, ids) by sorting. Order-1 of wider symbols is NaN above
    ``order1_max`` elements (its pair alphabet would need 2^32 bins)."""
    if isinstance(sym, np.ndarray):
        sym = torch.from_numpy(np.ascontiguousarray(sym))
    if sym.numel() == 0:
        return 0.0, 0.0, float("nan")
    rows = sym.reshape(sym.shape[0], -1) if sym.dim() > 1 else sym.reshape(1, -1)
    if sym.element_size() == 1:
        return _byte_entropies(rows.contiguous().view(torch.uint8))
    return _wide_entropies(rows.contiguous(), order1_max)
