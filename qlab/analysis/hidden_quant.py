"""PR #2011's "reg × quant matrix": seven quantizers applied to *hidden states*.

The paper quantized 128 tokens × 512 final hidden states (rows = tokens) and measured
how much geometry survives. Schemes (b bits, R = 2^(b−1) − 1, codes clamped to
[−R−1, R] like the PR):

* ``int4 sym per-tensor`` — s = max|h| / 7 over the whole tensor.
* ``int4 sym per-row`` / ``int6 sym per-row`` / ``int8 sym per-row`` — s = row max|h| / R.
* ``int4 asym per-row`` — s = (max − min)/15 per row, zero point z = round(−min/s − R − 1),
  ĥ = (clamp(round(h/s) + z, −R−1, R) − z)·s.
* ``AWQ-lite int4`` — c_j = √(mean_i |h_ij|) per channel; ĥ = Q_row(h / c)·c.
* ``GPTQ-lite int4`` — the authors' own Hessian-free proxy, reproduced *with its bug*:
  per-row scale from the original rows, columns quantized left to right, and
  0.1 × each column's error added to **every** later column. The residual therefore
  drifts by the running sum of errors, overflows the clamp range and the distortion
  explodes (~50 vs ~8 for plain int4 in the PR). Equivalent O(n·d) form used here:
  r_j = h_j + 0.1·Σ_{k<j} e_k, q_j = Q(r_j), e_j = r_j − q_j.

Scales are clamped at 1e-8 as in the PR. Metrics (:func:`hidden_quant_metrics`) follow
the PR's JSON (``real_reg_quant_matrix.json``): ``l2_distortion`` = mean over tokens of
‖h − ĥ‖₂ (absolute, not relative), ``cos_shift`` = 1 − mean cos(h, ĥ),
``eff_rank_post`` = entropy effective rank of centred ĥ. ``isoscore_post`` here is the
Rudman IsoScore of ĥ; the PR's ``isoscore_post`` was the mean |cos| anisotropy, which is
reported as ``mean_abs_cos_post`` (see :mod:`qlab.analysis.geometry`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pandas as pd
import torch

from qlab.analysis.activations import flatten_tokens
from qlab.analysis.geometry import effective_rank, isoscore, mean_abs_cosine
from qlab.errors import ConfigError, DataError

__all__ = [
    "HIDDEN_SCHEMES",
    "quant_sym_per_tensor",
    "quant_sym_per_row",
    "quant_asym_per_row",
    "quant_awq_lite",
    "quant_gptq_lite",
    "hidden_quant_metrics",
    "hidden_quant_table",
]

_EPS = 1e-8


def _qmax(bits: int) -> int:
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ConfigError(f"bits must be an integer in [2, 16], got {bits!r}")
    return (1 << (bits - 1)) - 1


def _round_sym(h: torch.Tensor, scale: torch.Tensor, r: int) -> torch.Tensor:
    return torch.round(h / scale).clamp(-r - 1, r) * scale


def quant_sym_per_tensor(h: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Symmetric, one scale s = max|h| / R for the whole tensor."""
    r = _qmax(bits)
    return _round_sym(h, h.abs().max().clamp_min(_EPS) / r, r)


def quant_sym_per_row(h: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Symmetric, one scale per row (token): s = row max|h| / R."""
    r = _qmax(bits)
    return _round_sym(h, h.abs().amax(-1, keepdim=True).clamp_min(_EPS) / r, r)


def quant_asym_per_row(h: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Asymmetric per row: s = (max − min)/(2^b − 1) with an integer zero point."""
    r = _qmax(bits)
    lo, hi = h.amin(-1, keepdim=True), h.amax(-1, keepdim=True)
    scale = (hi - lo).clamp_min(_EPS) / (2 * r + 1)
    zero = torch.round(-lo / scale - r - 1)
    codes = (torch.round(h / scale) + zero).clamp(-r - 1, r)
    return (codes - zero) * scale


def quant_awq_lite(h: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Divide each channel by √(mean |h|), quantize per row, multiply back."""
    c = h.abs().mean(0, keepdim=True).clamp_min(_EPS).sqrt()
    return quant_sym_per_row(h / c, bits) * c


def quant_gptq_lite(h: torch.Tensor, bits: int = 4, damping: float = 0.1) -> torch.Tensor:
    """PR #2011's buggy column-by-column proxy (see module docstring)."""
    r = _qmax(bits)
    scale = h.abs().amax(-1, keepdim=True).clamp_min(_EPS) / r
    out = torch.empty_like(h)
    carry = torch.zeros_like(h[:, :1])
    for j in range(h.shape[1]):
        col = h[:, j : j + 1] + carry
        q = _round_sym(col, scale, r)
        out[:, j : j + 1] = q
        carry = carry + damping * (col - q)
    return out


HIDDEN_SCHEMES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "int4 sym per-tensor": lambda h: quant_sym_per_tensor(h, 4),
    "int4 sym per-row": lambda h: quant_sym_per_row(h, 4),
    "int4 asym per-row": lambda h: quant_asym_per_row(h, 4),
    "int6 sym per-row": lambda h: quant_sym_per_row(h, 6),
    "int8 sym per-row": lambda h: quant_sym_per_row(h, 8),
    "AWQ-lite int4": lambda h: quant_awq_lite(h, 4),
    "GPTQ-lite int4": lambda h: quant_gptq_lite(h, 4),
}


def _scheme(scheme: str | Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(scheme):
        return scheme
    if scheme not in HIDDEN_SCHEMES:
        raise ConfigError(f"unknown hidden-state scheme {scheme!r}; choose one of {list(HIDDEN_SCHEMES)}")
    return HIDDEN_SCHEMES[scheme]


def hidden_quant_metrics(
    h: torch.Tensor, scheme: str | Callable[[torch.Tensor], torch.Tensor]
) -> dict[str, float]:
    """Distortion and post-quant geometry of one scheme on hidden states h (n, d)."""
    x = flatten_tokens(torch.as_tensor(h)).double()
    xq = _scheme(scheme)(x)
    if xq.shape != x.shape or not bool(torch.isfinite(xq).all()):
        raise DataError(f"scheme {scheme!r} returned shape {tuple(xq.shape)} or non-finite values")
    err = torch.linalg.vector_norm(x - xq, dim=1)
    norms = torch.linalg.vector_norm(x, dim=1)
    cos = torch.nn.functional.cosine_similarity(x, xq, dim=1, eps=_EPS)
    return {
        "l2_distortion": float(err.mean()),
        "rel_l2_distortion": float(err.mean() / norms.mean().clamp_min(_EPS)),
        "cos_shift": float(1.0 - cos.mean()),
        "isoscore_post": isoscore(xq),
        "mean_abs_cos_post": mean_abs_cosine(xq),
        "eff_rank_post": effective_rank(xq),
    }


def hidden_quant_table(h: torch.Tensor, schemes: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per scheme (default: all seven PR #2011 schemes, in the paper's order)."""
    names = list(HIDDEN_SCHEMES if schemes is None else schemes)
    return pd.DataFrame([{"scheme": name, **hidden_quant_metrics(h, name)} for name in names])
