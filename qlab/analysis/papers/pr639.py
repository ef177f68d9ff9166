"""PR #639 (full GPTQ + TTT): its results table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from qlab.analysis.papers._files import _csv, _num


def pr639_results(root: str | Path | None = None) -> pd.DataFrame:
    """PR #639's GPTQ/TTT numbers (setting, metric, value, unit, note, source_ref)."""
    df = _csv(root, "pr639", "results.csv", ["setting", "metric", "value", "unit", "note", "source"])
    df["value"] = [_num(v, f"pr639/results.csv value of {s!r}") for v, s in zip(df["value"], df["setting"])]
    df.insert(0, "paper", "paper:pr639")
    return df.rename(columns={"source": "source_ref", "paper": "source"})
