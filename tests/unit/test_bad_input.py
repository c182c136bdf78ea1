"""Bad input, generated: whatever bytes arrive, decoding either yields a valid model or a
DecodeError whose reason names a field (or the payload) - never another exception."""

from __future__ import annotations

import math

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.models import ApprovedSignal, DecodeError, Fill, from_json

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
              "volume": 0.1, "time": "2026-11-25T00:00:00Z"}


def _dumps(d: dict) -> bytes:
    try:
        return orjson.dumps(d)
    except (TypeError, orjson.JSONEncodeError):  # NaN/inf or a huge int: write it as Python's json would
        import json

        return json.dumps(d, default=str).encode()


def mutated(base: dict, fields: list[str]):
    """The valid payload with some fields replaced by arbitrary JSON values or removed."""
    return st.dictionaries(st.sampled_from(fields), st.one_of(json_values, st.just("<drop>")), min_size=1, max_size=4).map(
        lambda changes: _dumps({k: v for k, v in {**base, **changes}.items() if v != "<drop>"})
    )


def check(model, raw: bytes) -> None:
    try:
        m = model.model_validate(orjson.loads(orjson.dumps(from_json(model, raw).model_dump(mode="json"))))
    except DecodeError as exc:
        assert exc.reason and exc.fields, "a dead letter always says why"
        return
    # Accepted: then it is genuinely valid (finite, positive where it must be).
    for name in ("entry_price", "position_size", "price", "volume"):
        v = getattr(m, name, None)
        if v is not None:
            assert math.isfinite(v) and v > 0


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(raw=st.one_of(st.binary(max_size=300), mutated(VALID_SIGNAL, SIGNAL_FIELDS), json_values.map(_dumps)))
def test_any_signal_payload_is_a_model_or_a_reasoned_dead_letter(raw):
    check(ApprovedSignal, raw)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(raw=st.one_of(st.binary(max_size=300), mutated(VALID_FILL, FILL_FIELDS), json_values.map(_dumps)))
def test_any_fill_payload_is_a_model_or_a_reasoned_dead_letter(raw):
    check(Fill, raw)


def test_huge_payload_is_refused_with_a_reason():
    raw = orjson.dumps({**VALID_SIGNAL, "strategy": "x" * 2_000_000})
    try:
        from_json(ApprovedSignal, raw)
    except DecodeError as exc:
        assert "strategy" in exc.reason
    else:
        raise AssertionError("a 2 MB strategy name was accepted")
