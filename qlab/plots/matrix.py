"""Figures of a reg × quant matrix run (:mod:`qlab.analysis.matrix`).

The paper-shaped figures are :mod:`qlab.plots.pr2011`'s own functions fed qlab's tables
(same schema); the one figure the paper has no counterpart for is
:func:`plot_paired_deltas`, which shows each Δ with its seed spread against the seed noise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from qlab.analysis.matrix.results import MatrixResults
from qlab.analysis.matrix.stats import paired_deltas, reg_deltas
from qlab.analysis.papers import REGULARIZERS
from qlab.errors import DataError
from qlab.plots.pr2011 import (
    plot_cross_base_signs,
    plot_lambda_budget,
    plot_pre_post_quant,
    plot_reg_quant_heatmaps,
)
from qlab.plots.style import label_axes, new_figure, palette, require_columns, style_context

__all__ = ["plot_paired_deltas", "hidden_heatmap_rows", "matrix_figures"]


def plot_paired_deltas(paired: pd.DataFrame) -> Figure:
    """Mean Δ vs the control per variant (bars with the 95 % t interval of the mean paired
    Δ), one panel per base; the grey band is ± the control's seed std and "*" marks p < 0.05.
    With one seed per cell there is no interval and no test, and the title says so.
    Input: :func:`qlab.analysis.matrix.paired_deltas` rows."""
    require_columns(
        paired,
        ["base", "variant", "delta_mean", "n_pairs", "seed_noise", "significant", "unit"],
        "plot_paired_deltas",
    )
    if paired.empty:
        raise DataError("plot_paired_deltas: no rows")
    bases = list(dict.fromkeys(paired["base"]))
    unit, metric = paired["unit"].iloc[0], paired["metric"].iloc[0] if "metric" in paired else "metric"
    n_max = int(paired["n_pairs"].max())
    lower, higher = palette(2)
    with style_context():
        fig, axes = new_figure(
            1, len(bases), size=(4.8 * len(bases) + 0.5, 0.45 * paired["variant"].nunique() + 2.4)
        )
        for ax, base in zip(axes[0], bases):
            _paired_panel(ax, paired[paired["base"] == base].reset_index(drop=True), (lower, higher))
            label_axes(ax, f"Δ {metric} vs control ({unit})", "variant", f"base {base}", unitless="y")
        handles = [Patch(color=lower, label="lower than the control"),
                   Patch(color=higher, label="higher than the control")]  # fmt: skip
        if n_max > 1:
            handles.append(Patch(color="0.85", label="± control seed std"))
            what = f"bars: mean over ≤ {n_max} seeds, whiskers: 95 % t interval; * = paired t-test p < 0.05"
        else:
            what = "one seed per cell: no interval and no test are possible (run ≥ 2 seeds)"
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7.5,
                   frameon=False)  # fmt: skip
        fig.suptitle(f"Regularizer effect vs the control, paired by seed\n{what}")
    return fig


def _paired_panel(ax, g: pd.DataFrame, colors: tuple) -> None:
    y = np.arange(len(g))[::-1]
    ci = g["delta_ci95"] if "delta_ci95" in g else g.get("delta_std", pd.Series(np.nan, index=g.index))
    err = ci.astype(float).fillna(0.0).to_numpy()
    ax.barh(y, g["delta_mean"], 0.6, xerr=err, color=[colors[d > 0] for d in g["delta_mean"]],
            edgecolor="0.2", linewidth=0.6, capsize=3)  # fmt: skip
    noise = float(g["seed_noise"].iloc[0])
    if np.isfinite(noise):
        ax.axvspan(-noise, noise, color="0.85", zorder=0)
    for yi, e, (_, r) in zip(y, err, g.iterrows()):
        sig = r["significant"]
        star = "*" if pd.notna(sig) and bool(sig) else ""  # numpy bool is not `True`
        end = r["delta_mean"] + np.copysign(e, r["delta_mean"])  # beyond the whisker
        ax.annotate(f" {r['delta_mean']:+.3g}{star} ", (end, yi), ha="left" if end >= 0 else "right",
                    va="center", fontsize=7.5)  # fmt: skip
    ax.axvline(0, color="0.2", linewidth=0.8)
    ax.set_yticks(y, g["variant"])
    ax.margins(x=0.25)


def hidden_heatmap_rows(hidden: pd.DataFrame) -> pd.DataFrame:
    """Seed-mean hidden-state metrics per (base, variant, scheme), variant labelled "base · variant"."""
    require_columns(hidden, ["base", "variant", "scheme"], "hidden_heatmap_rows")
    metrics = [c for c in hidden.columns if hidden[c].dtype.kind == "f" and c not in ("lambda", "seed")]
    g = hidden.groupby(["base", "variant", "scheme"], sort=False)[metrics].mean().reset_index()
    return g.assign(source="qlab", variant=g["base"] + " · " + g["variant"])


def matrix_figures(
    res: MatrixResults, metric: str = "final_bpb", policy: str | None = None
) -> dict[str, Figure]:
    """Every figure of a matrix run by file stem: heatmaps, paired Δ, sign, λ-budget, pre/post quant."""
    policy = policy or str(res.pipeline["policy"].iloc[0])
    pipe = _control_first(res.pipeline[res.pipeline["policy"] == policy], res.control)
    if pipe.empty:
        raise DataError(f"matrix_figures: no rows for policy {policy!r}")
    hidden = _control_first(res.hidden, res.control)
    figs = {"matrix_hidden_heatmaps": plot_reg_quant_heatmaps(hidden_heatmap_rows(hidden))}
    figs["matrix_paired_deltas"] = plot_paired_deltas(paired_deltas(pipe, metric, group=None))
    deltas = reg_deltas(pipe, metric)
    bases = tuple(dict.fromkeys(pipe["base"]))
    if len(bases) > 1 and deltas["regs"].isin(REGULARIZERS).any():  # the paper's figure shows only these
        figs["matrix_cross_base_signs"] = plot_cross_base_signs(deltas, bases=bases)
    for base in bases:
        if deltas[(deltas["base"] == base)]["regs"].str.contains("+", regex=False).any():
            figs[f"matrix_lambda_budget_{base}"] = plot_lambda_budget(deltas, base=base)
    figs["matrix_pre_post_quant"] = plot_pre_post_quant(pipe.assign(source="qlab"), base=None)
    return figs


def _control_first(df: pd.DataFrame, control: str) -> pd.DataFrame:
    """Rows of the control variant first within each base, the rest in their order: every
    panel then lists the variants in one order."""
    if "variant" not in df.columns:
        return df
    order = {b: i for i, b in enumerate(dict.fromkeys(df["base"]))} if "base" in df.columns else {}
    base_rank = df["base"].map(order) if order else 0
    d = df.assign(_b=base_rank, _k=(df["variant"] != control).astype(int))
    return d.sort_values(["_b", "_k"], kind="stable").drop(columns=["_b", "_k"])
