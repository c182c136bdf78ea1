"""The order state machine: which lifecycle event may move an order from which state.

Pure: every function returns new data and changes nothing.  The orders agent is the only
writer of the ``orders`` table; it applies the :class:`Transition` it gets from here,
publishes ``transition.event`` to ``order_execution_archive`` and, when
``transition.applied``, the new order to ``orders.status``.

States and events::

    None    --created-->  PENDING
    PENDING --submitted--> SUBMITTED
    PENDING | SUBMITTED | PARTIALLY_FILLED --partially_filled--> PARTIALLY_FILLED
    PENDING | SUBMITTED | PARTIALLY_FILLED --filled-->           FILLED
    PENDING | SUBMITTED | PARTIALLY_FILLED --cancelled-->        CANCELLED
    PENDING | SUBMITTED --rejected--> REJECTED
    PENDING | SUBMITTED --failed-->   FAILED

A fill may come from PENDING because the broker's deal report can overtake the reply to
``order_send``.  FILLED, CANCELLED, REJECTED and FAILED are final: nothing leaves them.

Anything else is **refused**: the order is returned unchanged (the same object),
``applied`` is False and the event is a ``transition_refused`` record naming the illegal
move, for the audit trail.  Nothing here raises for an illegal transition: a late or
repeated broker answer is normal in a distributed system, not a bug.  Programming errors
do raise: an unknown order field in ``updates`` (:class:`TypeError`), or an informational
event type given to :func:`apply` / a lifecycle event type given to :func:`record`
(:class:`ValueError`).

Event ids are deterministic, so a replay after a crash produces the same records:

* applied: ``f"{order_id}:{new_version}:{type}"`` (``new_version`` is 1 for ``created``);
* refused: ``f"{order_id}:{version}:refused:{type}"`` plus ``:{discriminator}`` when one is
  given, else ``:{digest}`` of the caller's reason and detail when there is any, so two
  different refused inputs at the same version (two late deals) are two records;
* informational (:func:`record`): ``f"{order_id}:{version}:{type}"`` plus
  ``:{discriminator}`` when one is given (e.g. ``deal-123``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from app.models import (
    ApprovedSignal,
    OrderIntent,
    Side,
    TimeInForce,
    EventType,
    Order,
    OrderEvent,
    OrderState,
    OrderType,
    digest,
)

S = OrderState
E = EventType

#: The legal transitions: (current state, or None before the order exists, event) -> new state.
TRANSITIONS: dict[tuple[OrderState | None, EventType], OrderState] = {
    (None, E.CREATED): S.PENDING,
    (S.PENDING, E.SUBMITTED): S.SUBMITTED,
    **{(s, E.PARTIALLY_FILLED): S.PARTIALLY_FILLED for s in (S.PENDING, S.SUBMITTED, S.PARTIALLY_FILLED)},
    **{(s, E.FILLED): S.FILLED for s in (S.PENDING, S.SUBMITTED, S.PARTIALLY_FILLED)},
    **{(s, E.CANCELLED): S.CANCELLED for s in (S.PENDING, S.SUBMITTED, S.PARTIALLY_FILLED)},
    **{(s, E.REJECTED): S.REJECTED for s in (S.PENDING, S.SUBMITTED)},
    **{(s, E.FAILED): S.FAILED for s in (S.PENDING, S.SUBMITTED)},
}

#: The event that leads into each state.
EVENT_FOR_STATE: dict[OrderState, EventType] = {
    S.PENDING: E.CREATED,
    S.SUBMITTED: E.SUBMITTED,
    S.PARTIALLY_FILLED: E.PARTIALLY_FILLED,
    S.FILLED: E.FILLED,
    S.CANCELLED: E.CANCELLED,
    S.REJECTED: E.REJECTED,
    S.FAILED: E.FAILED,
}

#: Events that drive the state machine (through :func:`create_order` / :func:`apply`).
LIFECYCLE_EVENTS: frozenset[EventType] = frozenset(EVENT_FOR_STATE.values())
#: Events that only record something (through :func:`record`); they never change an order.
INFORMATIONAL_EVENTS: frozenset[EventType] = frozenset(EventType) - LIFECYCLE_EVENTS

#: The state each lifecycle event leads to (whatever the state it comes from).
_TARGET: dict[EventType, OrderState] = {e: s for (_, e), s in TRANSITIONS.items()}

#: Order fields an event may set besides its state (``apply(..., **updates)``).  State,
#: version and identity are the state machine's, never the caller's.
ALLOWED_UPDATES: frozenset[str] = frozenset(
    {
        "filled_volume",
        "avg_fill_price",
        "slippage_pips",
        "deals",
        "updated_at",
        "filled_at",
        "broker_ticket",
        "arrival_price",
        "retcode",
        "attempts",
        "reason",
        "submitted_at",
        "position_ticket",
        "commands",
        "pending_command",
    }
)

#: Order fields a change without a state transition may set (:func:`amend`): a modify's
#: prices, a late deal's figures, bookkeeping that arrives after the state moved on.
AMENDABLE: frozenset[str] = ALLOWED_UPDATES | frozenset(
    {"limit_price", "trigger_price", "expected_price", "stop_loss", "take_profit", "expires_at"}
)


@dataclass(frozen=True)
class Transition:
    """The result of an event: the order after it, the audit record, and whether it moved."""

    order: Order
    event: OrderEvent
    applied: bool


def is_legal(state: OrderState | None, event_type: EventType) -> bool:
    """True if ``event_type`` may be applied to an order in ``state`` (None: no order yet)."""
    return (state, event_type) in TRANSITIONS


def next_state(state: OrderState | None, event_type: EventType) -> OrderState | None:
    """The state ``event_type`` leads to from ``state``; None if the transition is illegal."""
    return TRANSITIONS.get((state, event_type))


def legal_events(state: OrderState | None) -> frozenset[EventType]:
    """The events an order in ``state`` accepts (empty for a final state)."""
    return frozenset(e for (s, e) in TRANSITIONS if s == state)


# --------------------------------------------------------------------------------------
# Creation
# --------------------------------------------------------------------------------------


def order_prices(signal: ApprovedSignal, order_type: OrderType) -> tuple[float, float | None, float | None]:
    """``(expected_price, trigger_price, limit_price)`` of an order of ``order_type``.

    * market: the entry price; no trigger, no limit;
    * limit: the signal's limit price, or its entry price;
    * stop: the signal's trigger price, or its entry price;
    * stop-limit: trigger = the trigger price (or entry); limit = the limit price (or the
      trigger), the expected price being the limit (the worst acceptable fill).

    A signal sent without an order type takes the default type, so it may lack the prices
    that type uses: the entry price stands in for them.
    """
    entry = signal.entry_price
    if order_type is OrderType.MARKET:
        return entry, None, None
    if order_type is OrderType.LIMIT:
        limit = signal.limit_price if signal.limit_price is not None else entry
        return limit, None, limit
    if order_type is OrderType.STOP:
        trigger = signal.trigger_price if signal.trigger_price is not None else entry
        return trigger, trigger, None
    if order_type is OrderType.STOP_LIMIT:
        trigger = signal.trigger_price if signal.trigger_price is not None else entry
        limit = signal.limit_price if signal.limit_price is not None else trigger
        return limit, trigger, limit
    raise ValueError(f"unknown order type {order_type!r}")


def create_order(
    signal: ApprovedSignal, order_id: str, order_type: OrderType, now: datetime, *,
    time_in_force: TimeInForce = TimeInForce.GTC, expires_at: datetime | None = None,
) -> Transition:
    """The PENDING order (version 1) for an approved signal, and its ``created`` event.
    ``expires_at``: when a DAY or GTD pending order stops working."""
    order_type = OrderType(order_type)
    to_state = TRANSITIONS[(None, E.CREATED)]
    expected, trigger, limit = order_prices(signal, order_type)
    order = Order(
        order_id=order_id,
        signal_id=signal.signal_id,
        account=signal.account,
        strategy=signal.strategy,
        symbol=signal.symbol,
        side=signal.signal_type,
        order_type=order_type,
        volume=signal.position_size,
        entry_price=signal.entry_price,
        expected_price=expected,
        trigger_price=trigger,
        limit_price=limit,
        stop_loss=signal.stop_loss,
        take_profit=signal.take_profit,
        state=to_state,
        version=1,
        created_at=now,
        updated_at=now,
        time_in_force=time_in_force,
        expires_at=expires_at,
    )
    event = OrderEvent(
        event_id=f"{order_id}:1:{E.CREATED.value}",
        type=E.CREATED,
        order_id=order_id,
        signal_id=signal.signal_id,
        symbol=signal.symbol,
        account=signal.account,
        from_state=None,
        to_state=to_state,
        detail={
            "order_type": order_type.value,
            "side": signal.signal_type.value,
            "volume": signal.position_size,
            "expected_price": expected,
        },
        at=now,
    )
    return Transition(order=order, event=event, applied=True)


def create_close_order(
    order_id: str, command_id: str, account: str, symbol: str, side: Side, volume: float,
    reference_price: float | None, position_ticket: int | None, now: datetime,
) -> Transition:
    """The PENDING market order that closes ``volume`` lots of a position (intent ``close``),
    made by the close command ``command_id``, and its ``created`` event."""
    price = reference_price or 0.0
    order = Order(
        order_id=order_id, signal_id=f"command:{command_id}", account=account, symbol=symbol, side=side,
        order_type=OrderType.MARKET, volume=volume, entry_price=price or 1.0, expected_price=price or 1.0,
        state=S.PENDING, version=1, created_at=now, updated_at=now, intent=OrderIntent.CLOSE,
        position_ticket=position_ticket, commands=(command_id,),
    )
    event = OrderEvent(
        event_id=f"{order_id}:1:{E.CREATED.value}", type=E.CREATED, order_id=order_id, signal_id=order.signal_id,
        symbol=symbol, account=account, from_state=None, to_state=S.PENDING,
        detail={"order_type": "market", "side": side.value, "volume": volume, "intent": "close",
                "position_ticket": position_ticket, "command_id": command_id},
        at=now,
    )
    return Transition(order=order, event=event, applied=True)


# --------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------


def _check_updates(updates: dict[str, Any]) -> None:
    unknown = set(updates) - ALLOWED_UPDATES
    if unknown:
        raise TypeError(f"apply() got order fields it may not set: {sorted(unknown)} (allowed: {sorted(ALLOWED_UPDATES)})")


def _fingerprint(reason: str | None, detail: dict[str, Any] | None) -> str:
    """A short stable digest of a refused input (its reason and detail)."""
    raw = orjson.dumps(
        {"reason": reason, "detail": detail or {}},
        option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z,
        default=str,
    )
    return digest(raw.decode(), size=4)


def _event(order: Order, event_type: EventType, event_id: str, **fields: Any) -> OrderEvent:
    return OrderEvent(
        event_id=event_id,
        type=event_type,
        order_id=order.order_id,
        signal_id=order.signal_id,
        symbol=order.symbol,
        account=order.account,
        **fields,
    )


def apply(
    order: Order,
    event_type: EventType,
    now: datetime,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
    *,
    discriminator: str | None = None,
    **updates: Any,
) -> Transition:
    """Apply a lifecycle event to ``order``.

    Legal: the order moves to the event's state, its version goes up by one, ``updated_at``
    becomes ``now`` (unless given), ``reason`` is set (None clears an earlier one), the
    ``updates`` are applied, ``submitted_at`` is set on SUBMITTED and ``filled_at`` on
    FILLED (``now`` unless given); the event records the move.

    Illegal: the same order object, ``applied`` False, and a ``transition_refused`` event
    whose detail names the refused ``event`` and the state it came ``from`` (plus the
    caller's detail and reason).  ``discriminator`` only matters for a refusal (see the
    module docstring for event ids).
    """
    _check_updates(updates)
    event_type = EventType(event_type)
    if event_type not in LIFECYCLE_EVENTS:
        raise ValueError(f"{event_type.value} is not a lifecycle event: use record()")

    to_state = TRANSITIONS.get((order.state, event_type))
    if to_state is None:
        return _refuse(order, event_type, now, reason, detail, discriminator)

    version = order.version + 1
    changes: dict[str, Any] = {"updated_at": now, **updates, "state": to_state, "version": version, "reason": reason}
    if to_state is S.SUBMITTED and "submitted_at" not in updates:
        changes["submitted_at"] = now
    if to_state is S.FILLED and "filled_at" not in updates:
        changes["filled_at"] = now
    # Validated (not model_copy): a wrongly typed update fails here, not in a later reader.
    new_order = Order.model_validate({**order.model_dump(), **changes})
    event = _event(
        order,
        event_type,
        f"{order.order_id}:{version}:{event_type.value}",
        from_state=order.state,
        to_state=to_state,
        reason=reason,
        detail=dict(detail or {}),
        at=now,
    )
    return Transition(order=new_order, event=event, applied=True)


def _refuse(
    order: Order,
    event_type: EventType,
    now: datetime,
    reason: str | None,
    detail: dict[str, Any] | None,
    discriminator: str | None,
) -> Transition:
    text = f"illegal transition {order.state.value} -> {_TARGET[event_type].value} (event {event_type.value})"
    event_id = f"{order.order_id}:{order.version}:refused:{event_type.value}"
    if discriminator:
        event_id += f":{discriminator}"
    elif reason is not None or detail:
        event_id += f":{_fingerprint(reason, detail)}"
    info: dict[str, Any] = {**(detail or {}), "event": event_type.value, "from": order.state.value}
    if reason is not None:
        info["reason"] = reason
    event = _event(
        order,
        E.TRANSITION_REFUSED,
        event_id,
        from_state=order.state,
        to_state=None,
        reason=text,
        detail=info,
        at=now,
    )
    return Transition(order=order, event=event, applied=False)


def record(
    order: Order,
    event_type: EventType,
    now: datetime,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
    discriminator: str | None = None,
) -> OrderEvent:
    """An informational event about ``order`` (duplicate signal, slippage alert, refused
    fill, position correction...).  The order does not change.

    The id is ``f"{order_id}:{version}:{type}"``, plus ``:{discriminator}`` when given: pass
    one (a deal number, the input's offset) whenever two such events can happen at the same
    order version and must both be kept.
    """
    event_type = EventType(event_type)
    if event_type not in INFORMATIONAL_EVENTS:
        raise ValueError(f"{event_type.value} changes the order's state: use apply()")
    event_id = f"{order.order_id}:{order.version}:{event_type.value}"
    if discriminator:
        event_id += f":{discriminator}"
    return _event(
        order,
        event_type,
        event_id,
        from_state=order.state,
        to_state=None,
        reason=reason,
        detail=dict(detail or {}),
        at=now,
    )


def amend(order: Order, now: datetime, **updates: Any) -> Order:
    """The order with ``updates`` and no state change (a modify the broker confirmed, a late
    deal on a final order, the attempts of a submission answered after its fill): the
    version goes up, so the new snapshot is a new record everywhere (JetStream dedupes
    ``orders.*`` by order id and version)."""
    unknown = set(updates) - AMENDABLE
    if unknown:
        raise TypeError(f"amend() got order fields it may not set: {sorted(unknown)}")
    changes = {"updated_at": now, **updates, "version": order.version + 1}
    return Order.model_validate({**order.model_dump(), **changes})


def modified_prices(order: Order, price: float | None, stop_loss: float | None, take_profit: float | None) -> dict[str, Any]:
    """The order fields a confirmed modify sets: ``price`` is the limit of a limit order and
    the trigger of a stop or stop-limit (and the expected price of a limit or stop)."""
    out: dict[str, Any] = {}
    if price is not None:
        if order.order_type is OrderType.LIMIT:
            out.update(limit_price=price, expected_price=price)
        elif order.order_type is OrderType.STOP:
            out.update(trigger_price=price, expected_price=price)
        elif order.order_type is OrderType.STOP_LIMIT:
            out.update(trigger_price=price)
    if stop_loss is not None:
        out["stop_loss"] = stop_loss
    if take_profit is not None:
        out["take_profit"] = take_profit
    return out
