"""Clip rules: how wide the quantization grid of each row is.

Every rule is a plain function ``rule(w, bits, **params) -> Tensor`` taking a 2-D float
tensor (rows × cols) and returning the per-row clip value ``c`` of shape (rows, 1); the
symmetric scale is then s = c / R with R = 2^(b−1) − 1 (PAPERS.md §3). Rules are swappable
by name through :data:`CLIP_RULES`.

``sdclip`` takes the standard deviation's ``correction`` as a parameter. Its default is
the **population** std (divide by cols, ``correction=0``): s = k·std(row)/R with
std = sqrt(mean((w − mean w)²)), the σ of the Gaussian rate–distortion theory. The record
(PR #1394, ``W.std(dim=1)``) uses torch's default, the **Bessel** std (divide by cols − 1,
``correction=1``), and so do qlab's record-derived policies (``qlab.quant.policy``). The
two differ by a factor sqrt(n/(n−1)) — 0.1 % for a 512-column row — which is enough to move
the fp16 scale of every row and about 4.5 % of int6 codes (docs/quantization.md).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence

import torch

from qlab.checks import all_finite
from qlab.errors import ConfigError, QuantError
from qlab.quant.tensor import qmax_symmetric

ClipRule = Callable[..., torch.Tensor]

DEFAULT_QUANTILES: tuple[float, ...] = (0.999, 0.9995, 0.9999, 0.99999, 1.0)


def absmax(w: torch.Tensor, bits: int) -> torch.Tensor:
    """c = max |w| of each row: nothing is clipped."""
    return w.abs().amax(dim=1, keepdim=True)


def sdclip(w: torch.Tensor, bits: int, k: float = 12.85, correction: int = 0) -> torch.Tensor:
    """SDClip: c = k·std(row) (population std by default, Bessel with ``correction=1``)."""
    check_clip_width(k, "sdclip")
    if correction not in (0, 1):
        raise ConfigError(f"sdclip: correction must be 0 (population) or 1 (Bessel), got {correction!r}")
    return k * w.std(dim=1, correction=correction, keepdim=True)


def check_clip_width(k: object, rule: str) -> float:
    """A clip width k must be a finite positive number; anything else is a ConfigError."""
    if isinstance(k, (bool, str)) or not isinstance(k, numbers.Real) or not math.isfinite(k) or k <= 0:
        raise ConfigError(f"{rule}: clip width k must be a finite number > 0, got {k!r}")
    return float(k)


def _sym_row_mse(w: torch.Tensor, c: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row mean squared error of symmetric RTN with clip c (float32 scale)."""
    qmax = qmax_symmetric(bits)
    s = (c / qmax).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / s).clamp_(-qmax, qmax)
    return ((w - q * s) ** 2).mean(dim=1)


def row_quantiles(a: torch.Tensor, ps: Sequence[float]) -> torch.Tensor:
    """Linear-interpolation quantiles of each row of ``a``: shape (len(ps), rows).

    Same definition as ``torch.quantile(..., interpolation="linear")`` but without its
    input-size limit.
    """
    n = a.shape[1]
    srt = a.sort(dim=1).values
    out = []
    for p in ps:
        if not 0.0 <= float(p) <= 1.0:
            raise ConfigError(f"quantile_search: quantile {p} is outside [0, 1]")
        pos = float(p) * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        out.append(srt[:, lo] + (srt[:, hi] - srt[:, lo]) * frac)
    return torch.stack(out)


def _pick(cands: torch.Tensor, w: torch.Tensor, bits: int, per: str) -> torch.Tensor:
    """Choose among candidate clips (P, rows): one index for the matrix or one per row."""
    mse = torch.stack([_sym_row_mse(w, c[:, None], bits) for c in cands])  # (P, rows)
    if per == "matrix":
        best = int(torch.argmin(mse.sum(dim=1)))
        return cands[best][:, None]
    if per == "row":
        idx = torch.argmin(mse, dim=0)
        return cands.gather(0, idx[None, :])[0][:, None]
    raise ConfigError(f"clip search: per must be 'matrix' or 'row', got {per!r}")


def quantile_search(
    w: torch.Tensor, bits: int, ps: Sequence[float] = DEFAULT_QUANTILES, per: str = "matrix"
) -> torch.Tensor:
    """GPTQ-lite: candidate c_p = quantile(|w|, p) per row; keep the p with lowest MSE.

    ``per="matrix"`` keeps one p for the whole matrix (the record's rule), ``per="row"``
    chooses p independently for every row. Ties go to the earlier p in ``ps``.
    """
    return _pick(row_quantiles(w.abs(), ps), w, bits, per)


def mse_grid(
    w: torch.Tensor, bits: int, shrinks: Sequence[float] | None = None, n: int = 20, per: str = "row"
) -> torch.Tensor:
    """Search c = f·absmax over shrink factors f (default ``linspace(0.5, 1, n)``) by MSE."""
    f = torch.linspace(0.5, 1.0, n) if shrinks is None else torch.as_tensor(shrinks, dtype=torch.float32)
    amax = absmax(w, bits)[:, 0]
    cands = f.to(w.device, w.dtype)[:, None] * amax[None, :]
    return _pick(cands, w, bits, per)


def hessian_sdclip(
    w: torch.Tensor,
    bits: int,
    k: float = 12.85,
    hdiag: torch.Tensor | None = None,
    lam: float = 0.175,
    damp: float = 0.01,
) -> torch.Tensor:
    """Hessian-aware SDClip: cᵢ = k·σᵢ·[1 + λ(rᵢ − 1)].

    rᵢ = mean_j |W_ij|·d_j / mean(d), normalised to mean 1 over rows, with d the damped
    Hessian diagonal d = hdiag + damp·mean(hdiag) (the same damping GPTQ applies).
    """
    check_clip_width(k, "hessian_sdclip")
    if hdiag is None:
        raise QuantError("hessian_sdclip needs the Hessian diagonal (hdiag); none was given")
    if hdiag.shape != (w.shape[1],):
        raise QuantError(f"hessian_sdclip: hdiag has shape {tuple(hdiag.shape)}, expected ({w.shape[1]},)")
    d = hdiag.to(w.device, torch.float32)
    d = d + damp * d.mean()
    r = (w.abs() * d[None, :]).mean(dim=1) / d.mean()
    mean_r = r.mean()
    r = r / mean_r if float(mean_r) > 0 else torch.ones_like(r)
    sigma = w.std(dim=1, correction=0)
    return (k * sigma * (1.0 + lam * (r - 1.0)))[:, None]


CLIP_RULES: dict[str, ClipRule] = {
    "absmax": absmax,
    "sdclip": sdclip,
    "quantile_search": quantile_search,
    "mse_grid": mse_grid,
    "hessian_sdclip": hessian_sdclip,
}


def get_clip_rule(name: str) -> ClipRule:
    """Look a rule up by name; unknown names raise ConfigError listing the known ones."""
    try:
        return CLIP_RULES[name]
    except KeyError:
        raise ConfigError(f"unknown clip rule {name!r}; known: {sorted(CLIP_RULES)}") from None


def _wants_hdiag(fn: ClipRule) -> bool:
    return "hdiag" in inspect.signature(fn).parameters


def compute_clip(
    w: torch.Tensor,
    bits: int,
    clip: str | ClipRule = "absmax",
    clip_params: Mapping | None = None,
    hdiag: torch.Tensor | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """Run a clip rule on a 2-D tensor and return a usable (rows, 1) float32 clip.

    Rows where the rule gives no positive finite width (e.g. SDClip on a constant row)
    fall back to absmax, so a constant non-zero row is still represented exactly; rows
    that are entirely zero keep c = 0 (the scale floor in :func:`clip_to_scale` handles them).
    """
    fn = get_clip_rule(clip) if isinstance(clip, str) else clip
    params = dict(clip_params or {})
    if hdiag is not None and _wants_hdiag(fn) and "hdiag" not in params:
        params["hdiag"] = hdiag
    try:
        c = fn(w, bits, **params)
    except TypeError as exc:
        raise ConfigError(
            f"clip rule {clip!r} for tensor {name!r}: bad parameters {params!r} ({exc})"
        ) from exc
    c = c.to(torch.float32).reshape(w.shape[0], 1)
    bad = ~(torch.isfinite(c) & (c > 0))
    if bool(bad.any()):
        c = torch.where(bad, absmax(w, bits).to(torch.float32), c)
    return c


def scale_floor(dtype: torch.dtype) -> float:
    """Smallest positive scale representable in ``dtype`` (fp16: 2^-24, a subnormal)."""
    if dtype == torch.float16:
        return 2.0**-24
    return float(torch.finfo(dtype).tiny)


def clip_to_scale(c: torch.Tensor, qmax: int | float, scale_dtype: torch.dtype) -> torch.Tensor:
    """s = c / qmax rounded to ``scale_dtype`` and floored so it is never 0."""
    s = (c.to(torch.float32) / qmax).to(scale_dtype)
    if not all_finite(s):
        raise QuantError(f"scale overflows {scale_dtype}: clip values up to {float(c.max()):.4g}")
    return s.clamp_min(scale_floor(scale_dtype))
