"""The papers' figures redrawn from their own published numbers, by name.

:data:`PAPER_FIGURES` maps a file stem to (the paper figure it reproduces, a builder
that loads the shipped data and returns a Figure). :func:`render_paper_figures` is the
one caller here that writes files (via :func:`qlab.plots.style.save_figure`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from qlab.analysis import papers as P
from qlab.errors import ConfigError
from qlab.plots import pr1394, pr1818, pr2011
from qlab.plots.style import save_figure

__all__ = ["PaperFigure", "PAPER_FIGURES", "paper_figure", "render_paper_figures"]


@dataclass(frozen=True)
class PaperFigure:
    reproduces: str
    build: Callable[[], Figure]


def _waterfall() -> Figure:
    df = P.eval_pipeline_breakdown()
    singles = ~df["regs"].str.contains("+", regex=False) | (df["base"] == "B")
    return pr2011.plot_pipeline_waterfall(df[singles])


def _train_curves() -> Figure:
    seeds = P.pr1394_seeds()
    return pr1394.plot_train_curves(
        P.pr1394_train_curve(), events={"depth recurrence on": float(seeds["loop_enabled_step"].median())}
    )


PAPER_FIGURES: dict[str, PaperFigure] = {
    "pr2011_cross_base_signs": PaperFigure(
        "PR #2011 fig1_cross_base_signs", lambda: pr2011.plot_cross_base_signs(P.reg_deltas())
    ),
    "pr2011_pipeline_waterfall": PaperFigure("PR #2011 fig_pipeline_waterfall", _waterfall),
    "pr2011_pre_post_quant": PaperFigure(
        "PR #2011 fig_real_pre_post_quant", lambda: pr2011.plot_pre_post_quant(P.pipeline_attribution())
    ),
    "pr2011_pqt_compounding": PaperFigure(
        "PR #2011 fig_pqt_compounding", lambda: pr2011.plot_pqt_compounding(P.reg_deltas())
    ),
    "pr2011_lambda_budget": PaperFigure(
        "PR #2011 fig_lambda_budget", lambda: pr2011.plot_lambda_budget(P.reg_deltas())
    ),
    "pr2011_reg_quant_matrix": PaperFigure(
        "PR #2011 fig_reg_quant_matrix_real", lambda: pr2011.plot_reg_quant_heatmaps(P.reg_quant_matrix())
    ),
    "pr2011_canonical_metrics": PaperFigure(
        "PR #2011 fig_real_canonical_metrics", lambda: pr2011.plot_canonical_metrics(P.canonical_metrics())
    ),
    "pr2011_depth_trajectory": PaperFigure(
        "PR #2011 fig_depth_trajectory", lambda: pr2011.plot_depth_trajectory(P.depth_trajectory())
    ),
    "pr2011_cka_heatmap": PaperFigure(
        "PR #2011 fig_cka_heatmap", lambda: pr2011.plot_cka_heatmap(P.cka_pairwise())
    ),
    "pr1818_damage_gap": PaperFigure(
        "PR #1818 fig1_damage_gap",
        lambda: pr1818.plot_damage_gap(P.pr1818_seeds(), baseline_bpb=P.pr1818_baseline_bpb()),
    ),
    "pr1818_per_seed_bars": PaperFigure(
        "PR #1818 fig4_per_seed_bars",
        lambda: pr1818.plot_per_seed_bars(P.pr1818_seeds(), baseline_bpb=P.pr1818_baseline_bpb()),
    ),
    "pr1394_seed_stages": PaperFigure(
        "PR #1394 per-seed table (no figure in the PR)", lambda: pr1394.plot_seed_stages(P.pr1394_seeds())
    ),
    "pr1394_train_curves": PaperFigure("PR #1394 train_seed*.log (no figure in the PR)", _train_curves),
}


def paper_figure(name: str) -> Figure:
    """Build one paper figure by name (a key of :data:`PAPER_FIGURES`)."""
    if name not in PAPER_FIGURES:
        raise ConfigError(f"unknown paper figure {name!r}; choose from {sorted(PAPER_FIGURES)}")
    return PAPER_FIGURES[name].build()


def render_paper_figures(
    outdir: str | Path, names: Iterable[str] | None = None, dpi: float = 110
) -> list[Path]:
    """Build and save the named figures (default: all) as ``outdir/<name>.png``."""
    out = []
    for name in names or PAPER_FIGURES:
        out.append(save_figure(paper_figure(name), Path(outdir) / f"{name}.png", dpi=dpi))
    return out
