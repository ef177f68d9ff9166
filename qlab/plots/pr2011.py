"""PR #2011's figures (regularizer transfer, eval pipeline, hidden-state geometry).

Every function takes a DataFrame in :mod:`qlab.analysis.papers`'s schema (the paper's
rows, qlab's own measurements with ``source="qlab"``, or both) and returns a
:class:`~matplotlib.figure.Figure`; nothing is shown or saved. Rows from different
sources are told apart by hatching / line style / a "[source]" suffix.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from qlab.analysis.matrix.stats import t_halfwidth
from qlab.analysis.papers import REGULARIZERS
from qlab.errors import DataError
from qlab.eval.stages import STAGE_LABELS, STAGES
from qlab.plots.style import (
    SOURCE_HATCHES,
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

__all__ = [
    "plot_cross_base_signs",
    "plot_pipeline_waterfall",
    "plot_pre_post_quant",
    "plot_pqt_compounding",
    "plot_lambda_budget",
    "plot_reg_quant_heatmaps",
    "plot_canonical_metrics",
    "plot_depth_trajectory",
    "plot_cka_heatmap",
]

_MBPB = "(mBPB)"


def _tested_reg(regs: str, base: str) -> str:
    # Base A always trains with SimCTG; on base B the paper added SimCTG together with the
    # regularizer, so "SimCTG+QAHSP" on B is grouped with QAHSP (and labelled in full).
    if base == "B" and regs.startswith("SimCTG+"):
        return regs[len("SimCTG+") :]
    return regs


def _lam(x: float) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"λ={x:g}"


# ---------------------------------------------------------------- Δ bpb bar charts
def plot_cross_base_signs(deltas: pd.DataFrame, bases: tuple[str, ...] = ("A", "B")) -> Figure:
    """Δ final bpb (mBPB) of each single regularizer vs its base's baseline, base A vs B
    (PR #2011 fig1). Input: :func:`~qlab.analysis.papers.reg_deltas` rows."""
    require_columns(deltas, ["base", "regs", "lambda", "delta_mbpb"], "plot_cross_base_signs")
    df = deltas[deltas["base"].isin(bases)].copy()
    df["reg"] = [_tested_reg(r, b) for r, b in zip(df["regs"], df["base"])]
    df = df[df["reg"].isin(REGULARIZERS)]
    if df.empty:
        raise DataError(f"plot_cross_base_signs: no single-regularizer rows on bases {bases}")
    df["src"] = source_column(df)
    first = df[df["base"] == bases[0]].groupby("reg")["delta_mbpb"].min()
    order = sorted(df["reg"].unique(), key=lambda r: (first.get(r, np.inf), r))
    colors = dict(zip(bases, palette(len(bases))))
    hatches = dict(zip(sources(df), SOURCE_HATCHES))
    with style_context():
        fig, axes = new_figure(1, 1, size=(max(6.5, 1.25 * len(order) + 2), 4.2))
        ax = axes[0, 0]
        width, seen = 0.26, set()
        for i, reg in enumerate(order):
            g = df[df["reg"] == reg].sort_values(["src", "base", "lambda"])
            offsets = (np.arange(len(g)) - (len(g) - 1) / 2) * width
            for off, (_, row) in zip(offsets, g.iterrows()):
                key = (row["base"], row["src"])
                label = f"base {row['base']}" + (f" [{row['src']}]" if len(hatches) > 1 else "")
                bar = ax.bar(
                    i + off,
                    row["delta_mbpb"],
                    width * 0.92,
                    color=colors[row["base"]],
                    hatch=hatches[row["src"]],
                    edgecolor="0.2",
                    linewidth=0.6,
                    label=None if key in seen else label,
                )
                seen.add(key)
                tag = _lam(row["lambda"]) + ("\n" + row["regs"] if row["regs"] != reg else "")
                annotate_bars(
                    ax, bar, fmt="{:+.2f}\n" + tag.replace("{", "{{").replace("}", "}}"), fontsize=6.5
                )
        ax.axhline(0, color="0.2", linewidth=0.8)
        ax.set_xticks(range(len(order)), order)
        ax.margins(y=0.25)
        ax.legend(loc="best")
        label_axes(
            ax,
            "regularizer (λ as annotated on each bar)",
            f"Δ final val_bpb vs base baseline {_MBPB}",
            "Same regularizer on two bases: Δ final bpb vs each base's own baseline\n(negative = helps)",
            unitless="x",
        )
    return fig


def plot_pqt_compounding(deltas: pd.DataFrame, base: str = "A-PQT") -> Figure:
    """Δ final bpb (mBPB) of regularizers added on top of pre-quant TTT vs PQT alone
    (PR #2011 fig_pqt_compounding). Input: ``reg_deltas()`` rows."""
    require_columns(
        deltas, ["base", "variant", "final_bpb", "baseline_bpb", "delta_mbpb"], "plot_pqt_compounding"
    )
    df = deltas[deltas["base"] == base]
    if df.empty:
        raise DataError(f"plot_pqt_compounding: no rows with base {base!r}")
    ref = float(df["baseline_bpb"].iloc[0])
    names = [f"{base} alone\n(reference)"] + [v.replace(" + ", " +\n", 1) for v in df["variant"]]
    values = [0.0, *df["delta_mbpb"]]
    finals = [ref, *df["final_bpb"]]
    with style_context():
        fig, axes = new_figure(1, 1, size=(6.4, 4.0))
        ax = axes[0, 0]
        colors = ["0.6"] + palette(len(df))
        bars = ax.bar(range(len(values)), values, 0.6, color=colors, edgecolor="0.2", linewidth=0.6)
        for bar, v, f in zip(bars, values, finals):
            ax.annotate(
                f"{f:.5f} bpb\n({v:+.2f} mBPB)",
                (bar.get_x() + bar.get_width() / 2, v),
                xytext=(0, 3 if v >= 0 else -3),
                textcoords="offset points",
                ha="center",
                va="bottom" if v >= 0 else "top",
                fontsize=7.5,
            )
        ax.axhline(0, color="0.2", linewidth=0.8)
        ax.set_xticks(range(len(values)), names)
        lim = max(0.5, 1.6 * max(abs(v) for v in values))
        ax.set_ylim(-lim, lim)
        label_axes(
            ax,
            "variant",
            f"Δ final val_bpb vs {base} alone {_MBPB}",
            "Regularizers on top of pre-quant TTT: Δ final bpb vs PQT alone",
            unitless="x",
        )
    return fig


def plot_lambda_budget(deltas: pd.DataFrame, base: str = "A") -> Figure:
    """Single regularizers at full λ vs pairs at reduced λ: Δ final bpb (mBPB) vs the base
    baseline (PR #2011 fig_lambda_budget). Input: ``reg_deltas()`` rows with ``lambdas``."""
    require_columns(deltas, ["base", "regs", "lambdas", "delta_mbpb"], "plot_lambda_budget")
    df = deltas[(deltas["base"] == base) & (deltas["regs"] != "")].copy()
    pairs = df[df["regs"].str.contains("+", regex=False)]
    in_pairs = {r for p in pairs["regs"] for r in p.split("+")}
    singles = df[~df["regs"].str.contains("+", regex=False)]
    if in_pairs:
        singles = singles[singles["regs"].isin(in_pairs)]
    if singles.empty and pairs.empty:
        raise DataError(f"plot_lambda_budget: no regularizer rows on base {base!r}")
    singles, pairs = singles.sort_values("delta_mbpb"), pairs.sort_values("delta_mbpb")
    rows = pd.concat([singles.assign(kind="single"), pairs.assign(kind="pair")])
    labels = [" + ".join(x.replace("=", " λ=") for x in s.split(",")) for s in rows["lambdas"]]
    labels = [
        lab + (f" [{s}]" if len(sources(rows)) > 1 else "") for lab, s in zip(labels, source_column(rows))
    ]
    c_single, c_pair = palette(2)
    with style_context():
        fig, axes = new_figure(1, 1, size=(7.2, 0.42 * len(rows) + 1.6))
        ax = axes[0, 0]
        y = np.arange(len(rows))[::-1]
        colors = [c_single if k == "single" else c_pair for k in rows["kind"]]
        ax.barh(y, rows["delta_mbpb"], 0.7, color=colors, edgecolor="0.2", linewidth=0.6)
        for yi, v in zip(y, rows["delta_mbpb"]):
            ax.annotate(
                f"{v:+.2f}",
                (v, yi),
                xytext=(-3 if v < 0 else 3, 0),
                textcoords="offset points",
                ha="right" if v < 0 else "left",
                va="center",
                fontsize=7.5,
            )
        ax.set_yticks(y, labels)
        ax.axvline(0, color="0.2", linewidth=0.8)
        if not singles.empty:
            best = float(singles["delta_mbpb"].min())
            ax.axvline(
                best, color="0.3", linestyle="--", linewidth=1, label=f"best single ({best:+.2f} mBPB)"
            )
        handles = [
            *ax.get_legend_handles_labels()[0],
            Patch(color=c_single, label="single regularizer"),
            Patch(color=c_pair, label="pair (λ per regularizer as labelled)"),
        ]
        ax.margins(x=0.15)
        ax.legend(handles=handles, loc="lower left")
        base_bpb = rows["baseline_bpb"].iloc[0] if "baseline_bpb" in rows else float("nan")
        label_axes(
            ax,
            f"Δ final val_bpb vs base {base} baseline {base_bpb:.5f} bpb {_MBPB}",
            "regularizer(s)",
            "λ budget: single regularizers vs pairs at reduced λ",
            unitless="y",
        )
    return fig


def plot_pre_post_quant(wide: pd.DataFrame, base: str | None = "A") -> Figure:
    """Pre- vs post-quantization bpb per variant (one dot panel per base, each on its own
    bpb axis) and the quantization tax as bars from zero in mBPB (PR #2011
    fig_real_pre_post_quant, redrawn so the bar lengths are honest). ``base=None`` keeps
    every base. Rows with a ``seed`` column are averaged per (base, variant); the whiskers
    are then the 95 % t interval of the mean over seeds (the tax paired within each seed).
    Input: ``pipeline_attribution()`` / ``stage_attribution()`` / matrix pipeline rows."""
    require_columns(wide, ["variant", "pre_quant_bpb", "quantized_bpb"], "plot_pre_post_quant")
    df = wide if base is None or "base" not in wide.columns else wide[wide["base"] == base]
    df = df.dropna(subset=["pre_quant_bpb", "quantized_bpb"])
    if df.empty:
        raise DataError(f"plot_pre_post_quant: no rows with both stages (base {base!r})")
    rows = _pre_post_rows(df)
    if (rows["n"] < 2).all():  # no interval to draw: no zero-width whiskers either
        rows[["pre_err", "post_err", "tax_err"]] = np.nan
    bases = list(dict.fromkeys(rows["base"]))
    c_pre, c_post = palette(2)
    with style_context():
        fig, axes = new_figure(1, len(bases) + 1, size=(4.4 * len(bases) + 5.4, 4.4))
        for ax, b in zip(axes[0], bases):
            g = rows[rows["base"] == b]
            x = np.arange(len(g))
            ax.vlines(x, g["pre"], g["post"], color="0.7", linewidth=2)
            ax.errorbar(x - 0.08, g["pre"], yerr=g["pre_err"], fmt="o", color=c_pre, capsize=3,
                        zorder=3, label="pre-quant (post-EMA)")  # fmt: skip
            ax.errorbar(x + 0.08, g["post"], yerr=g["post_err"], fmt="s", color=c_post, capsize=3,
                        zorder=3, label="quantized")  # fmt: skip
            ax.set_xticks(x, g["name"], rotation=30, ha="right")
            ax.margins(x=0.15)
            ax.legend(loc="best", fontsize=7)
            label_axes(ax, "variant", "val_bpb (bpb)", f"val_bpb, base {b}" if b else "val_bpb", unitless="x")
        ax2 = axes[0, -1]
        x = np.arange(len(rows))
        colors = dict(zip(bases, palette(len(bases) + 2)[2:]))
        bars = ax2.bar(x, rows["tax"], 0.6, yerr=rows["tax_err"], capsize=3, edgecolor="0.2", linewidth=0.6,
                       color=[colors[b] for b in rows["base"]])  # fmt: skip
        annotate_bars(ax2, bars, fmt="{:+.2f}", err=rows["tax_err"])
        ax2.axhline(0, color="0.2", linewidth=0.8)
        ax2.set_xticks(x, [f"{b} · {n}" if len(bases) > 1 else n for b, n in zip(rows["base"], rows["name"])],
                       rotation=30, ha="right")  # fmt: skip
        ax2.margins(y=0.15)
        label_axes(ax2, "variant", f"quantized − pre-quant {_MBPB}", "Quantization tax", unitless="x")
        n = int(rows["n"].max())
        what = f"mean of {n} seeds, whiskers 95 % t interval" if n > 1 else "one seed: no interval"
        fig.suptitle("Pre- vs post-quantization" + (f" on base {base}" if base else "") + f" ({what})")
    return fig


def _pre_post_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (base, variant, source): mean pre/post bpb, mean tax (mBPB), the 95 % t
    half-widths over seeds (0 with one row) and the count, in first-appearance order."""

    d = df.assign(base=df["base"].astype(str) if "base" in df.columns else "", src=source_column(df),
                  tax=1e3 * (df["quantized_bpb"] - df["pre_quant_bpb"]))  # fmt: skip
    multi_src = len(sources(d)) > 1
    out = []
    for (b, v, s), g in d.groupby(["base", "variant", "src"], sort=False):
        pre, post, tax = (g[c].to_numpy(float) for c in ("pre_quant_bpb", "quantized_bpb", "tax"))
        hw = [0.0 if len(g) < 2 else t_halfwidth(a) for a in (pre, post, tax)]
        out.append({"base": b, "name": f"{v} [{s}]" if multi_src else str(v), "n": len(g),
                    "pre": pre.mean(), "post": post.mean(), "tax": tax.mean(),
                    "pre_err": hw[0], "post_err": hw[1], "tax_err": hw[2]})  # fmt: skip
    return pd.DataFrame(out)


# ---------------------------------------------------------------- stage lines
def plot_pipeline_waterfall(long: pd.DataFrame, variants: list[str] | None = None) -> Figure:
    """val_bpb of each variant through the eval stages, one panel per base, shared bpb axis
    (PR #2011 fig_pipeline_waterfall). Input: ``eval_pipeline_breakdown()`` rows."""
    require_columns(long, ["variant", "stage", "bpb"], "plot_pipeline_waterfall")
    df = long if variants is None else long[long["variant"].isin(variants)]
    if df.empty:
        raise DataError("plot_pipeline_waterfall: no rows left after selecting variants")
    df = df.assign(base=df["base"] if "base" in df.columns else "all", src=source_column(df))
    bases = list(dict.fromkeys(df["base"]))
    styles = dict(zip(sources(df), SOURCE_LINESTYLES))
    with style_context():
        fig, axes = new_figure(1, len(bases), size=(4.6 * len(bases) + 0.6, 4.4), sharey=True)
        for ax, b in zip(axes[0], bases):
            g = df[df["base"] == b]
            stages = [s for s in STAGES if s in set(g["stage"])]
            pos = {s: i for i, s in enumerate(stages)}
            keys = list(dict.fromkeys(zip(g["variant"], g["src"])))
            for color, (v, s) in zip(palette(len(keys)), keys):
                line = g[(g["variant"] == v) & (g["src"] == s)].sort_values("stage", key=lambda c: c.map(pos))
                ax.plot(
                    line["stage"].map(pos),
                    line["bpb"],
                    marker="o",
                    markersize=4,
                    color=color,
                    linestyle=styles[s],
                    label=v + (f" [{s}]" if len(styles) > 1 else ""),
                )
            ax.set_xticks(range(len(stages)), [STAGE_LABELS[s] for s in stages], rotation=20, ha="right")
            ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, frameon=False)
            label_axes(ax, "eval pipeline stage", "val_bpb (bpb)", f"base {b}", unitless="x")
        fig.suptitle("val_bpb through the evaluation pipeline, per base")
    return fig


def plot_depth_trajectory(df: pd.DataFrame) -> Figure:
    """Mean ‖h‖₂ and mean per-token excess kurtosis per block, one line per variant
    (PR #2011 fig_depth_trajectory). Kurtosis uses a symlog axis (it spans 0.7 … 390)."""
    require_columns(df, ["variant", "block", "mean_norm", "kurtosis"], "plot_depth_trajectory")
    d = df.assign(src=source_column(df))
    keys = list(dict.fromkeys(zip(d["variant"], d["src"])))
    styles = dict(zip(sources(d), SOURCE_LINESTYLES))
    with style_context():
        fig, axes = new_figure(1, 2, size=(11, 4.0))
        for ax, col in zip(axes[0], ("mean_norm", "kurtosis")):
            for color, (v, s) in zip(palette(len(keys)), keys):
                g = d[(d["variant"] == v) & (d["src"] == s)].sort_values("block")
                ax.plot(
                    g["block"],
                    g[col],
                    marker="o",
                    markersize=3.5,
                    color=color,
                    linestyle=styles[s],
                    label=v + (f" [{s}]" if len(styles) > 1 else ""),
                )
        heavy = float(d["kurtosis"].abs().max()) >= 1.0  # below 1 symlog's log part is empty
        if heavy:
            axes[0, 1].set_yscale("symlog", linthresh=1.0)
        for ax in axes[0]:
            ax.xaxis.get_major_locator().set_params(integer=True)
        axes[0, 1].axhline(0, color="0.5", linewidth=0.8)
        axes[0, 1].legend(fontsize=7)
        xl = "block index (0 = first block after the embedding)"
        label_axes(axes[0, 0], xl, "mean token ‖h‖₂ (hidden-state units)", "Hidden-state norm through depth")
        label_axes(
            axes[0, 1],
            xl,
            "per-token excess kurtosis (dimensionless)",
            "Heavy tails through depth" + (" (symlog axis)" if heavy else ""),
        )
        fig.suptitle("Where in depth the hidden states grow outliers")
    return fig


# ---------------------------------------------------------------- geometry bars and heatmaps
_CANONICAL = {
    "mean_abs_cos": (
        "mean |cos(hᵢ, hⱼ)| (dimensionless)",
        "Anisotropy (PR's 'isoscore'; lower = more isotropic)",
    ),
    "eff_rank": ("effective rank (dimensions)", "Effective rank (higher = more dimensions used)"),
    "norm_var": ("variance of token ‖h‖₂ (hidden units²)", "Token-norm variance (lower = more uniform)"),
    "max_abs": ("max |h| over all coordinates (hidden units)", "Largest coordinate |h|"),
}


def plot_canonical_metrics(
    df: pd.DataFrame,
    metrics: tuple[str, ...] = tuple(_CANONICAL),
    title: str = "Final hidden-state geometry per variant (128 tokens × 512 dims)",
) -> Figure:
    """Bars (from zero) of four hidden-state metrics per variant (PR #2011
    fig_real_canonical_metrics); several sources become grouped bars. The default title
    describes the paper's measurement; pass ``title`` for other data."""
    require_columns(df, ["variant", *metrics], "plot_canonical_metrics")
    d = df.assign(src=source_column(df))
    variants, srcs = list(dict.fromkeys(d["variant"])), sources(d)
    n = len(metrics)
    ncols = 2 if n > 1 else 1
    nrows = math.ceil(n / ncols)
    width = 0.8 / len(srcs)
    colors = palette(len(variants))
    with style_context():
        fig, axes = new_figure(nrows, ncols, size=(5.6 * ncols, 3.6 * nrows))
        for ax, m in zip(axes.flat, metrics):
            for j, s in enumerate(srcs):
                vals = d[d["src"] == s].set_index("variant")[m].reindex(variants)
                x = np.arange(len(variants)) + (j - (len(srcs) - 1) / 2) * width
                bars = ax.bar(
                    x,
                    vals,
                    width * 0.95,
                    color=colors,
                    edgecolor="0.2",
                    linewidth=0.6,
                    hatch=SOURCE_HATCHES[j % len(SOURCE_HATCHES)],
                    label=s,
                )
                annotate_bars(ax, bars, fmt="{:.3g}", fontsize=6.5)
            ax.set_xticks(range(len(variants)), variants, rotation=25, ha="right")
            ax.margins(y=0.12)
            if len(srcs) > 1:
                ax.legend(fontsize=7)
            ylabel, panel_title = _CANONICAL.get(m, (f"{m} (as measured)", m))
            label_axes(ax, "variant", ylabel, panel_title, unitless="x")
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        fig.suptitle(title)
    return fig


_HEATMAPS = {  # column: (title, colour-bar label, higher is better)
    "l2_distortion": ("L2 distortion mean ‖h − ĥ‖₂ (lower = better)", "hidden units", False),
    "cos_shift": ("Cosine shift 1 − mean cos(h, ĥ) (lower = better)", "dimensionless", False),
    "mean_abs_cos_post": ("Post-quant mean |cos| — PR's 'isoscore' (lower = better)", "dimensionless", False),
    "isoscore_post": ("Post-quant IsoScore (higher = more isotropic)", "dimensionless", True),
    "eff_rank_post": ("Post-quant effective rank (higher = better)", "dimensions", True),
}


def _display_exponent(vals: np.ndarray) -> int:
    """Power of ten that brings the largest |value| into [1, 1000), or 0 when already there."""
    top = float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 0.0
    if top == 0.0 or 0.01 <= top < 1000:
        return 0
    return int(math.floor(math.log10(top)))


def _cell_text(v: float, fmt: str) -> str:
    """``fmt`` of v, or a short "1.2e-5" for tiny values (the default would print 1.15e-05)."""
    if v != 0 and np.isfinite(v) and abs(v) < 1e-3:
        e = int(math.floor(math.log10(abs(v))))
        return f"{v / 10.0**e:.2g}e{e}"
    return fmt.format(v)


def _heatmap(ax, mat: pd.DataFrame, label: str, higher_better: bool, fig: Figure, fmt: str) -> None:
    vals = mat.to_numpy(dtype=float)
    lo, hi = np.nanmin(vals), np.nanmax(vals)
    use_log = lo > 0 and hi / lo > 20
    norm = LogNorm(lo, hi) if use_log else Normalize(lo, hi)
    cmap = "cividis" if higher_better else "cividis_r"
    im = ax.imshow(vals, cmap=cmap, norm=norm, aspect="auto")
    cm = im.get_cmap()
    exp = _display_exponent(vals)  # cells print v / 10^exp so every number fits its cell
    for (i, j), v in np.ndenumerate(vals):
        r, g, b, _ = cm(norm(v))
        light = 0.299 * r + 0.587 * g + 0.114 * b > 0.5
        ax.text(
            j, i, _cell_text(v / 10.0**exp, fmt), ha="center", va="center", fontsize=7,
            color="0.1" if light else "white",
        )  # fmt: skip
    if exp:
        ax.set_title(f"{ax.get_title()} (cells ×10^{exp})")
    ax.set_xticks(range(mat.shape[1]), mat.columns, rotation=30, ha="right")
    ax.set_yticks(range(mat.shape[0]), mat.index)
    ax.grid(False)
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    cb.set_label(f"({label}{'; log colour scale' if use_log else ''}) brighter = better", fontsize=7.5)


def plot_reg_quant_heatmaps(df: pd.DataFrame, metrics: tuple[str, ...] | None = None) -> Figure:
    """Variant × scheme heatmaps of hidden-state quantization metrics (PR #2011
    fig_reg_quant_matrix_real, one panel per metric). Several sources stack as extra rows."""
    require_columns(df, ["variant", "scheme"], "plot_reg_quant_heatmaps")
    metrics = metrics or tuple(m for m in _HEATMAPS if m in df.columns)
    require_columns(df, list(metrics), "plot_reg_quant_heatmaps")
    if not metrics:
        raise DataError("plot_reg_quant_heatmaps: no metric columns found")
    d = df.assign(
        row=df["variant"] if len(sources(df)) == 1 else df["variant"] + " [" + source_column(df) + "]"
    )
    rows, cols = list(dict.fromkeys(d["row"])), list(dict.fromkeys(d["scheme"]))
    ncols = 2 if len(metrics) > 1 else 1
    nrows = math.ceil(len(metrics) / ncols)
    with style_context():
        width = 2.6 + 0.62 * len(cols)  # ~0.6 in per cell: room for a 5-character number
        fig, axes = new_figure(nrows, ncols, size=(width * ncols, 0.36 * len(rows) * nrows + 2.3 * nrows))
        for ax, m in zip(axes.flat, metrics):
            mat = d.pivot_table(index="row", columns="scheme", values=m, aggfunc="first").reindex(
                index=rows, columns=cols
            )
            title, unit, higher = _HEATMAPS.get(m, (m, "as measured", False))
            label_axes(ax, "quantization scheme", "variant", title, unitless=("x", "y"))
            _heatmap(ax, mat, unit, higher, fig, "{:.3g}")
        for ax in list(axes.flat)[len(metrics) :]:
            ax.set_visible(False)
        fig.suptitle("Hidden-state quantization: regularizer variant × scheme")
    return fig


def _square_cka(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    if {"variant_a", "variant_b", "cka"} <= set(df.columns):
        d = df.assign(src=source_column(df))
        out = {}
        for s in sources(d):
            g = d[d["src"] == s]
            order = list(dict.fromkeys(g["variant_a"]))
            out[s] = g.pivot_table(index="variant_a", columns="variant_b", values="cka").reindex(
                index=order, columns=order
            )
        return out
    if df.shape[0] == df.shape[1] and list(df.index) == list(df.columns):
        return {"data": df.astype(float)}
    raise DataError("plot_cka_heatmap: expected long rows (variant_a, variant_b, cka) or a square table")


def plot_cka_heatmap(df: pd.DataFrame, title: str = "Linear CKA of final hidden states") -> Figure:
    """Linear CKA between variants' final hidden states (PR #2011 fig_cka_heatmap); one
    panel per source (its name in brackets when there are several). Accepts long rows or
    a square table (``qlab.analysis.cka.cka_matrix``)."""
    mats = _square_cka(df)
    with style_context():
        fig, axes = new_figure(1, len(mats), size=(5.8 * len(mats), 5.0))
        for ax, (s, mat) in zip(axes[0], mats.items()):
            im = ax.imshow(mat.to_numpy(dtype=float), cmap="magma", vmin=0, vmax=1)
            for (i, j), v in np.ndenumerate(mat.to_numpy(dtype=float)):
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7.5,
                    color="0.1" if v > 0.6 else "white",
                )
            ax.set_xticks(range(mat.shape[1]), mat.columns, rotation=30, ha="right")
            ax.set_yticks(range(mat.shape[0]), mat.index)
            ax.grid(False)
            fig.colorbar(im, ax=ax, shrink=0.85).set_label(
                "linear CKA (dimensionless; 1 = same representation)"
            )
            label_axes(
                ax, "variant", "variant", title + (f" [{s}]" if len(mats) > 1 else ""), unitless=("x", "y")
            )
    return fig
