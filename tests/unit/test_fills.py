"""Fills applied to orders: volumes, VWAP, slippage, duplicates, overfills, final states."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.models import EventType, Fill, Order, OrderState, OrderType, Side
from tables.fills import FillResult, apply_fill
from tables.symbols import DEFAULT_SYMBOLS, SymbolTable, UnknownSymbol

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
NOW = T0 + timedelta(seconds=2)


def order(**kw) -> Order:
    base = dict(
        order_id="o-1",
        signal_id="s-1",
        account="acc-1",
        symbol="EURUSD",
        side=Side.BUY,
        order_type=OrderType.MARKET,
        volume=1.0,
        entry_price=1.10000,
        expected_price=1.10000,
        state=OrderState.SUBMITTED,
        created_at=T0,
        updated_at=T0,
    )
    base.update(kw)
    return Order(**base)


def fill(deal: int, price: float, volume: float, **kw) -> Fill:
    base = dict(order_id="o-1", deal=deal, symbol="EURUSD", side=Side.BUY, price=price, volume=volume, time=T0)
    base.update(kw)
    return Fill(**base)


def step(o: Order, r: FillResult) -> Order:
    """Stand-in for tables.order_state.apply: the updates plus the target state."""
    assert r.accepted and not r.is_duplicate
    return o.model_copy(update={**r.updates, "state": r.to_state})


def test_partial_then_full_fill():
    o = order()
    r1 = apply_fill(o, fill(101, 1.10020, 0.4, ticket=9), DEFAULT_SYMBOLS, NOW)
    assert r1.accepted and not r1.is_duplicate and not r1.alert and not r1.on_final_order
    assert r1.event_type is EventType.PARTIALLY_FILLED and r1.to_state is OrderState.PARTIALLY_FILLED
    assert r1.updates["filled_volume"] == 0.4
    assert r1.updates["avg_fill_price"] == pytest.approx(1.10020, abs=1e-12)
    assert r1.updates["slippage_pips"] == 2.0
    assert r1.updates["deals"] == (101,)
    assert r1.updates["broker_ticket"] == 9
    assert r1.updates["updated_at"] == NOW
    assert "filled_at" not in r1.updates
    assert r1.fill_slippage_pips == 2.0
    o = step(o, r1)

    r2 = apply_fill(o, fill(102, 1.10050, 0.6, ticket=9), DEFAULT_SYMBOLS, NOW)
    assert r2.event_type is EventType.FILLED and r2.to_state is OrderState.FILLED
    assert r2.updates["filled_volume"] == 1.0
    assert r2.updates["avg_fill_price"] == pytest.approx(1.10038, abs=1e-12)  # 0.4*1.1002 + 0.6*1.1005
    assert r2.updates["slippage_pips"] == 3.8
    assert r2.updates["deals"] == (101, 102)
    assert r2.updates["filled_at"] == NOW
    assert "broker_ticket" not in r2.updates  # already known
    assert r2.fill_slippage_pips == 5.0 and not r2.alert  # 5.0 is not above 5

    e = r2.execution
    assert e is not None
    assert (e.execution_id, e.order_id, e.signal_id, e.account, e.symbol, e.side) == (
        "o-1:102",
        "o-1",
        "s-1",
        "acc-1",
        "EURUSD",
        Side.BUY,
    )
    assert (e.deal, e.ticket, e.price, e.volume, e.expected_price) == (102, 9, 1.10050, 0.6, 1.10000)
    assert (e.slippage_pips, e.cumulative_volume, e.order_state, e.time) == (5.0, 1.0, OrderState.FILLED, T0)
    assert e.avg_fill_price == pytest.approx(1.10038, abs=1e-12)


def test_sell_order_slippage_and_alert():
    o = order(side=Side.SELL, symbol="USDJPY", expected_price=151.500, volume=0.5)
    r = apply_fill(o, fill(7, 151.440, 0.5, side=Side.SELL, symbol="USDJPY"), DEFAULT_SYMBOLS, NOW)
    assert r.fill_slippage_pips == 6.0 and r.alert  # sold 6 pips below expected: adverse
    assert r.updates["slippage_pips"] == 6.0
    assert r.event_type is EventType.FILLED
    # favourable beyond the threshold alerts too; a higher threshold silences it
    r = apply_fill(o, fill(8, 151.560, 0.5, side=Side.SELL, symbol="USDJPY"), DEFAULT_SYMBOLS, NOW)
    assert r.fill_slippage_pips == -6.0 and r.alert
    r = apply_fill(o, fill(8, 151.560, 0.5, side=Side.SELL, symbol="USDJPY"), DEFAULT_SYMBOLS, NOW, alert_threshold_pips=10)
    assert not r.alert


def test_gold_uses_its_pip():
    o = order(symbol="XAUUSD", expected_price=2345.60, volume=0.1)
    r = apply_fill(o, fill(1, 2346.00, 0.1, symbol="XAUUSD"), DEFAULT_SYMBOLS, NOW)
    assert r.fill_slippage_pips == 4.0 and not r.alert  # 0.40 USD = 4 pips of 0.1
    custom = SymbolTable({"XAUUSD": {"pip_size": 0.01}})
    assert apply_fill(o, fill(1, 2346.00, 0.1, symbol="XAUUSD"), custom, NOW).fill_slippage_pips == 40.0


def test_float_volumes_sum_exactly():
    o = order(volume=0.3)
    r = apply_fill(o, fill(1, 1.1, 0.1), DEFAULT_SYMBOLS, NOW)
    o = step(o, r)
    r = apply_fill(o, fill(2, 1.1, 0.2), DEFAULT_SYMBOLS, NOW)
    assert r.event_type is EventType.FILLED and r.updates["filled_volume"] == 0.3


def test_duplicate_changes_nothing():
    o = step(order(), apply_fill(order(), fill(101, 1.1002, 0.4), DEFAULT_SYMBOLS, NOW))
    r = apply_fill(o, fill(101, 1.1002, 0.4), DEFAULT_SYMBOLS, NOW)
    assert r.is_duplicate and r.updates == {} and r.execution is None and r.event_type is None
    assert not r.alert
    # even a "duplicate" with other numbers: the deal ticket is the identity
    assert apply_fill(o, fill(101, 1.2, 0.6), DEFAULT_SYMBOLS, NOW).is_duplicate


def test_overfill_is_refused_but_reported():
    o = step(order(), apply_fill(order(), fill(1, 1.1000, 0.7), DEFAULT_SYMBOLS, NOW))
    r = apply_fill(o, fill(2, 1.1010, 0.5), DEFAULT_SYMBOLS, NOW)
    assert not r.accepted and not r.is_duplicate
    assert "overfill" in r.reason and "1.2" in r.reason
    assert r.updates == {} and r.event_type is None and r.to_state is None
    assert r.execution is not None and r.execution.cumulative_volume == 1.2
    assert r.execution.order_state is OrderState.PARTIALLY_FILLED  # the order did not move
    assert r.fill_slippage_pips == 10.0 and r.alert


def test_new_deal_on_filled_order_is_an_overfill():
    o = step(order(), apply_fill(order(), fill(1, 1.1, 1.0), DEFAULT_SYMBOLS, NOW))
    assert o.state is OrderState.FILLED
    r = apply_fill(o, fill(2, 1.1, 0.01), DEFAULT_SYMBOLS, NOW)
    assert not r.accepted and "overfill" in r.reason
    assert r.execution.order_state is OrderState.FILLED
    assert apply_fill(o, fill(1, 1.1, 1.0), DEFAULT_SYMBOLS, NOW).is_duplicate


def test_fill_before_submit_reply_is_accepted():
    r = apply_fill(order(state=OrderState.PENDING), fill(1, 1.1, 1.0), DEFAULT_SYMBOLS, NOW)
    assert r.accepted and r.event_type is EventType.FILLED and not r.on_final_order


@pytest.mark.parametrize("state", [OrderState.CANCELLED, OrderState.REJECTED, OrderState.FAILED])
def test_fill_on_final_order_returns_the_data(state):
    r = apply_fill(order(state=state), fill(1, 1.1001, 0.25), DEFAULT_SYMBOLS, NOW)
    assert r.accepted and r.on_final_order
    assert r.event_type is EventType.PARTIALLY_FILLED
    assert r.updates["filled_volume"] == 0.25 and r.updates["deals"] == (1,)
    assert r.execution.order_state is state  # the state machine will not move it
    assert r.execution.cumulative_volume == 0.25 and r.fill_slippage_pips == 1.0


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"order_id": "o-2"}, "fill for order o-2"),
        ({"symbol": "GBPUSD"}, "symbol"),
        ({"side": Side.SELL}, "side"),
        ({"volume": 1e-10}, "volume unit"),
    ],
)
def test_inconsistent_fill_is_refused(kw, match):
    args = {"deal": 5, "price": 1.1, "volume": 0.1, **kw}
    r = apply_fill(order(), fill(**args), DEFAULT_SYMBOLS, NOW)
    assert not r.accepted and r.execution is None and r.updates == {}
    assert match in r.reason


def test_unknown_symbol_raises():
    t = SymbolTable(defaults=False)
    with pytest.raises(UnknownSymbol):
        apply_fill(order(), fill(1, 1.1, 0.1), t, NOW)


# ---------------------------------------------------------------------------------------
# Property: any delivery order, with duplicates, gives the VWAP of the distinct fills.
# ---------------------------------------------------------------------------------------


@st.composite
def fill_plan(draw):
    n = draw(st.integers(1, 8))
    lots = draw(st.lists(st.integers(1, 500), min_size=n, max_size=n))  # in 0.01 lot
    points = draw(st.lists(st.integers(-300, 300), min_size=n, max_size=n))  # vs 1.08000
    side = draw(st.sampled_from([Side.BUY, Side.SELL]))
    fills = [
        fill(1000 + i, round(1.08 + p / 1e5, 5), lots[i] / 100, side=side) for i, (p) in enumerate(points)
    ]
    dups = draw(st.lists(st.sampled_from(fills), max_size=6))
    seq = fills + dups
    seed = draw(st.integers(0, 2**32 - 1))
    random.Random(seed).shuffle(seq)
    return side, fills, seq


@settings(max_examples=150, deadline=None)
@given(fill_plan())
def test_any_sequence_gives_sum_and_vwap_of_distinct_fills(plan):
    side, fills, seq = plan
    total = sum(round(f.volume * 100) for f in fills) / 100
    o = order(side=side, volume=total, expected_price=1.08)
    seen: set[int] = set()
    for f in seq:
        r = apply_fill(o, f, DEFAULT_SYMBOLS, NOW)
        if f.deal in seen:
            assert r.is_duplicate and r.updates == {}
            continue
        seen.add(f.deal)
        assert r.accepted
        expected_state = OrderState.FILLED if len(seen) == len(fills) else OrderState.PARTIALLY_FILLED
        assert r.to_state is expected_state
        o = step(o, r)
    vwap = sum(f.price * f.volume for f in fills) / sum(f.volume for f in fills)
    assert o.state is OrderState.FILLED
    assert o.filled_volume == total
    assert o.avg_fill_price == pytest.approx(vwap, rel=1e-12)
    assert sorted(o.deals) == sorted(f.deal for f in fills)
    assert o.slippage_pips == pytest.approx((vwap - 1.08) * side.sign / 0.0001, abs=0.05 + 1e-9)
    assert o.remaining_volume == 0.0
    extra = apply_fill(o, fill(99, 1.08, 0.01, side=side), DEFAULT_SYMBOLS, NOW)
    assert not extra.accepted and "overfill" in extra.reason


def test_volume_unit_is_1e8_lot():
    o = order(volume=1.0)
    assert apply_fill(o, fill(1, 1.1, 0.99999999), DEFAULT_SYMBOLS, NOW).event_type is EventType.PARTIALLY_FILLED
    r = apply_fill(o, fill(1, 1.1, 1.000000001), DEFAULT_SYMBOLS, NOW)  # below one unit: full, not overfill
    assert r.accepted and r.event_type is EventType.FILLED and r.updates["filled_volume"] == 1.0
    assert not apply_fill(o, fill(1, 1.1, 1.00000001), DEFAULT_SYMBOLS, NOW).accepted
