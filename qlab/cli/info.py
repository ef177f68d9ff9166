"""``qlab info``: a model preset's configuration and exact parameter count, or the lists
of presets, quantization policies and training regularizers qlab knows by name."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os

import torch

from qlab.cli._args import plain
from qlab.config import PRESETS, ModelConfig, get_preset
from qlab.errors import ConfigError
from qlab.model.gpt import GPT, parameter_table
from qlab.quant.policy import POLICIES, RecordQuant, get_policy
from qlab.train.config import resolve_configs
from qlab.train.regularizers import REGULARIZERS

FAMILIES = ("embedding", "attention", "mlp", "control")


HELP = "show a model preset's configuration and parameter count"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help=HELP, description=plain(__doc__))
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", metavar="NAME", help=f"preset to describe ({', '.join(PRESETS)})")
    what.add_argument("--list", action="store_true", help="list the preset names with their sizes")
    what.add_argument(
        "--policies", action="store_true", help="list the quantization policies (--policy NAME)"
    )
    what.add_argument(
        "--regularizers", action="store_true", help="list the training regularizers (qlab train --reg NAME=λ)"
    )
    parser.set_defaults(func=run)


def _meta_model(config: ModelConfig) -> GPT:
    # Parameters on the meta device cost no memory or init time; only shapes are needed.
    with torch.device("meta"):
        return GPT(config)


def describe(config: ModelConfig) -> list[str]:
    """Lines describing one configuration: its fields, then the parameter breakdown."""
    lines = [f"  {f.name} = {getattr(config, f.name)!r}" for f in dataclasses.fields(config)]
    table = parameter_table(_meta_model(config))
    total = int(table["numel"].sum())
    lines.append(f"parameters: {total:,}")
    by_family = table.groupby("family")["numel"].sum()
    for family in FAMILIES:
        count = int(by_family.get(family, 0))
        lines.append(f"  {family:<10} {count:>12,}  ({100.0 * count / total:5.2f}%)")
    return lines


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


def _print_policies() -> None:
    for name in POLICIES:
        rules = get_policy(name).rules
        summary = "; ".join(f"{r.pattern}{_floor(r.min_numel)}: {_spec_text(r.spec)}" for r in rules)
        print(f"{name:<14} {summary}")


def _floor(min_numel: int | None) -> str:
    return "" if min_numel is None else f" (>{min_numel - 1:,} el.)"


def _spec_text(spec) -> str:
    if spec.method == "passthrough":
        return f"passthrough {spec.passthrough_dtype}"
    k = (spec.clip_params or {}).get("k")
    return f"{spec.method} int{spec.bits} {spec.clip}" + (f" k={k:g}" if k is not None else "")


def _print_regularizers() -> None:
    importlib.import_module("qlab.train.regularizers")  # registers them
    for name, fn in sorted(REGULARIZERS.items()):
        print(f"{name:<12} {_first_line(fn.__doc__)}")


def run(args: argparse.Namespace) -> int:
    if args.policies:
        _print_policies()
        return 0
    if args.regularizers:
        _print_regularizers()
        return 0
    if args.list:
        for name in PRESETS:
            total = _meta_model(get_preset(name)).num_parameters()
            print(f"{name:<10} {total:>12,} parameters")
        return 0
    if not args.preset:
        raise ConfigError("qlab info: --preset needs a name")
    train, config = resolve_configs(args.preset)
    print(f"preset: {args.preset} (resolved: preset, then environment variables)")
    print("model:")
    for line in describe(config):
        print(line)
    print("training:")
    for f in dataclasses.fields(train):
        print(f"  {f.name} = {getattr(train, f.name)!r}")
    quant = RecordQuant.from_env(os.environ)
    print("quantization (qlab quantize --policy record):")
    for f in dataclasses.fields(quant):
        print(f"  {f.name} = {getattr(quant, f.name)!r}")
    return 0
