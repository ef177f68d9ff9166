"""``qlab figures``: regenerate every figure (the papers' and qlab's own) as PNGs."""

from __future__ import annotations

import argparse
from pathlib import Path

from qlab.figures import figure_table, generate_figures
from qlab.figures.notebooks import notebook_path, run_notebook
from qlab.figures.scale import SCALES
from qlab.io.outputs import refuse_inputs
from qlab.progress import cli_progress

HELP = "regenerate every paper figure and qlab's own measurements of them"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "figures",
        help=HELP,
        description="Without --checkpoint the tiny preset is trained on the embedded corpus at the "
        "chosen scale (cached under data/cache/figures), then every figure is measured and drawn. "
        "A weights file (safetensors, a Hugging Face directory, a state dict, an artifact) gives "
        "the figures marked 'weights' in --list.",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="a qlab run directory, or any weights file qlab reads (default: train the tiny preset)",
    )
    p.add_argument("--data", default=None, help="dataset directory or 'embedded' (default: the checkpoint's)")
    p.add_argument("--out", default="figures", help="output directory for the PNGs (default: figures)")
    p.add_argument(
        "--scale", choices=list(SCALES), default="default", help="experiment size (default: default)"
    )
    p.add_argument("--only", nargs="+", metavar="ID", default=None, help="only these figure ids")
    p.add_argument("--work-dir", default=None, help="cache directory (default: data/cache/figures)")
    p.add_argument("--list", action="store_true", help="list the figure ids and what they show, then exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--notebook",
        metavar="NAME",
        default=None,
        help="instead of the PNGs: execute this notebook (e.g. pr1394) with --checkpoint/--data/--scale/"
        "--work-dir as its parameters, written to OUT/<name>.ipynb",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.list:
        table = figure_table()
        for row in table.itertuples():
            needs = "weights" if row.weights_only else ("model" if row.needs_model else "none")
            print(f"{row.id:<36} {row.paper:<9} {needs:<8} {row.paper_figure}")
        print(
            f"\n{len(table)} figures; needs: weights: any checkpoint, model: a qlab run, none: papers' data"
        )
        return 0
    data = args.data if args.data not in (None, "embedded") else None
    refuse_inputs(args.out, [args.checkpoint, data], nested=False)  # beside an input, never as one
    if args.notebook:
        out = Path(args.out) / notebook_path(args.notebook).name
        run_notebook(args.notebook, out, checkpoint=args.checkpoint, data=args.data, scale=args.scale,
                     work_dir=args.work_dir)  # fmt: skip
        print(f"executed notebook written to {out}")
        return 0
    df = generate_figures(
        args.out,
        checkpoint=args.checkpoint,
        scale=args.scale,
        only=args.only,
        progress=cli_progress(args.quiet),
        data=args.data,
        work_dir=args.work_dir,
    )
    for row in df.itertuples():
        print(f"{row.path}  {row.bytes / 1e3:6.1f} kB  {row.seconds:6.1f} s")
    print(f"{len(df)} figures written to {args.out} ({df['seconds'].sum():.0f} s)")
    return 0
