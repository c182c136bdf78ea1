"""NATS outputs: order status subjects and execution alerts, from the Kafka topics.

Publishing from Kafka (rather than from the agents that decide) keeps NATS outages away
from order processing: this agent retries until JetStream acknowledges, and each message
carries a ``Nats-Msg-Id`` derived from the record, so a replay is dropped by JetStream's
duplicate window instead of reaching subscribers twice.

* ``orders.status``            → ``orders.{state}.{symbol}`` (state lower-case), the Order JSON
* ``alerts.execution.slippage`` → the same subject: slippage alerts (the orders agent writes
  them there beside the archive, so this agent does not read every lifecycle event)
* ``positions.discrepancies``  → ``alerts.execution.reconciliation``
* ``fills.dlq``                → ``alerts.execution.fills`` (a fill for an unknown order, a bad fill)
"""

from __future__ import annotations

import asyncio
import logging

import faust
import orjson

from agents.common import Batch, Context, dead_letter, until_done
from app.bridge import ensure_stream
from app.topics import (
    FILLS_DLQ,
    ORDERS_STATUS,
    POSITIONS_DISCREPANCIES,
    SINK_DLQ,
    SLIPPAGE_ALERTS,
)

log = logging.getLogger(__name__)

INPUTS = (ORDERS_STATUS, SLIPPAGE_ALERTS, POSITIONS_DISCREPANCIES, FILLS_DLQ)
ORDERS_STREAM = ("ORDERS", ["orders.>"])
ALERTS_STREAM = ("EXECUTION_ALERTS", ["alerts.execution.>"])
RECONCILIATION_ALERTS = "alerts.execution.reconciliation"
FILL_ALERTS = "alerts.execution.fills"


def status_subject(state: str, symbol: str) -> str:
    return f"orders.{state.lower()}.{symbol}"


def nats_message(topic: str, raw: bytes, headers: dict[str, bytes], where: str) -> tuple[str, bytes, str] | None:
    """(subject, payload, msg id) for a Kafka record, or None when it is not published."""
    if topic == ORDERS_STATUS:
        order = orjson.loads(raw)
        return status_subject(order["state"], order["symbol"]), raw, f"{order['order_id']}:{order['version']}"
    if topic == SLIPPAGE_ALERTS:
        return SLIPPAGE_ALERTS, raw, orjson.loads(raw)["event_id"]
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
    settings = ctx.rt.settings
    ready = {"streams": False}

    async def publish(messages: list[tuple[str, bytes, str]]) -> None:
        """Publish a batch side by side and wait for every JetStream ack; while NATS is down
        the batch is held back and published again (the msg ids drop what already landed)."""
        async def attempt() -> None:
            js = await ctx.rt.jetstream()
            if not ready["streams"]:
                for name, subjects in (ORDERS_STREAM, ALERTS_STREAM):
                    await ensure_stream(js, name, subjects)
                ready["streams"] = True
            await asyncio.gather(*(js.publish(s, p, headers={"Nats-Msg-Id": i}) for s, p, i in messages))

        await until_done(f"notify: {len(messages)} messages to JetStream", attempt)
        for subject, _, _ in messages:
            ctx.rt.metrics.inc("nats_published", subject=subject.split(".")[0])

    @app.agent(source, name="notify")
    async def notify(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.agent_batch_max, within=settings.agent_batch_within):
            messages: list[tuple[str, bytes, str]] = []
            dead = Batch()
            for event in events:
                msg = event.message
                try:
                    out = nats_message(msg.topic, event.value, dict(msg.headers or ()), f"{msg.partition}:{msg.offset}")
                except (ValueError, KeyError, TypeError) as exc:  # not a record this service wrote
                    ctx.rt.metrics.inc("dead_letters", topic=SINK_DLQ)
                    dead.emit(dead_letter(SINK_DLQ, event, f"notify: unreadable {msg.topic} record: {type(exc).__name__}: {exc}"))
                    continue
                if out is not None:
                    messages.append(out)
            if messages:
                await publish(messages)
            if dead:
                await dead.commit(ctx, "notify")
