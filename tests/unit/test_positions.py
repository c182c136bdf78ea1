"""Net positions: increases, partial and full closes, reversals, dedupe, corrections."""

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


def pf(deal: int, side: Side, price: float, volume: float, symbol: str = "EURUSD", account: str = "acc-1"):
    return PositionFill(account, symbol, side, price, volume, deal, T0)


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

    r = apply_to_position(p, pf(3, Side.SELL, 1.1025, 0.5), DEFAULT_SYMBOLS, NOW)
    p = r.position
    assert p.net_volume == 1.5 and p.avg_open_price == pytest.approx(1.1005, abs=1e-12)
    assert r.closed_volume == 0.5 and r.opened_volume == 0.0 and not r.reversed
    assert r.realized_pnl_price == pytest.approx(0.001, abs=1e-10)
    assert r.realized_pnl == pytest.approx(100.0, abs=1e-6)  # 20 pips x 0.5 lot x 100k
    assert p.realized_pnl == pytest.approx(100.0, abs=1e-6)

    r = apply_to_position(p, pf(4, Side.SELL, 1.0995, 1.5), DEFAULT_SYMBOLS, NOW)
    p = r.position
    assert p.net_volume == 0.0 and p.avg_open_price is None
    assert r.realized_pnl == pytest.approx(-150.0, abs=1e-6)
    assert p.realized_pnl == pytest.approx(-50.0, abs=1e-6)
    assert p.realized_pnl_price == pytest.approx(-0.0005, abs=1e-10)
    assert (p.fills, p.version, p.deals) == (4, 4, (1, 2, 3, 4))


def test_reversal_closes_all_and_opens_the_rest_at_the_fill_price():
    p = run([pf(1, Side.BUY, 1.1000, 1.0)])
    r = apply_to_position(p, pf(2, Side.SELL, 1.1020, 3.0), DEFAULT_SYMBOLS, NOW)
    p = r.position
    assert r.reversed and r.closed_volume == 1.0 and r.opened_volume == 2.0
    assert p.net_volume == -2.0 and p.avg_open_price == 1.1020
    assert p.realized_pnl == pytest.approx(200.0, abs=1e-6)
    # and back: short 2 @ 1.1020 covered by a buy of 2.5 @ 1.1000 -> +400, long 0.5 @ 1.1000
    r = apply_to_position(p, pf(3, Side.BUY, 1.1000, 2.5), DEFAULT_SYMBOLS, NOW)
    assert r.reversed and r.realized_pnl == pytest.approx(400.0, abs=1e-6)
    assert r.position.net_volume == 0.5 and r.position.avg_open_price == 1.1000
    assert r.position.realized_pnl == pytest.approx(600.0, abs=1e-6)


def test_short_profit_is_positive():
    p = run([pf(1, Side.SELL, 1.1050, 1.0), pf(2, Side.BUY, 1.1000, 1.0)])
    assert p.realized_pnl == pytest.approx(500.0, abs=1e-6) and p.net_volume == 0.0


def test_contract_sizes_metals_and_jpy():
    gold = run([pf(1, Side.BUY, 2345.6, 0.1, "XAUUSD"), pf(2, Side.SELL, 2350.6, 0.1, "XAUUSD")])
    assert gold.realized_pnl_price == pytest.approx(0.5) and gold.realized_pnl == pytest.approx(50.0)
    silver = run([pf(1, Side.SELL, 29.50, 1.0, "XAGUSD"), pf(2, Side.BUY, 29.40, 1.0, "XAGUSD")])
    assert silver.realized_pnl == pytest.approx(500.0)  # 0.10 x 5000 oz
    jpy = run([pf(1, Side.BUY, 151.000, 1.0, "USDJPY"), pf(2, Side.SELL, 151.250, 1.0, "USDJPY")])
    assert jpy.realized_pnl == pytest.approx(25_000.0)  # in JPY, the quote currency


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
    assert (p.key, p.net_volume, p.avg_open_price, p.deals) == ("acc-9:GBPUSD", -0.3, 1.2711, (7,))
    f = Fill(order_id="o-1", deal=8, symbol="GBPUSD", side=Side.BUY, price=1.27, volume=0.3, time=T0)
    p = apply_to_position(p, PositionFill.from_fill(f, "acc-9"), DEFAULT_SYMBOLS, NOW).position
    assert p.net_volume == 0.0 and p.realized_pnl == pytest.approx(33.0, abs=1e-6)


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
    r = apply_to_position(c, pf(3, Side.BUY, 1.1000, 0.3), DEFAULT_SYMBOLS, later)
    assert r.position.net_volume == 0.0 and r.realized_pnl == pytest.approx(150.0, abs=1e-6)


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
        out.append(pf(10 + i, side, price, lots))
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
    # realized + unrealized at any mark == PnL of the deals computed directly
    direct = sum(d.side.sign * d.volume * (mark - d.price) for d in applied.values())
    assert p.realized_pnl_price + unrealized_pnl_price(p, mark) == pytest.approx(direct, abs=1e-9)
    assert p.realized_pnl + unrealized_pnl(p, mark, DEFAULT_SYMBOLS) == pytest.approx(direct * 100_000, abs=1e-4)
