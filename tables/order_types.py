"""Order types: which are enabled, and how an order maps onto an MT5 trade request.

Pure, no I/O.  The numbers are MQL5's (``ORDER_TYPE_*``, ``TRADE_ACTION_*``,
``ORDER_FILLING_*``), the same as in :mod:`app.mt5.contract`.

* Order type: the signal's ``order_type``, else the operational ``default_order_type``.
  Limit orders need ``enable_limit_orders``; stop and stop-limit orders need
  ``enable_stop_orders``.  A disabled type is rejected (:func:`check_enabled`).
* MT5 has no client order id: an order is found by ``(account, magic, comment)``, and the
  comment is our ``order_id`` (at most 31 characters, :func:`comment_for`).
* Prices in the request: market - the expected (entry) price, against which the broker
  applies ``deviation``; limit - the limit price; stop - the trigger price; stop-limit -
  the trigger as ``price`` and the limit as ``stoplimit``.  Prices are rounded to the
  symbol's digits; absent SL/TP are 0.
* ``deviation`` is ``max_slippage_pips`` in points (x10 for 3- and 5-digit quotes), and
  ``type_filling`` is RETURN, so the broker may fill part of an order and keep the rest.
* **The slippage cap** is measured from the signal's entry price, not from the price of the
  latest attempt: after a requote the order is resent at the broker's quote only while that
  quote plus the deviation stays within ``max_slippage_pips`` of the entry
  (:func:`reprice`); beyond it the order ends REJECTED.  A pending order keeps its price.
* **Time in force** of a pending order: GTC, DAY (until 00:00 UTC) or GTD (``expires_at``),
  sent as MT5 ``type_time`` DAY / SPECIFIED where the symbol's broker expires orders
  (``SymbolSpec.broker_expiry``); elsewhere the order goes GTC and the service expires it.
* **Closes** (intent ``close``): a market order on the other side of the position, naming
  its ``position`` ticket so the broker only ever reduces it; no price (no requote), no SL/TP.
"""

from __future__ import annotations

import math
from enum import IntEnum
from typing import Any

from app.config import SAFE_DEFAULTS, OrderDefaults
from datetime import datetime, timedelta, timezone

from app.models import ApprovedSignal, Order, OrderIntent, OrderType, Side, TimeInForce
from tables.symbols import SymbolSpec

#: The service's MT5 magic number: it marks the orders this service sent.
MAGIC = 20_261_124
#: MT5 keeps at most this many characters of an order comment.
MAX_COMMENT = 31


class MT5OrderType(IntEnum):
    """``ORDER_TYPE_*``."""

    BUY = 0
    SELL = 1
    BUY_LIMIT = 2
    SELL_LIMIT = 3
    BUY_STOP = 4
    SELL_STOP = 5
    BUY_STOP_LIMIT = 6
    SELL_STOP_LIMIT = 7


class MT5Action(IntEnum):
    """``TRADE_ACTION_*`` (the two a new order uses)."""

    DEAL = 1
    PENDING = 5


class MT5Filling(IntEnum):
    """``ORDER_FILLING_*``."""

    FOK = 0
    IOC = 1
    RETURN = 2


ORDER_TYPE_BUY = MT5OrderType.BUY
ORDER_TYPE_SELL = MT5OrderType.SELL
ORDER_TYPE_BUY_LIMIT = MT5OrderType.BUY_LIMIT
ORDER_TYPE_SELL_LIMIT = MT5OrderType.SELL_LIMIT
ORDER_TYPE_BUY_STOP = MT5OrderType.BUY_STOP
ORDER_TYPE_SELL_STOP = MT5OrderType.SELL_STOP
ORDER_TYPE_BUY_STOP_LIMIT = MT5OrderType.BUY_STOP_LIMIT
ORDER_TYPE_SELL_STOP_LIMIT = MT5OrderType.SELL_STOP_LIMIT
TRADE_ACTION_DEAL = MT5Action.DEAL
TRADE_ACTION_PENDING = MT5Action.PENDING
ORDER_FILLING_FOK = MT5Filling.FOK
ORDER_FILLING_IOC = MT5Filling.IOC
ORDER_FILLING_RETURN = MT5Filling.RETURN

#: (side, order type) -> MT5 order type.
MT5_TYPES: dict[tuple[Side, OrderType], MT5OrderType] = {
    (Side.BUY, OrderType.MARKET): MT5OrderType.BUY,
    (Side.SELL, OrderType.MARKET): MT5OrderType.SELL,
    (Side.BUY, OrderType.LIMIT): MT5OrderType.BUY_LIMIT,
    (Side.SELL, OrderType.LIMIT): MT5OrderType.SELL_LIMIT,
    (Side.BUY, OrderType.STOP): MT5OrderType.BUY_STOP,
    (Side.SELL, OrderType.STOP): MT5OrderType.SELL_STOP,
    (Side.BUY, OrderType.STOP_LIMIT): MT5OrderType.BUY_STOP_LIMIT,
    (Side.SELL, OrderType.STOP_LIMIT): MT5OrderType.SELL_STOP_LIMIT,
}

_DEFAULTS = SAFE_DEFAULTS.operational.order_defaults


def resolve_order_type(signal: ApprovedSignal, order_defaults: OrderDefaults | None = None) -> OrderType:
    """The signal's order type, or the operational default when the signal has none."""
    if signal.order_type is not None:
        return OrderType(signal.order_type)
    return OrderType((order_defaults or _DEFAULTS).default_order_type)


def check_enabled(order_type: OrderType, order_defaults: OrderDefaults | None = None) -> str | None:
    """None if ``order_type`` may be sent; otherwise the reason to reject the order."""
    d = order_defaults or _DEFAULTS
    order_type = OrderType(order_type)
    if order_type is OrderType.LIMIT and not d.enable_limit_orders:
        return "limit orders are disabled (order_defaults.enable_limit_orders is false)"
    if order_type in (OrderType.STOP, OrderType.STOP_LIMIT) and not d.enable_stop_orders:
        return f"{order_type.value} orders are disabled (order_defaults.enable_stop_orders is false)"
    return None


def mt5_type(side: Side, order_type: OrderType) -> MT5OrderType:
    """The MT5 order type of a buy or sell of ``order_type``."""
    return MT5_TYPES[(Side(side), OrderType(order_type))]


def mt5_action(order_type: OrderType) -> MT5Action:
    """DEAL (execute now) for a market order, PENDING (place) for the others."""
    return MT5Action.DEAL if OrderType(order_type) is OrderType.MARKET else MT5Action.PENDING


def deviation_points(max_slippage_pips: float, spec: SymbolSpec) -> int:
    """The maximum slippage as MT5 ``deviation``: whole points of the symbol."""
    if not math.isfinite(max_slippage_pips) or max_slippage_pips < 0:
        raise ValueError(f"max_slippage_pips must be a finite number >= 0, got {max_slippage_pips}")
    return spec.pips_to_points(max_slippage_pips)


def comment_for(order_id: str) -> str:
    """The MT5 comment carrying ``order_id``: the id itself, which must fit in 31 chars."""
    if not order_id or len(order_id) > MAX_COMMENT:
        raise ValueError(f"order id {order_id!r} does not fit an MT5 comment (1 to {MAX_COMMENT} characters)")
    return order_id


def request_prices(order: Order) -> tuple[float, float]:
    """``(price, stoplimit)`` of the trade request, unrounded (see the module docstring)."""
    t = order.order_type
    if t is OrderType.MARKET:
        return order.expected_price, 0.0
    if t is OrderType.LIMIT:
        return (order.limit_price if order.limit_price is not None else order.expected_price), 0.0
    if t is OrderType.STOP:
        return (order.trigger_price if order.trigger_price is not None else order.expected_price), 0.0
    if t is OrderType.STOP_LIMIT:
        trigger = order.trigger_price if order.trigger_price is not None else order.expected_price
        limit = order.limit_price if order.limit_price is not None else order.expected_price
        return trigger, limit
    raise ValueError(f"unknown order type {t!r}")


def trade_request_fields(
    order: Order,
    spec: SymbolSpec,
    max_slippage_pips: float = _DEFAULTS.max_slippage_pips,
    magic: int = MAGIC,
) -> dict[str, Any]:
    """The fields of the MT5 ``TradeRequest`` (``app.mt5.contract``) that sends ``order``:
    a plain dict of JSON-ready values (the enumerations as plain ints)."""
    if spec.symbol != order.symbol:
        raise ValueError(f"symbol spec {spec.symbol} given for an order on {order.symbol}")
    price, stoplimit = request_prices(order)

    def rounded(p: float | None) -> float:
        return spec.round_price(p) if p is not None else 0.0

    close = order.intent is OrderIntent.CLOSE
    type_time, expiration = mt5_time(order, spec)
    return {
        "action": int(mt5_action(order.order_type)),
        "symbol": order.symbol,
        "volume": order.remaining_volume if close else order.volume,
        "type": int(mt5_type(order.side, order.order_type)),
        "price": 0.0 if close else rounded(price),
        "stoplimit": rounded(stoplimit) if stoplimit else 0.0,
        "sl": 0.0 if close else rounded(order.stop_loss),
        "tp": 0.0 if close else rounded(order.take_profit),
        "deviation": deviation_points(max_slippage_pips, spec),
        "type_filling": int(MT5Filling.RETURN),
        "type_time": type_time,
        "expiration": expiration.isoformat().replace("+00:00", "Z") if expiration else None,
        "magic": int(magic),
        "comment": comment_for(order.order_id),
        "account": order.account,
        "position": int(order.position_ticket or 0) if close else 0,
    }


#: MT5 ``ORDER_TIME_*``.
ORDER_TIME_GTC, ORDER_TIME_DAY, ORDER_TIME_SPECIFIED = 0, 1, 2


def end_of_day(now: datetime) -> datetime:
    """The next 00:00 UTC: when a DAY order stops working."""
    day = now.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return day + timedelta(days=1)


def order_expiry(tif: TimeInForce, expires_at: datetime | None, now: datetime) -> datetime | None:
    """When an order of time in force ``tif`` stops working (None: GTC)."""
    if tif is TimeInForce.DAY:
        return end_of_day(now)
    if tif is TimeInForce.GTD:
        return expires_at
    return None


def mt5_time(order: Order, spec: SymbolSpec) -> tuple[int, datetime | None]:
    """``(type_time, expiration)`` of the trade request: the broker expires a DAY or GTD
    pending order itself where the symbol allows it; otherwise GTC (the service expires it)."""
    if order.order_type is OrderType.MARKET or order.expires_at is None or not spec.broker_expiry:
        return ORDER_TIME_GTC, None
    if order.time_in_force is TimeInForce.DAY:
        return ORDER_TIME_DAY, None
    return ORDER_TIME_SPECIFIED, order.expires_at


def service_expiry(order: Order, spec: SymbolSpec, broker_grace: timedelta) -> datetime | None:
    """When the service cancels ``order`` because its time in force ran out (None: never).
    Where the broker expires the order itself (see :func:`mt5_time`), only ``broker_grace``
    later, as a backstop: a cancel sent at the expiry would race the broker's own."""
    if order.expires_at is None:
        return None
    broker_expires = mt5_time(order, spec)[0] != ORDER_TIME_GTC
    return order.expires_at + broker_grace if broker_expires else order.expires_at


def reprice(order: Order, spec: SymbolSpec, max_slippage_pips: float, bid: float, ask: float) -> tuple[float, int] | str:
    """After a requote: the new ``(price, deviation)`` of a market order, or the reason it must
    not be resent.  The broker fills within ``deviation`` points of ``price``; both are chosen
    so that no fill is more than ``max_slippage_pips`` adverse to the signal's entry price."""
    if order.order_type is not OrderType.MARKET:
        return "requote on a pending order: its price is kept, never moved to the market"
    if order.intent is OrderIntent.CLOSE:
        return "requote on a close"
    quote = ask if order.side is Side.BUY else bid
    cap_points = deviation_points(max_slippage_pips, spec)
    entry_points = round(order.entry_price / spec.point)
    quote_points = round(quote / spec.point)
    adverse = (quote_points - entry_points) * order.side.sign  # + = worse than the entry
    room = cap_points - adverse
    if room < 0:
        pips = adverse / spec.points_per_pip
        return (f"slippage cap: the market is {pips:g} pips from the entry {order.entry_price}, "
                f"above max_slippage_pips {max_slippage_pips:g}")
    return spec.round_price(quote), room


def reduce_only_refusal(order: Order, broker_net_volume: float) -> str:
    """Under ``reduce_only``: why ``order`` must not be sent ("" when it only reduces the
    broker's net position ``broker_net_volume``, lots + long / - short)."""
    net = round(broker_net_volume * 1e8)
    qty = round(order.volume * 1e8)
    if net == 0 or (net > 0) == (order.side is Side.BUY):
        return f"reduce_only: a {order.side.value} of {order.volume} lots would grow the position ({broker_net_volume} lots)"
    if qty > abs(net):
        return f"reduce_only: {order.volume} lots would reverse the position ({broker_net_volume} lots)"
    return ""
