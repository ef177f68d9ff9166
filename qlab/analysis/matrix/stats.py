"""Statistics over matrix results: which regularizer effects are signal and which are seed noise.

All functions take the ``pipeline`` (or ``hidden``) table of
:class:`~qlab.analysis.matrix.results.MatrixResults` and return a DataFrame.

* :func:`seed_summary` — mean ± std (ddof 1) and n over seeds per (base, variant, group).
* :func:`paired_deltas` — Δ = variant − control of the same base, seed and group; the
  paired t-test (``scipy.stats.ttest_rel``) across seeds; the *seed noise* = std over
  seeds of the control; ``exceeds_noise`` = |mean Δ| > seed noise.
* :func:`reg_deltas` — seed-mean rows in the papers' ``reg_deltas()`` schema
  (``baseline_bpb``, ``delta_mbpb``), ready for :mod:`qlab.plots.pr2011`.
* :func:`sign_table` — the same regularizer's Δ on every base and whether the signs agree.
* :func:`lambda_budget` — each pair at reduced λ vs the best of its single regularizers.

Differences of ``*_bpb`` columns are reported in mBPB (×1000); other columns as measured.
With one seed, std, p and the noise comparison are NaN / missing rather than invented.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from qlab.analysis.papers import with_deltas
from qlab.errors import DataError

__all__ = [
    "seed_summary",
    "paired_test",
    "t_halfwidth",
    "paired_deltas",
    "reg_deltas",
    "sign_table",
    "lambda_budget",
]

_META = ["regs", "lambda", "lambdas"]


def _need(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"{what}: table lacks column(s) {missing}")
    if df.empty:
        raise DataError(f"{what}: the table is empty")


def _scale(metric: str) -> tuple[float, str]:
    return (1e3, "mBPB") if metric.endswith("_bpb") else (1.0, "as measured")


def _group_cols(df: pd.DataFrame, group: str | None) -> list[str]:
    if group is None:
        return []
    if group not in df.columns:
        raise DataError(f"group column {group!r} not in the table")
    return [group]


def seed_summary(df: pd.DataFrame, metric: str = "final_bpb", group: str | None = "policy") -> pd.DataFrame:
    """Mean, std (ddof 1; NaN for one seed), n and standard error of ``metric`` over seeds."""
    g = _group_cols(df, group)
    _need(df, ["base", "variant", "seed", metric, *g], "seed_summary")
    keys = ["base", "variant", *g]
    agg = df.groupby(keys, sort=False)[metric].agg(["mean", "std", "count"]).reset_index()
    agg = agg.rename(columns={"count": "n"})
    agg["sem"] = agg["std"] / np.sqrt(agg["n"])
    meta = df.drop_duplicates(keys)[keys + [c for c in _META if c in df.columns]]
    return meta.merge(agg, on=keys).assign(metric=metric)


def paired_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(t, two-sided p) of the paired t-test of a − b; NaN for fewer than 2 pairs.

    When every difference is the same, ``ttest_rel`` divides by zero: identical non-zero
    differences give t = ±inf, p = 0; all-zero differences give t = 0, p = 1.
    """
    x, y = np.asarray(a, float), np.asarray(b, float)
    if x.shape != y.shape:
        raise DataError(f"paired_test: {x.shape} vs {y.shape} values")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise DataError("paired_test: values must be finite")
    if x.size < 2:
        return math.nan, math.nan
    d = x - y
    if np.all(d == d[0]):
        return (math.copysign(math.inf, d[0]), 0.0) if d[0] != 0 else (0.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_rel(x, y)
    return float(res.statistic), float(res.pvalue)


def t_halfwidth(d: np.ndarray, level: float = 0.95) -> float:
    """Half-width of the t confidence interval of mean(d); NaN for fewer than 2 values."""
    if d.size < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + level / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))


def paired_deltas(
    df: pd.DataFrame,
    metric: str = "final_bpb",
    control: str | None = None,
    group: str | None = "policy",
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Per (base, group, variant ≠ control): paired Δ vs the control across the seeds both ran."""
    g = _group_cols(df, group)
    _need(df, ["base", "variant", "seed", "regs", metric, *g], "paired_deltas")
    control = control or _control(df)
    scale, unit = _scale(metric)
    rows = []
    for key, part in df.groupby(["base", *g], sort=False):
        key = key if isinstance(key, tuple) else (key,)
        ctrl = part[part["variant"] == control].set_index("seed")[metric].astype(float)
        if ctrl.empty:
            raise DataError(f"paired_deltas: base {key[0]!r} has no {control!r} control cells")
        noise = float(ctrl.std()) * scale if len(ctrl) > 1 else math.nan
        for variant, vpart in part[part["variant"] != control].groupby("variant", sort=False):
            v = vpart.set_index("seed")[metric].astype(float)
            seeds = sorted(set(v.index) & set(ctrl.index))
            if not seeds:
                continue
            a, b = v.loc[seeds].to_numpy() * scale, ctrl.loc[seeds].to_numpy() * scale
            t, p = paired_test(a, b)
            d = a - b
            mean = float(d.mean())
            row = dict(zip(["base", *g], key)) | {"variant": variant}
            row |= {c: vpart[c].iloc[0] for c in _META if c in vpart.columns}
            row |= {
                "metric": metric,
                "unit": unit,
                "n_pairs": len(seeds),
                "control_mean": float(b.mean()) / scale,
                "variant_mean": float(a.mean()) / scale,
                "delta_mean": mean,
                "delta_std": float(d.std(ddof=1)) if len(d) > 1 else math.nan,
                "delta_ci95": t_halfwidth(d),
                "t_stat": t,
                "p_value": p,
                "seed_noise": noise,
                "exceeds_noise": bool(abs(mean) > noise) if math.isfinite(noise) else pd.NA,
                "significant": bool(p < alpha) if math.isfinite(p) else pd.NA,
            }
            rows.append(row)
    return pd.DataFrame(rows)


def _control(df: pd.DataFrame) -> str:
    names = df.loc[df["regs"] == "", "variant"].unique()
    if len(names) != 1:
        raise DataError(f"expected exactly one control variant (empty regs), found {list(names)}")
    return str(names[0])


def _policy_rows(df: pd.DataFrame, policy: str | None, what: str) -> pd.DataFrame:
    if "policy" not in df.columns:
        return df
    policies = list(dict.fromkeys(df["policy"]))
    policy = policy or policies[0]
    if policy not in policies:
        raise DataError(f"{what}: no rows for policy {policy!r}; have {policies}")
    return df[df["policy"] == policy]


def reg_deltas(df: pd.DataFrame, metric: str = "final_bpb", policy: str | None = None) -> pd.DataFrame:
    """Seed-mean rows with ``baseline_bpb`` (the base's control) and ``delta_mbpb``, papers' schema.

    ``metric`` must be a bpb column; the result holds it (seed mean) under ``final_bpb``
    so :func:`qlab.plots.pr2011.plot_cross_base_signs` / ``plot_lambda_budget`` accept it.
    """
    if not metric.endswith("_bpb"):
        raise DataError(f"reg_deltas: metric must be a *_bpb column, got {metric!r}")
    part = _policy_rows(df, policy, "reg_deltas")
    _need(part, ["base", "variant", "regs", "lambda", "lambdas", metric], "reg_deltas")
    keys = ["source", "base", "variant", "regs", "lambdas"]
    keys = [k for k in keys if k in part.columns]
    mean = part.groupby(keys, sort=False).agg(final_bpb=(metric, "mean"), **{"lambda": ("lambda", "first")})
    mean = mean.reset_index()
    control = _control(part)
    baselines = mean[mean["variant"] == control].set_index("base")["final_bpb"].to_dict()
    return with_deltas(mean, baselines, value="final_bpb")


def sign_table(
    df: pd.DataFrame, metric: str = "final_bpb", policy: str | None = None, alpha: float = 0.05
) -> pd.DataFrame:
    """One row per non-control variant run on ≥ 2 bases: Δ per base (``delta[<base>]``),
    its sign (−1/0/+1), p per base, ``agree`` (all signs equal) and ``sign_change``."""
    part = _policy_rows(df, policy, "sign_table")
    paired = paired_deltas(part, metric, group=None, alpha=alpha)
    if paired.empty:
        raise DataError("sign_table: no regularized variants to compare")
    rows = []
    for variant, g in paired.groupby("variant", sort=False):
        if g["base"].nunique() < 2:
            continue
        row = {"variant": variant, "regs": g["regs"].iloc[0], "lambdas": g["lambdas"].iloc[0]}
        signs = []
        for _, r in g.iterrows():
            s = int(np.sign(r["delta_mean"]))
            signs.append(s)
            row |= {
                f"delta[{r['base']}]": r["delta_mean"],
                f"sign[{r['base']}]": s,
                f"p[{r['base']}]": r["p_value"],
            }
        row |= {"unit": g["unit"].iloc[0], "agree": len(set(signs)) == 1, "sign_change": len(set(signs)) > 1}
        rows.append(row)
    return pd.DataFrame(rows)


def lambda_budget(df: pd.DataFrame, metric: str = "final_bpb", policy: str | None = None) -> pd.DataFrame:
    """Each pair (≥ 2 regularizers) vs its best single constituent on the same base.

    Columns: base, pair, pair_lambdas, pair_delta, best_single, best_single_delta,
    pair_minus_best (negative = the pair is better), pair_better, n_pairs, p_value (paired
    t-test of pair vs best single across the seeds both ran), unit. Singles are any λ
    of the pair's regularizers that the grid ran; pairs with none are left out.
    """
    part = _policy_rows(df, policy, "lambda_budget")
    paired = paired_deltas(part, metric, group=None)
    scale, unit = _scale(metric)
    rows = []
    for base, g in paired.groupby("base", sort=False):
        singles = g[~g["regs"].str.contains("+", regex=False)]
        for _, pair in g[g["regs"].str.contains("+", regex=False)].iterrows():
            names = pair["regs"].split("+")
            cand = singles[singles["regs"].isin(names)]
            if cand.empty:
                continue
            best = cand.loc[cand["delta_mean"].idxmin()]
            a = part[(part["base"] == base) & (part["variant"] == pair["variant"])].set_index("seed")[metric]
            b = part[(part["base"] == base) & (part["variant"] == best["variant"])].set_index("seed")[metric]
            seeds = sorted(set(a.index) & set(b.index))
            _, p = paired_test(a.loc[seeds] * scale, b.loc[seeds] * scale) if seeds else (math.nan, math.nan)
            diff = float(pair["delta_mean"] - best["delta_mean"])
            rows.append(
                {
                    "base": base,
                    "pair": pair["variant"],
                    "pair_lambdas": pair["lambdas"],
                    "pair_delta": pair["delta_mean"],
                    "best_single": best["variant"],
                    "best_single_delta": best["delta_mean"],
                    "pair_minus_best": diff,
                    "pair_better": diff < 0,
                    "n_pairs": len(seeds),
                    "p_value": p,
                    "unit": unit,
                }
            )
    return pd.DataFrame(rows)
