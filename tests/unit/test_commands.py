"""Pure logic of the command layer: decisions, the slippage cap across requotes, reduce-only,
time in force, exits, and the broker's answers to cancels and status queries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from app.models import (
    ApprovedSignal,
    EventType,
    Fill,
    ModifyOrder,
    OrderIntent,
    OrderState,
    OrderType,
    Position,
    Side,
    TimeInForce,
)
from app.mt5 import contract
from tables import order_state
from tables.commands import closing_lots, decide_cancel, decide_close, decide_expire, decide_modify, is_repeat, remember
from tables.fills import apply_fill, exit_execution
from tables.order_types import (
    MAGIC,
    end_of_day,
    mt5_time,
    order_expiry,
    reduce_only_refusal,
    reprice,
    service_expiry,
    trade_request_fields,
)
from tables.submission import on_broker_status, on_cancel_result, on_modify_result, on_submit_result
from tables.symbols import DEFAULT_SYMBOLS

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
OID = "O" + "b" * 30
EURUSD = DEFAULT_SYMBOLS["EURUSD"]


def make(order_type=OrderType.MARKET, state=OrderState.SUBMITTED, side="buy", **kw):
    fields = {"signal_id": "s-1", "symbol": "EURUSD", "signal_type": side, "entry_price": 1.1,
              "position_size": 1.0, "account": "acc"}
    fields.update(kw)
    o = order_state.create_order(ApprovedSignal(**fields), OID, order_type, T0).order
    return o.model_copy(update={"state": state})


# ------------------------------------------------------------------ decisions
@pytest.mark.parametrize("state", [OrderState.FILLED, OrderState.CANCELLED, OrderState.REJECTED, OrderState.FAILED])
def test_cancel_of_a_final_order_is_refused(state):
    d = decide_cancel(make(OrderType.LIMIT, state))
    assert not d.accepted and d.status == 409 and state.value in d.reason


def test_cancel_decisions():
    assert decide_cancel(None).status == 404
    assert decide_cancel(make(OrderType.LIMIT, OrderState.SUBMITTED)).accepted
    assert decide_cancel(make(OrderType.STOP, OrderState.PARTIALLY_FILLED)).accepted
    assert "market" in decide_cancel(make(OrderType.MARKET, OrderState.SUBMITTED)).reason
    assert decide_cancel(make(OrderType.MARKET, OrderState.PARTIALLY_FILLED)).accepted  # its rest
    assert "PENDING" in decide_cancel(make(OrderType.LIMIT, OrderState.PENDING)).reason


def test_modify_decisions():
    limit = make(OrderType.LIMIT, OrderState.SUBMITTED, limit_price=1.09, stop_loss=1.08, take_profit=1.12)
    assert decide_modify(limit, ModifyOrder(price=1.095)).accepted
    # SL must stay below the (new) price of a buy.
    bad = decide_modify(limit, ModifyOrder(price=1.075))
    assert not bad.accepted and "stop_loss" in bad.reason
    assert not decide_modify(make(OrderType.LIMIT, OrderState.REJECTED), ModifyOrder(stop_loss=1.0)).accepted
    # A filled order: SL/TP of its position only.
    filled = make(OrderType.MARKET, OrderState.FILLED).model_copy(update={"avg_fill_price": 1.1, "position_ticket": 7})
    assert decide_modify(filled, ModifyOrder(stop_loss=1.09, take_profit=1.2)).accepted
    assert "price" in decide_modify(filled, ModifyOrder(price=1.2)).reason
    assert "take_profit" in decide_modify(filled, ModifyOrder(take_profit=1.05)).reason
    assert decide_modify(None, ModifyOrder(price=1.0)).status == 404
    with pytest.raises(ValueError):
        ModifyOrder()


def test_close_decisions():
    pos = Position(account="acc", symbol="EURUSD", net_volume=0.5, avg_open_price=1.1, updated_at=T0)
    whole = decide_close(pos, None)
    assert whole.accepted and whole.side is Side.SELL and whole.volume == 0.5
    part = decide_close(pos.model_copy(update={"net_volume": -0.3}), 0.1)
    assert part.accepted and part.side is Side.BUY and part.volume == 0.1
    assert decide_close(None, None).status == 404
    flat = decide_close(pos.model_copy(update={"net_volume": 0.0}), None)
    assert flat.status == 409 and "flat" in flat.reason
    assert "above" in decide_close(pos, 0.6).reason


def test_a_close_leaves_the_lots_earlier_closes_are_taking():
    """Closes of one position sent back to back, or one sent as soon as the last is FILLED
    (its deal not yet in the position): each closes only what the others leave."""
    pos = Position(account="acc", symbol="EURUSD", net_volume=0.2, avg_open_price=1.1, deals=(1, 2), updated_at=T0)
    half = make(side="sell", position_size=0.1).model_copy(update={"state": OrderState.PENDING})
    # In flight, nothing filled: its 0.1 is taken; the rest is 0.1.
    lots, settled = closing_lots(pos, {"c1": (half, {})})
    assert lots == 0.1 and settled == []
    rest = decide_close(pos, None, lots)
    assert rest.accepted and rest.volume == 0.1
    assert "not being closed already" in decide_close(pos, 0.2, lots).reason
    # FILLED, its deal 3 not applied to the position yet: still taken.
    filled = half.model_copy(update={"state": OrderState.FILLED, "filled_volume": 0.1, "deals": (3,)})
    assert closing_lots(pos, {"c1": (filled, {3: 0.1})}) == (0.1, [])
    # Deal applied (the net shows it): settled, nothing taken.
    applied = pos.model_copy(update={"net_volume": 0.1, "deals": (1, 2, 3)})
    assert closing_lots(applied, {"c1": (filled, {3: 0.1})}) == (0.0, ["c1"])
    # Partly filled and partly applied: the unfilled rest and the unapplied deal.
    part = half.model_copy(update={"state": OrderState.PARTIALLY_FILLED, "volume": 0.3, "filled_volume": 0.2})
    assert closing_lots(pos, {"c1": (part, {3: 0.1, 4: 0.1}), "gone": (None, {})}) == (0.3, ["gone"])
    pos_deal_3 = pos.model_copy(update={"deals": (1, 2, 3)})
    assert closing_lots(pos_deal_3, {"c1": (part, {3: 0.1, 4: 0.1})}) == (0.2, [])
    # Everything being closed: a close-all is refused, with the reason.
    taken = decide_close(pos, None, 0.2)
    assert taken.status == 409 and "being closed already" in taken.reason


def test_expire_decision():
    o = make(OrderType.LIMIT, OrderState.SUBMITTED).model_copy(update={"expires_at": T0})
    assert decide_expire(o, T0 + timedelta(seconds=1)).accepted
    assert not decide_expire(o, T0 - timedelta(seconds=1)).accepted
    assert not decide_expire(o.model_copy(update={"state": OrderState.FILLED}), T0 + timedelta(1)).accepted


def test_command_ids_act_once_and_are_bounded():
    o = make()
    assert not is_repeat(o, "c1")
    o = o.model_copy(update={"commands": remember(o, "c1")})
    assert is_repeat(o, "c1") and not is_repeat(o, None)
    for n in range(100):
        o = o.model_copy(update={"commands": remember(o, f"x{n}")})
    assert len(o.commands) == 32 and o.commands[-1] == "x99"


# ------------------------------------------------------------------ slippage cap, reduce-only
def test_requote_within_the_cap_keeps_every_fill_within_it():
    o = make(entry_price=1.10000)
    # The ask moved 1 pip against a buy: resend at it, with 2 pips of deviation left.
    price, deviation = reprice(o, EURUSD, 3, bid=1.10000, ask=1.10010)
    assert price == 1.1001 and deviation == 20
    # Favourable: more room.
    assert reprice(o, EURUSD, 3, bid=1.09980, ask=1.09990)[1] == 40


def test_requote_beyond_the_cap_is_refused():
    o = make(entry_price=1.10000)
    reason = reprice(o, EURUSD, 3, bid=1.10090, ask=1.10100)
    assert isinstance(reason, str) and "slippage cap" in reason and "max_slippage_pips 3" in reason
    sell = make(side="sell", entry_price=1.10000)
    assert isinstance(reprice(sell, EURUSD, 3, bid=1.09960, ask=1.09970), str)


def test_requote_never_reprices_a_pending_order():
    assert isinstance(reprice(make(OrderType.LIMIT, limit_price=1.09), EURUSD, 3, 1.1, 1.1001), str)


def test_cap_refusal_rejects_the_order():
    step = on_submit_result(make(state=OrderState.PENDING), {"retcode": 10004, "refused": "slippage cap: x"}, 2)
    assert step.event_type is EventType.REJECTED and step.reason == "slippage cap: x"
    assert step.updates["attempts"] == 2


def test_the_submission_answer_records_the_arrival_price():
    answer = {"retcode": 10009, "order": 7, "bid": 1.10010, "ask": 1.10022}
    buy = on_submit_result(make(state=OrderState.PENDING), answer, 1)
    sell = on_submit_result(make(state=OrderState.PENDING, side="sell"), answer, 1)
    assert (buy.updates["arrival_price"], sell.updates["arrival_price"]) == (1.10022, 1.10010)  # the touch
    no_quote = on_submit_result(make(state=OrderState.PENDING), {"no_reply": True}, 1)
    assert "arrival_price" not in no_quote.updates
    # the state machine takes it (the orders agent applies the step's updates with the event)
    submitted = order_state.apply(make(state=OrderState.PENDING), buy.event_type, T0, **buy.updates).order
    assert (submitted.state, submitted.arrival_price) == (OrderState.SUBMITTED, 1.10022)


def test_reduce_only():
    buy = make(side="buy")  # 1 lot
    assert reduce_only_refusal(buy, -2.0) == ""
    assert "grow" in reduce_only_refusal(buy, 0.0)
    assert "grow" in reduce_only_refusal(buy, 0.5)
    assert "reverse" in reduce_only_refusal(buy, -0.5)


# ------------------------------------------------------------------ time in force
def test_time_in_force():
    assert end_of_day(T0) == datetime(2026, 12, 2, tzinfo=UTC)
    assert order_expiry(TimeInForce.DAY, None, T0) == datetime(2026, 12, 2, tzinfo=UTC)
    assert order_expiry(TimeInForce.GTD, T0 + timedelta(hours=1), T0) == T0 + timedelta(hours=1)
    assert order_expiry(TimeInForce.GTC, None, T0) is None
    gtd = make(OrderType.LIMIT, limit_price=1.09).model_copy(
        update={"time_in_force": TimeInForce.GTD, "expires_at": T0 + timedelta(hours=1)})
    assert mt5_time(gtd, EURUSD) == (2, T0 + timedelta(hours=1))
    # The broker does not expire silver orders: GTC, the service expires it.
    assert mt5_time(gtd.model_copy(update={"symbol": "XAGUSD"}), DEFAULT_SYMBOLS["XAGUSD"]) == (0, None)
    f = trade_request_fields(gtd, EURUSD, 3, MAGIC)
    assert contract.TradeRequest(**f).type_time is contract.OrderTime.SPECIFIED
    # The service cancels an expired order at its expiry where the broker does not expire it;
    # where the broker does, after a grace only (a cancel on time races the broker's expiry).
    grace = timedelta(seconds=5)
    assert service_expiry(gtd, EURUSD, grace) == T0 + timedelta(hours=1, seconds=5)
    assert service_expiry(gtd.model_copy(update={"symbol": "XAGUSD"}), DEFAULT_SYMBOLS["XAGUSD"], grace) == T0 + timedelta(hours=1)
    assert service_expiry(make(OrderType.LIMIT, limit_price=1.09), EURUSD, grace) is None


def test_signal_time_in_force_validation():
    with pytest.raises(ValueError, match="expires_at"):
        ApprovedSignal(signal_id="s", symbol="EURUSD", signal_type="buy", entry_price=1.1, position_size=1,
                       time_in_force="GTD")
    with pytest.raises(ValueError, match="expires_at"):
        ApprovedSignal(signal_id="s", symbol="EURUSD", signal_type="buy", entry_price=1.1, position_size=1,
                       time_in_force="DAY", expires_at=T0)


# ------------------------------------------------------------------ closes and exits
def test_close_order_request_names_the_position_and_has_no_price():
    t = order_state.create_close_order("O" + "c" * 30, "cmd-1", "acc", "EURUSD", Side.SELL, 0.4, 1.1, 555, T0)
    assert t.order.intent is OrderIntent.CLOSE and t.order.commands == ("cmd-1",)
    f = trade_request_fields(t.order, EURUSD, 3, MAGIC)
    assert f["position"] == 555 and f["price"] == 0.0 and f["sl"] == 0.0 and f["volume"] == 0.4
    # A close's fills carry no slippage (it has no price of its own).
    fill = Fill(order_id=t.order.order_id, deal=9, symbol="EURUSD", side="sell", price=1.2, volume=0.4, time=T0,
                magic=MAGIC, entry="out", position=555, profit=40.0)
    r = apply_fill(t.order, fill, DEFAULT_SYMBOLS, T0)
    assert r.execution.slippage_pips == 0.0 and r.execution.entry == "out" and r.execution.profit == 40.0


def test_exit_execution_from_a_stop_loss():
    opened = make(stop_loss=1.095, take_profit=1.11, state=OrderState.FILLED)
    sl = Fill(order_id=OID, deal=11, ticket=12, symbol="EURUSD", side="sell", price=1.0948, volume=1.0, time=T0,
              account="acc", magic=MAGIC, entry="out", reason="sl", position=5, profit=-520.0)
    ex = exit_execution(opened, sl, DEFAULT_SYMBOLS)
    assert (ex.side, ex.entry, ex.reason, ex.position, ex.profit) == (Side.SELL, "out", "sl", 5, -520.0)
    assert ex.expected_price == 1.095 and ex.slippage_pips == pytest.approx(2.0)  # 2 pips below the stop
    assert ex.signal_id == "s-1" and ex.execution_id == f"{OID}:11"
    # The opening order is gone from the table: still an execution, from the deal alone.
    bare = exit_execution(None, sl, DEFAULT_SYMBOLS)
    assert bare.account == "acc" and bare.slippage_pips == 0.0 and bare.signal_id == ""


def test_foreign_deal_routing_key():
    manual = Fill(deal=77, symbol="EURUSD", side="buy", price=1.1, volume=0.1, time=T0, magic=0, reason="client")
    assert manual.routing_key == "deal-77" and manual.is_exit


# ------------------------------------------------------------------ the broker's answers
def test_cancel_results():
    o = make(OrderType.LIMIT, OrderState.SUBMITTED)
    assert on_cancel_result(o, {"retcode": 10009, "reason": "expired"}).event_type is EventType.CANCELLED
    assert on_cancel_result(o, {"retcode": 10009, "reason": "expired"}).reason == "expired"
    refused = on_cancel_result(o, {"retcode": 10013, "comment": "order already filled"})
    assert refused.event_type is None and "10013" in refused.reason
    lost = on_cancel_result(o, {"no_reply": True, "status": {"known": True, "state": "cancelled"}})
    assert lost.event_type is EventType.CANCELLED
    assert on_modify_result(o, {"retcode": 10009}) == (True, None)
    assert not on_modify_result(o, {"retcode": 10025})[0]


def test_a_partially_filled_order_the_broker_forgot_ends_cancelled():
    o = make(OrderType.LIMIT, OrderState.PARTIALLY_FILLED)
    step = on_broker_status(o, {"known": False}, stuck=True)
    assert step.event_type is EventType.CANCELLED and "timeout" in step.reason
    assert order_state.apply(o, step.event_type, T0, reason=step.reason).applied


def test_broker_expiry_reason():
    step = on_broker_status(make(OrderType.LIMIT), {"known": True, "state": "expired"}, stuck=True)
    assert step.event_type is EventType.CANCELLED and step.reason == "expired"


def test_amend_bumps_the_version():
    o = make(OrderType.LIMIT, limit_price=1.09)
    changed = order_state.amend(o, T0, **order_state.modified_prices(o, 1.095, 1.08, None))
    assert changed.version == o.version + 1 and changed.limit_price == 1.095 and changed.expected_price == 1.095
    assert changed.stop_loss == 1.08 and changed.state is o.state
    with pytest.raises(TypeError):
        order_state.amend(o, T0, state=OrderState.FILLED)
