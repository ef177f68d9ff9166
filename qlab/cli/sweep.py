"""``qlab sweep CKPT``: rate–distortion sweep of a checkpoint's matrices over (b, k, rule).

Writes tidy CSVs (sweep, per-setting summary, SDClip vs quantile search, (b, k) vs
(b+1, 2k), std vs ratio, R–D curves) and their figures to ``--out``. With ``--data``
(and a qlab run directory as CKPT) every setting is also evaluated on validation data
(Δval_bpb). Where the next kilobyte is best spent, with intervals: ``qlab marginal``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from qlab.analysis import rd, rd_compare
from qlab.cli._args import plain
from qlab.errors import ConfigError
from qlab.eval.context import EvalContext
from qlab.io.atomic import atomic_write_text
from qlab.io.outputs import claim_output_dir
from qlab.plots import rd as plots
from qlab.plots.style import save_figure
from qlab.progress import cli_progress

HELP = "rate-distortion sweep over bits, k and clip rules"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sweep", help=HELP, description=plain(__doc__))
    p.add_argument("ckpt", metavar="CKPT", help="any checkpoint (a qlab run directory for --data)")
    p.add_argument("--bits", default="4,5,6,7,8", help="bit widths, comma list (default 4,5,6,7,8)")
    p.add_argument("--k", default="6:20:2", help="SDClip k: start:stop:step (inclusive) or comma list")
    p.add_argument("--rules", default="sdclip,quantile_search", help="clip rules, comma list")
    p.add_argument("--data", metavar="DIR", help="dataset directory: evaluate Δval_bpb per setting")
    p.add_argument("--eval-tokens", type=int, default=65_536, metavar="N", help="validation tokens to score")
    p.add_argument(
        "--max-rows", type=int, default=None, metavar="R", help="row sample per matrix (no --data)"
    )
    p.add_argument("--out", default="sweep_out", metavar="DIR", help="output directory (default sweep_out)")
    p.add_argument(
        "--force", action="store_true", help="write into a non-empty --out qlab sweep did not make"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def parse_ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated integers, got {text!r}") from None


def parse_ks(text: str) -> list[float]:
    """``"6:20:2"`` → 6, 8, …, 20 (stop included); ``"8,12.85"`` → [8.0, 12.85]."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            return [round(v, 6) for v in np.arange(start, stop + step / 2, step)]
        ks = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"--k: expected start:stop:step with step > 0 or a comma list, got {text!r}"
        ) from None
    if not ks or any(k <= 0 for k in ks):
        raise ConfigError(f"--k: every k must be > 0, got {text!r}")
    return ks


def _evaluator(ckpt: str, data: str, eval_tokens: int):
    ctx = EvalContext.open(ckpt, data)
    tokens, tables = ctx.validation()
    return ctx.model, rd.bpb_eval_fn(tokens, tables, seq_len=ctx.seq_len, max_tokens=eval_tokens)


def _save(out: Path, name: str, df) -> None:
    atomic_write_text(out / f"{name}.csv", df.to_csv(index=False))


def run(args: argparse.Namespace) -> int:
    bits, ks = parse_ints(args.bits, "--bits"), parse_ks(args.k)
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    out = Path(args.out)
    claim_output_dir(out, "sweep", [args.ckpt, args.data], force=args.force)
    progress = cli_progress(args.no_progress)
    model = eval_fn = None
    if args.data:
        if args.max_rows is not None:
            raise ConfigError("--max-rows cannot be combined with --data (the model needs whole matrices)")
        model, eval_fn = _evaluator(args.ckpt, args.data, args.eval_tokens)
        mats = rd.load_matrices(dict(model.state_dict()))
    else:
        mats = rd.load_matrices(args.ckpt, max_rows=args.max_rows)
    df = rd.sweep(mats, bits, ks, rules, model=model, eval_fn=eval_fn, progress=progress)
    summary = rd.summarize_sweep(df)
    cmp = rd.compare_from_sweep(df)
    _save(out, "sweep", df)
    _save(out, "summary", summary)
    _save(out, "sdclip_vs_quantile", cmp)
    _save(out, "bk_equivalence", rd.bk_equivalence(mats, [b for b in bits if b < 8] or [4], ks[:4]))
    ratio = rd_compare.std_vs_ratio(mats, bits=6)
    _save(out, "std_vs_ratio", ratio.table)
    curves = rd_compare.rd_curve(mats, progress=progress)
    _save(out, "rd_curve", curves)
    save_figure(plots.plot_entropy_vs_k(summary), out / "entropy_vs_k.png")
    save_figure(plots.plot_std_vs_ratio(ratio.table), out / "std_vs_ratio.png")
    save_figure(plots.plot_rd_curves(curves), out / "rd_curves.png")
    save_figure(plots.plot_sdclip_vs_quantile(cmp), out / "sdclip_vs_quantile.png")
    print(f"{len(df)} rows over {len(mats)} matrices; std vs ratio R² = {ratio.fit.r2:.4f}; wrote {out}/")
    return 0
