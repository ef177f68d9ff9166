"""LQER: a low-rank correction of the quantization error (record 2026-04-27).

E = W − dequant(Q). For the ``top_n`` matrices with the largest ‖E‖_F a rank-r
factorisation E ≈ A·B is stored next to the quantized weights: A (rows × r) packed to
2 bits, codes in [−2, 1] with one fp16 scale; B (r × cols) int4 in groups of 64 columns.

A starts as the top-r left singular vectors of E (orthonormal columns of similar size,
which suits one shared 2-bit scale); after A is quantized, B is refitted by least
squares to E given Â, so B absorbs A's rounding error before B itself is quantized.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from qlab.errors import QuantError
from qlab.quant.rtn import quantize_rtn
from qlab.quant.tensor import QuantizedTensor, check_finite, dequantize

__all__ = [
    "A_LO",
    "A_HI",
    "LowRankCorrection",
    "pack_2bit",
    "unpack_2bit",
    "fit_low_rank",
    "lqer_correct",
    "lqer_table",
]

A_LO, A_HI = -2, 1  # the 2-bit code range of A
B_BITS, B_GROUP = 4, 64


def pack_2bit(codes: torch.Tensor) -> bytes:
    """Pack integer codes in [−2, 1] four per byte, most significant pair first."""
    c = codes.detach().to(torch.int64).flatten()
    if c.numel() and (int(c.min()) < A_LO or int(c.max()) > A_HI):
        raise QuantError(f"2-bit codes must lie in [{A_LO}, {A_HI}]")
    u = (c - A_LO).numpy().astype(np.uint8)
    u = np.concatenate([u, np.zeros((-u.size) % 4, dtype=np.uint8)]).reshape(-1, 4)
    return (u[:, 0] << 6 | u[:, 1] << 4 | u[:, 2] << 2 | u[:, 3]).astype(np.uint8).tobytes()


def unpack_2bit(payload: bytes, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_2bit`: the first ``n`` codes as int64."""
    if len(payload) != -(-n // 4):
        raise QuantError(f"2-bit payload has {len(payload)} bytes, expected {-(-n // 4)} for {n} codes")
    b = np.frombuffer(payload, dtype=np.uint8)
    u = np.stack([b >> 6, (b >> 4) & 3, (b >> 2) & 3, b & 3], axis=1).reshape(-1)[:n]
    return torch.from_numpy(u.astype(np.int64)) + A_LO


@dataclass
class LowRankCorrection:
    """E ≈ Â·B̂ for one matrix; ``apply(deq)`` adds it to the dequantized weights."""

    name: str
    shape: tuple[int, int]
    rank: int
    a_payload: bytes
    a_scale: torch.Tensor  # () fp16
    b: QuantizedTensor  # (rank, cols) int4, groups of 64
    err_before: float  # ‖E‖_F
    err_after: float  # ‖E − Â·B̂‖_F

    def a(self) -> torch.Tensor:
        codes = unpack_2bit(self.a_payload, self.shape[0] * self.rank).reshape(self.shape[0], self.rank)
        return codes.to(torch.float32) * self.a_scale.to(torch.float32)

    def delta(self) -> torch.Tensor:
        return self.a() @ dequantize(self.b)

    def apply(self, deq: torch.Tensor) -> torch.Tensor:
        if tuple(deq.shape) != self.shape:
            raise QuantError(f"LQER for {self.name!r} has shape {self.shape}, got {tuple(deq.shape)}")
        return (deq.to(torch.float32) + self.delta()).to(deq.dtype)

    @property
    def nbytes(self) -> int:
        """A: ⌈rows·r/4⌉ + 2 (fp16 scale); B: ⌈r·cols/2⌉ codes + 2·r·⌈cols/64⌉ scale bytes."""
        rows, cols = self.shape
        b_codes = -(-self.rank * cols * B_BITS // 8)
        b_scales = self.b.scale.numel() * self.b.scale.element_size()
        return len(self.a_payload) + 2 + b_codes + b_scales


def _quantize_a(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-bit codes and the fp16 scale minimising ‖A − s·q‖² over a grid of clip scales."""
    top = max(float(a.max()) / A_HI, float(-a.min()) / -A_LO, 1e-12)
    best = None
    for t in np.linspace(0.2, 1.0, 41):
        s = torch.tensor(top * t, dtype=torch.float16).to(torch.float32)
        if float(s) <= 0:
            continue
        q = torch.clamp(torch.round(a / s), A_LO, A_HI)
        err = float((a - q * s).pow(2).sum())
        if best is None or err < best[0]:
            best = (err, q, s)
    if best is None:
        raise QuantError("LQER: A is too small for an fp16 scale")
    return best[1].to(torch.int64), best[2].to(torch.float16)


def fit_low_rank(w: torch.Tensor, deq: torch.Tensor, rank: int = 4, *, name: str = "") -> LowRankCorrection:
    """Fit the packed rank-``rank`` correction of E = w − deq for one matrix."""

    if w.dim() != 2 or tuple(w.shape) != tuple(deq.shape):
        raise QuantError(
            f"LQER {name!r}: need matching 2-D weights, got {tuple(w.shape)} / {tuple(deq.shape)}"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise QuantError(f"LQER {name!r}: rank must be a positive int, got {rank!r}")
    check_finite(w, name)
    check_finite(deq, name, what="dequantized weights")
    e = w.detach().to(torch.float64) - deq.detach().to(torch.float64)
    r = min(rank, *e.shape)
    u, _, _ = torch.linalg.svd(e, full_matrices=False)
    codes, a_scale = _quantize_a(u[:, :r].to(torch.float32))
    a_hat = codes.to(torch.float64) * float(a_scale)
    b = torch.linalg.lstsq(a_hat, e, driver="gelsd").solution  # B absorbs A's rounding
    bq = quantize_rtn(b.to(torch.float32), B_BITS, granularity="group", group_size=B_GROUP, name=name)
    approx = a_hat @ dequantize(bq).to(torch.float64)
    return LowRankCorrection(
        name=name,
        shape=(int(w.shape[0]), int(w.shape[1])),
        rank=r,
        a_payload=pack_2bit(codes),
        a_scale=a_scale,
        b=bq,
        err_before=float(torch.linalg.norm(e)),
        err_after=float(torch.linalg.norm(e - approx)),
    )


def lqer_correct(
    weights: Mapping[str, torch.Tensor],
    quantized: Mapping[str, QuantizedTensor | torch.Tensor],
    rank: int = 4,
    top_n: int = 3,
) -> dict[str, LowRankCorrection]:
    """Corrections for the ``top_n`` 2-D matrices with the largest ‖W − dequant(Q)‖_F.

    ``quantized`` maps names to QuantizedTensors or to already-dequantized tensors;
    names missing from it, and non-matrices, are not candidates.
    """
    errors = {}
    deqs = {}
    for name, w in weights.items():
        if name not in quantized or w.dim() != 2:
            continue
        q = quantized[name]
        deq = dequantize(q) if isinstance(q, QuantizedTensor) else q
        if tuple(deq.shape) != tuple(w.shape):
            raise QuantError(
                f"LQER {name!r}: quantized shape {tuple(deq.shape)} != weight shape {tuple(w.shape)}"
            )
        check_finite(w, name)
        deqs[name] = deq
        errors[name] = float(torch.linalg.norm(w.detach().double() - deq.detach().double()))
    if not errors:
        raise QuantError("LQER: no 2-D matrix is present in both weights and quantized")
    chosen = sorted(errors, key=lambda n: (-errors[n], n))[:top_n]
    return {n: fit_low_rank(weights[n], deqs[n], rank, name=n) for n in chosen}


def lqer_table(corrections: Mapping[str, LowRankCorrection]) -> pd.DataFrame:
    """One row per corrected matrix: shape, rank, bytes, ‖E‖_F before and after."""
    return pd.DataFrame(
        [
            {
                "name": c.name,
                "rows": c.shape[0],
                "cols": c.shape[1],
                "rank": c.rank,
                "nbytes": c.nbytes,
                "err_before": c.err_before,
                "err_after": c.err_after,
            }
            for c in corrections.values()
        ]
    )
