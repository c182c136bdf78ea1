"""Read Kafka topics back without a consumer group: for the demo, the CLI and the tests."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.protocol.fetch import FetchRequest

from app.settings import Settings


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]

    @classmethod
    def of(cls, m: Any) -> "Record":
        """From an aiokafka ``ConsumerRecord``."""
        return cls(m.topic, m.partition, m.offset, m.key, m.value, dict(m.headers or ()))


async def end_offsets(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], settings: Settings | None = None, *, check: bool | None = None
) -> dict[TopicPartition, int]:
    """The offset after each partition's last record (its high watermark).

    Tansu 0.6 answers ListOffsets (what ``consumer.end_offsets`` asks) with the base offset
    of the partition's last record batch plus one, so when that batch holds several records
    the answer is short by all but one of them; its Fetch responses carry the right high
    watermark.  With ``broker_end_offsets_check`` (the local profile) each non-empty
    partition is fetched once from the offset before the reported end (a record that always
    exists) and the larger of the two answers is kept: one small request per broker.  This
    is what lets the local profile batch records like production does (``producer_max_batch_size``).
    """
    ends = dict(await consumer.end_offsets(tps))
    if check is None:
        check = bool(settings is not None and settings.effective("broker_end_offsets_check"))
    if not check:
        return ends
    client = _client(consumer)
    by_node: dict[int, dict[str, list[tuple[int, int, int]]]] = defaultdict(lambda: defaultdict(list))
    for tp, end in ends.items():
        node = client.cluster.leader_for_partition(tp)
        if end > 0 and node is not None and node >= 0:
            by_node[node][tp.topic].append((tp.partition, end - 1, 1))
    for node, topics in by_node.items():
        # Tansu answers a fetch with max_wait 0 with no partitions at all, hence 1 ms; the
        # record at end - 1 exists, so it answers at once.
        response = await client.send(node, FetchRequest(1, 1, 1, 0, list(topics.items())))
        for topic, partitions in response.topics:
            for partition, error_code, highwater, *_ in partitions:
                tp = TopicPartition(topic, partition)
                if error_code == 0 and tp in ends:
                    ends[tp] = max(ends[tp], highwater)
    return ends


def _client(consumer: AIOKafkaConsumer) -> Any:
    # Through app.faust_patches, where every private Faust/aiokafka access is; imported here,
    # not at the top: it imports this module, and the sink reads Kafka without Faust.
    from app.faust_patches import aiokafka_client

    return aiokafka_client(consumer)


async def _partitions(consumer: AIOKafkaConsumer, topic: str, wait: float) -> list[TopicPartition]:
    partitions = consumer.partitions_for_topic(topic)
    deadline = time.monotonic() + wait
    while not partitions:
        # Asked at least once: Tansu's metadata lists every topic unasked, Apache Kafka's
        # only the topics a client asked about.
        await _client(consumer).force_metadata_update()
        partitions = consumer.partitions_for_topic(topic)
        if partitions or time.monotonic() >= deadline:
            break
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
        end = await end_offsets(consumer, tps, settings)
        out: list[Record] = []
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            n = 0
            for msgs in batch.values():
                for m in msgs:
                    out.append(Record.of(m))
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


class TopicTail:
    """A topic read from the beginning in steps: each :meth:`read` returns the records added
    since the previous one, up to the end offsets seen when it starts.  For waiting on a
    topic that grows (a test polling for its orders) without reading it all again each time.

    ``async with TopicTail(settings, "orders.status") as tail: new = await tail.read()``
    """

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self._consumer = AIOKafkaConsumer(**settings.aiokafka_common(), enable_auto_commit=False)
        self._tps: list[TopicPartition] = []

    async def __aenter__(self) -> "TopicTail":
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def read(self, timeout: float = 60.0) -> list[Record]:
        consumer = self._consumer
        if not self._tps:
            self._tps = await _partitions(consumer, self.topic, wait=0)
            if not self._tps:
                return []  # not created yet
            consumer.assign(self._tps)
            await consumer.seek_to_beginning(*self._tps)
        end = await end_offsets(consumer, self._tps, self.settings)
        out: list[Record] = []
        deadline = time.monotonic() + timeout
        while [tp for tp in self._tps if await consumer.position(tp) < end[tp]]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.topic}: not read to its end offsets {end} in {timeout}s")
            for msgs in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(map(Record.of, msgs))
        return out


async def topic_counts(settings: Settings, topics: list[str]) -> dict[str, int]:
    """Records per topic (end minus beginning offsets, summed over partitions)."""
    consumer = AIOKafkaConsumer(**settings.aiokafka_common(), enable_auto_commit=False)
    await consumer.start()
    try:
        await _client(consumer).force_metadata_update()
        out: dict[str, int] = {}
        for t in topics:
            tps = [TopicPartition(t, p) for p in sorted(consumer.partitions_for_topic(t) or ())]
            if not tps:
                out[t] = 0
                continue
            end = await end_offsets(consumer, tps, settings)
            beg = await consumer.beginning_offsets(tps)
            out[t] = sum(end[tp] - beg[tp] for tp in tps)
        return out
    finally:
        await consumer.stop()
