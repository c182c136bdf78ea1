"""End offsets on Tansu with batches of several records (``app.kafka_io.end_offsets``), against
a real Tansu (``stack``/``settings`` fixtures)."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

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

