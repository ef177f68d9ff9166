"""Non-uniform grids: NF4 (QLoRA's NormalFloat) and Lloyd-Max codebooks fitted to data.

Both return a ``scheme="codebook"`` :class:`~qlab.quant.tensor.QuantizedTensor`
(value = codebook[code] · scale), so :func:`qlab.quant.tensor.dequantize` reads them.

* NF4 puts its 16 levels at quantiles of N(0, 1) — optimal-ish for Gaussian weights
  scaled by their block absmax (QLoRA). Blocks are ``block_size`` consecutive columns of
  a row (the last block may be shorter), or a whole row with ``per_row=True``.
* Lloyd-Max fits a k-entry codebook (PR #1818 uses one global 64-entry codebook) by 1-D
  k-means: Lloyd iterations from quantile initialisation until the levels stop moving.
  Each iteration never increases the MSE; the result is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from qlab.checks import all_finite
from qlab.errors import QuantError
from qlab.quant.tensor import QuantizedTensor, check_finite, expand_param

__all__ = [
    "NF4_LEVELS",
    "quantize_nf4",
    "quantize_codebook",
    "LloydMaxFit",
    "fit_lloyd_max",
    "quantize_lloyd_max",
]

# The 16 NormalFloat-4 levels as published with QLoRA (Dettmers et al. 2023, Appendix E /
# bitsandbytes). Construction: with δ = ½(1/30 + 1/32), 8 positive levels Φ⁻¹ of
# linspace(1−δ, ½, 9)[:-1], 7 negative levels −Φ⁻¹ of linspace(1−δ, ½, 8)[:-1], plus an
# exact zero; all divided by the largest. tests/test_quant_extras_codebook.py rebuilds them.
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)


def _as_2d(w: torch.Tensor, name: str | None) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise QuantError(f"tensor {name!r}: expected a floating-point torch.Tensor")
    if w.dim() == 0 or w.numel() == 0:
        raise QuantError(f"tensor {name!r}: cannot quantize an empty or 0-d tensor (shape {tuple(w.shape)})")
    check_finite(w, name)
    return w.detach().to(torch.float32).reshape(-1, w.shape[-1])


def _nearest_codes(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for every element (codebook sorted ascending)."""
    mids = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(x.contiguous(), mids.contiguous())


def _store_codes(idx: torch.Tensor) -> torch.Tensor:
    # int8 storage; indices 128..255 wrap to negative and dequantize() takes them mod 256.
    return idx.to(torch.int16).to(torch.uint8).view(torch.int8)


def _check_codebook(codebook: torch.Tensor) -> torch.Tensor:
    cb = torch.as_tensor(codebook, dtype=torch.float32).flatten()
    if not 2 <= cb.numel() <= 256:
        raise QuantError(f"codebook must have 2..256 entries, got {cb.numel()}")
    if not all_finite(cb):
        raise QuantError("codebook contains NaN or Inf")
    if bool((cb[1:] <= cb[:-1]).any()):
        raise QuantError("codebook levels must be strictly increasing")
    return cb


def quantize_codebook(
    w: torch.Tensor,
    codebook: torch.Tensor,
    scale: torch.Tensor | float = 1.0,
    *,
    group_size: int | None = None,
    bits: int | None = None,
    name: str | None = None,
) -> QuantizedTensor:
    """Round every element of ``w / scale`` to the nearest codebook level.

    ``scale`` has a QuantizedTensor shape: ``()``, ``(rows, 1)`` or ``(rows, n_groups)``
    (then pass ``group_size``). It is stored as fp16 and the codes are chosen against the
    stored value. Zero scales are allowed (those rows/groups use code of level nearest 0).
    """
    cb = _check_codebook(codebook)
    _as_2d(w, name)
    s16 = torch.as_tensor(scale, dtype=torch.float32).to(torch.float16)
    if not all_finite(s16) or bool((s16 < 0).any()):
        raise QuantError(f"tensor {name!r}: scales must be finite, non-negative and within fp16 range")
    if s16.dim() not in (0, w.dim()):
        raise QuantError(
            f"tensor {name!r}: scale of shape {tuple(s16.shape)} does not fit shape {tuple(w.shape)}"
        )
    try:
        s_full = expand_param(s16.to(torch.float32), tuple(w.shape), group_size)
    except QuantError as exc:
        raise QuantError(
            f"tensor {name!r}: scale of shape {tuple(s16.shape)} does not fit shape {tuple(w.shape)}"
        ) from exc
    wf = w.detach().to(torch.float32)
    safe = torch.where(s_full == 0, torch.ones_like(s_full), s_full)
    x = torch.where(s_full == 0, torch.zeros_like(wf), wf / safe)
    idx = _nearest_codes(x, cb)
    nbits = bits if bits is not None else int(np.ceil(np.log2(cb.numel())))
    return QuantizedTensor(
        codes=_store_codes(idx),
        scale=s16,
        zero=None,
        bits=nbits,
        shape=tuple(w.shape),
        scheme="codebook",
        group_size=group_size,
        codebook=cb,
        meta={"name": name} if name else {},
    )


def quantize_nf4(
    w: torch.Tensor, *, block_size: int = 64, per_row: bool = False, name: str | None = None
) -> QuantizedTensor:
    """NF4: absmax scaling per block of ``block_size`` columns (or per row), 16 NF levels.

    The fp16 scale is the block absmax rounded up to the next fp16 value, so |w/scale| ≤ 1
    always holds after storage.
    """
    w2 = _as_2d(w, name)
    if w.dim() > 2:
        raise QuantError(f"tensor {name!r}: NF4 takes 1-D or 2-D tensors, got shape {tuple(w.shape)}")
    if per_row:
        absmax = w2.abs().amax(dim=1, keepdim=True)
        group = None
    else:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise QuantError(f"tensor {name!r}: block_size must be a positive int, got {block_size!r}")
        cols = w2.shape[1]
        n_groups = -(-cols // block_size)
        pad = n_groups * block_size - cols
        padded = torch.nn.functional.pad(w2.abs(), (0, pad))
        absmax = padded.reshape(w2.shape[0], n_groups, block_size).amax(dim=2)
        group = block_size
    scale16 = _round_up_fp16(absmax)
    if w.dim() == 1:  # the QuantizedTensor convention for 1-D: () per-row, (n_groups,) per-group
        scale16 = scale16.reshape(()) if per_row else scale16.reshape(-1)
    q = quantize_codebook(w, NF4_LEVELS, scale16, group_size=group, bits=4, name=name)
    q.meta["format"] = "nf4"
    return q


def _round_up_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp16 value ≥ x (so a stored absmax never clips); overflow raises."""
    if bool((x > 65504).any()):
        raise QuantError(f"block absmax {float(x.max()):.4g} exceeds the fp16 range of the stored scale")
    h = x.to(torch.float16)
    low = h.to(torch.float32) < x
    return torch.where(low, torch.nextafter(h, torch.tensor(float("inf"), dtype=torch.float16)), h)


@dataclass
class LloydMaxFit:
    """A fitted codebook and the MSE after each Lloyd iteration (``history``)."""

    codebook: torch.Tensor
    history: pd.DataFrame
    converged: bool

    @property
    def mse(self) -> float:
        return float(self.history["mse"].iloc[-1])


def _gather_values(values: torch.Tensor | Sequence[torch.Tensor]) -> np.ndarray:
    tensors = [values] if isinstance(values, torch.Tensor) else list(values)
    if not tensors:
        raise QuantError("fit_lloyd_max got no tensors")
    parts = []
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise QuantError(f"fit_lloyd_max: item {i} is not a floating-point tensor")
        check_finite(t, f"lloyd-max input {i}")
        parts.append(t.detach().to(torch.float64).flatten().numpy())
    return np.sort(np.concatenate(parts))


def _cell_stats(x: np.ndarray, prefix: np.ndarray, prefix2: np.ndarray, cb: np.ndarray):
    """Counts, sums and squared sums of the sorted data in each nearest-level cell."""
    mids = (cb[1:] + cb[:-1]) / 2
    edges = np.concatenate([[0], np.searchsorted(x, mids, side="left"), [x.size]])
    counts = np.diff(edges)
    sums = prefix[edges[1:]] - prefix[edges[:-1]]
    sq = prefix2[edges[1:]] - prefix2[edges[:-1]]
    return counts, sums, sq


def _mse(counts, sums, sq, cb, n) -> float:
    # Σ_cell Σ (x − c)² = Σx² − 2cΣx + n_cell·c²
    return float(np.sum(sq - 2 * cb * sums + counts * cb**2) / n)


def fit_lloyd_max(
    values: torch.Tensor | Sequence[torch.Tensor],
    k: int = 64,
    *,
    max_iter: int = 2000,
    tol: float = 1e-9,
) -> LloydMaxFit:
    """Fit a k-level scalar quantizer minimising MSE over all elements of ``values``.

    Initialised at the k mid-quantiles of the data; alternates nearest-level assignment
    and centroid update (exact, via prefix sums over the sorted data) until no level moves
    by more than ``tol`` · data range. Empty cells keep their level, so MSE never rises.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 256:
        raise QuantError(f"fit_lloyd_max: k must be an int in 2..256, got {k!r}")
    x = _gather_values(values)
    if x.size < k:
        raise QuantError(f"fit_lloyd_max: need at least k={k} values, got {x.size}")
    if np.unique(x).size < k:
        raise QuantError(f"fit_lloyd_max: data has fewer than k={k} distinct values")
    prefix = np.concatenate([[0.0], np.cumsum(x)])
    prefix2 = np.concatenate([[0.0], np.cumsum(x * x)])
    cb = np.unique(np.quantile(x, (np.arange(k) + 0.5) / k))
    if cb.size < k:  # heavy ties: fall back to evenly spaced distinct values
        distinct = np.unique(x)
        cb = distinct[np.linspace(0, distinct.size - 1, k).round().astype(int)]
    span = max(float(x[-1] - x[0]), 1e-30)
    rows, converged = [], False
    for it in range(max_iter + 1):
        counts, sums, sq = _cell_stats(x, prefix, prefix2, cb)
        rows.append({"iteration": it, "mse": _mse(counts, sums, sq, cb, x.size)})
        if it == max_iter:
            break
        new = np.where(counts > 0, sums / np.maximum(counts, 1), cb)
        shift = float(np.max(np.abs(new - cb)))
        cb = np.sort(new)
        if shift <= tol * span:
            counts, sums, sq = _cell_stats(x, prefix, prefix2, cb)
            rows.append({"iteration": it + 1, "mse": _mse(counts, sums, sq, cb, x.size)})
            converged = True
            break
    return LloydMaxFit(torch.tensor(cb, dtype=torch.float32), pd.DataFrame(rows), converged)


def quantize_lloyd_max(
    tensors: dict[str, torch.Tensor],
    k: int = 64,
    *,
    per_row_scale: bool = True,
    max_iter: int = 2000,
) -> tuple[dict[str, QuantizedTensor], LloydMaxFit]:
    """One global Lloyd-Max codebook for a set of tensors (PR #1818's 64-entry scheme).

    Each row of a matrix is first divided by its standard deviation (``per_row_scale``;
    other tensors by their overall std; zero std uses scale 1) so that one codebook fits
    all tensors; the codebook is fitted on the normalised values and every tensor is
    coded against it.
    """
    if not tensors:
        raise QuantError("quantize_lloyd_max got an empty dict of tensors")
    scales, normed = {}, {}
    for name, w in tensors.items():
        w2 = _as_2d(w, name)
        if per_row_scale and w.dim() == 2 and w.shape[1] > 1:
            std = w2.std(dim=1, correction=0, keepdim=True)
        elif per_row_scale:  # 1-D or >2-D tensors: one scale for the whole tensor
            std = w2.std(correction=0).reshape(()) if w2.numel() > 1 else w2.abs().reshape(())
        else:
            std = torch.ones(())
        s = torch.where(std > 0, std, torch.ones_like(std)).to(torch.float16).to(torch.float32)
        scales[name], normed[name] = s, w2 / (s if s.dim() else s.reshape(1, 1))
    fit = fit_lloyd_max(list(normed.values()), k, max_iter=max_iter)
    out = {}
    for name, w in tensors.items():
        q = quantize_codebook(w, fit.codebook, scales[name], name=name)
        q.meta["format"] = "lloyd-max"
        out[name] = q
    return out, fit
