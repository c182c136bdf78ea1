"""Broker faults on a 3-node Apache Kafka cluster (KRaft, replication factor 3,
``min.insync.replicas=2``, every producer at ``acks=all``), as production runs it: while
signals flow, the leader of a ``signals.approved`` partition is SIGKILLed and restarted, then
the leader of an ``orders`` changelog partition, then all three brokers are restarted one by
one (a rolling restart, each back in sync before the next).  Afterwards, as the chaos tests
check: one order and one broker submission per signal, positions = fills = the broker's,
ClickHouse = the topics; the worker, the bridge and the sink ran through it."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from app.local import KafkaCluster
from app.settings import Settings
from app.sinks.clickhouse import ClickHouseStore
from app.sinks.kafka_clickhouse import ClickHouseSink
from app.topics import SIGNALS_APPROVED, changelog
from pipeline import Pipeline
from support import wait_until
from tables.idempotency import order_id_for
from test_chaos import CHAOS_CONFIG, chaos_signals, check_nothing_lost_or_doubled

pytestmark = pytest.mark.slow

PARTITIONS = 4


async def describe(settings: Settings, topics: list[str]) -> dict[tuple[str, int], dict]:
    """Each partition's leader, replicas and in-sync replicas, from the brokers' metadata."""
    admin = AIOKafkaAdminClient(**settings.aiokafka_common())
    await admin.start()
    try:
        return {(t["topic"], p["partition"]): p for t in await admin.describe_topics(topics) for p in t["partitions"]}
    finally:
        await admin.close()


async def in_sync(settings: Settings, topics: list[str]) -> bool:
    """Every partition has a leader and all its replicas in sync."""
    try:
        parts = await describe(settings, topics)
    except Exception:  # a broker of the bootstrap list is down: ask again
        return False
    return bool(parts) and all(p["leader"] >= 0 and sorted(p["isr"]) == sorted(p["replicas"]) for p in parts.values())


@pytest.mark.timeout(900)
async def test_leader_kills_and_a_rolling_restart_lose_and_double_nothing(tmp_path):
    p = Pipeline(tmp_path, partitions=PARTITIONS, config=CHAOS_CONFIG, broker="kafka", kafka_nodes=3)
    await p.start()
    cluster = p.stack.kafka
    assert isinstance(cluster, KafkaCluster) and p.settings.topic_replication_factor == 3
    store = ClickHouseStore.from_dsn(f"chdb:///{tmp_path / 'chdb'}")
    store.ensure_schema()
    sink = ClickHouseSink(p.settings, store=store)
    await sink.start()
    orders_changelog = changelog("orders", p.settings)
    watched = [SIGNALS_APPROVED, orders_changelog]
    try:
        await p.hold_reference_prices()
        parts = await describe(p.settings, watched)
        assert all(len(part["replicas"]) == 3 for part in parts.values()), "replication factor 3"
        rng = random.Random(41)
        signals, dupes = chaos_signals(2000, rng, prefix="cluster")
        published: list[dict] = []
        faults_done = asyncio.Event()

        async def publisher() -> None:
            """10 signals at a time at 20/s until the faults are over (and at least 100)."""
            for start in range(0, len(signals), 10):
                if faults_done.is_set() and len(published) >= 100:
                    break
                chunk = signals[start:start + 10]
                await p.publish_signals(chunk, rate=20.0)
                published.extend(chunk)
            await p.publish_signals([s for s in dupes if s in published])  # an upstream resend

        async def restart(node_id: int, kill: bool) -> float:
            node = cluster.node(node_id)
            began = time.monotonic()
            await asyncio.to_thread(node.kill if kill else node.stop)
            await asyncio.to_thread(node.start)
            await wait_until(lambda: in_sync(p.settings, watched), timeout=180, what=f"kafka-{node_id} back in sync")
            return time.monotonic() - began

        async def faults() -> list[str]:
            done = []
            try:
                await wait_until(lambda: len(published) >= 30, timeout=60, what="signals flowing")
                for topic in watched:
                    leader = (await describe(p.settings, [topic]))[(topic, 0)]["leader"]
                    took = await restart(leader, kill=True)
                    done.append(f"SIGKILL leader {leader} of {topic}[0]: in sync again after {took:.1f}s")
                for node_id in (1, 2, 3):  # rolling restart, each in sync before the next
                    took = await restart(node_id, kill=False)
                    done.append(f"rolling restart kafka-{node_id}: in sync again after {took:.1f}s")
            finally:
                faults_done.set()
            return done

        _, done = await asyncio.gather(publisher(), faults())
        print("\n".join(done))
        print(f"{len(published)} signals published through the faults")
        ids = [order_id_for(s["signal_id"], PARTITIONS) for s in published]
        await check_nothing_lost_or_doubled(p, sink, store, ids)
        for name in ("worker-1", "bridge", "sim"):
            assert p.services.running[name].alive, f"{name} is running"
    finally:
        await sink.stop()
        store.close()
        p.stop()
