"""What the broker's answers do to an order: pure mapping onto state-machine events.

Two kinds of answer reach the orders agent (through the ``orders.commands`` topic):

* the connector's reply to a submission (an MqlTradeResult-like dict), or the fact that no
  reply came after every retry;
* the broker's view of an order after a status query (stuck orders, resumed submissions).

Fills are never inferred from these answers: the deal events on ``mt5.fills.*`` are the
only source of fills, so a fill is counted once however the answers race with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.models import EventType, Order, OrderState, Side
from app.mt5.contract import Outcome, Retcode, classify

#: Broker order states (``OrderStatus.state``) and the event each implies for our order.
BROKER_STATE_EVENTS: dict[str, EventType | None] = {
    "placed": EventType.SUBMITTED,
    "partially_filled": EventType.SUBMITTED,  # the fills stream brings the fills themselves
    "filled": EventType.SUBMITTED,
    "cancelled": EventType.CANCELLED,
    "expired": EventType.CANCELLED,  # reason ``expired``
    "rejected": EventType.REJECTED,
}


@dataclass(frozen=True)
class Step:
    """An event to apply to the order (None: nothing to do) and why."""

    event_type: EventType | None
    reason: str | None = None
    updates: dict[str, Any] = field(default_factory=dict)


def retcode_text(retcode: int) -> str:
    try:
        return f"{Retcode(retcode).name} ({retcode})"
    except ValueError:
        return f"retcode {retcode}"


def on_submit_result(order: Order, payload: dict[str, Any], attempt: int) -> Step:
    """The connector's final answer to a submission (after the submitter's own retries)."""
    if order.state is not OrderState.PENDING:
        # A late or repeated answer: the order already moved on (fills, a status check).
        return Step(None, f"reply for an order already {order.state.value}")
    updates: dict[str, Any] = {"attempts": max(order.attempts, attempt)}
    bid, ask = payload.get("bid") or 0.0, payload.get("ask") or 0.0
    if bid > 0 and ask > 0 and order.arrival_price is None:
        updates["arrival_price"] = float(ask if order.side is Side.BUY else bid)
    if payload.get("refused"):  # the client would not resend (the slippage cap)
        if payload.get("retcode"):
            updates["retcode"] = int(payload["retcode"])
        return Step(EventType.REJECTED, str(payload["refused"]), updates)
    if payload.get("no_reply"):
        return Step(EventType.SUBMITTED, "no reply from the connector: outcome unknown", updates)
    retcode = int(payload.get("retcode", 0))
    updates["retcode"] = retcode
    ticket = payload.get("order") or None
    if ticket:
        updates["broker_ticket"] = int(ticket)
    outcome = classify(retcode)
    text = retcode_text(retcode)
    comment = payload.get("comment")
    detail = f"{text}: {comment}" if comment else text
    if outcome is Outcome.SUCCESS:
        return Step(EventType.SUBMITTED, None, updates)
    if outcome is Outcome.UNKNOWN:
        return Step(EventType.SUBMITTED, f"outcome unknown: {detail}", updates)
    if outcome is Outcome.REPRICE:
        return Step(EventType.REJECTED, f"requoted until out of retries: {detail}", updates)
    return Step(EventType.REJECTED, detail, updates)


def on_broker_status(order: Order, payload: dict[str, Any], *, stuck: bool) -> Step:
    """The broker's view of an order we asked about.

    ``stuck``: asked because the order had no news for the stuck-order timeout; an order
    the broker does not know is then FAILED with reason ``timeout``.  Otherwise (a resumed
    submission asking before it resends) an unknown order simply has not reached the broker.
    """
    if order.state.is_final:
        return Step(None, f"order already {order.state.value}")
    if not payload.get("known"):
        if stuck and order.state is OrderState.PARTIALLY_FILLED:
            # It traded, so the broker had it; it no longer knows it: nothing more will fill.
            return Step(EventType.CANCELLED, "timeout: the broker no longer knows the order; the unfilled rest is void")
        if stuck:
            return Step(EventType.FAILED, "timeout")
        return Step(None, "unknown at the broker")
    updates: dict[str, Any] = {}
    if payload.get("ticket"):
        updates["broker_ticket"] = int(payload["ticket"])
    if payload.get("retcode"):
        updates["retcode"] = int(payload["retcode"])
    state = str(payload.get("state", ""))
    if state not in BROKER_STATE_EVENTS:
        return Step(None, f"broker state {state!r} not understood")
    event = BROKER_STATE_EVENTS[state]
    if event is EventType.SUBMITTED:
        if order.state is not OrderState.PENDING:
            return Step(None, f"broker: {state}; order already {order.state.value}")
        return Step(event, f"broker: {state}", updates)
    reason = "expired" if state == "expired" else f"broker: {state}"
    if event is EventType.REJECTED and payload.get("retcode"):
        reason = retcode_text(int(payload["retcode"]))
    return Step(event, reason, updates)


def on_cancel_result(order: Order, payload: dict[str, Any]) -> Step:
    """The connector's answer to a cancel.  ``payload["reason"]`` says why we cancelled
    (``cancelled`` by a command, ``expired`` by the time in force).  A refusal (the order
    filled or triggered first, a market order, a closed market) is returned as a Step with
    no event and the broker's words: the fill, if any, comes through the fills stream."""
    if order.state.is_final:
        return Step(None, f"order already {order.state.value}")
    why = str(payload.get("reason") or "cancelled")
    if payload.get("no_reply"):
        status = payload.get("status")
        if isinstance(status, dict) and status.get("known") and status.get("state") in ("cancelled", "expired"):
            return Step(EventType.CANCELLED, why)
        return Step(None, "no reply from the connector to the cancel; the broker's status decides")
    retcode = int(payload.get("retcode", 0))
    if retcode == Retcode.DONE:
        return Step(EventType.CANCELLED, why)
    text = retcode_text(retcode)
    comment = payload.get("comment")
    return Step(None, f"cancel refused by the broker: {text}: {comment}" if comment else f"cancel refused by the broker: {text}")


def on_modify_result(order: Order, payload: dict[str, Any]) -> tuple[bool, str | None]:
    """``(applied, reason)``: the broker confirmed the modify (10009 DONE), or why not."""
    if payload.get("no_reply"):
        return False, "no reply from the connector to the modify: resend the command (it is idempotent)"
    retcode = int(payload.get("retcode", 0))
    if retcode == Retcode.DONE:
        return True, None
    text = retcode_text(retcode)
    comment = payload.get("comment")
    return False, f"modify refused by the broker: {text}: {comment}" if comment else f"modify refused by the broker: {text}"
