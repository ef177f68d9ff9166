"""AWQ-lite: activation-aware per-input-channel scaling before round-to-nearest.

y = W·x = (W·diag(s))·(diag(1/s)·x). Channels j with large mean|x_j| matter most for the
output, so W's column j is scaled up by s_j = mean|x_j|^α before per-row quantization
(its relative rounding error shrinks) and the 1/s is folded back on dequantization.
The scales are normalised to geometric-mean-of-extremes 1 (as AWQ does) and stored as
fp16 in ``meta["channel_scales"]``; ``dequantize`` of the result (scheme ``"awq"``)
returns to the original basis.

PR #2011 applies the same idea to hidden states h (tokens × channels): divide each
channel by √mean|h_j|, int4 per row, multiply back — that variant lives in
:func:`qlab.analysis.hidden_quant.quant_awq_lite` with the other hidden-state schemes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from qlab.checks import all_finite
from qlab.errors import QuantError
from qlab.quant.rtn import quantize_rtn
from qlab.quant.tensor import QuantizedTensor, check_finite, dequantize, register_dequantizer

__all__ = ["channel_scales", "awq_quantize", "awq_search_alpha"]

_FLOOR = 1e-4  # smallest scale relative to the largest, so unused channels stay finite


def channel_scales(act_mean_abs: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """s_j = mean|x_j|^α, floored, normalised so √(max·min) = 1, rounded to fp16 (float32)."""
    a = torch.as_tensor(act_mean_abs).detach().to(torch.float64)
    if a.dim() != 1 or a.numel() == 0:
        raise QuantError(f"AWQ: act_mean_abs must be a non-empty 1-D tensor, got shape {tuple(a.shape)}")
    if not all_finite(a) or bool((a < 0).any()):
        raise QuantError("AWQ: act_mean_abs must be finite and non-negative")
    if not np.isfinite(alpha) or alpha < 0:
        raise QuantError(f"AWQ: alpha must be a finite number ≥ 0, got {alpha!r}")
    if float(a.max()) == 0.0:
        raise QuantError("AWQ: act_mean_abs is all zeros (no calibration signal)")
    s = a.clamp_min(float(a.max()) * _FLOOR) ** alpha
    s = s / torch.sqrt(s.max() * s.min())
    return s.to(torch.float16).to(torch.float32)


def awq_quantize(
    w: torch.Tensor,
    act_mean_abs: torch.Tensor,
    bits: int,
    *,
    alpha: float = 0.5,
    name: str | None = None,
    **rtn_kwargs,
) -> QuantizedTensor:
    """Quantize W·diag(s) per row with RTN; scheme ``"awq"`` folds 1/s back on dequantize.

    ``w`` is (out, in) and ``act_mean_abs`` the per-input-channel mean |x| (length in);
    extra keyword arguments (``clip``, ``symmetric``, ``granularity``…) go to quantize_rtn.
    """

    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise QuantError(f"AWQ {name!r}: needs a 2-D floating-point weight matrix")
    check_finite(w, name)
    if torch.as_tensor(act_mean_abs).numel() != w.shape[1]:
        raise QuantError(
            f"AWQ {name!r}: act_mean_abs has {torch.as_tensor(act_mean_abs).numel()} entries, "
            f"weight has {w.shape[1]} input channels"
        )
    s = channel_scales(act_mean_abs, alpha)
    q = quantize_rtn(w.detach().to(torch.float32) * s, bits, name=name, **rtn_kwargs)
    q.meta = {**q.meta, "inner_scheme": q.scheme, "channel_scales": s.to(torch.float16), "alpha": alpha}
    q.scheme = "awq"
    return q


def _dequantize_awq(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    inner = QuantizedTensor(**{**q.__dict__, "scheme": q.meta["inner_scheme"]})
    s = q.meta["channel_scales"].to(torch.float32)
    return (dequantize(inner, torch.float32) / s).to(dtype)


register_dequantizer("awq", _dequantize_awq)


def awq_search_alpha(
    w: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    alphas: tuple[float, ...] = tuple(np.linspace(0, 1, 11)),
    **kw,
) -> tuple[float, pd.DataFrame]:
    """Grid-search α on calibration inputs x (tokens × in) by output error ‖xWᵀ − xŴᵀ‖_F."""
    check_finite(x, what="activations")
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise QuantError(
            f"AWQ: calibration inputs of shape {tuple(x.shape)} do not match weight {tuple(w.shape)}"
        )
    xf = x.detach().to(torch.float32)
    ref = xf @ w.detach().to(torch.float32).T
    mean_abs = xf.abs().mean(dim=0)
    rows = []
    for a in alphas:
        deq = dequantize(awq_quantize(w, mean_abs, bits, alpha=float(a), **kw))
        rows.append({"alpha": float(a), "output_error": float(torch.linalg.norm(ref - xf @ deq.T))})
    table = pd.DataFrame(rows)
    return float(table.loc[table["output_error"].idxmin(), "alpha"]), table
