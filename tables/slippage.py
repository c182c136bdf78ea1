"""Slippage in pips, with the service's one sign convention: **positive = adverse**.

A buy filled above, or a sell filled below, its expected price has positive slippage (it
cost us); a fill better than expected has negative slippage.

Values are rounded to 0.1 pip (one point for every built-in symbol), half away from zero,
after removing float noise: ``(1.10030 - 1.10000) / 0.0001`` is ``3.0``, not ``2.99999...``.
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal

from app.models import Side

#: Decimal places of a slippage figure (0.1 pip).
SLIPPAGE_DECIMALS = 1


def round_pips(value: float, ndigits: int = SLIPPAGE_DECIMALS) -> float:
    """``value`` rounded to ``ndigits`` places, half away from zero, float noise removed;
    never ``-0.0``."""
    if not math.isfinite(value):
        raise ValueError(f"not a finite number of pips: {value}")
    # repr of a 9-place rounding drops the noise (2.9999999999996696 -> '3.0') exactly.
    q = Decimal(repr(round(value, 9))).quantize(Decimal(1).scaleb(-ndigits), rounding=ROUND_HALF_UP)
    return float(q) + 0.0


def slippage_pips(side: Side | str, expected_price: float, fill_price: float, pip_size: float) -> float:
    """Slippage of ``fill_price`` against ``expected_price`` in pips; + = adverse for ``side``."""
    side = Side(side)
    if not (math.isfinite(pip_size) and pip_size > 0):
        raise ValueError(f"pip_size must be a positive number, got {pip_size}")
    for name, price in (("expected_price", expected_price), ("fill_price", fill_price)):
        if not (math.isfinite(price) and price > 0):
            raise ValueError(f"{name} must be a positive price, got {price}")
    return round_pips((fill_price - expected_price) * side.sign / pip_size)


def is_alert(slippage: float, threshold: float) -> bool:
    """True when ``|slippage| > threshold`` (pips).

    Magnitude, not only adverse slippage, as in the service spec (``abs(slippage) > 5``): a
    large *favourable* slippage is just as much a sign of a stale or wrong expected price,
    a gap or a broker problem, and is worth a look.  Strictly greater: a 5.0-pip slip does
    not alert at a 5-pip threshold.
    """
    if not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be a non-negative number of pips, got {threshold}")
    return abs(slippage) > threshold
