"""The bridge's notifier (Kafka -> NATS) against a real Kafka broker and a real nats-server."""

from __future__ import annotations

import nats
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError

from app.bridge import Bridge
from app.notifier import ALERTS_STREAM, INPUTS, ORDERS_STREAM, Notifier
from app.topics import FILLS_DLQ, ORDERS_STATUS, POSITIONS_DISCREPANCIES, SINK_DLQ, SLIPPAGE_ALERTS, ensure_topics
from support import committed_vs_end, read_topic, stream_messages, wait_until


def order(order_id: str, state: str, version: int) -> bytes:
    return orjson.dumps({"order_id": order_id, "state": state, "symbol": "EURUSD", "version": version})


async def produce(settings, records: list[tuple[str, bytes, bytes, list]]) -> None:
    producer = AIOKafkaProducer(**settings.producer_options())
    await producer.start()
    try:
        for topic, key, value, headers in records:
            await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


async def all_committed(settings, group: str) -> bool:
    committed, end = await committed_vs_end(settings, group, list(INPUTS))
    return committed == end


async def test_order_updates_and_alerts_reach_nats_once_and_a_bad_record_is_dead_lettered(settings, stack):
    await ensure_topics(settings, [*INPUTS, SINK_DLQ])
    alert = orjson.dumps({"event_id": "o-1:slippage_alert:deal-7", "order_id": "o-1"})
    discrepancy = orjson.dumps({"account": "a", "symbol": "EURUSD", "detected_at": "2026-12-06T12:00:00Z"})
    await produce(settings, [
        (ORDERS_STATUS, b"o-1", order("o-1", "PENDING", 1), []),
        (ORDERS_STATUS, b"o-1", order("o-1", "FILLED", 3), []),
        (ORDERS_STATUS, b"o-1", order("o-1", "FILLED", 3), []),  # a replayed record: one message
        (ORDERS_STATUS, b"o-2", b'{"order_id": "o-2"}', []),  # no state: not this service's
        (SLIPPAGE_ALERTS, b"o-1", alert, []),
        (POSITIONS_DISCREPANCIES, b"a:EURUSD", discrepancy, []),
        (FILLS_DLQ, b"deal-9", b'{"deal": 9}', [("reason", b"order_id: unknown order")]),
    ])
    bridge = Bridge(settings)
    await bridge.start()
    try:
        options = settings.nats_options()
        await wait_until(lambda: all_committed(settings, bridge.notifier.group_id), timeout=30, what="offsets committed")
        orders = await stream_messages(options, "orders.>", ORDERS_STREAM[0])
        alerts = await stream_messages(options, "alerts.execution.>", ALERTS_STREAM[0])
        dead = await read_topic(settings, SINK_DLQ, expect=1)
    finally:
        await bridge.stop()
    assert [(s, orjson.loads(d)["version"]) for s, d in orders] == [("orders.pending.EURUSD", 1), ("orders.filled.EURUSD", 3)]
    assert sorted(s for s, _ in alerts) == ["alerts.execution.fills", "alerts.execution.reconciliation",
                                            "alerts.execution.slippage"]
    fills_alert = orjson.loads(next(d for s, d in alerts if s == "alerts.execution.fills"))
    assert fills_alert == {"reason": "order_id: unknown order", "fill": '{"deal": 9}'}
    assert len(dead) == 1 and dead[0].value == b'{"order_id": "o-2"}'
    assert dead[0].headers["topic"] == ORDERS_STATUS.encode() and b"KeyError" in dead[0].headers["reason"]
    assert bridge.notifier.published == {"orders": 3, "alerts": 3}  # the replayed one dropped by NATS, not here
    assert bridge.notifier.dead_lettered == 1


async def test_while_nats_is_down_the_batch_is_held_and_nothing_is_lost(settings, stack):
    await ensure_topics(settings, [*INPUTS, SINK_DLQ])
    bridge = Bridge(settings)
    await bridge.start()
    try:
        stack.nats.stop()
        await produce(settings, [(ORDERS_STATUS, f"o-{i}".encode(), order(f"o-{i}", "FILLED", 2), [])
                                 for i in range(20)])
        await wait_until(lambda: bridge.notifier.publish_retries >= 2, timeout=60, what="publishes failing")
        assert not await all_committed(settings, bridge.notifier.group_id)  # nothing committed unpublished
        stack.nats.start()
        await wait_until(lambda: all_committed(settings, bridge.notifier.group_id), timeout=60,
                         what="the held batch published and committed")
        orders = await stream_messages(settings.nats_options(), "orders.>", ORDERS_STREAM[0])
        assert bridge.notifier.running and not bridge.notifier._consumer.paused()
    finally:
        await bridge.stop()
    assert sorted(orjson.loads(d)["order_id"] for _, d in orders) == sorted(f"o-{i}" for i in range(20))


class RefusingOnce(AIOKafkaProducer):
    """The real producer, but its first dead letter fails as Kafka refusing it would."""

    refused = 0

    async def send(self, topic, *args, **kwargs):
        if topic == SINK_DLQ and not self.refused:
            self.refused += 1
            raise KafkaTimeoutError("injected: the dead letter was not written")
        return await super().send(topic, *args, **kwargs)


async def test_a_failed_batch_is_read_again_and_nothing_is_skipped(settings, stack):
    await ensure_topics(settings, [*INPUTS, SINK_DLQ])
    await produce(settings, [(ORDERS_STATUS, b"o-1", b"not json", []),
                             (ORDERS_STATUS, b"o-1", order("o-1", "FILLED", 2), [])])
    producer = RefusingOnce(**settings.producer_options())
    await producer.start()
    nc = await nats.connect(**settings.nats_options())
    notifier = Notifier(settings, nc.jetstream(), producer)
    await notifier.start()
    try:
        await wait_until(lambda: all_committed(settings, notifier.group_id), timeout=60, what="offsets committed")
        assert producer.refused == 1 and notifier.running
        orders = await stream_messages(settings.nats_options(), "orders.>", ORDERS_STREAM[0])
        dead = await read_topic(settings, SINK_DLQ, expect=1)
    finally:
        await notifier.stop()
        await producer.stop()
        await nc.close()
    assert [s for s, _ in orders] == ["orders.filled.EURUSD"]
    assert [r.value for r in dead] == [b"not json"]
