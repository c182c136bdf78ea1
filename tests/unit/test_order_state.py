"""The order state machine: legal and illegal transitions, creation, refusals, event ids."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.models import (
    ApprovedSignal,
    EventType,
    Order,
    OrderEvent,
    OrderState,
    OrderType,
    Side,
    to_json,
)
from tables import order_state
from tables.order_state import (
    ALLOWED_UPDATES,
    EVENT_FOR_STATE,
    INFORMATIONAL_EVENTS,
    LIFECYCLE_EVENTS,
    TRANSITIONS,
    Transition,
    apply,
    create_order,
    is_legal,
    legal_events,
    record,
)

E = EventType
S = OrderState
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(seconds=1)
T2 = T0 + timedelta(seconds=2)

#: The contract, written out by hand (not derived from TRANSITIONS).
LEGAL = {
    (None, E.CREATED): S.PENDING,
    (S.PENDING, E.SUBMITTED): S.SUBMITTED,
    (S.PENDING, E.PARTIALLY_FILLED): S.PARTIALLY_FILLED,
    (S.SUBMITTED, E.PARTIALLY_FILLED): S.PARTIALLY_FILLED,
    (S.PARTIALLY_FILLED, E.PARTIALLY_FILLED): S.PARTIALLY_FILLED,
    (S.PENDING, E.FILLED): S.FILLED,
    (S.SUBMITTED, E.FILLED): S.FILLED,
    (S.PARTIALLY_FILLED, E.FILLED): S.FILLED,
    (S.PENDING, E.CANCELLED): S.CANCELLED,
    (S.SUBMITTED, E.CANCELLED): S.CANCELLED,
    (S.PARTIALLY_FILLED, E.CANCELLED): S.CANCELLED,
    (S.PENDING, E.REJECTED): S.REJECTED,
    (S.SUBMITTED, E.REJECTED): S.REJECTED,
    (S.PENDING, E.FAILED): S.FAILED,
    (S.SUBMITTED, E.FAILED): S.FAILED,
}
FINAL = (S.FILLED, S.CANCELLED, S.REJECTED, S.FAILED)
ALL_STATES: list[OrderState | None] = [None, *OrderState]
LIFECYCLE = [E.CREATED, E.SUBMITTED, E.PARTIALLY_FILLED, E.FILLED, E.CANCELLED, E.REJECTED, E.FAILED]


def signal(**kw) -> ApprovedSignal:
    base = dict(
        signal_id="sig-1",
        symbol="EURUSD",
        signal_type=Side.BUY,
        entry_price=1.10000,
        stop_loss=1.09500,
        take_profit=1.11000,
        position_size=0.5,
        account="acc-1",
        strategy="trend",
    )
    base.update(kw)
    return ApprovedSignal(**base)


def order_in(state: OrderState, version: int = 3) -> Order:
    o = create_order(signal(), "O-1", OrderType.MARKET, T0).order
    return o.model_copy(update={"state": state, "version": version})


# --------------------------------------------------------------------------------------
# The transition table
# --------------------------------------------------------------------------------------


def test_transition_table_is_exactly_the_contract():
    assert TRANSITIONS == LEGAL


@pytest.mark.parametrize("state", ALL_STATES, ids=lambda s: str(s))
@pytest.mark.parametrize("event", LIFECYCLE, ids=lambda e: e.value)
def test_is_legal_matches_contract(state, event):
    assert is_legal(state, event) is ((state, event) in LEGAL)


@pytest.mark.parametrize(
    "state,event",
    [
        (S.FILLED, E.SUBMITTED),
        (S.REJECTED, E.FILLED),
        (S.REJECTED, E.PARTIALLY_FILLED),
        (S.SUBMITTED, E.SUBMITTED),
        (S.PARTIALLY_FILLED, E.SUBMITTED),
        (S.PARTIALLY_FILLED, E.REJECTED),
        (S.PARTIALLY_FILLED, E.FAILED),
        (S.CANCELLED, E.FILLED),
        (S.FAILED, E.SUBMITTED),
        (S.PENDING, E.CREATED),
        (None, E.SUBMITTED),
    ],
)
def test_named_illegal_transitions(state, event):
    assert not is_legal(state, event)


@pytest.mark.parametrize("state", FINAL)
def test_final_states_accept_nothing(state):
    assert legal_events(state) == frozenset()
    assert state.is_final


def test_event_for_state_leads_into_that_state():
    assert set(EVENT_FOR_STATE) == set(OrderState)
    for state, event in EVENT_FOR_STATE.items():
        assert state in {to for (_, e), to in LEGAL.items() if e is event}
    assert EVENT_FOR_STATE[S.PENDING] is E.CREATED
    assert LIFECYCLE_EVENTS == frozenset(LIFECYCLE)
    assert INFORMATIONAL_EVENTS == {
        E.TRANSITION_REFUSED, E.DUPLICATE_SIGNAL, E.SLIPPAGE_ALERT, E.POSITION_CORRECTED, E.COMMAND_ACCEPTED,
        E.COMMAND_REFUSED, E.DUPLICATE_COMMAND, E.MODIFIED, E.POSITION_EXIT, E.FOREIGN_DEAL,
    }


# --------------------------------------------------------------------------------------
# create_order
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "order_type,kw,expected,trigger,limit",
    [
        (OrderType.MARKET, {}, 1.10000, None, None),
        (OrderType.MARKET, {"limit_price": 1.0990, "trigger_price": 1.1010}, 1.10000, None, None),
        (OrderType.LIMIT, {"limit_price": 1.09900}, 1.09900, None, 1.09900),
        (OrderType.LIMIT, {}, 1.10000, None, 1.10000),  # no limit price: the entry
        (OrderType.STOP, {"trigger_price": 1.10100}, 1.10100, 1.10100, None),
        (OrderType.STOP, {}, 1.10000, 1.10000, None),  # no trigger: the entry
        (OrderType.STOP_LIMIT, {"trigger_price": 1.10100, "limit_price": 1.10150}, 1.10150, 1.10100, 1.10150),
        (OrderType.STOP_LIMIT, {"trigger_price": 1.10100}, 1.10100, 1.10100, 1.10100),  # default type
        (OrderType.STOP_LIMIT, {}, 1.10000, 1.10000, 1.10000),
    ],
)
def test_create_order_per_type(order_type, kw, expected, trigger, limit):
    s = signal(**kw)
    t = create_order(s, "O-abc", order_type, T0)
    assert isinstance(t, Transition) and t.applied
    o = t.order
    assert o.order_type is order_type
    assert (o.expected_price, o.trigger_price, o.limit_price) == (expected, trigger, limit)
    assert o.entry_price == 1.10000
    assert o.state is S.PENDING and o.version == 1
    assert (o.order_id, o.signal_id, o.account, o.strategy, o.symbol, o.side) == (
        "O-abc", "sig-1", "acc-1", "trend", "EURUSD", Side.BUY,
    )
    assert (o.volume, o.stop_loss, o.take_profit) == (0.5, 1.09500, 1.11000)
    assert (o.filled_volume, o.deals, o.attempts) == (0.0, (), 0)
    assert o.created_at == o.updated_at == T0
    assert o.submitted_at is None and o.filled_at is None
    e = t.event
    assert e.event_id == "O-abc:1:created"
    assert (e.type, e.from_state, e.to_state, e.at) == (E.CREATED, None, S.PENDING, T0)
    assert (e.order_id, e.signal_id, e.symbol, e.account) == ("O-abc", "sig-1", "EURUSD", "acc-1")


def test_create_order_sell_and_stop_limit_signal():
    s = signal(signal_type=Side.SELL, stop_loss=1.105, take_profit=1.09, order_type=OrderType.STOP_LIMIT,
               trigger_price=1.0990, limit_price=1.0985)
    o = create_order(s, "O-s", OrderType.STOP_LIMIT, T0).order
    assert o.side is Side.SELL
    assert (o.expected_price, o.trigger_price, o.limit_price) == (1.0985, 1.0990, 1.0985)


def test_create_order_is_deterministic():
    a = create_order(signal(), "O-1", OrderType.LIMIT, T0)
    b = create_order(signal(), "O-1", OrderType.LIMIT, T0)
    assert to_json(a.order) == to_json(b.order) and to_json(a.event) == to_json(b.event)


# --------------------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------------------


def test_submit_then_partial_then_fill():
    o = create_order(signal(), "O-1", OrderType.MARKET, T0).order
    t = apply(o, E.SUBMITTED, T1, reason="placed", detail={"retcode": 10009}, broker_ticket=77, retcode=10009, attempts=1)
    assert t.applied
    s = t.order
    assert (s.state, s.version, s.updated_at, s.submitted_at) == (S.SUBMITTED, 2, T1, T1)
    assert (s.broker_ticket, s.retcode, s.attempts, s.reason) == (77, 10009, 1, "placed")
    assert s.filled_at is None
    assert o.state is S.PENDING and o.version == 1  # the input is untouched
    e = t.event
    assert e.event_id == "O-1:2:submitted"
    assert (e.type, e.from_state, e.to_state, e.reason, e.detail, e.at) == (
        E.SUBMITTED, S.PENDING, S.SUBMITTED, "placed", {"retcode": 10009}, T1,
    )

    p = apply(s, E.PARTIALLY_FILLED, T2, filled_volume=0.2, avg_fill_price=1.1001, slippage_pips=1.0, deals=(5,))
    assert p.applied and p.order.state is S.PARTIALLY_FILLED and p.order.version == 3
    assert p.order.reason is None  # a transition without a reason clears the old one
    assert p.order.submitted_at == T1 and p.order.filled_at is None
    assert p.event.event_id == "O-1:3:partially_filled"

    p2 = apply(p.order, E.PARTIALLY_FILLED, T2, filled_volume=0.3, deals=(5, 6))
    assert p2.applied and p2.order.version == 4 and p2.order.deals == (5, 6)

    f = apply(p2.order, E.FILLED, T2 + timedelta(seconds=1), filled_volume=0.5, deals=(5, 6, 7))
    assert f.applied and f.order.state is S.FILLED and f.order.version == 5
    assert f.order.filled_at == T2 + timedelta(seconds=1)
    assert f.event.event_id == "O-1:5:filled"


def test_fill_can_overtake_submit_reply():
    o = create_order(signal(), "O-1", OrderType.MARKET, T0).order
    t = apply(o, E.FILLED, T1, filled_volume=0.5, filled_at=T0 + timedelta(milliseconds=5))
    assert t.applied and t.order.state is S.FILLED
    assert t.order.filled_at == T0 + timedelta(milliseconds=5)  # given: kept
    assert t.order.submitted_at is None


def test_updated_at_can_be_given():
    o = create_order(signal(), "O-1", OrderType.MARKET, T0).order
    assert apply(o, E.SUBMITTED, T2, updated_at=T1).order.updated_at == T1


@pytest.mark.parametrize("state,event", [(S.FILLED, E.SUBMITTED), (S.REJECTED, E.FILLED), (S.SUBMITTED, E.SUBMITTED),
                                         (S.CANCELLED, E.PARTIALLY_FILLED), (S.PENDING, E.CREATED)])
def test_refused_leaves_order_unchanged(state, event):
    o = order_in(state, version=4)
    t = apply(o, event, T2, filled_volume=0.5)
    assert t.applied is False
    assert t.order is o
    e = t.event
    assert e.type is E.TRANSITION_REFUSED
    assert e.event_id == f"O-1:4:refused:{event.value}"
    assert e.reason == f"illegal transition {state.value} -> {LEGAL_TARGET[event].value} (event {event.value})"
    assert e.detail == {"event": event.value, "from": state.value}
    assert (e.from_state, e.to_state, e.at) == (state, None, T2)


LEGAL_TARGET = {e: s for (_, e), s in LEGAL.items()}


def test_refused_reason_text():
    t = apply(order_in(S.FILLED), E.SUBMITTED, T2)
    assert t.event.reason == "illegal transition FILLED -> SUBMITTED (event submitted)"


def test_refused_keeps_caller_detail_and_distinguishes_inputs():
    o = order_in(S.CANCELLED, version=6)
    a = apply(o, E.FILLED, T2, reason="late", detail={"deal": 11}, filled_volume=0.5)
    b = apply(o, E.FILLED, T2, reason="late", detail={"deal": 12}, filled_volume=0.5)
    a2 = apply(o, E.FILLED, T2 + timedelta(hours=1), reason="late", detail={"deal": 11}, filled_volume=0.5)
    assert a.event.detail == {"deal": 11, "event": "filled", "from": "CANCELLED", "reason": "late"}
    assert a.event.event_id.startswith("O-1:6:refused:filled:")
    assert a.event.event_id != b.event.event_id  # two late deals: two records
    assert a.event.event_id == a2.event.event_id  # a replay: the same record
    d = apply(o, E.FILLED, T2, detail={"deal": 11}, discriminator="deal-11")
    assert d.event.event_id == "O-1:6:refused:filled:deal-11"


@pytest.mark.parametrize("bad", ["state", "version", "order_id", "symbol", "volume", "expected_price", "nonsense"])
def test_unknown_update_is_a_type_error(bad):
    o = create_order(signal(), "O-1", OrderType.MARKET, T0).order
    with pytest.raises(TypeError, match=bad):
        apply(o, E.SUBMITTED, T1, **{bad: 1})
    with pytest.raises(TypeError):  # also when the transition would be refused
        apply(order_in(S.FILLED), E.SUBMITTED, T1, **{bad: 1})


def test_allowed_updates_are_order_fields():
    assert ALLOWED_UPDATES <= set(Order.model_fields)
    assert {"state", "version", "order_id", "signal_id"}.isdisjoint(ALLOWED_UPDATES)


def test_badly_typed_update_is_refused_by_validation():
    o = create_order(signal(), "O-1", OrderType.MARKET, T0).order
    with pytest.raises(ValueError):
        apply(o, E.SUBMITTED, T1, attempts="many")


@pytest.mark.parametrize("event", sorted(INFORMATIONAL_EVENTS, key=lambda e: e.value))
def test_apply_rejects_informational_events(event):
    with pytest.raises(ValueError, match="record"):
        apply(order_in(S.SUBMITTED), event, T1)


# --------------------------------------------------------------------------------------
# record
# --------------------------------------------------------------------------------------


def test_record_does_not_change_the_order_and_is_deterministic():
    o = order_in(S.FILLED, version=5)
    before = to_json(o)
    e = record(o, E.DUPLICATE_SIGNAL, T2, reason="signal already has an order", detail={"first_seen": None})
    assert to_json(o) == before
    assert isinstance(e, OrderEvent)
    assert e.event_id == "O-1:5:duplicate_signal"
    assert (e.type, e.from_state, e.to_state, e.reason, e.at) == (E.DUPLICATE_SIGNAL, S.FILLED, None, "signal already has an order", T2)
    assert e.detail == {"first_seen": None}
    assert record(o, E.DUPLICATE_SIGNAL, T2 + timedelta(minutes=1)).event_id == e.event_id


def test_record_discriminator_separates_alerts():
    o = order_in(S.PARTIALLY_FILLED, version=3)
    a = record(o, E.SLIPPAGE_ALERT, T2, detail={"deal": 1}, discriminator="deal-1")
    b = record(o, E.SLIPPAGE_ALERT, T2, detail={"deal": 2}, discriminator="deal-2")
    assert a.event_id == "O-1:3:slippage_alert:deal-1"
    assert b.event_id == "O-1:3:slippage_alert:deal-2"
    assert record(o, E.TRANSITION_REFUSED, T2, reason="overfill", discriminator="deal-3").event_id == (
        "O-1:3:transition_refused:deal-3"
    )


@pytest.mark.parametrize("event", LIFECYCLE, ids=lambda e: e.value)
def test_record_rejects_lifecycle_events(event):
    with pytest.raises(ValueError, match="apply"):
        record(order_in(S.SUBMITTED), event, T1)


# --------------------------------------------------------------------------------------
# Property: any sequence of events keeps the machine consistent
# --------------------------------------------------------------------------------------

datetimes = st.datetimes(
    min_value=datetime(2024, 1, 1), max_value=datetime(2025, 1, 1), timezones=st.just(UTC)
)
update_values = {
    "filled_volume": st.floats(0, 1000, allow_nan=False),
    "avg_fill_price": st.none() | st.floats(0.01, 1000, allow_nan=False),
    "slippage_pips": st.none() | st.floats(-100, 100, allow_nan=False),
    "deals": st.lists(st.integers(1, 2**62), max_size=4).map(tuple),
    "updated_at": datetimes,
    "filled_at": datetimes,
    "submitted_at": datetimes,
    "broker_ticket": st.none() | st.integers(1, 2**62),
    "retcode": st.none() | st.integers(10004, 10046),
    "attempts": st.integers(0, 10),
}
updates_st = st.fixed_dictionaries({}, optional=update_values)
steps_st = st.lists(
    st.tuples(
        st.sampled_from(list(EventType)),
        st.none() | st.sampled_from(["", "broker: placed", "timeout"]),
        st.none() | st.dictionaries(st.sampled_from(["deal", "attempt"]), st.integers(0, 5), max_size=2),
        updates_st,
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(order_type=st.sampled_from(list(OrderType)), steps=steps_st)
def test_any_event_sequence_keeps_the_machine_consistent(order_type, steps):
    created = create_order(signal(), "O-prop", order_type, T0)
    order = created.order
    path = [created.event]  # applied events, in order
    refused: dict[str, tuple] = {}  # refused event id -> its inputs
    now = T0
    for event_type, reason, detail, updates in steps:
        now += timedelta(seconds=1)
        before = order
        if event_type in INFORMATIONAL_EVENTS:
            with pytest.raises(ValueError):
                apply(order, event_type, now, reason, detail, **updates)
            continue
        t = apply(order, event_type, now, reason, detail, **updates)
        assert t.applied is ((before.state, event_type) in LEGAL)
        if before.state.is_final:
            assert not t.applied  # final states never change
        if t.applied:
            assert t.order.state is LEGAL[(before.state, event_type)]
            assert t.order.version == before.version + 1
            assert t.event.type is event_type and t.event.from_state is before.state
            assert t.event.to_state is t.order.state
            for k, v in updates.items():
                assert getattr(t.order, k) == v
            path.append(t.event)
        else:
            assert t.order is before
            assert t.event.type is E.TRANSITION_REFUSED
            assert t.event.detail["event"] == event_type.value and t.event.detail["from"] == before.state.value
            key = (before.version, event_type, reason, repr(sorted((detail or {}).items())))
            assert refused.setdefault(t.event.event_id, key) == key, "two different refusals share an id"
        order = t.order
        assert order.state in set(OrderState)

    # version = applied events (creation included)
    assert order.version == len(path)
    # the applied events form a path in the transition table
    state = None
    for e in path:
        assert e.from_state == state
        assert TRANSITIONS[(state, e.type)] is e.to_state
        state = e.to_state
    assert state is order.state
    # event ids are unique across the history, and never collide with refusals
    ids = [e.event_id for e in path]
    assert len(ids) == len(set(ids))
    assert not set(ids) & set(refused)
    assert ids == [f"O-prop:{i}:{e.type.value}" for i, e in enumerate(path, start=1)]


def test_module_has_no_faust_import():
    import inspect

    assert "faust" not in inspect.getsource(order_state)
