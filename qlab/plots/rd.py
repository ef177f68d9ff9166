"""Rate–distortion figures: entropy vs (b, k) with theory, std vs compression ratio,
R–D curves against the Gaussian bound, SDClip vs quantile search, byte allocation.

Inputs are the DataFrames of :mod:`qlab.analysis.rd`, :mod:`qlab.analysis.rd_compare`
and :mod:`qlab.analysis.rd_theory`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from qlab.analysis import rd_theory
from qlab.analysis.rd import linear_fit
from qlab.analysis.rd_compare import rd_bounds
from qlab.plots.style import label_axes, new_figure, palette, require_columns, style_context

__all__ = [
    "plot_entropy_vs_k",
    "plot_std_vs_ratio",
    "plot_rd_curves",
    "plot_sdclip_vs_quantile",
]


def plot_entropy_vs_k(measured: pd.DataFrame | None = None, bits=range(2, 9), ks=None) -> Figure:
    """H(q) vs k for each b: exact Gaussian entropy (solid), PR #1394's approximation
    b − log₂k + ½log₂(πe/2) under its own bin width (dashed), and measured points.

    ``measured`` needs ``bits``, ``k``, ``entropy`` (e.g. :func:`summarize_sweep` of an
    SDClip sweep; rows with other rules are ignored).
    """
    ks = np.linspace(2, 30, 57) if ks is None else np.asarray(list(ks), float)
    bits = list(bits)
    if measured is not None:
        require_columns(measured, ["bits", "k", "entropy"], "plot_entropy_vs_k")
        if "rule" in measured:
            measured = measured[measured["rule"] == "sdclip"]
    with style_context():
        fig, axes = new_figure(1, 1, size=(7.5, 4.8))
        ax = axes[0, 0]
        for color, b in zip(palette(len(bits)), bits):
            exact = [rd_theory.gaussian_quant_entropy(b, k) for k in ks]
            approx = [rd_theory.approx_entropy(b, k) for k in ks]
            ax.plot(ks, exact, color=color, lw=1.6, label=f"b={b} exact (Gaussian)")
            ax.plot(ks, approx, color=color, lw=1.0, ls="--")
            if measured is not None:
                m = measured[measured["bits"] == b]
                ax.plot(m["k"], m["entropy"], "o", color=color, ms=4.5, mec="black", mew=0.5)
        ax.plot([], [], "k--", lw=1.0, label="approx. b − log₂k + ½log₂(πe/2)")
        if measured is not None:
            ax.plot([], [], "o", color="0.5", mec="black", mew=0.5, label="measured (weights)")
        ax.set_ylim(bottom=0)
        label_axes(ax, "clip width k (row σ)", "code entropy H(q) (bits/param)", "Entropy of SDClip codes")
        ax.legend(ncol=2, fontsize=7, loc="upper right")
    return fig


def plot_std_vs_ratio(table: pd.DataFrame) -> Figure:
    """Compression ratio vs matrix σ under one fixed clip c, with the OLS line and R²
    (left), and bits/param vs log₂σ, the relation theory says is linear (right)."""
    require_columns(table, ["std", "ratio", "bits_per_param"], "plot_std_vs_ratio")
    fit = linear_fit(table["std"], table["ratio"])
    log_fit = linear_fit(np.log2(table["std"]), table["bits_per_param"])
    x = np.linspace(table["std"].min(), table["std"].max(), 50)
    with style_context():
        fig, axes = new_figure(1, 2, size=(10, 4))
        ax = axes[0, 0]
        ax.scatter(table["std"], table["ratio"], s=18, color=palette(1)[0], edgecolor="black", lw=0.4)
        ax.plot(x, fit.intercept + fit.slope * x, "k-", lw=1, label=f"OLS fit, R² = {fit.r2:.4f}")
        ax.legend()
        clip = f" (clip c = {table['clip'].iloc[0]:.3g})" if "clip" in table else ""
        label_axes(ax, "matrix std σ (weight units)", "compression ratio (int8 bytes / brotli bytes)",
                   "Std predicts size at a fixed clip" + clip)  # fmt: skip
        ax = axes[0, 1]
        lx = np.log2(x)
        ax.scatter(np.log2(table["std"]), table["bits_per_param"], s=18, color=palette(2)[1],
                   edgecolor="black", lw=0.4)  # fmt: skip
        ax.plot(lx, log_fit.intercept + log_fit.slope * lx, "k-", lw=1,
                label=f"slope {log_fit.slope:.3f}, R² = {log_fit.r2:.4f} (theory: slope 1)")  # fmt: skip
        ax.legend()
        label_axes(ax, "log₂ σ (log₂ weight units)", "predicted size (bits/param)", "Same data, log scale")
    return fig


def plot_rd_curves(rd: pd.DataFrame) -> Figure:
    """Distortion MSE/σ² (log) vs rate (bits/param) per quantizer, with the Gaussian
    bound D(R) = 2^(−2R) and the entropy-coded uniform quantizer line (πe/6)·2^(−2R)."""
    require_columns(rd, ["quantizer", "rate", "distortion"], "plot_rd_curves")
    grid = rd_bounds(np.linspace(0, max(8.5, float(rd["rate"].max()) + 0.3), 200))
    with style_context():
        fig, axes = new_figure(1, 1, size=(7.5, 5))
        ax = axes[0, 0]
        ax.plot(grid["rate"], grid["rd_bound"], "k-", lw=1.4, label="Gaussian bound D(R) = σ²·2^(−2R)")
        ax.plot(grid["rate"], grid["ecsq"], "k--", lw=1.0, label="entropy-coded uniform (+1.53 dB)")
        fams = rd.assign(fam=rd.get("family", rd["quantizer"]))
        curves = []
        for fam, g in fams.groupby("fam", sort=False):
            if fam.startswith("int") and g["k"].notna().any():
                curves += [(f"int-b SDClip k={k:g}", "o", gk) for k, gk in g.groupby("k")]
            else:
                curves.append((fam, "D" if "lloyd" in fam else "s", g))
        for color, (label, marker, g) in zip(palette(len(curves)), curves):
            g = g.sort_values("rate")
            ax.plot(g["rate"], g["distortion"], marker=marker, ms=4.5, lw=0.8, color=color, label=label)
        ax.set_yscale("log")
        ax.set_xlim(0, grid["rate"].max())
        ax.set_ylim(max(1e-6, float(rd["distortion"].min()) / 3), 1.5)
        label_axes(ax, "rate (bits/param, code entropy)", "distortion MSE/σ² (dimensionless)",
                   "Rate–distortion of weight quantizers")  # fmt: skip
        ax.legend(fontsize=7, loc="lower left")
    return fig


def plot_sdclip_vs_quantile(cmp: pd.DataFrame) -> Figure:
    """Model bytes vs relative MSE (left) and vs Δbpb when measured (right): SDClip as a
    curve over k, quantile search as its point, per bit width."""
    require_columns(cmp, ["bits", "rule", "predicted_bytes", "rel_mse"], "plot_sdclip_vs_quantile")
    has_bpb = "delta_bpb" in cmp and cmp["delta_bpb"].notna().any()
    ys = [("rel_mse", "weight MSE/σ² (dimensionless)")]
    if has_bpb:
        ys.append(("delta_bpb", "Δ val_bpb vs unquantized (bpb)"))
    with style_context():
        fig, axes = new_figure(1, len(ys), size=(5.5 * len(ys), 4.3))
        all_bits = sorted(cmp["bits"].unique())
        colors = dict(zip(all_bits, palette(len(all_bits))))
        for ax, (col, ylabel) in zip(axes[0], ys):
            for (b, rule), g in cmp.groupby(["bits", "rule"]):
                g = g.sort_values("predicted_bytes")
                curve = len(g) > 1
                ax.plot(g["predicted_bytes"] / 1e3, g[col], "-o" if curve else "*", color=colors[b],
                        ms=4 if curve else 13, mec="black", mew=0.4, label=f"int{b} {rule}")  # fmt: skip
            if col == "rel_mse":
                ax.set_yscale("log")
            label_axes(ax, "predicted model bytes (kB)", ylabel, "SDClip vs quantile search")
            ax.legend(fontsize=7)
    return fig
