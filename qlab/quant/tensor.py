"""The one container every quantizer returns, and how to turn it back into floats.

A :class:`QuantizedTensor` is plain data (tensors + a few fields), no torch modules, so
it can be serialised, compared and inspected anywhere. Conventions:

* ``scheme="int"`` symmetric: ``codes`` in [−R, R] with R = 2^(b−1) − 1, value = codes·scale.
* ``scheme="int"`` asymmetric: ``codes`` in [0, 2^b − 1], value = (codes − zero)·scale.
* ``scheme="codebook"``: value = codebook[codes]·scale (``zero`` unused).
* ``scale`` (and ``zero``) shape: ``()`` per-tensor, ``(rows, 1)`` per-row,
  ``(rows, n_groups)`` per-group of ``group_size`` consecutive columns (the last group
  may be shorter). For 1-D tensors per-group scale has shape ``(n_groups,)``.

Other schemes register their own dequantizer with :func:`register_dequantizer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qlab.checks import all_finite
from qlab.errors import QuantError

__all__ = [
    "QuantizedTensor",
    "dequantize",
    "register_dequantizer",
    "expand_param",
    "check_finite",
    "check_bits",
    "qmax_symmetric",
]


@dataclass
class QuantizedTensor:
    """Integer codes plus what is needed to map them back to floats (see module doc)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    shape: tuple[int, ...]
    scheme: str
    group_size: int | None = None
    codebook: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Field types and sizes (an artifact rebuilds this from a header it must not trust)."""

        def bad(what: str) -> QuantError:
            return QuantError(f"quantized entry: {what}")

        if not isinstance(self.codes, torch.Tensor) or not isinstance(self.scale, torch.Tensor):
            raise bad("codes and scale must be tensors")
        for opt in ("zero", "codebook"):
            if getattr(self, opt) is not None and not isinstance(getattr(self, opt), torch.Tensor):
                raise bad(f"{opt} must be a tensor or absent")
        check_bits(self.bits, "quantized entry", lo=1, hi=16)
        if not isinstance(self.shape, tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in self.shape
        ):
            raise bad(f"shape must be a tuple of non-negative integers, got {self.shape!r}")
        if math.prod(self.shape) != self.codes.numel():
            raise bad(f"shape {self.shape} does not match its {self.codes.numel()} codes")
        if not isinstance(self.scheme, str):
            raise bad(f"scheme must be a string, got {self.scheme!r}")
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs < 1):
            raise bad(f"group_size must be a positive integer or absent, got {gs!r}")
        if not isinstance(self.meta, dict):
            raise bad("meta must be an object")
        for opt in ("scale", "zero"):  # each must cover the codes: checked here, not at first use
            if getattr(self, opt) is not None:
                expand_param(getattr(self, opt), self.shape, gs)

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """Copy with every tensor moved to ``device`` (meta is shared, not copied)."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return QuantizedTensor(
            codes=self.codes.to(device),
            scale=self.scale.to(device),
            zero=mv(self.zero),
            bits=self.bits,
            shape=self.shape,
            scheme=self.scheme,
            group_size=self.group_size,
            codebook=mv(self.codebook),
            meta=self.meta,
        )


def qmax_symmetric(bits: int) -> int:
    """R = 2^(b−1) − 1, the largest symmetric code magnitude."""
    return (1 << (bits - 1)) - 1


def check_bits(bits: int, name: str | None = None, lo: int = 2, hi: int = 8) -> None:
    """Raise QuantError unless ``lo <= bits <= hi`` (an int)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise QuantError(f"{_label(name)}: bits must be an integer in {lo}..{hi}, got {bits!r}")


def check_finite(t: torch.Tensor, name: str | None = None, what: str = "weights") -> None:
    """Raise QuantError naming the tensor if it holds NaN or Inf."""
    if not all_finite(t):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise QuantError(f"{_label(name)}: {what} contain {n_nan} NaN and {n_inf} Inf values")


def _label(name: str | None) -> str:
    return f"tensor {name!r}" if name else "tensor"


def expand_param(param: torch.Tensor, shape: tuple[int, ...], group_size: int | None) -> torch.Tensor:
    """Broadcast a per-tensor / per-row / per-group parameter to the full tensor shape.

    Per-group parameters are repeated ``group_size`` times along the last dimension and
    cut to its length, so a short last group works.
    """
    if param.dim() == 0:
        return param.expand(shape)
    cols = shape[-1] if shape else 1
    if param.shape[-1] == 1 or group_size is None:
        if param.dim() > len(shape) or any(p not in (1, d) for p, d in zip(param.shape[::-1], shape[::-1])):
            raise QuantError(
                f"parameter of shape {tuple(param.shape)} does not broadcast to tensor shape {tuple(shape)} "
                "(a per-row scale has shape (rows, 1))"
            )
        return param.expand(shape)
    full = param.repeat_interleave(group_size, dim=-1)[..., :cols]
    if tuple(full.shape) != tuple(shape):
        raise QuantError(
            f"per-group parameter of shape {tuple(param.shape)} with group_size {group_size} "
            f"does not cover tensor shape {tuple(shape)}"
        )
    return full


def _dequantize_int(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    codes = q.codes.to(torch.float32)
    scale = expand_param(q.scale.to(torch.float32), q.shape, q.group_size)
    if q.zero is not None:
        zero = expand_param(q.zero.to(torch.float32), q.shape, q.group_size)
        codes = codes - zero
    return (codes * scale).to(dtype)


def _dequantize_codebook(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    if q.codebook is None:
        raise QuantError("codebook-scheme QuantizedTensor has no codebook")
    idx = q.codes.to(torch.int64)
    if q.codes.dtype == torch.int8:
        idx = idx % 256  # codebooks of up to 256 entries stored in int8 wrap around
    if int(idx.numel()) and (int(idx.min()) < 0 or int(idx.max()) >= q.codebook.numel()):
        raise QuantError(f"codes index outside the codebook of {q.codebook.numel()} entries")
    values = q.codebook.to(torch.float32)[idx]
    scale = expand_param(q.scale.to(torch.float32), q.shape, q.group_size)
    return (values * scale).to(dtype)


_DEQUANTIZERS: dict[str, Callable[[QuantizedTensor, torch.dtype], torch.Tensor]] = {
    "int": _dequantize_int,
    "codebook": _dequantize_codebook,
}


def register_dequantizer(scheme: str, fn: Callable[[QuantizedTensor, torch.dtype], torch.Tensor]) -> None:
    """Let another module teach :func:`dequantize` a new ``scheme`` (fn(q, dtype) -> Tensor)."""
    _DEQUANTIZERS[scheme] = fn


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map the codes back to a float tensor of shape ``q.shape`` and dtype ``dtype``."""
    fn = _DEQUANTIZERS.get(q.scheme)
    if fn is None:
        raise QuantError(f"unknown quantization scheme {q.scheme!r}; known: {sorted(_DEQUANTIZERS)}")
    if tuple(q.codes.shape) != tuple(q.shape):
        raise QuantError(f"codes shape {tuple(q.codes.shape)} does not match recorded shape {q.shape}")
    return fn(q, dtype).reshape(q.shape)
