"""Compare our positions with the broker's and list the discrepancies.

Each worker compares only the keys it owns (``owned_keys_predicate(position_key)``): a
broker position whose key belongs to another worker is that worker's to report.

Only the service's own positions are compared: the broker nets positions per (account,
symbol, magic), and a position of another magic number (a manual trade, another robot) is
not ours.  With ``magic`` given, :func:`compare` ignores the broker positions of every other
magic; :func:`foreign_positions` lists them, to be counted and reported, never merged into
ours.

Net volumes are compared (lots, + long / - short, in units of 1e-8 lot); a difference
above ``tolerance`` is a discrepancy.  Average prices are carried for information and for
a correction, not compared: brokers re-average on partial closes, rolls and swaps in their
own ways.  The broker side may list several positions for one account and symbol (a
hedging account reports one per ticket): they are netted, with a volume-weighted average
price per side of the net, and the union of their deal tickets.

A discrepancy carries the tickets of the deals the broker's position is made of
(``broker_deals``): a correction adds them to our position's deal history, so a deal still
on its way to us is recognised as already counted when it arrives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, NamedTuple

from pydantic import Field

from app.models import Model, Position, position_key, utcnow
from tables.fills import to_lots, to_units

#: Default tolerance on net volumes, lots (the smallest lot step is 0.01).
DEFAULT_TOLERANCE = 1e-6


class BrokerPosition(NamedTuple):
    """One broker position.  A plain ``(account, symbol, net_volume, avg_price)`` tuple is one
    too (magic 0, no ticket, no deals), and so is anything with those attributes, e.g.
    :class:`app.mt5.contract.BrokerPositionModel` (see :func:`as_broker_position`)."""

    account: str
    symbol: str
    net_volume: float  # lots, + long / - short
    avg_price: float | None = None
    magic: int = 0
    ticket: int = 0
    deals: tuple[int, ...] = ()  # tickets of the deals that made the position since it opened


def as_broker_position(item: Any) -> BrokerPosition:
    """A :class:`BrokerPosition` from a tuple or a model with the same attribute names."""
    if isinstance(item, BrokerPosition):
        return item
    if isinstance(item, tuple):
        b = BrokerPosition(*item)
    else:
        b = BrokerPosition(
            item.account, item.symbol, item.net_volume, getattr(item, "avg_price", None),
            getattr(item, "magic", 0) or 0, getattr(item, "ticket", 0) or 0, getattr(item, "deals", ()) or (),
        )
    return b._replace(deals=tuple(int(d) for d in b.deals))


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
    #: Tickets of the deals the broker's position is made of (empty when it holds nothing).
    broker_deals: list[int] = Field(default_factory=list)
    #: The broker's position ticket (of the largest leg on the side of the net; None: flat).
    broker_ticket: int | None = None
    detected_at: datetime

    @property
    def key(self) -> str:
        return position_key(self.account, self.symbol)


@dataclass
class NetBrokerPosition:
    """The broker's legs of one account and symbol, netted."""

    account: str
    symbol: str
    units: int  # net volume in units of 1e-8 lot
    avg_price: float | None  # VWAP of the legs on the side of the net; None when flat
    ticket: int | None = None  # of the largest leg on the side of the net
    deals: list[int] = field(default_factory=list)  # of every leg, in order, each once


def _net(broker: Iterable[Any]) -> dict[str, NetBrokerPosition]:
    legs: dict[str, list[BrokerPosition]] = {}
    for item in broker:
        b = as_broker_position(item)
        if not math.isfinite(b.net_volume):
            raise ValueError(f"broker position {b.account}:{b.symbol}: net volume must be finite, got {b.net_volume}")
        legs.setdefault(position_key(b.account, b.symbol), []).append(b)
    out: dict[str, NetBrokerPosition] = {}
    for key, items in legs.items():
        units = [(to_units(b.net_volume), b) for b in items]
        net = sum(u for u, _ in units)
        side = [(abs(u), b) for u, b in units if u != 0 and (u > 0) == (net > 0)] if net else []
        priced = [(u, b.avg_price) for u, b in side if b.avg_price is not None]
        total = sum(u for u, _ in priced)
        avg = sum(u * p for u, p in priced) / total if total else None  # type: ignore[operator]
        tickets = [(u, b.ticket) for u, b in side if b.ticket]
        ticket = max(tickets, key=lambda t: t[0])[1] if tickets else None
        deals = list(dict.fromkeys(d for _, b in units for d in b.deals))
        out[key] = NetBrokerPosition(items[0].account, items[0].symbol, net, avg, ticket, deals)
    return out


def net_broker_positions(broker: Iterable[Any]) -> dict[str, tuple[str, str, int, float | None]]:
    """Broker positions netted per key: ``{key: (account, symbol, net units, avg price)}``.

    The average price is the VWAP of the legs on the side of the net (None when flat or
    when those legs have no price).
    """
    return {k: (n.account, n.symbol, n.units, n.avg_price) for k, n in _net(broker).items()}


def _ours(broker: Iterable[Any], magic: int | None) -> tuple[list[BrokerPosition], list[BrokerPosition]]:
    """(the positions of ``magic``, the others); every position is ours when magic is None."""
    mine: list[BrokerPosition] = []
    others: list[BrokerPosition] = []
    for item in broker:
        b = as_broker_position(item)
        (mine if magic is None or b.magic == magic else others).append(b)
    return mine, others


def foreign_positions(
    broker: Iterable[Any],
    magic: int,
    owned_keys_predicate: Callable[[str], bool] = lambda _k: True,
) -> list[BrokerPosition]:
    """The broker positions of other magic numbers than ``magic`` (of the owned keys):
    not ours, never compared nor corrected; to be counted and reported."""
    _, others = _ours(broker, magic)
    return [b for b in others if owned_keys_predicate(position_key(b.account, b.symbol))]


def compare(
    ours: Mapping[str, Position],
    broker: Iterable[Any],
    owned_keys_predicate: Callable[[str], bool],
    tolerance: float = DEFAULT_TOLERANCE,
    *,
    now: datetime | None = None,
    magic: int | None = None,
) -> list[Discrepancy]:
    """Discrepancies between ``ours`` (key -> Position) and ``broker`` for the owned keys,
    sorted by position key.  ``broker`` holds :class:`BrokerPosition` s, plain tuples or
    models of the same fields.  ``magic``: compare the broker positions of that magic number
    only (None: every position is ours).  ``now`` stamps ``detected_at`` (default: the clock)."""
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a non-negative number of lots, got {tolerance}")
    at = now or utcnow()
    mine_broker, _ = _ours(broker, magic)
    brokers = _net(mine_broker)
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
        b_units = b.units if b is not None else 0
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
        account, symbol = (p.account, p.symbol) if p is not None else (b.account, b.symbol)  # type: ignore[union-attr]
        out.append(
            Discrepancy(
                account=account,
                symbol=symbol,
                kind=kind,
                ours_net_volume=to_lots(o_units),
                broker_net_volume=to_lots(b_units),
                difference=to_lots(diff),
                ours_avg_price=p.avg_open_price if p is not None and o_units else None,
                broker_avg_price=b.avg_price if b is not None and b_units else None,
                broker_deals=list(b.deals) if b is not None else [],
                broker_ticket=b.ticket if b is not None and b_units else None,
                detected_at=at,
            )
        )
    return out
