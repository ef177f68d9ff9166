"""Collect matrix cells into tidy DataFrames, in the papers' schema (:mod:`qlab.analysis.papers`).

Three tables, ``source = "qlab"`` on every row so they concatenate with the paper's
published rows (``pipeline_attribution()``, ``reg_quant_matrix()``, ``canonical_metrics()``):

* ``pipeline`` — one row per (cell, weight policy): base, variant, regs, lambda, lambdas,
  seed, policy, pre_quant / quantized / sliding / TTT bpb, quant tax, sliding and TTT
  gains (mBPB, computed by :func:`qlab.analysis.papers.stage_attribution`), final bpb,
  predicted artifact bytes, training steps and seconds;
* ``hidden`` — one row per (cell, hidden-state scheme): l2_distortion, rel_l2_distortion,
  cos_shift, isoscore_post, mean_abs_cos_post, eff_rank_post;
* ``geometry`` — one row per cell: geometry of the unquantized final hidden states.

:func:`merge_results` writes them as ``results.csv``, ``hidden.csv``, ``geometry.csv``
and one ``results.json`` (CSV + JSON only; no parquet dependency).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from qlab.analysis.matrix.runner import CELLS_DIR, RESULT_FORMAT
from qlab.analysis.papers import stage_attribution
from qlab.checks import parse_json
from qlab.errors import DataError
from qlab.io.atomic import atomic_write_json, atomic_write_text

__all__ = ["MatrixResults", "KEY_COLUMNS", "read_cell", "collect_results", "merge_results"]

KEY_COLUMNS = ["source", "base", "variant", "regs", "lambda", "lambdas", "seed", "cell_id"]
_STAGES = {  # measurement → stage name as records log it (papers.STAGES)
    "pre_quant_bpb": "pre-quantization post-ema",
    "quantized_bpb": "quantized",
    "sliding_bpb": "quantized_sliding_window",
    "ttt_bpb": "legal_ttt",
}
_CELL_KEYS = (
    "cell_id",
    "base",
    "variant",
    "regs",
    "lambda",
    "lambdas",
    "seed",
    "pipeline",
    "hidden",
    "geometry",
)
_PIPELINE_KEYS = ("policy", *_STAGES, "artifact_bytes")
_HIDDEN_KEYS = ("scheme", "l2_distortion", "cos_shift", "eff_rank_post")


@dataclass
class MatrixResults:
    pipeline: pd.DataFrame
    hidden: pd.DataFrame
    geometry: pd.DataFrame

    @property
    def control(self) -> str:
        """The variant trained without regularizers (empty ``regs``)."""
        names = self.pipeline.loc[self.pipeline["regs"] == "", "variant"].unique()
        if len(names) != 1:
            raise DataError(
                f"matrix results: expected one no-regularizer control variant, found {list(names)}"
            )
        return str(names[0])


def read_cell(path: str | Path) -> dict[str, Any]:
    """One cell's result JSON, checked for the keys the tables need."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"matrix cell file {path} is unreadable or not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"matrix cell file {path}: expected a JSON object")
    missing = [k for k in _CELL_KEYS if k not in data]
    if missing or data.get("format") != RESULT_FORMAT:
        raise DataError(
            f"matrix cell file {path}: missing key(s) {missing} or unknown format {data.get('format')!r}"
        )
    for i, row in enumerate(data["pipeline"]):
        if not isinstance(row, dict) or any(k not in row for k in _PIPELINE_KEYS):
            raise DataError(f"matrix cell file {path}: pipeline[{i}] lacks one of {_PIPELINE_KEYS}")
    for i, row in enumerate(data["hidden"]):
        if not isinstance(row, dict) or any(k not in row for k in _HIDDEN_KEYS):
            raise DataError(f"matrix cell file {path}: hidden[{i}] lacks one of {_HIDDEN_KEYS}")
    if path.stem != data["cell_id"]:
        raise DataError(f"matrix cell file {path} holds cell {data['cell_id']!r}")
    return data


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def _keys(cell: dict[str, Any]) -> dict[str, Any]:
    return {"source": "qlab", **{k: cell[k] for k in KEY_COLUMNS[1:]}, "lambda": _num(cell["lambda"])}


def _pipeline(cells: list[dict[str, Any]]) -> pd.DataFrame:
    rows, long = [], []
    for cell in cells:
        train = cell.get("train_result", {})
        for p in cell["pipeline"]:
            key = f"{cell['cell_id']}|{p['policy']}"
            rows.append(
                {
                    **_keys(cell),
                    "policy": p["policy"],
                    "_key": key,
                    "artifact_bytes": p["artifact_bytes"],
                    "steps": train.get("steps"),
                    "train_seconds": train.get("train_seconds"),
                }
            )
            long += [
                {"variant": key, "stage": s, "bpb": _num(p[m])}
                for m, s in _STAGES.items()
                if p[m] is not None
            ]
    if not rows:
        return pd.DataFrame(columns=[*KEY_COLUMNS, "policy"])
    wide = stage_attribution(pd.DataFrame(long)).rename(columns={"variant": "_key"})
    df = pd.DataFrame(rows).merge(wide, on="_key", how="left").drop(columns="_key")
    front = [*KEY_COLUMNS, "policy"]
    return df[front + [c for c in df.columns if c not in front]]


def _hidden(cells: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [
        {**_keys(c), **{k: (_num(v) if k != "scheme" else v) for k, v in h.items()}}
        for c in cells
        for h in c["hidden"]
    ]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=[*KEY_COLUMNS, "scheme"])


def _geometry(cells: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [{**_keys(c), **{k: _num(v) for k, v in c["geometry"].items()}} for c in cells]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=KEY_COLUMNS)


def collect_results(*outs: str | Path) -> MatrixResults:
    """Read every ``OUT/cells/*.json`` of one grid — all shards, from one folder or from the
    folders of shards that ran on different machines — into the three tables. The folders
    must hold the same grid spec; a cell found twice must have the same result."""
    if not outs:
        raise DataError("collect_results: no folder given")
    cells: dict[str, dict[str, Any]] = {}
    for out in outs:
        folder = Path(out) / CELLS_DIR
        paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
        if not paths:
            raise DataError(f"{folder} holds no cell results; run `qlab matrix run SPEC --out {out}` first")
        _same_grid(Path(outs[0]), Path(out))
        for p in paths:
            cell = read_cell(p)
            seen = cells.setdefault(cell["cell_id"], cell)
            if _measured(seen) != _measured(cell):
                raise DataError(f"cell {cell['cell_id']} differs between the folders (found again in {p})")
    return _tables(list(cells.values()))


def _measured(cell: dict[str, Any]) -> dict[str, Any]:
    """A cell's results without what a rerun changes (its timings and cost)."""
    return {k: v for k, v in cell.items() if k not in ("cost", "train_result")}


def _same_grid(first: Path, other: Path) -> None:
    specs = [parse_json((d / "spec.json").read_bytes(), str(d / "spec.json"), DataError)
             if (d / "spec.json").is_file() else None for d in (first, other)]  # fmt: skip
    if specs[0] is not None and specs[1] is not None and specs[0] != specs[1]:
        raise DataError(f"{first} and {other} hold different grid specs: their cells do not merge")


def _tables(cells: list[dict[str, Any]]) -> MatrixResults:
    sort = ["base", "variant", "seed"]
    pipeline = _pipeline(cells).sort_values([*sort, "policy"], kind="stable").reset_index(drop=True)
    hidden = _hidden(cells).sort_values(sort, kind="stable").reset_index(drop=True)
    geometry = _geometry(cells).sort_values(sort, kind="stable").reset_index(drop=True)
    return MatrixResults(pipeline, hidden, geometry)


def merge_results(*dirs: str | Path, out: str | Path | None = None) -> MatrixResults:
    """:func:`collect_results` of ``dirs``, then write results.csv / hidden.csv / geometry.csv /
    results.json into ``out`` (default: the first folder)."""
    out = Path(out if out is not None else dirs[0])
    res = collect_results(*dirs)
    tables = {"results": res.pipeline, "hidden": res.hidden, "geometry": res.geometry}
    for name, df in tables.items():
        atomic_write_text(out / f"{name}.csv", df.to_csv(index=False))
    payload = {name: json.loads(df.to_json(orient="records")) for name, df in tables.items()}
    atomic_write_json(out / "results.json", payload)
    return res
