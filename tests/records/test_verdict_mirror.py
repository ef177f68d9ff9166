"""qlab verdict over every record folder of an openai/parameter-golf checkout
(``QLAB_RECORD_DIR``): docs/verdict.md is exactly what it prints, so every finding there
(a stated mean or deviation the logs do not give) is a measurement, not a guess."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qlab.cli.verdict import markdown_rows

ROOT = Path(__file__).resolve().parents[2]


def test_docs_verdict_is_the_table_of_the_mirror():
    root = os.environ.get("QLAB_RECORD_DIR")
    if not root:
        pytest.skip("QLAB_RECORD_DIR is not set (a checkout of openai/parameter-golf)")
    records = Path(root) / "records" / "track_10min_16mb"
    table = markdown_rows(records)
    doc = (ROOT / "docs" / "verdict.md").read_text(encoding="utf-8")
    assert table in doc, "docs/verdict.md is stale: regenerate its table with `qlab verdict --all`"
    assert table.count("\n") - 1 == sum(1 for p in records.iterdir() if p.is_dir())
