"""Loss regularizers of PR #2011 (formulas from its companion PR #2022, PAPERS.md §5).

Every regularizer is a small function ``reg(hidden, model) -> scalar Tensor``: the
hidden-state ones read ``hidden`` (the final-norm output, (B, T, d) or (N, d)) and ignore
``model``; the weight ones read the model's 2-D parameters and ignore ``hidden``. They
are registered by name in the trainer's registry (:data:`REGULARIZERS`, shared with
:mod:`qlab.train.config`), so ``TrainConfig.regs = {"QAHSP": 0.3}`` adds 0.3·QAHSP to
the loss. Penalties are computed in float32 whatever the autocast dtype.

"2-D weight matrices" are read literally as *every* 2-D parameter of the model
(:func:`weight_matrices`): linear weights, embedding tables and 2-D control tensors such
as ``resid_mix`` and ``skip_weights`` (a tied embedding counts once). Variances and
standard deviations use torch's default (unbiased, correction = 1), as a plain
``.var()`` / ``.std()`` call in the original code would.

Finiteness is not checked here (that would cost a device sync per step): a NaN hidden
state or weight makes the loss NaN, which the training loop reports.

Note on QAHSP, written exactly as the table defines it: with h_ste = h + (h_q − h).detach()
the value MSE(h_ste, h) equals MSE(h_q, h), but its gradient with respect to h is
*identically zero* (the h_ste path contributes +2(h_ste − h)/n, the direct path
−2(h_ste − h)/n, and they cancel exactly). So QAHSP as specified changes the logged
loss but not the training trajectory, except through anything that reads the loss value.
``QAHSP_GRID`` is a qlab variant (not from the papers) with the gradient one would expect,
MSE(h, sg(h_q)), which pulls h towards its int6 grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlab.errors import ConfigError, DataError

# ---- the registry -------------------------------------------------------------------------
# The extension point for loss regularizers (PAPERS.md §5). A regularizer is a callable
# ``reg(hidden, model) -> scalar Tensor`` (hidden = the final-norm output, shape (B, T, d));
# ``TrainConfig.regs`` maps registered names to weights. The trainer adds Σ λ·reg to the
# loss and logs every term separately. Modules register with ``@register_regularizer``.

Regularizer = Callable[..., Any]
REGULARIZERS: dict[str, Regularizer] = {}


def register_regularizer(name: str) -> Callable[[Regularizer], Regularizer]:
    """Decorator: make ``fn`` available as ``TrainConfig.regs[name]``."""

    def deco(fn: Regularizer) -> Regularizer:
        if name in REGULARIZERS and REGULARIZERS[name] is not fn:
            raise ConfigError(f"regularizer {name!r} is registered twice")
        REGULARIZERS[name] = fn
        return fn

    return deco


__all__ = [
    "REGULARIZERS",
    "Regularizer",
    "build_regularizers",
    "canonical_name",
    "parse_reg_spec",
    "weight_matrices",
]

ES_ROWS = 256  # ES looks at the first 256 hidden rows only
WBC_WIDTH = 0.05  # WBC's bucket width: sin² vanishes at multiples of 0.05
WOP_SIGMAS = 4.0  # WOP penalises |w| beyond 4σ of its matrix
SIMCTG_MARGIN = 0.5


# ---- inputs ---------------------------------------------------------------------------------


def _rows(hidden: Tensor, name: str) -> Tensor:
    """Hidden states as float32 (N, d) rows: (B, T, d) is flattened over B and T."""
    if not isinstance(hidden, Tensor) or hidden.dim() not in (2, 3) or hidden.shape[-1] == 0:
        got = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
        raise DataError(f"regularizer {name}: hidden must be a (B, T, d) or (N, d) tensor, got {got}")
    return hidden.reshape(-1, hidden.shape[-1]).float()


def _need_rows(h: Tensor, n: int, name: str) -> None:
    if h.shape[0] < n:
        raise DataError(f"regularizer {name}: needs at least {n} hidden rows, got {h.shape[0]}")


def weight_matrices(model: nn.Module) -> list[Tensor]:
    """Every 2-D parameter of ``model`` (each tied tensor once); ConfigError if there is none."""
    mats: list[Tensor] = [p for p in model.parameters() if p.dim() == 2 and p.numel() > 0]
    if not mats:
        raise ConfigError(f"weight regularizer: {type(model).__name__} has no 2-D parameters")
    return mats


# ---- hidden-state regularizers --------------------------------------------------------------


def int6_hidden_grid(h: Tensor) -> Tensor:
    """h_q = s·clamp(round(h/s), −32, 31) with s = max|h|/31 for the whole tensor (no gradient)."""
    h = h.detach()
    s = (h.abs().amax() / 31.0).clamp_min(torch.finfo(h.dtype).tiny)
    return s * torch.clamp(torch.round(h / s), -32, 31)


@register_regularizer("QAHSP")
def qahsp(hidden: Tensor, model: nn.Module | None = None) -> Tensor:
    """Quant-aware hidden STE penalty, exactly as PR #2022 writes it: MSE(h_ste, h).

    h_ste = h + (h_q − h).detach(), so the value is MSE(h_q, h) and the gradient is zero
    (see the module docstring).
    """
    h = _rows(hidden, "QAHSP")
    h_ste = h + (int6_hidden_grid(h) - h).detach()
    return F.mse_loss(h_ste, h)


@register_regularizer("QAHSP_GRID")
def qahsp_grid(hidden: Tensor, model: nn.Module | None = None) -> Tensor:
    """qlab variant of QAHSP with a working gradient: MSE(h, sg(h_q)), pulling h onto its int6 grid."""
    h = _rows(hidden, "QAHSP_GRID")
    return F.mse_loss(h, int6_hidden_grid(h))


@register_regularizer("ES")
def embedding_spread(hidden: Tensor, model: nn.Module | None = None) -> Tensor:
    """Mean off-diagonal cos²(h_i, h_j) over the first 256 rows (tokens, flattened)."""
    h = _rows(hidden, "ES")[:ES_ROWS]
    _need_rows(h, 2, "ES")
    n = h.shape[0]
    unit = F.normalize(h, dim=1)
    cos2 = (unit @ unit.T).square()
    off_diag = cos2.sum() - cos2.diagonal().sum()
    return off_diag / (n * (n - 1))


@register_regularizer("AOS")
def activation_outlier_suppression(hidden: Tensor, model: nn.Module | None = None) -> Tensor:
    """Mean over tokens of (max|h| − mean|h|) across the feature dimension."""
    a = _rows(hidden, "AOS").abs()
    return (a.amax(dim=1) - a.mean(dim=1)).mean()


@register_regularizer("HSU")
def hidden_state_uniformity(hidden: Tensor, model: nn.Module | None = None) -> Tensor:
    """var(‖h_i‖₂) over tokens (unbiased)."""
    h = _rows(hidden, "HSU")
    _need_rows(h, 2, "HSU")
    return h.norm(dim=1).var()


@register_regularizer("SimCTG")
def simctg(hidden: Tensor, model: nn.Module | None = None, margin: float = SIMCTG_MARGIN) -> Tensor:
    """SimCTG's contrastive loss: mean over i ≠ j in a sequence of max(0, ρ − s(h_i,h_i) + s(h_i,h_j)).

    s is the cosine similarity (so s(h_i, h_i) = 1) and ρ the margin (0.5). A (N, d)
    input is one sequence; (B, T, d) averages over all B·T·(T−1) ordered pairs.
    """
    if not isinstance(hidden, Tensor) or hidden.dim() not in (2, 3):
        got = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
        raise DataError(f"regularizer SimCTG: hidden must be a (B, T, d) or (N, d) tensor, got {got}")
    h = hidden.float()
    h = h.unsqueeze(0) if h.dim() == 2 else h
    t = h.shape[1]
    if t < 2:
        raise DataError(f"regularizer SimCTG: needs sequences of at least 2 tokens, got {t}")
    unit = F.normalize(h, dim=-1)
    cos = unit @ unit.transpose(1, 2)  # (B, T, T)
    self_sim = cos.diagonal(dim1=1, dim2=2).unsqueeze(-1)  # s(h_i, h_i), 1 up to rounding
    hinge = torch.relu(margin - self_sim + cos)
    off = ~torch.eye(t, dtype=torch.bool, device=h.device)
    return (hinge * off).sum() / (h.shape[0] * t * (t - 1))


# ---- weight regularizers -------------------------------------------------------------------


@register_regularizer("WBC")
def weight_bucket_centre(hidden: Tensor | None, model: nn.Module) -> Tensor:
    """Mean of sin²(π·w/0.05) per 2-D parameter, averaged over the parameters."""
    terms = [torch.sin(math.pi * w.float() / WBC_WIDTH).square().mean() for w in weight_matrices(model)]
    return torch.stack(terms).mean()


@register_regularizer("WOP")
def weight_outlier_penalty(hidden: Tensor | None, model: nn.Module) -> Tensor:
    """mean(((|w| − 4σ)₊)²) per matrix (σ = its std), averaged over matrices."""
    terms = []
    for w in weight_matrices(model):
        w = w.float()
        sigma = w.std() if w.numel() > 1 else w.new_zeros(())
        terms.append(torch.relu(w.abs() - WOP_SIGMAS * sigma).square().mean())
    return torch.stack(terms).mean()


@register_regularizer("PCS")
def per_channel_scale(hidden: Tensor | None, model: nn.Module) -> Tensor:
    """Variance (unbiased) of the column-wise max|w| per matrix, averaged over matrices.

    Columns are input channels of a torch Linear weight (out × in). Matrices with a
    single column have no variance and are skipped.
    """
    terms = [w.float().abs().amax(dim=0).var() for w in weight_matrices(model) if w.shape[1] > 1]
    if not terms:
        raise ConfigError(f"regularizer PCS: {type(model).__name__} has no 2-D parameter with ≥ 2 columns")
    return torch.stack(terms).mean()


# ---- names and specs ----------------------------------------------------------------------


def canonical_name(name: str) -> str:
    """The registered spelling of a regularizer name, matched case-insensitively."""
    if not isinstance(name, str):
        raise ConfigError(f"regularizer name must be a string, got {type(name).__name__}")
    by_lower = {k.lower(): k for k in REGULARIZERS}
    key = name.strip().lower()
    if key not in by_lower:
        raise ConfigError(f"unknown regularizer {name!r} (known: {', '.join(sorted(REGULARIZERS))})")
    return by_lower[key]


def parse_reg_spec(spec: str) -> tuple[str, float]:
    """``"QAHSP=0.01"`` → ("QAHSP", 0.01); case-insensitive name, finite weight, else ConfigError."""
    if not isinstance(spec, str) or spec.count("=") != 1:
        raise ConfigError(f"regularizer spec {spec!r} must look like NAME=WEIGHT, e.g. QAHSP=0.01")
    name, _, value = spec.partition("=")
    try:
        weight = float(value)
    except ValueError:
        raise ConfigError(f"regularizer spec {spec!r}: weight {value!r} is not a number") from None
    if not math.isfinite(weight):
        raise ConfigError(f"regularizer spec {spec!r}: weight must be finite")
    return canonical_name(name), weight


def build_regularizers(spec: Mapping[str, float]) -> list[tuple[str, float, Regularizer]]:
    """(name, λ, fn) for every non-zero entry; names are matched case-insensitively,
    weights must be finite numbers, a name given twice is an error."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"regularizer spec must be a mapping name -> weight, got {type(spec).__name__}")
    canonical: dict[str, float] = {}
    for name, weight in spec.items():
        key = canonical_name(name)
        if key in canonical:
            raise ConfigError(f"regularizer {key!r} given twice (names are case-insensitive)")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"regularizer {key!r}: weight must be a finite number, got {weight!r}")
        canonical[key] = float(weight)
    return [(name, weight, REGULARIZERS[name]) for name, weight in canonical.items() if weight]
