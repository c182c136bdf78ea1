"""The transaction-cost report: one self-contained HTML file with inline SVG plots.

Built from ClickHouse rows (``orders`` and ``executions``), so it shows what analysts see:
slippage distribution per symbol, slippage versus order size, time to fill.  Slippage is in
pips, positive = adverse (worse for us).  No plotting library: the plots are plain SVG.
"""

from __future__ import annotations

import html
import math
import statistics
from collections import defaultdict
from datetime import datetime
from typing import Any, Iterable

W, H, PAD = 420, 220, 36


def _scale(lo: float, hi: float, a: float, b: float):
    if hi == lo:
        hi = lo + 1.0
    return lambda v: a + (v - lo) * (b - a) / (hi - lo)


def _axes(xlo: float, xhi: float, ylo: float, yhi: float, xlabel: str, ylabel: str) -> list[str]:
    out = [
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 8}" y2="{H - PAD}" stroke="#444"/>',
        f'<line x1="{PAD}" y1="8" x2="{PAD}" y2="{H - PAD}" stroke="#444"/>',
        f'<text x="{PAD}" y="{H - PAD + 14}" font-size="10">{xlo:.3g}</text>',
        f'<text x="{W - 40}" y="{H - PAD + 14}" font-size="10">{xhi:.3g}</text>',
        f'<text x="2" y="{H - PAD}" font-size="10">{ylo:.3g}</text>',
        f'<text x="2" y="16" font-size="10">{yhi:.3g}</text>',
        f'<text x="{W / 2 - 40}" y="{H - 6}" font-size="11">{html.escape(xlabel)}</text>',
        f'<text x="4" y="{H / 2}" font-size="11" transform="rotate(-90 10,{H / 2})">{html.escape(ylabel)}</text>',
    ]
    return out


def histogram_svg(values: list[float], title: str, xlabel: str, bins: int = 20) -> str:
    if not values:
        return f"<p>{html.escape(title)}: no data</p>"
    lo, hi = min(values), max(values)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / width))] += 1
    sx = _scale(lo, hi, PAD, W - 8)
    sy = _scale(0, max(counts), H - PAD, 8)
    parts = [f'<svg width="{W}" height="{H}" xmlns="http://www.w3.org/2000/svg" role="img">',
             f"<title>{html.escape(title)}</title>"]
    parts += _axes(lo, hi, 0, max(counts), xlabel, "count")
    for i, c in enumerate(counts):
        x0, x1 = sx(lo + i * width), sx(lo + (i + 1) * width)
        parts.append(f'<rect x="{x0:.1f}" y="{sy(c):.1f}" width="{max(1, x1 - x0 - 1):.1f}" height="{H - PAD - sy(c):.1f}" fill="#3b7dd8"/>')
    if lo < 0 < hi:
        parts.append(f'<line x1="{sx(0):.1f}" y1="8" x2="{sx(0):.1f}" y2="{H - PAD}" stroke="#c33" stroke-dasharray="3"/>')
    parts.append("</svg>")
    return "".join(parts)


def scatter_svg(points: list[tuple[float, float]], title: str, xlabel: str, ylabel: str) -> str:
    if not points:
        return f"<p>{html.escape(title)}: no data</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    sx = _scale(min(xs), max(xs), PAD + 4, W - 12)
    sy = _scale(min(ys), max(ys), H - PAD - 4, 12)
    parts = [f'<svg width="{W}" height="{H}" xmlns="http://www.w3.org/2000/svg" role="img">',
             f"<title>{html.escape(title)}</title>"]
    parts += _axes(min(xs), max(xs), min(ys), max(ys), xlabel, ylabel)
    for x, y in points:
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="#d87b3b" fill-opacity="0.7"/>')
    parts.append("</svg>")
    return "".join(parts)


def _seconds(a: Any, b: Any) -> float | None:
    if not isinstance(a, datetime) or not isinstance(b, datetime):
        return None
    return (b - a).total_seconds()


def _table(headers: list[str], rows: Iterable[Iterable[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if math.isfinite(v) else str(v)
    return str(v)


def render_report(orders: list[dict], executions: list[dict], title: str = "Transaction-cost report") -> str:
    """HTML for ``orders`` and ``executions`` rows (dicts with the ClickHouse column names)."""
    by_symbol: dict[str, list[float]] = defaultdict(list)
    for e in executions:
        if e.get("slippage_pips") is not None:
            by_symbol[e["symbol"]].append(float(e["slippage_pips"]))
    filled = [o for o in orders if o.get("state") == "FILLED"]
    size_vs_slip = [(float(o["volume"]), float(o["slippage_pips"])) for o in filled if o.get("slippage_pips") is not None]
    ttf = [s for o in filled if (s := _seconds(o.get("created_at"), o.get("filled_at"))) is not None]
    ttf_market = [s for o in filled if o.get("order_type") == "market"
                  and (s := _seconds(o.get("created_at"), o.get("filled_at"))) is not None]

    summary_rows = []
    for symbol, vals in sorted(by_symbol.items()):
        summary_rows.append((symbol, len(vals), statistics.fmean(vals), statistics.median(vals),
                             sorted(vals)[max(0, math.ceil(0.95 * len(vals)) - 1)], max(vals)))
    states: dict[str, int] = defaultdict(int)
    for o in orders:
        states[o.get("state", "?")] += 1

    sections = [
        f"<h1>{html.escape(title)}</h1>",
        "<p>Slippage in pips against the expected price (the signal's entry for market orders, "
        "the limit or trigger price for pending ones); <b>positive = adverse</b>.</p>",
        "<h2>Orders</h2>",
        _table(["state", "orders"], sorted(states.items())),
        "<h2>Slippage by symbol (fills)</h2>",
        _table(["symbol", "fills", "mean", "median", "p95", "max"], summary_rows),
        "<h2>Slippage distribution per symbol</h2>",
        "<div class='grid'>" + "".join(histogram_svg(v, f"{s} slippage", f"{s}: pips") for s, v in sorted(by_symbol.items())) + "</div>",
        "<h2>Slippage versus order size</h2>",
        scatter_svg(size_vs_slip, "slippage vs size", "order size (lots)", "slippage (pips)"),
        "<h2>Time to fill</h2>",
        f"<p>{len(ttf)} filled orders; market orders median "
        f"{statistics.median(ttf_market) if ttf_market else float('nan'):.3f} s.</p>",
        histogram_svg(ttf, "time to fill", "seconds from order creation to last fill"),
    ]
    style = ("body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}.grid{display:flex;flex-wrap:wrap;gap:8px}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(sections)}</body></html>"
