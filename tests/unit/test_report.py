from datetime import datetime, timedelta, timezone

import pytest

from app.report import CHARTS, render_report, shortfall, size_bucket

T0 = datetime(2026, 11, 25, tzinfo=timezone.utc)


def orders_and_executions():
    orders = [
        {"order_id": f"O{i}", "symbol": "EURUSD", "side": "buy", "state": "FILLED", "order_type": "market",
         "volume": 0.1 * (i + 1), "filled_volume": 0.1 * (i + 1), "expected_price": 1.1,
         "arrival_price": 1.1 + 0.00001 * i, "avg_fill_price": 1.1 + 0.00002 * i, "slippage_pips": 0.2 * i,
         "created_at": T0, "filled_at": T0 + timedelta(seconds=0.1 * i)}
        for i in range(10)
    ] + [{"order_id": "R", "symbol": "USDJPY", "side": "sell", "state": "REJECTED", "order_type": "limit",
          "volume": 1.0, "filled_volume": 0.0, "reason": "stale: the signal is 31 s old"}]
    executions = [{"symbol": o["symbol"], "slippage_pips": o["slippage_pips"]} for o in orders[:10]]
    return orders, executions


def test_shortfall_splits_at_the_arrival_price_in_pips_positive_adverse():
    buy = {"symbol": "EURUSD", "side": "buy", "expected_price": 1.10000, "arrival_price": 1.10010,
           "avg_fill_price": 1.10015}
    total, delay, execution = shortfall(buy)
    assert (round(total, 6), round(delay, 6), round(execution, 6)) == (1.5, 1.0, 0.5)
    sell = {**buy, "side": "sell"}
    assert tuple(round(x, 6) for x in shortfall(sell)) == (-1.5, -1.0, -0.5)  # a sell filled above: favourable
    assert shortfall({**buy, "arrival_price": None})[1:] == (None, None)
    assert shortfall({**buy, "avg_fill_price": None}) is None


@pytest.mark.parametrize("lots,bucket", [(0.01, "≤ 0.1"), (0.1, "≤ 0.1"), (0.5, "0.1–1"), (5.0, "1–5"), (7.0, "> 5")])
def test_size_buckets(lots, bucket):
    assert size_bucket(lots) == bucket


def test_the_report_has_every_chart_and_the_sign_convention():
    page = render_report(*orders_and_executions())
    assert all(f'id="chart-{i}"' in page for i in range(CHARTS)) and f'id="chart-{CHARTS}"' not in page
    assert page.count("Plotly.newPlot") == CHARTS  # plotly.js once, inline: the page is self-contained
    assert "positive = adverse" in page and "10 of 10 filled market orders have an arrival price" in page
    assert "<td>REJECTED</td><td>1</td>" in page and "stale" in page
