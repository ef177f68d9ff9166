"""Run metrics as JSON Lines: one JSON object per line (step, train_loss, lr, …).

Appends are line-buffered and flushed, so a killed run loses at most its last, partial
line; readers skip such a torn final line. On resume the log is cut back to the
checkpoint's step (atomically) so the steps that will be redone are not logged twice.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from qlab.errors import CheckpointError
from qlab.io.atomic import atomic_write_text

METRICS_NAME = "metrics.jsonl"


def _clean(value: Any) -> Any:
    # JSON has no NaN/Inf; write them as null rather than produce an unreadable line.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):
        return _clean(value.item())
    return value


class RunLog:
    """Appends metric records to ``path`` (created on first write)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps({k: _clean(v) for k, v in record.items()}, sort_keys=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def truncate_after(self, step: int) -> None:
        """Drop records with ``step`` greater than ``step`` (and any torn line)."""
        if not self.path.exists():
            return
        kept = [r for r in read_records(self.path) if int(r.get("step", 0)) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics file; a torn *last* line is skipped, a bad middle line is an error."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: metrics file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break
            raise CheckpointError(f"{path}:{i + 1}: not a JSON line ({exc})") from exc
        if not isinstance(rec, dict):
            raise CheckpointError(f"{path}:{i + 1}: expected a JSON object")
        records.append(rec)
    return records


def read_runlog(path: str | os.PathLike) -> pd.DataFrame:
    """Metrics of a run (a run directory or a metrics.jsonl path) as a DataFrame, one row per record."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_NAME
    return pd.DataFrame.from_records(read_records(path))
