"""Kafka -> NATS: order updates and execution alerts published to JetStream, in the bridge.

* ``orders.status``             -> ``orders.{state}.{symbol}`` (state lower-case), the Order JSON
* ``alerts.execution.slippage`` -> the same subject: slippage alerts (the orders agent writes
  them there beside the archive, so the notifier does not read every lifecycle event)
* ``positions.discrepancies``   -> ``alerts.execution.reconciliation``
* ``fills.dlq``                 -> ``alerts.execution.fills`` (a fill for an unknown order, a bad fill)

Publishing from Kafka (rather than from the agents that decide) keeps NATS outages away from
order processing, and publishing from the bridge (rather than a worker's agent) keeps this
work off the worker's one busy thread: it needs no table, and an agent paid Faust's delivery
for each of these records, three per order (``bench/README.md``).

Delivery, at least once: a plain aiokafka consumer (group ``{app_id}-notify``, manual
commits) takes a batch, publishes it side by side, waits for every JetStream ack, then
commits its offsets.  Each message carries a ``Nats-Msg-Id`` derived from the record, so a
replay (after a crash, a rebalance, a failed commit) is dropped by JetStream's duplicate
window instead of reaching subscribers twice.  While NATS is away the batch is published
again with a backoff (one log line per failure), its partitions paused and the consumer still
polling, so it keeps its place in the group.  A record this service did not write goes to
``sink.dlq`` with the reason (the produce is awaited before the offset is committed).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from app import retry
from app.settings import Settings
from app.topics import (
    FILLS_DLQ,
    ORDERS_STATUS,
    POSITIONS_DISCREPANCIES,
    SINK_DLQ,
    SLIPPAGE_ALERTS,
    dead_letter_of,
)

log = logging.getLogger("execution.notifier")

INPUTS = (ORDERS_STATUS, SLIPPAGE_ALERTS, POSITIONS_DISCREPANCIES, FILLS_DLQ)
ORDERS_STREAM = ("ORDERS", ["orders.>"])
ALERTS_STREAM = ("EXECUTION_ALERTS", ["alerts.execution.>"])
RECONCILIATION_ALERTS = "alerts.execution.reconciliation"
FILL_ALERTS = "alerts.execution.fills"


def status_subject(state: str, symbol: str) -> str:
    return f"orders.{state.lower()}.{symbol}"


def nats_message(topic: str, raw: bytes, headers: dict[str, bytes], where: str) -> tuple[str, bytes, str] | None:
    """(subject, payload, msg id) for a Kafka record, or None when it is not published.
    Raises ValueError, KeyError or TypeError for a record this service did not write."""
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


class Notifier:
    """The Kafka -> NATS half of the bridge: ``js`` is the bridge's JetStream context,
    ``producer`` its Kafka producer (for dead letters)."""

    def __init__(self, settings: Settings, js: Any, producer: AIOKafkaProducer,
                 *, batch_size: int = 500, ack_timeout: float = 5.0) -> None:
        self.settings = settings
        self.ack_timeout = ack_timeout
        self.js = js
        self.producer = producer
        self.batch_size = batch_size
        self.group_id = f"{settings.app_id}-notify"
        self.published: Counter = Counter()  # by the subject's first token: orders, alerts
        self.dead_lettered = 0
        self.publish_retries = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()
        self._streams_ready = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        s = self.settings
        self._consumer = AIOKafkaConsumer(
            *INPUTS,
            **s.group_consumer_options("notify", self.group_id),  # a new group starts at the earliest: nothing lost
            # The broker holds a fetch until this much is there (or the fetch wait ends): a
            # consumer of its own, fetching at every record, cost the broker more than the
            # records did.
            fetch_max_wait_ms=s.effective("consumer_fetch_max_wait_ms"),
            fetch_min_bytes=s.notifier_fetch_min_bytes,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._loop(), name="notifier")
        log.info("notifier started: %s -> NATS (group %s)", ", ".join(INPUTS), self.group_id)

    async def stop(self) -> None:
        """Finish the batch in flight (published and committed; while NATS is away it is
        left uncommitted, for whoever reads these partitions next), then leave the group."""
        self._stopping.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()

    async def _loop(self) -> None:
        assert self._consumer is not None
        failures = 0
        while not self._stopping.is_set():
            batch: dict[TopicPartition, list] = {}
            try:
                batch = await self._consumer.getmany(timeout_ms=500, max_records=self.batch_size)
                if batch:
                    await self._deliver(batch)
                failures = 0
            except Exception:
                if self._stopping.is_set():
                    return  # given up at the stop: uncommitted, published again by the next owner
                # Kafka away, or it refused a dead letter: the loop goes on (a notifier that
                # stopped would hold back every update unseen), reading the batch again.
                failures += 1
                log.exception("notifier: a batch of %d records failed; reading it again", sum(map(len, batch.values())))
                self._rewind(batch)
                await asyncio.sleep(retry.delay(failures, 0.2, 5.0))

    def _rewind(self, batch: dict[TopicPartition, list]) -> None:
        """Seek each partition of ``batch`` still assigned back to the batch's first record."""
        assert self._consumer is not None
        assigned = self._consumer.assignment()
        for tp, records in batch.items():
            if tp in assigned and records:
                self._consumer.seek(tp, records[0].offset)

    async def _deliver(self, batch: dict[TopicPartition, list]) -> None:
        messages: list[tuple[str, bytes, str]] = []
        dead: list[asyncio.Future] = []
        for records in batch.values():
            for r in records:
                try:
                    out = nats_message(r.topic, r.value or b"", dict(r.headers or ()), f"{r.partition}:{r.offset}")
                except (ValueError, KeyError, TypeError) as exc:  # not a record this service wrote
                    dead.append(await self._dead_letter(r, f"notify: unreadable {r.topic} record: {type(exc).__name__}: {exc}"))
                    continue
                if out is not None:
                    messages.append(out)
        if messages:
            await retry.until_done(f"notifier: {len(messages)} messages to JetStream", lambda: self._publish(messages),
                                   initial=0.2, maximum=5.0, on_failure=self._hold, logger=log,
                                   stop=self._stopping.is_set)
            self._release()
        if dead:
            await asyncio.gather(*dead)
        offsets = {tp: records[-1].offset + 1 for tp, records in batch.items()}
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # A rebalance took the partitions: their next owner publishes the batch again and
            # JetStream's duplicate window drops what already landed.
            log.warning("notifier: commit of %d partitions failed (%s): the batch will be published again",
                        len(offsets), exc)

    async def _publish(self, messages: list[tuple[str, bytes, str]]) -> None:
        js = self.js
        if not self._streams_ready:
            from app.bridge import ensure_stream

            for name, subjects in (ORDERS_STREAM, ALERTS_STREAM):
                await ensure_stream(js, name, subjects)
            self._streams_ready = True
        # Published back to back, then every ack awaited (one reply future each, no request
        # round trip per message); unanswered in time (NATS away): the batch is published again.
        acks = [await js.publish_async(s, p, headers={"Nats-Msg-Id": i}) for s, p, i in messages]
        try:
            await asyncio.wait_for(asyncio.gather(*acks), timeout=self.ack_timeout)
        finally:
            for ack in acks:
                ack.cancel()  # frees its slot among nats-py's pending publishes (a no-op once done)
        for subject, _, _ in messages:
            self.published[subject.split(".", 1)[0]] += 1

    async def _hold(self, _exc: BaseException) -> None:
        """NATS failed: pause the partitions and poll (nothing comes back), so the consumer
        stays in its group however long the outage lasts."""
        assert self._consumer is not None
        self.publish_retries += 1
        self._consumer.pause(*self._consumer.assignment())
        # A partition assigned since the pause may hand back records: read again later.
        self._rewind(await self._consumer.getmany(timeout_ms=0))

    def _release(self) -> None:
        assert self._consumer is not None
        paused = self._consumer.paused()
        if paused:
            self._consumer.resume(*paused)

    async def _dead_letter(self, record: Any, reason: str) -> asyncio.Future:
        self.dead_lettered += 1
        log.warning("notifier: dead letter (%s)", reason)
        value, headers = dead_letter_of(record.value or b"", reason, record.topic, record.partition, record.offset)
        return await self.producer.send(SINK_DLQ, value, key=record.key or b"", headers=headers)
