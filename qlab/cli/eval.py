"""``qlab eval``: validation loss and bits per byte of a run directory or a .qlab artifact.

An artifact is evaluated as the dequantized model rebuilt from the model config stored
in its header; a run directory with its saved weights and depth-recurrence mode.
"""

from __future__ import annotations

import argparse

from qlab.cli._args import add_model_checkpoint, plain
from qlab.errors import ConfigError
from qlab.eval.context import EvalContext
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
    return 0
