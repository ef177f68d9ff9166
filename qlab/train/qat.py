"""Quantization-aware training: int-b fake quantization with a straight-through estimator.

``fake_quant(w, bits, k)`` returns the symmetric per-row RTN reconstruction of ``w`` —
scale s = c/R with R = 2^(b−1) − 1 and c = k·std(row) (SDClip) or max|row| (absmax),
rounded to ``scale_dtype`` like a stored artifact scale — while its gradient is the
identity (STE): d fake_quant(w)/dw = I, so the optimizer keeps updating the fp weights
with the gradient taken at the quantized point. The value equals
``dequantize(quantize_rtn(w, bits, granularity="row", clip=...))``; it is written with
torch ops only (no host sync) so it can run inside every training forward.

``enable_qat(model, bits, k, patterns)`` makes the matching ``nn.Linear`` modules use
``fake_quant(weight)`` in their forward. It replaces the module's ``forward`` on the
instance rather than registering a ``torch.nn.utils.parametrize`` parametrization, so
parameter names (and hence state dicts, checkpoints, EMA and optimizer groups) stay
exactly as without QAT. ``disable_qat`` restores the plain forward.
"""

from __future__ import annotations

import fnmatch
import types
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlab.errors import ConfigError, QuantError
from qlab.quant.clip import scale_floor
from qlab.quant.tensor import check_bits, qmax_symmetric

_QAT_ATTR = "_qlab_qat"  # (bits, k, scale_dtype) on modules whose forward is fake-quantized


def _row_clip(w: Tensor, k: float | None) -> Tensor:
    """Per-row clip (rows, 1): k·std (population) or absmax; rows where SDClip gives no
    positive width (constant rows) fall back to absmax, as :func:`qlab.quant.clip.compute_clip`."""
    amax = w.abs().amax(dim=1, keepdim=True)
    if k is None:
        return amax
    c = k * w.std(dim=1, correction=0, keepdim=True)
    return torch.where(torch.isfinite(c) & (c > 0), c, amax)


def fake_quant(
    w: Tensor, bits: int, k: float | None = None, scale_dtype: torch.dtype = torch.float16
) -> Tensor:
    """Symmetric per-row int-``bits`` reconstruction of ``w`` (1-D: one row) with an STE gradient.

    ``k`` set: SDClip scale s = k·std(row)/R; ``k=None``: absmax s = max|row|/R. The
    scale is rounded to ``scale_dtype`` (fp16, as stored) and floored above zero.
    """
    check_bits(bits, "fake_quant")
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, float)) or not k > 0):
        raise ConfigError(f"fake_quant: SDClip k must be a positive number or None, got {k!r}")
    if not isinstance(w, Tensor) or not w.is_floating_point() or w.dim() not in (1, 2) or w.numel() == 0:
        got = f"{tuple(w.shape)} {w.dtype}" if isinstance(w, Tensor) else type(w).__name__
        raise QuantError(f"fake_quant: expected a non-empty 1-D or 2-D float tensor, got {got}")
    w2 = w.detach().float().reshape(-1, w.shape[-1])
    qmax = qmax_symmetric(bits)
    scale = (_row_clip(w2, k) / qmax).to(scale_dtype).clamp_min(scale_floor(scale_dtype)).float()
    q = torch.clamp(torch.round(w2 / scale), -qmax, qmax) * scale
    q = q.reshape(w.shape).to(w.dtype)
    return w + (q - w).detach()  # value q, gradient identity


def _qat_forward(self: nn.Linear, x: Tensor) -> Tensor:
    bits, k, scale_dtype = getattr(self, _QAT_ATTR)
    return F.linear(x, fake_quant(self.weight, bits, k, scale_dtype), self.bias)


def enable_qat(
    model: nn.Module,
    bits: int = 6,
    k: float | None = 12.85,
    patterns: Sequence[str] = ("*",),
    scale_dtype: torch.dtype = torch.float16,
) -> list[str]:
    """Fake-quantize the weight of every ``nn.Linear`` whose ``<name>.weight`` matches a glob.

    Returns the matched weight names. ConfigError when nothing matches (a typo in a
    pattern would otherwise silently train without QAT) or when QAT is already on for a
    module. Defaults: int6 with SDClip k = 12.85, the record's matrix setting.
    """
    check_bits(bits, "enable_qat")
    if isinstance(patterns, str):
        patterns = (patterns,)
    fake_quant(torch.ones(1, 2), bits, k, scale_dtype)  # validates k and scale_dtype up front
    matched = []
    for name, module in model.named_modules():
        weight_name = f"{name}.weight" if name else "weight"
        if isinstance(module, nn.Linear) and any(fnmatch.fnmatchcase(weight_name, p) for p in patterns):
            if hasattr(module, _QAT_ATTR):
                raise ConfigError(f"enable_qat: QAT is already enabled on {weight_name}")
            matched.append((weight_name, module))
    if not matched:
        raise ConfigError(f"enable_qat: no nn.Linear weight matches patterns {list(patterns)}")
    for _, module in matched:
        setattr(module, _QAT_ATTR, (bits, k, scale_dtype))
        module.forward = types.MethodType(_qat_forward, module)  # type: ignore[method-assign]  # by design
    return [n for n, _ in matched]


def disable_qat(model: nn.Module) -> list[str]:
    """Restore the plain forward of every fake-quantized module; returns their weight names."""
    restored = []
    for name, module in model.named_modules():
        if hasattr(module, _QAT_ATTR):
            delattr(module, _QAT_ATTR)
            del module.forward  # the instance attribute; the class's forward is used again
            restored.append(f"{name}.weight" if name else "weight")
    return restored


def qat_modules(model: nn.Module) -> list[str]:
    """Weight names currently trained with fake quantization."""
    return [f"{n}.weight" if n else "weight" for n, m in model.named_modules() if hasattr(m, _QAT_ATTR)]
