"""The papers' figures redrawn from their own published numbers, by name.

:data:`PAPER_FIGURES` maps a file stem to (the paper figure it reproduces, the code that
loads the shipped data and draws it — what the notebooks show). :func:`render_paper_figures` is the
one caller here that writes files (via :func:`qlab.plots.style.save_figure`).
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from qlab.errors import ConfigError
from qlab.plots.style import save_figure

__all__ = ["PaperFigure", "PAPER_FIGURES", "compile_snippet", "paper_figure", "render_paper_figures"]


def compile_snippet(code: str) -> Callable[[dict], Figure]:
    """``run(scope)`` executing ``code`` in ``scope`` and returning its last expression.

    Figures whose drawing is a few lines are written once, as the code a notebook cell
    shows; running that code is the implementation, so what a reader copies is what runs.
    """
    tree = ast.parse(code)
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        raise ConfigError(f"figure snippet must end with the figure expression:\n{code}")
    head = compile(ast.Module(tree.body[:-1], type_ignores=[]), "<figure>", "exec")
    last = compile(ast.Expression(tree.body[-1].value), "<figure>", "eval")

    def run(scope: dict) -> Figure:
        scope = {"display": lambda *_: None, **scope}
        exec(head, scope)  # noqa: S102 — qlab's own snippets, written in qlab's source
        return eval(last, scope)  # noqa: S307

    return run


@dataclass(frozen=True)
class PaperFigure:
    """A paper figure: what it reproduces, and the code that draws it from the shipped data."""

    reproduces: str
    code: str

    def build(self) -> Figure:
        return compile_snippet(self.code)({})


def _paper(reproduces: str, plots: str, call: str, *lines: str) -> PaperFigure:
    head = f"from qlab.analysis import papers as P\nfrom qlab.plots import {plots}\n\n"
    return PaperFigure(reproduces, head + "".join(f"{ln}\n" for ln in lines) + call)


PAPER_FIGURES: dict[str, PaperFigure] = {
    "pr2011_cross_base_signs": _paper(
        "PR #2011 fig1_cross_base_signs", "pr2011", "pr2011.plot_cross_base_signs(P.reg_deltas())"
    ),
    "pr2011_pipeline_waterfall": _paper(
        "PR #2011 fig_pipeline_waterfall", "pr2011", "pr2011.plot_pipeline_waterfall(df[singles])",
        "df = P.eval_pipeline_breakdown()",
        'singles = ~df["regs"].str.contains("+", regex=False) | (df["base"] == "B")',
    ),
    "pr2011_pre_post_quant": _paper(
        "PR #2011 fig_real_pre_post_quant", "pr2011", "pr2011.plot_pre_post_quant(P.pipeline_attribution())"
    ),
    "pr2011_pqt_compounding": _paper(
        "PR #2011 fig_pqt_compounding", "pr2011", "pr2011.plot_pqt_compounding(P.reg_deltas())"
    ),
    "pr2011_lambda_budget": _paper(
        "PR #2011 fig_lambda_budget", "pr2011", "pr2011.plot_lambda_budget(P.reg_deltas())"
    ),
    "pr2011_reg_quant_matrix": _paper(
        "PR #2011 fig_reg_quant_matrix_real", "pr2011", "pr2011.plot_reg_quant_heatmaps(P.reg_quant_matrix())"
    ),
    "pr2011_canonical_metrics": _paper(
        "PR #2011 fig_real_canonical_metrics", "pr2011",
        "pr2011.plot_canonical_metrics(P.canonical_metrics())",
    ),
    "pr2011_depth_trajectory": _paper(
        "PR #2011 fig_depth_trajectory", "pr2011", "pr2011.plot_depth_trajectory(P.depth_trajectory())"
    ),
    "pr2011_cka_heatmap": _paper(
        "PR #2011 fig_cka_heatmap", "pr2011", "pr2011.plot_cka_heatmap(P.cka_pairwise())"
    ),
    "pr1818_damage_gap": _paper(
        "PR #1818 fig1_damage_gap", "pr1818",
        "pr1818.plot_damage_gap(P.pr1818_seeds(), baseline_bpb=P.pr1818_baseline_bpb())",
    ),
    "pr1818_per_seed_bars": _paper(
        "PR #1818 fig4_per_seed_bars", "pr1818",
        "pr1818.plot_per_seed_bars(P.pr1818_seeds(), baseline_bpb=P.pr1818_baseline_bpb())",
    ),
    "pr1394_seed_stages": _paper(
        "PR #1394 per-seed table (no figure in the PR)", "pr1394", "pr1394.plot_seed_stages(P.pr1394_seeds())"
    ),
    "pr1394_train_curves": _paper(
        "PR #1394 train_seed*.log (no figure in the PR)", "pr1394",
        'pr1394.plot_train_curves(P.pr1394_train_curve(), events={"depth recurrence on": loop_on})',
        'loop_on = float(P.pr1394_seeds()["loop_enabled_step"].median())',
    ),
}  # fmt: skip


def paper_figure(name: str) -> Figure:
    """Build one paper figure by name (a key of :data:`PAPER_FIGURES`)."""
    if name not in PAPER_FIGURES:
        raise ConfigError(f"unknown paper figure {name!r}; choose from {sorted(PAPER_FIGURES)}")
    return PAPER_FIGURES[name].build()


def render_paper_figures(
    outdir: str | Path, names: Iterable[str] | None = None, dpi: float = 110
) -> list[Path]:
    """Build and save the named figures (default: all) as ``outdir/paper_<name>.png``, the
    ids ``qlab figures`` gives them."""
    out = []
    for name in names or PAPER_FIGURES:
        out.append(save_figure(paper_figure(name), Path(outdir) / f"paper_{name}.png", dpi=dpi))
    return out
