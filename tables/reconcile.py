"""Compare our positions with the broker's and list the discrepancies.

Each worker compares only the keys it owns (``owned_keys_predicate(position_key)``): a
broker position whose key belongs to another worker is that worker's to report.

Net volumes are compared (lots, + long / - short, in units of 1e-8 lot); a difference
above ``tolerance`` is a discrepancy.  Average prices are carried for information and for
a correction, not compared: brokers re-average on partial closes, rolls and swaps in their
own ways.  The broker side may list several positions for one account and symbol (a
hedging account reports one per ticket): they are netted, with a volume-weighted average
price per side of the net.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from enum import Enum

from app.models import Model, Position, position_key, utcnow
from tables.fills import to_lots, to_units

#: Default tolerance on net volumes, lots (the smallest lot step is 0.01).
DEFAULT_TOLERANCE = 1e-6

BrokerPosition = tuple[str, str, float, float | None]  # (account, symbol, net_volume, avg_price)


class DiscrepancyKind(str, Enum):
    #: Both hold the symbol, with different net volumes.
    MISMATCH = "mismatch"
    #: The broker holds a position we do not (or we hold it flat).
    MISSING_OURS = "missing_ours"
    #: We hold a non-flat position the broker does not have.
    MISSING_BROKER = "missing_broker"


class Discrepancy(Model):
    """A difference between our net position and the broker's (``positions.discrepancies``)."""

    account: str
    symbol: str
    kind: DiscrepancyKind
    ours_net_volume: float  # 0.0 when we hold nothing
    broker_net_volume: float  # 0.0 when the broker holds nothing
    difference: float  # broker - ours: what a correction adds to ours
    ours_avg_price: float | None = None
    broker_avg_price: float | None = None
    detected_at: datetime

    @property
    def key(self) -> str:
        return position_key(self.account, self.symbol)


def net_broker_positions(broker: Iterable[BrokerPosition]) -> dict[str, tuple[str, str, int, float | None]]:
    """Broker positions netted per key: ``{key: (account, symbol, net units, avg price)}``.

    The average price is the VWAP of the legs on the side of the net (None when flat or
    when those legs have no price).
    """
    legs: dict[str, list[tuple[int, float | None]]] = {}
    names: dict[str, tuple[str, str]] = {}
    for account, symbol, net_volume, avg_price in broker:
        if not math.isfinite(net_volume):
            raise ValueError(f"broker position {account}:{symbol}: net volume must be finite, got {net_volume}")
        key = position_key(account, symbol)
        names[key] = (account, symbol)
        legs.setdefault(key, []).append((to_units(net_volume), avg_price))
    out: dict[str, tuple[str, str, int, float | None]] = {}
    for key, items in legs.items():
        net = sum(u for u, _ in items)
        same_side = [(abs(u), p) for u, p in items if u != 0 and (u > 0) == (net > 0) and p is not None]
        units = sum(u for u, _ in same_side)
        avg = sum(u * p for u, p in same_side) / units if net != 0 and units else None
        out[key] = (*names[key], net, avg)
    return out


def compare(
    ours: Mapping[str, Position],
    broker: Iterable[BrokerPosition],
    owned_keys_predicate: Callable[[str], bool],
    tolerance: float = DEFAULT_TOLERANCE,
    *,
    now: datetime | None = None,
) -> list[Discrepancy]:
    """Discrepancies between ``ours`` (key -> Position) and ``broker`` for the owned keys,
    sorted by position key.  ``now`` stamps ``detected_at`` (default: the clock)."""
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a non-negative number of lots, got {tolerance}")
    at = now or utcnow()
    brokers = net_broker_positions(broker)
    mine: dict[str, Position] = {}
    for p in ours.values():
        k = position_key(p.account, p.symbol)
        if owned_keys_predicate(k):
            mine[k] = p
    tol_units = to_units(tolerance)
    out: list[Discrepancy] = []
    for k in sorted(set(mine) | {k for k in brokers if owned_keys_predicate(k)}):
        p = mine.get(k)
        b = brokers.get(k)
        o_units = to_units(p.net_volume) if p is not None else 0
        b_units = b[2] if b is not None else 0
        diff = b_units - o_units
        if abs(diff) <= tol_units:
            continue
        o_flat, b_flat = abs(o_units) <= tol_units, abs(b_units) <= tol_units
        if o_flat == b_flat:  # both non-flat (or both within tolerance of flat)
            kind = DiscrepancyKind.MISMATCH
        elif o_flat:
            kind = DiscrepancyKind.MISSING_OURS
        else:
            kind = DiscrepancyKind.MISSING_BROKER
        account, symbol = (p.account, p.symbol) if p is not None else (b[0], b[1])  # type: ignore[index]
        out.append(
            Discrepancy(
                account=account,
                symbol=symbol,
                kind=kind,
                ours_net_volume=to_lots(o_units),
                broker_net_volume=to_lots(b_units),
                difference=to_lots(diff),
                ours_avg_price=p.avg_open_price if p is not None and o_units else None,
                broker_avg_price=b[3] if b is not None and b_units else None,
                detected_at=at,
            )
        )
    return out
