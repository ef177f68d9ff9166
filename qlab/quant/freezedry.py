"""Freeze-dry (PR #1818): drop weights that their two row neighbours predict.

For every interior column j of a matrix, one least-squares pair (a_j, b_j) over all rows
fits w[:, j] ≈ a_j·w[:, j−1] + b_j·w[:, j+1]. Elements whose residual is below
``threshold`` (0.005) need not be stored: the decoder recomputes them from their
neighbours and the column's (a, b). A matrix where fewer than ``min_drop_fraction``
(5%) of the elements would drop is skipped (stored as is).

Choice made here (the PR does not say): an element is dropped only if its left
neighbour was kept — scanning each row left to right — so every dropped element is
predicted from *stored* values and the reconstruction error is exactly its residual.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from qlab.errors import QuantError
from qlab.quant.tensor import check_finite

__all__ = ["FreezeDryResult", "neighbour_coefficients", "freeze_dry", "freeze_dry_table"]


@dataclass
class FreezeDryResult:
    """What freeze-dry would store and drop for one matrix."""

    name: str
    mask: torch.Tensor  # (rows, cols) bool, True = dropped (recomputed by the decoder)
    coeffs: torch.Tensor  # (cols, 2) float64 (a_j, b_j); rows 0 and cols−1 unused (0)
    residuals: torch.Tensor  # (rows, cols−2) residuals of the interior columns
    reconstruction: torch.Tensor  # what the decoder rebuilds (float32)
    threshold: float
    drop_fraction: float  # dropped elements / all elements (0 when skipped)
    candidate_fraction: float  # |residual| < threshold, before the kept-neighbour rule
    skipped: bool

    @property
    def n_dropped(self) -> int:
        return int(self.mask.sum())

    def residual_histogram(self, bins: int = 101, limit: float | None = None) -> pd.DataFrame:
        """Counts of residuals per bin over [−limit, limit] (default: max |residual|)."""
        r = self.residuals.flatten().numpy()
        lim = float(limit) if limit is not None else max(float(np.abs(r).max(initial=0.0)), 1e-12)
        counts, edges = np.histogram(r, bins=bins, range=(-lim, lim))
        centre = (edges[:-1] + edges[1:]) / 2
        return pd.DataFrame(
            {
                "bin_left": edges[:-1],
                "bin_right": edges[1:],
                "count": counts,
                "droppable": np.abs(centre) < self.threshold,
            }
        )


def neighbour_coefficients(w: torch.Tensor) -> torch.Tensor:
    """(cols, 2) least-squares (a_j, b_j) of w[:, j] on (w[:, j−1], w[:, j+1]), 0 at the edges.

    Rank-deficient columns get the minimum-norm solution (as numpy's lstsq).
    """
    x = w.detach().to(torch.float64)
    cols = x.shape[1]
    coeffs = torch.zeros(cols, 2, dtype=torch.float64)
    if cols < 3:
        return coeffs
    design = torch.stack([x[:, :-2], x[:, 2:]], dim=2).permute(1, 0, 2)  # (cols−2, rows, 2)
    target = x[:, 1:-1].T.unsqueeze(2)  # (cols−2, rows, 1)
    coeffs[1:-1] = torch.linalg.lstsq(design, target, driver="gelsd").solution.squeeze(2)
    return coeffs


def _greedy_mask(candidate: torch.Tensor) -> torch.Tensor:
    """Drop a candidate only if the element to its left is kept (row-wise scan)."""
    rows, inner = candidate.shape
    mask = torch.zeros(rows, inner + 2, dtype=torch.bool)
    for j in range(1, inner + 1):
        mask[:, j] = candidate[:, j - 1] & ~mask[:, j - 1]
    return mask


def freeze_dry(
    w: torch.Tensor, *, threshold: float = 0.005, min_drop_fraction: float = 0.05, name: str = ""
) -> FreezeDryResult:
    """Fit the neighbour predictors of one matrix and decide which elements to drop."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2 or w.numel() == 0:
        raise QuantError(f"freeze-dry {name!r}: needs a non-empty 2-D floating-point matrix")
    if not threshold > 0 or not 0 <= min_drop_fraction <= 1:
        raise QuantError(f"freeze-dry {name!r}: threshold must be > 0 and min_drop_fraction in [0, 1]")
    check_finite(w, name)
    x = w.detach().to(torch.float64)
    coeffs = neighbour_coefficients(x)
    pred = coeffs[1:-1, 0] * x[:, :-2] + coeffs[1:-1, 1] * x[:, 2:]
    residuals = x[:, 1:-1] - pred
    candidate = residuals.abs() < threshold
    mask = _greedy_mask(candidate)
    frac = float(mask.sum()) / w.numel()
    skipped = frac < min_drop_fraction
    if skipped:
        mask = torch.zeros_like(mask)
    recon = x.clone()
    inner = mask[:, 1:-1]
    recon[:, 1:-1] = torch.where(inner, pred, x[:, 1:-1])
    return FreezeDryResult(
        name=name,
        mask=mask,
        coeffs=coeffs,
        residuals=residuals,
        reconstruction=recon.to(torch.float32),
        threshold=float(threshold),
        drop_fraction=0.0 if skipped else frac,
        candidate_fraction=float(candidate.sum()) / w.numel(),
        skipped=skipped,
    )


def freeze_dry_table(
    weights: Mapping[str, torch.Tensor], *, threshold: float = 0.005, min_drop_fraction: float = 0.05
) -> pd.DataFrame:
    """One row per 2-D matrix: drop fraction, skipped flag, max reconstruction error."""
    rows = []
    for name, w in weights.items():
        if w.dim() != 2 or not w.is_floating_point():
            continue
        r = freeze_dry(w, threshold=threshold, min_drop_fraction=min_drop_fraction, name=name)
        rows.append(
            {
                "name": name,
                "numel": w.numel(),
                "candidate_fraction": r.candidate_fraction,
                "drop_fraction": r.drop_fraction,
                "n_dropped": r.n_dropped,
                "skipped": r.skipped,
                "max_abs_error": float((r.reconstruction - w.float()).abs().max()),
            }
        )
    return pd.DataFrame(rows)
