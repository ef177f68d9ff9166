"""The marginal table drawn: what each change to one tensor group buys and costs.

Input: :func:`qlab.analysis.marginal.marginal_table` rows. Δbytes on x (kB), paired Δbpb
on y (mBPB) with its bootstrap 95 % interval; one colour per group, one marker per
setting. Points whose interval contains 0 are drawn hollow and labelled "not resolved":
they are not findings.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from qlab.errors import DataError
from qlab.plots.style import label_axes, new_figure, palette, require_columns, style_context

__all__ = ["plot_marginal"]

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
