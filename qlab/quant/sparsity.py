"""2:4 structured sparsity with PR #1818's storage packing: 10 bits per block of 4.

In every run of 4 consecutive weights of a row the two largest |w| are kept. Which two
is one of C(4,2) = 6 pairs, stored in 4 bits; each kept value is a signed 3-bit code
q ∈ [−3, 3] times a per-row fp16 scale (stored as q + 4 in 3 bits). So a 4-block costs
4 + 3 + 3 = 10 bits, against 24 bits for four int6 values. The packed payload is a real
MSB-first bitstream of ⌈10·blocks/8⌉ bytes plus 2 bytes of scale per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch

from qlab.errors import QuantError
from qlab.quant.tensor import check_finite

__all__ = ["PAIRS", "BITS_PER_BLOCK", "Packed24", "pack_24", "unpack_24", "sparsify_24"]

#: The 6 kept-position pairs, indexed by their 4-bit code.
PAIRS: tuple[tuple[int, int], ...] = tuple(combinations(range(4), 2))
BITS_PER_BLOCK = 10
_QMAX = 3  # signed 3-bit, symmetric so 0 and ±max are exact
_PAIR_CODE = {p: i for i, p in enumerate(PAIRS)}


@dataclass
class Packed24:
    """A 2:4-sparse matrix as a bitstream (``payload``) plus per-row fp16 ``scales``."""

    payload: bytes
    scales: torch.Tensor  # (rows,) fp16
    shape: tuple[int, int]

    @property
    def n_blocks(self) -> int:
        return self.shape[0] * self.shape[1] // 4

    @property
    def nbytes(self) -> int:
        """Payload bytes + 2 bytes of fp16 scale per row."""
        return len(self.payload) + 2 * self.shape[0]


def _check(w: torch.Tensor, name: str | None) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        raise QuantError(f"tensor {name!r}: 2:4 packing needs a 2-D floating-point matrix")
    rows, cols = w.shape
    if rows == 0 or cols == 0 or cols % 4:
        raise QuantError(
            f"tensor {name!r}: 2:4 packing needs columns divisible by 4, got shape {(rows, cols)}"
        )
    check_finite(w, name)
    return w.detach().to(torch.float32)


def _select(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 4-block: the kept positions (blocks, 2) ascending, and the pair code (blocks,)."""
    blocks = w.reshape(-1, 4)
    # stable descending sort on |w|: ties keep the lower position, so the choice is deterministic
    order = torch.sort(blocks.abs(), dim=1, descending=True, stable=True).indices[:, :2]
    pos = torch.sort(order, dim=1).values
    lut = torch.full((4, 4), -1, dtype=torch.int64)
    for (i, j), c in _PAIR_CODE.items():
        lut[i, j] = c
    return pos, lut[pos[:, 0], pos[:, 1]]


def _row_scales(w: torch.Tensor) -> torch.Tensor:
    """fp16 per-row scale absmax/3; a row of zeros gets scale 1 (its codes are all 0)."""
    absmax = w.abs().amax(dim=1)
    if bool((absmax / _QMAX > 65504).any()):
        raise QuantError("row absmax exceeds the fp16 range of the stored 2:4 scale")
    s = (absmax / _QMAX).to(torch.float16)
    return torch.where(s > 0, s, torch.ones_like(s))


def _codes(w: torch.Tensor, scales: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    blocks = w.reshape(-1, 4)
    kept = torch.gather(blocks, 1, pos)
    per_block = scales.to(torch.float32).repeat_interleave(w.shape[1] // 4).unsqueeze(1)
    return torch.clamp(torch.round(kept / per_block), -_QMAX, _QMAX).to(torch.int64)


def _bits(values: np.ndarray, width: int) -> np.ndarray:
    """(n,) ints → (n, width) bits, most significant first."""
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] >> shifts) & 1).astype(np.uint8)


def _from_bits(bits: np.ndarray) -> np.ndarray:
    weights = 1 << np.arange(bits.shape[1] - 1, -1, -1, dtype=np.int64)
    return (bits.astype(np.int64) * weights).sum(axis=1)


def pack_24(w: torch.Tensor, *, name: str | None = None) -> Packed24:
    """Keep the top-2 |w| of every 4 consecutive row entries and pack them at 10 bits/block."""
    w = _check(w, name)
    pos, pair = _select(w)
    scales = _row_scales(w)
    q = _codes(w, scales, pos) + 4  # 1..7 in 3 bits
    fields = np.concatenate(
        [_bits(pair.numpy(), 4), _bits(q[:, 0].numpy(), 3), _bits(q[:, 1].numpy(), 3)], axis=1
    )
    payload = np.packbits(fields.reshape(-1)).tobytes()
    return Packed24(payload=payload, scales=scales, shape=(int(w.shape[0]), int(w.shape[1])))


def unpack_24(packed: Packed24) -> torch.Tensor:
    """Decode a :class:`Packed24` into a dense float32 matrix (zeros at dropped positions)."""
    rows, cols = packed.shape
    if rows <= 0 or cols <= 0 or cols % 4:
        raise QuantError(f"Packed24: invalid shape {packed.shape}")
    n_blocks = rows * cols // 4
    expected = -(-BITS_PER_BLOCK * n_blocks // 8)
    if len(packed.payload) != expected:
        raise QuantError(
            f"Packed24: payload has {len(packed.payload)} bytes, expected {expected} for shape {packed.shape}"
        )
    if tuple(packed.scales.shape) != (rows,):
        raise QuantError(f"Packed24: scales shape {tuple(packed.scales.shape)}, expected ({rows},)")
    bits = np.unpackbits(np.frombuffer(packed.payload, dtype=np.uint8))[: BITS_PER_BLOCK * n_blocks]
    fields = bits.reshape(n_blocks, BITS_PER_BLOCK)
    pair = _from_bits(fields[:, :4])
    q0, q1 = _from_bits(fields[:, 4:7]) - 4, _from_bits(fields[:, 7:10]) - 4
    if (pair >= len(PAIRS)).any() or (q0 < -_QMAX).any() or (q1 < -_QMAX).any():
        raise QuantError("Packed24: corrupt payload (pair code > 5 or value code 0)")
    lut = torch.tensor(PAIRS, dtype=torch.int64)
    pos = lut[torch.from_numpy(pair)]
    per_block = packed.scales.to(torch.float32).repeat_interleave(cols // 4)
    vals = torch.from_numpy(np.stack([q0, q1], axis=1)).to(torch.float32) * per_block.unsqueeze(1)
    out = torch.zeros(n_blocks, 4)
    out.scatter_(1, pos, vals)
    return out.reshape(rows, cols)


def sparsify_24(w: torch.Tensor, *, quantize_values: bool = False, name: str | None = None) -> torch.Tensor:
    """The dense 2:4 matrix without packing: top-2 |w| kept per block, optionally 3-bit coded."""
    w = _check(w, name)
    if quantize_values:
        return unpack_24(pack_24(w, name=name))
    pos, _ = _select(w)
    mask = torch.zeros(w.numel() // 4, 4, dtype=torch.bool)
    mask.scatter_(1, pos, True)
    return w * mask.reshape(w.shape)
