"""The central-hub config: merge over safe defaults, validation, last good config kept."""

from __future__ import annotations

import pytest

from app.config import SAFE_DEFAULTS
from app.hub import ConfigHub, parse, set_path


def test_partial_document_changes_one_value_and_keeps_the_defaults():
    cfg = parse(b'{"operational": {"fill_tracking": {"slippage_alert_threshold_pips": 3}}}')
    assert cfg.operational.fill_tracking.slippage_alert_threshold_pips == 3
    assert cfg.operational.order_defaults == SAFE_DEFAULTS.operational.order_defaults
    assert cfg.operational.idempotency.check_window_hours == 24


@pytest.mark.parametrize(
    "raw, names",
    [
        (b"{not json", "not JSON"),
        (b"[1]", "JSON object"),
        (b'{"operational": {"fill_tracking": {"slippage_alert_threshold_pips": -1}}}', "slippage_alert_threshold_pips"),
        (b'{"operational": {"order_defaults": {"default_order_type": "iceberg"}}}', "default_order_type"),
        (b'{"operational": {"idempotency": {"check_window_hours": NaN}}}', "not JSON"),
        (b'{"operational": {"surprise": 1}}', "surprise"),
    ],
)
def test_invalid_documents_are_rejected_with_the_field(raw, names):
    with pytest.raises(ValueError, match=names):
        parse(raw)


def test_hub_keeps_the_last_good_config_on_an_invalid_change():
    hub = ConfigHub()
    seen = []
    hub.on_change(seen.append)
    hub._apply(b'{"operational": {"order_defaults": {"max_slippage_pips": 7}}}', 1)
    assert hub.current.operational.order_defaults.max_slippage_pips == 7
    hub._apply(b'{"operational": {"order_defaults": {"max_slippage_pips": "lots"}}}', 2)
    assert hub.current.operational.order_defaults.max_slippage_pips == 7
    assert hub.rejected == 1 and hub.revision == 1
    hub._apply(b'{"operational": {"order_defaults": {"max_slippage_pips": 1}}}', 1)  # stale revision
    assert hub.current.operational.order_defaults.max_slippage_pips == 7
    assert len(seen) == 1


def test_set_path_builds_nested_documents():
    assert set_path({}, "operational.fill_tracking.slippage_alert_threshold_pips", 2) == {
        "operational": {"fill_tracking": {"slippage_alert_threshold_pips": 2}}
    }


def test_obsolete_fill_tracking_knobs_are_gone_but_accepted_with_one_warning(caplog):
    from app.config import FillTracking

    assert "track_partial_fills" not in FillTracking.model_fields
    assert "update_interval_seconds" not in FillTracking.model_fields
    assert "track_partial_fills" not in str(SAFE_DEFAULTS.model_dump())
    old = (b'{"operational": {"fill_tracking": {"track_partial_fills": false, "update_interval_seconds": 2,'
           b' "slippage_alert_threshold_pips": 4}}}')
    with caplog.at_level("WARNING"):
        cfg = parse(old)
    assert cfg.operational.fill_tracking.slippage_alert_threshold_pips == 4
    assert cfg.operational.fill_tracking == FillTracking(slippage_alert_threshold_pips=4)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "obsolete" in message and "track_partial_fills" in message and "update_interval_seconds" in message
    # a hub applying the old document takes it; a current document warns about nothing
    hub = ConfigHub()
    hub._apply(old, 1)
    assert hub.rejected == 0 and hub.current.operational.fill_tracking.slippage_alert_threshold_pips == 4
    caplog.clear()
    with caplog.at_level("WARNING"):
        parse(b'{"operational": {"fill_tracking": {"slippage_alert_threshold_pips": 4}}}')
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    # anything else unknown is still rejected
    with pytest.raises(ValueError, match="track_everything"):
        parse(b'{"operational": {"fill_tracking": {"track_everything": true}}}')


def test_idempotency_knobs_that_cannot_be_honoured_are_accepted_and_ignored(caplog):
    from app.config import Idempotency

    assert set(Idempotency.model_fields) == {"check_window_hours"}
    with caplog.at_level("WARNING"):
        cfg = parse(b'{"operational": {"idempotency": {"enabled": false, "dedupe_by": "signal_id", "check_window_hours": 12}}}')
    assert cfg.operational.idempotency == Idempotency(check_window_hours=12)
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "enabled" in warning.getMessage() and "dedupe_by" in warning.getMessage()
    with pytest.raises(ValueError, match="window"):
        parse(b'{"operational": {"idempotency": {"window": 3}}}')
