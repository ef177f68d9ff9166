"""Singular-value fingerprints of weight matrices (PR #2011 §13.1, WeightWatcher α).

Every function takes a state dict (``Mapping[str, Tensor]``) — trained, dequantised,
anything — and returns a tidy DataFrame. Only 2-D floating-point tensors with both
dimensions ≥ 2 are analysed; everything else (vectors, scalars, integer codes) is
skipped. Singular values of same-shape matrices are computed in one batched
``torch.linalg.svdvals`` call.

Definitions (m = min(rows, cols), σ₁ ≥ … ≥ σ_m):

* **stable rank** ‖W‖_F² / σ₁² = Σσᵢ² / σ₁².
* **entropy effective rank** exp(H(p)), p = σᵢ / Σσ (Roy & Vetterli 2007).
* **flatness** (PR #2011) = mean of −log₁₀(σᵢ/σ₁) over the *tail* i ≥ max(1, ⌊m·tail_start⌋)
  (0-based), ``tail_start`` = 1/8 by default: the PR drops the top 12.5 % "head" ranks
  (``S[max(1, len(S)//8):]``) and clips σᵢ/σ₁ at 1e-8. Bigger = faster-decaying tail.
  For a family the PR first averages σᵢ/σ₁ over layers, then takes the flatness.
* **α** — WeightWatcher's power-law exponent (see :func:`powerlaw_alpha`).
* **Δσ%** = 100·(σᵢ − σᵢ_ref)/σᵢ_ref per index (:func:`spectral_differential`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from qlab.errors import DataError, NumericalError

__all__ = [
    "FAMILIES",
    "PowerLawFit",
    "weight_family",
    "layer_index",
    "matrix_items",
    "singular_values",
    "entropy_effective_rank",
    "stable_rank",
    "flatness",
    "powerlaw_alpha",
    "spectrum_table",
    "spectral_summary",
    "family_spectra",
    "family_summary",
    "spectral_differential",
]

FAMILIES = ("q", "k", "v", "qkv", "attn_out", "mlp_gate", "mlp_in", "mlp_out", "embedding")

# Name endings of each family in the common naming schemes: Parameter Golf / qlab, GPT-2
# (fused c_attn), BERT, Llama / Mistral. ``attention.output.dense`` is tested before
# BERT's MLP ``output.dense``: the order of this table matters.
_FAMILY_SUFFIXES = (
    # Parameter Golf / qlab
    (".attn.c_q.weight", "q"),
    (".attn.c_k.weight", "k"),
    (".attn.c_v.weight", "v"),
    (".attn.proj.weight", "attn_out"),
    (".mlp.fc.weight", "mlp_in"),
    (".mlp.proj.weight", "mlp_out"),
    # GPT-2 (Conv1D weights are stored in × out; spectra do not care)
    (".attn.c_attn.weight", "qkv"),
    (".attn.c_proj.weight", "attn_out"),
    (".mlp.c_fc.weight", "mlp_in"),
    (".mlp.c_proj.weight", "mlp_out"),
    # BERT
    (".attention.self.query.weight", "q"),
    (".attention.self.key.weight", "k"),
    (".attention.self.value.weight", "v"),
    (".attention.output.dense.weight", "attn_out"),
    (".intermediate.dense.weight", "mlp_in"),
    (".output.dense.weight", "mlp_out"),
    # Llama / Mistral
    (".self_attn.q_proj.weight", "q"),
    (".self_attn.k_proj.weight", "k"),
    (".self_attn.v_proj.weight", "v"),
    (".self_attn.o_proj.weight", "attn_out"),
    (".mlp.gate_proj.weight", "mlp_gate"),
    (".mlp.up_proj.weight", "mlp_in"),
    (".mlp.down_proj.weight", "mlp_out"),
)
_EMBEDDING_NAMES = (
    "tok_emb.weight",
    "lm_head.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_tokens.weight",
)
# blocks.{i}. (qlab), h.{i}. (GPT-2), layer.{i}. (BERT), layers.{i}. (Llama)
_LAYER_RE = re.compile(r"(?:^|\.)(?:blocks|h|layer|layers)\.(\d+)\.")

# WeightWatcher constants (weightwatcher 0.7.x, constants.py / WW_powerlaw.py).
WW_EVALS_THRESH = 1e-5
WW_SMALL_N = 20
WW_SMALL_N_KMIN = 8


def weight_family(name: str) -> str | None:
    """The weight family of a parameter name (Parameter Golf, GPT-2, BERT or Llama naming), or None."""
    for suffix, family in _FAMILY_SUFFIXES:
        if name.endswith(suffix):
            return family
    if name in _EMBEDDING_NAMES or any(name.endswith("." + e) for e in _EMBEDDING_NAMES):
        return "embedding"
    return None


def layer_index(name: str) -> int | None:
    """Block index ``i`` of a ``blocks.{i}.`` (also ``h.``, ``layer.``, ``layers.``) name, else None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def matrix_items(
    state_dict: Mapping[str, torch.Tensor], families_only: bool = False
) -> dict[str, torch.Tensor]:
    """The analysable matrices of a state dict (2-D float, both dims ≥ 2), validated finite."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or not t.is_floating_point() or min(t.shape) < 2:
            continue
        if families_only and weight_family(name) is None:
            continue
        if not bool(torch.isfinite(t).all()):
            raise DataError(
                f"tensor {name!r} {tuple(t.shape)} contains NaN or Inf; spectra need finite weights"
            )
        out[name] = t
    if not out:
        raise DataError("state dict holds no 2-D floating-point matrix to analyse")
    return out


def singular_values(
    state_dict: Mapping[str, torch.Tensor],
    *,
    families_only: bool = False,
    batched: bool = True,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """Descending singular values (float64, CPU) of every analysable matrix.

    With ``batched`` the matrices are grouped by shape and each group goes through one
    ``torch.linalg.svdvals`` call on the stacked tensor; otherwise one call per matrix.
    ``dtype`` is the precision of the decomposition itself.
    """
    mats = matrix_items(state_dict, families_only)
    if not batched:
        return {n: torch.linalg.svdvals(w.detach().to(dtype)).double().cpu() for n, w in mats.items()}
    groups: dict[tuple[int, ...], list[str]] = {}
    for n, w in mats.items():
        groups.setdefault(tuple(w.shape), []).append(n)
    out: dict[str, torch.Tensor] = {}
    for names in groups.values():
        stack = torch.stack([mats[n].detach().to(dtype) for n in names])
        svals = torch.linalg.svdvals(stack).double().cpu()
        out.update(zip(names, svals))
    return {n: out[n] for n in mats}


def _check_sv(s: torch.Tensor | np.ndarray, what: str = "singular values") -> np.ndarray:
    a = np.asarray(s.detach().cpu().double() if isinstance(s, torch.Tensor) else s, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise DataError(f"{what}: expected a non-empty 1-D array, got shape {a.shape}")
    if not np.isfinite(a).all() or (a < 0).any():
        raise DataError(f"{what}: expected finite non-negative values")
    if a.max() <= 0:
        raise NumericalError(f"{what}: all zero (a zero matrix has no spectrum shape)")
    return a


def entropy_effective_rank(s: torch.Tensor | np.ndarray) -> float:
    """exp(−Σ pᵢ ln pᵢ) with pᵢ = σᵢ/Σσ (Roy & Vetterli 2007); zero σ contribute nothing."""
    a = _check_sv(s)
    p = a / a.sum()
    p = p[p > 0]
    return float(math.exp(-(p * np.log(p)).sum()))


def stable_rank(s: torch.Tensor | np.ndarray) -> float:
    """‖W‖_F² / ‖W‖₂² = Σσᵢ² / max σ²."""
    a = _check_sv(s)
    return float((a**2).sum() / a.max() ** 2)


def flatness(s: torch.Tensor | np.ndarray, tail_start: float = 0.125) -> float:
    """PR #2011 flatness: mean −log₁₀(σᵢ/σ₁) over i ≥ max(1, ⌊m·tail_start⌋), ratios clipped at 1e-8.

    ``s`` may be raw or already-normalised singular values in any order (sorted here).
    Returns NaN when the tail is empty (m = 1).
    """
    if not 0.0 <= tail_start < 1.0:
        raise DataError(f"tail_start must be in [0, 1), got {tail_start}")
    a = np.sort(_check_sv(s))[::-1]
    ratio = a / a[0]
    start = max(1, int(math.floor(len(ratio) * tail_start)))
    tail = ratio[start:]
    if tail.size == 0:
        return float("nan")
    return float(-np.log10(np.clip(tail, 1e-8, None)).mean())


@dataclass(frozen=True)
class PowerLawFit:
    """Result of :func:`powerlaw_alpha`: exponent, chosen λ_min, KS distance, tail size, σ(α)."""

    alpha: float
    xmin: float
    D: float
    n_tail: int
    sigma: float


def powerlaw_alpha(
    eigenvalues: torch.Tensor | np.ndarray, *, thresh: float = WW_EVALS_THRESH, chunk: int = 256
) -> PowerLawFit:
    """WeightWatcher's α: continuous power-law MLE of the ESD tail with λ_min by minimum KS.

    Reproduces ``weightwatcher`` 0.7.x defaults (``pl_package='ww'``, ``WWFit``): the ESD is
    the eigenvalues λ = σ² of WᵀW *without* normalisation (WW removed the 1/N in 0.6.5);
    eigenvalues ≤ ``thresh`` (1e-5) are dropped; every eigenvalue but the largest is a
    candidate λ_min = x_i (ascending order), with tail size n = N − i,
    α_i = 1 + n / Σ_{j≥i} ln(x_j/x_i) and KS distance
    D_i = max_k |1 − (x_{i+k}/x_i)^{1−α_i} − k/n| (k = 0..n−1; D_i = 1 if α_i ≤ 1).
    The first i minimising D wins; σ(α) = (α − 1)/√n. For N < 20 WW switches to its
    small-N rule (bias-corrected α = 1 + (n−1)/Σ ln, tails n ≥ 8), reproduced here
    as it effectively behaves (see :func:`_fit_small_n`). Checked against
    weightwatcher 0.7.7 itself in ``benchmarks/bench_spectra.py``.
    """
    x = np.sort(_check_sv(eigenvalues, "eigenvalues"))
    x = x[x > thresh]
    if x.size < 2:
        raise NumericalError(f"power-law fit needs ≥ 2 eigenvalues above {thresh}, got {x.size}")
    if x.size < WW_SMALL_N:
        return _fit_small_n(x)
    logx = np.log(x)
    big_n = x.size
    cand = np.arange(big_n - 1)
    n = (big_n - cand).astype(np.float64)
    suffix = np.cumsum(logx[::-1])[::-1][: big_n - 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + n / (suffix - n * logx[: big_n - 1])
    ds = np.ones(big_n - 1)
    for lo in range(0, big_n - 1, chunk):
        hi = min(lo + chunk, big_n - 1)
        ds[lo:hi] = _ks_rows(x, logx, alphas, lo, hi)
    i = int(np.argmin(ds))
    return PowerLawFit(
        float(alphas[i]), float(x[i]), float(ds[i]), int(n[i]), float((alphas[i] - 1) / math.sqrt(n[i]))
    )


def _ks_rows(x: np.ndarray, logx: np.ndarray, alphas: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """KS distances for candidates lo..hi−1, vectorised over a (rows × N) block."""
    big_n = x.size
    i = np.arange(lo, hi)[:, None]
    j = np.arange(big_n)[None, :]
    a = alphas[lo:hi, None]
    n = (big_n - i).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        theo = 1.0 - np.exp((1.0 - a) * (logx[None, :] - logx[lo:hi, None]))
    emp = (j - i) / n
    dev = np.where(j >= i, np.abs(theo - emp), 0.0)
    d = np.nanmax(dev, axis=1)
    valid = np.isfinite(alphas[lo:hi]) & (alphas[lo:hi] > 1)
    return np.where(valid, d, 1.0)


def _fit_small_n(x: np.ndarray) -> PowerLawFit:
    """WeightWatcher's small-N variant (N < 20) as it actually behaves in 0.7.x.

    WW's ``fit_powerlaw_smallN`` scores tails by J = D − 0.868/√n, but ``WWFit.__init__``
    then re-selects by the minimum KS distance D, so the effective rule is: tails with
    n ≥ 8, bias-corrected α = 1 + (n − 1)/Σ ln(x/x_min) > 1, first minimum of D.
    """
    logx = np.log(x)
    big_n = x.size
    best = None
    for i in range(big_n - 1):
        n = big_n - i
        s = logx[i:].sum() - n * logx[i]
        if n < WW_SMALL_N_KMIN or s <= 1e-12:
            continue
        alpha = 1.0 + (n - 1.0) / s
        if alpha <= 1.0:
            continue
        theo = 1.0 - (x[i:] / x[i]) ** (1.0 - alpha)
        d = float(np.max(np.abs(np.arange(n) / n - theo)))
        if best is None or d < best[0]:
            best = (d, alpha, x[i], n)
    if best is None:
        raise NumericalError(f"power-law fit failed: no valid tail among {big_n} eigenvalues")
    d, alpha, xmin, n = best
    return PowerLawFit(float(alpha), float(xmin), d, int(n), float((alpha - 1) / math.sqrt(n)))


def _meta(name: str, w: torch.Tensor) -> dict:
    return {
        "name": name,
        "family": weight_family(name) or "other",
        "layer": layer_index(name),
        "rows": int(w.shape[0]),
        "cols": int(w.shape[1]),
    }


def spectrum_table(state_dict: Mapping[str, torch.Tensor], *, families_only: bool = False) -> pd.DataFrame:
    """One row per (matrix, index): σ, σ/σ₁, eigenvalue σ², rank fraction (i+1)/m."""
    mats = matrix_items(state_dict, families_only)
    svals = singular_values(mats)
    frames = []
    for name, s in svals.items():
        a = s.numpy()
        m = a.size
        frame = pd.DataFrame(
            {
                "index": np.arange(m),
                "rank_frac": np.arange(1, m + 1) / m,
                "sigma": a,
                "sigma_norm": a / a[0] if a[0] > 0 else np.full(m, np.nan),
                "eigenvalue": a**2,
            }
        )
        for key, val in reversed(_meta(name, mats[name]).items()):
            frame.insert(0, key, val)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def spectral_summary(
    state_dict: Mapping[str, torch.Tensor],
    *,
    tail_start: float = 0.125,
    families_only: bool = False,
    fit_alpha: bool = True,
) -> pd.DataFrame:
    """One row per matrix: shape, σ_max/σ_min, ‖W‖_F, stable/effective rank, flatness, WW α."""
    mats = matrix_items(state_dict, families_only)
    rows = []
    for name, s in singular_values(mats).items():
        a = s.numpy()
        row = _meta(name, mats[name]) | {"rank": a.size, "sigma_max": float(a[0]), "sigma_min": float(a[-1])}
        row["frobenius"] = float(math.sqrt((a**2).sum()))
        if a[0] <= 0:  # an all-zero matrix has no spectrum shape
            rows.append(row)
            continue
        row |= {
            "stable_rank": stable_rank(a),
            "eff_rank": entropy_effective_rank(a),
            "flatness": flatness(a, tail_start),
        }
        if fit_alpha:
            row |= _alpha_columns(a**2)
        rows.append(row)
    return pd.DataFrame(rows)


def _alpha_columns(eigs: np.ndarray) -> dict:
    try:
        fit = powerlaw_alpha(eigs)
    except NumericalError:
        return {"alpha": float("nan"), "alpha_xmin": float("nan"), "alpha_D": float("nan"), "alpha_n_tail": 0}
    return {"alpha": fit.alpha, "alpha_xmin": fit.xmin, "alpha_D": fit.D, "alpha_n_tail": fit.n_tail}


def _family_stacks(
    state_dict: Mapping[str, torch.Tensor], families: Iterable[str] | None
) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per family: names and the (layers × m) array of descending σ; one rank per family.

    All-zero matrices (e.g. zero-initialised output projections) have no spectrum shape
    and are left out of the layer average.
    """
    wanted = set(FAMILIES if families is None else families)
    unknown = wanted - set(FAMILIES)
    if unknown:
        raise DataError(f"unknown weight families {sorted(unknown)}; known: {FAMILIES}")
    mats = {
        n: w for n, w in matrix_items(state_dict, families_only=True).items() if weight_family(n) in wanted
    }
    if not mats:
        raise DataError(f"state dict holds no matrix of families {sorted(wanted)}")
    svals = singular_values(mats)
    out: dict[str, tuple[list[str], np.ndarray]] = {}
    for fam in FAMILIES:
        names = [n for n in svals if weight_family(n) == fam and float(svals[n][0]) > 0]
        if not names:
            continue
        ranks = {svals[n].numel() for n in names}
        if len(ranks) != 1:
            raise DataError(f"family {fam!r} mixes matrix ranks {sorted(ranks)}; cannot average over layers")
        out[fam] = (names, np.stack([svals[n].numpy() for n in names]))
    if not out:
        raise NumericalError(f"every matrix of families {sorted(wanted)} is all-zero; no spectrum to average")
    return out


def _normalise_rows(stack: np.ndarray) -> np.ndarray:
    return stack / stack[:, :1]


def family_spectra(
    state_dict: Mapping[str, torch.Tensor], families: Iterable[str] | None = None
) -> pd.DataFrame:
    """Layer-averaged spectrum per family (PR #2011 Fig. "SVD spectrum").

    One row per (family, index): mean of σᵢ/σ₁ over layers (``sigma_norm``, what the PR
    plots), its std, and the mean raw σᵢ (``sigma``).
    """
    frames = []
    for fam, (names, stack) in _family_stacks(state_dict, families).items():
        norm = _normalise_rows(stack)
        m = stack.shape[1]
        frames.append(
            pd.DataFrame(
                {
                    "family": fam,
                    "index": np.arange(m),
                    "rank_frac": np.arange(1, m + 1) / m,
                    "sigma_norm": norm.mean(0),
                    "sigma_norm_std": norm.std(0),
                    "sigma": stack.mean(0),
                    "n_matrices": len(names),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def family_summary(
    state_dict: Mapping[str, torch.Tensor],
    *,
    tail_start: float = 0.125,
    families: Iterable[str] | None = None,
    fit_alpha: bool = True,
) -> pd.DataFrame:
    """One row per family: PR #2011 flatness of the layer-averaged σ/σ₁ curve, plus layer means.

    ``flatness`` is the PR's number (flatness of the averaged curve); ``flatness_mean``
    averages the per-matrix flatness instead. Ranks and α are means over layers.
    """
    rows = []
    for fam, (names, stack) in _family_stacks(state_dict, families).items():
        norm = _normalise_rows(stack)
        row = {"family": fam, "n_matrices": len(names), "rank": stack.shape[1]}
        row["flatness"] = flatness(norm.mean(0), tail_start)
        row["flatness_mean"] = float(np.mean([flatness(s, tail_start) for s in stack]))
        row["stable_rank"] = float(np.mean([stable_rank(s) for s in stack]))
        row["eff_rank"] = float(np.mean([entropy_effective_rank(s) for s in stack]))
        if fit_alpha:
            row["alpha"] = float(np.nanmean([_alpha_columns(s**2)["alpha"] for s in stack]))
        rows.append(row)
    return pd.DataFrame(rows)


def spectral_differential(
    state_dict: Mapping[str, torch.Tensor],
    ref_state_dict: Mapping[str, torch.Tensor],
    *,
    by: str = "family",
    normalized: bool = False,
    smooth: int = 1,
) -> pd.DataFrame:
    """Δσ% = 100·(σᵢ − σᵢ_ref)/σᵢ_ref per index, against a reference checkpoint.

    ``by="family"`` compares layer-averaged spectra (PR #2011 Fig. "differential");
    ``by="matrix"`` compares each matrix with the same-named reference matrix. With
    ``normalized`` the curves are σᵢ/σ₁ first. ``smooth`` > 1 applies a centred moving
    average of that window to Δσ% (the PR used 5). Indices where σ_ref = 0 give NaN.
    """
    if by not in ("family", "matrix"):
        raise DataError(f"by must be 'family' or 'matrix', got {by!r}")
    if smooth < 1:
        raise DataError(f"smooth must be ≥ 1, got {smooth}")
    cur, ref = _curves(state_dict, by, normalized), _curves(ref_state_dict, by, normalized)
    frames = []
    for key, s in cur.items():
        if key not in ref:
            continue
        r = ref[key]
        if r.size != s.size:
            raise DataError(f"{by} {key!r}: rank {s.size} vs reference rank {r.size}")
        with np.errstate(divide="ignore", invalid="ignore"):
            delta = np.where(r > 0, 100.0 * (s - r) / r, np.nan)
        if smooth > 1:
            delta = pd.Series(delta).rolling(smooth, center=True, min_periods=1).mean().to_numpy()
        m = s.size
        frames.append(
            pd.DataFrame(
                {
                    by: key,
                    "index": np.arange(m),
                    "rank_frac": np.arange(1, m + 1) / m,
                    "sigma": s,
                    "sigma_ref": r,
                    "delta_pct": delta,
                }
            )
        )
    if not frames:
        raise DataError(f"no {by} is present in both the state dict and the reference")
    return pd.concat(frames, ignore_index=True)


def _curves(state_dict: Mapping[str, torch.Tensor], by: str, normalized: bool) -> dict[str, np.ndarray]:
    if by == "family":
        out = {}
        for fam, (_, stack) in _family_stacks(state_dict, None).items():
            out[fam] = (_normalise_rows(stack) if normalized else stack).mean(0)
        return out
    out = {}
    for name, s in singular_values(state_dict).items():
        a = s.numpy()
        out[name] = a / a[0] if normalized and a[0] > 0 else a
    return out
