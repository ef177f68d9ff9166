"""How GPTQ picks each column's codes: nearest level, or nearest with a price on bits.

GPTQ quantizes column j and pushes the error onto later columns; the loss it adds is
err² / [H⁻¹]_jj with err = w − q·s (Frantar et al.; PAPERS.md §3). Plain GPTQ rounds to
the nearest level, which minimises that alone. :class:`RateAwareRounding` instead picks,
among the nearest level and its two neighbours, the q minimising

    ((w − q·s) / s)² · mean_j([H⁻¹]_jj) / [H⁻¹]_jj  +  λ · (−log₂ p(q))

that is, GPTQ's loss err²/[H⁻¹]_jj measured in squared quantization steps of the row and
relative to the matrix's average column, so λ is a price in those units per bit and the
same λ means the same trade on any matrix (λ ≈ 0.1: one bit is worth a tenth of a
squared step). p is the matrix's current code distribution: the codes already chosen
plus the nearest-level codes of the columns still to come, re-estimated at the start of
every block. λ = 0 is plain GPTQ; a larger λ trades Hessian-weighted error for a lower
entropy of the codes, which is what the artifact's entropy coder pays for.

A rounding object is called once per column, ``q = rounding(w, s, d)`` with w (N, rows)
the column's current values, s (N, rows) the row scales and d (N, 1) = [Hinv]_jj (the
diagonal of the upper Cholesky factor of H⁻¹, so d² is GPTQ's [H⁻¹]_jj), and told where
blocks start and end.
"""

from __future__ import annotations

import torch


class NearestRounding:
    """Plain GPTQ: q = clamp(round(w / s), −R, R)."""

    def __init__(self, qmax: int) -> None:
        self.qmax = qmax

    def start_block(self, b1: int, b2: int) -> None:
        """Called before columns b1 … b2 − 1 are quantized."""

    def end_block(self, codes: torch.Tensor) -> None:
        """Called with the block's codes (N, b2 − b1, rows) once they are chosen."""

    def __call__(self, w: torch.Tensor, s: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(w / s), -self.qmax, self.qmax)


class RateAwareRounding(NearestRounding):
    """Nearest level or a neighbour, whichever costs least in error² / [H⁻¹]_jj + λ·bits."""

    def __init__(
        self, qmax: int, lam: float, w_t: torch.Tensor, s: torch.Tensor, d_mean_sq: torch.Tensor | None = None
    ) -> None:
        super().__init__(qmax)
        if not lam >= 0:
            raise ValueError(f"rate λ must be ≥ 0, got {lam}")
        self.lam = lam
        # mean over columns of [Hinv]_jj² per matrix (N, 1): the error's reference column
        self.d_mean_sq = torch.ones(w_t.shape[0], 1, device=w_t.device) if d_mean_sq is None else d_mean_sq
        levels = 2 * qmax + 1
        # nearest-level codes of the weights as they stand: the distribution before any choice
        rtn = torch.clamp(torch.round(w_t / s[:, None, :]), -qmax, qmax).to(torch.int64) + qmax
        n_mat, cols, _ = rtn.shape
        offsets = torch.arange(n_mat, device=w_t.device)[:, None] * cols + torch.arange(
            cols, device=w_t.device
        )
        keys = (offsets[:, :, None] * levels + rtn).reshape(-1)
        per_col = torch.bincount(keys, minlength=n_mat * cols * levels).reshape(n_mat, cols, levels)
        self.remaining = per_col.flip(1).cumsum(1).flip(1).to(torch.float64)  # counts of columns ≥ j
        self.chosen = torch.zeros(n_mat, levels, dtype=torch.float64, device=w_t.device)
        self.bits = torch.zeros(n_mat, levels, dtype=torch.float32, device=w_t.device)
        self.levels = levels

    def start_block(self, b1: int, b2: int) -> None:
        counts = self.chosen + self.remaining[:, b1] + 0.5  # +½: no level is ever free of cost
        self.bits = (-torch.log2(counts / counts.sum(1, keepdim=True))).to(torch.float32)

    def end_block(self, codes: torch.Tensor) -> None:
        keys = codes.to(torch.int64) + self.qmax
        n_mat = keys.shape[0]
        flat = (
            torch.arange(n_mat, device=keys.device)[:, None] * self.levels + keys.reshape(n_mat, -1)
        ).reshape(-1)
        self.chosen += torch.bincount(flat, minlength=n_mat * self.levels).reshape(n_mat, self.levels)

    def __call__(self, w: torch.Tensor, s: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        nearest = super().__call__(w, s, d)
        best, best_cost = nearest, None
        for step in (0.0, -1.0, 1.0):
            q = torch.clamp(nearest + step, -self.qmax, self.qmax)
            rate = self.bits.gather(1, (q + self.qmax).to(torch.int64))
            cost = ((w - q * s) / s) ** 2 * (self.d_mean_sq / d**2) + self.lam * rate
            if best_cost is None:
                best_cost = cost
            else:
                better = cost < best_cost
                best = torch.where(better, q, best)
                best_cost = torch.where(better, cost, best_cost)
        return best
