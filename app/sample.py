"""Realistic sample traffic: approved signals and the ways real payloads go wrong.

Used by the demo, the tests and the benchmarks, so all three exercise the same mix.
"""

from __future__ import annotations

import random
from datetime import datetime, timezone

import orjson

#: Reference mid prices and the digits of their quotes.
REFERENCE = {
    "EURUSD": (1.08125, 5),
    "GBPUSD": (1.27110, 5),
    "AUDUSD": (0.65840, 5),
    "USDCHF": (0.88020, 5),
    "USDJPY": (151.432, 3),
    "EURJPY": (163.215, 3),
    "XAUUSD": (2345.60, 2),
}


def signal_dict(
    signal_id: str,
    rng: random.Random,
    *,
    symbol: str | None = None,
    order_type: str | None = None,
    side: str | None = None,
    lots: float | None = None,
    account: str = "acc-1",
    mid: float | None = None,
) -> dict:
    """A valid approved signal with SL/TP on the correct sides and plausible prices.

    The entry is within a fraction of a pip of ``mid`` (default: the reference price), as a
    signal priced off the current market is.
    """
    symbol = symbol or rng.choice(list(REFERENCE))
    ref_mid, digits = REFERENCE[symbol]
    mid = mid or ref_mid
    side = side or rng.choice(("buy", "sell"))
    sign = 1 if side == "buy" else -1
    pip = 10 ** -(digits - 1) if digits in (3, 5) else 10 ** -digits * 10
    entry = round(mid * (1 + rng.uniform(-0.00002, 0.00002)), digits)
    d: dict = {
        "signal_id": signal_id,
        "symbol": symbol,
        "signal_type": side,
        "entry_price": entry,
        "stop_loss": round(entry - sign * 20 * pip, digits),
        "take_profit": round(entry + sign * 40 * pip, digits),
        "position_size": lots if lots is not None else rng.choice((0.01, 0.05, 0.1, 0.2, 0.5, 1.0)),
        "account": account,
        "strategy": rng.choice(("trend", "meanrev", "breakout")),
        "approved_at": datetime.now(timezone.utc).isoformat(),
    }
    if order_type and order_type != "market":
        d["order_type"] = order_type
        away = 5 * pip
        if order_type == "limit":
            d["limit_price"] = round(entry - sign * away, digits)
        elif order_type == "stop":
            d["trigger_price"] = round(entry + sign * away, digits)
        elif order_type == "stop_limit":
            d["trigger_price"] = round(entry + sign * away, digits)
            d["limit_price"] = round(entry + sign * 2 * away, digits)
    return d


def subject_for(d: dict) -> str:
    return f"signals.approved.{d.get('symbol') or 'UNKNOWN'}"


#: (name, mutation, field the dead-letter reason must name)
MALFORMED_CASES: list[tuple[str, object, str]] = [
    ("not_json", lambda d: b"{this is not json", "JSON"),
    ("not_an_object", lambda d: b"[1, 2, 3]", "object"),
    ("bad_utf8", lambda d: b'{"signal_id": "\xff\xfe"}', "JSON"),
    ("missing_signal_id", lambda d: _without(d, "signal_id"), "signal_id"),
    ("missing_symbol", lambda d: _without(d, "symbol"), "symbol"),
    ("missing_entry_price", lambda d: _without(d, "entry_price"), "entry_price"),
    ("missing_position_size", lambda d: _without(d, "position_size"), "position_size"),
    ("nan_entry_price", lambda d: orjson.dumps(d).replace(b'"entry_price":' + orjson.dumps(d["entry_price"]), b'"entry_price":NaN'), "entry_price"),
    ("inf_position_size", lambda d: _set(d, position_size="Infinity"), "position_size"),
    ("negative_position_size", lambda d: _set(d, position_size=-0.1), "position_size"),
    ("zero_entry_price", lambda d: _set(d, entry_price=0), "entry_price"),
    ("absurd_entry_price", lambda d: _set(d, entry_price=1e12), "entry_price"),
    ("price_as_text", lambda d: _set(d, entry_price="one point one"), "entry_price"),
    ("bad_symbol", lambda d: _set(d, symbol="eur/usd"), "symbol"),
    ("bad_side", lambda d: _set(d, signal_type="hold"), "signal_type"),
    ("stop_loss_wrong_side", lambda d: _set(d, stop_loss=d["take_profit"]), "stop_loss"),
    ("take_profit_wrong_side", lambda d: _set(d, take_profit=d["stop_loss"]), "take_profit"),
    ("bad_order_type", lambda d: _set(d, order_type="iceberg"), "order_type"),
    ("stop_limit_without_prices", lambda d: _set(d, order_type="stop_limit"), "trigger_price"),
    ("empty_signal_id", lambda d: _set(d, signal_id=""), "signal_id"),
]


def _without(d: dict, key: str) -> bytes:
    return orjson.dumps({k: v for k, v in d.items() if k != key})


def _set(d: dict, **kw: object) -> bytes:
    return orjson.dumps({**d, **kw})


def malformed(i: int, signal_id: str, rng: random.Random) -> tuple[str, bytes, str]:
    """The i-th malformed payload (cycling through the cases): (case, bytes, field)."""
    name, mutate, field = MALFORMED_CASES[i % len(MALFORMED_CASES)]
    return name, mutate(signal_dict(signal_id, rng)), field  # type: ignore[operator]
