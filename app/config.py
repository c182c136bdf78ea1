"""Operational configuration: the seed's ``operational`` block, typed, with its safe defaults.

The live values come from the central hub (a NATS JetStream key-value bucket) and are
hot-reloaded; these defaults apply whenever the hub has nothing (or something invalid).
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.models import OrderType, TimeInForce

log = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class OrderDefaults(_Section):
    default_order_type: OrderType = OrderType.MARKET
    enable_limit_orders: bool = True
    enable_stop_orders: bool = True
    #: Maximum acceptable slippage for market orders; becomes MT5 ``deviation`` in points.
    max_slippage_pips: float = Field(3, ge=0, le=1000)
    #: Time in force of a pending order whose signal names none (GTC, DAY, GTD).
    default_time_in_force: TimeInForce = TimeInForce.GTC
    #: A signal older than this when the orders agent reaches it is not traded (REJECTED,
    #: reason ``stale``): its price is history.  Age from the signal's ``approved_at``, else
    #: from when the bridge forwarded it.
    max_signal_age_seconds: float = Field(30, gt=0, le=86_400)


def _drop_obsolete(data: Any, names: tuple[str, ...], section: str) -> Any:
    """``data`` without the obsolete ``names`` (logged once per document): an old hub
    document that still has them is accepted, not rejected."""
    if isinstance(data, dict):
        found = [k for k in names if k in data]
        if found:
            log.warning("config: ignoring obsolete operational.%s settings %s (no longer used)", section, ", ".join(found))
            data = {k: v for k, v in data.items() if k not in found}
    return data


#: ``idempotency`` knobs of the seed that cannot be honoured: order ids derive from the signal
#: id and the broker dedupes on them, so a signal can never get a second order (``enabled``
#: false would be a lie) and ``signal_id`` is the only possible key (``dedupe_by``).
OBSOLETE_IDEMPOTENCY = ("enabled", "dedupe_by")


class Idempotency(_Section):
    #: How long ``signal_orders`` remembers a signal, and a final order stays in ``orders``.
    check_window_hours: float = Field(24, gt=0, le=24 * 30)

    @model_validator(mode="before")
    @classmethod
    def _obsolete(cls, data: Any) -> Any:
        return _drop_obsolete(data, OBSOLETE_IDEMPOTENCY, "idempotency")


#: ``fill_tracking`` knobs of the seed that nothing ever read (partial fills are always
#: tracked, fills are applied as they arrive): accepted in a hub document and ignored, with a
#: warning, so an old document is not rejected.
OBSOLETE_FILL_TRACKING = ("track_partial_fills", "update_interval_seconds")


class FillTracking(_Section):
    slippage_alert_threshold_pips: float = Field(5, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _obsolete(cls, data: Any) -> Any:
        return _drop_obsolete(data, OBSOLETE_FILL_TRACKING, "fill_tracking")


class PositionReconciliation(_Section):
    enabled: bool = True
    reconcile_interval_minutes: float = Field(5, gt=0)
    auto_correct_discrepancies: bool = False


class Submission(_Section):
    """How orders are sent and watched (not in the seed; these are the service's defaults)."""

    #: Wait this long for the connector's reply to a submit before treating it as no reply.
    reply_timeout_seconds: float = Field(2, gt=0, le=60)
    #: Resends after no reply or an unknown-outcome retcode (the broker is asked first).
    submit_retries: int = Field(2, ge=0, le=10)
    #: Resends at the broker's new price after a requote / price change.
    max_requotes: int = Field(2, ge=0, le=10)
    #: An order PENDING or SUBMITTED this long without news is asked about at the broker,
    #: and marked FAILED with reason ``timeout`` if the broker does not know it.
    stuck_order_timeout_seconds: float = Field(60, gt=0)
    stuck_check_interval_seconds: float = Field(5, gt=0)
    #: Where the broker expires a DAY or GTD order itself, the service cancels it only this
    #: long after its expiry (a backstop): a cancel sent on time races the broker's expiry.
    broker_expiry_grace_seconds: float = Field(5, ge=0)


class Trading(_Section):
    #: The halt switch: false refuses every new order (REJECTED, reason ``halted``) while
    #: cancels, closes and fills go on.
    trading_enabled: bool = True
    #: Only orders that reduce a position are sent; the others are REJECTED (``reduce_only``).
    reduce_only: bool = False


class Operational(_Section):
    trading: Trading = Trading()
    order_defaults: OrderDefaults = OrderDefaults()
    idempotency: Idempotency = Idempotency()
    fill_tracking: FillTracking = FillTracking()
    position_reconciliation: PositionReconciliation = PositionReconciliation()
    submission: Submission = Submission()


class OperationalConfig(_Section):
    """The whole document kept in the central hub under the key ``execution``."""

    operational: Operational = Operational()


SAFE_DEFAULTS = OperationalConfig()
