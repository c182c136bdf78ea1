"""Reconciliation: our positions vs the broker's, per owned key."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.models import Position, from_json, position_key, to_json
from tables.positions import correct_position
from tables.reconcile import Discrepancy, DiscrepancyKind, compare, net_broker_positions

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
