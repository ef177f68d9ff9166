"""``qlab matrix``: build, merge and report a reg × quant matrix (:mod:`qlab.analysis.matrix`).

    qlab matrix list SPEC [--shard i/n]                  the cells (ids) of a grid
    qlab matrix run SPEC --out DIR [--shard i/n] [--cell ID ...] [--data DIR] [--device D] [--progress]
    qlab matrix merge DIR                                results.csv, hidden.csv, geometry.csv, results.json
    qlab matrix report DIR [--metric M] [--policy P] [--figures FIGDIR]
    qlab matrix paper [DIR] [--figures FIGDIR]           PR #2011's published matrix (next to DIR's)

SLURM array (one GPU per task, disjoint cells, same output folder)::

    #SBATCH --array=0-7 --gpus=1
    qlab matrix run qlab/resources/matrix/full_8xh100.toml --out runs/matrix \\
        --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT
    # afterwards: qlab matrix merge runs/matrix && qlab matrix report runs/matrix --figures figs
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from qlab.analysis.matrix import (
    collect_results,
    lambda_budget,
    load_spec,
    merge_results,
    paired_deltas,
    parse_shard,
    plan_cells,
    run_matrix,
    seed_summary,
    shard_cells,
    sign_table,
    with_overrides,
)
from qlab.analysis.papers import reg_quant_matrix
from qlab.errors import ConfigError
from qlab.plots.matrix import hidden_heatmap_rows, matrix_figures
from qlab.plots.pr2011 import plot_reg_quant_heatmaps
from qlab.plots.style import save_figure

HELP = "reg × quant matrix: train a grid, merge, report"


def register(subparsers) -> None:
    p = subparsers.add_parser("matrix", help=HELP)
    sub = p.add_subparsers(dest="matrix_command", metavar="ACTION")
    sub.required = True

    ls = sub.add_parser("list", help="print the cells of a grid spec")
    ls.add_argument("spec", help="grid spec (.toml, .yaml or .yml)")
    ls.add_argument("--shard", default="0/1", help="i/n: only shard i of n (0-based)")
    ls.set_defaults(func=_list)

    run = sub.add_parser("run", help="train and measure the cells of a grid spec (resumable)")
    run.add_argument("spec", help="grid spec (.toml, .yaml or .yml)")
    run.add_argument("--out", required=True, help="output folder (shared by all shards)")
    run.add_argument(
        "--shard",
        default="0/1",
        help="i/n: run shard i of n, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT",
    )
    run.add_argument("--cell", action="append", help="run only this cell id (repeatable; see `matrix list`)")
    run.add_argument("--data", help="dataset directory for every base (overrides the spec)")
    run.add_argument("--device", help="auto, cpu or cuda[:N] (overrides the spec)")
    run.add_argument("--progress", action="store_true", help="show progress bars")
    run.set_defaults(func=_run)

    merge = sub.add_parser(
        "merge", help="collect all cells of DIR into results.csv / hidden.csv / results.json"
    )
    merge.add_argument("dir", help="the run directory of the grid")
    merge.set_defaults(func=_merge)

    rep = sub.add_parser("report", help="statistics tables (mean ± std, paired tests, signs, λ budget)")
    rep.add_argument("dir", help="the run directory of the grid")
    rep.add_argument("--metric", default="final_bpb", help="pipeline column to compare (default final_bpb)")
    rep.add_argument("--policy", help="weight policy whose rows to compare (default: the first)")
    rep.add_argument("--figures", help="also write the figures (PNG) into this folder")
    rep.set_defaults(func=_report)

    paper = sub.add_parser("paper", help="PR #2011's published reg × quant matrix (and DIR's, if given)")
    paper.add_argument("dir", nargs="?", help="a grid run directory to show beside the paper (optional)")
    paper.add_argument("--figures", help="write the heatmaps (PNG) into this folder")
    paper.set_defaults(func=_paper)


def _spec(args: argparse.Namespace):
    return with_overrides(
        load_spec(args.spec), data=getattr(args, "data", None), device=getattr(args, "device", None)
    )


def _list(args: argparse.Namespace) -> int:
    cells = shard_cells(plan_cells(_spec(args)), *parse_shard(args.shard))
    for c in cells:
        print(f"{c.cell_id}\tbase={c.base}\tvariant={c.variant.label}\tseed={c.seed}")
    return 0


def _run(args: argparse.Namespace) -> int:
    status = run_matrix(
        _spec(args), args.out, shard=parse_shard(args.shard), cells=args.cell, progress=args.progress
    )
    counts = status["status"].value_counts().to_dict()
    print(f"{len(status)} cell(s) in this shard: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return 0


def _merge(args: argparse.Namespace) -> int:
    res = merge_results(args.dir)
    n = res.pipeline["cell_id"].nunique()
    print(f"{n} cells → {Path(args.dir) / 'results.csv'}, hidden.csv, geometry.csv, results.json")
    return 0


def _show(title: str, df: pd.DataFrame) -> None:
    print(f"\n== {title}")
    with pd.option_context(
        "display.width", 200, "display.max_columns", 40, "display.float_format", "{:.5g}".format
    ):
        print(df.to_string(index=False) if not df.empty else "(none)")


def _report(args: argparse.Namespace) -> int:
    res = collect_results(args.dir)
    policy = args.policy or str(res.pipeline["policy"].iloc[0])
    if policy not in set(res.pipeline["policy"]):
        raise ConfigError(f"--policy {policy!r}: the results have {sorted(set(res.pipeline['policy']))}")
    if args.metric not in res.pipeline.columns:
        raise ConfigError(f"--metric {args.metric!r} is not a results column")
    pipe = res.pipeline[res.pipeline["policy"] == policy]
    cols = ["base", "variant", "mean", "std", "n"]
    _show(f"{args.metric}, mean ± std over seeds (policy {policy})", seed_summary(pipe, args.metric)[cols])
    paired = paired_deltas(pipe, args.metric, group=None)
    keep = [
        "base",
        "variant",
        "n_pairs",
        "delta_mean",
        "delta_std",
        "seed_noise",
        "p_value",
        "exceeds_noise",
        "significant",
    ]
    _show(
        f"Δ {args.metric} vs control, paired across seeds ({paired['unit'].iloc[0] if len(paired) else ''})",
        paired[keep] if len(paired) else paired,
    )
    if pipe["base"].nunique() > 1:
        _show("cross-base sign table", sign_table(pipe, args.metric))
    _show("λ budget: pairs vs their best single", lambda_budget(pipe, args.metric))
    if args.figures:
        for name, fig in matrix_figures(res, args.metric, policy).items():
            save_figure(fig, Path(args.figures) / f"pr2011_{name}.png")  # the FIGURES id
        print(f"\nfigures written to {args.figures}")
    return 0


def _paper(args: argparse.Namespace) -> int:
    table = reg_quant_matrix()
    if args.dir:
        table = pd.concat([table, hidden_heatmap_rows(collect_results(args.dir).hidden)], ignore_index=True)
    cols = ["source", "variant", "scheme", "l2_distortion", "cos_shift", "mean_abs_cos_post", "eff_rank_post"]
    _show("hidden-state reg × quant matrix", table[cols])
    if args.figures:
        metrics = ("l2_distortion", "cos_shift", "mean_abs_cos_post", "eff_rank_post")
        save_figure(plot_reg_quant_heatmaps(table, metrics), Path(args.figures) / "matrix_paper_heatmaps.png")
        print(f"\nfigure written to {Path(args.figures) / 'matrix_paper_heatmaps.png'}")
    return 0
