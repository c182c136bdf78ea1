"""Net positions: increases, partial and full closes, reversals, dedupe, corrections; realized
PnL as the sum of the broker's deal profit, and our own price-terms figure."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.models import Execution, Fill, OrderState, Position, Side
from tables.positions import (
    PositionFill,
    apply_to_position,
    correct_position,
    unrealized_pnl,
    unrealized_pnl_price,
)
from tables.symbols import DEFAULT_SYMBOLS, UnknownSymbol

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
NOW = T0 + timedelta(seconds=1)


def pf(deal: int, side: Side, price: float, volume: float, symbol: str = "EURUSD", account: str = "acc-1", **kw):
    return PositionFill(account, symbol, side, price, volume, deal, T0, **kw)


def run(fills, position: Position | None = None, **kw) -> Position | None:
    for f in fills:
        position = apply_to_position(position, f, DEFAULT_SYMBOLS, NOW, **kw).position
    return position


def test_open_increase_partial_close_full_close():
    r = apply_to_position(None, pf(1, Side.BUY, 1.1000, 1.0), DEFAULT_SYMBOLS, NOW)
    p = r.position
    assert (p.account, p.symbol, p.net_volume, p.avg_open_price) == ("acc-1", "EURUSD", 1.0, 1.1000)
    assert (r.opened_volume, r.closed_volume, r.realized_pnl) == (1.0, 0.0, 0.0)
    assert (p.fills, p.last_deal, p.deals, p.version, p.updated_at) == (1, 1, (1,), 1, NOW)

    r = apply_to_position(p, pf(2, Side.BUY, 1.1010, 1.0), DEFAULT_SYMBOLS, NOW)
    p = r.position
    assert p.net_volume == 2.0 and p.avg_open_price == pytest.approx(1.1005, abs=1e-12)

    # the broker books 20 pips x 0.5 lot x 100k = 100 (its own figure is what counts)
    r = apply_to_position(p, pf(3, Side.SELL, 1.1025, 0.5, profit=100.0, entry="out"), DEFAULT_SYMBOLS, NOW)
    p = r.position
    assert p.net_volume == 1.5 and p.avg_open_price == pytest.approx(1.1005, abs=1e-12)
    assert r.closed_volume == 0.5 and r.opened_volume == 0.0 and not r.reversed
    assert r.realized_pnl_price == pytest.approx(0.001, abs=1e-10)
    assert r.realized_pnl == 100.0 and p.realized_pnl == 100.0

    r = apply_to_position(p, pf(4, Side.SELL, 1.0995, 1.5, profit=-150.0, entry="out"), DEFAULT_SYMBOLS, NOW)
    p = r.position
    assert p.net_volume == 0.0 and p.avg_open_price is None
    assert r.realized_pnl == -150.0
    assert p.realized_pnl == -50.0
    assert p.realized_pnl_price == pytest.approx(-0.0005, abs=1e-10)
    assert (p.fills, p.version, p.deals) == (4, 4, (1, 2, 3, 4))


def test_reversal_closes_all_and_opens_the_rest_at_the_fill_price():
    p = run([pf(1, Side.BUY, 1.1000, 1.0)])
    r = apply_to_position(p, pf(2, Side.SELL, 1.1020, 3.0, profit=200.0, entry="inout"), DEFAULT_SYMBOLS, NOW)
    p = r.position
    assert r.reversed and r.closed_volume == 1.0 and r.opened_volume == 2.0
    assert p.net_volume == -2.0 and p.avg_open_price == 1.1020
    assert p.realized_pnl == 200.0 and p.realized_pnl_price == pytest.approx(0.002, abs=1e-10)
    # and back: short 2 @ 1.1020 covered by a buy of 2.5 @ 1.1000 -> +400, long 0.5 @ 1.1000;
    # the broker booked 399.5 (its own rounding, a swap): its figure is the PnL
    r = apply_to_position(p, pf(3, Side.BUY, 1.1000, 2.5, profit=399.5, entry="inout"), DEFAULT_SYMBOLS, NOW)
    assert r.reversed and r.realized_pnl == 399.5 and r.realized_pnl_price == pytest.approx(0.004, abs=1e-10)
    assert r.position.net_volume == 0.5 and r.position.avg_open_price == 1.1000
    assert r.position.realized_pnl == 599.5 and r.position.realized_pnl_price == pytest.approx(0.006, abs=1e-10)


def test_short_profit_is_positive():
    p = run([pf(1, Side.SELL, 1.1050, 1.0), pf(2, Side.BUY, 1.1000, 1.0, profit=500.0, entry="out")])
    assert p.realized_pnl == 500.0 and p.realized_pnl_price == pytest.approx(0.005) and p.net_volume == 0.0


def test_price_terms_of_metals_and_jpy_and_the_broker_profit_in_the_account_currency():
    gold = run([pf(1, Side.BUY, 2345.6, 0.1, "XAUUSD"), pf(2, Side.SELL, 2350.6, 0.1, "XAUUSD", profit=50.0)])
    assert gold.realized_pnl_price == pytest.approx(0.5) and gold.realized_pnl == 50.0
    silver = run([pf(1, Side.SELL, 29.50, 1.0, "XAGUSD"), pf(2, Side.BUY, 29.40, 1.0, "XAGUSD", profit=500.0)])
    assert silver.realized_pnl_price == pytest.approx(0.10) and silver.realized_pnl == 500.0
    # 25 pips on USDJPY are 25,000 JPY of quote currency; the broker books the account's
    # currency at its conversion rate: that amount is the PnL, not a JPY figure
    jpy = run([pf(1, Side.BUY, 151.000, 1.0, "USDJPY", currency="EUR"),
               pf(2, Side.SELL, 151.250, 1.0, "USDJPY", profit=152.31, currency="EUR")])
    assert jpy.realized_pnl_price == pytest.approx(0.25) and (jpy.realized_pnl, jpy.currency) == (152.31, "EUR")


def test_duplicate_deal_changes_nothing():
    p = run([pf(1, Side.BUY, 1.1, 1.0)])
    r = apply_to_position(p, pf(1, Side.BUY, 1.1, 1.0), DEFAULT_SYMBOLS, NOW)
    assert r.is_duplicate and r.position is p


def test_deal_history_is_bounded():
    p = run([pf(d, Side.BUY, 1.1, 0.01) for d in range(1, 6)], max_deals=3)
    assert p.deals == (3, 4, 5) and p.fills == 5 and p.net_volume == 0.05
    p = run([pf(d, Side.BUY, 1.1, 0.01) for d in range(1, 1_101)])
    assert len(p.deals) == 1_000 and p.deals[0] == 101 and p.net_volume == 11.0


def test_execution_records_are_fill_like():
    e = Execution(
        execution_id="o-1:7", order_id="o-1", signal_id="s-1", account="acc-9", symbol="GBPUSD",
        side=Side.SELL, deal=7, price=1.2711, volume=0.3, expected_price=1.2711, slippage_pips=0.0,
        cumulative_volume=0.3, avg_fill_price=1.2711, order_state=OrderState.FILLED, time=T0,
    )  # fmt: skip
    p = apply_to_position(None, e, DEFAULT_SYMBOLS, NOW).position
    assert (p.key, p.net_volume, p.avg_open_price, p.deals, p.ticket) == ("acc-9:GBPUSD", -0.3, 1.2711, (7,), None)
    # the take-profit of the position: an exit deal with the broker's profit, in GBP
    e2 = e.model_copy(update=dict(
        execution_id="o-1:8", deal=8, side=Side.BUY, price=1.27, entry="out", reason="tp", position=555,
        profit=33.0, currency="GBP"))
    r = apply_to_position(p, e2, DEFAULT_SYMBOLS, NOW)
    p = r.position
    assert (p.net_volume, p.realized_pnl, p.currency, p.ticket) == (0.0, 33.0, "GBP", 555)
    assert r.realized_pnl == 33.0 and r.closed_volume == 0.3
    f = Fill(order_id="o-2", deal=9, symbol="GBPUSD", side=Side.SELL, price=1.2650, volume=0.1, time=T0,
             account="acc-9", position=556, currency="GBP")
    p = apply_to_position(p, PositionFill.from_fill(f), DEFAULT_SYMBOLS, NOW).position
    assert (p.net_volume, p.ticket, p.currency, p.realized_pnl) == (-0.1, 556, "GBP", 33.0)
    # the order's account may be given instead of the fill's
    assert PositionFill.from_fill(f, "acc-3").account == "acc-3"


def test_bad_inputs():
    p = run([pf(1, Side.BUY, 1.1, 1.0)])
    with pytest.raises(ValueError, match="applied to position"):
        apply_to_position(p, pf(2, Side.BUY, 1.1, 1.0, account="acc-2"), DEFAULT_SYMBOLS, NOW)
    with pytest.raises(ValueError, match="volume"):
        apply_to_position(p, pf(2, Side.BUY, 1.1, 1e-10), DEFAULT_SYMBOLS, NOW)
    with pytest.raises(UnknownSymbol):
        apply_to_position(None, pf(2, Side.BUY, 1.1, 1.0, symbol="EURSEK"), DEFAULT_SYMBOLS, NOW)
    broken = p.model_copy(update={"avg_open_price": None})
    with pytest.raises(ValueError, match="no average price"):
        apply_to_position(broken, pf(2, Side.BUY, 1.1, 1.0), DEFAULT_SYMBOLS, NOW)


def test_unrealized_pnl():
    p = run([pf(1, Side.SELL, 1.1000, 2.0)])
    assert unrealized_pnl_price(p, 1.0990) == pytest.approx(0.002)
    assert unrealized_pnl(p, 1.0990, DEFAULT_SYMBOLS) == pytest.approx(200.0)
    assert unrealized_pnl(None, 1.0, DEFAULT_SYMBOLS) == 0.0


def test_correct_position():
    p = run([pf(1, Side.BUY, 1.1000, 1.0), pf(2, Side.SELL, 1.1010, 0.5)])
    later = NOW + timedelta(minutes=5)
    c = correct_position(p, -0.3, 1.1050, later)
    assert (c.net_volume, c.avg_open_price, c.updated_at, c.version) == (-0.3, 1.1050, later, p.version + 1)
    assert c.realized_pnl == p.realized_pnl and c.deals == p.deals and c.fills == p.fills
    flat = correct_position(p, 0.0, None, later)
    assert flat.net_volume == 0.0 and flat.avg_open_price is None
    assert correct_position(p, 0.0, 1.2, later).avg_open_price is None
    new = correct_position(None, 0.2, 1.27, later, account="acc-3", symbol="GBPUSD")
    assert (new.key, new.net_volume, new.avg_open_price, new.version) == ("acc-3:GBPUSD", 0.2, 1.27, 1)
    with pytest.raises(ValueError):
        correct_position(None, 0.2, 1.27, later)
    with pytest.raises(ValueError):
        correct_position(p, 0.2, None, later)
    with pytest.raises(ValueError):
        correct_position(p, 0.2, 1.27, later, symbol="GBPUSD")
    # a corrected position keeps taking deals from its new state
    r = apply_to_position(c, pf(3, Side.BUY, 1.1000, 0.3, profit=150.0), DEFAULT_SYMBOLS, later)
    assert r.position.net_volume == 0.0 and r.realized_pnl == 150.0
    assert r.position.realized_pnl == p.realized_pnl + 150.0
    assert r.realized_pnl_price == pytest.approx(0.0015, abs=1e-10)


# ---------------------------------------------------------------------------------------
# Properties over random deal sequences (with duplicates, any order)
# ---------------------------------------------------------------------------------------


@st.composite
def deals(draw):
    n = draw(st.integers(1, 25))
    out = []
    for i in range(n):
        side = draw(st.sampled_from([Side.BUY, Side.SELL]))
        lots = draw(st.integers(1, 300)) / 100
        price = round(1.08 + draw(st.integers(-500, 500)) / 1e5, 5)
        profit = draw(st.integers(-100_000, 100_000)) / 100  # cents, as the broker books them
        out.append(pf(10 + i, side, price, lots, profit=profit))
    dups = draw(st.lists(st.sampled_from(out), max_size=8))
    seq = out + dups
    random.Random(draw(st.integers(0, 2**32 - 1))).shuffle(seq)
    return seq


@settings(max_examples=200, deadline=None)
@given(deals(), st.integers(-1000, 1000))
def test_net_volume_and_total_pnl_invariants(seq, mark_offset):
    mark = 1.08 + mark_offset / 1e5
    p: Position | None = None
    applied: dict[int, PositionFill] = {}
    for f in seq:
        r = apply_to_position(p, f, DEFAULT_SYMBOLS, NOW)
        assert r.is_duplicate == (f.deal in applied)
        applied.setdefault(f.deal, f)
        p = r.position
        # net volume == signed sum of the distinct deals so far (in 0.01-lot steps: exact)
        assert round(p.net_volume * 100) == sum(round(d.volume * 100) * d.side.sign for d in applied.values())
        assert (p.avg_open_price is None) == (p.net_volume == 0.0)
    assert p.fills == len(applied)
    # our price terms: realized + unrealized at any mark == PnL of the deals computed directly
    direct = sum(d.side.sign * d.volume * (mark - d.price) for d in applied.values())
    assert p.realized_pnl_price + unrealized_pnl_price(p, mark) == pytest.approx(direct, abs=1e-9)
    # the broker's figure: the sum of the profit of each distinct deal, once
    assert p.realized_pnl == pytest.approx(sum(d.profit for d in applied.values()), abs=1e-6)
    assert p.realized_pnl == round(p.realized_pnl, 6)


# ---------------------------------------------------------------------------------------
# Reconciliation corrections and deals still in flight
# ---------------------------------------------------------------------------------------


def test_a_deal_in_flight_during_a_correction_counts_once():
    """The defect: a deal in flight for more than the confirm delay looks MISSING_OURS; the
    correction set the broker's volume without its deal tickets, and the late execution was
    then added on top (1.0 lot held as 2.0).  The correction now carries the broker's deal
    tickets: the late deal adds its profit, not its volume, and a replay of it is a duplicate."""
    p = run([pf(1, Side.BUY, 1.1000, 0.5), pf(2, Side.SELL, 1.1010, 0.5)])  # flat, deals 1, 2
    later = NOW + timedelta(minutes=5)
    # the broker holds 1.0 long from deal 3, which has not reached us yet
    c = correct_position(p, 1.0, 1.1020, later, broker_deals=[3])
    assert c.net_volume == 1.0 and c.deals == (1, 2) and c.corrected_deals == (3,)
    r = apply_to_position(c, pf(3, Side.BUY, 1.1020, 1.0, profit=12.5), DEFAULT_SYMBOLS, later)
    assert not r.is_duplicate and r.position.net_volume == 1.0
    assert r.position.deals == (1, 2, 3) and r.position.corrected_deals == ()
    assert r.position.realized_pnl == pytest.approx(p.realized_pnl + 12.5)
    assert apply_to_position(r.position, pf(3, Side.BUY, 1.1020, 1.0, profit=12.5), DEFAULT_SYMBOLS, later).is_duplicate
    # and a position we did not hold at all (MISSING_OURS on a new key)
    new = correct_position(None, -0.3, 1.27, later, account="acc-1", symbol="GBPUSD", broker_deals=[7, 8])
    r = apply_to_position(new, pf(8, Side.SELL, 1.27, 0.2, symbol="GBPUSD"), DEFAULT_SYMBOLS, later)
    assert r.position.net_volume == -0.3 and r.position.corrected_deals == (7,)


def test_correction_adds_only_new_broker_deals_in_order_and_bounded():
    p = run([pf(1, Side.BUY, 1.1, 0.1), pf(2, Side.BUY, 1.1, 0.1)])
    c = correct_position(p, 0.4, 1.1, NOW, broker_deals=[1, 2, 5, 4, 5], broker_ticket=901)
    assert c.deals == (1, 2) and c.corrected_deals == (5, 4) and c.ticket == 901 and c.fills == p.fills
    c = correct_position(p, 0.4, 1.1, NOW, broker_deals=range(100, 110), max_deals=5)
    assert c.corrected_deals == (105, 106, 107, 108, 109)
    assert correct_position(p, 0.0, None, NOW).ticket is None  # no ticket given: kept
    with pytest.raises(ValueError, match="positive"):
        correct_position(p, 0.4, 1.1, NOW, broker_deals=[0])


def test_deals_applied_in_any_order_give_the_same_net_position():
    """Executions reach the positions agent from every partition of the orders agent: an exit
    routed through the opening order's partition can overtake the fill of a later order that
    added to the position.  The net position is the sum of the deals whatever their order."""
    deals = [pf(1, Side.BUY, 1.1000, 1.0, position=77), pf(2, Side.BUY, 1.1010, 1.0, position=77),
             pf(3, Side.SELL, 1.0950, 2.0, entry="out", profit=-1500.0, position=77)]
    for order in ([0, 1, 2], [0, 2, 1], [2, 0, 1], [1, 2, 0]):
        p = run([deals[k] for k in order])
        assert (p.net_volume, p.realized_pnl, p.fills) == (0.0, -1500.0, 3), order


def test_position_close_by_stop_loss_take_profit_and_stop_out():
    """Open, scale in, then the broker closes in parts: TP, SL, stop-out; the PnL is what the
    broker booked for each exit deal, the ticket the one the deals name."""
    p = run([
        pf(1, Side.BUY, 1.1000, 1.0, position=500),
        pf(2, Side.BUY, 1.1020, 1.0, position=500, profit=-1.5),  # a commission on entry
        pf(3, Side.SELL, 1.1060, 0.5, position=500, entry="out", profit=250.0),  # tp
        pf(4, Side.SELL, 1.0990, 1.0, position=500, entry="out", profit=-200.0),  # sl
        pf(5, Side.SELL, 1.0900, 0.5, position=500, entry="out", profit=-550.0),  # stop-out
    ])
    assert (p.net_volume, p.avg_open_price, p.ticket, p.fills) == (0.0, None, 500, 5)
    assert p.realized_pnl == pytest.approx(-501.5, abs=1e-9)
    # ours in price terms: avg 1.1010; (+0.005 x 0.5) + (-0.002 x 1.0) + (-0.011 x 0.5)
    assert p.realized_pnl_price == pytest.approx(0.0025 - 0.002 - 0.0055, abs=1e-10)
    # a new position has a new ticket
    p = run([pf(6, Side.SELL, 1.09, 0.2, position=600)], p)
    assert (p.ticket, p.net_volume) == (600, -0.2)


def test_profit_rounding_and_currency():
    p = run([pf(1, Side.BUY, 1.1, 1.0, profit=0.1), pf(2, Side.BUY, 1.1, 1.0, profit=0.2)])
    assert p.realized_pnl == 0.3  # rounded to PNL_DECIMALS, no float noise
    assert p.currency == "USD"
    with pytest.raises(ValueError, match="one currency"):
        apply_to_position(p, pf(3, Side.BUY, 1.1, 1.0, currency="EUR"), DEFAULT_SYMBOLS, NOW)
    with pytest.raises(ValueError, match="profit"):
        apply_to_position(p, pf(3, Side.BUY, 1.1, 1.0, profit=float("nan")), DEFAULT_SYMBOLS, NOW)
    # a position without realized PnL takes the deal's currency
    eur = run([pf(1, Side.BUY, 1.1, 1.0, currency="EUR")])
    assert (eur.currency, eur.realized_pnl) == ("EUR", 0.0)
