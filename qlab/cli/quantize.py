"""``qlab quantize``: checkpoint → quantized artifact, with the byte budget and post-quant bpb.

Calibrates on training batches, quantizes by a policy (optionally solving the clip width
k so artifact + code fits the cap), writes a qlab artifact (the model config rides in its
header, so ``qlab eval model.qlab`` works on the file alone), then prints the per-tensor
breakdown and the pre-quant → quantized → sliding-window row.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from qlab.cli._args import add_model_checkpoint, plain
from qlab.compress.budget import CAP, code_bytes
from qlab.errors import ConfigError
from qlab.eval.quantize import quantize_checkpoint
from qlab.io.atomic import check_output
from qlab.io.outputs import output_lock
from qlab.progress import cli_progress
from qlab.quant.gptq import ARITHMETIC
from qlab.quant.policy import (
    RECORD_POLICIES,
    Policy,
    RecordQuant,
    load_policy,
    record_policy,
    with_gptq_arithmetic,
)

HELP = "quantize a checkpoint into a 16 MB artifact"


def register(subparsers) -> None:
    p = subparsers.add_parser("quantize", help=HELP, description=plain(__doc__))
    add_model_checkpoint(p)
    p.add_argument("--policy", default="record", help="preset name or a .json/.yaml policy file")
    p.add_argument("--out", required=True, help="artifact path to write (e.g. model.qlab)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--data", default="embedded", help="dataset directory, or 'embedded' (default)")
    p.add_argument(
        "--calib-batches",
        type=int,
        help="calibration batches (0 = no GPTQ; default $GPTQ_CALIBRATION_BATCHES or 64)",
    )
    p.add_argument(
        "--calib-batch-seqs",
        type=int,
        help="sequences per calibration batch (default 48 for record/record_pathA, as the "
        "record's 786,432-token step on 8 GPUs; else 8)",
    )
    p.add_argument("--codec", help="artifact codec, byte shuffle added (default brotli-11, or lzma-6 "
                                   "when $COMPRESSOR=lzma as in the record); 'ans' codes each tensor's "
                                   "integer codes symbol by symbol with adaptive context models, the "
                                   "rest with brotli-11")  # fmt: skip
    p.add_argument(
        "--gptq-arithmetic",
        choices=ARITHMETIC,
        help="GPTQ's float arithmetic: 'record' (default: codes bit-identical to the record's procedure) or "
        "'fast' (one Cholesky + triangular inverse, lazy updates: ~1.7x faster, rare rounding ties differ)",
    )
    p.add_argument("--code", nargs="+", metavar="PATH", help="code files counted against the cap")
    p.add_argument(
        "--code-wrap", choices=("raw", "lzma"), default="raw", help="count code raw or lzma-wrapped"
    )
    p.add_argument("--eval-tokens", type=int, help="evaluate on at most N validation tokens")
    p.add_argument("--seq-len", type=int, help="evaluation sequence length (default: the model's)")
    p.add_argument("--stride", type=int, default=64, help="sliding-window stride (0 = skip that stage)")
    p.add_argument("--solve-k", action="store_true", help="solve the matrices' clip width k for --cap")
    p.add_argument("--cap", type=int, default=CAP, help=f"byte cap for artifact + code (default {CAP:,})")
    p.add_argument("--k-range", type=float, nargs=2, default=(4.0, 40.0), metavar=("LO", "HI"),
                   help="interval --solve-k searches (default 4 40)")  # fmt: skip
    p.add_argument("--k-tol", type=float, default=0.01, help="solver tolerance on k (default 0.01)")
    p.add_argument("--top", type=int, default=12, help="tensors listed in the breakdown")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


RECORD_CALIB_SEQS = 48  # 786,432 tokens / (8 ranks × 2048): one rank's batch in the record
CODEC_OF_COMPRESSOR = {"brotli": "brotli-11", "lzma": "lzma-6"}  # the record's COMPRESSOR, as run


def _env_defaults(args: argparse.Namespace, env: Mapping[str, str]) -> None:
    """Fill unset options from the record's environment variables, then from qlab's defaults."""
    record = RecordQuant.from_env(env)
    if args.calib_batches is None:
        args.calib_batches = record.calib_batches
    if args.calib_batch_seqs is None:
        args.calib_batch_seqs = RECORD_CALIB_SEQS if args.policy in ("record", "record_pathA") else 8
    if args.codec is None:
        args.codec = CODEC_OF_COMPRESSOR[record.compressor]


def _policy(spec: str, env: Mapping[str, str], arithmetic: str | None = None) -> Policy:
    """A record policy takes the record's MATRIX_/EMBED_ BITS and CLIP_SIGMAS variables."""
    policy = record_policy(spec, RecordQuant.from_env(env)) if spec in RECORD_POLICIES else load_policy(spec)
    return policy if arithmetic is None else with_gptq_arithmetic(policy, arithmetic)


def _check_args(args: argparse.Namespace) -> None:
    policy_file = [args.policy] if Path(args.policy).is_file() else []
    inputs = [args.checkpoint, *(args.code or []), *policy_file] + ([args.data] if args.data else [])
    check_output(args.out, inputs, args.force)
    if args.calib_batches < 0 or args.calib_batch_seqs < 1:
        raise ConfigError("--calib-batches must be ≥ 0 and --calib-batch-seqs ≥ 1")
    for flag, value in (("--seq-len", args.seq_len), ("--eval-tokens", args.eval_tokens)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be ≥ 1, got {value}")
    if args.cap <= 0 or args.top < 0 or args.stride < 0:
        raise ConfigError("--cap must be positive, --top and --stride non-negative")


def run(args: argparse.Namespace) -> int:
    _env_defaults(args, os.environ)
    _check_args(args)
    out = Path(args.out)
    # one writer per artifact: a second quantize to the same --out waits for nobody, it is refused
    with output_lock(out.parent, f"artifact {out.name}", name=f".{out.name}.lock"):
        return _quantize(args)


def _quantize(args: argparse.Namespace) -> int:
    policy = _policy(args.policy, os.environ, args.gptq_arithmetic)
    code = code_bytes(args.code, wrap=args.code_wrap) if args.code else 0
    result = quantize_checkpoint(
        args.checkpoint, policy, args.data, preset=args.preset, calib_batches=args.calib_batches,
        calib_batch_seqs=args.calib_batch_seqs, solve_cap=args.solve_k, cap=args.cap,
        k_range=tuple(args.k_range), k_tol=args.k_tol, codec=args.codec, code_bytes=code,
        seq_len=args.seq_len, stride=args.stride or None, max_eval_tokens=args.eval_tokens,
        progress=cli_progress(args.no_progress),
    )  # fmt: skip
    if result.solved is not None:
        res = result.solved
        print(f"solved k:      {res.k:.4f} (matrices; smallest k whose artifact + code fits {args.cap:,} B)")
        print(f"               predicted {res.predicted_bytes:,} B, measured {res.measured_bytes:,} B, "
              f"{len(res.iterations)} evaluations")  # fmt: skip
    result.save(args.out)
    _print_breakdown(result.budget, args.top)
    _print_row(result.row.iloc[0], args.out, args.cap)
    return 0


def _print_breakdown(table: pd.DataFrame, top: int) -> None:
    tensors = table[~table["name"].str.startswith("[")]
    shown = tensors.nlargest(top, "compressed_bytes")
    rest = tensors.drop(shown.index)
    label = "pred. bytes" if table.attrs["predicted"] else "bytes"
    print(f"{'tensor':<34} {'kind':<18} {'bits':>4} {'k':>6} {'numel':>10} {label:>12} {'order-0':>10} "
          f"{'share':>7}")  # fmt: skip
    for _, r in shown.iterrows():
        k = f"{r['k']:.2f}" if pd.notna(r["k"]) else "-"
        print(f"{r['name']:<34} {r['kind']:<18} {int(r['bits']):>4} {k:>6} {int(r['numel']):>10,} "
              f"{r['compressed_bytes']:>12,.0f} {_bytes(r['order0_bytes']):>10} "
              f"{100 * r['share']:>6.2f}%")  # fmt: skip
    if len(rest):
        print(f"{f'... {len(rest)} more':<34} {'':<18} {'':>4} {'':>6} {int(rest['numel'].sum()):>10,} "
              f"{rest['compressed_bytes'].sum():>12,.0f} {_bytes(rest['order0_bytes'].sum()):>10} "
              f"{100 * rest['share'].sum():>6.2f}%")  # fmt: skip
    for _, r in table[table["name"].str.startswith("[")].iterrows():
        print(f"{r['name']:<34} {r['kind']:<18} {'':>4} {'':>6} {'':>10} {r['compressed_bytes']:>12,.0f} "
              f"{'':>10} {100 * r['share']:>6.2f}%")  # fmt: skip
    codes = tensors["order0_bytes"].notna()
    print(
        f"order-0 bound of the codes (Σ n·H0/8 per tensor): {tensors.loc[codes, 'order0_bytes'].sum():,.0f} B"
    )


def _bytes(x: float) -> str:
    return "-" if pd.isna(x) or x == 0 else f"{x:,.0f}"


def _print_row(r: pd.Series, out: str, cap: int) -> None:
    verdict = "fits" if r["fits_cap"] else "DOES NOT FIT"
    print(f"artifact:      {out}: {r['artifact_bytes']:,} B (model + {r['code_bytes']:,} B code; "
          f"brotli-11 predicted {r['predicted_bytes']:,}) -> {verdict} the {cap:,} B cap, "
          f"headroom {r['headroom_bytes']:,} B")  # fmt: skip
    print(f"pre-quant:     val_bpb {r['pre_quant_bpb']:.4f}")
    print(f"quantized:     val_bpb {r['quantized_bpb']:.4f}  (quant tax {r['quant_tax_mbpb']:+.2f} mBPB, "
          f"95% [{r['quant_tax_lo_mbpb']:+.2f}, {r['quant_tax_hi_mbpb']:+.2f}] over documents)")  # fmt: skip
    print(f"vs float:      KL {1e3 * r['kl_bpb']:.3f} mbit/byte [{1e3 * r['kl_bpb_lo']:.3f}, "
          f"{1e3 * r['kl_bpb_hi']:.3f}], top-1 agreement {100 * r['top1']:.2f} % "
          f"[{100 * r['top1_lo']:.2f}, {100 * r['top1_hi']:.2f}]")  # fmt: skip
    if pd.notna(r["sliding_bpb"]):
        gain = r["sliding_gain_mbpb"]
        print(f"sliding:       val_bpb {r['sliding_bpb']:.4f}  (sliding gain {gain:+.2f} mBPB)")
    hess = "GPTQ with Hessians" if r["hessians_used"] else "no Hessians (RTN)"
    print(f"calibration:   {r['calib_batches']} batches, {hess}; {r['eval_tokens']:,} tokens scored")
