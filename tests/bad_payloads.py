"""Hypothesis strategies of malformed signals and fills, shared by the unit property tests
(``tests/unit/test_bad_input.py``: decoding alone) and the live pipeline test
(``tests/test_bad_input_live.py``: the same payloads through NATS, the bridge and the worker).

Each strategy yields the raw bytes as they would arrive; :func:`collect` draws a fixed,
reproducible list of them (a fixed seed, no example database) for tests that must publish
the payloads rather than check them one by one.
"""

from __future__ import annotations

import json
import math

import orjson
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from app.models import MAX_LOTS, MAX_PRICE
from tables.symbols import DEFAULT_SYMBOLS

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4), max_leaves=12)

SIGNAL_FIELDS = ["signal_id", "symbol", "signal_type", "entry_price", "stop_loss", "take_profit", "position_size",
                 "order_type", "trigger_price", "limit_price", "account", "strategy", "approved_at"]
FILL_FIELDS = ["order_id", "deal", "ticket", "symbol", "side", "price", "volume", "time"]

VALID_SIGNAL = {"signal_id": "s-1", "symbol": "EURUSD", "signal_type": "buy", "entry_price": 1.08,
                "stop_loss": 1.07, "take_profit": 1.09, "position_size": 0.1}
VALID_FILL = {"order_id": "O1", "deal": 1, "ticket": 2, "symbol": "EURUSD", "side": "buy", "price": 1.08,
              "volume": 0.1, "time": "2026-11-25T00:00:00Z", "magic": 20261124}  # the service's magic

#: Price-like fields of each payload, and the size field (lots).
SIGNAL_PRICES = ["entry_price", "stop_loss", "take_profit", "trigger_price", "limit_price"]
FILL_PRICES = ["price"]


def json_bytes(d: dict) -> bytes:
    try:
        return orjson.dumps(d)
    except (TypeError, orjson.JSONEncodeError):  # NaN/inf or a huge int: write it as Python's json would
        return json.dumps(d, default=str).encode()


def mutated(base: dict, fields: list[str]):
    """The valid payload with some fields replaced by arbitrary JSON values or removed."""
    return st.dictionaries(st.sampled_from(fields), st.one_of(json_values, st.just("<drop>")), min_size=1, max_size=4).map(
        lambda changes: json_bytes({k: v for k, v in {**base, **changes}.items() if v != "<drop>"})
    )


# --- targeted families: each payload is bad in one named way --------------------------------

non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
#: Never a valid price: zero or negative, beyond MAX_PRICE, or not finite.
bad_prices = st.one_of(st.floats(max_value=0.0, allow_nan=False), st.floats(min_value=MAX_PRICE, allow_infinity=False), non_finite)
#: Never a valid size in lots: zero or negative, beyond MAX_LOTS, or not finite.
bad_sizes = st.one_of(st.floats(max_value=0.0, allow_nan=False), st.floats(min_value=MAX_LOTS, exclude_min=True, allow_infinity=False),
                      non_finite)


def bad_number(base: dict, prices: list[str], size: str):
    """(field, payload): one price or the size set to a number no order can have."""
    return st.one_of(
        st.tuples(st.sampled_from(prices), bad_prices),
        st.tuples(st.just(size), bad_sizes),
    ).map(lambda fv: (fv[0], json_bytes({**base, fv[0]: fv[1]})))


invalid_utf8 = st.binary(min_size=1, max_size=24).filter(lambda b: not _is_utf8(b))


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def bad_utf8(base: dict, fields: list[str]):
    """The valid payload with bytes that are not UTF-8 inside one of its string values."""

    def splice(field_junk: tuple[str, bytes]) -> bytes:
        field, junk = field_junk
        marker = "\x00MARK\x00"
        raw = orjson.dumps({**base, field: marker})
        return raw.replace(orjson.dumps(marker), b'"' + junk.replace(b'"', b"'").replace(b"\\", b"/") + b'"')

    return st.tuples(st.sampled_from(fields), invalid_utf8).map(splice)


#: Six upper-case letters (a well-formed symbol) that the symbol table does not know.
unknown_symbols = st.from_regex(r"[A-Z]{6}", fullmatch=True).filter(lambda s: s not in DEFAULT_SYMBOLS)


def with_unknown_symbol(base: dict, ids: str = r"u-[a-z0-9]{10}"):
    """An otherwise valid payload whose symbol is unknown (and a fresh signal id)."""
    return st.tuples(unknown_symbols, st.from_regex(ids, fullmatch=True)).map(
        lambda t: orjson.dumps({**base, "symbol": t[0], "signal_id": t[1]}))


def padded(base: dict, size: int) -> bytes:
    """The payload with an extra field that makes it ``size`` bytes long (at least its own)."""
    head = orjson.dumps({**base, "pad": ""})
    return orjson.dumps({**base, "pad": "x" * max(0, size - len(head))})


def huge(base: dict, min_size: int, max_size: int):
    """An otherwise valid payload padded (an extra field) to a total size in [min_size, max_size]."""
    return st.integers(min_value=min_size, max_value=max_size).map(lambda n: padded(base, n))


def any_signal_payload():
    return st.one_of(st.binary(max_size=300), mutated(VALID_SIGNAL, SIGNAL_FIELDS), json_values.map(json_bytes))


def any_fill_payload():
    return st.one_of(st.binary(max_size=300), mutated(VALID_FILL, FILL_FIELDS), json_values.map(json_bytes))


# --- drawing a fixed list -------------------------------------------------------------------


def collect(strategy, n: int, at: int = 0) -> list:
    """``n`` examples of ``strategy``, the same on every run (seed ``at``; duplicates kept out,
    so fewer when the strategy has fewer distinct values)."""
    out: list = []
    seen: set = set()

    @seed(at)
    @settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(value) -> None:
        key = repr(value)
        if key not in seen:
            seen.add(key)
            out.append(value)

    draw()
    return out
