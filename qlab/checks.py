"""Type checks shared by every validator: one definition of "an integer", "a number"
and "a finite tensor".

JSON, YAML, TOML and environment variables all reach qlab as Python values, and
``True`` is an ``int`` in Python; these predicates say what qlab accepts as a count or a
finite number, so every config, policy and header validator agrees.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch


def is_int(v: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    """An int or float (not a bool) that is neither NaN nor ±Inf."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±Inf in ``t`` (true of any non-float tensor).

    One pass and no mask (``isfinite(t).all()`` is ~15x slower): min and max propagate NaN
    and show ±Inf. On a strided view such as LAPACK's column-major factors min/max is 10x
    slower, so there a sum goes first — a NaN or ±Inf entry makes it non-finite — and
    min/max decides only when the sum is not finite (a bad entry, or an overflow).
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if not t.is_contiguous() and math.isfinite(float(t.sum())):
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def parse_json(data: str | bytes, where: str, error: type[Exception]) -> Any:
    """JSON text (or UTF-8 bytes) parsed, or ``error`` naming ``where``: invalid UTF-8,
    invalid JSON and nesting too deep for the parser (RecursionError) alike — the one
    place every header, config and manifest reader of qlab parses JSON."""
    try:
        return json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON ({exc})") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply") from None
