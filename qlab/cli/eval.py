"""``qlab eval``: validation loss and bits per byte of a run directory or a .qlab artifact.

An artifact is evaluated as the dequantized model rebuilt from the model config stored
in its header; a run directory with its saved weights and depth-recurrence mode.
"""

from __future__ import annotations

import argparse

from qlab.cli._args import add_model_checkpoint, plain
from qlab.errors import ConfigError
from qlab.eval.context import EvalContext, resolve_model
from qlab.progress import cli_progress

HELP = "val_loss and val_bpb of a checkpoint or artifact"


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help=HELP, description=plain(__doc__))
    add_model_checkpoint(p)
    p.add_argument("--data", default="embedded", help="dataset directory, or 'embedded' (default)")
    p.add_argument("--stride", type=int, help="sliding-window stride (default: standard windows)")
    p.add_argument("--seq-len", type=int, help="evaluation sequence length (default: the model's)")
    p.add_argument("--max-tokens", type=int, help="evaluate on at most N validation tokens")
    p.add_argument("--batch-seqs", type=int, default=8, help="windows per forward pass")
    p.add_argument(
        "--against",
        metavar="REF",
        help="also compare with a reference checkpoint (e.g. the float model) token by token: "
        "KL(p_ref ‖ p_model), top-1 agreement and Δbpb with 95%% intervals over documents",
    )
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples for --against (default 1000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("stride", "seq_len", "max_tokens", "batch_seqs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    ctx = EvalContext.open(args.checkpoint, args.data, args.seq_len, preset=args.preset)
    label, seq_len = ctx.label, ctx.seq_len
    res = ctx.evaluate(
        stride=args.stride,
        max_tokens=args.max_tokens,
        batch_seqs=args.batch_seqs,
        progress=cli_progress(args.no_progress),
    )
    windows = f"sliding, stride {args.stride}" if args.stride else "standard windows"
    print(f"model:     {label} (seq_len {seq_len}, {windows})")
    print(f"val_loss:  {res.val_loss:.4f}")
    print(f"val_bpb:   {res.val_bpb:.4f}")
    print(f"scored:    {res.tokens:,} tokens, {res.bytes:,} bytes")
    if args.against:
        reference, ref_label = resolve_model(args.against, preset=args.preset)
        s = ctx.agreement(ctx.model, reference, n_boot=args.boot, stride=args.stride,
                          max_tokens=args.max_tokens, batch_seqs=args.batch_seqs)  # fmt: skip
        print(agreement_lines(s, ref_label))
    return 0


def agreement_lines(s: dict[str, float], ref_label: str) -> str:
    """The agreement summary as lines, with intervals and the noise of each signal."""

    def ci(name: str, scale: float, fmt: str) -> str:
        lo, hi = s[f"{name}_lo"] * scale, s[f"{name}_hi"] * scale
        return f"{s[name] * scale:{fmt}}  [{lo:{fmt}}, {hi:{fmt}}]"

    return "\n".join([
        f"against:   {ref_label}, {int(s['docs'])} documents (95% intervals resample documents)",
        f"KL:        {ci('kl_bpb', 1e3, '.3f')} mbit/byte; {ci('kl_bits', 1.0, '.5f')} bits/token",
        f"top-1:     {ci('top1', 100.0, '.2f')} % of tokens agree",
        f"Δbpb:      {ci('delta_bpb', 1e3, '+.3f')} mBPB",
        f"noise:     ±1 mBPB(-equivalent) needs ~{s['resolve_docs_bpb']:,.0f} documents with Δbpb, "
        f"~{s['resolve_docs_kl']:,.0f} with KL",
    ])  # fmt: skip
