"""Muon: momentum SGD whose update for each 2-D matrix is orthogonalised by Newton–Schulz.

Facts from PAPERS.md §1 (Parameter Golf record stack): Newton–Schulz-5 with
coefficients (3.4445, −4.7750, 2.0315) on the Frobenius-normalised update, 5 steps;
the result is scaled by √max(1, rows/cols). **MuonEq-R** divides each row of the
Nesterov update by its L2 norm before the iteration. Weight decay is decoupled:
p ← p·(1 − lr·wd) − lr·update.

Under DDP every rank runs the full update on the already averaged gradient — slower
than sharding the NS5 work across ranks, but simple and bit-identical on all ranks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from qlab.errors import ConfigError, NumericalError

NS5_COEFFS = (3.4445, -4.7750, 2.0315)


def zeropower_ns5(G: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None) -> Tensor:
    """Approximate U·Vᵀ of ``G = U·S·Vᵀ`` with ``steps`` quintic Newton–Schulz iterations.

    The coefficients are tuned for speed, not convergence: singular values land in a
    band around 1 (roughly 0.7–1.2), which is all Muon needs. Runs in bf16 on CUDA and
    fp32 elsewhere unless ``dtype`` is given; returns ``G``'s dtype.
    """
    if G.ndim != 2:
        raise NumericalError(f"zeropower_ns5: expected a 2-D matrix, got shape {tuple(G.shape)}")
    if dtype is None:
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
    a, b, c = NS5_COEFFS
    X = G.to(dtype)
    X = X / (X.norm() + eps)
    transposed = X.size(0) > X.size(1)
    if transposed:  # iterate on the wide orientation so X·Xᵀ is the smaller Gram matrix
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        # The record writes `b * A + c * A @ A`, which Python groups as (c·A) @ A. In
        # exact arithmetic that equals c·(A @ A); in bf16 the two differ by 5-7 % per
        # element, so the record's grouping is the one we keep.
        B = b * A + (c * A) @ A
        X = a * X + B @ X
    if transposed:
        X = X.T
    return X.to(G.dtype)


def row_normalize(U: Tensor, eps: float = 1e-7) -> Tensor:
    """MuonEq-R: divide each row by its L2 norm (all-zero rows stay zero)."""
    return U / U.norm(dim=1, keepdim=True).clamp_min(eps)


def muon_update(
    grad: Tensor,
    buf: Tensor,
    momentum: float,
    nesterov: bool,
    row_norm: bool,
    steps: int,
    record_bf16: bool = False,
) -> Tensor:
    """Advance the momentum buffer in place and return the orthogonalised, shape-scaled update.

    ``record_bf16``: as the record ran, NS5 in bf16 on every device and the scaled update
    rounded to bf16 (its flat all-reduce buffer is bf16) before it meets the fp32 weight.
    """
    buf.mul_(momentum).add_(grad)
    update = grad.add(buf, alpha=momentum) if nesterov else buf.clone()
    if row_norm:
        update = row_normalize(update)
    rows, cols = update.shape
    scale = max(1.0, rows / cols) ** 0.5
    if record_bf16:
        ortho = zeropower_ns5(update, steps=steps, dtype=torch.bfloat16).to(torch.bfloat16)
        return (ortho * scale).to(grad.dtype)
    return zeropower_ns5(update, steps=steps) * scale


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weight matrices (embeddings, vectors and scalars belong to AdamW)."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.02,
        momentum: float = 0.99,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        row_normalize: bool = True,
        ns_steps: int = 5,
        record_bf16: bool = False,
    ) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or ns_steps < 1:
            raise ConfigError(
                f"Muon: invalid hyperparameters lr={lr}, momentum={momentum}, "
                f"weight_decay={weight_decay}, ns_steps={ns_steps}"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            row_normalize=row_normalize,
            ns_steps=ns_steps,
            record_bf16=record_bf16,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ConfigError(f"Muon: only 2-D matrices are supported, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                update = muon_update(
                    p.grad,
                    state["momentum_buffer"],
                    group["momentum"],
                    group["nesterov"],
                    group["row_normalize"],
                    group["ns_steps"],
                    group.get("record_bf16", False),
                )
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr)
        return loss
