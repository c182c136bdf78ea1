"""Read Kafka topics back without a consumer group: for the demo, the CLI and the tests."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition

from app.settings import Settings


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


async def _partitions(consumer: AIOKafkaConsumer, topic: str, wait: float) -> list[TopicPartition]:
    partitions = consumer.partitions_for_topic(topic)
    deadline = time.monotonic() + wait
    while not partitions and time.monotonic() < deadline:
        await consumer._client.force_metadata_update()
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await asyncio.sleep(0.2)
    return [TopicPartition(topic, p) for p in sorted(partitions or ())]


async def read_topic(
    settings: Settings, topic: str, *, expect: int | None = None, timeout: float = 30.0, idle: float = 1.5,
    strict: bool = True,
) -> list[Record]:
    """Every record of a topic from the beginning.

    Reads at least to the end offsets seen at the start (and ``expect`` records, if given),
    then waits ``idle`` seconds for stragglers (so a surplus shows up).  At ``timeout``
    short of that it raises :class:`TimeoutError`, or with ``strict=False`` returns what it
    read (for diagnostics).
    """
    consumer = AIOKafkaConsumer(**settings.aiokafka_common(), enable_auto_commit=False)
    await consumer.start()
    try:
        tps = await _partitions(consumer, topic, wait=10 if expect else 2)
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list[Record] = []
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            n = 0
            for msgs in batch.values():
                for m in msgs:
                    out.append(Record(m.topic, m.partition, m.offset, m.key, m.value, dict(m.headers or ())))
                    n += 1
            if n:
                last_new = time.monotonic()
                continue
            if expect is not None and len(out) < expect:
                continue
            if [tp for tp in tps if await consumer.position(tp) < end[tp]]:
                continue  # a slow fetch is not the end: the end offsets seen at the start come first
            if time.monotonic() - last_new > idle:
                break
        else:
            if not strict:
                return out
            raise TimeoutError(f"{topic}: read {len(out)} records in {timeout}s, not to its end offsets {end}")
        return out
    finally:
        await consumer.stop()


async def topic_counts(settings: Settings, topics: list[str]) -> dict[str, int]:
    """Records per topic (end minus beginning offsets, summed over partitions)."""
    consumer = AIOKafkaConsumer(**settings.aiokafka_common(), enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        out: dict[str, int] = {}
        for t in topics:
            tps = [TopicPartition(t, p) for p in sorted(consumer.partitions_for_topic(t) or ())]
            if not tps:
                out[t] = 0
                continue
            end = await consumer.end_offsets(tps)
            beg = await consumer.beginning_offsets(tps)
            out[t] = sum(end[tp] - beg[tp] for tp in tps)
        return out
    finally:
        await consumer.stop()
