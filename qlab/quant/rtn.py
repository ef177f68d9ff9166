"""Round-to-nearest (RTN) integer quantization, b = 2…8 bits.

Symmetric: s = c/R (R = 2^(b−1) − 1), q = clamp(round(w/s), −R, R), codes int8.
Asymmetric: range [lo, hi] = [max(min w, −c), min(max w, c)] widened to contain 0,
s = (hi − lo)/(2^b − 1) rounded up in ``scale_dtype``, zero = clamp(round(−lo/s), 0, 2^b − 1),
q = clamp(round(w/s) + zero, 0, 2^b − 1), codes **uint8** (0…255 does not fit int8).
With the default absmax clip the asymmetric range is exactly [min, max] (∪ 0).

Granularity: ``"tensor"`` (one scale, shape ()), ``"row"`` (shape (rows, 1)) or
``"group"`` (``group_size`` consecutive columns per scale, shape (rows, n_groups); the last
group may be shorter). The clip is computed per unit (tensor / row / group) by a clip
rule from :mod:`qlab.quant.clip`, or given precomputed with the scale's shape.
Scales are rounded to ``scale_dtype`` *before* the codes are computed, so dequantizing
with the stored scale reproduces exactly what the quantizer assumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from qlab.errors import ConfigError, QuantError
from qlab.quant.clip import ClipRule, clip_to_scale, compute_clip
from qlab.quant.tensor import QuantizedTensor, check_bits, check_finite, expand_param, qmax_symmetric

GRANULARITIES = ("tensor", "row", "group")


def as_2d(w: torch.Tensor, name: str | None) -> torch.Tensor:
    """View a 1-D or 2-D tensor as float32 rows × cols (1-D becomes one row)."""
    if w.dim() == 1:
        return w.to(torch.float32).reshape(1, -1)
    if w.dim() == 2:
        return w.to(torch.float32)
    raise QuantError(f"tensor {name!r}: expected a 1-D or 2-D tensor, got shape {tuple(w.shape)}")


def _per_unit(
    w2: torch.Tensor, granularity: str, group_size: int | None, fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply ``fn`` ((n, len) -> (n, 1)) to every quantization unit; result (rows, n_units)."""
    rows, cols = w2.shape
    if granularity == "tensor":
        return fn(w2.reshape(1, -1)).reshape(1, 1)
    if granularity == "row":
        return fn(w2).reshape(rows, 1)
    assert group_size is not None  # validated by the caller
    g = group_size
    n_full = cols // g
    parts = []
    if n_full:
        parts.append(fn(w2[:, : n_full * g].reshape(rows * n_full, g)).reshape(rows, n_full))
    if cols % g:
        parts.append(fn(w2[:, n_full * g :]).reshape(rows, 1))
    return torch.cat(parts, dim=1)


def _param_shape(shape: tuple[int, ...], granularity: str, group_size: int | None) -> tuple[int, ...]:
    """Shape of the stored scale for a tensor of ``shape`` (see module doc)."""
    if granularity == "tensor" or (granularity == "row" and len(shape) == 1):
        return ()
    if granularity == "row":
        return (shape[0], 1)
    assert group_size is not None  # granularity 'group'
    n_groups = math.ceil(shape[-1] / group_size)
    return (n_groups,) if len(shape) == 1 else (shape[0], n_groups)


def _validate(w: torch.Tensor, bits: int, granularity: str, group_size: int | None, name: str | None) -> None:
    check_bits(bits, name)
    if granularity not in GRANULARITIES:
        raise ConfigError(f"tensor {name!r}: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "group" and (not isinstance(group_size, int) or group_size < 1):
        raise ConfigError(f"tensor {name!r}: granularity 'group' needs a positive int group_size")
    if not w.is_floating_point():
        raise QuantError(f"tensor {name!r}: expected a floating-point tensor, got {w.dtype}")
    if w.numel() == 0:
        raise QuantError(f"tensor {name!r}: cannot quantize an empty tensor")
    check_finite(w, name)


def _clip_param(
    w2: torch.Tensor,
    bits: int,
    granularity: str,
    group_size: int | None,
    clip: str | ClipRule | torch.Tensor,
    clip_params: Mapping | None,
    hdiag: torch.Tensor | None,
    name: str | None,
) -> torch.Tensor:
    """Clip values as a (rows, n_units) float32 tensor, from a rule or precomputed."""
    if isinstance(clip, torch.Tensor):
        expected = _units_shape(w2, granularity, group_size)
        if clip.numel() != expected[0] * expected[1]:
            raise QuantError(
                f"tensor {name!r}: precomputed clip has {clip.numel()} values, "
                f"expected {expected[0] * expected[1]} (one per {granularity})"
            )
        return clip.to(w2.device, torch.float32).reshape(expected)
    if hdiag is not None and granularity != "row":
        raise ConfigError(f"tensor {name!r}: a Hessian-aware clip needs granularity 'row'")
    return _per_unit(
        w2, granularity, group_size, lambda u: compute_clip(u, bits, clip, clip_params, hdiag, name)
    )


def _units_shape(w2: torch.Tensor, granularity: str, group_size: int | None) -> tuple[int, int]:
    """(rows, n_units) of the clip/scale before it is reshaped for storage."""
    rows, cols = w2.shape
    if granularity == "tensor":
        return (1, 1)
    if granularity == "row":
        return (rows, 1)
    assert group_size is not None  # granularity 'group'
    return (rows, math.ceil(cols / group_size))


def quantize_rtn(
    w: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    granularity: str = "row",
    group_size: int | None = None,
    clip: str | ClipRule | torch.Tensor = "absmax",
    clip_params: Mapping | None = None,
    scale_dtype: torch.dtype = torch.float16,
    hdiag: torch.Tensor | None = None,
    name: str | None = None,
) -> QuantizedTensor:
    """Quantize ``w`` (1-D or 2-D float) to ``bits``-bit integer codes by rounding.

    ``clip`` is a rule name / function (run per unit with ``clip_params``) or a
    precomputed clip tensor with one value per unit. ``hdiag`` is passed to Hessian-aware
    rules. NaN/Inf, empty or non-float input and bits outside 2..8 raise QuantError.
    """
    _validate(w, bits, granularity, group_size, name)
    w2 = as_2d(w, name)
    c = _clip_param(w2, bits, granularity, group_size, clip, clip_params, hdiag, name)
    pshape = _param_shape(tuple(w.shape), granularity, group_size)
    gs = group_size if granularity == "group" else None
    if symmetric:
        qmax = qmax_symmetric(bits)
        scale = clip_to_scale(c, qmax, scale_dtype)
        s_full = expand_param(scale.to(torch.float32), tuple(w2.shape), gs)
        codes = torch.round(w2 / s_full).clamp_(-qmax, qmax).to(torch.int8)
        zero = None
    else:
        levels = (1 << bits) - 1
        lo = torch.minimum(
            torch.maximum(_per_unit(w2, granularity, gs, _row_min).reshape(c.shape), -c), 0 * c
        )
        hi = torch.maximum(torch.minimum(_per_unit(w2, granularity, gs, _row_max).reshape(c.shape), c), 0 * c)
        scale = _round_up_scale(hi - lo, levels, scale_dtype)
        zero32 = torch.round(-lo / scale.to(torch.float32)).clamp_(0, levels)
        s_full = expand_param(scale.to(torch.float32), tuple(w2.shape), gs)
        z_full = expand_param(zero32, tuple(w2.shape), gs)
        codes = (torch.round(w2 / s_full) + z_full).clamp_(0, levels).to(torch.uint8)
        zero = zero32.to(scale_dtype).reshape(pshape)
    clip_name = "precomputed" if isinstance(clip, torch.Tensor) else getattr(clip, "__name__", str(clip))
    return QuantizedTensor(
        codes=codes.reshape(w.shape),
        scale=scale.reshape(pshape),
        zero=zero,
        bits=bits,
        shape=tuple(w.shape),
        scheme="int",
        group_size=gs,
        meta={
            "method": "rtn",
            "clip": clip_name,
            "clip_params": dict(clip_params or {}),
            "granularity": granularity,
            "dtype": str(w.dtype).removeprefix("torch."),
        },
    )


def _round_up_scale(span: torch.Tensor, levels: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """s = span/levels rounded *up* in ``scale_dtype``, so levels·s still covers [lo, hi]
    and the range ends are off by at most s/2 after the zero point is rounded."""
    exact = span / levels
    s = clip_to_scale(span, levels, scale_dtype)
    low = s.to(torch.float32) < exact
    return torch.where(low, torch.nextafter(s, torch.full_like(s, float("inf"))), s)


def _row_min(u: torch.Tensor) -> torch.Tensor:
    return u.amin(dim=1, keepdim=True)


def _row_max(u: torch.Tensor) -> torch.Tensor:
    return u.amax(dim=1, keepdim=True)
