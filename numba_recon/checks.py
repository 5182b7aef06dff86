"""Small value checks every layer shares, so that one rule has one spelling.

A check written ``not (finite and in range)`` matters: NaN compares False with everything and
infinity passes ``> 0``, so a plain ``value <= 0`` would let both through.
"""

from __future__ import annotations

import math
from typing import Any


def finite_above(value: Any, lower: float = 0.0) -> bool:
    """True if ``value`` is a finite number greater than ``lower`` (anything else, text included,
    is False)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(x) and x > lower


def finite_at_least(value: Any, lower: float = 0.0) -> bool:
    """True if ``value`` is a finite number ``>= lower``."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(x) and x >= lower


__all__ = ["finite_above", "finite_at_least"]
