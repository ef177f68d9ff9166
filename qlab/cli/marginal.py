"""``qlab marginal CKPT --data DATA``: what each bit costs, per tensor group.

Changes one group's setting at a time (one bit more or less, clip width k × 0.8 or × 1.25)
against the base policy, re-quantizes with the Hessians collected once, and measures
Δbytes of the real artifact and the paired Δval_bpb with a bootstrap 95 % interval over
documents. Writes OUT/marginal.csv (row by row: rerun the same command to resume after a
kill) and OUT/marginal.png. Effects whose interval contains 0 are marked not resolved.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qlab.analysis.allocator import allocate
from qlab.analysis.marginal import COLUMNS, fit_predictor, marginal_table
from qlab.cli._args import plain
from qlab.errors import ConfigError
from qlab.eval.context import EvalContext
from qlab.io.atomic import atomic_write_json
from qlab.io.outputs import claim_output_dir, input_digest, output_lock
from qlab.plots.allocation import plot_marginal
from qlab.plots.style import save_figure
from qlab.progress import cli_progress
from qlab.quant.policy import resolve_policy

HELP = "Δbytes and paired Δbpb of changing one tensor group's bits or clip width"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("marginal", help=HELP, description=plain(__doc__))
    p.add_argument("checkpoint", help="a qlab run directory (config.json + model.safetensors)")
    p.add_argument("--data", required=True, help="dataset directory (validation split and calibration data)")
    p.add_argument(
        "--policy", default="record_small", help="base policy preset or file (default record_small)"
    )
    p.add_argument("--group-by", choices=("family", "layer_family"), default="family",
                   help="tensor groups: weight family, or layer × family")  # fmt: skip
    p.add_argument("--settings", default="bits+1,bits-1,k*0.8,k*1.25",
                   help="changes to try, comma list of bits+N, bits-N, k*F (default: all four)")  # fmt: skip
    p.add_argument("--calib-batches", type=int, default=64, help="calibration batches for the Hessians")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--eval-tokens", type=int, help="score at most N validation tokens (default: all)")
    p.add_argument("--codec", default="ans", help="artifact codec the bytes are measured with (default ans)")
    p.add_argument("--out", default="marginal_out", help="output directory (default marginal_out)")
    p.add_argument(
        "--cap",
        type=int,
        help="also choose per-group settings for this artifact size (bytes) from the table, write "
        "OUT/allocated_policy.json and measure it against the base policy",
    )
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out that holds other results (rows measured on "
                        "another checkpoint, policy, dataset, budget or codec are discarded)")  # fmt: skip
    p.add_argument("--value", choices=sorted(VALUES), default="bpb",
                   help="what --cap minimises: 'bpb' (paired Δbpb, the default) or 'kl' (the paired "
                        "change of KL to the float model: bits per byte too, a quieter signal)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


VALUES = {"bpb": "delta_bpb", "kl": "delta_kl"}


def provenance(args: argparse.Namespace, policy) -> dict:
    """What the rows of ``marginal.csv`` depend on: a rerun resumes only rows of the same."""
    return {
        "checkpoint": input_digest(args.checkpoint), "data": input_digest(args.data),
        "policy": policy.to_dict(), "group_by": args.group_by, "calib_batches": args.calib_batches,
        "boot": args.boot, "eval_tokens": args.eval_tokens, "codec": args.codec, "columns": len(COLUMNS),
    }  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.calib_batches < 1 or args.boot < 0:
        raise ConfigError("--calib-batches must be ≥ 1 and --boot ≥ 0")
    if args.eval_tokens is not None and args.eval_tokens < 1:
        raise ConfigError(f"--eval-tokens must be ≥ 1, got {args.eval_tokens}")
    out = Path(args.out)
    policy = resolve_policy(args.policy)
    inputs = [args.checkpoint, args.data, args.policy if Path(args.policy).is_file() else None]
    reuse = claim_output_dir(out, "marginal", inputs, force=args.force, provenance=provenance(args, policy))
    with output_lock(out):
        if not reuse:
            (out / "marginal.csv").unlink(missing_ok=True)
        return _run(args, out, policy)


def _run(args: argparse.Namespace, out: Path, policy) -> int:
    progress = cli_progress(args.no_progress)
    ctx = EvalContext.open(args.checkpoint, args.data)
    hessians = ctx.hessians(policy, args.calib_batches, progress=progress)
    model, (val, tables) = ctx.model, ctx.validation()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    table = marginal_table(
        model, policy, val, tables, hessians, seq_len=ctx.seq_len, grouping=args.group_by,
        settings=settings, codec=args.codec, n_boot=args.boot, max_tokens=args.eval_tokens,
        out=out / "marginal.csv", progress=progress,
    )  # fmt: skip
    save_figure(plot_marginal(table), out / "marginal.png")
    _print(table)
    if len(table) > 2:
        fit = fit_predictor(table)
        slopes = ", ".join(f"{k} {a:.3g}" for k, a in fit["slopes"].items())
        print(f"predictor Δbpb ≈ a_s·Δtr(ΔW H ΔWᵀ) + b over {fit['n']} rows (slopes: {slopes}): "
              f"R² {fit['r2']:.3f}, leave-one-out {fit['loo_r2']:.3f}, "
              f"noise ceiling {fit['r2_ceiling']:.3f}")  # fmt: skip
    print(f"wrote {out / 'marginal.csv'} and {out / 'marginal.png'}")
    if args.cap is not None:
        _allocate(args, model, policy, table, val, tables, hessians, out)
    return 0


def _allocate(args, model, policy, table, val, tables, hessians, out: Path) -> None:
    r = allocate(
        model, policy, table, args.cap, val, tables, hessians, seq_len=model.config.eval_seq_len,
        grouping=args.group_by, codec=args.codec, n_boot=args.boot, max_tokens=args.eval_tokens,
        value=VALUES[args.value],
    )  # fmt: skip
    atomic_write_json(out / "allocated_policy.json", r["policy"].to_dict())
    picked = ", ".join(f"{g} {s}" for g, s in r["choice"].items()) or "no change"
    print(f"allocation for {args.cap:,} B: {picked} "
          f"(predicted {r['predicted_bytes']:+,} B, {1e3 * r['predicted_bpb']:+.2f} mBPB)")  # fmt: skip
    for key, what in (("vs_base", "the base policy"), ("vs_uniform", "the uniform policy at equal bytes")):
        if key in r:
            m = r[key]
            extra = f", matrices k = {r['uniform_k']:.3f}" if key == "vs_uniform" else ""
            ci = f"[{1e3 * m['ci_lo']:+.2f}, {1e3 * m['ci_hi']:+.2f}]"
            kl = f"[{1e3 * m['kl_lo']:+.3f}, {1e3 * m['kl_hi']:+.3f}]"
            print(f"measured vs {what} ({m['base_bytes']:,} B{extra}): {m['bytes']:,} B, "
                  f"Δ {1e3 * m['delta_bpb']:+.2f} mBPB {ci}, "
                  f"ΔKL {1e3 * m['delta_kl']:+.3f} mbit/byte {kl}")  # fmt: skip
    print(f"wrote {out / 'allocated_policy.json'} (qlab quantize --policy accepts it)")


def _print(table) -> None:
    base = table.iloc[0] if len(table) else None
    if base is not None:
        print(f"base: {int(base['base_bytes']):,} B, val_bpb {base['base_bpb']:.4f}")
    print(f"{'group':<14} {'setting':<8} {'Δbytes':>9} {'ΔmBPB':>8} {'95% CI (mBPB)':>18} {'mBPB/kB':>8} "
          f"{'ΔKL (mbit/B)':>12} {'95% CI':>18}")  # fmt: skip
    for _, r in table.iterrows():
        ci = f"[{1e3 * r['ci_lo']:+.2f}, {1e3 * r['ci_hi']:+.2f}]"
        kl = f"[{1e3 * r['kl_lo']:+.3f}, {1e3 * r['kl_hi']:+.3f}]"
        flag = ("" if r["resolved"] else "  Δbpb not resolved") + (
            "" if r["kl_resolved"] else "  ΔKL not resolved"
        )
        print(f"{r['group']:<14} {r['setting']:<8} {int(r['delta_bytes']):>+9,} "
              f"{1e3 * r['delta_bpb']:>+8.2f} {ci:>18} {r['mbpb_per_kb']:>+8.3f} "
              f"{1e3 * r['delta_kl']:>+12.3f} {kl:>18}{flag}")  # fmt: skip
