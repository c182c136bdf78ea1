"""Helpers shared by the integration tests: publish to NATS, read Kafka topics back."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nats
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


async def read_topic(
    settings: Settings, topic: str, *, expect: int | None = None, timeout: float = 30.0, idle: float = 1.5
) -> list[Record]:
    """Every record of a topic from the beginning (no consumer group).

    Stops when ``expect`` records were read and nothing more arrived for ``idle`` seconds
    (so a surplus shows up), or at ``timeout``.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        deadline = time.monotonic() + 10
        while not partitions and time.monotonic() < deadline:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                await asyncio.sleep(0.2)
        tps = [TopicPartition(topic, p) for p in sorted(partitions or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[Record] = []
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            n = 0
            for tp, msgs in batch.items():
                for m in msgs:
                    out.append(Record(m.topic, m.partition, m.offset, m.key, m.value, dict(m.headers or ())))
                    n += 1
            if n:
                last_new = time.monotonic()
            elif (expect is None or len(out) >= expect) and time.monotonic() - last_new > idle:
                break
        return out
    finally:
        await consumer.stop()


async def publish(
    nats_url: str, items: list[tuple[str, bytes]], *, jetstream: bool = True, rate: float | None = None
) -> None:
    """Publish (subject, payload) pairs; with JetStream, wait for each stored ack.

    ``rate`` (messages/s) paces the publisher, e.g. so a kill lands mid-stream.
    """
    nc = await nats.connect(nats_url)
    try:
        if jetstream:
            js = nc.jetstream()
            start = time.monotonic()
            for i, (subject, data) in enumerate(items):
                await js.publish(subject, data)
                if rate:
                    delay = start + (i + 1) / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
        else:
            for subject, data in items:
                await nc.publish(subject, data)
            await nc.flush()
    finally:
        await nc.close()


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Run ``execution <args>`` as a child process, output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


async def wait_until(predicate, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
