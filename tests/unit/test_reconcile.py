"""Reconciliation: our positions vs the broker's, per owned key."""

from __future__ import annotations

from datetime import datetime, timezone

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.models import Position, Side, from_json, position_key, to_json
from app.mt5.contract import BrokerPositionModel
from tables.order_types import MAGIC
from tables.positions import PositionFill, apply_to_position, correct_position
from tables.reconcile import (
    BrokerPosition,
    Discrepancy,
    DiscrepancyKind,
    as_broker_position,
    compare,
    foreign_positions,
    net_broker_positions,
)
from tables.symbols import DEFAULT_SYMBOLS

AT = datetime(2024, 5, 1, 12, 5, tzinfo=timezone.utc)


def pos(account: str, symbol: str, net: float, avg: float | None) -> Position:
    return Position(account=account, symbol=symbol, net_volume=net, avg_open_price=avg, updated_at=AT)


def table(*positions: Position) -> dict[str, Position]:
    return {p.key: p for p in positions}


def everything(_key: str) -> bool:
    return True


def test_all_kinds_and_matches():
    ours = table(
        pos("a", "EURUSD", 1.0, 1.1),  # matches
        pos("a", "GBPUSD", 0.5, 1.27),  # broker has 0.3: mismatch
        pos("a", "USDJPY", -0.2, 151.0),  # broker has none: missing_broker
        pos("a", "AUDUSD", 0.0, None),  # flat, broker has 0.4 long: missing_ours
        pos("a", "USDCHF", 0.0, None),  # flat both: nothing
    )
    broker = [
        ("a", "EURUSD", 1.0, 1.1),
        ("a", "GBPUSD", 0.3, 1.2705),
        ("a", "AUDUSD", 0.4, 0.658),
        ("a", "NZDUSD", -1.5, 0.61),  # we hold nothing: missing_ours
    ]
    ds = compare(ours, broker, everything, 1e-6, now=AT)
    got = {(d.symbol, d.kind, d.ours_net_volume, d.broker_net_volume, d.difference) for d in ds}
    assert got == {
        ("GBPUSD", DiscrepancyKind.MISMATCH, 0.5, 0.3, -0.2),
        ("USDJPY", DiscrepancyKind.MISSING_BROKER, -0.2, 0.0, 0.2),
        ("AUDUSD", DiscrepancyKind.MISSING_OURS, 0.0, 0.4, 0.4),
        ("NZDUSD", DiscrepancyKind.MISSING_OURS, 0.0, -1.5, -1.5),
    }
    assert [d.key for d in ds] == sorted(d.key for d in ds)
    g = next(d for d in ds if d.symbol == "GBPUSD")
    assert (g.account, g.ours_avg_price, g.broker_avg_price, g.detected_at) == ("a", 1.27, 1.2705, AT)
    j = next(d for d in ds if d.symbol == "USDJPY")
    assert j.broker_avg_price is None and j.ours_avg_price == 151.0


def test_opposite_sides_is_a_mismatch():
    [d] = compare(table(pos("a", "EURUSD", 1.0, 1.1)), [("a", "EURUSD", -1.0, 1.1)], everything, now=AT)
    assert d.kind is DiscrepancyKind.MISMATCH and d.difference == -2.0


def test_tolerance():
    ours = table(pos("a", "EURUSD", 1.0, 1.1))
    assert compare(ours, [("a", "EURUSD", 1.0 + 1e-9, 1.1)], everything, 1e-6) == []
    assert compare(ours, [("a", "EURUSD", 1.00000001, 1.1)], everything, 0.0) != []
    assert compare(ours, [("a", "EURUSD", 1.01, 1.1)], everything, 0.01) == []
    [d] = compare(ours, [("a", "EURUSD", 1.02, 1.1)], everything, 0.01, now=AT)
    assert d.difference == 0.02
    with pytest.raises(ValueError):
        compare(ours, [], everything, -1)


def test_only_owned_keys_are_compared():
    ours = table(pos("a", "EURUSD", 1.0, 1.1), pos("b", "EURUSD", 2.0, 1.1))
    broker = [("a", "GBPUSD", 1.0, 1.27), ("b", "GBPUSD", 1.0, 1.27)]  # nothing matches
    owned = {position_key("a", "EURUSD"), position_key("a", "GBPUSD")}
    ds = compare(ours, broker, owned.__contains__, now=AT)
    assert {(d.account, d.symbol, d.kind) for d in ds} == {
        ("a", "EURUSD", DiscrepancyKind.MISSING_BROKER),
        ("a", "GBPUSD", DiscrepancyKind.MISSING_OURS),
    }
    assert compare(ours, broker, lambda k: False) == []


def test_broker_legs_are_netted():
    # a hedging account: two longs and a short on one symbol
    legs = [("a", "EURUSD", 1.0, 1.10), ("a", "EURUSD", 1.0, 1.12), ("a", "EURUSD", -0.5, 1.15)]
    [(acc, sym, units, avg)] = net_broker_positions(legs).values()
    assert (acc, sym, units) == ("a", "EURUSD", 150_000_000) and avg == pytest.approx(1.11)
    assert compare(table(pos("a", "EURUSD", 1.5, 1.11)), legs, everything) == []
    # legs that cancel out are flat: nothing to report when we are flat too
    assert compare({}, [("a", "EURUSD", 1.0, 1.1), ("a", "EURUSD", -1.0, 1.2)], everything) == []


def test_discrepancy_round_trips_and_corrects():
    ours = table(pos("a", "GBPUSD", 0.5, 1.27))
    [d] = compare(ours, [("a", "GBPUSD", 0.3, 1.2705)], everything, now=AT)
    assert from_json(Discrepancy, to_json(d)) == d
    assert b'"kind":"mismatch"' in to_json(d)
    fixed = correct_position(ours.get(d.key), d.broker_net_volume, d.broker_avg_price, AT)
    assert compare({fixed.key: fixed}, [("a", "GBPUSD", 0.3, 1.2705)], everything) == []


volumes = st.integers(-300, 300).map(lambda u: u / 100)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["EURUSD", "GBPUSD", "USDJPY", "XAUUSD"]), st.tuples(volumes, volumes)))
def test_correcting_every_discrepancy_leaves_none(book):
    ours = table(*(pos("a", s, o, 1.0 if o else None) for s, (o, _) in book.items()))
    broker = [("a", s, b, 1.0) for s, (_, b) in book.items() if b]
    ds = compare(ours, broker, everything, now=AT)
    assert {d.symbol for d in ds} == {s for s, (o, b) in book.items() if o != b}
    for d in ds:
        assert d.difference == pytest.approx(d.broker_net_volume - d.ours_net_volume, abs=1e-12)
        ours[d.key] = correct_position(
            ours.get(d.key), d.broker_net_volume, d.broker_avg_price, AT, account=d.account, symbol=d.symbol
        )
    assert compare(ours, broker, everything) == []


# ---------------------------------------------------------------------------------------
# Magic numbers and deal tickets
# ---------------------------------------------------------------------------------------

OTHER = 777  # another robot's (or a manual trade's) magic number


def test_positions_of_another_magic_are_not_merged_into_ours():
    ours = table(pos("a", "EURUSD", 1.0, 1.1))
    broker = [
        BrokerPosition("a", "EURUSD", 1.0, 1.1, MAGIC, 11, (1,)),
        BrokerPosition("a", "EURUSD", 2.0, 1.2, OTHER, 12, (5, 6)),  # same key, not ours
        BrokerPosition("a", "GBPUSD", -0.5, 1.27, OTHER, 13, (7,)),  # a key we do not trade
    ]
    assert compare(ours, broker, everything, now=AT, magic=MAGIC) == []
    foreign = foreign_positions(broker, MAGIC)
    assert [(b.symbol, b.magic, b.net_volume) for b in foreign] == [("EURUSD", OTHER, 2.0), ("GBPUSD", OTHER, -0.5)]
    assert foreign_positions(broker, MAGIC, lambda k: k == "a:GBPUSD") == [broker[2]]
    # without a magic filter every position counts (the old behaviour, plain tuples)
    [d] = [d for d in compare(ours, broker, everything, now=AT) if d.symbol == "EURUSD"]
    assert d.broker_net_volume == 3.0
    # our position gone at the broker, another robot's still there: missing_broker, not matched
    [d] = compare(ours, broker[1:], everything, now=AT, magic=MAGIC)
    assert (d.kind, d.broker_net_volume, d.broker_deals, d.broker_ticket) == (DiscrepancyKind.MISSING_BROKER, 0.0, [], None)


def test_broker_deals_and_ticket_are_carried():
    ours = table(pos("a", "EURUSD", 0.0, None), pos("a", "GBPUSD", 0.5, 1.27))
    broker = [
        BrokerPositionModel(account="a", symbol="EURUSD", net_volume=1.0, avg_price=1.1, magic=MAGIC, ticket=41, deals=[41, 42]),
        BrokerPositionModel(account="a", symbol="GBPUSD", net_volume=0.3, avg_price=1.2705, magic=MAGIC, ticket=51,
                            deals=[51, 52, 53]),
        BrokerPositionModel(account="a", symbol="GBPUSD", net_volume=1.0, avg_price=1.3, magic=OTHER, ticket=61, deals=[61]),
    ]
    ds = {d.symbol: d for d in compare(ours, broker, everything, now=AT, magic=MAGIC)}
    assert (ds["EURUSD"].kind, ds["EURUSD"].broker_deals, ds["EURUSD"].broker_ticket) == (DiscrepancyKind.MISSING_OURS, [41, 42], 41)
    assert (ds["GBPUSD"].broker_deals, ds["GBPUSD"].broker_ticket) == ([51, 52, 53], 51)  # not 61: another magic
    assert from_json(Discrepancy, to_json(ds["EURUSD"])) == ds["EURUSD"]
    # a discrepancy of an older producer (no broker_deals) still reads
    old = orjson.loads(to_json(ds["EURUSD"]))
    del old["broker_deals"], old["broker_ticket"]
    assert from_json(Discrepancy, orjson.dumps(old)).broker_deals == []


def test_hedged_legs_carry_every_deal_once_and_the_main_ticket():
    legs = [
        BrokerPosition("a", "EURUSD", 1.0, 1.10, MAGIC, 1, (1, 3)),
        BrokerPosition("a", "EURUSD", 2.0, 1.12, MAGIC, 2, (2, 3)),
        BrokerPosition("a", "EURUSD", -0.5, 1.15, MAGIC, 4, (4,)),
    ]
    [d] = compare({}, legs, everything, now=AT, magic=MAGIC)
    assert d.broker_net_volume == 2.5 and d.broker_deals == [1, 3, 2, 4] and d.broker_ticket == 2
    assert d.broker_avg_price == pytest.approx((1.0 * 1.10 + 2.0 * 1.12) / 3.0)


def test_as_broker_position():
    assert as_broker_position(("a", "EURUSD", 1.0, 1.1)) == BrokerPosition("a", "EURUSD", 1.0, 1.1, 0, 0, ())
    m = BrokerPositionModel(account="a", symbol="EURUSD", net_volume=-1.0, magic=5, ticket=9, deals=[9, 10])
    assert as_broker_position(m) == BrokerPosition("a", "EURUSD", -1.0, None, 5, 9, (9, 10))
    assert as_broker_position(m.as_tuple()) == BrokerPosition("a", "EURUSD", -1.0, None)


def test_a_deal_in_flight_when_the_correction_is_made_counts_once():
    """End to end in the pure functions: deal 42 is at the broker but not with us when the
    reconciliation runs; the correction takes the broker's volume and deals; deal 42 then
    arrives and adds its profit, not its volume.  Reconciling again finds nothing."""
    ours = table(pos("a", "EURUSD", 0.0, None))
    broker = [BrokerPosition("a", "EURUSD", 1.0, 1.1, MAGIC, 42, (42,))]
    [d] = compare(ours, broker, everything, now=AT, magic=MAGIC)
    fixed = correct_position(ours[d.key], d.broker_net_volume, d.broker_avg_price, AT,
                             account=d.account, symbol=d.symbol, broker_deals=d.broker_deals, broker_ticket=d.broker_ticket)
    late = PositionFill("a", "EURUSD", Side.BUY, 1.1, 1.0, 42, AT, position=42)
    r = apply_to_position(fixed, late, DEFAULT_SYMBOLS, AT)
    assert r.position.net_volume == 1.0 and r.position.ticket == 42 and r.position.corrected_deals == ()
    assert compare({fixed.key: r.position}, broker, everything, magic=MAGIC) == []
