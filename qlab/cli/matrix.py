"""``qlab matrix``: build, merge and report a reg × quant matrix (:mod:`qlab.analysis.matrix`).

    qlab matrix list SPEC [--shard i/n] [--count]        the cells (id, …, index) of a grid
    qlab matrix run SPEC --out DIR [--shard i/n | --cell ID ... | --cell-index N] [--data DIR] [--device D]
    qlab matrix merge DIR [DIR ...] [--out OUT]          results.csv, hidden.csv, geometry.csv, results.json
    qlab matrix report DIR [--metric M] [--policy P] [--figures FIGDIR]
    qlab matrix paper [DIR] [--figures FIGDIR]           PR #2011's published matrix (next to DIR's)

Under a SLURM job array, ``matrix run`` without --shard/--cell/--cell-index runs the cell
whose index is ``$SLURM_ARRAY_TASK_ID`` (``matrix list --count`` gives the array size);
docs/cluster.md has the tested sbatch script.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from qlab.analysis.matrix import (
    cell_at,
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
    ls.add_argument("--count", action="store_true", help="print only the number of cells (an array's size)")
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
    run.add_argument("--cell-index", type=int, metavar="N",
                     help="run only the N-th cell of `matrix list` (default under a SLURM array: "
                          "$SLURM_ARRAY_TASK_ID)")  # fmt: skip
    run.add_argument("--data", help="dataset directory for every base (overrides the spec)")
    run.add_argument("--device", help="auto, cpu or cuda[:N] (overrides the spec)")
    run.add_argument("--progress", action="store_true", help="show progress bars")
    run.set_defaults(func=_run)

    merge = sub.add_parser(
        "merge", help="collect all cells of DIR into results.csv / hidden.csv / results.json"
    )
    merge.add_argument("dir", nargs="+", help="the grid's output folder(s): shards run on different machines")
    merge.add_argument("--out", help="where the merged tables go (default: the first DIR)")
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
    every = plan_cells(_spec(args))
    mine = {c.cell_id for c in shard_cells(every, *parse_shard(args.shard))}
    if args.count:
        print(len(mine))
        return 0
    for i, c in enumerate(every):
        if c.cell_id in mine:
            print(f"{c.cell_id}\tbase={c.base}\tvariant={c.variant.label}\tseed={c.seed}\tindex={i}")
    return 0


ARRAY_TASK_VAR = "SLURM_ARRAY_TASK_ID"


def selected_cells(args: argparse.Namespace, spec, env: Mapping[str, str]) -> list[str] | None:
    """The cell ids ``matrix run`` was asked for: --cell, --cell-index, or (with neither and
    no --shard) the array task's index; None for this shard's cells."""
    index = args.cell_index
    if index is None and not args.cell and args.shard == "0/1" and env.get(ARRAY_TASK_VAR, "").strip():
        try:
            index = int(env[ARRAY_TASK_VAR])
        except ValueError:
            raise ConfigError(f"${ARRAY_TASK_VAR}={env[ARRAY_TASK_VAR]!r} is not a cell index") from None
    if index is None:
        return args.cell
    if args.cell or args.shard != "0/1":
        raise ConfigError("--cell-index (or a SLURM array task) runs one cell: drop --cell and --shard")
    return [cell_at(spec, index).cell_id]


def _run(args: argparse.Namespace) -> int:
    spec = _spec(args)
    cells = selected_cells(args, spec, os.environ)
    status = run_matrix(spec, args.out, shard=parse_shard(args.shard), cells=cells, progress=args.progress)
    counts = status["status"].value_counts().to_dict()
    print(f"{len(status)} cell(s) in this shard: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return 0


def _merge(args: argparse.Namespace) -> int:
    out = Path(args.out or args.dir[0])
    res = merge_results(*args.dir, out=out)
    n = res.pipeline["cell_id"].nunique()
    print(f"{n} cells from {len(args.dir)} folder(s) → {out / 'results.csv'}, hidden.csv, geometry.csv, "
          "results.json")  # fmt: skip
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
