"""Type checks shared by every validator: one definition of "an integer" and "a number".

JSON, YAML, TOML and environment variables all reach qlab as Python values, and
``True`` is an ``int`` in Python; these predicates say what qlab accepts as a count or a
finite number, so every config, policy and header validator agrees.
"""

from __future__ import annotations

import math
from typing import Any


def is_int(v: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    """An int or float (not a bool) that is neither NaN nor ±Inf."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
