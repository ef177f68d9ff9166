"""GPTQ: quantize a weight matrix column by column, pushing each column's rounding error
onto the not-yet-quantized columns through the inverse Hessian (PAPERS.md §3).

Per matrix W (rows × cols) with Hessian H (cols × cols):

1. per-row scale s from a clip rule on the *original* W (default SDClip k = 12.85, int6),
   rounded to ``scale_dtype`` before use;
2. dead columns (diag H = 0) get H_jj = 1 and W[:, j] = 0;
3. act-order: columns sorted by descending diag H (stable sort), undone at the end;
4. damping: H += damp·mean(diag H)·I; Hinv = upper Cholesky factor of H⁻¹. A failed
   factorisation retries with damping ×10 (``max_tries`` in all), recorded in ``meta``;
5. for each column j: q = clamp(round(w_j/s), −R, R), err = (w_j − q·s)/Hinv[j, j], and
   w_k −= err·Hinv[j, k] for the later columns k — applied lazily: immediately within a
   sub-block of ``sub_block`` columns, by one matrix product for the rest of the
   ``block_size`` block, and by one matrix product per block for all later blocks.

:func:`gptq_quantize_many` runs exactly the same code on a stack of same-shape matrices
(batched Cholesky, batched matmuls, act-order by gather), so one Python loop over columns
serves a whole group of matrices; :func:`gptq_quantize` is that code with a batch of one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from qlab.errors import NumericalError, QuantError
from qlab.quant.clip import ClipRule, clip_to_scale, compute_clip
from qlab.quant.tensor import QuantizedTensor, check_bits, check_finite, qmax_symmetric

DEFAULT_CLIP_PARAMS = {"k": 12.85}


@dataclass(frozen=True)
class _Options:
    """The knobs shared by :func:`gptq_quantize` and :func:`gptq_quantize_many`."""

    bits: int
    clip_rule: str | ClipRule
    clip_params: Mapping | None
    block_size: int
    sub_block: int
    damp: float
    act_order: bool
    scale_dtype: torch.dtype
    max_tries: int

    def check(self, name: str | None) -> None:
        check_bits(self.bits, name)
        if self.block_size < 1 or self.sub_block < 1:
            raise QuantError(f"tensor {name!r}: block_size and sub_block must be ≥ 1")
        if not self.damp >= 0:
            raise QuantError(f"tensor {name!r}: damp must be ≥ 0, got {self.damp}")
        if self.max_tries < 1:
            raise QuantError(f"tensor {name!r}: max_tries must be ≥ 1")


@dataclass
class _Prepared:
    """One group of same-shape matrices, ready for the column loop (float32, batched)."""

    names: list[str]
    w_t: torch.Tensor  # (N, cols, rows): permuted, dead columns zeroed, transposed
    hinv: torch.Tensor  # (N, cols, cols) upper Cholesky of the damped, permuted H⁻¹
    scale: torch.Tensor  # (N, rows) in scale_dtype
    perm: torch.Tensor | None  # (N, cols) act-order permutation
    metas: list[dict]


def _check_inputs(w: torch.Tensor, h: torch.Tensor, name: str) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise QuantError(f"tensor {name!r}: GPTQ needs a 2-D float matrix, got {tuple(w.shape)} {w.dtype}")
    check_finite(w, name)
    cols = w.shape[1]
    if tuple(h.shape) != (cols, cols):
        raise QuantError(f"tensor {name!r}: Hessian has shape {tuple(h.shape)}, expected ({cols}, {cols})")
    # A NaN/Inf in H does not always break the Cholesky (an Inf diagonal entry just
    # zeroes its column of H⁻¹), so it has to be caught here or it yields bad codes.
    check_finite(h, name, what="Hessian entries")


def _upper_chol_inv(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of H⁻¹ (Uᵀ U = H⁻¹) from one Cholesky and one triangular solve.

    With J the reversal permutation, J H J = M Mᵀ (M lower) gives H⁻¹ = (J M⁻¹ J)ᵀ (J M⁻¹ J)
    and J M⁻¹ J is upper triangular with a positive diagonal, so by uniqueness it is the
    factor GPTQ wants. This avoids forming H⁻¹ and factorising it again (about 2× faster).
    """
    low, info = torch.linalg.cholesky_ex(h.flip(-2, -1))
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device).expand_as(h)
    return torch.linalg.solve_triangular(low, eye, upper=False).flip(-2, -1), info


def upper_cholesky_of_inverse(
    h: torch.Tensor, damp: float, max_tries: int = 5, names: list[str] | None = None
) -> tuple[torch.Tensor, list[float], list[int]]:
    """Batched Hinv = upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹ for a stack H (N, n, n).

    λ starts at ``damp`` and grows ×10 for the matrices whose factorisation fails (not
    positive definite, or non-finite), up to ``max_tries`` attempts (see ``_upper_chol_inv``).
    Returns Hinv, the final λ and the number of retries per matrix; raises NumericalError
    if any matrix never factorises.
    """
    n_mat = h.shape[0]
    names = names or [f"#{i}" for i in range(n_mat)]
    mean_diag = h.diagonal(dim1=-2, dim2=-1).mean(dim=-1)
    out = torch.empty_like(h)
    lam = [float("nan")] * n_mat
    retries = [0] * n_mat
    todo = torch.arange(n_mat, device=h.device)
    for attempt in range(max_tries):
        factor = damp * 10.0**attempt
        hd = h[todo] if attempt else h.clone()
        hd.diagonal(dim1=-2, dim2=-1).add_((factor * mean_diag[todo])[:, None])
        up, info = _upper_chol_inv(hd)
        ok = (info == 0) & torch.isfinite(up).flatten(1).all(dim=1)
        done = todo[ok]
        out[done] = up[ok]
        for i in done.tolist():
            lam[i], retries[i] = factor, attempt
        todo = todo[~ok]
        if todo.numel() == 0:
            return out, lam, retries
    failed = [names[i] for i in todo.tolist()]
    raise NumericalError(
        f"Cholesky of the damped Hessian failed for {failed} after {max_tries} tries "
        f"(damping {damp:g} → {damp * 10.0 ** (max_tries - 1):g} × mean diag); "
        "is the Hessian symmetric positive semi-definite and finite?"
    )


def _permute(w: torch.Tensor, h: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder the columns of W and rows+columns of H by a per-matrix permutation (gather)."""
    n_mat, rows, cols = w.shape
    w = w.gather(2, perm[:, None, :].expand(n_mat, rows, cols))
    h = h.gather(1, perm[:, :, None].expand(n_mat, cols, cols))
    return w, h.gather(2, perm[:, None, :].expand(n_mat, cols, cols))


def _prepare(names: list[str], ws: list[torch.Tensor], hs: list[torch.Tensor], o: _Options) -> _Prepared:
    """Scales from the original weights, dead columns, act-order, damping and Hinv."""
    w = torch.stack([x.to(torch.float32) for x in ws])
    h = torch.stack([x.to(w.device, torch.float32) for x in hs])
    hdiag_raw = h.diagonal(dim1=-2, dim2=-1).clone()
    clips = [
        compute_clip(w[i], o.bits, o.clip_rule, o.clip_params, hdiag_raw[i], n) for i, n in enumerate(names)
    ]
    scale = clip_to_scale(torch.stack(clips)[..., 0], qmax_symmetric(o.bits), o.scale_dtype)
    dead = hdiag_raw == 0
    h.diagonal(dim1=-2, dim2=-1).masked_fill_(dead, 1.0)
    w.masked_fill_(dead[:, None, :], 0.0)
    perm = None
    if o.act_order:
        perm = torch.argsort(h.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)
        w, h = _permute(w, h, perm)
    hinv, lam, retries = upper_cholesky_of_inverse(h, o.damp, o.max_tries, names)
    metas = [
        {
            "method": "gptq",
            "clip": getattr(o.clip_rule, "__name__", str(o.clip_rule)),
            "clip_params": dict(o.clip_params or {}),
            "damp": lam[i],
            "cholesky_retries": retries[i],
            "dead_columns": int(dead[i].sum()),
            "act_order": o.act_order,
            "block_size": o.block_size,
        }
        for i in range(len(names))
    ]
    return _Prepared(names, w.transpose(1, 2).contiguous(), hinv, scale, perm, metas)


def _column_loop(w_t: torch.Tensor, hinv: torch.Tensor, s: torch.Tensor, qmax: int, block: int, sub: int):
    """The GPTQ sweep on transposed weights w_t (N, cols, rows), modified in place.

    Returns float codes (N, cols, rows) in the permuted column order.
    """
    n_mat, cols, rows = w_t.shape
    codes = torch.empty_like(w_t)
    diag = hinv.diagonal(dim1=-2, dim2=-1)[:, :, None]  # (N, cols, 1)
    for b1 in range(0, cols, block):
        b2 = min(b1 + block, cols)
        err = torch.empty(n_mat, b2 - b1, rows, dtype=w_t.dtype, device=w_t.device)
        for s1 in range(b1, b2, sub):
            s2 = min(s1 + sub, b2)
            for j in range(s1, s2):
                w = w_t[:, j]
                q = torch.round(w / s).clamp_(-qmax, qmax)
                codes[:, j] = q
                e = torch.addcmul(w, q, s, value=-1.0).div_(diag[:, j])
                err[:, j - b1] = e
                if j + 1 < s2:
                    w_t[:, j + 1 : s2].addcmul_(hinv[:, j, j + 1 : s2, None], e[:, None, :], value=-1.0)
            if s2 < b2:
                w_t[:, s2:b2].baddbmm_(
                    hinv[:, s1:s2, s2:b2].transpose(1, 2), err[:, s1 - b1 : s2 - b1], alpha=-1.0
                )
        if b2 < cols:
            w_t[:, b2:].baddbmm_(hinv[:, b1:b2, b2:].transpose(1, 2), err, alpha=-1.0)
    return codes


def _finish(p: _Prepared, codes_t: torch.Tensor, bits: int) -> dict[str, QuantizedTensor]:
    """Undo the transpose and act-order permutation and wrap each matrix."""
    codes = codes_t.transpose(1, 2)
    if p.perm is not None:
        inv = torch.argsort(p.perm, dim=-1)
        codes = codes.gather(2, inv[:, None, :].expand_as(codes))
    codes = codes.to(torch.int8)
    return {
        name: QuantizedTensor(
            codes=codes[i].contiguous(),
            scale=p.scale[i][:, None].clone(),
            zero=None,
            bits=bits,
            shape=tuple(codes.shape[1:]),
            scheme="int",
            meta=p.metas[i],
        )
        for i, name in enumerate(p.names)
    }


def _run_group(
    names: list[str], ws: list[torch.Tensor], hs: list[torch.Tensor], o: _Options, timings: dict | None
) -> dict[str, QuantizedTensor]:
    """Prepare, sweep and wrap one stack of same-shape matrices (optionally timing the parts)."""
    sync = torch.cuda.synchronize if timings is not None and ws[0].is_cuda else (lambda: None)
    with torch.no_grad():
        t0 = time.perf_counter()
        p = _prepare(names, ws, hs, o)
        sync()
        t1 = time.perf_counter()
        scale = p.scale.to(torch.float32)
        codes_t = _column_loop(p.w_t, p.hinv, scale, qmax_symmetric(o.bits), o.block_size, o.sub_block)
        out = _finish(p, codes_t, o.bits)
        sync()
        t2 = time.perf_counter()
    if timings is not None:
        timings["prepare_s"] = timings.get("prepare_s", 0.0) + (t1 - t0)
        timings["sweep_s"] = timings.get("sweep_s", 0.0) + (t2 - t1)
    for name, w in zip(names, ws):
        out[name].meta["dtype"] = str(w.dtype).removeprefix("torch.")
    return out


def _options(bits, clip_rule, clip_params, block_size, sub_block, damp, act_order, scale_dtype, max_tries):
    if clip_params is None and clip_rule == "sdclip":
        clip_params = DEFAULT_CLIP_PARAMS
    return _Options(
        bits, clip_rule, clip_params, block_size, sub_block, damp, act_order, scale_dtype, max_tries
    )


def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int = 6,
    clip_rule: str | ClipRule = "sdclip",
    clip_params: Mapping | None = None,
    block_size: int = 128,
    sub_block: int = 16,
    damp: float = 0.01,
    act_order: bool = True,
    scale_dtype: torch.dtype = torch.float16,
    max_tries: int = 5,
    name: str | None = None,
    timings: dict | None = None,
) -> QuantizedTensor:
    """GPTQ one matrix ``w`` (rows × cols) with Hessian ``H`` (cols × cols); symmetric, per-row.

    ``clip_params`` default to SDClip's k = 12.85 when ``clip_rule`` is ``"sdclip"``.
    Runs on the device of ``w``. If ``timings`` is a dict, seconds spent preparing
    (scales, act-order, Hinv) and sweeping columns are added to it. Raises QuantError
    for bad input and NumericalError when the damped Hessian never factorises.
    """
    label = name or "weight"
    o = _options(bits, clip_rule, clip_params, block_size, sub_block, damp, act_order, scale_dtype, max_tries)
    o.check(label)
    _check_inputs(w, H, label)
    return _run_group([label], [w], [H], o, timings)[label]


def gptq_quantize_many(
    weights: Mapping[str, torch.Tensor],
    hessians: Mapping[str, torch.Tensor],
    *,
    bits: int = 6,
    clip_rule: str | ClipRule = "sdclip",
    clip_params: Mapping | None = None,
    block_size: int = 128,
    sub_block: int = 16,
    damp: float = 0.01,
    act_order: bool = True,
    scale_dtype: torch.dtype = torch.float16,
    max_tries: int = 5,
    max_batch: int | None = None,
    progress: bool = False,
    timings: dict | None = None,
) -> dict[str, QuantizedTensor]:
    """GPTQ many matrices at once: same-shape matrices are stacked and run as one batch.

    Gives the same codes as calling :func:`gptq_quantize` on each matrix (same code path,
    batch of N instead of 1). ``max_batch`` caps the stack size to bound memory;
    ``timings`` as in :func:`gptq_quantize`. The result keeps the order of ``weights``.
    """
    o = _options(bits, clip_rule, clip_params, block_size, sub_block, damp, act_order, scale_dtype, max_tries)
    for name, w in weights.items():
        o.check(name)
        if name not in hessians:
            raise QuantError(f"tensor {name!r}: no Hessian given to gptq_quantize_many")
        _check_inputs(w, hessians[name], name)
    groups: dict[tuple, list[str]] = {}
    for name, w in weights.items():
        groups.setdefault((tuple(w.shape), str(w.device)), []).append(name)
    chunks = []
    for names in groups.values():
        step = max_batch or len(names)
        chunks += [names[i : i + step] for i in range(0, len(names), step)]
    done: dict[str, QuantizedTensor] = {}
    for names in tqdm(chunks, desc="gptq", disable=not progress):
        done.update(_run_group(names, [weights[n] for n in names], [hessians[n] for n in names], o, timings))
    return {name: done[name] for name in weights}
