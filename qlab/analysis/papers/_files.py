"""Where the papers' data live and the checked readers every paper module uses."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from qlab.errors import DataError


# ---------------------------------------------------------------- file access helpers
def papers_dir(root: str | Path | None = None) -> Path:
    """Directory holding ``pr<N>/`` folders (default: the copy shipped with qlab)."""
    path = Path(root) if root is not None else Path(__file__).resolve().parents[2] / "resources" / "papers"
    if not path.is_dir():
        raise DataError(f"paper data directory {path} does not exist")
    return path


def _file(root: str | Path | None, pr: str, name: str) -> Path:
    path = papers_dir(root) / pr / name
    if not path.is_file():
        raise DataError(f"paper data file {path} is missing")
    return path


def _json(root: str | Path | None, pr: str, name: str) -> Any:
    path = _file(root, pr, name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc


def _csv(root: str | Path | None, pr: str, name: str, columns: Iterable[str]) -> pd.DataFrame:
    path = _file(root, pr, name)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable CSV: {exc}") from exc
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {missing}; has {list(df.columns)}")
    return df


def _mapping(obj: Any, keys: Iterable[str], where: str) -> Mapping:
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected an object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing}")
    return obj


def _num(value: Any, where: str, *, optional: bool = False) -> float:
    """A finite float (``None``/empty → NaN when ``optional``)."""
    if optional and (value is None or value == ""):
        return math.nan
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(x):
        raise DataError(f"{where}: expected a finite number, got {value!r}")
    return x
