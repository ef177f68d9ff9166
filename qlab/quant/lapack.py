"""The record's Hinv — by torch's three calls, or by the same LAPACK routines called directly.

The record computes GPTQ's Hinv as ``cholesky(cholesky_inverse(cholesky(H)), upper=True)``.
On the CPU each of those torch calls is one LAPACK routine (``potrf``, ``potri``,
``potrf``) wrapped in copies: the input into a column-major buffer, the unused triangle
zeroed (``tril``/``triu``), ``potri``'s half mirrored into a full matrix. With a 2048²
Hessian the wrappers cost a fifth of the time. Calling the *same* routines of the
*same* library (torch links its LAPACK statically and exports its symbols) computes the
same numbers bit for bit and skips the wrappers.

The binding switches itself off — :func:`available` returns False and callers use the
torch calls — when the library or its symbols are not found, or when a self-check on a
small matrix does not reproduce torch's result bit for bit. Integers are passed in
64-bit cells, which an LP64 LAPACK reads as its 32-bit low half (little-endian) and an
ILP64 one whole.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

import torch

_LIB_NAMES = {"linux": "libtorch_cpu.so", "darwin": "libtorch_cpu.dylib", "win32": "torch_cpu.dll"}

# Below this size torch's calls are used: for 3 ≤ n ≤ 11 they give other last bits than
# the routines called directly (measured with torch 2.13 / MKL 2024.2 on every n up to
# 200 and on sizes to 2048; torch takes another path for tiny matrices), and for small
# matrices the wrappers cost nothing anyway. 64 leaves a margin.
MIN_DIRECT = 64


@functools.cache
def _routines() -> tuple | None:
    """(spotrf, spotri) from torch's CPU library, or None when they cannot be found."""
    name = _LIB_NAMES.get(sys.platform)
    path = Path(torch.__file__).parent / "lib" / (name or "")
    if name is None or not path.is_file():
        return None
    try:
        lib = ctypes.CDLL(str(path))
        return lib.spotrf_, lib.spotri_
    except (OSError, AttributeError):
        return None


def _call(routine, uplo: bytes, a: torch.Tensor) -> int:
    """One LAPACK call in place on the float32 square buffer ``a``; returns LAPACK's info."""
    n = ctypes.c_int64(a.shape[-1])
    info = ctypes.c_int64(0)
    routine(ctypes.c_char_p(uplo), ctypes.byref(n), ctypes.c_void_p(a.data_ptr()), ctypes.byref(n),
            ctypes.byref(info), ctypes.c_size_t(1))  # fmt: skip
    v = info.value
    return v - (1 << 32) if (1 << 31) <= v < (1 << 32) else v  # an LP64 negative fills the low half only


def record_hinv_lapack(h: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(U, info) for one symmetric float32 CPU matrix: U (n, n) is the upper Cholesky
    factor of H⁻¹ exactly as the record's three torch calls compute it; info ≠ 0 when H
    is not positive definite (U is then meaningless). The caller's ``h`` is not written.

    U is column-major (a transposed view), as torch's own factors.
    """
    potrf, potri = _routines() or (None, None)
    if potrf is None:
        raise RuntimeError("torch's LAPACK is not reachable here; check available() first")
    # A symmetric row-major matrix is its own column-major layout.
    a = h.contiguous().clone()
    info = _call(potrf, b"L", a)  # L in the column-major lower triangle
    if info == 0:
        info = _call(potri, b"L", a)  # H⁻¹ in the column-major lower triangle
    if info != 0:
        return a, info
    # potrf("U") reads the column-major upper triangle: H⁻¹'s other half, i.e. the transpose.
    b = a.mT.contiguous()
    info = _call(potrf, b"U", b)  # U in the column-major upper triangle of b
    return b.tril_().mT, info  # b's row-major upper triangle is U's lower one: zeroed


def torch_record_hinv(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, info) for a stack H (…, n, n) by the record's own calls: cholesky →
    cholesky_inverse → cholesky(upper); info ≠ 0 where a factorisation failed. Any device."""
    low, info = torch.linalg.cholesky_ex(h)
    up, info_up = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
    return up, info | info_up


@functools.cache
def available() -> bool:
    """True when :func:`record_hinv_lapack` reproduces torch's route bit for bit here
    (checked once, on two small matrices at and above :data:`MIN_DIRECT`)."""
    if _routines() is None:
        return False
    g = torch.Generator().manual_seed(0)
    for n in (MIN_DIRECT, 2 * MIN_DIRECT - 1):
        x = torch.randn(n, 2 * n, generator=g)
        h = x @ x.T / (2 * n) + 0.01 * torch.eye(n)
        try:
            u, info = record_hinv_lapack(h)
        except (OSError, ValueError):
            return False
        if info != 0 or not torch.equal(u, torch_record_hinv(h)[0]):
            return False
    return True


def usable(h: torch.Tensor) -> bool:
    """Whether :func:`record_hinv_lapack` may stand in for torch's calls on ``h``: a
    float32 CPU matrix of at least :data:`MIN_DIRECT` rows, with the binding available."""
    return h.device.type == "cpu" and h.dtype == torch.float32 and h.shape[-1] >= MIN_DIRECT and available()
