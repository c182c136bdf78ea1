"""Helpers shared by the integration tests: publish to NATS, read Kafka topics back."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import nats

from app.kafka_io import Record, read_topic, topic_counts  # noqa: F401 (re-exported for tests)


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
