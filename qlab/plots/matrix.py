"""Figures of a reg × quant matrix run (:mod:`qlab.analysis.matrix`).

The paper-shaped figures are :mod:`qlab.plots.pr2011`'s own functions fed qlab's tables
(same schema); the one figure the paper has no counterpart for is
:func:`plot_paired_deltas`, which shows each Δ with its seed spread against the seed noise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

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
    """Mean Δ vs the control per variant (bars, ± std of the per-seed Δ as error bars), one
    panel per base; the grey band is ± the control's seed noise and "*" marks p < α.
    Input: :func:`qlab.analysis.matrix.paired_deltas` rows."""
    require_columns(
        paired,
        ["base", "variant", "delta_mean", "delta_std", "seed_noise", "significant", "unit"],
        "plot_paired_deltas",
    )
    if paired.empty:
        raise DataError("plot_paired_deltas: no rows")
    bases = list(dict.fromkeys(paired["base"]))
    unit, metric = paired["unit"].iloc[0], paired["metric"].iloc[0] if "metric" in paired else "metric"
    with style_context():
        fig, axes = new_figure(
            1, len(bases), size=(4.8 * len(bases) + 0.5, 0.45 * paired["variant"].nunique() + 2)
        )
        for ax, base in zip(axes[0], bases):
            g = paired[paired["base"] == base].reset_index(drop=True)
            y = np.arange(len(g))[::-1]
            err = g["delta_std"].fillna(0.0).to_numpy()
            colors = palette(2)
            ax.barh(
                y,
                g["delta_mean"],
                0.65,
                xerr=err,
                color=[colors[d > 0] for d in g["delta_mean"]],
                edgecolor="0.2",
                linewidth=0.6,
                capsize=3,
            )
            noise = g["seed_noise"].iloc[0]
            if np.isfinite(noise):
                ax.axvspan(-noise, noise, color="0.85", zorder=0, label=f"± control seed std ({noise:.3g})")
                ax.legend(loc="best", fontsize=7)
            for yi, e, (_, r) in zip(y, err, g.iterrows()):
                star = "*" if r["significant"] is True else ""
                end = r["delta_mean"] + np.copysign(e, r["delta_mean"])  # beyond the error bar
                ax.annotate(
                    f"{r['delta_mean']:+.3g}{star}",
                    (end, yi + 0.38),
                    xytext=(0, 0),
                    ha="center",
                    textcoords="offset points",
                    va="center",
                    fontsize=7.5,
                )
            ax.axvline(0, color="0.2", linewidth=0.8)
            ax.set_yticks(y, g["variant"])
            ax.margins(x=0.2)
            label_axes(ax, f"Δ {metric} vs control ({unit})", "variant", f"base {base}", unitless="y")
        fig.suptitle("Regularizer effect vs the control, paired across seeds (* = p < 0.05)")
    return fig


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
    pipe = res.pipeline[res.pipeline["policy"] == policy]
    if pipe.empty:
        raise DataError(f"matrix_figures: no rows for policy {policy!r}")
    figs = {"matrix_hidden_heatmaps": plot_reg_quant_heatmaps(hidden_heatmap_rows(res.hidden))}
    figs["matrix_paired_deltas"] = plot_paired_deltas(paired_deltas(pipe, metric, group=None))
    deltas = reg_deltas(pipe, metric)
    bases = tuple(dict.fromkeys(pipe["base"]))
    if len(bases) > 1 and deltas["regs"].isin(REGULARIZERS).any():  # the paper's figure shows only these
        figs["matrix_cross_base_signs"] = plot_cross_base_signs(deltas, bases=bases)
    for base in bases:
        if deltas[(deltas["base"] == base)]["regs"].str.contains("+", regex=False).any():
            figs[f"matrix_lambda_budget_{base}"] = plot_lambda_budget(deltas, base=base)
    mean = (
        pipe.groupby(["base", "variant"], sort=False)[["pre_quant_bpb", "quantized_bpb"]].mean().reset_index()
    )
    figs["matrix_pre_post_quant"] = plot_pre_post_quant(mean.assign(source="qlab"), base=None)
    return figs
