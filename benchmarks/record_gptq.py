"""The record's GPTQ procedure, written plainly: the baseline of ``bench_gptq``.

PR #1394's ``gptq_mixed_quantize`` quantizes each large matrix on its own, with a
Hessian collected per linear layer (so ``c_q``, ``c_k`` and ``c_v``, which read the same
input, get three equal Hessians), and per matrix:

1. dead columns (diag H = 0) get H_jj = 1; damping 0.01·mean(diag H) added to the diagonal;
2. act-order: columns by descending diag H; dead columns of W zeroed;
3. Hinv = upper Cholesky of H⁻¹ by three factorisations: cholesky → cholesky_inverse →
   cholesky(upper=True);
4. per-row scale s = fp16(max(k·std(row)/R, 1e-10)), std with Bessel's correction;
5. blocks of 128 columns; within a block, column by column: q = clamp(round(w/s)),
   err = (w − q·s)/Hinv_jj, and the rank-1 update of the block's remaining columns;
   after the block, one matrix product pushes the block's errors onto later columns.

Written here from that description; it exists only as the benchmark's baseline
(qlab's implementation is ``qlab.quant.gptq``).
"""

from __future__ import annotations

import torch


def record_damped(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1–2: (permutation, damped permuted H, dead-column mask)."""
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H.diagonal().add_(0.01 * H.diag().mean())
    perm = torch.argsort(H.diag(), descending=True, stable=True)
    return perm, H[perm][:, perm], dead


def record_hinv(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1–3: (permutation, damped permuted H's Hinv, dead-column mask)."""
    perm, H, dead = record_damped(H)
    return perm, record_factor(H), dead


def record_factor(H: torch.Tensor) -> torch.Tensor:
    """Step 3: Hinv of the damped permuted H by the record's three calls."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


@torch.no_grad()
def record_gptq(W: torch.Tensor, H: torch.Tensor, bits: int = 6, k: float = 12.85, block: int = 128):
    """(int8 codes, fp16 per-row scales) of one matrix by the record's procedure."""
    rows, cols = W.shape
    R = 2 ** (bits - 1) - 1
    perm, hinv, dead = record_hinv(H)
    W_perm = W.float()[:, perm].clone()
    W_perm[:, dead[perm]] = 0
    s = (k * W.float().std(dim=1) / R).clamp_min(1e-10).to(torch.float16)
    sf = s.float()
    Q = torch.zeros(rows, cols, dtype=torch.int8)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W_block = W_perm[:, i1:i2].clone()
        hinv_block = hinv[i1:i2, i1:i2]
        err_block = torch.zeros(rows, i2 - i1)
        for j in range(i2 - i1):
            w = W_block[:, j]
            q = torch.clamp(torch.round(w / sf), -R, R)
            Q[:, i1 + j] = q.to(torch.int8)
            err = (w - q * sf) / hinv_block[j, j]
            err_block[:, j] = err
            W_block[:, j:] -= err.unsqueeze(1) * hinv_block[j, j:].unsqueeze(0)
        if i2 < cols:
            W_perm[:, i2:] -= err_block @ hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)], s
