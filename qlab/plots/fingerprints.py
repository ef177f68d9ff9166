"""Figures of ``qlab fingerprint``: qlab's own measurements drawn as PR #2011's figures.

Each function takes one table of :func:`qlab.analysis.fingerprint.fingerprint` (schema in
that module; every table has a ``variant`` column) and returns a Figure. Where a PR #2011
figure function of :mod:`qlab.plots.pr2011` fits the schema it is reused
(:func:`render_fingerprint_figures` calls ``plot_depth_trajectory``, ``plot_cka_heatmap``
and ``plot_canonical_metrics``). Differences from the PR's drawings, on purpose: the
coordinate histogram uses a log count axis (the outliers are the point), the 3-D PCA
panels are colour-coded by sequence position and the axes say how much variance each
component explains.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from qlab.errors import DataError
from qlab.plots.pr2011 import plot_canonical_metrics, plot_cka_heatmap, plot_depth_trajectory
from qlab.plots.style import (
    annotate_bars,
    label_axes,
    new_figure,
    palette,
    require_columns,
    save_figure,
    style_context,
)

__all__ = [
    "FAMILY_TITLES",
    "plot_final_geometry",
    "plot_depth_by_position",
    "plot_cka_variants",
    "plot_svd_spectrum",
    "plot_svd_flatness",
    "plot_svd_differential",
    "plot_spectral_layers",
    "plot_pca3",
    "plot_coord_distribution",
    "plot_norm_distribution",
    "plot_logit_lens",
    "plot_layer_sensitivity",
    "plot_cka_layers",
    "plot_hidden_quant",
    "render_fingerprint_figures",
]

FAMILY_TITLES = {
    "q": "Attention Q",
    "k": "Attention K",
    "v": "Attention V",
    "qkv": "Attention QKV (fused)",
    "attn_out": "Attention out",
    "mlp_gate": "MLP gate-proj",
    "mlp_in": "MLP up-proj",
    "mlp_out": "MLP down-proj",
    "embedding": "Embedding",
}
_RANK_X = "normalised rank index i / m (fraction)"


def _variants(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["variant"].astype(str))) if "variant" in df.columns else ["model"]


def _with_variant(df: pd.DataFrame) -> pd.DataFrame:
    return df if "variant" in df.columns else df.assign(variant="model")


def _families(df: pd.DataFrame) -> list[str]:
    present = set(df["family"])
    return [f for f in FAMILY_TITLES if f in present] + sorted(present - set(FAMILY_TITLES))


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    ncols = min(n, max_cols)
    return math.ceil(n / ncols), ncols


def _hide_unused(axes: np.ndarray, used: int) -> None:
    for ax in list(axes.flat)[used:]:
        ax.set_visible(False)


# ---------------------------------------------------------------- weight spectra
def plot_svd_spectrum(df: pd.DataFrame) -> Figure:
    """Layer-averaged σᵢ/σ₁ per weight family (log y), one line per variant, with the
    ±1 std band over layers (PR #2011 fig_svd_spectrum). Input: ``family_spectra``."""
    require_columns(df, ["family", "rank_frac", "sigma_norm"], "plot_svd_spectrum")
    d = _with_variant(df)
    fams, variants = _families(d), _variants(d)
    nrows, ncols = _grid(len(fams))
    with style_context():
        fig, axes = new_figure(nrows, ncols, size=(3.7 * ncols, 3.1 * nrows + 0.5))
        for ax, fam in zip(axes.flat, fams):
            for color, v in zip(palette(len(variants)), variants):
                g = d[(d["family"] == fam) & (d["variant"] == v)].sort_values("rank_frac")
                if g.empty:  # e.g. zero-initialised projections of an untrained model
                    continue
                n = int(g["n_matrices"].iloc[0]) if "n_matrices" in g else 0
                ax.plot(g["rank_frac"], g["sigma_norm"], color=color, linewidth=1.6, label=f"{v} ({n} mat.)")
                if "sigma_norm_std" in g and n > 1:
                    lo = (g["sigma_norm"] - g["sigma_norm_std"]).clip(lower=g["sigma_norm"] * 0.1)
                    hi = g["sigma_norm"] + g["sigma_norm_std"]
                    ax.fill_between(g["rank_frac"], lo, hi, color=color, alpha=0.22, linewidth=0)
                    for edge in (lo, hi):  # edges drawn too: a thin band stays visible on a log axis
                        ax.plot(g["rank_frac"], edge, color=color, linewidth=0.5, linestyle=":")
            note = _spectrum_gap_note(d[d["family"] == fam], variants)
            ax.set_yscale("log")
            # at least two decades, so a 0.05 % wiggle never fills a panel
            low = float(d.loc[d["family"] == fam, "sigma_norm"].clip(lower=1e-8).min())
            ax.set_ylim(min(1e-2, low / 1.5), 1.5)
            ax.legend(
                fontsize=6.5, loc="lower left", title=note or None, title_fontsize=6.5, alignment="left"
            )
            label_axes(ax, _RANK_X, "σᵢ / σ₁ (ratio, log scale)", FAMILY_TITLES.get(fam, fam))
        _hide_unused(axes, len(fams))
        fig.suptitle(
            "Singular-value spectrum per weight family, averaged over layers (band: ±1 std over layers)"
            + (f"\n|Δ|: gap to {variants[0]} per index (legend title); Δσ% per index: "
               "pr2011_svd_differential" if len(variants) > 1 else "")
        )  # fmt: skip
    return fig


def _spectrum_gap_note(fam_rows: pd.DataFrame, variants: list[str]) -> str:
    """ "v vs ref: max |Δ| x %" for each variant against the first, beside the first one's
    median layer spread (std / mean) — so coinciding curves read as a measured small gap."""
    ref = fam_rows[fam_rows["variant"] == variants[0]].set_index("index")["sigma_norm"]
    lines = []
    for v in variants[1:]:
        cur = fam_rows[fam_rows["variant"] == v].set_index("index")["sigma_norm"]
        both = ref.index.intersection(cur.index)
        r = ref.loc[both]
        if len(both) and (r > 0).all():
            gap = (cur.loc[both] / r - 1.0).abs()
            at = float(fam_rows.set_index("index").loc[gap.idxmax(), "rank_frac"].iloc[0])
            who = "" if len(variants) == 2 else f"{v}: "
            lines.append(
                f"{who}|Δ| median {100 * gap.median():.2g} %, max {100 * gap.max():.2g} % (i/m {at:.2f})"
            )
    g = fam_rows[fam_rows["variant"] == variants[0]]
    if lines and "sigma_norm_std" in g and int(g["n_matrices"].iloc[0]) > 1:
        spread = float((g["sigma_norm_std"] / g["sigma_norm"]).median())
        lines.append(f"layer spread ±{100 * spread:.2g} % (median std/mean)")
    return "\n".join(lines)


def plot_svd_flatness(df: pd.DataFrame, metric: str = "flatness") -> Figure:
    """Per-family bars of the PR #2011 tail flatness (mean −log₁₀ σᵢ/σ₁ over the tail, from
    zero), grouped by variant (PR #2011 fig_svd_flatness). Input: ``family_summary``."""
    require_columns(df, ["family", metric], "plot_svd_flatness")
    d = _with_variant(df)
    fams, variants = _families(d), _variants(d)
    width = 0.8 / len(variants)
    with style_context():
        fig, axes = new_figure(1, 1, size=(max(6.0, 1.1 * len(fams) * max(1, len(variants) / 2) + 2), 4.0))
        ax = axes[0, 0]
        for j, (color, v) in enumerate(zip(palette(len(variants)), variants)):
            vals = d[d["variant"] == v].set_index("family")[metric].reindex(fams)
            x = np.arange(len(fams)) + (j - (len(variants) - 1) / 2) * width
            bars = ax.bar(x, vals, width * 0.95, color=color, edgecolor="0.2", linewidth=0.6, label=v)
            annotate_bars(ax, bars, fmt="{:.3f}", fontsize=6.5)
        ax.set_xticks(range(len(fams)), [FAMILY_TITLES.get(f, f) for f in fams], rotation=15, ha="right")
        ax.margins(y=0.12)
        ax.legend(fontsize=7)
        label_axes(
            ax,
            "weight family",
            "mean −log₁₀(σᵢ/σ₁) over tail ranks (decades)",
            "Spectrum flatness per weight family — tail ranks only (higher = faster-decaying tail)",
            unitless="x",
        )
    return fig


def plot_svd_differential(df: pd.DataFrame, smooth: int = 1, max_rank_frac: float = 1.0) -> Figure:
    """Δσᵢ% of each variant against its reference, per family (PR #2011
    fig_svd_differential). ``smooth`` > 1: centred moving average; ``max_rank_frac`` < 1
    drops the smallest singular values (the PR kept the top 90 %). Input:
    ``spectral_differential`` (``family`` rows)."""
    require_columns(df, ["family", "rank_frac", "delta_pct"], "plot_svd_differential")
    if smooth < 1 or not 0 < max_rank_frac <= 1:
        raise DataError(f"smooth must be ≥ 1 and max_rank_frac in (0, 1], got {smooth}, {max_rank_frac}")
    d = _with_variant(df)
    d = d[d["rank_frac"] <= max_rank_frac]
    d = d.assign(pair=d["variant"] + (" vs " + d["reference"] if "reference" in d else ""))
    fams, pairs = _families(d), list(dict.fromkeys(d["pair"]))
    nrows, ncols = _grid(len(fams))
    with style_context():
        fig, axes = new_figure(nrows, ncols, size=(3.7 * ncols, 3.1 * nrows + 0.6))
        for ax, fam in zip(axes.flat, fams):
            for color, p in zip(palette(len(pairs)), pairs):
                g = d[(d["family"] == fam) & (d["pair"] == p)].sort_values("rank_frac")
                if g.empty:
                    continue
                y = g["delta_pct"].rolling(smooth, center=True, min_periods=1).mean()
                ax.plot(g["rank_frac"], y, color=color, linewidth=1.4, label=p)
            ax.axhline(0, color="0.3", linewidth=0.8)
            lim = np.nanmax(np.abs(d.loc[d["family"] == fam, "delta_pct"].to_numpy(dtype=float)), initial=0)
            title = FAMILY_TITLES.get(fam, fam)
            if lim > 50:  # e.g. quantization noise lifting the smallest σ by orders of magnitude
                ax.set_yscale("symlog", linthresh=1.0)
                title += " (symlog axis)"
            ax.legend(fontsize=6.5, loc="best")
            label_axes(ax, _RANK_X, "Δσᵢ / σᵢ(reference) (%)", title)
        _hide_unused(axes, len(fams))
        extra = f", smoothed over {smooth} ranks" if smooth > 1 else ""
        extra += f", top {max_rank_frac:.0%} of ranks" if max_rank_frac < 1 else ""
        fig.suptitle(f"Differential singular-value spectrum: each variant vs its reference{extra}")
    return fig


_LAYER_METRICS = {  # column: (axis label, panel title)
    "alpha": ("power-law exponent α (dimensionless)", "WeightWatcher α of the ESD"),
    "stable_rank": ("stable rank Σσ²/σ₁² (dimensions)", "Stable rank"),
    "eff_rank": ("entropy effective rank (dimensions)", "Effective rank"),
}


def plot_spectral_layers(df: pd.DataFrame, metrics: tuple[str, ...] = tuple(_LAYER_METRICS)) -> Figure:
    """α (WeightWatcher), stable rank and effective rank of each block matrix vs its layer,
    one colour per family, one line style per variant. Input: ``spectral_summary``."""
    require_columns(df, ["family", "layer", *metrics], "plot_spectral_layers")
    d = _with_variant(df).dropna(subset=["layer"])
    d = d[d["family"].isin(FAMILY_TITLES)]  # not gains/mixes that happen to be 2-D
    if d.empty:
        raise DataError("plot_spectral_layers: no weight-family matrix with a block index (blocks.{i}.…)")
    fams, variants = _families(d), _variants(d)
    styles: dict[str, Any] = dict(zip(variants, ("-", "--", ":", "-.")))
    colors = dict(zip(fams, palette(len(fams))))
    with style_context():
        fig, axes = new_figure(1, len(metrics), size=(4.1 * len(metrics) + 1.6, 3.9))
        for ax, m in zip(axes[0], metrics):
            for fam in fams:
                for v in variants:
                    g = d[(d["family"] == fam) & (d["variant"] == v)].sort_values("layer")
                    ax.plot(
                        g["layer"], g[m], marker="o", markersize=3, color=colors[fam], linestyle=styles[v]
                    )
            vals = d[m].to_numpy(dtype=float)
            vals = vals[np.isfinite(vals) & (vals > 0)]
            if vals.size and vals.max() / vals.min() > 100:  # degenerate fits (flat spectra) reach 1e6
                ax.set_yscale("log")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ylabel, title = _LAYER_METRICS.get(m, (f"{m} (as measured)", m))
            label_axes(ax, "block index (layer)", ylabel, title)
        handles = [
            Line2D([], [], color=colors[f], marker="o", markersize=3, label=FAMILY_TITLES[f]) for f in fams
        ]
        if len(variants) > 1:
            handles += [Line2D([], [], color="0.3", linestyle=styles[v], label=v) for v in variants]
        axes[0, -1].legend(handles=handles, fontsize=6.5, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.suptitle("Spectral shape of each block matrix through depth")
    return fig


# ---------------------------------------------------------------- hidden-state geometry
def plot_pca3(df: pd.DataFrame) -> Figure:
    """Final hidden states projected on their first three principal components, one 3-D
    panel per variant, coloured by sequence position (PR #2011 fig_real_3d_pca). Input:
    ``pca3``. When the rows carry a ``basis`` column (every variant projected on one
    variant's axes, as :func:`~qlab.analysis.fingerprint.fingerprint` writes) the panels
    share their limits and a last panel histograms each token's shift against the basis
    variant, as a share of that cloud's RMS radius: identical-looking clouds get a number."""
    require_columns(df, ["pc1", "pc2", "pc3"], "plot_pca3")
    d = _with_variant(df)
    variants = _variants(d)
    shared = "basis" in d.columns and d["basis"].nunique() == 1 and len(variants) > 1
    shifts = _pca_shifts(d, variants) if shared else {}
    with style_context():
        fig = Figure(figsize=(4.6 * len(variants) + (4.2 if shifts else 0), 4.4), layout="constrained")
        axes = [
            fig.add_subplot(1, len(variants) + bool(shifts), i + 1, projection="3d")
            for i in range(len(variants))
        ]
        lims = {c: (float(d[c].min()), float(d[c].max())) for c in ("pc1", "pc2", "pc3")}
        for ax, v in zip(axes, variants):
            g = d[d["variant"] == v]
            sc = _pca_panel(
                ax, g, f"{v}\n({len(g)} tokens" + (f", axes of {g['basis'].iloc[0]})" if shared else ")")
            )
            if shared:
                ax.set_xlim(*lims["pc1"]), ax.set_ylim(*lims["pc2"]), ax.set_zlim(*lims["pc3"])
        cbar = fig.colorbar(sc, ax=axes, location="bottom", shrink=0.5, pad=0.02)
        cbar.set_label("position in sequence (tokens)")
        if shifts:
            ax = fig.add_subplot(1, len(variants) + 1, len(variants) + 1)
            for color, (v, rel) in zip(palette(len(shifts) + 1)[1:], shifts.items()):
                med, p90 = 100 * np.median(rel), 100 * np.quantile(rel, 0.9)
                ax.hist(100 * rel, bins=30, color=color, alpha=0.7, edgecolor="0.2", linewidth=0.4,
                        label=f"{v}\nmedian {med:.2g} %, 90th pct {p90:.2g} %")  # fmt: skip
            ax.legend(fontsize=6.5, loc="upper right")
            label_axes(ax, "token shift ‖Δ(pc1..3)‖ / RMS radius (%)", "count (tokens)",
                       f"shift against {d['basis'].iloc[0]}")  # fmt: skip
        fig.suptitle("Final hidden states: 3-D PCA per variant")
    return fig


def _pca_panel(ax, g: pd.DataFrame, title: str):
    c = g["position"] if "position" in g else np.arange(len(g))
    sc = ax.scatter(g["pc1"], g["pc2"], g["pc3"], c=c, cmap="viridis", s=9, alpha=0.75, linewidths=0)
    names = []
    for i in (1, 2, 3):
        sv, evr = (g[f"sv_pc{i}"].iloc[0], g[f"evr_pc{i}"].iloc[0]) if f"sv_pc{i}" in g else (None, None)
        names.append(f"PC{i} (hidden units)" + (f"\nσ={sv:.3g}, {evr:.1%} var" if sv is not None else ""))
    ax.set_zlabel(names[2], fontsize=7.5)
    ax.tick_params(labelsize=6.5)
    label_axes(ax, names[0], names[1], title)
    ax.xaxis.label.set_size(7.5)
    ax.yaxis.label.set_size(7.5)
    ax.view_init(elev=20, azim=-60)
    ax.set_box_aspect(None, zoom=0.85)
    return sc


def _pca_shifts(d: pd.DataFrame, variants: list[str]) -> dict[str, np.ndarray]:
    """Per variant other than the basis one: each token's distance to the same token of
    the basis variant in PC1–3, over the basis cloud's RMS radius (needs ``token``)."""
    basis = str(d["basis"].iloc[0])
    if basis not in variants or "token" not in d.columns:
        return {}
    cols = ["pc1", "pc2", "pc3"]
    ref = d[d["variant"] == basis].set_index("token")[cols]
    radius = float(np.sqrt((ref**2).sum(axis=1).mean()))
    out = {}
    for v in variants:
        cur = d[d["variant"] == v].set_index("token")[cols]
        both = ref.index.intersection(cur.index)
        if v != basis and len(both) and radius > 0:
            out[v] = np.sqrt(((cur.loc[both] - ref.loc[both]) ** 2).sum(axis=1)).to_numpy() / radius
    return out


def _hist_panels(df: pd.DataFrame, quantity: str, log_y: bool, color_idx: int, xlabel: str, title: str):
    require_columns(df, ["bin_left", "bin_right", "count"], title)
    d = _with_variant(df)
    variants = _variants(d)
    nrows, ncols = _grid(len(variants), 3)
    with style_context():
        # one x range for all panels, so a narrow distribution looks narrow
        glo, ghi = float(d["bin_left"].min()), float(d["bin_right"].max())
        pad = 0.02 * (ghi - glo) if ghi - glo > 1e-6 * max(abs(ghi), 1.0) else 0.05 * max(abs(ghi), 1.0)
        fig, axes = new_figure(nrows, ncols, size=(4.4 * ncols, 3.3 * nrows + 0.5))
        color = palette(color_idx + 1)[color_idx]
        for ax, v in zip(axes.flat, variants):
            g = d[d["variant"] == v]
            ax.bar(g["bin_left"], g["count"], width=g["bin_right"] - g["bin_left"], align="edge",
                   color=color, edgecolor="0.2", linewidth=0.5)  # fmt: skip
            lo, hi, n = float(g["bin_left"].min()), float(g["bin_right"].max()), int(g["count"].sum())
            if log_y:
                ax.set_yscale("log")
                ax.set_ylim(0.5, None)
            ax.ticklabel_format(axis="x", useOffset=False)
            ax.set_xlim(glo - pad, ghi + pad)  # all values equal: a readable range, not a zoom
            label_axes(ax, xlabel, "count" + (" (values, log scale)" if log_y else " (tokens)"),
                       f"{v}\n{n:,} {quantity}, range [{lo:.3g}, {hi:.3g}]")  # fmt: skip
        _hide_unused(axes, len(variants))
        fig.suptitle(title)
    return fig


def plot_coord_distribution(df: pd.DataFrame) -> Figure:
    """Histogram of every coordinate of the final hidden states, log count axis, one panel
    per variant (PR #2011 fig_real_coord_distribution). Input: ``coord_hist``."""
    return _hist_panels(df, "values", True, 0, "coordinate value h_d (hidden units)",
                        "Per-coordinate distribution of final hidden states (last block output)")  # fmt: skip


def plot_norm_distribution(df: pd.DataFrame) -> Figure:
    """Histogram of the token L2 norms of the final hidden states, one panel per variant
    (PR #2011 fig_real_l2norm_distribution). Input: ``norm_hist``."""
    title = "Per-token L2-norm distribution of final hidden states (last block output)"
    return _hist_panels(df, "tokens", False, 2, "token L2 norm ‖h‖₂ (hidden units)", title)


# ---------------------------------------------------------------- depth
def _lens_column(df: pd.DataFrame, prefix: str) -> tuple[str, str]:
    if f"{prefix}bpb" in df.columns:
        return f"{prefix}bpb", "bits/byte"
    if f"{prefix}bits_per_token" in df.columns:
        return f"{prefix}bits_per_token", "bits/token"
    raise DataError(f"table has neither {prefix}bpb nor {prefix}bits_per_token; columns {list(df.columns)}")


def _position_ticks(ax, g: pd.DataFrame) -> bool:
    """Executed positions as ticks; with depth recurrence the physical block below
    (returns whether it did)."""
    pos = g["position"].to_numpy()
    if "block" in g and not g["block"].isna().any() and list(g["block"]) != list(pos):
        ax.set_xticks(pos, [f"{p}\nb{int(b)}" for p, b in zip(pos, g["block"])])
        return True
    ax.set_xticks(pos)
    return False


def plot_logit_lens(df: pd.DataFrame) -> Figure:
    """Logit-lens score (final norm + head applied after each executed block) per block,
    one line per variant; the last point is the model's own score. Input: ``depth``."""
    require_columns(df, ["position"], "plot_logit_lens")
    col, unit = _lens_column(df, "lens_")
    d = _with_variant(df)
    variants = _variants(d)
    with style_context():
        fig, axes = new_figure(1, 1, size=(6.4, 4.0))
        ax = axes[0, 0]
        for color, v in zip(palette(len(variants)), variants):
            g = d[d["variant"] == v].sort_values("position")
            ax.plot(g["position"], g[col], marker="o", markersize=4, color=color, label=v)
            last = g.iloc[-1]
            ax.annotate(f"{last[col]:.3f}", (last["position"], last[col]), xytext=(4, 4),
                        textcoords="offset points", fontsize=7, color=color)  # fmt: skip
        looped = _position_ticks(ax, d[d["variant"] == variants[0]].sort_values("position"))
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.legend(fontsize=7)
        xlabel = "executed block position" + (" (bN = physical block N, looped)" if looped else " (index)")
        label_axes(ax, xlabel, f"logit-lens score ({unit})", "Logit lens: final norm + head after each block")
    return fig


def plot_layer_sensitivity(df: pd.DataFrame) -> Figure:
    """Δ score from quantizing one block's matrices at a time (bars from zero, mBPB or
    mbit/token). Input: ``sensitivity``."""
    require_columns(df, ["group"], "plot_layer_sensitivity")
    col, unit = _lens_column(df, "delta_")
    d = _with_variant(df)
    variants = _variants(d)
    groups = list(dict.fromkeys(d["group"]))
    width = 0.8 / len(variants)
    milli = "mBPB" if unit == "bits/byte" else "mbit/token"
    with style_context():
        fig, axes = new_figure(1, 1, size=(max(5.5, 0.7 * len(groups) + 2.5), 3.9))
        ax = axes[0, 0]
        for j, (color, v) in enumerate(zip(palette(len(variants)), variants)):
            vals = 1e3 * d[d["variant"] == v].set_index("group")[col].reindex(groups)
            x = np.arange(len(groups)) + (j - (len(variants) - 1) / 2) * width
            bars = ax.bar(x, vals, width * 0.95, color=color, edgecolor="0.2", linewidth=0.6, label=v)
            annotate_bars(ax, bars, fmt="{:+.3g}", fontsize=6.5)
        ax.axhline(0, color="0.2", linewidth=0.8)
        ax.set_xticks(range(len(groups)), [g.replace("block_", "block ") for g in groups])
        ax.margins(y=0.15)
        if len(variants) > 1:
            ax.legend(fontsize=7)
        label_axes(ax, "quantized block (all others full precision)", f"Δ score vs unquantized ({milli})",
                   "Per-block quantization sensitivity", unitless="x")  # fmt: skip
    return fig


# ---------------------------------------------------------------- CKA and hidden quantization
def plot_cka_layers(df: pd.DataFrame) -> Figure:
    """Linear CKA heatmaps, layer × layer: one panel per variant (``cka_layers``) or per
    compared pair, model layers × other variant's layers (``cka_across``)."""
    require_columns(df, ["layer_a", "layer_b", "cka"], "plot_cka_layers")
    if {"variant_a", "variant_b"} <= set(df.columns):
        d = df.assign(panel=df["variant_a"] + " (rows) vs " + df["variant_b"] + " (columns)")
    else:
        d = _with_variant(df).assign(panel=lambda x: x["variant"])
    panels = list(dict.fromkeys(d["panel"]))
    with style_context():
        fig, axes = new_figure(1, len(panels), size=(4.9 * len(panels) + 0.6, 4.6))
        for ax, p in zip(axes[0], panels):
            g = d[d["panel"] == p]
            rows, cols = list(dict.fromkeys(g["layer_a"])), list(dict.fromkeys(g["layer_b"]))
            mat = g.pivot_table(index="layer_a", columns="layer_b", values="cka").reindex(
                index=rows, columns=cols
            )
            im = ax.imshow(mat.to_numpy(dtype=float), cmap="magma", vmin=0, vmax=1)
            if len(rows) * len(cols) <= 196:
                fmt = "{:.3f}" if len(rows) * len(cols) <= 64 else "{:.2f}"
                for (i, j), val in np.ndenumerate(mat.to_numpy(dtype=float)):
                    ax.text(j, i, fmt.format(val), ha="center", va="center", fontsize=6,
                            color="0.1" if val > 0.6 else "white")  # fmt: skip
            short = [s.replace("block_", "b") for s in cols]
            ax.set_xticks(range(len(cols)), short, rotation=45, ha="right")
            ax.set_yticks(range(len(rows)), [s.replace("block_", "b") for s in rows])
            ax.grid(False)
            label_axes(ax, "layer (bN = after block N)", "layer (bN = after block N)", p, unitless=("x", "y"))
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8).set_label("linear CKA (dimensionless; 1 = same)")
        fig.suptitle("Linear CKA between layers' hidden states")
    return fig


_HQ_METRICS = {
    "rel_l2_distortion": ("mean ‖h − ĥ‖₂ / mean ‖h‖₂ (ratio)", "Relative L2 distortion (lower = better)"),
    "cos_shift": ("1 − mean cos(h, ĥ) (dimensionless)", "Cosine shift (lower = better)"),
    "isoscore_post": ("IsoScore of ĥ (dimensionless, 0…1)", "Post-quant IsoScore (higher = isotropic)"),
    "eff_rank_post": ("effective rank of ĥ (dimensions)", "Post-quant effective rank"),
}


def plot_hidden_quant(df: pd.DataFrame, metrics: tuple[str, ...] = tuple(_HQ_METRICS)) -> Figure:
    """PR #2011's seven hidden-state quantizers: distortion and post-quant geometry per
    scheme, bars grouped by variant, log axis where values span > 2 decades. Input:
    ``hidden_quant``."""
    require_columns(df, ["scheme", *metrics], "plot_hidden_quant")
    d = _with_variant(df)
    schemes, variants = list(dict.fromkeys(d["scheme"])), _variants(d)
    width = 0.8 / len(variants)
    with style_context():
        fig, axes = new_figure(2, 2, size=(11.5, 7.4))
        for ax, m in zip(axes.flat, metrics):
            for j, (color, v) in enumerate(zip(palette(len(variants)), variants)):
                vals = d[d["variant"] == v].set_index("scheme")[m].reindex(schemes)
                x = np.arange(len(schemes)) + (j - (len(variants) - 1) / 2) * width
                bars = ax.bar(x, vals, width * 0.95, color=color, edgecolor="0.2", linewidth=0.5, label=v)
                if len(variants) == 1:  # with several, the labels collide; values are in the table
                    annotate_bars(ax, bars, fmt="{:.3g}", fontsize=6)
            vals = d[m].to_numpy(dtype=float)
            positive = vals[vals > 0]
            if positive.size == vals.size and positive.max() / positive.min() > 100:
                ax.set_yscale("log")
            ax.set_xticks(range(len(schemes)), schemes, rotation=25, ha="right", fontsize=7.5)
            ax.margins(y=0.15)
            ylabel, title = _HQ_METRICS.get(m, (f"{m} (as measured)", m))
            label_axes(ax, "hidden-state quantizer", ylabel, title, unitless="x")
        axes[0, 0].legend(fontsize=7)
        n = f"{int(d['n_tokens'].iloc[0])} tokens" if "n_tokens" in d else ""
        where = f"output of {d['layer'].iloc[0]}" if "layer" in d else ""
        detail = ", ".join(x for x in (n, where) if x)
        fig.suptitle("Quantizing final hidden states" + (f" ({detail})" if detail else ""))
    return fig


# ---------------------------------------------------------------- all at once
def _last_block_metrics(df: pd.DataFrame) -> pd.DataFrame:
    """Per variant, the row of its last executed block (PR #2011's final hidden states)."""
    if "position" not in df.columns:
        return df
    blocks = df.dropna(subset=["position"])
    return blocks.loc[blocks.groupby("variant", sort=False)["position"].idxmax()]


def plot_final_geometry(df: pd.DataFrame) -> Figure:
    """PR #2011's canonical metrics of the last block's output per variant (``hidden_metrics``)."""
    last = _last_block_metrics(_with_variant(df))
    n, dim = int(last["n_tokens"].iloc[0]), int(last["dim"].iloc[0])
    title = f"Final hidden-state geometry per variant: last block output ({n} tokens × {dim} dims)"
    return plot_canonical_metrics(last, title=title)


def plot_depth_by_position(df: pd.DataFrame) -> Figure:
    """PR #2011's depth trajectory drawn against executed block positions (``depth``), so a
    looped block's passes stay apart."""
    return plot_depth_trajectory(_with_variant(df).assign(block=df["position"]))


def plot_cka_variants(df: pd.DataFrame) -> Figure:
    """Linear CKA between the variants' final hidden states (``cka_variants``)."""
    return plot_cka_heatmap(df, title="Linear CKA of final hidden states\n(last block output)")


def figure_makers() -> dict[str, list[tuple[str, Callable[..., Figure]]]]:
    """Fingerprint table name → (PNG file name, plot function) pairs; the names are the
    figure ids of :data:`qlab.figures.FIGURES` (``pr2011_<figure>.png``)."""
    return {  # table: [(file name, function)]
        "family_spectra": [("pr2011_svd_spectrum.png", plot_svd_spectrum)],
        "family_summary": [("pr2011_svd_flatness.png", plot_svd_flatness)],
        "spectral_differential": [("pr2011_svd_differential.png", plot_svd_differential)],
        "spectral_summary": [("pr2011_spectral_layers.png", plot_spectral_layers)],
        "pca3": [("pr2011_3d_pca.png", plot_pca3)],
        "coord_hist": [("pr2011_coord_distribution.png", plot_coord_distribution)],
        "norm_hist": [("pr2011_l2norm_distribution.png", plot_norm_distribution)],
        "depth": [
            ("pr2011_depth_trajectory.png", plot_depth_by_position),
            ("pr2011_logit_lens.png", plot_logit_lens),
        ],
        "hidden_metrics": [("pr2011_canonical_metrics.png", plot_final_geometry)],
        "sensitivity": [("pr2011_layer_sensitivity.png", plot_layer_sensitivity)],
        "cka_layers": [("pr2011_cka_layers.png", plot_cka_layers)],
        "cka_across": [("pr2011_cka_across.png", plot_cka_layers)],
        "cka_variants": [("pr2011_cka_heatmap.png", plot_cka_variants)],
        "hidden_quant": [("pr2011_hidden_quant.png", plot_hidden_quant)],
    }


def _has_layered_families(df: pd.DataFrame) -> bool:
    return {"family", "layer"} <= set(df.columns) and bool((df["family"].notna() & df["layer"].notna()).any())


def render_fingerprint_figures(results: Mapping[str, pd.DataFrame], out_dir: str | os.PathLike) -> list[Path]:
    """Draw and save (PNG, < 300 KB each) every figure whose table is in ``results``;
    returns the written paths. Tables without a figure (``meta``) are skipped."""
    out = Path(out_dir)
    paths = []
    for table, figures in figure_makers().items():
        if table not in results or results[table].empty:  # e.g. no qlab weight families
            continue
        if table == "spectral_differential" and "family" not in results[table]:
            continue  # compared matrix by matrix: the per-family figure does not apply
        if table == "spectral_summary" and not _has_layered_families(results[table]):
            continue  # the per-layer figure needs qlab's blocks.{i}.<family> names
        for name, make in figures:
            paths.append(save_figure(make(results[table]), out / name))
    return paths
