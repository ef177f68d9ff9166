"""Every figure qlab regenerates: id, paper, the paper figure it corresponds to, the
library function that draws it, the notebook that shows it, and how to build it.

``build(ws)`` returns a Figure; figures redrawn only from a paper's published numbers
ignore the workspace (``needs_model=False``) and are always produced.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
from matplotlib.figure import Figure

from qlab.errors import ConfigError
from qlab.figures import tables as T
from qlab.figures.workspace import Workspace
from qlab.plots.fingerprints import figure_makers
from qlab.plots.matrix import matrix_figures
from qlab.plots.paper_figures import PAPER_FIGURES, compile_snippet, paper_figure

__all__ = ["FigureSpec", "FIGURES", "NOTEBOOKS", "figure_table", "get_figure"]

NOTEBOOKS = {
    "quickstart": "notebooks/00_quickstart.ipynb",
    "pr1394": "notebooks/01_pr1394_sdclip.ipynb",
    "pr639": "notebooks/02_pr639_gptq_ttt.ipynb",
    "pr1818": "notebooks/03_pr1818_damage_gap.ipynb",
    "pr1718": "notebooks/04_pr1718_eval_levers.ipynb",
    "pr2011": "notebooks/05_pr2011_cross_base_regularizers.ipynb",
}


@dataclass(frozen=True)
class FigureSpec:
    id: str
    paper: str  # "PR #1394", …
    paper_figure: str  # the paper's figure (file name) or table it corresponds to
    function: str  # the plot function, dotted path
    notebook: str  # key of NOTEBOOKS
    build: Callable[[Workspace], Figure]
    needs_model: bool = True
    description: str = ""
    weights_only: bool = False  # measurable on any weights file (no model, no data)

    def code(self, show_table: bool = False) -> str:
        """Python that draws this figure from a Workspace ``ws`` (tables module as ``T``)
        with the table and plot calls spelled out, for a notebook cell a user can copy
        (``show_table``: the table's head displayed first); ``FIGURES[id].build(ws)``
        where the builder is more than one table and one plot call."""
        source = getattr(self.build, "source", None)
        parts = source() if callable(source) else None
        if parts is None:
            return f'FIGURES["{self.id}"].build(ws)'
        if isinstance(parts, str):  # the builder's own code (see _snippet)
            return parts
        module, func, table = parts
        body = f"table = {table}\ndisplay(table.head())\n{func}(table)" if show_table else f"{func}({table})"
        return f"from {module} import {func}\n\n{body}"


# ---------------------------------------------------------------- builders needing a few lines
def _snippet(code: str) -> Callable[[Workspace], Figure]:
    """A builder whose implementation is ``code`` (the Workspace as ``ws``, the tables module
    as ``T``, the last line the figure): the notebook cell shows exactly what runs."""
    run = compile_snippet(code)

    def build(ws: Workspace) -> Figure:
        return run({"ws": ws, "T": T})

    build.source = lambda: code  # type: ignore[attr-defined]
    return build


def _paper(name: str) -> Callable[[Workspace], Figure]:
    def build(ws: Workspace) -> Figure:
        return paper_figure(name)

    build.source = lambda: PAPER_FIGURES[name].code  # type: ignore[attr-defined]
    return build


_ENTROPY_VS_K = """\
from qlab.analysis.rd import summarize_sweep
from qlab.plots.rd import plot_entropy_vs_k

plot_entropy_vs_k(summarize_sweep(T.rd_sweep(ws)), bits=ws.scale.sweep_bits)"""
_SDCLIP_VS_QUANTILE = """\
from qlab.analysis.rd import compare_from_sweep
from qlab.plots.rd import plot_sdclip_vs_quantile

plot_sdclip_vs_quantile(compare_from_sweep(T.rd_sweep(ws)))"""
_TTT_OPTIMIZERS = """\
from qlab.analysis.papers import pr639_results
from qlab.plots.experiments import plot_ttt_optimizers

paper = pr639_results()
adamw = paper[paper["setting"].str.startswith("AdamW TTT")]["value"]
plot_ttt_optimizers(T.ttt_optimizers(ws), float(adamw.iloc[0]) if len(adamw) else None)"""
_TTT_RECOVERY = """\
from qlab.plots.experiments import plot_ttt_recovery

runs = T.ttt_optimizers(ws)
sgd = runs[runs["optimizer"].str.startswith("SGD")]
no_ttt = runs[runs["optimizer"].str.startswith("no TTT")]
stages = T.stages(ws).iloc[0]
plot_ttt_recovery(sgd, float(stages["pre_quant_bpb"]), float(stages["quantized_bpb"]), no_ttt)"""
# This checkpoint's stages alone: on one axis with the PR's seeds (bpb 1.1–3.5) the two sets
# of lines and annotations overlap; the PR's figure is paper_pr1818_damage_gap.
_DAMAGE_GAP = """\
from qlab.plots.pr1818 import plot_damage_gap

rows = T.damage_gap(ws)
plot_damage_gap(rows[rows["source"] == "qlab"])"""
_EVAL_LEVERS = """\
from qlab.analysis.papers import pr1718_levers
from qlab.plots.experiments import plot_eval_levers

plot_eval_levers(T.eval_levers(ws), pr1718_levers())"""
_PASSTHROUGH = """\
from qlab.plots.experiments import plot_passthrough_savings

plot_passthrough_savings(T.passthrough(ws), paper_saving_bytes=40_000.0)"""
_TTT_EPOCHS = """\
from qlab.analysis.papers import pr1718_levers
from qlab.plots.experiments import plot_ttt_epochs

levers = pr1718_levers()
paper = levers[levers["lever"].str.startswith("TTT_EPOCHS")]["delta_bpb"].dropna()
plot_ttt_epochs(T.ttt_epochs(ws), float(paper.iloc[0]) if len(paper) else None)"""
_TRAIN_CURVE = """\
from qlab.plots.pr1394 import plot_train_curves

plot_train_curves(T.train_curve(ws))"""


def _plot(func: str, table: Callable[[Workspace], pd.DataFrame]) -> Callable[[Workspace], Figure]:
    """Build = ``func(table(ws))`` with ``func`` given by dotted path (imported lazily)."""

    module, name = func.rsplit(".", 1)

    def build(ws: Workspace) -> Figure:
        return getattr(importlib.import_module(module), name)(table(ws))

    build.source = lambda: (module, name, f"T.{table.__name__}(ws)")  # type: ignore[attr-defined]
    return build


def _fingerprint(table: str, file: str) -> Callable[[Workspace], Figure]:
    """A figure of ``qlab fingerprint`` drawn exactly as ``render_fingerprint_figures`` does."""

    def build(ws: Workspace) -> Figure:
        make = dict(figure_makers()[table])[file]
        return make(T.fingerprint(ws, table))

    def source() -> tuple[str, str, str] | None:
        make = dict(figure_makers()[table])[file]
        if "<locals>" in make.__qualname__:  # a wrapper that reshapes the table first
            return None
        return make.__module__, make.__name__, f'T.fingerprint(ws, "{table}")'

    build.source = source  # type: ignore[attr-defined]
    return build


def _matrix(stem: str) -> Callable[[Workspace], Figure]:
    def build(ws: Workspace) -> Figure:
        if "matrix_figures" not in ws.memo:  # one matrix run draws every figure
            ws.memo["matrix_figures"] = matrix_figures(T.matrix(ws))
        return ws.memo["matrix_figures"][stem]

    code = f'from qlab.plots.matrix import matrix_figures\n\nmatrix_figures(T.matrix(ws))["{stem}"]'
    build.source = lambda: code  # type: ignore[attr-defined]
    return build


# ---------------------------------------------------------------- the registry
_P = "qlab.plots"
_FIGS: list[FigureSpec] = [
    # PR #1394: SDClip and the int-b vs k trade-off
    FigureSpec(
        "pr1394_quantization_example",
        "PR #1394",
        "quantization_example.png",
        f"{_P}.experiments.plot_quantization_example",
        "pr1394",
        _plot(f"{_P}.experiments.plot_quantization_example", T.quant_example),
        description="weight histogram vs int5 / int4 / NF4 codes of the largest matrix",
    ),
    FigureSpec(
        "pr1394_entropy_vs_k",
        "PR #1394",
        "H(q) ≈ b − log₂k + ½log₂(πe/2) (text)",
        f"{_P}.rd.plot_entropy_vs_k",
        "pr1394",
        _snippet(_ENTROPY_VS_K),
        description="code entropy vs b and k: measured vs Gaussian theory",
    ),
    FigureSpec(
        "pr1394_std_vs_ratio",
        "PR #1394",
        "std predicts compression ratio, R² = 0.995 (text)",
        f"{_P}.rd.plot_std_vs_ratio",
        "pr1394",
        _plot(f"{_P}.rd.plot_std_vs_ratio", T.std_ratio),
        description="matrix σ vs compression ratio at a fixed clip, with R²",
    ),
    FigureSpec(
        "pr1394_sdclip_vs_quantile",
        "PR #1394",
        "SDClip replaces GPTQ-lite's clip search (text)",
        f"{_P}.rd.plot_sdclip_vs_quantile",
        "pr1394",
        _snippet(_SDCLIP_VS_QUANTILE),
        description="bytes vs MSE and Δbpb: SDClip over k vs quantile search",
    ),
    FigureSpec(
        "pr1394_rd_curves",
        "PR #1394",
        "(b, k) ~ (b+1, 2k) and the rate theory (text)",
        f"{_P}.rd.plot_rd_curves",
        "pr1394",
        _plot(f"{_P}.rd.plot_rd_curves", T.rd_curves),
        description="rate–distortion of int-b / NF4 / Lloyd-Max vs the Gaussian bound",
    ),
    FigureSpec(
        "pr1394_byte_allocation",
        "PR #1394",
        "where the next byte goes (qlab extension)",
        f"{_P}.allocation.plot_marginal",
        "pr1394",
        _plot(f"{_P}.allocation.plot_marginal", T.byte_allocation),
        description="Δbytes and paired Δbpb (95 % CI) of one change per tensor family, embedding included",
    ),
    FigureSpec(
        "pr1394_marginal_predictor",
        "PR #1394",
        "Δbpb without evaluation (qlab extension)",
        f"{_P}.allocation.plot_predictor",
        "pr1394",
        _plot(f"{_P}.allocation.plot_predictor", T.byte_allocation),
        description="measured paired Δbpb vs the second-order Hessian predictor fitted on the table",
    ),
    FigureSpec(
        "pr1394_allocator",
        "PR #1394",
        "per-group settings at the same bytes (qlab extension)",
        f"{_P}.allocation.plot_allocation",
        "pr1394",
        _plot(f"{_P}.allocation.plot_allocation", T.allocation),
        description="the allocator's policy vs the base and vs uniform k at equal bytes, paired, 95 % CI",
    ),
    FigureSpec(
        "pr1394_rate_aware_gptq",
        "PR #1394",
        "rate term in GPTQ's rounding (qlab extension)",
        f"{_P}.allocation.plot_rate_frontier",
        "pr1394",
        _plot(f"{_P}.allocation.plot_rate_frontier", T.rate_aware_frontier),
        description="bytes vs paired Δbpb: rate-aware GPTQ over λ beside plain GPTQ over k",
    ),
    FigureSpec(
        "pr1394_train_curve_qlab",
        "PR #1394",
        "train_seed*.log (no figure in the PR)",
        f"{_P}.pr1394.plot_train_curves",
        "quickstart",
        _snippet(_TRAIN_CURVE),
        description="this checkpoint's training loss and validation bpb",
    ),
    FigureSpec(
        "paper_pr1394_seed_stages",
        "PR #1394",
        "per-seed table (no figure in the PR)",
        f"{_P}.pr1394.plot_seed_stages",
        "pr1394",
        _paper("pr1394_seed_stages"),
        False,
    ),
    FigureSpec(
        "paper_pr1394_train_curves",
        "PR #1394",
        "train_seed*.log (no figure in the PR)",
        f"{_P}.pr1394.plot_train_curves",
        "pr1394",
        _paper("pr1394_train_curves"),
        False,
    ),
    # PR #639: full GPTQ + TTT
    FigureSpec(
        "pr639_quant_gap",
        "PR #639",
        "quantization gap 0.008 → 0.004 (table)",
        f"{_P}.experiments.plot_quant_gap",
        "pr639",
        _plot(f"{_P}.experiments.plot_quant_gap", T.quant_gap),
        description="quantization gap of RTN vs clip search vs full GPTQ, ours beside the PR's",
    ),
    FigureSpec(
        "pr639_ttt_optimizers",
        "PR #639",
        "AdamW TTT +0.076 on GPTQ weights (table)",
        f"{_P}.experiments.plot_ttt_optimizers",
        "pr639",
        _snippet(_TTT_OPTIMIZERS),
        description="SGD vs AdamW score-first TTT on a GPTQ model",
    ),
    # PR #1818: post-quantization damage
    FigureSpec(
        "pr1818_damage_gap",
        "PR #1818",
        "fig1_damage_gap.png",
        f"{_P}.pr1818.plot_damage_gap",
        "pr1818",
        _snippet(_DAMAGE_GAP),
        description="val_bpb by stage of this checkpoint (the PR's: paper_pr1818_damage_gap)",
    ),
    FigureSpec(
        "pr1818_ttt_recovery",
        "PR #1818",
        "fig2_ttt_recovery.png",
        f"{_P}.experiments.plot_ttt_recovery",
        "pr1818",
        _snippet(_TTT_RECOVERY),
        description="running bpb over score-first TTT chunks, beside the same chunks without TTT",
    ),
    FigureSpec(
        "pr1818_curriculum_schedule",
        "PR #1818",
        "fig3_curriculum_schedule.png",
        f"{_P}.experiments.plot_curriculum_schedule",
        "pr1818",
        _plot(f"{_P}.experiments.plot_curriculum_schedule", T.curriculum),
        False,
        description="entropy-bucket crossfade and sampling probabilities",
    ),
    FigureSpec(
        "pr1818_freezedry_histogram",
        "PR #1818",
        "fig5_freezedry_histogram.png",
        f"{_P}.experiments.plot_freezedry_histogram",
        "pr1818",
        _plot(f"{_P}.experiments.plot_freezedry_histogram", T.freezedry),
        description="freeze-dry residuals of a real matrix vs the 0.005 threshold",
    ),
    FigureSpec(
        "pr1818_sparsity_24",
        "PR #1818",
        "fig6_sparsity_24.png",
        f"{_P}.experiments.plot_sparsity_budget",
        "pr1818",
        _plot(f"{_P}.experiments.plot_sparsity_budget", T.sparsity),
        description="2:4 bit budget vs int6, nominal and after brotli, and its MSE",
    ),
    FigureSpec(
        "paper_pr1818_damage_gap",
        "PR #1818",
        "fig1_damage_gap.png",
        f"{_P}.pr1818.plot_damage_gap",
        "pr1818",
        _paper("pr1818_damage_gap"),
        False,
    ),
    FigureSpec(
        "paper_pr1818_per_seed_bars",
        "PR #1818",
        "fig4_per_seed_bars.png",
        f"{_P}.pr1818.plot_per_seed_bars",
        "pr1818",
        _paper("pr1818_per_seed_bars"),
        False,
    ),
    # PR #1718: eval-time levers
    FigureSpec(
        "pr1718_eval_length",
        "PR #1718",
        "EVAL_SEQ_LEN / stride rows (table)",
        f"{_P}.experiments.plot_eval_levers",
        "pr1718",
        _snippet(_EVAL_LEVERS),
        description="val_bpb vs eval length and stride, beside the PR's lever table",
    ),
    FigureSpec(
        "pr1718_passthrough",
        "PR #1718",
        "Path A passthrough −40 KB (table)",
        f"{_P}.experiments.plot_passthrough_savings",
        "pr1718",
        _snippet(_PASSTHROUGH),
        description="artifact bytes and bpb of record vs record_pathA",
    ),
    FigureSpec(
        "pr1718_ttt_epochs",
        "PR #1718",
        "TTT_EPOCHS = 4 (table)",
        f"{_P}.experiments.plot_ttt_epochs",
        "pr1718",
        _snippet(_TTT_EPOCHS),
        description="final TTT bpb vs epochs per chunk",
    ),
    # PR #2011: cross-base regularizers — the paper's numbers
    *[
        FigureSpec(f"paper_{name}", "PR #2011", fig, f"{_P}.pr2011.{func}", "pr2011", _paper(name), False)
        for name, fig, func in (
            ("pr2011_cross_base_signs", "fig1_cross_base_signs.png", "plot_cross_base_signs"),
            ("pr2011_pipeline_waterfall", "fig_pipeline_waterfall.png", "plot_pipeline_waterfall"),
            ("pr2011_pre_post_quant", "fig_real_pre_post_quant.png", "plot_pre_post_quant"),
            ("pr2011_pqt_compounding", "fig_pqt_compounding.png", "plot_pqt_compounding"),
            ("pr2011_lambda_budget", "fig_lambda_budget.png", "plot_lambda_budget"),
            ("pr2011_reg_quant_matrix", "fig_reg_quant_matrix_real.png", "plot_reg_quant_heatmaps"),
            ("pr2011_canonical_metrics", "fig_real_canonical_metrics.png", "plot_canonical_metrics"),
            ("pr2011_depth_trajectory", "fig_depth_trajectory.png", "plot_depth_trajectory"),
            ("pr2011_cka_heatmap", "fig_cka_heatmap.png", "plot_cka_heatmap"),
        )
    ],
    # PR #2011: the same analyses on this checkpoint (fingerprint: model vs its GPTQ copy)
    *[
        FigureSpec(
            f"pr2011_{stem}",
            "PR #2011",
            fig,
            f"{_P}.{func}",
            "pr2011",
            _fingerprint(table, f"pr2011_{stem}.png"),
            description=desc,
        )
        for stem, fig, func, table, desc in (
            (
                "svd_spectrum",
                "fig_svd_spectrum.png",
                "fingerprints.plot_svd_spectrum",
                "family_spectra",
                "layer-averaged singular-value spectra per weight family",
            ),
            (
                "svd_flatness",
                "fig_svd_flatness.png",
                "fingerprints.plot_svd_flatness",
                "family_summary",
                "spectral flatness per family",
            ),
            (
                "svd_differential",
                "fig_svd_differential.png",
                "fingerprints.plot_svd_differential",
                "spectral_differential",
                "Δσ% of the quantized copy vs the model",
            ),
            (
                "3d_pca",
                "fig_real_3d_pca.png",
                "fingerprints.plot_pca3",
                "pca3",
                "3-D PCA of final hidden states",
            ),
            (
                "coord_distribution",
                "fig_real_coord_distribution.png",
                "fingerprints.plot_coord_distribution",
                "coord_hist",
                "hidden-state coordinate distribution",
            ),
            (
                "l2norm_distribution",
                "fig_real_l2norm_distribution.png",
                "fingerprints.plot_norm_distribution",
                "norm_hist",
                "hidden-state L2-norm distribution",
            ),
            (
                "canonical_metrics",
                "fig_real_canonical_metrics.png",
                "pr2011.plot_canonical_metrics",
                "hidden_metrics",
                "isoscore, effective rank, norm variance, max|h|",
            ),
            (
                "depth_trajectory",
                "fig_depth_trajectory.png",
                "pr2011.plot_depth_trajectory",
                "depth",
                "‖h‖ and kurtosis per block",
            ),
            (
                "logit_lens",
                "(qlab extension)",
                "fingerprints.plot_logit_lens",
                "depth",
                "logit-lens bpb per block",
            ),
            (
                "cka_heatmap",
                "fig_cka_heatmap.png",
                "pr2011.plot_cka_heatmap",
                "cka_variants",
                "linear CKA between the model and its quantized copy",
            ),
            (
                "cka_layers",
                "(qlab extension)",
                "fingerprints.plot_cka_layers",
                "cka_layers",
                "layer × layer CKA",
            ),
            (
                "hidden_quant",
                "fig_reg_quant_matrix_real.png",
                "fingerprints.plot_hidden_quant",
                "hidden_quant",
                "PR #2011's seven schemes on this model's final hidden states",
            ),
        )
    ],
    # PR #2011: a small reg × quant matrix trained here
    *[
        FigureSpec(
            f"pr2011_{stem}", "PR #2011", fig, f"{_P}.{func}", "pr2011", _matrix(stem), description=desc
        )
        for stem, fig, func, desc in (
            (
                "matrix_hidden_heatmaps",
                "fig_reg_quant_matrix_real.png",
                "pr2011.plot_reg_quant_heatmaps",
                "hidden-state quantization metrics per (base · variant) × scheme",
            ),
            (
                "matrix_cross_base_signs",
                "fig1_cross_base_signs.png",
                "pr2011.plot_cross_base_signs",
                "Δ final bpb per regularizer on base A vs base B",
            ),
            (
                "matrix_pre_post_quant",
                "fig_real_pre_post_quant.png",
                "pr2011.plot_pre_post_quant",
                "pre- vs post-quantization bpb per variant",
            ),
            (
                "matrix_lambda_budget_A",
                "fig_lambda_budget.png",
                "pr2011.plot_lambda_budget",
                "single regularizers vs the pair at reduced λ (base A)",
            ),
            (
                "matrix_paired_deltas",
                "(qlab extension)",
                "matrix.plot_paired_deltas",
                "Δ vs the control per variant with seed spread",
            ),
        )
    ],
]

#: Figures measured from the weights alone: drawn for any checkpoint qlab reads.
WEIGHT_ONLY_FIGURES = frozenset(
    {
        "pr1394_quantization_example",
        "pr1394_std_vs_ratio",
        "pr1394_rd_curves",
        "pr1818_freezedry_histogram",
        "pr1818_sparsity_24",
        "pr2011_svd_spectrum",
        "pr2011_svd_flatness",
        "pr2011_svd_differential",
    }
)
FIGURES: dict[str, FigureSpec] = {
    f.id: dataclasses.replace(f, weights_only=f.id in WEIGHT_ONLY_FIGURES) for f in _FIGS
}


def get_figure(figure_id: str) -> FigureSpec:
    if figure_id not in FIGURES:
        raise ConfigError(f"unknown figure id {figure_id!r}; `qlab figures --list` shows them")
    return FIGURES[figure_id]


def figure_table() -> pd.DataFrame:
    """The registry as a table (for ``qlab figures --list`` and docs/figures.md)."""
    return pd.DataFrame(
        [
            {
                "id": f.id,
                "paper": f.paper,
                "paper_figure": f.paper_figure,
                "function": f.function,
                "notebook": NOTEBOOKS[f.notebook],
                "needs_model": f.needs_model,
                "weights_only": f.weights_only,
                "description": f.description,
            }
            for f in FIGURES.values()
        ]
    )
