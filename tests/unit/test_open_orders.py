"""tables/open_orders.py: the in-memory index of the orders not final yet."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from app.models import ApprovedSignal, OrderState, OrderType, Side, to_json
from tables.open_orders import OpenOrders, open_entry
from tables.order_state import create_order

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def order(order_id: str, state: OrderState, strategy: str = "trend", expires_at: datetime | None = None):
    signal = ApprovedSignal(signal_id=f"s-{order_id}", symbol="EURUSD", signal_type=Side.BUY, entry_price=1.1,
                            stop_loss=1.095, take_profit=1.11, position_size=0.5, account="acc-1", strategy=strategy)
    o = create_order(signal, order_id, OrderType.MARKET, T0, expires_at=expires_at).order
    return o.model_copy(update={"state": state})


@pytest.mark.parametrize("state", [s for s in OrderState if not s.is_final])
def test_an_open_order_is_indexed_with_when_it_opened_and_expires(state):
    later = T0 + timedelta(hours=1)
    assert open_entry(to_json(order("O-1", state))) == (T0, None)
    assert open_entry(to_json(order("O-1", state, expires_at=later))) == (T0, later)


@pytest.mark.parametrize("state", [s for s in OrderState if s.is_final])
def test_a_final_order_is_left_out_without_being_decoded(state):
    assert open_entry(to_json(order("O-1", state))) is None
    assert open_entry(b'{"order_id":"O-1","state":"%s", not JSON past here' % state.value.encode()) is None


def test_the_state_is_the_orders_own_field_not_text_inside_a_string():
    tricky = order("O-1", OrderState.SUBMITTED, strategy='x","state":"FILLED"')
    assert b'"state":"FILLED' not in to_json(tricky)  # escaped inside the string
    assert open_entry(to_json(tricky)) == (T0, None)


async def test_a_rebuild_keeps_what_the_agent_adds_meanwhile_and_drops_the_old_assignment():
    index = OpenOrders()
    index.add("gone", T0, None)  # of a partition no longer held
    stored = [(b"O-1", to_json(order("O-1", OrderState.PENDING))), (b"O-2", to_json(order("O-2", OrderState.FILLED))),
              (b"O-3", to_json(order("O-3", OrderState.PARTIALLY_FILLED)))]

    async def scan():
        for n, item in enumerate(stored):
            yield item
            if n == 0:
                index.add("O-4", T0 + timedelta(seconds=1), None)  # opened by the agent mid-scan
                await asyncio.sleep(0)

    assert await index.rebuild(frozenset({("orders", 0)}), scan()) == 3
    assert dict(index.items()) == {"O-1": (T0, None), "O-3": (T0, None), "O-4": (T0 + timedelta(seconds=1), None)}
    assert index.assignment == frozenset({("orders", 0)})
    index.remove("O-1")
    assert "O-1" not in index and len(index) == 2


async def test_a_rebuild_that_fails_leaves_the_index_to_be_rebuilt():
    index = OpenOrders()

    async def scan():
        yield b"O-1", to_json(order("O-1", OrderState.PENDING))
        raise RuntimeError("a rebalance began")

    with pytest.raises(RuntimeError):
        await index.rebuild(frozenset({1}), scan())
    assert index.assignment is None
