"""Hadamard rotation before quantization (QuIP#/QuaRot style incoherence processing).

A weight W acting as y = W·x equals (W·Q)(Qᵀ·x) for any orthogonal Q, so quantizing
W·Q instead of W changes nothing in exact arithmetic but spreads an outlier column over
many columns, lowering the kurtosis and the max error of the rounding. Q here is a
block-diagonal of normalised Sylvester Walsh–Hadamard blocks (power-of-two sizes: the
greedy binary decomposition of the column count, or a fixed ``block_size``), optionally
preceded by random ±1 sign flips drawn from ``seed``. PR #1718 reports no gain on
Muon-trained weights (kurtosis ≈ −1.2), which
:func:`qlab.analysis.rotation.rotation_report` lets one check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qlab.errors import QuantError
from qlab.quant.rtn import quantize_rtn
from qlab.quant.tensor import QuantizedTensor, check_finite, dequantize, register_dequantizer

__all__ = [
    "hadamard_matrix",
    "Rotation",
    "make_rotation",
    "rotate",
    "unrotate",
    "quantize_rotated",
    "check_rotatable",
]


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalised Sylvester Hadamard matrix H_n / √n (orthogonal, symmetric); n a power of 2."""
    if isinstance(n, bool) or not isinstance(n, int) or not _is_pow2(n):
        raise QuantError(f"Hadamard size must be a power of two, got {n!r}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype)


def _blocks(n: int, block_size: int | None) -> tuple[int, ...]:
    if block_size is None:  # greedy: largest powers of two first (the binary digits of n)
        return tuple(1 << b for b in range(n.bit_length() - 1, -1, -1) if n >> b & 1)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not _is_pow2(block_size):
        raise QuantError(f"rotation block_size must be a power of two, got {block_size!r}")
    if n % block_size:
        raise QuantError(f"rotation block_size {block_size} does not divide the dimension {n}")
    return (block_size,) * (n // block_size)


@dataclass
class Rotation:
    """Q = diag(signs) · blockdiag(H_b1, H_b2, …) acting on the last dimension."""

    n: int
    blocks: tuple[int, ...]
    signs: torch.Tensor = field(repr=False)  # (n,) ±1
    seed: int | None = None

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        q = torch.block_diag(*[hadamard_matrix(b) for b in self.blocks])
        return (self.signs.to(torch.float64).unsqueeze(1) * q).to(dtype)

    def _apply(self, w: torch.Tensor, transpose: bool) -> torch.Tensor:
        if w.shape[-1] != self.n:
            raise QuantError(f"rotation of size {self.n} cannot act on a last dimension of {w.shape[-1]}")
        x = w.to(torch.float64)
        if not transpose:
            x = x * self.signs.to(torch.float64)  # W·Q = (W·diag(s))·blockdiag(H)
        parts, start = [], 0
        for b in self.blocks:  # H blocks are symmetric, so H and Hᵀ are the same product
            parts.append(x[..., start : start + b] @ hadamard_matrix(b))
            start += b
        x = torch.cat(parts, dim=-1)
        if transpose:
            x = x * self.signs.to(torch.float64)  # W·Qᵀ = (W·blockdiag(H))·diag(s)
        return x.to(w.dtype)

    def rotate(self, w: torch.Tensor) -> torch.Tensor:
        """W·Q (rotate the input dimension)."""
        return self._apply(w, transpose=False)

    def unrotate(self, w: torch.Tensor) -> torch.Tensor:
        """W·Qᵀ, the exact inverse of :meth:`rotate`."""
        return self._apply(w, transpose=True)


def make_rotation(n: int, *, seed: int | None = None, block_size: int | None = None) -> Rotation:
    """Build the rotation for a last dimension of ``n``; ``seed`` adds random sign flips."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise QuantError(f"rotation dimension must be a positive int, got {n!r}")
    if seed is None:
        signs = torch.ones(n)
    else:
        g = torch.Generator().manual_seed(int(seed))
        signs = torch.randint(0, 2, (n,), generator=g).to(torch.float32) * 2 - 1
    return Rotation(n=n, blocks=_blocks(n, block_size), signs=signs, seed=seed)


def check_rotatable(w: torch.Tensor, name: str | None) -> None:
    """QuantError unless ``w`` is a finite floating-point tensor with ≥ 1 dimension."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() == 0:
        raise QuantError(f"tensor {name!r}: rotation needs a floating-point tensor with ≥ 1 dimension")
    check_finite(w, name)


def rotate(w: torch.Tensor, *, seed: int | None = None, block_size: int | None = None) -> torch.Tensor:
    """W·Q for the rotation of W's last dimension (see :func:`make_rotation`)."""
    check_rotatable(w, None)
    return make_rotation(int(w.shape[-1]), seed=seed, block_size=block_size).rotate(w)


def unrotate(w: torch.Tensor, *, seed: int | None = None, block_size: int | None = None) -> torch.Tensor:
    """W·Qᵀ — undoes :func:`rotate` called with the same ``seed`` and ``block_size``."""
    check_rotatable(w, None)
    return make_rotation(int(w.shape[-1]), seed=seed, block_size=block_size).unrotate(w)


def quantize_rotated(
    w: torch.Tensor,
    bits: int,
    *,
    seed: int | None = 0,
    block_size: int | None = None,
    name: str | None = None,
    **rtn_kwargs,
) -> QuantizedTensor:
    """RTN-quantize W·Q; ``dequantize`` of the result returns to the original basis."""

    check_rotatable(w, name)
    rot = make_rotation(int(w.shape[-1]), seed=seed, block_size=block_size)
    q = quantize_rtn(rot.rotate(w.to(torch.float32)), bits, name=name, **rtn_kwargs)
    q.meta = {**q.meta, "inner_scheme": q.scheme, "rotation_seed": seed, "rotation_block_size": block_size}
    q.scheme = "rotated"
    return q


def _dequantize_rotated(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    inner = QuantizedTensor(**{**q.__dict__, "scheme": q.meta["inner_scheme"]})
    rot = make_rotation(
        int(q.shape[-1]), seed=q.meta.get("rotation_seed"), block_size=q.meta.get("rotation_block_size")
    )
    return rot.unrotate(dequantize(inner, torch.float32)).to(dtype)


register_dequantizer("rotated", _dequantize_rotated)
