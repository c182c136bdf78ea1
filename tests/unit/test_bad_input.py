"""Bad input, generated: whatever bytes arrive, decoding either yields a valid model or a
DecodeError whose reason names a field (or the payload) - never another exception."""

from __future__ import annotations

import math

import orjson
from bad_payloads import VALID_SIGNAL, any_fill_payload, any_signal_payload
from hypothesis import HealthCheck, given, settings

from app.models import ApprovedSignal, DecodeError, Fill, from_json


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
@given(raw=any_signal_payload())
def test_any_signal_payload_is_a_model_or_a_reasoned_dead_letter(raw):
    check(ApprovedSignal, raw)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(raw=any_fill_payload())
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
