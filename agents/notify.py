"""NATS outputs: order status subjects and execution alerts, from the Kafka topics.

Publishing from Kafka (rather than from the agents that decide) keeps NATS outages away
from order processing: this agent retries until JetStream acknowledges, and each message
carries a ``Nats-Msg-Id`` derived from the record, so a replay is dropped by JetStream's
duplicate window instead of reaching subscribers twice.

* ``orders.status``            → ``orders.{state}.{symbol}`` (state lower-case), the Order JSON
* ``order_execution_archive``  → ``alerts.execution.slippage`` for slippage alerts
* ``positions.discrepancies``  → ``alerts.execution.reconciliation``
* ``fills.dlq``                → ``alerts.execution.fills`` (a fill for an unknown order, a bad fill)
"""

from __future__ import annotations

import logging

import faust
import orjson

from agents.common import Context, process_safely
from app.bridge import ensure_stream
from app.topics import FILLS_DLQ, ORDER_EXECUTION_ARCHIVE, ORDERS_STATUS, POSITIONS_DISCREPANCIES, SINK_DLQ

log = logging.getLogger(__name__)

INPUTS = (ORDERS_STATUS, ORDER_EXECUTION_ARCHIVE, POSITIONS_DISCREPANCIES, FILLS_DLQ)
ORDERS_STREAM = ("ORDERS", ["orders.>"])
ALERTS_STREAM = ("EXECUTION_ALERTS", ["alerts.execution.>"])
SLIPPAGE_ALERTS = "alerts.execution.slippage"
RECONCILIATION_ALERTS = "alerts.execution.reconciliation"
FILL_ALERTS = "alerts.execution.fills"


def status_subject(state: str, symbol: str) -> str:
    return f"orders.{state.lower()}.{symbol}"


def nats_message(topic: str, raw: bytes, headers: dict[str, bytes], where: str) -> tuple[str, bytes, str] | None:
    """(subject, payload, msg id) for a Kafka record, or None when it is not published."""
    if topic == ORDERS_STATUS:
        order = orjson.loads(raw)
        return status_subject(order["state"], order["symbol"]), raw, f"{order['order_id']}:{order['version']}"
    if topic == ORDER_EXECUTION_ARCHIVE:
        if b'"slippage_alert"' not in raw:
            return None
        event = orjson.loads(raw)
        if event.get("type") != "slippage_alert":
            return None
        return SLIPPAGE_ALERTS, raw, event["event_id"]
    if topic == POSITIONS_DISCREPANCIES:
        d = orjson.loads(raw)
        return RECONCILIATION_ALERTS, raw, f"{d['account']}:{d['symbol']}:{d['detected_at']}"
    if topic == FILLS_DLQ:
        payload = orjson.dumps({"reason": headers.get("reason", b"").decode(errors="replace"),
                                "fill": raw.decode(errors="replace")[:2000]})
        return FILL_ALERTS, payload, f"fills.dlq:{where}"
    return None


def register(ctx: Context) -> None:
    app = ctx.app
    source = app.topic(*INPUTS, key_serializer="raw", value_serializer="raw")
    ready = {"streams": False}

    async def publish(event: faust.EventT) -> None:
        msg = event.message
        out = nats_message(msg.topic, event.value, dict(msg.headers or ()), f"{msg.partition}:{msg.offset}")
        if out is None:
            return
        js = await ctx.rt.jetstream()
        if not ready["streams"]:
            for name, subjects in (ORDERS_STREAM, ALERTS_STREAM):
                await ensure_stream(js, name, subjects)
            ready["streams"] = True
        subject, payload, msg_id = out
        await js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})
        ctx.rt.metrics.inc("nats_published", subject=subject.split(".")[0])

    @app.agent(source, name="notify")
    async def notify(stream: faust.StreamT) -> None:
        async for event in stream.events():
            # attempts=None: NATS down holds the notifications back, it never drops them.
            await process_safely(ctx, event, publish, SINK_DLQ, "notify", attempts=None)
