"""Validation of the wire models: every bad input gets a reason that names the field."""

from __future__ import annotations

import json
import math
import random

import orjson
import pytest
from hypothesis import given, strategies as st

from app.models import ApprovedSignal, DecodeError, Fill, OrderType, Side, from_json, to_json
from app.sample import MALFORMED_CASES, malformed, signal_dict

GOOD = {
    "signal_id": "sig_12345",
    "symbol": "EURUSD",
    "signal_type": "buy",
    "entry_price": 1.08125,
    "stop_loss": 1.08000,
    "take_profit": 1.08500,
    "position_size": 0.01,
}


def test_seed_signal_parses():
    s = from_json(ApprovedSignal, orjson.dumps(GOOD))
    assert s.signal_type is Side.BUY and s.position_size == 0.01 and s.order_type is None
    assert s.account == "default"
    assert from_json(ApprovedSignal, to_json(s)) == s  # orjson round trip


@pytest.mark.parametrize("case", range(len(MALFORMED_CASES)))
def test_each_malformed_case_names_its_field(case):
    name, payload, field = malformed(case, "sig-x", random.Random(case))
    with pytest.raises(DecodeError) as err:
        from_json(ApprovedSignal, payload)
    assert field in err.value.reason, f"{name}: {err.value.reason}"


@pytest.mark.parametrize(
    "side,sl,tp,bad",
    [
        ("buy", 1.09, 1.10, "stop_loss"),  # buy SL above entry
        ("buy", 1.07, 1.07, "take_profit"),  # buy TP below entry
        ("sell", 1.07, 1.07, "stop_loss"),  # sell SL below entry
        ("sell", 1.09, 1.09, "take_profit"),  # sell TP above entry
        ("buy", 1.08, 1.08, "take_profit"),  # TP equal to... below entry
    ],
)
def test_stops_must_be_on_the_right_side(side, sl, tp, bad):
    with pytest.raises(DecodeError) as err:
        from_json(ApprovedSignal, orjson.dumps({**GOOD, "entry_price": 1.08125, "signal_type": side, "stop_loss": sl, "take_profit": tp}))
    assert bad in err.value.fields


def test_sell_with_correct_stops_is_valid():
    s = from_json(ApprovedSignal, orjson.dumps({**GOOD, "signal_type": "sell", "stop_loss": 1.083, "take_profit": 1.078}))
    assert s.signal_type is Side.SELL


def test_stop_limit_needs_both_prices():
    with pytest.raises(DecodeError, match="trigger_price"):
        from_json(ApprovedSignal, orjson.dumps({**GOOD, "order_type": "stop_limit", "trigger_price": 1.082}))
    ok = from_json(ApprovedSignal, orjson.dumps({**GOOD, "order_type": "stop_limit", "trigger_price": 1.082, "limit_price": 1.0825}))
    assert ok.order_type is OrderType.STOP_LIMIT


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 0.0, 1e9])
def test_non_finite_or_absurd_prices_refused(value):
    payload = json.dumps({**GOOD, "entry_price": value, "stop_loss": None, "take_profit": None})  # NaN literal
    with pytest.raises(DecodeError) as err:
        from_json(ApprovedSignal, payload)
    assert err.value.fields == ["entry_price"]


def test_model_validate_nan_raises_validation_error_naming_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="entry_price"):
        ApprovedSignal.model_validate({**GOOD, "entry_price": math.nan, "stop_loss": None, "take_profit": None})


def test_fill_validation():
    f = from_json(Fill, orjson.dumps({"order_id": "O1", "deal": 5, "symbol": "EURUSD", "side": "sell", "price": 1.1, "volume": 0.5, "time": "2026-01-01T00:00:00Z"}))
    assert f.deal == 5 and f.side is Side.SELL
    with pytest.raises(DecodeError, match="volume"):
        from_json(Fill, orjson.dumps({"order_id": "O1", "deal": 5, "symbol": "EURUSD", "side": "sell", "price": 1.1, "volume": -1, "time": "2026-01-01T00:00:00Z"}))


@given(st.dictionaries(st.sampled_from(sorted(GOOD) + ["order_type", "limit_price"]), st.one_of(st.none(), st.floats(allow_nan=True), st.text(max_size=8), st.integers())))
def test_arbitrary_payloads_parse_or_raise_decode_error(d):
    try:
        s = from_json(ApprovedSignal, json.dumps(d))  # stdlib json writes NaN/Infinity literals
    except DecodeError as exc:
        assert exc.reason and exc.fields
    else:
        assert math.isfinite(s.entry_price) and 0 < s.position_size and s.entry_price > 0


def test_valid_samples_all_parse():
    rng = random.Random(0)
    for i in range(300):
        for ot in (None, "limit", "stop", "stop_limit"):
            from_json(ApprovedSignal, orjson.dumps(signal_dict(f"s{i}", rng, order_type=ot)))


def test_the_changelogs_ensure_topics_creates_are_the_tables_changelogs():
    import faust

    from app.topics import TABLES
    from tables.definitions import define_tables

    app = faust.App("changelog-names", broker="memory://", store="memory://")
    tables = define_tables(app)
    assert set(app.tables) == set(TABLES) and len(TABLES) == len(set(TABLES))
    assert "open_orders" not in app.tables and not tables.open_orders  # in memory, no changelog
