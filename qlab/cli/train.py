"""``qlab train``: train a preset on a dataset, with checkpoints, metrics and ``--resume``.

Settings come from the preset, then Parameter Golf's environment variables (see
``qlab.train.config``), then these flags. With ``--resume`` and an existing checkpoint
the run's saved configuration replaces preset and environment; flags still apply.
Run under ``torchrun --nproc_per_node=N -m qlab train ...`` for DDP.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from qlab.config import ModelConfig
from qlab.data import open_dataset
from qlab.errors import ConfigError
from qlab.io import checkpoint as ckpt
from qlab.progress import cli_progress
from qlab.train import distributed as D
from qlab.train.config import MODEL_ENV, TrainConfig, resolve_configs
from qlab.train.trainer import train

# flag dest -> TrainConfig field (None values are "not given")
_TRAIN_FLAGS = {
    "data": "data",
    "out": "out_dir",
    "iterations": "iterations",
    "max_wallclock": "max_wallclock_seconds",
    "compile": "compile",
    "loader": "loader",
    "autocast": "autocast",
    "device": "device",
    "seed": "seed",
    "batch_tokens": "train_batch_tokens",
    "seq_len": "train_seq_len",
    "grad_accum": "grad_accum",
    "warmup_steps": "warmup_steps",
    "ema_decay": "ema_decay",
    "val_every": "val_every",
    "val_max_tokens": "val_max_tokens",
    "log_every": "log_every",
    "checkpoint_every": "checkpoint_every",
    "qat_bits": "qat_bits",
    "qat_k": "qat_k",
    "qat_start": "qat_start_frac",
    "swa_every": "swa_every",
    "swa_blend": "swa_blend",
    "curriculum_buckets": "curriculum_buckets",
    "curriculum_floor": "curriculum_floor",
}
_MODEL_FLAGS = {"vocab_size": "vocab_size", "model_dim": "model_dim", "num_layers": "num_layers",
                "precision": "precision"}  # fmt: skip


HELP = "train a model (Muon + AdamW, EMA, DDP under torchrun)"


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help=HELP)
    p.add_argument(
        "--preset", default="tiny", help="model/train preset: tiny, baseline, record (default tiny)"
    )
    p.add_argument("--data", help="dataset directory, or 'embedded' for the built-in corpus (default)")
    p.add_argument("--out", help="run directory (default runs/default, or runs/$RUN_ID)")
    p.add_argument("--iterations", type=int, help="training steps ($ITERATIONS; default: the preset's)")
    p.add_argument("--max-wallclock", type=float, help="wallclock cap in seconds (0 = none)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--compile", action="store_const", const=True, help="torch.compile the model")
    p.add_argument(
        "--no-compile",
        dest="compile",
        action="store_const",
        const=False,
        help="do not compile (default: compile on CUDA only)",
    )
    p.add_argument(
        "--loader",
        choices=("qlab", "record"),
        help="data order: qlab's seeded stream, or the record's (default for --preset record)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "record"),
        help="fp32 everywhere (default), or as the record ran: bf16 tok_emb, RoPE tables and Muon update",
    )
    p.add_argument("--autocast", choices=("auto", "bf16", "none"),
                   help="bf16 autocast: auto = on CUDA only (default), bf16, or none")  # fmt: skip
    p.add_argument("--device", help="auto, cpu or cuda[:N]")
    p.add_argument("--seed", type=int, help="random seed ($SEED; default: the preset's)")
    p.add_argument("--batch-tokens", type=int, help="global tokens per optimizer step")
    p.add_argument("--seq-len", type=int, help="training sequence length")
    p.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (default 8 // world)")
    p.add_argument("--warmup-steps", type=int, help="discarded compile warm-up steps")
    p.add_argument("--ema-decay", type=float, help="EMA decay (0 = off)")
    p.add_argument("--val-every", type=int, help="validate every N steps (0 = only at the end)")
    p.add_argument(
        "--val-max-tokens", type=int, help="validate on at most N tokens (default: the whole split)"
    )
    p.add_argument("--log-every", type=int, help="log the training loss every N steps")
    p.add_argument(
        "--checkpoint-every", type=int, help="save a resumable checkpoint every N steps (0 = at the end)"
    )
    p.add_argument("--qat-bits", type=int, help="fake-quant QAT bit width for block matrices (0 = off)")
    p.add_argument("--qat-k", type=float, help="SDClip k of the QAT scale (default 12.85)")
    p.add_argument("--qat-start", type=float, help="training fraction at which QAT switches on")
    p.add_argument("--swa-every", type=int, help="SWA snapshot every N warm-down steps (0 = off)")
    p.add_argument("--swa-blend", type=float, help="shipped = a·EMA + (1 − a)·SWA (default 0.5)")
    p.add_argument("--curriculum-buckets", type=int, help="entropy-bucket curriculum buckets (0 = off)")
    p.add_argument("--curriculum-floor", type=float, help="minimum probability of every bucket")
    p.add_argument("--vocab-size", type=int, help="model vocabulary (default: the dataset's)")
    p.add_argument("--model-dim", type=int, help="model width ($MODEL_DIM; default: the preset's)")
    p.add_argument("--num-layers", type=int, help="number of blocks ($NUM_LAYERS; default: the preset's)")
    p.add_argument("--reg", action="append", default=[], metavar="NAME=WEIGHT", help="add a regularizer")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)


def parse_regs(items: list[str]) -> dict[str, float]:
    regs: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not name or weight != weight:
            raise ConfigError(f"--reg {item!r}: expected NAME=WEIGHT with a numeric weight")
        regs[name] = weight
    return regs


def _given(args: argparse.Namespace, table: dict[str, str]) -> dict[str, Any]:
    return {field: getattr(args, dest) for dest, field in table.items() if getattr(args, dest) is not None}


def build_configs(args: argparse.Namespace, env=None) -> tuple[TrainConfig, ModelConfig, bool]:
    """(TrainConfig, ModelConfig, resuming) from flags, environment and any saved run."""
    env = os.environ if env is None else env
    train_over = _given(args, _TRAIN_FLAGS)
    if args.reg:
        train_over["regs"] = parse_regs(args.reg)
    model_over = _given(args, _MODEL_FLAGS)
    out = train_over.get("out_dir")
    if args.resume and out and ckpt.has_checkpoint(out):
        saved = ckpt.read_config(out)
        train = TrainConfig.from_dict({**saved["train"], **train_over})
        model = ModelConfig.from_dict(saved["model"]).replace(**model_over)
        return train, model, True
    if args.resume and not out:
        raise ConfigError("--resume needs --out RUN_DIR")
    train, model = resolve_configs(args.preset, train_over, model_over, env)
    if "vocab_size" not in model_over and not any(
        v in env for v, (f, _) in MODEL_ENV.items() if f == "vocab_size"
    ):
        model = _adopt_dataset_vocab(train, model)
    return train, model, bool(args.resume)


def _adopt_dataset_vocab(train: TrainConfig, model: ModelConfig) -> ModelConfig:
    # A dataset directory fixes the vocabulary; use it unless the user chose one.
    if train.data == "embedded":
        return model

    info = open_dataset(train.data)
    return model.replace(vocab_size=info.vocab_size) if info.vocab_size != model.vocab_size else model


def _train(args: argparse.Namespace) -> int:
    train_cfg, model_cfg, resume = build_configs(args)
    result = train(train_cfg, model_cfg, resume=resume, progress=cli_progress(args.no_progress))
    if D.rank() == 0 and int(os.environ.get("RANK", "0")) == 0:
        val = f"{result.val_bpb:.4f}" if result.val_bpb is not None else "n/a"
        print(f"steps:        {result.steps} ({result.stopped_by})")
        print(f"tokens:       {result.tokens_seen:,} in {result.train_seconds:.1f} s "
              f"({result.tokens_per_second:,.0f} tokens/s, world size {result.world_size})")  # fmt: skip
        print(f"train loss:   {result.train_loss:.4f}")
        weights = ckpt.read_config(result.run_dir).get("weights", "?")
        print(f"val bpb:      {val} (loss {result.val_loss:.4f}, {weights} weights)")
        print(f"checkpoint:   {result.run_dir}")
    return 0
