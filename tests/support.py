"""Helpers shared by the integration tests: publish to NATS, read Kafka topics back."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import nats
import nats.js.errors
from clickhouse_connect.driver.exceptions import OperationalError

from app.kafka_io import Record, read_topic, topic_counts  # noqa: F401 (re-exported for tests)
from app.sinks.clickhouse import ClickHouseStore

#: Publish failures that pass: the server restarting or not there yet, the stream not created yet.
#: (A closed connection is not among them: with unlimited reconnects it only closes for good.)
TRANSIENT = (
    TimeoutError,  # asyncio's, and nats.errors.TimeoutError
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)


async def publish(
    nats_url: str,
    items: list[tuple[str, bytes]],
    *,
    jetstream: bool = True,
    rate: float | None = None,
    retry_for: float = 60.0,
    on_ack: Callable[[int], None] | None = None,
    connect: dict | None = None,
) -> int:
    """Publish (subject, payload) pairs; with JetStream, wait for each stored ack.

    ``rate`` (messages/s) paces the publisher, e.g. so a kill lands mid-stream.

    With JetStream the publisher behaves as a careful upstream service does: a message whose
    ack does not come (NATS restarting, the stream not created yet) is sent again until it is
    acknowledged, for at most ``retry_for`` seconds each, and every message carries a unique
    ``Nats-Msg-Id`` so that a resend of one the server had stored (its ack lost) is dropped by
    the stream's duplicate window: each item is stored exactly once.  ``on_ack(n)`` is called
    with the number acknowledged so far.  Returns the number of resends.
    """
    options = {"servers": [nats_url], **(connect or {})}  # ``connect``: user, password, TLS
    nc = await nats.connect(**options, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    resends = 0
    try:
        if jetstream:
            js = nc.jetstream()
            start = time.monotonic()
            run = uuid.uuid4().hex
            for i, (subject, data) in enumerate(items):
                headers = {"Nats-Msg-Id": f"{run}-{i}"}
                deadline = time.monotonic() + retry_for
                while True:
                    try:
                        await js.publish(subject, data, headers=headers, timeout=2.0)
                        break
                    except TRANSIENT as exc:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"{subject}: no JetStream ack in {retry_for}s ({exc!r})") from exc
                        resends += 1
                        await asyncio.sleep(0.1)
                if on_ack is not None:
                    on_ack(i + 1)
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
    return resends


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


async def committed_vs_end(settings, group_id: str, topics: list[str]) -> tuple[dict, dict]:
    """(committed, end) offsets of every partition of ``topics``, for the consumer group."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from app.kafka_io import end_offsets

    c = AIOKafkaConsumer(**settings.aiokafka_common(), group_id=group_id, enable_auto_commit=False)
    await c.start()
    try:
        await c._client.force_metadata_update()
        tps = [TopicPartition(t, p) for t in topics for p in sorted(c.partitions_for_topic(t) or ())]
        ends = await end_offsets(c, tps, settings)
        committed = {tp: (await c.committed(tp)) or 0 for tp in tps}
        return committed, ends
    finally:
        await c.stop()


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


class FlakyStore(ClickHouseStore):
    """The real store (chDB), with inserts that fail as an unreachable ClickHouse server's do
    while it is 'down': ``orders`` for the first ``orders_down`` seconds after the first insert
    attempt following :meth:`arm`, the other tables for ``others_down`` seconds (so a batch can
    fail half-inserted).  ``arm(0, 0)``: up; arm again mid-run for an outage from then on."""

    def arm(self, orders_down: float, others_down: float) -> FlakyStore:
        self.orders_down, self.others_down = orders_down, others_down
        self.first_attempt: float | None = None
        self.attempts = self.failures = 0
        return self

    def _maybe_fail(self, down_for: float) -> None:
        now = time.monotonic()
        self.attempts += 1
        if self.first_attempt is None:
            self.first_attempt = now
        if now - self.first_attempt < down_for:
            self.failures += 1
            raise OperationalError("Error HTTPConnectionPool(host='clickhouse', port=8123): connection refused (injected)")

    def insert(self, table, models):  # the sink's one way in
        self._maybe_fail(self.orders_down if table == "orders" else self.others_down)
        return super().insert(table, models)


def monitoring_metric_names() -> set[str]:
    """The metric names the alert rules and the Grafana dashboard in ``k8s/`` use (histogram
    series reduced to their family: ``_bucket``/``_sum``/``_count`` stripped)."""
    import re
    from pathlib import Path

    k8s = Path(__file__).resolve().parent.parent / "k8s"
    text = (k8s / "prometheus-rules.yaml").read_text() + (k8s / "grafana-dashboard.json").read_text()
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in re.findall(r"\bexecution_[a-z_]+\b", text)}


def exported_names(exposition: str) -> set[str]:
    """The metric families of a Prometheus text exposition (from its ``# TYPE`` lines)."""
    return {line.split()[2] for line in exposition.splitlines() if line.startswith("# TYPE ")}


async def stream_messages(nats_options: dict, subjects: str, stream: str) -> list[tuple[str, bytes]]:
    """Every message stored in JetStream stream ``stream`` under ``subjects`` (none if the
    stream does not exist), as (subject, data)."""
    from app.bridge import subject_matches

    nc = await nats.connect(**nats_options)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            return []
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                m = await js.get_msg(stream, seq)
            except nats.js.errors.NotFoundError:
                continue  # deleted
            if subject_matches(subjects, m.subject):
                out.append((m.subject, m.data))
        return out
    finally:
        await nc.close()
