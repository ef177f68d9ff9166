"""PR #1718 (eval-time levers): the levers it measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from qlab.analysis.papers._files import _csv, _num
from qlab.errors import DataError
from qlab.eval.stages import STAGES


def pr1718_levers(root: str | Path | None = None) -> pd.DataFrame:
    """PR #1718's eval-time lever table, one row per (lever, measured stage); ``delta_bpb``
    and ``value_bpb`` are NaN where the PR gives no number."""
    cols = ["lever", "stage", "delta_bpb", "value_bpb", "result", "verdict", "source"]
    df = _csv(root, "pr1718", "levers.csv", cols)
    bad = sorted(set(df["stage"]) - set(STAGES) - {""})
    if bad:
        raise DataError(f"pr1718/levers.csv: unknown stage(s) {bad}")
    for c in ("delta_bpb", "value_bpb"):
        df[c] = [_num(v, f"pr1718/levers.csv {c}", optional=True) for v in df[c]]
    df["stage"] = df["stage"].replace("", np.nan)
    df.insert(0, "paper", "paper:pr1718")
    return df.rename(columns={"source": "source_ref", "paper": "source"})
