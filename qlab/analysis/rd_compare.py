"""Cross-matrix rate–distortion views: std vs compression ratio, R–D curves against
the Gaussian bound, and int6 against 2:4 sparsity at the block level.

Sweeps of single settings live in :mod:`qlab.analysis.rd`; where the next kilobyte of
the artifact is best spent, measured with intervals, in :mod:`qlab.analysis.marginal`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from qlab.analysis.rd import (
    Fit,
    linear_fit,
    load_matrices,
    quantize_setting,
    tensor_family,
)
from qlab.compress import predict as P
from qlab.compress.entropy import order0_entropy
from qlab.errors import ConfigError
from qlab.quant.codebook import quantize_lloyd_max, quantize_nf4
from qlab.quant.rtn import quantize_rtn
from qlab.quant.sparsity import BITS_PER_BLOCK, pack_24, unpack_24
from qlab.quant.tensor import QuantizedTensor, dequantize

__all__ = ["StdRatio", "std_vs_ratio", "rd_curve", "rd_bounds", "sparsity_budget"]

PI_E_OVER_6 = math.pi * math.e / 6


@dataclass
class StdRatio:
    """Per-matrix table and two fits: ``ratio ≈ a + b·σ`` (the paper's) and
    ``bits/param ≈ a + b·log₂σ`` (the one theory says is linear)."""

    table: pd.DataFrame
    fit: Fit
    log_fit: Fit
    clip: float
    bits: int


def std_vs_ratio(
    state_dict_or_tensors: str | os.PathLike | Mapping[str, torch.Tensor],
    bits: int = 6,
    clip: float | None = None,
    *,
    k_ref: float = 12.85,
    min_numel: int = P.SMALL_REGION_BYTES,
    max_rows: int | None = None,
) -> StdRatio:
    """Matrix std vs compression ratio under one fixed clip width shared by all matrices.

    Reading of PR #1394's claim (R² = 0.995): "fixed clip width" is a fixed *absolute*
    clip c (hence a fixed step s = c/R) used for every matrix. Then a matrix's code
    entropy is ≈ h(N(0, σ²)) − log₂ s = log₂σ + const, so its size depends on σ — which is
    what the regression measures. (A fixed *k*, c = k·σ, makes the code histogram
    σ-independent, so there would be nothing to regress.) Default c = ``k_ref`` × the
    median matrix σ, so typical matrices sit near the record's k. The ratio is int8
    code bytes (1 per parameter, as serialised) over predicted brotli-11 bytes.
    """
    mats = load_matrices(state_dict_or_tensors, min_numel=min_numel, max_rows=max_rows)
    stds = {n: float(w.std(correction=0)) for n, w in mats.items()}
    c = float(clip) if clip is not None else k_ref * float(np.median(list(stds.values())))
    if not (math.isfinite(c) and c > 0):
        raise ConfigError(f"std_vs_ratio: clip must be finite and > 0, got {c}")
    rows = []
    for name, w in mats.items():
        q = quantize_setting_fixed(w, bits, c)
        nbytes = float(P.predict_table({"w": q.codes})["predicted_bytes"].sum()) * (1 + P.BROTLI_OVERHEAD)
        rows.append(
            dict(
                name=name,
                family=tensor_family(name),
                numel=w.numel(),
                std=stds[name],
                clip=c,
                k_equiv=c / stds[name] if stds[name] > 0 else math.nan,
                entropy=order0_entropy(q.codes),
                predicted_bytes=nbytes,
                bits_per_param=8 * nbytes / w.numel(),
                ratio=w.numel() / nbytes,
            )  # fmt: skip
        )
    table = pd.DataFrame(rows)
    fit = linear_fit(table["std"], table["ratio"])
    log_fit = linear_fit(np.log2(table["std"]), table["bits_per_param"])
    return StdRatio(table, fit, log_fit, c, bits)


def quantize_setting_fixed(w: torch.Tensor, bits: int, clip: float) -> QuantizedTensor:
    """Per-row RTN with the same absolute clip ``clip`` for every row."""

    return quantize_rtn(w, bits, clip=torch.full((w.shape[0], 1), float(clip)))


# --------------------------------------------------------------------------- R–D curves


def _stats(w: torch.Tensor, q: QuantizedTensor) -> tuple[float, float, float]:
    """(code entropy, scale bits per parameter, MSE/σ²) of one quantized tensor."""
    var = float(w.var(correction=0))
    mse = float(((w - dequantize(q)) ** 2).mean())
    side = sum(t.numel() * t.element_size() * 8 for t in (q.scale, q.zero) if t is not None)
    return order0_entropy(q.codes), side / w.numel(), mse / var


def _aggregate(quantizer: str, bits: float, k: float, per: list[tuple[int, float, float, float]]) -> dict:
    n = sum(p[0] for p in per)
    rate = sum(p[0] * p[1] for p in per) / n
    side = sum(p[0] * p[2] for p in per) / n
    dist = sum(p[0] * p[3] for p in per) / n
    bound = 2.0 ** (-2 * rate)
    gap = 10 * math.log10(dist / bound) if dist > 0 else -math.inf
    return dict(
        quantizer=quantizer, bits=bits, k=k, rate=rate, rate_with_scales=rate + side, distortion=dist,
        rd_bound=bound, ecsq=PI_E_OVER_6 * bound, gap_db=gap,
    )  # fmt: skip


def rd_curve(
    state_dict_or_tensors: str | os.PathLike | Mapping[str, torch.Tensor],
    bits: Iterable[int] = range(2, 9),
    ks: Iterable[float] = (4.0, 8.0, 12.85, 20.0),
    *,
    nf4: bool = True,
    lloyd_levels: Iterable[int] = (4, 8, 16, 32, 64),
    min_numel: int = P.SMALL_REGION_BYTES,
    max_rows: int | None = 256,
    progress: bool = False,
) -> pd.DataFrame:
    """Rate (bits/param, order-0 entropy of the codes) vs distortion (MSE/σ², numel-weighted
    over matrices, each normalised by its own σ²) for int-b SDClip over ``ks``, NF4 (block
    64) and global Lloyd-Max codebooks, with the Gaussian bound D(R) = 2^(−2R) and the
    entropy-coded uniform quantizer line (πe/6)·2^(−2R) (1.53 dB above) at each point's rate.
    ``rate_with_scales`` adds the fp16 scales.
    """
    mats = load_matrices(state_dict_or_tensors, min_numel=min_numel, max_rows=max_rows)
    rows = []
    grid = [(int(b), float(k)) for b in bits for k in ks]
    for b, k in tqdm(grid, desc="rd int", disable=not progress):
        per = [(w.numel(), *_stats(w, quantize_setting(w, b, "sdclip", k))) for w in mats.values()]
        rows.append(_aggregate(f"int{b} sdclip", b, k, per))
    if nf4:
        per = [(w.numel(), *_stats(w, quantize_nf4(w, name=n))) for n, w in mats.items()]
        rows.append(_aggregate("nf4", 4, math.nan, per))
    for levels in lloyd_levels:
        coded, _ = quantize_lloyd_max(mats, k=int(levels))
        per = [(w.numel(), *_stats(w, coded[n])) for n, w in mats.items()]
        rows.append(_aggregate("lloyd-max", math.log2(levels), math.nan, per))
    out = pd.DataFrame(rows)
    out["family"] = out["quantizer"].str.replace(r"^int\d+ ", "int ", regex=True)
    return out


def rd_bounds(rates: Iterable[float]) -> pd.DataFrame:
    """D(R) = 2^(−2R) and the ECSQ line (πe/6)·2^(−2R) (σ² = 1) on a rate grid, for plots."""
    r = np.asarray(list(rates), float)
    return pd.DataFrame({"rate": r, "rd_bound": 2.0 ** (-2 * r), "ecsq": PI_E_OVER_6 * 2.0 ** (-2 * r)})


def sparsity_budget(state_dict: Mapping[str, torch.Tensor], min_numel: int = 1024) -> pd.DataFrame:
    """Bits per 4-element block and relative MSE of int6 SDClip (k = 12.85) against 2:4
    sparsity (PR #1818's packing), nominal and after brotli-11 (codes or payload plus 2
    bytes of fp16 scale per row), summed over every matrix whose width is a multiple of 4
    and that has at least ``min_numel`` weights. ``rel_mse`` is Σ error² / Σ (w − mean)²."""
    tot = {"int6": [0.0, 0.0, 0.0], "2:4": [0.0, 0.0, 0.0]}  # bytes, squared error, blocks
    var_sum = 0.0
    for name, w in state_dict.items():
        if w.dim() != 2 or w.shape[1] % 4 or w.numel() < min_numel:
            continue
        w = w.detach().float()
        q = quantize_setting(w, 6, "sdclip", 12.85)
        p = pack_24(w, name=name)
        var_sum += float(((w - w.mean()) ** 2).sum())
        for key, nbytes, w_hat in (
            ("int6", P.measure_compressed_bytes(q.codes.numpy().tobytes()) + 2 * w.shape[0], dequantize(q)),
            ("2:4", P.measure_compressed_bytes(p.payload) + 2 * w.shape[0], unpack_24(p)),
        ):
            tot[key][0] += nbytes
            tot[key][1] += float(((w - w_hat) ** 2).sum())
            tot[key][2] += w.numel() / 4
    if var_sum == 0.0:
        raise ConfigError(f"sparsity_budget: no matrix with a width divisible by 4 and ≥ {min_numel} weights")
    return pd.DataFrame(
        [
            {"scheme": key, "nominal_bits_per_block": nominal, "brotli_bits_per_block": 8 * b / blocks,
             "rel_mse": err / var_sum}
            for (key, (b, err, blocks)), nominal in zip(tot.items(), (24, BITS_PER_BLOCK), strict=True)
        ]
    )  # fmt: skip
