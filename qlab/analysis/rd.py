"""Rate–distortion sweeps of real weights: what each bit and each unit of clip width buys.

Every function returns a tidy DataFrame (one row per tensor × setting, or per setting).
A *setting* is (bits b, clip rule, k): SDClip (c = k·σ_row) is swept over ``ks``; rules
without a k (``quantile_search``, ``mse_grid``, ``absmax``) are run once per b. Bytes are
the predicted brotli-11 bytes of the records' serialisation (codes + fp16 scales,
:mod:`qlab.compress.predict`); ``real_bytes`` optionally runs brotli-11 on a row sample.

Theory for Gaussian weights lives in :mod:`qlab.analysis.rd_theory`; the cross-matrix
analyses (std vs ratio, R–D curves, byte allocation) in :mod:`qlab.analysis.rd_compare`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from qlab.analysis import rd_theory
from qlab.analysis.spectra import weight_family
from qlab.compress import predict as P
from qlab.compress.entropy import order0_entropy, row_entropy
from qlab.data.tokenizer import ByteTables
from qlab.errors import ConfigError, QuantError
from qlab.eval.bpb import evaluate_bpb
from qlab.loaders.readers import iter_tensors
from qlab.model.gpt import parameter_family
from qlab.model.modes import swapped_weights
from qlab.quant.rtn import quantize_rtn
from qlab.quant.tensor import QuantizedTensor, dequantize, qmax_symmetric

__all__ = [
    "DEFAULT_KS",
    "K_RULES",
    "EvalFn",
    "Fit",
    "linear_fit",
    "load_matrices",
    "tensor_family",
    "quantize_setting",
    "predicted_bytes",
    "sampled_real_bytes",
    "hessian_error",
    "bpb_eval_fn",
    "sweep",
    "summarize_sweep",
    "compare_sdclip_quantile",
    "compare_from_sweep",
    "bk_equivalence",
]

DEFAULT_KS = tuple(float(k) for k in range(6, 21, 2)) + (12.85,)
K_RULES = ("sdclip", "hessian_sdclip")  # rules whose width is k·σ
EvalFn = Callable[[nn.Module], float]
REAL_SAMPLE_BYTES = 1 << 17


# --------------------------------------------------------------------------- small helpers


@dataclass(frozen=True)
class Fit:
    """Least-squares line y ≈ intercept + slope·x and its coefficient of determination."""

    slope: float
    intercept: float
    r2: float
    n: int


def linear_fit(x: Iterable[float], y: Iterable[float]) -> Fit:
    """Ordinary least squares of y on x (R² = 1 − SS_res/SS_tot; NaN when y is constant)."""
    xs, ys = np.asarray(list(x), float), np.asarray(list(y), float)
    ok = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[ok], ys[ok]
    if xs.size < 2 or np.ptp(xs) == 0:
        return Fit(float("nan"), float("nan"), float("nan"), int(xs.size))
    slope, intercept = np.polyfit(xs, ys, 1)
    ss_tot = float(((ys - ys.mean()) ** 2).sum())
    ss_res = float(((ys - (intercept + slope * xs)) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return Fit(float(slope), float(intercept), r2, int(xs.size))


_COARSE = {"q": "attention", "k": "attention", "v": "attention", "qkv": "attention", "attn_out": "attention",
           "mlp_gate": "mlp", "mlp_in": "mlp", "mlp_out": "mlp", "embedding": "embedding"}  # fmt: skip


def tensor_family(name: str) -> str:
    """embedding / attention / mlp / control for qlab's GPT names, embedding / attention /
    mlp for GPT-2, BERT and Llama names (see ``weight_family``), else ``other``."""

    try:
        return parameter_family(name)
    except ConfigError:
        return _COARSE.get(weight_family(name) or "", "other")


def load_matrices(
    src: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    min_numel: int = P.SMALL_REGION_BYTES,
    names: Iterable[str] | None = None,
    max_rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """The 2-D float matrices of a checkpoint (path or state dict) as float32.

    Keeps those with more than ``min_numel`` elements (or exactly ``names``); with
    ``max_rows`` each keeps only that many evenly spaced rows (faster sweeps; every
    statistic here is per row, so a row sample is an unbiased estimate).
    """
    wanted = None if names is None else set(names)
    if isinstance(src, Mapping):
        items: Iterable = src.items()
    else:
        items = iter_tensors(src, names=wanted)
    out = {}
    for name, t in items:
        if wanted is not None and name not in wanted:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            continue
        if wanted is None and t.numel() <= min_numel:
            continue
        if not bool(torch.isfinite(t).all()):
            raise QuantError(f"tensor {name!r}: weights contain NaN/Inf")
        t = t.to(torch.float32)
        if max_rows is not None and t.shape[0] > max_rows:
            t = t[torch.linspace(0, t.shape[0] - 1, max_rows).round().long()]
        out[name] = t
    if not out:
        raise ConfigError(f"no 2-D float matrices with more than {min_numel} elements to sweep")
    return out


def quantize_setting(
    w: torch.Tensor, bits: int, rule: str, k: float = math.nan, hdiag: torch.Tensor | None = None
) -> QuantizedTensor:
    """Per-row symmetric RTN of ``w`` with clip ``rule`` (``k`` for the k·σ rules)."""
    params = {"k": float(k)} if rule in K_RULES else {}
    return quantize_rtn(
        w, bits, clip=rule, clip_params=params, hdiag=hdiag if rule == "hessian_sdclip" else None
    )


def predicted_bytes(stored: object) -> float:
    """Predicted brotli-11 bytes of one stored tensor's data (codes + scales), no skeleton."""
    return P.predict_data_bytes({"w": stored})


def sampled_real_bytes(q: QuantizedTensor, budget: int = REAL_SAMPLE_BYTES) -> float:
    """Real brotli-11 (records' shuffle) of evenly spaced rows of the codes, scaled to the
    whole tensor, plus the real bytes of the scales. Slow: ~1 MB/s."""
    codes = q.codes.reshape(q.codes.shape[0], -1)
    n_rows = max(1, min(codes.shape[0], budget // max(1, codes.shape[1])))
    idx = torch.linspace(0, codes.shape[0] - 1, n_rows).round().long().unique()
    sample = codes[idx].contiguous()
    got = P.measure_compressed_bytes(sample.view(torch.uint8).numpy().tobytes())
    scale = P.measure_compressed_bytes(q.scale.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return got * codes.numel() / sample.numel() + scale


def hessian_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) with ΔW = W − Ŵ: the layer-output error the Hessian predicts."""
    if h.shape != (w.shape[1], w.shape[1]):
        raise QuantError(f"Hessian of shape {tuple(h.shape)} does not fit a matrix of shape {tuple(w.shape)}")
    d = (w - w_hat).to(torch.float64)
    return float(((d @ h.to(torch.float64)) * d).sum())


def _row_std(w: torch.Tensor) -> torch.Tensor:
    return w.std(dim=1, correction=0)


def _k_eff(q: QuantizedTensor, w: torch.Tensor) -> float:
    """Mean over rows of the clip width in row-σ units, c_i/σ_i = s_i·R/σ_i."""
    sig = _row_std(w)
    c = q.scale.to(torch.float32).reshape(-1) * qmax_symmetric(q.bits)
    ok = sig > 0
    return float((c[ok] / sig[ok]).mean()) if bool(ok.any()) else float("nan")


# --------------------------------------------------------------------------- model evaluation


def bpb_eval_fn(
    val_tokens: torch.Tensor,
    byte_tables: ByteTables,
    *,
    seq_len: int,
    max_tokens: int | None = None,
    batch_seqs: int = 8,
) -> EvalFn:
    """``model -> val_bpb`` on (the first ``max_tokens`` of) ``val_tokens``."""

    def run(model: nn.Module) -> float:
        res = evaluate_bpb(
            model, val_tokens, byte_tables, seq_len=seq_len, batch_seqs=batch_seqs, max_tokens=max_tokens
        )
        return float(res.val_bpb)

    return run


# --------------------------------------------------------------------------- sweeps


def _settings(bits: Iterable[int], ks: Iterable[float], rules: Iterable[str]) -> list[tuple[int, str, float]]:
    out = []
    for b in bits:
        for rule in rules:
            out += [(int(b), rule, float(k)) for k in ks] if rule in K_RULES else [(int(b), rule, math.nan)]
    return out


def _tensor_row(
    name: str, w: torch.Tensor, b: int, rule: str, k: float, h: torch.Tensor | None, real: bool
) -> tuple[dict, torch.Tensor]:
    t0 = time.perf_counter()
    q = quantize_setting(w, b, rule, k, None if h is None else torch.diagonal(h))
    seconds = time.perf_counter() - t0
    w_hat = dequantize(q)
    var = float(w.var(correction=0))
    mse = float(((w - w_hat) ** 2).mean())
    nbytes = predicted_bytes(q)
    row = dict(
        name=name, family=tensor_family(name), rows=w.shape[0], cols=w.shape[1], numel=w.numel(),
        std=math.sqrt(var), bits=b, rule=rule, k=k, k_eff=_k_eff(q, w),
        entropy=order0_entropy(q.codes), row_entropy=row_entropy(q.codes),
        predicted_bytes=nbytes, bits_per_param=8 * nbytes / w.numel(),
        real_bytes=sampled_real_bytes(q) if real else math.nan,
        mse=mse, rel_mse=mse / var if var > 0 else math.nan,
        hessian_err=hessian_error(w, w_hat, h) if h is not None else math.nan,
        seconds=seconds,
    )  # fmt: skip
    return row, w_hat


def sweep(
    state_dict_or_tensors: str | os.PathLike | Mapping[str, torch.Tensor],
    bits: Iterable[int] = range(2, 9),
    ks: Iterable[float] = DEFAULT_KS,
    clip_rules: Iterable[str] = ("sdclip", "quantile_search"),
    *,
    hessians: Mapping[str, torch.Tensor] | None = None,
    model: nn.Module | None = None,
    eval_fn: EvalFn | None = None,
    real_bytes: bool = False,
    min_numel: int = P.SMALL_REGION_BYTES,
    max_rows: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per tensor × (b, rule, k): entropy, bytes, MSE, Hessian error, Δval_bpb.

    ``hessians`` (name → H) add ``hessian_err`` = tr(ΔW H ΔWᵀ) and enable the
    ``hessian_sdclip`` rule. With ``model`` + ``eval_fn`` every setting quantizes *all*
    swept tensors of the model at once, evaluates, restores the weights, and writes
    ``delta_bpb`` (the same value on every tensor row of that setting; the unquantized
    model's bpb is in ``base_bpb``). ``real_bytes`` runs brotli-11 on a row sample.
    """
    mats = load_matrices(state_dict_or_tensors, min_numel=min_numel, max_rows=max_rows)
    hessians = hessians or {}
    rules = tuple(clip_rules)
    if "hessian_sdclip" in rules and not all(n in hessians for n in mats):
        raise ConfigError("clip rule 'hessian_sdclip' needs a Hessian for every swept tensor")
    if (model is None) != (eval_fn is None):
        raise ConfigError("Δval_bpb needs both a model and an eval_fn")
    if max_rows is not None and model is not None:
        raise ConfigError("max_rows subsamples rows, so the model cannot be evaluated with it")
    base = eval_fn(model) if model is not None and eval_fn is not None else math.nan
    rows = []
    for b, rule, k in tqdm(_settings(bits, ks, rules), desc="sweep", disable=not progress):
        setting_rows, replacements = [], {}
        for name, w in mats.items():
            row, w_hat = _tensor_row(name, w, b, rule, k, hessians.get(name), real_bytes)
            setting_rows.append(row)
            if model is not None:
                replacements[name] = w_hat
        if model is not None and eval_fn is not None:  # both or neither (checked above)
            with swapped_weights(model, replacements):
                bpb = eval_fn(model)
            for row in setting_rows:
                row.update(base_bpb=base, delta_bpb=bpb - base)
        rows += setting_rows
    return pd.DataFrame(rows)


def summarize_sweep(df: pd.DataFrame) -> pd.DataFrame:
    """Model-level totals per setting: bytes and errors summed, entropy numel-weighted."""
    keys = ["bits", "rule", "k"]
    g = df.assign(_h=df["entropy"] * df["numel"], _r=df["rel_mse"] * df["numel"]).groupby(keys, dropna=False)
    out = g.agg(
        numel=("numel", "sum"), predicted_bytes=("predicted_bytes", "sum"), real_bytes=("real_bytes", "sum"),
        mse_sum=("_r", "sum"), h_sum=("_h", "sum"), hessian_err=("hessian_err", "sum"),
        k_eff=("k_eff", "mean"), seconds=("seconds", "sum"),
    ).reset_index()  # fmt: skip
    out["entropy"] = out.pop("h_sum") / out["numel"]
    out["rel_mse"] = out.pop("mse_sum") / out["numel"]
    out["bits_per_param"] = 8 * out["predicted_bytes"] / out["numel"]
    if df["real_bytes"].isna().all():
        out["real_bytes"] = math.nan
    if "hessian_err" in df and df["hessian_err"].isna().all():
        out["hessian_err"] = math.nan
    if "delta_bpb" in df:
        out = out.merge(df.groupby(keys, dropna=False)["delta_bpb"].first().reset_index(), on=keys)
    return out


def compare_sdclip_quantile(
    state_dict_or_tensors: str | os.PathLike | Mapping[str, torch.Tensor],
    bits: Iterable[int] = (6,),
    ks: Iterable[float] = DEFAULT_KS,
    *,
    rules: Iterable[str] = ("sdclip", "quantile_search"),
    hessians: Mapping[str, torch.Tensor] | None = None,
    model: nn.Module | None = None,
    eval_fn: EvalFn | None = None,
    max_rows: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """SDClip and quantile search side by side: one row per (b, rule, k) with model bytes,
    relative MSE, Hessian error, Δbpb, quantization wall time, and ``r2_size_vs_k``.

    ``r2_size_vs_k`` (per rule and b) is the R² of each tensor's bits/param regressed on
    log₂ of its effective clip width k_eff = mean c_i/σ_i, pooled over tensors and
    settings: how well size can be known from k *before* quantizing (theory:
    H ≈ b − log₂k + const, so log₂k is the natural regressor). For SDClip k_eff = k.
    """
    df = sweep(
        state_dict_or_tensors, bits, ks, rules, hessians=hessians, model=model, eval_fn=eval_fn,
        max_rows=max_rows, progress=progress,
    )  # fmt: skip
    return compare_from_sweep(df)


def compare_from_sweep(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`compare_sdclip_quantile`'s table from an existing :func:`sweep` result."""
    out = summarize_sweep(df)
    r2 = {}
    for key, g in df.groupby(["bits", "rule"]):
        r2[key] = linear_fit(np.log2(g["k_eff"]), g["bits_per_param"]).r2
    out["r2_size_vs_k"] = [r2[(b, r)] for b, r in zip(out["bits"], out["rule"])]
    return out


def _step_k(b: int, k: float, convention: str) -> float:
    """SDClip k giving the bin width of ``convention``: ours k·σ/R, PR #1394's k·σ/2^(b−1)."""
    if convention == "qlab":
        return k
    if convention == "pr":
        return k * qmax_symmetric(b) / 2 ** (b - 1)
    raise ConfigError(f"convention must be 'qlab' or 'pr', got {convention!r}")


def bk_equivalence(
    state_dict_or_tensors: str | os.PathLike | Mapping[str, torch.Tensor],
    bits: Iterable[int] = range(3, 8),
    ks: Iterable[float] = (4.0, 6.0, 8.0, 12.85),
    *,
    conventions: Iterable[str] = ("qlab", "pr"),
    min_numel: int = P.SMALL_REGION_BYTES,
    max_rows: int | None = None,
) -> pd.DataFrame:
    """(b, k) vs (b+1, 2k) on real weights: entropy and bytes of both, and their gap.

    Under PR #1394's bin width (``"pr"``: c/2^(b−1)) both share the step, so only the
    tails differ; under ours (``"qlab"``: c/R) the (b+1, 2k) step is finer by 2R/(2R+1).
    ``gauss_*`` columns are the exact entropies of a Gaussian for comparison.
    """
    mats = load_matrices(state_dict_or_tensors, min_numel=min_numel, max_rows=max_rows)
    rows = []
    for conv in conventions:
        for b in bits:
            for k in ks:
                rows += [_bk_row(name, w, int(b), float(k), conv) for name, w in mats.items()]
    return pd.DataFrame(rows)


def _bk_row(name: str, w: torch.Tensor, b: int, k: float, conv: str) -> dict:
    lo = quantize_setting(w, b, "sdclip", _step_k(b, k, conv))
    hi = quantize_setting(w, b + 1, "sdclip", _step_k(b + 1, 2 * k, conv))
    h_lo, h_hi = order0_entropy(lo.codes), order0_entropy(hi.codes)
    by_lo, by_hi = predicted_bytes(lo), predicted_bytes(hi)
    step = "pr" if conv == "pr" else "qlab"
    return dict(
        name=name, family=tensor_family(name), numel=w.numel(), convention=conv, bits=b, k=k,
        entropy_bk=h_lo, entropy_b1_2k=h_hi, entropy_gap=h_hi - h_lo,
        bytes_bk=by_lo, bytes_b1_2k=by_hi, bytes_ratio=by_hi / by_lo,
        gauss_entropy_bk=rd_theory.gaussian_quant_entropy(b, k, step),
        gauss_entropy_b1_2k=rd_theory.gaussian_quant_entropy(b + 1, 2 * k, step),
    )  # fmt: skip
