"""What each bit costs, drawn: the marginal table, its predictor, the allocator, and the
rate-aware GPTQ frontier.

* :func:`plot_marginal` — :func:`qlab.analysis.marginal.marginal_table` rows: Δbytes on x
  (kB), paired Δbpb on y (mBPB) with its bootstrap 95 % interval; one colour per group,
  one marker per setting. Points whose interval contains 0 are drawn hollow and labelled
  "not resolved": they are not findings.
* :func:`plot_predictor` — the same rows, measured Δbpb against the second-order
  prediction a·Δtr(ΔW H ΔWᵀ) + b fitted on them (R² in sample and leave-one-out).
* :func:`plot_allocation` — :func:`qlab.analysis.marginal.allocation_rows`: the chosen
  policy's paired Δbpb against the base and against the uniform recipe at equal bytes.
* :func:`plot_rate_frontier` — :func:`qlab.analysis.frontier.rate_frontier`: bytes
  against paired Δbpb for plain GPTQ over k and rate-aware GPTQ over λ.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from qlab.analysis.frontier import PLAIN, RATE_AWARE, bytes_saved_at_equal_bpb
from qlab.analysis.marginal import fit_predictor
from qlab.errors import DataError
from qlab.plots.style import label_axes, new_figure, palette, require_columns, style_context

__all__ = ["plot_allocation", "plot_marginal", "plot_predictor", "plot_rate_frontier"]

_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")


def plot_marginal(table: pd.DataFrame) -> Figure:
    require_columns(table, ["group", "setting", "delta_bytes", "delta_bpb", "ci_lo", "ci_hi", "resolved"],
                    "plot_marginal")  # fmt: skip
    if table.empty:
        raise DataError("plot_marginal: no rows")
    groups = list(dict.fromkeys(table["group"]))
    settings = list(dict.fromkeys(table["setting"]))
    colours = dict(zip(groups, palette(len(groups)), strict=True))
    markers = {s: _MARKERS[i % len(_MARKERS)] for i, s in enumerate(settings)}
    with style_context():
        fig, axes = new_figure(1, 1, size=(7.6, 4.8))
        ax = axes[0, 0]
        for _, r in table.iterrows():
            x, y = r["delta_bytes"] / 1e3, 1e3 * r["delta_bpb"]
            lo, hi = 1e3 * (r["delta_bpb"] - r["ci_lo"]), 1e3 * (r["ci_hi"] - r["delta_bpb"])
            c = colours[r["group"]]
            resolved = bool(r["resolved"])
            face = c if resolved else "white"
            ax.errorbar(x, y, yerr=[[max(lo, 0)], [max(hi, 0)]], fmt=markers[r["setting"]], color=c,
                        markerfacecolor=face, markersize=7, capsize=3, linewidth=1)  # fmt: skip
        ax.axhline(0, color="0.3", linewidth=0.8)
        ax.axvline(0, color="0.3", linewidth=0.8)
        handles = [Line2D([], [], color=colours[g], marker="o", linestyle="", label=g) for g in groups]
        handles += [Line2D([], [], color="0.3", marker=markers[s], linestyle="", label=s) for s in settings]
        handles.append(Line2D([], [], color="0.3", marker="o", markerfacecolor="white", linestyle="",
                              label="hollow: 95 % CI contains 0\n(not resolved)"))  # fmt: skip
        handles.append(Line2D([], [], color="0.3", marker="|", markersize=12, linestyle="",
                              label="bars: bootstrap 95 % CI\nover documents"))  # fmt: skip
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
        label_axes(
            ax,
            "Δ artifact size vs the base policy (kB)",
            "paired Δ val_bpb vs the base (mBPB)",
            "One change to one tensor group: bytes against bpb",
        )
    return fig


def _yerr(r: pd.Series) -> list[list[float]]:
    """Asymmetric error bar (mBPB) of a row's ``delta_bpb`` from its ``ci_lo``/``ci_hi``."""
    return [[max(1e3 * (r["delta_bpb"] - r["ci_lo"]), 0.0)], [max(1e3 * (r["ci_hi"] - r["delta_bpb"]), 0.0)]]


def plot_predictor(table: pd.DataFrame) -> Figure:
    """Measured paired Δbpb (with its 95 % interval) against the predictor's value."""
    cols = ["group", "setting", "delta_hessian_err", "delta_bpb", "ci_lo", "ci_hi", "resolved"]
    require_columns(table, cols, "plot_predictor")
    if len(table) < 3:
        raise DataError(
            f"plot_predictor: need at least 3 rows to fit and judge a predictor, got {len(table)}"
        )
    fit = fit_predictor(table)
    groups = list(dict.fromkeys(table["group"]))
    colours = dict(zip(groups, palette(len(groups)), strict=True))
    with style_context():
        fig, axes = new_figure(1, 1, size=(6.8, 4.8))
        ax = axes[0, 0]
        pred = 1e3 * fit["predicted"]
        for (_, r), x in zip(table.iterrows(), pred, strict=True):
            c = colours[r["group"]]
            ax.errorbar(x, 1e3 * r["delta_bpb"], yerr=_yerr(r), fmt="o", color=c, capsize=3, markersize=6,
                        markerfacecolor=c if bool(r["resolved"]) else "white")  # fmt: skip
        lo = min(pred.min(), 1e3 * table["ci_lo"].min())
        hi = max(pred.max(), 1e3 * table["ci_hi"].max())
        ax.plot([lo, hi], [lo, hi], color="0.4", linewidth=0.9, linestyle="--")
        handles = [Line2D([], [], color=colours[g], marker="o", linestyle="", label=g) for g in groups]
        handles.append(Line2D([], [], color="0.4", linestyle="--", label="measured = predicted"))
        handles.append(Line2D([], [], color="0.3", marker="o", markerfacecolor="white", linestyle="",
                              label="hollow: 95 % CI contains 0"))  # fmt: skip
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
        note = (f"R² {fit['r2']:.2f}, leave-one-out {fit['loo_r2']:.2f} (n = {fit['n']})\n"
                f"one slope each: {', '.join(fit['slopes'])}\n"
                f"noise ceiling {fit['r2_ceiling']:.2f}\n(an exact predictor, these intervals)")  # fmt: skip
        ax.text(0.97, 0.04, note, transform=ax.transAxes, ha="right", va="bottom", fontsize=8.5)
        title = "Second-order predictor vs the measured marginal table"
        xlabel = "predicted Δ val_bpb, a_s·Δtr(ΔW H ΔWᵀ) + b (mBPB)"
        label_axes(ax, xlabel, "measured paired Δ val_bpb (mBPB)", title)
    return fig


def plot_allocation(rows: pd.DataFrame) -> Figure:
    """The allocator's policy against the base and the uniform recipe, paired, with CIs
    (no rows: the table suggested no change, and the figure says so)."""
    if not (isinstance(rows, pd.DataFrame) and rows.empty):
        cols = ["comparison", "choice", "bytes", "other_bytes", "delta_bpb", "ci_lo", "ci_hi", "resolved"]
        require_columns(rows, cols, "plot_allocation")
    with style_context():
        fig, axes = new_figure(1, 1, size=(7.2, 3.2))
        ax = axes[0, 0]
        if rows.empty:
            ax.text(0.5, 0.5, "the marginal table suggests no change: the allocator keeps the base policy",
                    ha="center", va="center", transform=ax.transAxes)  # fmt: skip
            ax.set_yticks([])
            label_axes(ax, "paired Δ val_bpb (mBPB)", "comparison", "Allocator at the base's bytes",
                       unitless="y")  # fmt: skip
            return fig
        ys = list(range(len(rows)))[::-1]
        for y, (_, r) in zip(ys, rows.iterrows(), strict=True):
            x = 1e3 * r["delta_bpb"]
            err = [[max(x - 1e3 * r["ci_lo"], 0.0)], [max(1e3 * r["ci_hi"] - x, 0.0)]]
            face = "C0" if bool(r["resolved"]) else "white"
            ax.errorbar(x, y, xerr=err, fmt="o", color="C0", markerfacecolor=face, capsize=4, markersize=7)
            ax.annotate(f"{r['bytes']:,} B vs {r['other_bytes']:,} B", (x, y), textcoords="offset points",
                        xytext=(0, 9), ha="center", fontsize=7.5)  # fmt: skip
        ax.axvline(0, color="0.3", linewidth=0.8)
        ax.set_yticks(ys, list(rows["comparison"]))
        ax.set_ylim(-0.7, len(rows) - 0.3)
        title = f"Allocator at the base policy's bytes\nchoice: {rows['choice'].iloc[0]}"
        label_axes(ax, "paired Δ val_bpb, chosen − other (mBPB; < 0 = chosen better; 95 % CI)", "comparison",
                   title, unitless="y")  # fmt: skip
        ax.text(1.0, -0.32, "hollow: the interval contains 0 (not resolved)", transform=ax.transAxes,
                ha="right", fontsize=7.5, color="0.35")  # fmt: skip
    return fig


def plot_rate_frontier(frontier: pd.DataFrame) -> Figure:
    """Bytes against paired Δbpb: plain GPTQ over k beside rate-aware GPTQ over λ."""
    require_columns(frontier, ["method", "k", "rate_lambda", "artifact_bytes", "delta_bpb", "ci_lo", "ci_hi"],
                    "plot_rate_frontier")  # fmt: skip
    if frontier.empty:
        raise DataError("plot_rate_frontier: no rows")
    with style_context():
        fig, axes = new_figure(1, 1, size=(7.4, 4.8))
        ax = axes[0, 0]
        for method, colour, marker in ((PLAIN, "C0", "o"), (RATE_AWARE, "C3", "s")):
            g = frontier[frontier["method"] == method].sort_values("artifact_bytes")
            if g.empty:
                continue
            x, y = g["artifact_bytes"] / 1e3, 1e3 * g["delta_bpb"]
            err = [(y - 1e3 * g["ci_lo"]).clip(lower=0), (1e3 * g["ci_hi"] - y).clip(lower=0)]
            if method == PLAIN:
                label = method
                for (_, r), xi, yi in zip(g.iterrows(), x, y, strict=True):
                    ax.annotate(f"k={r['k']:g}", (xi, yi), textcoords="offset points", xytext=(5, 5),
                                fontsize=7, color=colour)  # fmt: skip
            else:  # small-λ points crowd where the curves meet: their λ go in the legend, in order
                lams = ", ".join(f"{v:g}" for v in g["rate_lambda"][::-1])
                label = f"{method}\nλ = {lams}, right to left (k = {g['k'].iloc[0]:g})"
            ax.errorbar(x, y, yerr=err, fmt=f"-{marker}", color=colour, capsize=3, markersize=5, label=label)
        ax.axhline(0, color="0.3", linewidth=0.8)
        saved = bytes_saved_at_equal_bpb(frontier)
        if len(saved):
            best = saved.loc[saved["saving"].idxmax()]
            lo, hi = 1e3 * best["ci_lo"], 1e3 * best["ci_hi"]
            note = (f"best saving at equal Δbpb: {100 * best['saving']:+.2f} % (λ={best['rate_lambda']:g}); "
                    f"its Δbpb 95 % CI [{lo:+.1f}, {hi:+.1f}] mBPB")  # fmt: skip
        else:
            note = "no rate-aware point inside the plain frontier's bpb range"
        ax.text(0.02, 0.03, note, transform=ax.transAxes, fontsize=8)
        ax.legend(fontsize=8, loc="upper right")
        label_axes(ax, "artifact size, --codec ans (kB)",
                   "paired Δ val_bpb vs plain GPTQ at k = 12.85 (mBPB; 95 % CI)",
                   "Rate-aware GPTQ against the clip-width frontier")  # fmt: skip
    return fig
