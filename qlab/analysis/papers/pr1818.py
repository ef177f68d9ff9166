"""PR #1818 (post-quantization damage): its per-seed stages and summary."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from qlab.analysis.papers._files import _csv, _num
from qlab.errors import DataError
from qlab.eval.stages import STAGES

_PR1818_STAGES = {"pre-quant": STAGES[0], "post-quant": "quantized", "post-TTT": "legal_ttt"}


def _pr1818_table(root: str | Path | None) -> pd.DataFrame:
    df = _csv(root, "pr1818", "seed_table.csv", ["row", "mean", "sigma", "source"])
    if [r for r in df["row"]] != [*_PR1818_STAGES, "artifact bytes"]:
        raise DataError(f"pr1818/seed_table.csv rows {list(df['row'])} are not the PR's four rows")
    return df.set_index("row")


def pr1818_seeds(root: str | Path | None = None) -> pd.DataFrame:
    """PR #1818's per-seed stage table: one row per (seed, stage) with bpb and the seed's
    artifact bytes. Stages: pre-quant, quantized, and ``legal_ttt`` (its sliding TTT)."""
    df = _pr1818_table(root)
    seeds = [c for c in df.columns if c.startswith("seed ")]
    if not seeds:
        raise DataError("pr1818/seed_table.csv has no 'seed N' columns")
    rows = []
    for col in seeds:
        size = int(_num(df.loc["artifact bytes", col], f"pr1818/seed_table.csv {col} artifact bytes"))
        for label, stage in _PR1818_STAGES.items():
            rows.append(
                {
                    "source": "paper:pr1818",
                    "seed": int(col.split()[1]),
                    "stage": stage,
                    "bpb": _num(df.loc[label, col], f"pr1818/seed_table.csv {col} {label}"),
                    "artifact_bytes": size,
                }
            )
    return pd.DataFrame(rows)


def pr1818_summary(root: str | Path | None = None) -> pd.DataFrame:
    """The mean and σ columns PR #1818 printed (stage, mean_bpb, sigma_bpb)."""
    df = _pr1818_table(root)
    return pd.DataFrame(
        [
            {
                "stage": stage,
                "mean_bpb": _num(df.loc[label, "mean"], f"pr1818 {label} mean"),
                "sigma_bpb": _num(df.loc[label, "sigma"], f"pr1818 {label} sigma"),
            }
            for label, stage in _PR1818_STAGES.items()
        ]
    )


def pr1818_baseline_bpb(root: str | Path | None = None) -> float:
    """The naive-baseline bpb line PR #1818's figures draw (1.2244)."""
    df = _csv(root, "pr1818", "constants.csv", ["name", "value"]).set_index("name")
    if "naive_baseline_bpb" not in df.index:
        raise DataError("pr1818/constants.csv lacks naive_baseline_bpb")
    return _num(df.loc["naive_baseline_bpb", "value"], "pr1818/constants.csv naive_baseline_bpb")
