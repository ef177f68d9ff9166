"""PR #1394's per-seed evaluation stages and training curves.

Inputs: :func:`qlab.analysis.papers.pr1394_seeds` (one wide row per seed) and
:func:`qlab.analysis.papers.pr1394_train_curve` (one row per logged step); qlab's own
runs can fill the same columns.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from qlab.errors import DataError
from qlab.plots.style import (
    SOURCE_LINESTYLES,
    annotate_bars,
    label_axes,
    new_figure,
    palette,
    require_columns,
    source_column,
    sources,
    style_context,
)

__all__ = ["plot_seed_stages", "plot_train_curves"]

_STAGE_COLS = {"pre_quant_bpb": "pre-quant", "quantized_bpb": "quantized", "sliding_bpb": "sliding window"}


def plot_seed_stages(df: pd.DataFrame) -> Figure:
    """Left: val_bpb per seed at pre-quant → quantized → sliding window (lines, bpb axis).
    Right: the two stage differences per seed in mBPB as bars from zero."""
    require_columns(df, ["seed", *_STAGE_COLS], "plot_seed_stages")
    d = df.assign(src=source_column(df)).sort_values(["src", "seed"])
    styles = dict(zip(sources(d), SOURCE_LINESTYLES))
    multi = len(styles) > 1
    names = [f"{k}" + (f" [{s}]" if multi else "") for k, s in zip(d["seed"], d["src"])]
    x_st = np.arange(len(_STAGE_COLS))
    with style_context():
        fig, axes = new_figure(1, 2, size=(11, 4.2))
        ax = axes[0, 0]
        for color, name, (_, row) in zip(palette(len(d)), names, d.iterrows()):
            ax.plot(
                x_st,
                [row[c] for c in _STAGE_COLS],
                marker="o",
                color=color,
                linestyle=styles[row["src"]],
                label=f"seed {name}",
                alpha=0.85,
            )
        for s in styles:
            mean = d[d["src"] == s][list(_STAGE_COLS)].mean()
            ax.plot(
                x_st,
                mean,
                color="0.1",
                linewidth=2.2,
                marker="D",
                markersize=4,
                linestyle=styles[s],
                label="mean" + (f" [{s}]" if multi else ""),
            )
            for xi, v in zip(x_st, mean):
                ax.annotate(
                    f"{v:.5f}", (xi, v), xytext=(6, 0), textcoords="offset points", va="center", fontsize=7
                )
        ax.set_xticks(x_st, list(_STAGE_COLS.values()))
        ax.set_xlim(-0.3, len(x_st) - 0.4)
        ax.legend(fontsize=7, loc="upper right")
        label_axes(ax, "evaluation stage", "val_bpb (bpb)", "val_bpb by stage, per seed", unitless="x")

        ax2 = axes[0, 1]
        tax = 1e3 * (d["quantized_bpb"] - d["pre_quant_bpb"]).to_numpy()
        gain = 1e3 * (d["sliding_bpb"] - d["quantized_bpb"]).to_numpy()
        x = np.arange(len(d))
        c1, c2 = palette(2)
        annotate_bars(
            ax2,
            ax2.bar(
                x - 0.2,
                tax,
                0.38,
                color=c1,
                edgecolor="0.2",
                linewidth=0.6,
                label="quantization tax (quantized − pre-quant)",
            ),
            fmt="{:+.1f}",
        )
        annotate_bars(
            ax2,
            ax2.bar(
                x + 0.2,
                gain,
                0.38,
                color=c2,
                edgecolor="0.2",
                linewidth=0.6,
                label="sliding-window gain (sliding − quantized)",
            ),
            fmt="{:+.1f}",
        )
        ax2.axhline(0, color="0.2", linewidth=0.8)
        ax2.set_xticks(x, names)
        ax2.margins(y=0.15)
        ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
        label_axes(
            ax2, "seed", "Δ val_bpb between stages (mBPB)", "Stage-to-stage change per seed", unitless="x"
        )
        fig.suptitle("Evaluation stages per seed")
    return fig


def plot_train_curves(
    df: pd.DataFrame, x: str = "step", events: Mapping[str, float] | None = None, log_loss: bool = True
) -> Figure:
    """Training loss (nats/token) and validation bpb against ``x`` ("step" or "elapsed_s"),
    one line per seed; ``events`` draws labelled vertical lines (e.g. depth recurrence on)."""
    require_columns(df, ["seed", x, "train_loss", "val_bpb"], "plot_train_curves")
    if x not in ("step", "elapsed_s"):
        raise DataError(f"plot_train_curves: x must be 'step' or 'elapsed_s', got {x!r}")
    d = df.assign(src=source_column(df))
    keys = list(dict.fromkeys(zip(d["src"], d["seed"])))
    styles = dict(zip(sources(d), SOURCE_LINESTYLES))
    xlabel = "training step (optimizer steps)" if x == "step" else "training time (s)"
    with style_context():
        fig, axes = new_figure(1, 2, size=(11, 4.0))
        for color, (s, seed) in zip(palette(len(keys)), keys):
            g = d[(d["src"] == s) & (d["seed"] == seed)].sort_values(x)
            label = f"seed {seed}" + (f" [{s}]" if len(styles) > 1 else "")
            t = g.dropna(subset=["train_loss", x])
            axes[0, 0].plot(t[x], t["train_loss"], color=color, linestyle=styles[s], marker=".", label=label)
            v = g.dropna(subset=["val_bpb", x])
            axes[0, 1].plot(
                v[x], v["val_bpb"], color=color, linestyle=styles[s], linewidth=0.8, marker="o", label=label
            )
        for ax in axes[0]:
            for i, (name, at) in enumerate((events or {}).items()):
                ax.axvline(at, color="0.4", linestyle="--", linewidth=1)
                ax.annotate(
                    name,
                    (at, 1 - 0.07 * (i + 1)),
                    xycoords=("data", "axes fraction"),
                    xytext=(3, 0),
                    textcoords="offset points",
                    fontsize=7,
                    color="0.3",
                )
        if log_loss:
            axes[0, 0].set_yscale("log")
            axes[0, 0].yaxis.set_major_formatter(ScalarFormatter())
            axes[0, 0].yaxis.set_minor_formatter(ScalarFormatter())
        axes[0, 0].legend(fontsize=7)
        label_axes(
            axes[0, 0],
            xlabel,
            "train loss (nats/token" + (", log scale)" if log_loss else ")"),
            "Training loss",
        )
        label_axes(axes[0, 1], xlabel, "val_bpb (bpb)", "Validation bpb at the logged evaluations")
        fig.suptitle("Training curves per seed")
    return fig
