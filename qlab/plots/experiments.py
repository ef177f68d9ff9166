"""Figures of qlab's own experiments that the paper-figure modules do not draw.

One function per figure, DataFrame in, Figure out (schemas in
:mod:`qlab.figures.tables`). Where a paper published a number for the same quantity,
the rows with ``source`` starting ``paper:`` are drawn in their own panel (the scales
differ by orders of magnitude between a CPU-sized model and the record).
"""

from __future__ import annotations

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from qlab.analysis.papers import STAGE_LABELS
from qlab.errors import DataError
from qlab.plots.style import (
    annotate_bars,
    label_axes,
    new_figure,
    palette,
    require_columns,
    style_context,
)

__all__ = [
    "plot_quantization_example",
    "plot_quant_gap",
    "plot_ttt_optimizers",
    "plot_ttt_recovery",
    "plot_curriculum_schedule",
    "plot_freezedry_histogram",
    "plot_sparsity_budget",
    "plot_eval_levers",
    "plot_passthrough_savings",
    "plot_ttt_epochs",
]


def _split(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(qlab rows, paper rows) by the ``source`` column."""
    paper = df["source"].astype(str).str.startswith("paper")
    return df[~paper], df[paper]


def _bars(ax, labels: list[str], values, colors, fmt: str, hatch: str = "") -> None:
    bars = ax.bar(range(len(values)), values, 0.6, color=colors, edgecolor="0.2", linewidth=0.6, hatch=hatch)
    annotate_bars(ax, bars, fmt=fmt)
    ax.set_xticks(range(len(values)), labels)
    ax.axhline(0, color="0.2", linewidth=0.8)
    ax.margins(y=0.18)
    lo, hi = ax.get_ylim()
    pad = 0.12 * (hi - lo)  # room for the value labels on both sides of zero
    ax.set_ylim(min(lo, -pad), max(hi, pad))


def plot_quantization_example(df: pd.DataFrame) -> Figure:
    """PR #1394's quantization example on a real matrix: (a) weight histogram in units of
    σ, then the fraction of weights per code for int5 (clip ±2kσ), int4 (±kσ) and NF4."""
    require_columns(df, ["panel", "value", "fraction", "width", "clip_sigma"], "plot_quantization_example")
    panels = list(dict.fromkeys(df["panel"]))
    if panels[0] != "weights":
        raise DataError("plot_quantization_example: the first panel must be the weight histogram")
    tensor = str(df["tensor"].iloc[0]) if "tensor" in df else "matrix"
    with style_context():
        fig, axes = new_figure(1, len(panels), size=(3.3 * len(panels), 3.3))
        for i, (ax, panel) in enumerate(zip(axes[0], panels)):
            g = df[df["panel"] == panel]
            color = palette(1)[0]
            ax.bar(g["value"], g["fraction"], width=g["width"], color=color, edgecolor="white", linewidth=0.3)
            tag = "abcdefgh"[i]
            if panel == "weights":
                label_axes(ax, "weight / σ (σ units)", "density (1/σ)", f"({tag}) weights")
                continue
            k = float(g["clip_sigma"].iloc[0])
            xlabel = "NF4 level × 7 (int4 grid units)" if panel == "nf4" else "quantized value (integer code)"
            label_axes(ax, xlabel, "fraction of weights (fraction)", f"({tag}) {panel} clip ±{k:g}σ")
            span = float(g["value"].abs().max())
            ax.set_xlim(-span - 1, span + 1)
        fig.suptitle(f"Quantized code histograms of {tensor}")
    return fig


def plot_quant_gap(df: pd.DataFrame) -> Figure:
    """Quantization gap (quantized − pre-quant bpb, mBPB) per method: qlab's measurement
    (left, with each artifact's size when given: the methods differ in rate too) and
    PR #639's published numbers (right)."""
    require_columns(df, ["source", "method", "gap_mbpb"], "plot_quant_gap")
    ours, paper = _split(df)
    parts = [(p, t) for p, t in ((ours, "qlab (this checkpoint)"), (paper, "PR #639 (published)")) if len(p)]
    # one colour per kind of quantizer in both panels, and one y scale, so bars compare across them
    colour_of = dict(zip(("rtn", "clip", "gptq"), palette(3), strict=True))
    with style_context():
        fig, axes = new_figure(1, len(parts), size=(5.2 * len(parts), 4.0), sharey=True)
        for ax, (part, title) in zip(axes[0], parts):
            labels = [m.replace(" (", "\n(") for m in part["method"]]
            if "artifact_bytes" in part and part["artifact_bytes"].notna().all():
                labels = [f"{lab}\n{b / 1e3:,.0f} kB" for lab, b in zip(labels, part["artifact_bytes"])]
            colours = [colour_of[_quantizer_kind(m)] for m in part["method"]]
            _bars(ax, labels, part["gap_mbpb"], colours, "{:+.2f}", "//" if part is paper else "")
            label_axes(ax, "quantizer (int6)", "quantization gap (mBPB)", title, unitless="x")
        values = pd.concat([p["gap_mbpb"] for p, _ in parts])
        lo, hi = min(0.0, float(values.min())), max(0.0, float(values.max()))
        pad = 0.2 * (hi - lo or 1.0)  # the shared scale holds every bar and its label
        axes[0, 0].set_ylim(lo - (pad if lo < 0 else 0.3 * pad), hi + pad)
        fig.suptitle("Quantization gap: RTN vs clip search vs full GPTQ")
    return fig


def _quantizer_kind(method: str) -> str:
    m = method.lower()
    return "rtn" if m.startswith("rtn") else "clip" if m.startswith("clip") else "gptq"


def plot_ttt_optimizers(df: pd.DataFrame, paper_delta_bpb: float | None = None) -> Figure:
    """Score-first TTT on the GPTQ model per optimizer: running bpb over chunks (left) and
    Δ final bpb vs no adaptation (right, mBPB), with PR #639's AdamW number beside ours."""
    require_columns(df, ["optimizer", "chunk", "running_bpb", "final_bpb"], "plot_ttt_optimizers")
    opts = list(dict.fromkeys(df["optimizer"]))
    ref_name = next((o for o in opts if o.startswith("no TTT")), None)
    with style_context():
        fig, axes = new_figure(1, 2, size=(11, 4.2))
        ax = axes[0, 0]
        for color, opt in zip(palette(len(opts)), opts):
            g = df[df["optimizer"] == opt].sort_values("chunk")
            ls = ":" if opt == ref_name else "-"
            ax.plot(g["chunk"], g["running_bpb"], ls, marker=".", color=color, label=opt)
        ax.legend(fontsize=7.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        label_axes(ax, "TTT chunk index (chunk)", "running val_bpb (bpb)", "Running bpb while adapting")
        ax = axes[0, 1]
        finals = df.groupby("optimizer", sort=False)["final_bpb"].first()
        if ref_name is None:
            raise DataError("plot_ttt_optimizers: needs a 'no TTT' reference run")
        deltas = [(o, 1e3 * (finals[o] - finals[ref_name])) for o in opts if o != ref_name]
        labels = [f"qlab\n{o}" for o, _ in deltas]
        values = [v for _, v in deltas]
        colors: list = list(palette(len(opts))[1 : 1 + len(deltas)])
        if paper_delta_bpb is not None:
            labels.append("PR #639 AdamW\n(published, as reported)")
            values.append(1e3 * paper_delta_bpb)
            colors.append("0.75")
        _bars(ax, labels, values, colors, "{:+.1f}")
        label_axes(ax, "TTT optimizer", "Δ final val_bpb vs no TTT (mBPB)", "SGD vs AdamW TTT", unitless="x")
        fig.suptitle("Score-first TTT on a GPTQ-quantized model: SGD vs AdamW")
    return fig


def plot_ttt_recovery(
    per_chunk: pd.DataFrame, pre_quant_bpb: float, quantized_bpb: float, no_ttt: pd.DataFrame | None = None
) -> Figure:
    """PR #1818's TTT recovery curve: running bpb over TTT chunks, with the pre-quant and
    post-quant (before TTT) levels as reference lines and, when given, the same chunks
    scored without adaptation (``no_ttt``): what the data alone does to the running bpb,
    so a hard chunk is not read as TTT damage."""
    require_columns(per_chunk, ["chunk", "running_bpb"], "plot_ttt_recovery")
    g = per_chunk.sort_values("chunk")
    with style_context():
        fig, axes = new_figure(1, 1, size=(7.6, 4.2))
        ax = axes[0, 0]
        c = palette(4)
        final = float(g["running_bpb"].iloc[-1])
        ax.plot(
            g["chunk"], g["running_bpb"], "-", marker=".", color=c[0], label=f"score-first TTT → {final:.4f}"
        )
        if no_ttt is not None and len(no_ttt):
            r = no_ttt.sort_values("chunk")
            ax.plot(r["chunk"], r["running_bpb"], "--", marker=".", color="0.45",
                    label=f"same chunks, no TTT → {float(r['running_bpb'].iloc[-1]):.4f}")  # fmt: skip
        ax.axhline(
            quantized_bpb,
            color=c[1],
            ls=":",
            lw=1.3,
            label=f"post-quant, before TTT ({quantized_bpb:.4f})",
        )
        ax.axhline(pre_quant_bpb, color=c[2], ls="--", lw=1.1, label=f"pre-quant ({pre_quant_bpb:.4f})")
        ax.legend(fontsize=7.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        label_axes(
            ax, "TTT chunk index (chunk)", "running val_bpb (bpb)", "TTT recovery over the validation chunks"
        )
    return fig


def plot_curriculum_schedule(df: pd.DataFrame) -> Figure:
    """Entropy-bucket curriculum: pre-normalisation weights (left) and the stacked sampling
    probabilities (right) over training progress (PR #1818 fig3)."""
    require_columns(df, ["frac", "bucket", "weight", "prob"], "plot_curriculum_schedule")
    buckets = sorted(df["bucket"].unique())
    cmap = mpl.colormaps["viridis"]
    colors = [cmap(i / max(1, len(buckets) - 1)) for i in range(len(buckets))]
    with style_context():
        fig, axes = new_figure(1, 2, size=(11, 4.0))
        ax = axes[0, 0]
        for color, b in zip(colors, buckets):
            g = df[df["bucket"] == b]
            tag = " (easiest)" if b == buckets[0] else " (hardest)" if b == buckets[-1] else ""
            ax.plot(g["frac"], g["weight"], color=color, lw=1.8, label=f"bucket {b}{tag}")
        ax.legend(fontsize=7, ncol=2)
        label_axes(
            ax,
            "training progress (fraction)",
            "bucket weight w_b (pre-normalise, dimensionless)",
            "Crossfade of bucket weights",
        )
        ax = axes[0, 1]
        wide = df.pivot(index="frac", columns="bucket", values="prob")
        ax.stackplot(wide.index, wide.T.to_numpy(), colors=colors)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        floor = float(df["prob"].min())
        label_axes(
            ax,
            "training progress (fraction)",
            "P(sample from bucket b) (probability)",
            f"Sampling probabilities (floor {floor:.2f})",
        )
        fig.suptitle("Entropy-bucket curriculum: easy sequences first, hard ones last")
    return fig


def plot_freezedry_histogram(df: pd.DataFrame) -> Figure:
    """Histogram of freeze-dry's per-element neighbour-prediction residual on a real matrix,
    with the drop threshold and the fraction that would be dropped."""
    require_columns(df, ["bin_left", "bin_right", "count", "threshold", "drop_fraction"], "plot_freezedry")
    thr = float(df["threshold"].iloc[0])
    with style_context():
        fig, axes = new_figure(1, 1, size=(7.6, 4.2))
        ax = axes[0, 0]
        width = df["bin_right"] - df["bin_left"]
        ax.bar(
            df["bin_left"],
            df["count"],
            width=width,
            align="edge",
            color=palette(1)[0],
            alpha=0.8,
            label="interior elements",
        )
        ax.axvline(thr, color="#c0392b", ls="--", lw=1.5, label=f"drop threshold {thr:g}")
        cand, drop = float(df["candidate_fraction"].iloc[0]), float(df["drop_fraction"].iloc[0])
        note = "matrix skipped (< 5% droppable)" if bool(df["skipped"].iloc[0]) else f"dropped {drop:.1%}"
        ax.annotate(
            f"|residual| < {thr:g}: {cand:.1%} of elements\n{note}",
            (thr, 0.9),
            xycoords=("data", "axes fraction"),
            xytext=(6, 0),
            textcoords="offset points",
            fontsize=8,
            color="#c0392b",
            va="top",
            bbox={"boxstyle": "round", "fc": "white", "ec": "none", "alpha": 0.9},
        )
        ax.set_xlim(0, float(df["bin_right"].max()))
        ax.legend(fontsize=7.5, loc="upper right")
        tensor = df["tensor"].iloc[0] if "tensor" in df else "matrix"
        label_axes(
            ax,
            "|w[i,j] − (a_j·w[i,j−1] + b_j·w[i,j+1])| (weight units)",
            "elements (count)",
            f"Freeze-dry residuals of {tensor}",
        )
    return fig


def plot_sparsity_budget(df: pd.DataFrame) -> Figure:
    """2:4 packing vs int6: bits per 4-element block, nominal and after brotli-11 (left),
    and what the bits cost in relative weight MSE (right)."""
    require_columns(df, ["scheme", "nominal_bits_per_block", "brotli_bits_per_block", "rel_mse"], "sparsity")
    x = np.arange(len(df))
    with style_context():
        fig, axes = new_figure(1, 2, size=(10, 4.0))
        ax = axes[0, 0]
        c = palette(2)
        annotate_bars(
            ax,
            ax.bar(
                x - 0.2,
                df["nominal_bits_per_block"],
                0.38,
                color=c[0],
                edgecolor="0.2",
                label="nominal (as packed)",
            ),
            fmt="{:.1f}",
        )
        annotate_bars(
            ax,
            ax.bar(
                x + 0.2,
                df["brotli_bits_per_block"],
                0.38,
                color=c[1],
                edgecolor="0.2",
                label="after brotli-11 (+fp16 row scales)",
            ),
            fmt="{:.1f}",
        )
        ax.set_xticks(x, [f"{s}" for s in df["scheme"]])
        ax.margins(y=0.15)
        ax.legend(fontsize=7.5)
        label_axes(
            ax, "storage scheme", "bits per 4-element block (bits)", "Bit budget per block", unitless="x"
        )
        ax = axes[0, 1]
        _bars(ax, list(df["scheme"]), df["rel_mse"], palette(3)[2:3] * len(df), "{:.3f}")
        label_axes(ax, "storage scheme", "weight MSE / variance (dimensionless)", "Distortion", unitless="x")
        fig.suptitle("2:4 sparsity (3-bit values + 4-bit pair index) vs int6 SDClip, all matrices")
    return fig


def plot_eval_levers(ours: pd.DataFrame, paper: pd.DataFrame | None = None) -> Figure:
    """Paired Δ val_bpb against standard windows at the training length, per evaluation
    length and window kind, with bootstrap 95 % intervals (left, mBPB); PR #1718's
    published Δ per eval-time lever and stage (right, mBPB): both panels relative."""
    require_columns(ours, ["eval_seq_len", "windows", "delta_bpb", "ci_lo", "ci_hi"], "plot_eval_levers")
    n = 2 if paper is not None and len(paper) else 1
    with style_context():
        fig, axes = new_figure(1, n, size=(6 * n, 4.4))
        ax = axes[0, 0]
        kinds = list(dict.fromkeys(ours["windows"]))
        for i, (color, kind) in enumerate(zip(palette(len(kinds)), kinds)):
            g = ours[ours["windows"] == kind].sort_values("eval_seq_len")
            x = g["eval_seq_len"] * 2 ** (0.04 * (i - (len(kinds) - 1) / 2))  # side by side, not on top
            y = 1e3 * g["delta_bpb"]
            err = [(y - 1e3 * g["ci_lo"]).clip(lower=0), (1e3 * g["ci_hi"] - y).clip(lower=0)]
            ax.errorbar(x, y, yerr=err, fmt="-o", color=color, label=kind, capsize=3, markersize=5)
        ax.axhline(0, color="0.3", lw=0.8)
        if "train_seq_len" in ours:
            ax.axvline(float(ours["train_seq_len"].iloc[0]), color="0.5", ls=":", label="training length")
        ax.set_xscale("log", base=2)
        ax.set_xticks(
            sorted(ours["eval_seq_len"].unique()), [str(v) for v in sorted(ours["eval_seq_len"].unique())]
        )
        ax.legend(fontsize=7.5)
        label_axes(ax, "evaluation length (tokens)", "Δ val_bpb vs standard windows at L (mBPB)",
                   "qlab: eval length and stride (95 % CI)")  # fmt: skip
        if paper is not None and n == 2:
            ax = axes[0, 1]
            p = paper.dropna(subset=["delta_bpb"])
            p = p[p["stage"].notna()]

            labels = [f"{lv}\n[{STAGE_LABELS.get(st, st)}]" for lv, st in zip(p["lever"], p["stage"])]
            y = np.arange(len(p))
            vals = 1e3 * p["delta_bpb"].to_numpy()
            colors = [palette(2)[0] if v < 0 else palette(4)[3] for v in vals]
            ax.barh(y, vals, color=colors, edgecolor="0.2", hatch="//")
            for yi, v in zip(y, vals):
                ax.annotate(
                    f"{v:+.2f}",
                    (v, yi),
                    xytext=(3 if v >= 0 else -3, 0),
                    textcoords="offset points",
                    ha="left" if v >= 0 else "right",
                    va="center",
                    fontsize=7,
                )
            ax.set_yticks(y, labels, fontsize=6.5)
            ax.axvline(0, color="0.2", lw=0.8)
            lim = 1.35 * float(np.abs(vals).max())
            ax.set_xlim(-lim, lim)
            label_axes(
                ax,
                "Δ val_bpb vs PR #1718's own stack (mBPB)",
                "lever [stage]",
                "PR #1718 (published)",
                unitless="y",
            )
        fig.suptitle("Eval-time levers: evaluation length, stride and what PR #1718 measured")
    return fig


def plot_passthrough_savings(df: pd.DataFrame, paper_saving_bytes: float | None = None) -> Figure:
    """Path A passthrough: artifact bytes (left) and quantized bpb (right) per policy, with
    the saving written over the bars and PR #1718's published saving in the title."""
    require_columns(df, ["policy", "artifact_bytes", "quantized_bpb"], "plot_passthrough_savings")
    with style_context():
        fig, axes = new_figure(1, 2, size=(10, 4.0))
        ax = axes[0, 0]
        _bars(ax, list(df["policy"]), df["artifact_bytes"] / 1e3, palette(len(df)), "{:,.1f}")
        saving = float(df["artifact_bytes"].iloc[0] - df["artifact_bytes"].iloc[-1])
        label_axes(
            ax,
            "policy",
            "artifact size (kB, brotli-11)",
            f"Size: Path A saves {saving / 1e3:,.1f} kB",
            unitless="x",
        )
        ax = axes[0, 1]
        d = 1e3 * (df["quantized_bpb"] - df["quantized_bpb"].iloc[0])
        _bars(ax, list(df["policy"]), d, palette(len(df)), "{:+.3f}")
        label_axes(
            ax, "policy", f"Δ quantized val_bpb vs {df['policy'].iloc[0]} (mBPB)", "Cost in bpb", unitless="x"
        )
        paper = (
            f" (PR #1718 published: −{paper_saving_bytes / 1e3:.0f} kB at 0 bpb)"
            if paper_saving_bytes
            else ""
        )
        fig.suptitle("Passthrough Path A: small tensors int8 instead of fp16" + paper)
    return fig


def plot_ttt_epochs(ours: pd.DataFrame, paper_delta_bpb: float | None = None) -> Figure:
    """Final score-first TTT bpb vs epochs per chunk; PR #1718's 3 → 4 epoch Δ as a note."""
    require_columns(ours, ["epochs", "ttt_bpb"], "plot_ttt_epochs")
    g = ours.sort_values("epochs")
    with style_context():
        fig, axes = new_figure(1, 1, size=(6.4, 4.0))
        ax = axes[0, 0]
        ax.plot(g["epochs"], g["ttt_bpb"], "-o", color=palette(1)[0], label="qlab")
        for e, v in zip(g["epochs"], g["ttt_bpb"]):
            ax.annotate(
                f"{v:.4f}", (e, v), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=7.5
            )
        ax.set_xticks(list(g["epochs"]))
        ax.margins(y=0.25)
        if paper_delta_bpb is not None:
            ax.text(
                0.02,
                0.04,
                f"PR #1718 (published): 3 → 4 epochs Δ {1e3 * paper_delta_bpb:+.2f} mBPB (noise)",
                transform=ax.transAxes,
                fontsize=7.5,
                color="0.3",
            )
        label_axes(
            ax,
            "TTT epochs per chunk (epochs)",
            "val_bpb after score-first TTT (bpb)",
            "TTT epochs: final bpb",
        )
    return fig
