"""Against a real broker (``stack``/``settings`` fixtures): end offsets with batches of several
records on Tansu (``app.kafka_io.end_offsets``, the local profile's check), and, on Apache Kafka,
what Faust's consumer thread fetches when the set of active partitions empties under it
(``app.faust_patches``, 6), next to Faust's own as the control."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app import faust_patches
from app.kafka_io import end_offsets
from app.settings import Settings



async def produce_batches(settings: Settings, topic: str, sizes: dict[int, list[int]]) -> None:
    """For each partition, batches of the given sizes (linger keeps each batch together)."""
    admin = AIOKafkaAdminClient(**settings.aiokafka_common())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 4, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(**settings.aiokafka_common(), max_batch_size=16384, linger_ms=20)
    await producer.start()
    try:
        for partition, batches in sizes.items():
            for n in batches:
                futures = [await producer.send(topic, b"%d" % i, partition=partition) for i in range(n)]
                await asyncio.gather(*futures)  # the batch has left before the next one starts
    finally:
        await producer.stop()


@pytest.mark.tansu  # Tansu's short end offsets (the local profile's check)
async def test_end_offsets_are_right_when_the_last_batch_holds_several_records(settings: Settings):
    assert settings.effective("broker_end_offsets_check") is True  # the local profile
    assert settings.effective("producer_max_batch_size") > 1
    sizes = {0: [5, 3], 1: [1], 2: [4, 1, 6]}  # partition 3 stays empty
    await produce_batches(settings, "t.ends", sizes)
    tps = [TopicPartition("t.ends", p) for p in range(4)]
    consumer = AIOKafkaConsumer(**settings.aiokafka_common(), enable_auto_commit=False)
    await consumer.start()
    try:
        reported = await consumer.end_offsets(tps)
        checked = await end_offsets(consumer, tps, settings)
        unchecked = await end_offsets(consumer, tps, settings, check=False)
    finally:
        await consumer.stop()
    want = {tp: sum(sizes.get(tp.partition, [])) for tp in tps}
    assert checked == want
    assert unchecked == reported
    # Tansu 0.6's ListOffsets answer: the last batch's base offset + 1.  If this fails Tansu
    # answers right, and ``broker_end_offsets_check`` can be switched off for it.
    assert reported == {tp: (want[tp] - sizes[tp.partition][-1] + 1) if tp.partition in sizes else 0 for tp in tps}



async def test_the_consumer_thread_hands_over_nothing_of_a_partition_paused_while_it_waits(settings: Settings):
    """The races behind the skipped offsets of the chaos tests: Faust's main thread hands the
    consumer thread its live set of active partitions; recovery empties it while the thread
    waits; aiokafka reads the empty set as "every partition" and hands over (and moves past)
    the records of a paused partition, which Faust then drops.  And a fetch begun before a
    rebalance, when every stream partition was active, goes on after it (aiokafka waits for
    the new assignment), when they are paused until recovery seeks them."""
    await produce_batches(settings, "t.paused", {})
    active_tp, paused_tp = TopicPartition("t.paused", 0), TopicPartition("t.paused", 1)
    worker = SimpleNamespace(consumer=SimpleNamespace(flow_active=True))  # Faust's side of the thread

    async def race(fetch_records, active: set) -> tuple[dict, int]:
        consumer = AIOKafkaConsumer(**settings.aiokafka_common(), enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([active_tp, paused_tp])
            await consumer.seek_to_end(paused_tp)
            start = await consumer.position(paused_tp)
            fetch = asyncio.create_task(fetch_records(worker, consumer, active, timeout=3.0, max_records=100))
            await asyncio.sleep(0.3)
            active.clear()  # recovery pauses what it has finished; the stream partitions are paused
            await produce_to(paused_tp, 5)
            records = await fetch
            return records, await consumer.position(paused_tp) - start
        finally:
            await consumer.stop()

    async def produce_to(tp: TopicPartition, n: int) -> None:
        producer = AIOKafkaProducer(**settings.aiokafka_common())
        await producer.start()
        try:
            for i in range(n):
                await producer.send_and_wait(tp.topic, b"%d" % i, partition=tp.partition)
        finally:
            await producer.stop()

    def handed_over(records: dict, first: int) -> int:
        """How many of the paused partition's records came back, in order from ``first`` (Tansu
        answers the waiting fetch when its wait ends, with all five; Kafka as soon as one is there)."""
        offsets = [r.offset for r in records.get(paused_tp, [])]
        assert offsets == list(range(first, first + len(offsets))), offsets
        return len(offsets)

    records, moved = await race(faust_patches._fetch_records, {active_tp})
    assert records == {} and moved == 0
    # Faust's own: the paused partition's records come back and its position has moved past them.
    # If this fails, Faust or aiokafka changed and patch 6 may no longer be needed.
    records, moved = await race(faust_patches._faust_fetch_records, {active_tp})
    assert handed_over(records, 5) == moved > 0

    # A fetch begun while both were active: the partition paused while it waits (a rebalance:
    # recovery has not sought it yet) gets nothing handed over.  With a snapshot of the set
    # taken as the fetch began (the first version of patch 6), it did.
    records, moved = await race(faust_patches._fetch_records, {active_tp, paused_tp})
    assert records == {} and moved == 0
    records, moved = await race(lambda w, c, active, **kw: faust_patches._faust_fetch_records(
        w, c, frozenset(active), **kw), {active_tp, paused_tp})
    assert handed_over(records, 15) == moved > 0
