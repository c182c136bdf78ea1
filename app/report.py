"""The transaction-cost report: one self-contained HTML page (plotly, its JavaScript inline)
from the ClickHouse ``orders`` and ``executions`` rows.

What transaction-cost analysis asks of an execution service, in pips (positive = adverse):

* implementation shortfall of each filled order against its decision price (the signal's
  entry for a market order, the limit or trigger price of a pending one), split at the arrival
  price (the broker's touch when the order went out, ``arrival_price``): the delay cost
  (decision -> arrival: the market moved before the order reached the broker) and the
  execution cost (arrival -> average fill: what the execution itself cost);
* slippage by symbol, by order type and by order size;
* the fill ratio (filled / requested volume) by order type, the reasons of rejected and
  failed orders, and the time to fill by order type.
"""

from __future__ import annotations

import html
import math
import statistics
from collections import Counter, defaultdict
from datetime import datetime
from typing import Any, Iterable

import plotly.graph_objects as go

from tables.symbols import DEFAULT_SYMBOLS

#: Order size buckets (lots), upper bounds inclusive.
SIZE_BUCKETS = ((0.1, "≤ 0.1"), (1.0, "0.1–1"), (5.0, "1–5"), (math.inf, "> 5"))
ORDER_TYPES = ("market", "limit", "stop", "stop_limit")


def size_bucket(volume: float) -> str:
    return next(name for bound, name in SIZE_BUCKETS if volume <= bound)


def _pip(symbol: str) -> float | None:
    spec = DEFAULT_SYMBOLS.get(symbol)
    return spec.pip_size if spec else None


def _sign(order: dict) -> int:
    return 1 if order.get("side") == "buy" else -1


def shortfall(order: dict) -> tuple[float, float | None, float | None] | None:
    """(total, delay, execution) implementation shortfall in pips of a filled order, + =
    adverse; delay and execution are None without an arrival price."""
    pip, fill, decision = _pip(order.get("symbol", "")), order.get("avg_fill_price"), order.get("expected_price")
    if not pip or fill is None or not decision:
        return None
    sign = _sign(order)
    total = (fill - decision) * sign / pip
    arrival = order.get("arrival_price")
    if not arrival:
        return total, None, None
    return total, (arrival - decision) * sign / pip, (fill - arrival) * sign / pip


def _seconds(a: Any, b: Any) -> float | None:
    if not isinstance(a, datetime) or not isinstance(b, datetime):
        return None
    return (b - a).total_seconds()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if math.isfinite(v) else "–"
    return str(v)


def _table(headers: list[str], rows: Iterable[Iterable[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _p95(values: list[float]) -> float:
    return sorted(values)[max(0, math.ceil(0.95 * len(values)) - 1)] if values else math.nan


def _layout(fig: go.Figure, title: str, xtitle: str, ytitle: str) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=xtitle, yaxis_title=ytitle, template="plotly_white",
                      height=380, margin={"l": 60, "r": 20, "t": 50, "b": 50}, showlegend=False)
    return fig


def _boxes(groups: dict[str, list[float]], title: str, xtitle: str, ytitle: str, order: Iterable[str] = ()) -> go.Figure:
    names = [n for n in order if n in groups] + sorted(n for n in groups if n not in set(order))
    fig = go.Figure([go.Box(y=groups[n], name=n, boxpoints="outliers") for n in names if groups[n]])
    return _layout(fig, title, xtitle, ytitle)


def render_report(orders: list[dict], executions: list[dict], title: str = "Transaction-cost report") -> str:
    """The page for ``orders`` and ``executions`` rows (dicts with the ClickHouse column names)."""
    filled = [o for o in orders if o.get("state") == "FILLED" and o.get("intent", "open") == "open"]
    figures: list[tuple[str, str, go.Figure]] = []  # (section, note, figure)

    # Implementation shortfall of market orders, split at the arrival price (a pending order
    # waits for the market by design: its cost is its slippage against its own price, below).
    market = [o for o in filled if o.get("order_type") == "market"]
    is_rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"total": [], "delay": [], "execution": []})
    for o in market:
        parts = shortfall(o)
        if parts is None:
            continue
        total, delay, execution = parts
        is_rows[o["symbol"]]["total"].append(total)
        if delay is not None:
            is_rows[o["symbol"]]["delay"].append(delay)
            is_rows[o["symbol"]]["execution"].append(execution)
    with_arrival = sum(len(v["delay"]) for v in is_rows.values())
    fig = go.Figure()
    symbols = sorted(is_rows)
    for part, colour in (("delay", "#f0ad4e"), ("execution", "#d9534f")):
        fig.add_bar(x=symbols, y=[_mean(is_rows[s][part]) for s in symbols], name=part, marker_color=colour)
    fig.update_layout(barmode="relative", showlegend=True)
    figures.append(("Implementation shortfall by symbol",
                    f"Mean per filled market order, pips: delay (decision → arrival) and execution (arrival → fill); "
                    f"{with_arrival} of {len(market)} filled market orders have an arrival price (a fill that "
                    "overtakes the broker's answer leaves it unknown).",
                    _layout(fig, "implementation shortfall (mean, pips)", "symbol", "pips").update_layout(showlegend=True)))

    # Slippage by symbol (fills), order type and size bucket (orders).
    by_symbol: dict[str, list[float]] = defaultdict(list)
    for e in executions:
        if e.get("slippage_pips") is not None and e.get("reason", "expert") == "expert":
            by_symbol[e["symbol"]].append(float(e["slippage_pips"]))
    figures.append(("Slippage by symbol", "Each fill against its order's expected price.",
                    _boxes(by_symbol, "slippage per fill", "symbol", "pips")))
    by_type: dict[str, list[float]] = defaultdict(list)
    by_size: dict[str, list[float]] = defaultdict(list)
    for o in filled:
        if o.get("slippage_pips") is not None:
            by_type[o.get("order_type", "?")].append(float(o["slippage_pips"]))
            by_size[size_bucket(float(o.get("volume", 0)))].append(float(o["slippage_pips"]))
    figures.append(("Slippage by order type", "Each filled order's average fill against its expected price.",
                    _boxes(by_type, "slippage per order", "order type", "pips", ORDER_TYPES)))
    figures.append(("Slippage by order size", "Lots requested.",
                    _boxes(by_size, "slippage per order", "size (lots)", "pips", [n for _, n in SIZE_BUCKETS])))

    # Fill ratio by order type.
    requested: Counter = Counter()
    done: Counter = Counter()
    for o in orders:
        if o.get("intent", "open") != "open":
            continue
        requested[o.get("order_type", "?")] += float(o.get("volume") or 0)
        done[o.get("order_type", "?")] += float(o.get("filled_volume") or 0)
    types = [t for t in ORDER_TYPES if requested[t]] + sorted(t for t in requested if t not in ORDER_TYPES)
    ratio = {t: done[t] / requested[t] for t in types}
    fig = go.Figure(go.Bar(x=types, y=[ratio[t] for t in types], marker_color="#5cb85c"))
    fig.update_yaxes(range=[0, 1], tickformat=".0%")
    figures.append(("Fill ratio by order type", "Filled volume / requested volume, every order (open orders count as unfilled).",
                    _layout(fig, "fill ratio", "order type", "filled / requested")))

    # Why orders did not trade.
    reasons = Counter(_reason(o) for o in orders if o.get("state") in ("REJECTED", "FAILED", "CANCELLED"))
    top = reasons.most_common(12)
    fig = go.Figure(go.Bar(x=[n for _, n in top], y=[r for r, _ in top], orientation="h", marker_color="#777"))
    fig.update_yaxes(autorange="reversed")
    figures.append(("Reject, failure and cancel reasons", "Orders that ended REJECTED, FAILED or CANCELLED.",
                    _layout(fig, "orders by reason", "orders", "").update_layout(margin={"l": 320})))

    # Time to fill by order type.
    ttf: dict[str, list[float]] = defaultdict(list)
    for o in filled:
        s = _seconds(o.get("created_at"), o.get("filled_at"))
        if s is not None:
            ttf[o.get("order_type", "?")].append(s)
    figures.append(("Time to fill by order type", "Seconds from the order's creation to its last fill.",
                    _boxes(ttf, "time to fill", "order type", "seconds", ORDER_TYPES)))

    states = Counter(o.get("state", "?") for o in orders)
    summary = _table(["symbol", "filled market orders", "IS mean", "delay mean", "execution mean", "IS p95"],
                     [(s, len(v["total"]), _mean(v["total"]), _mean(v["delay"]), _mean(v["execution"]), _p95(v["total"]))
                      for s, v in sorted(is_rows.items())])
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        "<p>Costs in pips, <b>positive = adverse</b> (a buy above, a sell below the reference). Decision price: "
        "the signal's entry for market orders, the limit or trigger price for pending ones. Arrival price: the "
        "broker's touch when the order went out.</p>",
        "<h2>Orders</h2>",
        _table(["state", "orders"], sorted(states.items())),
        _table(["order type", "requested lots", "filled lots", "fill ratio"],
               [(t, requested[t], done[t], ratio[t]) for t in types]),
        "<h2>Implementation shortfall of market orders (pips)</h2>",
        "<p>Delay and execution means are over the orders with an arrival price.</p>",
        summary,
    ]
    for i, (section, note, figure) in enumerate(figures):
        parts.append(f"<h2>{html.escape(section)}</h2><p>{html.escape(note)}</p>")
        parts.append(figure.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False,
                                    div_id=f"chart-{i}", config={"displaylogo": False}))
    style = ("body{font-family:sans-serif;margin:24px;color:#222;max-width:1100px}table{border-collapse:collapse;"
             "margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def _reason(order: dict) -> str:
    """The reason, shortened to its kind (numbers and ids out) so alike reasons count together."""
    reason = str(order.get("reason") or order.get("state", "?"))
    head = reason.split(":")[0].strip()
    return head[:60] or order.get("state", "?")


#: The charts of a report, by their div ids (``chart-0`` ...), for the tests.
CHARTS = 7
