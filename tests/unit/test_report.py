from datetime import datetime, timedelta, timezone

from app.report import histogram_svg, render_report


def test_report_has_every_plot_and_the_sign_convention():
    t0 = datetime(2026, 11, 25, tzinfo=timezone.utc)
    orders = [
        {"order_id": f"O{i}", "symbol": "EURUSD", "state": "FILLED", "order_type": "market", "volume": 0.1 * (i + 1),
         "slippage_pips": 0.5 * i - 1, "created_at": t0, "filled_at": t0 + timedelta(seconds=0.1 * i)}
        for i in range(10)
    ] + [{"order_id": "R", "symbol": "USDJPY", "state": "REJECTED", "order_type": "limit", "volume": 1.0}]
    executions = [{"symbol": o["symbol"], "slippage_pips": o["slippage_pips"]} for o in orders[:10]]
    page = render_report(orders, executions)
    assert page.count("<svg") == 3  # EURUSD histogram, size scatter, time to fill
    assert "positive = adverse" in page
    assert "<td>REJECTED</td><td>1</td>" in page
    assert "EURUSD slippage" in page


def test_histogram_counts_every_value():
    svg = histogram_svg([1.0, 1.0, 2.0, 3.0], "t", "x", bins=2)
    assert svg.count("<rect") == 2
