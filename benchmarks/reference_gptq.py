"""The plain per-matrix GPTQ the benchmark compares against.

This is GPTQ as its reference implementation and the Parameter Golf records write it:
one matrix at a time, Hinv = upper Cholesky of H⁻¹ (Cholesky → inverse → Cholesky),
act-order, lazy updates in blocks of 128 columns with a Python loop over the columns of
each block. It exists only as the baseline of ``bench_gptq``; qlab's implementation is
``qlab.quant.gptq``.
"""

from __future__ import annotations

import torch

from qlab.quant.clip import clip_to_scale, compute_clip


@torch.no_grad()
def reference_gptq(W: torch.Tensor, H: torch.Tensor, bits: int = 6, k: float = 12.85, block: int = 128):
    W = W.clone().float()
    H = H.clone().float()
    qmax = 2 ** (bits - 1) - 1
    s = clip_to_scale(compute_clip(W, bits, "sdclip", {"k": k}), qmax, torch.float16).float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    W, H = W[:, perm], H[perm][:, perm]
    cols = W.shape[1]
    H[range(cols), range(cols)] += 0.01 * torch.diag(H).mean()
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            q = torch.clamp(torch.round(w / s[:, 0]), -qmax, qmax)
            Q[:, i1 + i] = q
            err = (w - q * s[:, 0]) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)].to(torch.int8), s.to(torch.float16)
