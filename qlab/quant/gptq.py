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

import numpy as np
import torch
from tqdm.auto import tqdm

from qlab.checks import all_finite
from qlab.errors import NumericalError, QuantError
from qlab.quant import lapack
from qlab.quant.clip import ClipRule, clip_to_scale, compute_clip
from qlab.quant.rounding import NearestRounding, RateAwareRounding
from qlab.quant.tensor import QuantizedTensor, check_bits, check_finite, qmax_symmetric

DEFAULT_CLIP_PARAMS = {"k": 12.85}


ARITHMETIC = ("record", "fast")


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
    arithmetic: str = "record"
    rate_lambda: float = 0.0

    def check(self, name: str | None) -> None:
        check_bits(self.bits, name)
        if self.block_size < 1 or self.sub_block < 1:
            raise QuantError(f"tensor {name!r}: block_size and sub_block must be ≥ 1")
        if not self.damp >= 0:
            raise QuantError(f"tensor {name!r}: damp must be ≥ 0, got {self.damp}")
        if self.max_tries < 1:
            raise QuantError(f"tensor {name!r}: max_tries must be ≥ 1")
        if not (isinstance(self.rate_lambda, (int, float)) and self.rate_lambda >= 0):
            raise QuantError(f"tensor {name!r}: rate_lambda must be a number ≥ 0, got {self.rate_lambda!r}")
        if self.arithmetic not in ARITHMETIC:
            raise QuantError(
                f"tensor {name!r}: arithmetic must be one of {ARITHMETIC}, got {self.arithmetic!r}"
            )


@dataclass
class _Factor:
    """One distinct Hessian, ready for every matrix that reads its input."""

    hdiag_raw: torch.Tensor  # (cols,) diag H as collected (for Hessian-aware clips)
    dead: torch.Tensor  # (cols,) bool: diag H = 0
    perm: torch.Tensor | None  # (cols,) act-order permutation
    hinv: torch.Tensor  # (cols, cols) upper Cholesky of the damped, permuted H⁻¹
    damp: float
    retries: int


@dataclass
class _Prepared:
    """One group of same-shape matrices, ready for the column loop (float32, batched)."""

    names: list[str]
    w_t: torch.Tensor  # (N, cols, rows): dead columns zeroed, permuted, transposed
    hinv: list[torch.Tensor]  # N × (cols, cols); not stacked: the record's sweep never needs the copy
    scale: torch.Tensor  # (N, rows) in scale_dtype
    perm: torch.Tensor | None  # (N, cols)
    metas: list[dict]


def _check_inputs(w: torch.Tensor, h: torch.Tensor, name: str) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise QuantError(f"tensor {name!r}: GPTQ needs a 2-D float matrix, got {tuple(w.shape)} {w.dtype}")
    if w.numel() == 0:
        raise QuantError(f"tensor {name!r}: GPTQ needs a non-empty matrix, got shape {tuple(w.shape)}")
    check_finite(w, name)
    cols = w.shape[1]
    if tuple(h.shape) != (cols, cols):
        raise QuantError(f"tensor {name!r}: Hessian has shape {tuple(h.shape)}, expected ({cols}, {cols})")
    # A NaN/Inf in H does not always break the Cholesky (an Inf diagonal entry just
    # zeroes its column of H⁻¹), so it has to be caught here or it yields bad codes.
    check_finite(h, name, what="Hessian entries")


def _record_route(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The record's Hinv, bit-identical to it: on the CPU the LAPACK routines torch calls,
    called directly (:mod:`qlab.quant.lapack`: the same bits without torch's copies)."""
    if not lapack.usable(h):
        return lapack.torch_record_hinv(h)
    pairs = [lapack.record_hinv_lapack(x) for x in h]
    info = torch.tensor([i for _, i in pairs])
    return (pairs[0][0][None] if len(pairs) == 1 else _stack_in_layout([u for u, _ in pairs])), info


def _fast_route(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of H⁻¹ (Uᵀ U = H⁻¹) from one Cholesky and one triangular inverse.

    With J the reversal permutation, J H J = M Mᵀ (M lower) gives H⁻¹ = (J M⁻¹ J)ᵀ (J M⁻¹ J)
    and J M⁻¹ J is upper triangular with a positive diagonal, so by uniqueness it is the
    factor GPTQ wants: n³/3 + n³/3 flops against the record route's 4n³/3. On the CPU the
    triangular inverse is LAPACK's ``trtri`` (torch has only the n³ ``trsm`` with an
    identity right-hand side); the same values up to float rounding.
    """
    if h.device.type != "cpu":
        low, info = torch.linalg.cholesky_ex(h.flip(-2, -1))
        eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device).expand_as(h)
        return torch.linalg.solve_triangular(low, eye, upper=False).flip(-2, -1), info
    from scipy.linalg import lapack  # CPU only: LAPACK's potrf + trtri on each matrix

    flipped = h.flip(-2, -1).numpy()
    out, info = np.empty_like(flipped), np.zeros(len(flipped), dtype=np.int32)
    potrf, trtri = lapack.get_lapack_funcs(("potrf", "trtri"), (flipped,))
    for i, a in enumerate(flipped):
        low, info[i] = potrf(a, lower=1, clean=1, overwrite_a=0)
        if info[i] == 0:
            out[i], info[i] = trtri(low, lower=1, overwrite_c=1)
    return torch.from_numpy(np.ascontiguousarray(out[:, ::-1, ::-1])), torch.from_numpy(info)


def upper_cholesky_of_inverse(
    h: torch.Tensor,
    damp: float,
    max_tries: int = 5,
    names: list[str] | None = None,
    route: str = "record",
    mean_diag: torch.Tensor | None = None,
    overwrite: bool = False,
) -> tuple[torch.Tensor, list[float], list[int]]:
    """Batched Hinv = upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹ for a stack H (N, n, n).

    λ starts at ``damp`` and grows ×10 for the matrices whose factorisation fails (not
    positive definite, or non-finite), up to ``max_tries`` attempts. ``route`` is
    ``"record"`` (three factorisations, as the record) or ``"fast"`` (see ``_fast_route``);
    ``mean_diag`` (N,) defaults to the mean of H's diagonal; ``overwrite=True`` lets it
    damp ``h`` in place (saves a copy). Returns Hinv, the final λ and the number of
    retries per matrix; raises NumericalError if any matrix never factorises.
    """
    n_mat = h.shape[0]
    names = names or [f"#{i}" for i in range(n_mat)]
    if mean_diag is None:
        mean_diag = h.diagonal(dim1=-2, dim2=-1).contiguous().mean(dim=-1)
    factorise = _record_route if route == "record" else _fast_route
    raw_diag = h.diagonal(dim1=-2, dim2=-1).clone()
    out = None
    lam = [float("nan")] * n_mat
    retries = [0] * n_mat
    todo = torch.arange(n_mat, device=h.device)
    for attempt in range(max_tries):
        factor = damp * 10.0**attempt
        hd = h if attempt == 0 and overwrite else h[todo] if attempt else h.clone()
        hd.diagonal(dim1=-2, dim2=-1).copy_(raw_diag[todo])  # damping only ever touches the diagonal
        hd.diagonal(dim1=-2, dim2=-1).add_((factor * mean_diag[todo])[:, None])
        up, info = factorise(hd)
        ok = (info.to(h.device) == 0) & torch.tensor([all_finite(u) for u in up], device=h.device)
        if attempt == 0 and bool(ok.all()):
            return up, [factor] * n_mat, retries
        out = torch.empty_like(h) if out is None else out
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


# The copies below write into preallocated outputs: on the CPU a fresh multi-megabyte
# tensor costs page faults that took longer than the copy itself (4x on 8192×512).


def _permute_square(h: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Reorder rows and columns of a stack H (N, n, n) alike: a pure copy (row
    ``index_select`` then column ``index_select``, ~4x faster than ``h[p][:, p]``)."""
    out = torch.empty_like(h)
    for hi, p, oi in zip(h, perm, out, strict=True):
        torch.index_select(hi.index_select(0, p), 1, p, out=oi)
    return out


def _transposed_rows(ws: list[torch.Tensor], perm: torch.Tensor | None) -> torch.Tensor:
    """float32 Wᵀ (N, cols, rows) of same-shape matrices W (rows, cols), its rows (W's
    columns) in the order ``perm[i]`` when given: a contiguous transpose into one
    scratch buffer, then whole-row selects (a select on the strided view is 3x slower)."""
    rows, cols = ws[0].shape
    out = torch.empty(len(ws), cols, rows, dtype=torch.float32, device=ws[0].device)
    scratch = out[0] if perm is None else torch.empty_like(out[0])
    for i, w in enumerate(ws):
        if perm is None:
            out[i].copy_(w.t())
        else:
            scratch.copy_(w.t())
            torch.index_select(scratch, 0, perm[i], out=out[i])
    return out


def _stack_in_layout(xs: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack of square matrices that keeps them column-major when they all are, as
    LAPACK's factors come: a plain copy instead of a transposing one (2.5x faster on
    eleven 2048²); the sweep's products and rank-1 rows read either layout."""
    if all(x.mT.is_contiguous() for x in xs):
        return torch.stack([x.mT for x in xs]).mT
    return torch.stack(xs)


def _factorise(hs: list[torch.Tensor], names: list[str], o: _Options) -> list[_Factor]:
    """Dead columns, act-order and Hinv of a stack of same-size Hessians, as the record does.

    The caller's Hessians are never written: the permutation (or, without act-order, a
    clone) is the one copy that gets damped and factorised.
    """
    h = torch.stack([x.to(torch.float32) for x in hs]) if len(hs) > 1 else hs[0].to(torch.float32)[None]
    hdiag_raw = h.diagonal(dim1=-2, dim2=-1).clone()
    dead = hdiag_raw == 0
    # contiguous, as the record's H.diag(): a mean over the strided diagonal view sums in
    # another order; the record averages and sorts the diagonal before permuting
    diag = hdiag_raw.masked_fill(dead, 1.0)
    mean_diag = diag.mean(dim=-1)
    if o.act_order:
        perm = torch.argsort(diag + (o.damp * mean_diag)[:, None], dim=-1, descending=True, stable=True)
        h = _permute_square(h, perm)
        h.diagonal(dim1=-2, dim2=-1).copy_(diag.gather(1, perm))
    else:
        perm = None
        h = h.clone()
        h.diagonal(dim1=-2, dim2=-1).copy_(diag)
    hinv, lam, retries = upper_cholesky_of_inverse(
        h, o.damp, o.max_tries, names, o.arithmetic, mean_diag, overwrite=True
    )
    return [
        _Factor(hdiag_raw[i], dead[i], None if perm is None else perm[i], hinv[i], lam[i], retries[i])
        for i in range(len(hs))
    ]


def _prepare(names: list[str], ws: list[torch.Tensor], factors: list[_Factor], o: _Options) -> _Prepared:
    """Scales from the original weights, dead columns zeroed, columns in act-order."""
    clips = [compute_clip(w.to(torch.float32), o.bits, o.clip_rule, o.clip_params, f.hdiag_raw, n)
             for n, w, f in zip(names, ws, factors, strict=True)]  # fmt: skip
    scale = clip_to_scale(torch.stack(clips)[..., 0], qmax_symmetric(o.bits), o.scale_dtype)
    dead = torch.stack([f.dead for f in factors])
    perm = None
    if o.act_order:
        perm = torch.stack([f.perm for f in factors if f.perm is not None])  # act order: all set
        dead = dead.gather(1, perm)
    w_t = _transposed_rows(ws, perm)
    if bool(dead.any()):
        w_t.masked_fill_(dead[:, :, None], 0.0)  # dead columns of W are rows of Wᵀ
    metas = [
        {
            "method": "gptq",
            "clip": getattr(o.clip_rule, "__name__", str(o.clip_rule)),
            "clip_params": dict(o.clip_params or {}),
            "damp": f.damp,
            "cholesky_retries": f.retries,
            "dead_columns": int(f.dead.sum()),
            "act_order": o.act_order,
            "block_size": o.block_size,
            "arithmetic": o.arithmetic,
            **({"rate_lambda": o.rate_lambda} if o.rate_lambda else {}),
        }
        for f in factors
    ]
    return _Prepared(names, w_t, [f.hinv for f in factors], scale, perm, metas)


def _record_loop(
    w_t: torch.Tensor, hinv: list[torch.Tensor], s: torch.Tensor, rounding: NearestRounding, block: int
):
    """The record's sweep, batched: within a block every column's error updates the
    block's remaining columns at once (rank-1), then one product per block updates the
    later columns, in the record's orientation (errors rows × B times Hinv B × rest).

    Element by element the same operations in the same order as the record, so the
    codes are bit-identical to it. w_t (N, cols, rows) is modified in place."""
    n_mat, cols, rows = w_t.shape
    codes = torch.empty_like(w_t)
    buf = torch.empty(n_mat * min(block, cols) * rows, dtype=w_t.dtype, device=w_t.device)
    later_buf = torch.empty(rows * max(cols - block, 0), dtype=w_t.dtype, device=w_t.device)
    for b1 in range(0, cols, block):
        b2 = min(b1 + block, cols)
        wb = w_t[:, b1:b2]  # the record works on a copy; these columns are not read again
        hb = torch.stack([h[b1:b2, b1:b2] for h in hinv])
        err = torch.empty(n_mat, b2 - b1, rows, dtype=w_t.dtype, device=w_t.device)
        rounding.start_block(b1, b2)
        for j in range(b2 - b1):
            w = wb[:, j]
            q = rounding(w, s, hb[:, j, j, None])
            codes[:, b1 + j] = q
            # the record's (w − q·s) / Hinv_jj, written straight into err's column
            e = torch.div(w - q * s, hb[:, j, j, None], out=err[:, j])
            # the product rounded, then the difference, as the record (addcmul_ fuses
            # them on this CPU: other bits); from column j + 1, as column j is never read
            # again; the product into a buffer kept across columns (no allocation)
            rest = b2 - b1 - j - 1
            prod = torch.mul(
                hb[:, j, j + 1 :, None], e[:, None, :], out=buf[: n_mat * rest * rows].view(n_mat, rest, rows)
            )
            wb[:, j + 1 :] -= prod
        rounding.end_block(codes[:, b1:b2])
        if b2 < cols:  # one product per matrix, as the record: no stack of the eleven Hinv
            later = later_buf[: rows * (cols - b2)].view(rows, cols - b2)
            for i, h in enumerate(hinv):
                w_t[i, b2:] -= torch.mm(err[i].T, h[b1:b2, b2:], out=later).T
    return codes


def _column_loop(
    w_t: torch.Tensor, hinv: torch.Tensor, s: torch.Tensor, rounding: NearestRounding, block: int, sub: int
):
    """The GPTQ sweep on transposed weights w_t (N, cols, rows), modified in place.

    Returns float codes (N, cols, rows) in the permuted column order.
    """
    n_mat, cols, rows = w_t.shape
    codes = torch.empty_like(w_t)
    diag = hinv.diagonal(dim1=-2, dim2=-1)[:, :, None]  # (N, cols, 1)
    for b1 in range(0, cols, block):
        b2 = min(b1 + block, cols)
        err = torch.empty(n_mat, b2 - b1, rows, dtype=w_t.dtype, device=w_t.device)
        rounding.start_block(b1, b2)
        for s1 in range(b1, b2, sub):
            s2 = min(s1 + sub, b2)
            for j in range(s1, s2):
                w = w_t[:, j]
                q = rounding(w, s, diag[:, j])
                codes[:, j] = q
                e = torch.addcmul(w, q, s, value=-1.0).div_(diag[:, j])
                err[:, j - b1] = e
                if j + 1 < s2:
                    w_t[:, j + 1 : s2].addcmul_(hinv[:, j, j + 1 : s2, None], e[:, None, :], value=-1.0)
            if s2 < b2:
                w_t[:, s2:b2].baddbmm_(
                    hinv[:, s1:s2, s2:b2].transpose(1, 2), err[:, s1 - b1 : s2 - b1], alpha=-1.0
                )
        rounding.end_block(codes[:, b1:b2])
        if b2 < cols:
            w_t[:, b2:].baddbmm_(hinv[:, b1:b2, b2:].transpose(1, 2), err, alpha=-1.0)
    return codes


def _finish(p: _Prepared, codes_t: torch.Tensor, bits: int) -> dict[str, QuantizedTensor]:
    """Undo the transpose and act-order permutation and wrap each matrix."""
    codes_t = codes_t.to(torch.int8)  # exact: clamped integers; a quarter of the bytes to move
    if p.perm is not None:  # rows of codes_t back in the original column order
        inv = torch.argsort(p.perm, dim=-1)
        for i, q in enumerate(inv):
            codes_t[i] = codes_t[i].index_select(0, q)
    codes = codes_t.transpose(1, 2).contiguous()
    return {
        name: QuantizedTensor(
            codes=codes[i],
            scale=p.scale[i][:, None].clone(),
            zero=None,
            bits=bits,
            shape=tuple(codes.shape[1:]),
            scheme="int",
            meta=p.metas[i],
        )
        for i, name in enumerate(p.names)
    }


def _sweep(p: _Prepared, o: _Options) -> torch.Tensor:
    scale = p.scale.to(torch.float32)
    qmax = qmax_symmetric(o.bits)
    rounding = NearestRounding(qmax)
    if o.rate_lambda:
        d_mean_sq = torch.stack([h.diagonal().pow(2).mean() for h in p.hinv])[:, None]
        rounding = RateAwareRounding(qmax, o.rate_lambda, p.w_t, scale, d_mean_sq)
    if o.arithmetic == "record":
        return _record_loop(p.w_t, p.hinv, scale, rounding, o.block_size)
    return _column_loop(p.w_t, _stack_in_layout(p.hinv), scale, rounding, o.block_size, o.sub_block)


def _timed(timings: dict | None, key: str, on_cuda: bool, fn, *args):
    """fn(*args), adding its seconds to ``timings[key]`` when timings is a dict."""
    t0 = time.perf_counter()
    out = fn(*args)
    if timings is not None:
        if on_cuda:
            torch.cuda.synchronize()
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
    return out


def _factorise_distinct(
    hessians: Mapping[str, torch.Tensor], names: list[str], o: _Options, timings: dict | None
) -> dict[str, _Factor]:
    """One factorisation per distinct Hessian (matrices reading one input share it: c_q,
    c_k and c_v), batched over Hessians of one size on a GPU; keyed by every matrix name."""
    owners: dict[int, list[str]] = {}
    for name in names:
        owners.setdefault(id(hessians[name]), []).append(name)
    by_size: dict[tuple, list[list[str]]] = {}
    for group in owners.values():
        h = hessians[group[0]]
        # LAPACK factorises one matrix at a time anyway; a stack only adds memory traffic
        key = (tuple(h.shape), str(h.device)) if h.is_cuda else (id(h),)
        by_size.setdefault(key, []).append(group)
    out: dict[str, _Factor] = {}
    on_cuda = any(h.is_cuda for h in hessians.values())
    with torch.no_grad():
        for groups in by_size.values():
            hs = [hessians[g[0]] for g in groups]
            factors = _timed(timings, "prepare_s", on_cuda, _factorise, hs, ["/".join(g) for g in groups], o)
            for group, f in zip(groups, factors, strict=True):
                out.update(dict.fromkeys(group, f))
    return out


def _run_group(
    names: list[str], ws: list[torch.Tensor], factors: list[_Factor], o: _Options, timings: dict | None
) -> dict[str, QuantizedTensor]:
    """Prepare, sweep and wrap one stack of same-shape matrices (optionally timing the parts)."""
    on_cuda = ws[0].is_cuda
    with torch.no_grad():
        p = _timed(timings, "prepare_s", on_cuda, _prepare, names, ws, factors, o)
        out = _timed(timings, "sweep_s", on_cuda, lambda: _finish(p, _sweep(p, o), o.bits))
    for name, w in zip(names, ws, strict=True):
        out[name].meta["dtype"] = str(w.dtype).removeprefix("torch.")
    return out


def _options(bits, clip_rule, clip_params, block_size, sub_block, damp, act_order, scale_dtype, max_tries,
             arithmetic, rate_lambda=0.0):  # fmt: skip
    if clip_params is None and clip_rule == "sdclip":
        clip_params = DEFAULT_CLIP_PARAMS
    return _Options(bits, clip_rule, clip_params, block_size, sub_block, damp, act_order, scale_dtype,
                    max_tries, arithmetic, rate_lambda)  # fmt: skip


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
    arithmetic: str = "record",
    rate_lambda: float = 0.0,
    name: str | None = None,
    timings: dict | None = None,
) -> QuantizedTensor:
    """GPTQ one matrix ``w`` (rows × cols) with Hessian ``H`` (cols × cols); symmetric, per-row.

    ``clip_params`` default to SDClip's k = 12.85 when ``clip_rule`` is ``"sdclip"``.
    ``arithmetic="record"`` computes exactly what the record computes (bit-identical
    codes); ``"fast"`` takes the cheaper Hinv route and lazy updates (``sub_block``), the
    same maths with other float rounding, so rare rounding ties differ. ``rate_lambda`` > 0
    prices each code's bits (:class:`qlab.quant.rounding.RateAwareRounding`); 0 is plain
    GPTQ. Runs on the device
    of ``w``. If ``timings`` is a dict, seconds spent preparing (scales, act-order, Hinv)
    and sweeping columns are added to it. Raises QuantError for bad input and
    NumericalError when the damped Hessian never factorises.
    """
    label = name or "weight"
    return gptq_quantize_many(
        {label: w}, {label: H}, bits=bits, clip_rule=clip_rule, clip_params=clip_params,
        block_size=block_size, sub_block=sub_block, damp=damp, act_order=act_order, scale_dtype=scale_dtype,
        max_tries=max_tries, arithmetic=arithmetic, rate_lambda=rate_lambda, timings=timings,
    )[label]  # fmt: skip


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
    arithmetic: str = "record",
    rate_lambda: float = 0.0,
    max_batch: int | None = None,
    progress: bool = False,
    timings: dict | None = None,
) -> dict[str, QuantizedTensor]:
    """GPTQ many matrices at once: same-shape matrices are stacked and run as one batch,
    and matrices given the *same* Hessian tensor (one input, as ``collect_hessians``
    returns them) share its act-order permutation and Hinv, factorised once.

    Gives the same codes as calling :func:`gptq_quantize` on each matrix (same code path,
    batch of N instead of 1). ``max_batch`` caps the stack size to bound memory;
    ``arithmetic`` and ``timings`` as in :func:`gptq_quantize`. The result keeps the
    order of ``weights``.
    """
    o = _options(bits, clip_rule, clip_params, block_size, sub_block, damp, act_order, scale_dtype, max_tries,
                 arithmetic, rate_lambda)  # fmt: skip
    for name, w in weights.items():
        o.check(name)
        if name not in hessians:
            raise QuantError(f"tensor {name!r}: no Hessian given to gptq_quantize_many")
        _check_inputs(w, hessians[name], name)
    factors = _factorise_distinct(hessians, list(weights), o, timings)
    groups: dict[tuple, list[str]] = {}
    for name, w in weights.items():
        groups.setdefault((tuple(w.shape), str(w.device)), []).append(name)
    chunks = []
    for names in groups.values():
        step = max_batch or len(names)
        chunks += [names[i : i + step] for i in range(0, len(names), step)]
    done: dict[str, QuantizedTensor] = {}
    for names in tqdm(chunks, desc="gptq", disable=not progress):
        done.update(_run_group(names, [weights[n] for n in names], [factors[n] for n in names], o, timings))
    return {name: done[name] for name in weights}
