"""PR #1818's figures: the post-quantization "damage gap" and per-seed bars.

Input rows: (seed, stage, bpb[, source]) as :func:`qlab.analysis.papers.pr1818_seeds`
returns — qlab's own multi-seed stage measurements fit the same schema.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from qlab.errors import DataError
from qlab.eval.stages import STAGE_LABELS, STAGES
from qlab.plots.style import (
    SOURCE_LINESTYLES,
    annotate_bars,
    label_axes,
    new_figure,
    palette,
    require_columns,
    sources,
    style_context,
)

__all__ = ["plot_damage_gap", "plot_per_seed_bars"]


def _ordered_stages(df: pd.DataFrame) -> list[str]:
    unknown = sorted(set(df["stage"]) - set(STAGES))
    if unknown:
        raise DataError(f"unknown stage(s) {unknown}; expected names from {list(STAGES)}")
    return [s for s in STAGES if s in set(df["stage"])]


def _baseline(ax, baseline_bpb: float | None) -> None:
    if baseline_bpb is not None:
        ax.axhline(
            baseline_bpb, color="0.45", linestyle=":", linewidth=1.2, label=f"naive baseline {baseline_bpb:g}"
        )


def plot_damage_gap(df: pd.DataFrame, baseline_bpb: float | None = None) -> Figure:
    """val_bpb per stage for each seed plus the seed mean, with the quantization damage and
    TTT recovery (mean differences) annotated (PR #1818 fig1_damage_gap)."""
    require_columns(df, ["seed", "stage", "bpb"], "plot_damage_gap")
    d = df.assign(src=df["source"].astype(str) if "source" in df.columns else "data")
    stages = _ordered_stages(d)
    pos = {s: i for i, s in enumerate(stages)}
    styles = dict(zip(sources(d), SOURCE_LINESTYLES))
    keys = list(dict.fromkeys(zip(d["src"], d["seed"])))
    with style_context():
        fig, axes = new_figure(1, 1, size=(7.6, 4.4))
        ax = axes[0, 0]
        for color, (s, seed) in zip(palette(len(keys)), keys):
            g = d[(d["src"] == s) & (d["seed"] == seed)].sort_values("stage", key=lambda c: c.map(pos))
            ax.plot(
                g["stage"].map(pos),
                g["bpb"],
                marker="o",
                color=color,
                linestyle=styles[s],
                alpha=0.85,
                label=f"seed {seed}" + (f" [{s}]" if len(styles) > 1 else ""),
            )
        for s in styles:
            mean = d[d["src"] == s].groupby("stage")["bpb"].mean().reindex(stages)
            ax.plot(
                range(len(stages)),
                mean,
                color="0.15",
                linestyle=styles[s],
                linewidth=2.2,
                marker="D",
                markersize=4,
                label=f"mean of {d[d['src'] == s]['seed'].nunique()} seeds"
                + (f" [{s}]" if len(styles) > 1 else ""),
            )
            _annotate_steps(ax, mean)
        _baseline(ax, baseline_bpb)
        ax.set_xticks(range(len(stages)), [STAGE_LABELS[s] for s in stages])
        ax.set_xlim(-0.3, len(stages) - 0.2)
        ax.legend(loc="upper left", fontsize=7.5)
        label_axes(
            ax,
            "evaluation stage",
            "val_bpb (bpb; lower is better)",
            "Post-quantization damage gap: val_bpb by stage, per seed",
            unitless="x",
        )
    return fig


def _annotate_steps(ax, mean: pd.Series) -> None:
    """Arrow + Δ text for each consecutive stage pair (means)."""
    vals = mean.to_numpy(dtype=float)
    for i in range(1, len(vals)):
        if not (np.isfinite(vals[i - 1]) and np.isfinite(vals[i])):
            continue
        delta = vals[i] - vals[i - 1]
        x = i + 0.12
        ax.annotate(
            "",
            xy=(x, vals[i]),
            xytext=(x, vals[i - 1]),
            arrowprops={"arrowstyle": "->", "color": "0.3", "linewidth": 1.2},
        )
        ax.text(
            x + 0.04,
            (vals[i] + vals[i - 1]) / 2,
            f"mean {delta:+.3f} bpb",
            ha="left",
            va="center",
            fontsize=8,
        )


def plot_per_seed_bars(
    df: pd.DataFrame, stages: tuple[str, ...] = ("quantized", "legal_ttt"), baseline_bpb: float | None = None
) -> Figure:
    """Grouped bars (from zero) of val_bpb per seed for the chosen stages (PR #1818
    fig4_per_seed_bars), values written on the bars."""
    require_columns(df, ["seed", "stage", "bpb"], "plot_per_seed_bars")
    d = df[df["stage"].isin(stages)].assign(
        src=df["source"].astype(str) if "source" in df.columns else "data"
    )
    if d.empty:
        raise DataError(f"plot_per_seed_bars: no rows for stages {stages}")
    d = d.assign(
        key=[f"seed {k}" + (f" [{s}]" if d["src"].nunique() > 1 else "") for k, s in zip(d["seed"], d["src"])]
    )
    groups = list(dict.fromkeys(d["key"]))
    present = [s for s in stages if s in set(d["stage"])]
    width = 0.8 / len(present)
    with style_context():
        fig, axes = new_figure(1, 1, size=(max(6.0, 1.6 * len(groups) + 2), 4.2))
        ax = axes[0, 0]
        for j, (stage, color) in enumerate(zip(present, palette(len(present)))):
            vals = d[d["stage"] == stage].set_index("key")["bpb"].reindex(groups)
            x = np.arange(len(groups)) + (j - (len(present) - 1) / 2) * width
            bars = ax.bar(
                x, vals, width * 0.95, color=color, edgecolor="0.2", linewidth=0.6, label=STAGE_LABELS[stage]
            )
            annotate_bars(ax, bars, fmt="{:.3f}")
        _baseline(ax, baseline_bpb)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.22)
        ax.legend(loc="upper center", ncol=3, fontsize=7.5)
        label_axes(
            ax,
            "seed",
            "val_bpb (bpb)",
            "val_bpb per seed: " + " vs ".join(STAGE_LABELS[s] for s in present),
            unitless="x",
        )
    return fig
