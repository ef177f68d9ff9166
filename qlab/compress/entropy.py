"""Exact empirical entropies of integer code tensors (bincount-based, no sampling).

These are the floor any order-0 / order-1 coder can reach on the codes themselves:
``entropy_bits`` is what an ideal per-tensor entropy coder would need, ``row_entropy``
what per-row models would reach, ``order1_entropy`` what conditioning on the previous
code in the same row could buy (≈ order-0 for i.i.d.-like weights).
"""

from __future__ import annotations

from typing import Any

import numpy as np

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


def histogram(codes: Any) -> tuple[np.ndarray, int]:
    """Counts of every value from ``min`` to ``max`` and the offset ``min``."""
    arr = as_codes(codes).reshape(-1).astype(np.int64)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64), 0
    lo = int(arr.min())
    return np.bincount(arr - lo), lo


def order0_entropy(codes: Any) -> float:
    """Empirical order-0 entropy of all codes, in bits per symbol."""
    counts, _ = histogram(codes)
    return entropy_from_counts(counts) if counts.size else 0.0


def entropy_bits(codes: Any) -> float:
    """Total order-0 information ``n · H0`` in bits (the ideal per-tensor coded size)."""
    arr = as_codes(codes)
    return float(arr.size * order0_entropy(arr))


def _rows(codes: Any) -> np.ndarray:
    arr = as_codes(codes)
    if arr.ndim == 0:
        return arr.reshape(1, 1)
    return arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(1, -1)


def row_entropy(codes: Any) -> float:
    """Mean over rows (first dim) of each row's own order-0 entropy, in bits/symbol."""
    rows = _rows(codes).astype(np.int64)
    if rows.size == 0:
        return 0.0
    sym = rows - rows.min()
    m = int(sym.max()) + 1
    flat = (np.arange(rows.shape[0])[:, None] * m + sym).reshape(-1)
    counts = np.bincount(flat, minlength=rows.shape[0] * m).reshape(rows.shape[0], m)
    return float(np.mean(entropy_from_counts(counts, axis=1)))


def order1_entropy(codes: Any) -> float:
    """H(X_t | X_{t-1}) over consecutive pairs within each row, in bits/symbol.

    Computed as H(prev, cur) − H(prev) from the exact pair histogram.
    """
    rows = _rows(codes).astype(np.int64)
    if rows.shape[1] < 2:
        raise QuantError(f"order1_entropy: rows need at least 2 codes, got shape {rows.shape}")
    sym = rows - rows.min()
    m = int(sym.max()) + 1
    pairs = (sym[:, :-1] * m + sym[:, 1:]).reshape(-1)
    if m * m <= 1 << 24:
        joint = np.bincount(pairs, minlength=m * m)
    else:  # huge alphabets (int16): count only the pairs that occur
        _, joint = np.unique(pairs, return_counts=True)
    prev = np.bincount(sym[:, :-1].reshape(-1), minlength=m)
    return entropy_from_counts(joint) - entropy_from_counts(prev)
