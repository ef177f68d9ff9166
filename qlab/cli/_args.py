"""Arguments shared by several commands (a private module: not a command group)."""

from __future__ import annotations

import argparse
import re


def add_model_checkpoint(p: argparse.ArgumentParser) -> None:
    """CHECKPOINT and --preset: any checkpoint of qlab's GPT, config inferred when absent."""
    p.add_argument(
        "checkpoint",
        help="qlab run directory, .qlab artifact, or any checkpoint of qlab's GPT "
        "(e.g. the record's final_model.pt / .int6.ptz: config inferred from the shapes)",
    )
    p.add_argument(
        "--preset",
        default=None,
        help="preset for what shapes cannot show, when the config is inferred (default record)",
    )


_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|obj):`~?([^`]+)`")


def plain(doc: str | None) -> str:
    """A module docstring as plain text for ``--help``: reST roles and double backticks
    dropped (``qlab eval`` → qlab eval, :func:`~a.b` → a.b)."""
    text = _ROLE.sub(r"\1", doc or "")
    return text.replace("``", "")
