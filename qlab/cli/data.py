"""``qlab data``: build, download and inspect tokenized datasets."""

from __future__ import annotations

import argparse
from pathlib import Path

from qlab.data.corpus import DEFAULT_SHARD_TOKENS, build_dataset, build_from_folder
from qlab.data.dataset import DatasetInfo, open_dataset
from qlab.data.embedded import embedded_documents
from qlab.data.fineweb import VARIANTS, download_fineweb
from qlab.data.shards import read_shard_header
from qlab.errors import ConfigError

HELP = "build, download and inspect tokenized datasets"


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help=HELP)
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser("embedded", help="tokenize the embedded corpus (Python's own docs; no network)")
    p.add_argument("--out", required=True, type=Path, help="output dataset directory")
    p.add_argument("--vocab", type=int, default=1024, help="tokenizer vocabulary size (default 1024)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace a dataset already in --out")
    p.set_defaults(func=_embedded)

    p = sub.add_parser("build", help="tokenize a folder of .txt / .jsonl (field 'text') files")
    p.add_argument("src", type=Path, help="source folder")
    p.add_argument("--out", required=True, type=Path, help="output dataset directory")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--tokenizer", type=Path, help="existing SentencePiece model to use")
    group.add_argument("--vocab", type=int, help="train a new tokenizer of this vocabulary size")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace a dataset already in --out")
    p.set_defaults(func=_build)

    p = sub.add_parser("fineweb", help="download Parameter Golf's FineWeb shards (needs huggingface_hub)")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="sp1024",
                   help="tokenizer variant of the published shards (default sp1024)")  # fmt: skip
    p.add_argument("--train-shards", type=int, default=1, help="number of 100M-token train shards")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--repo", help="dataset repository (default: $MATCHED_FINEWEB_REPO_ID, else the one "
                                  "whose manifest lists the variant)")  # fmt: skip
    p.set_defaults(func=_fineweb)

    p = sub.add_parser("info", help="print a dataset's vocabulary, files and token counts")
    p.add_argument("path", type=Path, help="dataset directory (qlab or Parameter Golf layout)")
    p.add_argument("--verify", action="store_true", help="also check shard SHA-256s")
    p.set_defaults(func=_info)


def _embedded(args: argparse.Namespace) -> int:
    train, val = embedded_documents()
    info = build_dataset(
        train, val, args.out, args.vocab, shard_tokens=args.shard_tokens, source="embedded", force=args.force
    )
    return _print_info(info)


def _build(args: argparse.Namespace) -> int:
    vocab = args.vocab if args.vocab is not None else 1024
    info = build_from_folder(
        args.src, args.tokenizer, args.out, vocab, shard_tokens=args.shard_tokens, force=args.force
    )
    return _print_info(info)


def _fineweb(args: argparse.Namespace) -> int:
    if args.train_shards < 0:
        raise ConfigError(f"--train-shards must be ≥ 0, got {args.train_shards}")
    return _print_info(download_fineweb(args.variant, args.train_shards, args.out, repo_id=args.repo))


def _info(args: argparse.Namespace) -> int:
    return _print_info(open_dataset(args.path, verify=args.verify))


def _print_info(info: DatasetInfo) -> int:
    print(f"dataset:    {info.root}")
    print(f"tokenizer:  {info.tokenizer_path}")
    print(f"vocab_size: {info.vocab_size}")
    for split, files in (("train", info.train_files), ("val", info.val_files)):
        counts = [read_shard_header(f) for f in files]
        print(f"{split}: {sum(counts):,} tokens in {len(files)} shard(s)")
        for f, n in zip(files, counts):
            print(f"  {f.name}  {n:,}")
    source = info.meta.get("source")
    if source:
        print(f"source:     {source}")
    return 0
