"""Apply a broker fill to its order: volumes, VWAP, slippage, the execution record.

Pure: :func:`apply_fill` returns data and changes nothing.  The caller (the fills agent)
passes ``result.event_type`` and ``result.updates`` to the order state machine
(``tables.order_state.apply(order, event_type, **updates)``), publishes
``result.execution`` to ``executions`` and records a slippage alert when ``result.alert``.

Design:

* **Duplicates.**  A deal ticket already in ``order.deals`` changes nothing
  (``is_duplicate``; no updates, no execution): replays after a crash are harmless.
* **Volumes** are compared in integer units of 1e-8 lot, so 0.1 + 0.2 fills 0.3 exactly.
  Below the requested volume the target event is ``partially_filled``; at it, ``filled``.
* **Overfill.**  A deal that would take the cumulative volume above the order's volume is
  refused for the order (``accepted`` False, a ``reason``, no updates, no event type).  It is
  still a real trade at the broker: ``execution`` is returned (its cumulative figures
  include the deal, its ``order_state`` is the order's unchanged state) so the caller can
  account it in the position; reconciliation will show it in any case.
* **Final states.**  A fill for an order we hold CANCELLED, REJECTED or FAILED (a cancel
  that lost the race, a timeout we called a failure) is a real trade too.  It is computed
  like any other (``accepted``, updates, event type) and flagged ``on_final_order``; the
  state machine refuses the transition and the caller records that.  ``execution.order_state``
  is then the order's (final) state, since the order does not move.  The caller should still
  keep ``updates`` on the order (without a state change): otherwise a second late deal is
  computed from zero and a replay is not recognised as a duplicate by the order.  A new deal on a FILLED
  order is necessarily an overfill.
* **Before the submit reply.**  A fill for a PENDING order is accepted: the deal report
  can overtake the ``order_send`` reply.  The state machine must allow PENDING ->
  PARTIALLY_FILLED / FILLED.
* **Consistency.**  A fill for another order, symbol or side, or of less than 1e-8 lot, is
  refused with a reason (and no execution).
  An unknown symbol raises :class:`tables.symbols.UnknownSymbol` (bad input).
* **Exits.**  A deal the broker or a person made (reason sl, tp, stop_out, client) fills no
  order of ours: :func:`exit_execution` makes its ``executions`` record, which reduces the
  position (``side`` is the deal's).  Its slippage is measured against the stop-loss or
  take-profit level that triggered it when the opening order is known, else it is 0.
* **Closes.**  An order of intent ``close`` has no price of its own to slip from: its fills
  carry slippage 0 and raise no alert.
* **Timestamps.**  ``filled_at`` and ``updated_at`` are ``now`` (our clock, like
  ``submitted_at``); the broker's deal time is kept in ``execution.time``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from app.config import SAFE_DEFAULTS
from app.models import EventType, Execution, Fill, Order, OrderIntent, OrderState
from tables.slippage import is_alert, slippage_pips
from tables.symbols import SymbolTable

#: Volumes are compared and summed in integer units of this many lots.
VOLUME_UNIT = 1e-8
_UNITS_PER_LOT = 100_000_000
#: The default alert threshold, from the operational safe defaults (pips).
DEFAULT_ALERT_THRESHOLD_PIPS = SAFE_DEFAULTS.operational.fill_tracking.slippage_alert_threshold_pips
#: States in which the order no longer expects fills, but a broker fill is still real.
UNEXPECTED_FILL_STATES = frozenset({OrderState.CANCELLED, OrderState.REJECTED, OrderState.FAILED})


def to_units(lots: float) -> int:
    """Lots as integer units of 1e-8 lot."""
    return round(lots * _UNITS_PER_LOT)


def to_lots(units: int) -> float:
    return units / _UNITS_PER_LOT


@dataclass(frozen=True, slots=True)
class FillResult:
    """What a fill does to its order.  ``updates`` is for ``order_state.apply``."""

    is_duplicate: bool = False
    #: False: the order must not take this fill (see ``reason``); nothing to apply.
    accepted: bool = True
    reason: str | None = None
    #: EventType.PARTIALLY_FILLED or EventType.FILLED; None if duplicate or refused.
    event_type: EventType | None = None
    #: The state the volumes imply (PARTIALLY_FILLED / FILLED); None if duplicate or refused.
    to_state: OrderState | None = None
    #: Order fields: filled_volume, avg_fill_price, slippage_pips, deals, updated_at,
    #: filled_at (when full), broker_ticket (when the order has none yet).
    updates: dict[str, Any] = field(default_factory=dict)
    #: The executions record; None only for a duplicate or an inconsistent fill.
    execution: Execution | None = None
    #: This fill's slippage in pips (+ = adverse); None for a duplicate.
    fill_slippage_pips: float | None = None
    #: |fill slippage| > threshold: record a slippage alert.
    alert: bool = False
    #: The order is CANCELLED / REJECTED / FAILED: the state machine will refuse the event.
    on_final_order: bool = False


def apply_fill(
    order: Order,
    fill: Fill,
    symbols: SymbolTable,
    now: datetime,
    *,
    alert_threshold_pips: float = DEFAULT_ALERT_THRESHOLD_PIPS,
) -> FillResult:
    """The effect of ``fill`` on ``order``: updates, event type, execution record, alert."""
    if fill.deal in order.deals:
        return FillResult(is_duplicate=True, reason=f"deal {fill.deal} already applied to order {order.order_id}")
    mismatch = _mismatch(order, fill)
    if mismatch:
        return FillResult(accepted=False, reason=mismatch)

    pip = symbols[order.symbol].pip_size
    closing = order.intent is OrderIntent.CLOSE
    fill_slip = 0.0 if closing else slippage_pips(order.side, order.expected_price, fill.price, pip)
    alert = is_alert(fill_slip, alert_threshold_pips)

    prev_units = to_units(order.filled_volume)
    fill_units = to_units(fill.volume)
    cum_units = prev_units + fill_units
    req_units = to_units(order.volume)
    prev_avg = order.avg_fill_price if order.avg_fill_price is not None and prev_units > 0 else 0.0
    avg = (prev_avg * prev_units + fill.price * fill_units) / cum_units
    cum = to_lots(cum_units)
    on_final = order.state in UNEXPECTED_FILL_STATES

    if cum_units > req_units:
        execution = _execution(order, fill, fill_slip, cum, avg, order.state)
        return FillResult(
            accepted=False,
            reason=(
                f"overfill: deal {fill.deal} of {fill.volume} lots would take order {order.order_id} "
                f"to {cum} of {order.volume} lots"
            ),
            execution=execution,
            fill_slippage_pips=fill_slip,
            alert=alert,
            on_final_order=on_final,
        )

    full = cum_units == req_units
    to_state = OrderState.FILLED if full else OrderState.PARTIALLY_FILLED
    updates: dict[str, Any] = {
        "filled_volume": cum,
        "avg_fill_price": avg,
        "slippage_pips": 0.0 if closing else slippage_pips(order.side, order.expected_price, avg, pip),
        "deals": (*order.deals, fill.deal),
        "updated_at": now,
    }
    if full:
        updates["filled_at"] = now
    if order.broker_ticket is None and fill.ticket is not None:
        updates["broker_ticket"] = fill.ticket
    if fill.position is not None and order.position_ticket is None:
        updates["position_ticket"] = fill.position
    return FillResult(
        event_type=EventType.FILLED if full else EventType.PARTIALLY_FILLED,
        to_state=to_state,
        updates=updates,
        execution=_execution(order, fill, fill_slip, cum, avg, order.state if on_final else to_state),
        fill_slippage_pips=fill_slip,
        alert=alert,
        on_final_order=on_final,
    )


def _mismatch(order: Order, fill: Fill) -> str | None:
    if fill.order_id != order.order_id:
        return f"fill for order {fill.order_id} applied to order {order.order_id}"
    if fill.symbol != order.symbol:
        return f"fill symbol {fill.symbol} differs from order symbol {order.symbol}"
    if fill.side is not order.side:
        return f"fill side {fill.side.value} differs from order side {order.side.value}"
    if to_units(fill.volume) <= 0:
        return f"fill volume {fill.volume} is below the volume unit {VOLUME_UNIT} lot"
    return None


def _execution(order: Order, fill: Fill, slip: float, cum: float, avg: float, state: OrderState) -> Execution:
    return Execution(
        execution_id=f"{order.order_id}:{fill.deal}",
        order_id=order.order_id,
        signal_id=order.signal_id,
        account=order.account,
        symbol=order.symbol,
        side=order.side,
        deal=fill.deal,
        ticket=fill.ticket,
        price=fill.price,
        volume=fill.volume,
        expected_price=order.expected_price,
        slippage_pips=slip,
        cumulative_volume=cum,
        avg_fill_price=avg,
        order_state=state,
        time=fill.time,
        **_deal_fields(fill),
    )


def _deal_fields(fill: Fill) -> dict[str, Any]:
    return {"entry": fill.entry, "reason": fill.reason, "position": fill.position, "profit": fill.profit,
            "currency": fill.currency, "magic": fill.magic}


def exit_level(order: Order | None, fill: Fill) -> float:
    """The price an exit was expected at: the stop-loss or take-profit that triggered it
    (known from the opening order), else the deal's own price."""
    if order is not None and fill.reason == "sl" and order.stop_loss is not None:
        return order.stop_loss
    if order is not None and fill.reason == "tp" and order.take_profit is not None:
        return order.take_profit
    return fill.price


def exit_execution(order: Order | None, fill: Fill, symbols: SymbolTable) -> Execution:
    """The ``executions`` record of an exit (``fill.is_exit``): the deal reduces the position
    that ``order`` opened (None: an order no longer in the table, or never ours to know)."""
    expected = exit_level(order, fill)
    slip = slippage_pips(fill.side, expected, fill.price, symbols[fill.symbol].pip_size)
    return Execution(
        execution_id=f"{fill.routing_key}:{fill.deal}",
        order_id=fill.order_id,
        signal_id=order.signal_id if order is not None else "",
        account=fill.account,
        symbol=fill.symbol,
        side=fill.side,
        deal=fill.deal,
        ticket=fill.ticket,
        price=fill.price,
        volume=fill.volume,
        expected_price=expected,
        slippage_pips=slip,
        cumulative_volume=fill.volume,
        avg_fill_price=fill.price,
        order_state=order.state if order is not None else OrderState.FILLED,
        time=fill.time,
        **_deal_fields(fill),
    )
