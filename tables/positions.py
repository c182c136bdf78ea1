"""Net positions per account and symbol: apply deals, realize PnL, correct to the broker.

Average-cost accounting of one net position (an MT5 netting view):

* ``net_volume`` in lots, + long / - short, summed in integer units of 1e-8 lot;
* ``avg_open_price`` is the volume-weighted price of the open net volume, None when flat;
* a deal on the same side increases the position and re-averages the price;
* a deal on the other side closes (part of) it at the deal price against the average
  price and realizes ``(close - avg) x lots x direction`` (profit positive);
* a deal larger than the position reverses it: the whole position is closed at the deal
  price, and the remainder opens on the other side at the deal price;
* every deal is applied in full, whatever its ``entry``: deals reach the positions agent
  from every partition of the orders agent (an exit through the partition of the order that
  opened the position, a later fill through its own), so they can arrive in any order, and
  only a plain sum of signed volumes gives the same net position in every order.

PnL, two figures:

* ``realized_pnl`` is the **sum of the broker's profit of the deals** (``Fill.profit``,
  carried by the execution), in the account currency ``currency``: swaps, conversion of
  the quote currency and the broker's own rounding included, as the broker booked it.
  Deals in another currency than the position's PnL so far are refused (ValueError).
* ``realized_pnl_price`` is our own average-cost figure in price terms (price difference x
  lots), for checking the broker's and for symbols whose quote currency is not the account's.

``ticket`` is the broker's position ticket of the last deal that named one.

Deals are deduplicated by ticket: the last :data:`MAX_DEALS` tickets applied are kept in
``Position.deals``; a repeated ticket changes nothing (replays after a crash re-deliver at
most a commit interval of deals, far fewer than that).  A reconciliation correction adds the
tickets of the deals the broker's position is made of (:func:`correct_position`), so a deal
still on its way to us when the correction was made is a duplicate when it arrives: its
volume is in the broker's figure already.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from app.models import Fill, Position, Side
from tables.fills import to_lots, to_units
from tables.symbols import SymbolTable

#: How many recent deal tickets a position remembers for deduplication.
MAX_DEALS = 1_000
#: Rounding of realized PnL: price terms, and quote-currency amounts.
PNL_PRICE_DECIMALS = 10
PNL_DECIMALS = 6


class FillLike(Protocol):
    """What a position needs of a deal: :class:`app.models.Execution` and
    :class:`PositionFill` both fit."""

    @property
    def account(self) -> str: ...
    @property
    def symbol(self) -> str: ...
    @property
    def side(self) -> Side: ...
    @property
    def price(self) -> float: ...
    @property
    def volume(self) -> float: ...
    @property
    def deal(self) -> int: ...
    @property
    def entry(self) -> str: ...  # "in" | "out" | "inout"
    @property
    def position(self) -> int | None: ...  # the broker's position ticket
    @property
    def profit(self) -> float: ...  # the broker's profit of the deal, in ``currency``
    @property
    def currency(self) -> str: ...


@dataclass(frozen=True, slots=True)
class PositionFill:
    """A deal for a position, e.g. from a broker :class:`~app.models.Fill`."""

    account: str
    symbol: str
    side: Side
    price: float
    volume: float
    deal: int
    time: datetime | None = None
    profit: float = 0.0
    currency: str = "USD"
    position: int | None = None
    entry: str = "in"

    @classmethod
    def from_fill(cls, fill: Fill, account: str | None = None) -> "PositionFill":
        """``account``: the fill's own (default), or e.g. its order's."""
        return cls(
            account or fill.account, fill.symbol, fill.side, fill.price, fill.volume, fill.deal, fill.time,
            fill.profit, fill.currency, fill.position, fill.entry,
        )


@dataclass(frozen=True, slots=True)
class PositionResult:
    """The position after a deal, and what the deal did."""

    position: Position
    is_duplicate: bool = False
    #: Lots closed against the previous position.
    closed_volume: float = 0.0
    #: Lots opened or added on the resulting side.
    opened_volume: float = 0.0
    #: This deal's realized PnL: our price terms, and the broker's profit (``currency``).
    realized_pnl_price: float = 0.0
    realized_pnl: float = 0.0
    #: The deal flipped the position from long to short or back.
    reversed: bool = False


def _sign(units: int) -> int:
    return (units > 0) - (units < 0)


def apply_to_position(
    position: Position | None,
    fill: FillLike,
    symbols: SymbolTable,
    now: datetime,
    *,
    max_deals: int = MAX_DEALS,
) -> PositionResult:
    """``position`` (None: flat, new) after ``fill``; a deal already applied changes nothing."""
    side = Side(fill.side)
    symbols[fill.symbol]  # an unknown symbol: UnknownSymbol
    if position is None:
        position = Position(account=fill.account, symbol=fill.symbol, updated_at=now)
    elif (position.account, position.symbol) != (fill.account, fill.symbol):
        raise ValueError(
            f"deal {fill.deal} for {fill.account}:{fill.symbol} applied to position {position.key}"
        )
    if fill.deal in position.deals:
        return PositionResult(position, is_duplicate=True)
    if fill.deal in position.corrected_deals:
        return _arrived_after_correction(position, fill, now, max_deals)
    if not (math.isfinite(fill.price) and fill.price > 0):
        raise ValueError(f"deal {fill.deal}: price must be positive, got {fill.price}")
    qty = to_units(fill.volume)
    if qty <= 0:
        raise ValueError(f"deal {fill.deal}: volume {fill.volume} is not a positive number of lots")
    if max_deals < 1:
        raise ValueError("max_deals must be at least 1")
    profit = fill.profit
    if not math.isfinite(profit):
        raise ValueError(f"deal {fill.deal}: profit must be finite, got {profit}")
    if fill.currency != position.currency and position.realized_pnl != 0:
        raise ValueError(
            f"deal {fill.deal}: profit in {fill.currency}, but position {position.key} has realized PnL "
            f"in {position.currency}: one position's PnL is in one currency"
        )

    net = to_units(position.net_volume)
    avg = position.avg_open_price
    if net != 0 and avg is None:
        raise ValueError(f"position {position.key} has volume {position.net_volume} but no average price")
    delta = side.sign * qty

    closed = opened = 0
    pnl_price = 0.0
    reversed_ = False
    new_net = net + delta
    new_avg: float | None
    if qty == 0:  # an exit of nothing we hold
        new_avg = avg
    elif net == 0:
        new_avg = fill.price
        opened = qty
    elif _sign(net) == _sign(delta):
        new_avg = (avg * abs(net) + fill.price * qty) / abs(new_net)  # type: ignore[operator]
        opened = qty
    else:
        closed = min(abs(net), qty)
        pnl_price = (fill.price - avg) * to_lots(closed) * _sign(net)  # type: ignore[operator]
        if new_net == 0:
            new_avg = None
        elif _sign(new_net) == _sign(net):
            new_avg = avg
        else:
            new_avg = fill.price
            opened = abs(new_net)
            reversed_ = True

    updated = position.model_copy(
        update={
            "net_volume": to_lots(new_net),
            "avg_open_price": new_avg,
            "realized_pnl_price": round(position.realized_pnl_price + pnl_price, PNL_PRICE_DECIMALS) + 0.0,
            "realized_pnl": round(position.realized_pnl + profit, PNL_DECIMALS) + 0.0,
            "currency": fill.currency,
            "ticket": fill.position if fill.position is not None else position.ticket,
            "fills": position.fills + 1,
            "last_deal": fill.deal,
            "deals": (*position.deals, fill.deal)[-max_deals:],
            "version": position.version + 1,
            "updated_at": now,
        }
    )
    return PositionResult(
        updated,
        closed_volume=to_lots(closed),
        opened_volume=to_lots(opened),
        realized_pnl_price=round(pnl_price, PNL_PRICE_DECIMALS) + 0.0,
        realized_pnl=round(profit, PNL_DECIMALS) + 0.0,
        reversed=reversed_,
    )


def unrealized_pnl_price(position: Position | None, mark_price: float) -> float:
    """Open PnL at ``mark_price`` in price terms: ``(mark - avg) x net_volume``."""
    if position is None or to_units(position.net_volume) == 0 or position.avg_open_price is None:
        return 0.0
    return (mark_price - position.avg_open_price) * position.net_volume


def unrealized_pnl(position: Position | None, mark_price: float, symbols: SymbolTable) -> float:
    """Open PnL at ``mark_price`` in the symbol's quote currency."""
    if position is None:
        return 0.0
    return unrealized_pnl_price(position, mark_price) * symbols[position.symbol].contract_size


def _arrived_after_correction(position: Position, fill: FillLike, now: datetime, max_deals: int) -> PositionResult:
    """A deal a correction already counted: its volume is in the position, its profit not."""
    profit = getattr(fill, "profit", 0.0)
    if not math.isfinite(profit):
        raise ValueError(f"deal {fill.deal}: profit must be finite, got {profit}")
    updated = position.model_copy(update={
        "realized_pnl": round(position.realized_pnl + profit, PNL_DECIMALS),
        "currency": getattr(fill, "currency", position.currency) if position.realized_pnl == 0 else position.currency,
        "corrected_deals": tuple(d for d in position.corrected_deals if d != fill.deal),
        "deals": (*position.deals, fill.deal)[-max_deals:],
        "fills": position.fills + 1,
        "last_deal": fill.deal,
        "ticket": getattr(fill, "position", None) or position.ticket,
        "version": position.version + 1,
        "updated_at": now,
    })
    return PositionResult(updated, realized_pnl=profit)


def correct_position(
    position: Position | None,
    broker_net_volume: float,
    broker_avg_price: float | None,
    now: datetime,
    *,
    account: str | None = None,
    symbol: str | None = None,
    broker_deals: Iterable[int] = (),
    broker_ticket: int | None = None,
    max_deals: int = MAX_DEALS,
) -> Position:
    """The position set to the broker's net volume and average price (a correction).

    ``broker_deals`` are the tickets of the deals the broker's position is made of: those we
    have not applied go to ``Position.corrected_deals`` (in their order; bounded by
    ``max_deals``), so a deal still on its way to us adds only its profit when it arrives,
    not its volume on top of the broker's.  ``broker_ticket``, when given, becomes the
    position's ticket.

    Realized PnL and the fill count are kept: the broker's snapshot says nothing about
    them, and the unexplained difference is not invented as PnL.  For a position we do not
    hold (``position`` None) pass ``account`` and ``symbol``.
    """
    if position is None:
        if not account or not symbol:
            raise ValueError("correcting a position we do not hold needs account and symbol")
        position = Position(account=account, symbol=symbol, updated_at=now)
    elif (account or position.account, symbol or position.symbol) != (position.account, position.symbol):
        raise ValueError(f"correction for {account}:{symbol} applied to position {position.key}")
    if not math.isfinite(broker_net_volume):
        raise ValueError(f"broker net volume must be finite, got {broker_net_volume}")
    net = to_units(broker_net_volume)
    if net != 0 and (broker_avg_price is None or not math.isfinite(broker_avg_price) or broker_avg_price <= 0):
        raise ValueError(f"a non-flat broker position needs a positive average price, got {broker_avg_price}")
    if max_deals < 1:
        raise ValueError("max_deals must be at least 1")
    corrected = list(position.corrected_deals)
    known = set(position.deals) | set(corrected)
    for d in broker_deals:
        d = int(d)
        if d <= 0:
            raise ValueError(f"broker deal tickets are positive, got {d}")
        if d not in known:
            known.add(d)
            corrected.append(d)
    return position.model_copy(
        update={
            "net_volume": to_lots(net),
            "avg_open_price": broker_avg_price if net != 0 else None,
            "corrected_deals": tuple(corrected[-max_deals:]),
            "ticket": broker_ticket or position.ticket,
            "version": position.version + 1,
            "updated_at": now,
        }
    )
