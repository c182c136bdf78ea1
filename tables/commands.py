"""Commands on orders and positions: what the state allows, decided by pure functions.

Every action on an order is a command on ``orders.commands`` (cancel, modify, close a
position, expire); the same decision serves the front ends (HTTP, NATS, CLI), which answer
404 / 409 at once, and the orders agent, which decides again against the state it owns when
the command arrives (it may have moved since) and records a refusal in the audit trail.

* **cancel**: a limit, stop or stop-limit order working at the broker (SUBMITTED or
  PARTIALLY_FILLED; the unfilled rest is removed), or the rest of a partially filled market
  order (it waits for a price within the slippage cap).  A market order cannot be cancelled
  once sent otherwise, an order still PENDING is in the middle of its submission, a final
  order is final.
* **modify**: the price (limit price of a limit, trigger of a stop or stop-limit) of a
  working pending order; stop-loss and take-profit of a working order, or of the position a
  filled order opened.  The new prices must keep SL below and TP above the reference price
  for a buy (the other way for a sell): the new price, else the average fill price, else the
  order's price.
* **close**: all of an open position, or part of it; never more than it holds.

A command id makes a repeated command act once (:func:`is_repeat`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from app.models import ModifyOrder, Order, OrderState, OrderType, Position, Side
from tables.fills import to_lots, to_units

#: How many command ids an order remembers (a repeat is delivered within seconds).
MAX_COMMAND_IDS = 32

S = OrderState
WORKING = frozenset({S.SUBMITTED, S.PARTIALLY_FILLED})


@dataclass(frozen=True, slots=True)
class Decision:
    """``accepted``, or the ``reason`` it is refused and the HTTP status that says so
    (404: no such order or position; 409: the state refuses it)."""

    accepted: bool
    reason: str | None = None
    status: int = 202

    @classmethod
    def refuse(cls, reason: str, status: int = 409) -> "Decision":
        return cls(False, reason, status)


ACCEPT = Decision(True)


@dataclass(frozen=True, slots=True)
class CloseDecision(Decision):
    """A close: the side and volume of the closing order when accepted."""

    side: Side | None = None
    volume: float = 0.0


def is_repeat(order: Order, command_id: str | None) -> bool:
    return command_id is not None and command_id in order.commands


def remember(order: Order, command_id: str | None) -> tuple[str, ...]:
    """The order's command ids with ``command_id`` added (bounded, newest last)."""
    if command_id is None or command_id in order.commands:
        return order.commands
    return (*order.commands, command_id)[-MAX_COMMAND_IDS:]


def decide_cancel(order: Order | None) -> Decision:
    if order is None:
        return Decision.refuse("unknown order", 404)
    if order.state.is_final:
        return Decision.refuse(f"order is {order.state.value}")
    if order.order_type is OrderType.MARKET and order.state is not S.PARTIALLY_FILLED:
        return Decision.refuse("a market order cannot be cancelled once sent (only the unfilled rest of a partial fill)")
    if order.state is S.PENDING:
        return Decision.refuse("order is PENDING: its submission is in flight; cancel it once SUBMITTED")
    return ACCEPT


def decide_expire(order: Order | None, now: datetime) -> Decision:
    """The time in force ran out: the order is cancelled at the broker (reason ``expired``)."""
    if order is None:
        return Decision.refuse("unknown order", 404)
    if order.state.is_final:
        return Decision.refuse(f"order is {order.state.value}")
    if order.expires_at is None or order.expires_at > now:
        return Decision.refuse("order has not expired")
    if order.state is S.PENDING:
        return Decision.refuse("order is PENDING: its submission is in flight")
    return ACCEPT


def _sl_tp_side(side: Side, reference: float, stop_loss: float | None, take_profit: float | None) -> str | None:
    if stop_loss is not None and (reference - stop_loss) * side.sign <= 0:
        where = "below" if side is Side.BUY else "above"
        return f"stop_loss {stop_loss} must be {where} {reference} for a {side.value}"
    if take_profit is not None and (take_profit - reference) * side.sign <= 0:
        where = "above" if side is Side.BUY else "below"
        return f"take_profit {take_profit} must be {where} {reference} for a {side.value}"
    return None


def order_price(order: Order) -> float:
    """The order's own price at the broker: the limit of a limit, the trigger of a stop or
    stop-limit, the expected price of a market order."""
    if order.order_type is OrderType.LIMIT and order.limit_price is not None:
        return order.limit_price
    if order.order_type in (OrderType.STOP, OrderType.STOP_LIMIT) and order.trigger_price is not None:
        return order.trigger_price
    return order.expected_price


def decide_modify(order: Order | None, req: ModifyOrder) -> Decision:
    if order is None:
        return Decision.refuse("unknown order", 404)
    if order.state in (S.CANCELLED, S.REJECTED, S.FAILED):
        return Decision.refuse(f"order is {order.state.value}")
    if order.state is S.PENDING:
        return Decision.refuse("order is PENDING: its submission is in flight; modify it once SUBMITTED")
    if req.price is not None:
        if order.order_type is OrderType.MARKET:
            return Decision.refuse("a market order has no price to modify")
        if order.state is not S.SUBMITTED or order.filled_volume > 0:
            return Decision.refuse(f"price: the order is {order.state.value}; only stop_loss and take_profit can change")
    if order.state is S.FILLED and order.position_ticket is None and order.broker_ticket is None:
        return Decision.refuse("the filled order's position is not known")
    if req.price is not None:
        reference = req.price
    elif order.avg_fill_price is not None:
        reference = order.avg_fill_price
    else:
        reference = order_price(order)
    stop_loss = req.stop_loss if req.stop_loss is not None else (order.stop_loss if req.price is not None else None)
    take_profit = req.take_profit if req.take_profit is not None else (order.take_profit if req.price is not None else None)
    wrong = _sl_tp_side(order.side, reference, stop_loss, take_profit)
    if wrong:
        return Decision.refuse(wrong)
    return ACCEPT


def decide_close(position: Position | None, volume: float | None, in_flight: float = 0.0) -> CloseDecision:
    """Close ``volume`` lots (None: all) of ``position``: the order is on the other side.
    ``in_flight`` lots of it are being closed already (:func:`closing_lots`): never more than
    the rest is closed, so two closes sent back to back do not close the same lots twice."""
    if position is None:
        return CloseDecision(False, "unknown position", 404)
    net = to_units(position.net_volume)
    if net == 0:
        return CloseDecision(False, f"position {position.key} is flat", 409)
    available = abs(net) - to_units(in_flight)
    if available <= 0:
        return CloseDecision(False, f"position {position.key}: all of its {to_lots(abs(net))} lots are being closed already", 409)
    want = available if volume is None else to_units(volume)
    if want <= 0:
        return CloseDecision(False, f"volume {volume} is not a positive number of lots", 409)
    if want > available:
        held = f"the position's {to_lots(abs(net))} lots"
        if in_flight:
            held += f", {to_lots(available)} of them not being closed already"
        return CloseDecision(False, f"volume {volume} is above {held}", 409)
    return CloseDecision(True, side=Side.SELL if net > 0 else Side.BUY, volume=to_lots(want))


def closing_lots(
    position: Position, closes: Mapping[str, tuple[Order | None, Mapping[int, float]]],
) -> tuple[float, list[str]]:
    """The lots of ``position`` that close orders are taking out but its net volume does not
    show yet, and the ids of the closes that are settled (final, every deal applied).

    ``closes`` maps a close order's id to the order (None if it was never written) and the
    volume of each of its deals applied to the order.  An open close takes its unfilled rest;
    a deal counts until its ticket is among the position's applied deals (the positions
    agent applies deals from another topic, so an order can be FILLED before its position
    shows the deal)."""
    applied = set(position.deals) | set(position.corrected_deals)
    units = 0
    settled = []
    for order_id, (order, deals) in closes.items():
        unapplied = sum(to_units(v) for d, v in deals.items() if d not in applied)
        rest = 0 if order is None or order.state.is_final else to_units(order.remaining_volume)
        units += unapplied + rest
        if unapplied == 0 and rest == 0:
            settled.append(order_id)
    return to_lots(units), settled
