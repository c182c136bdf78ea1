"""Apache Kafka (one KRaft node from Maven Central jars, ``app/local.py:KafkaServer``) as the
local broker: plain aiokafka produce/consume, the service's topics created with real
settings, a restart on the same data, and signals to FILLED orders through the whole
pipeline with the worker in the production profile.

Needs Java 17+; the jars come from ``app/kafka/fetch-jars`` (Maven the first time).  At most
one broker at a time (the machines running this have 2 cores): the module's broker is
stopped before the pipeline test starts its own stack.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.local import KAFKA_READY, KafkaServer, LocalStack, kafka_libs
from app.models import Execution, Order, OrderState
from app.sample import signal_dict
from app.settings import Profile, Settings
from app.topics import EXECUTIONS, ORDERS_STATUS, TOPICS, PartitionCountMismatch, ensure_topics, partition_counts
from pipeline import Pipeline
from tables.idempotency import order_id_for

#: Brokers started by this module, so the pipeline test can stop them first (one at a time).
_STARTED: list[KafkaServer] = []


@pytest.fixture(scope="module")
def kafka_server(tmp_path_factory) -> KafkaServer:
    # A clean clone has no jars yet: this runs app/kafka/fetch-jars, which resolves them from
    # Maven Central into the cache (tens of seconds, once; a no-op when they are there).
    kafka_libs()
    server = KafkaServer.create(tmp_path_factory.mktemp("kafka"))
    _STARTED.append(server)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def bootstrap(server: KafkaServer) -> str:
    return f"127.0.0.1:{server.port}"


async def create_topic(server: KafkaServer, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap(server))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def consume(server: KafkaServer, topic: str, n: int, group: str, timeout: float = 60.0) -> list:
    """Read ``n`` records of ``topic`` in the consumer group ``group`` (committing them)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap(server), group_id=group,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    out: list = []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(records)
        await consumer.commit()
    finally:
        await consumer.stop()
    return out


@pytest.mark.slow
async def test_produce_and_consume_in_a_group(kafka_server: KafkaServer):
    await create_topic(kafka_server, "probe", 4)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(kafka_server), acks="all")
    await producer.start()
    try:
        sent = [await producer.send("probe", f"v{i}".encode(), key=f"k{i % 40}".encode()) for i in range(200)]
        metas = await asyncio.gather(*sent)
    finally:
        await producer.stop()
    assert {m.partition for m in metas} == {0, 1, 2, 3}

    records = await consume(kafka_server, "probe", 200, group="g1")
    assert sorted(r.value for r in records) == sorted(f"v{i}".encode() for i in range(200))
    # The same key always lands on the same partition.
    by_key: dict[bytes, set[int]] = {}
    for r in records:
        by_key.setdefault(r.key, set()).add(r.partition)
    assert all(len(p) == 1 for p in by_key.values())

    # The group's committed offsets are the ends of the partitions.
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap(kafka_server), group_id="g1", enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition("probe", p) for p in range(4)]
        ends = await consumer.end_offsets(tps)
        assert {tp: await consumer.committed(tp) for tp in tps} == ends
        assert sum(ends.values()) == 200
    finally:
        await consumer.stop()


@pytest.mark.slow
async def test_ensure_topics_with_real_settings(kafka_server: KafkaServer, tmp_path: Path):
    settings = Settings(kafka_bootstrap=f"kafka://{bootstrap(kafka_server)}", profile=Profile.PRODUCTION,
                        data_dir=tmp_path / "data", topic_partitions=8)
    await ensure_topics(settings)
    await ensure_topics(settings)  # idempotent
    admin = AIOKafkaAdminClient(**settings.aiokafka_common())
    await admin.start()
    try:
        counts = await partition_counts(admin)
    finally:
        await admin.close()
    assert {t.name: counts.get(t.name) for t in TOPICS} == {t.name: 8 for t in TOPICS}
    # Another partition count refuses the start, as on any broker.
    with pytest.raises(PartitionCountMismatch):
        await ensure_topics(settings.model_copy(update={"topic_partitions": 4}))


@pytest.mark.slow
async def test_restart_keeps_the_data(kafka_server: KafkaServer):
    await create_topic(kafka_server, "durable", 2)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(kafka_server), acks="all")
    await producer.start()
    try:
        for i in range(20):
            await producer.send_and_wait("durable", f"d{i}".encode(), key=str(i).encode())
    finally:
        await producer.stop()
    meta = (kafka_server.data_dir / "meta.properties").read_text()
    started = time.monotonic()
    await asyncio.to_thread(kafka_server.stop)
    assert not kafka_server.alive
    await asyncio.to_thread(kafka_server.start)
    print(f"Kafka restarted (stop + start) in {time.monotonic() - started:.1f}s")
    assert (kafka_server.data_dir / "meta.properties").read_text() == meta, "formatted once, on the first start"
    assert kafka_server.log_path.read_text().count(KAFKA_READY) == 2
    records = await consume(kafka_server, "durable", 20, group="g-durable")
    assert sorted(r.value for r in records) == sorted(f"d{i}".encode() for i in range(20))


def test_kafka_without_java_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(RuntimeError, match="openjdk-17"):
        LocalStack(workdir=tmp_path / "stack", broker="kafka").start()


def test_kafka_without_jars_or_maven_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    java = shutil.which("java")
    if java is None:
        pytest.skip("no java here")
    only_java = tmp_path / "bin"
    only_java.mkdir()
    (only_java / "java").symlink_to(java)
    monkeypatch.setenv("PATH", str(only_java))
    monkeypatch.setenv("EXECUTION_KAFKA_LIBS", str(tmp_path / "no-libs"))
    with pytest.raises(RuntimeError, match="apt-get install maven"):
        KafkaServer.create(tmp_path / "k").start()


def test_unknown_broker_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="tansu, kafka"):
        LocalStack(workdir=tmp_path, broker="redpanda")


@pytest.mark.slow
async def test_signals_to_filled_orders_on_kafka_in_the_production_profile(tmp_path_factory):
    for server in _STARTED:  # one broker at a time
        server.stop()
    partitions = 4
    pipe = Pipeline(tmp_path_factory.mktemp("kafka-pipeline"), partitions=partitions, broker="kafka")
    assert pipe.stack.profile == "production"
    try:
        started = time.monotonic()
        await pipe.start()
        print(f"Kafka + NATS + simulator + bridge + worker up in {time.monotonic() - started:.1f}s")
        worker = pipe.services.running["worker-1"]
        assert worker.env["EXECUTION_PROFILE"] == "production"
        assert isinstance(pipe.stack.kafka, KafkaServer)
        await pipe.hold_reference_prices()

        rng = random.Random(15)
        symbols = ["EURUSD", "GBPUSD", "USDJPY", "AUDUSD"]
        signals = [signal_dict(f"kafka-{i}", rng, symbol=symbols[i % 4], order_type="market", lots=0.1)
                   for i in range(20)]
        ids = [order_id_for(s["signal_id"], partitions) for s in signals]
        published = time.monotonic()
        await pipe.publish_signals(signals)
        # pipe.wait_orders tails orders.status with app/kafka_io.TopicTail, which asks the
        # broker for the topic's metadata (Apache Kafka lists only topics asked about).
        orders = await pipe.wait_orders(ids, timeout=120)
        print(f"20 signals -> final orders in {time.monotonic() - published:.1f}s")
        assert {i: orders[i].state for i in ids} == {i: OrderState.FILLED for i in ids}
        stats = await pipe.sim_stats()
        assert all(stats["by_comment"].get(i) == 1 for i in ids), "one submission per signal at the broker"
        executions = await pipe.executions()
        assert all(sum(e.volume for e in executions[i]) == pytest.approx(0.1) for i in ids)

        # An analyst's everyday client (librdkafka) reads the derived topics in a group.
        read = await asyncio.to_thread(read_with_librdkafka, pipe.stack.kafka_url.removeprefix("kafka://"),
                                       [ORDERS_STATUS, EXECUTIONS], "analysts")
        snapshots = [Order.model_validate_json(v) for t, _, v in read if t == ORDERS_STATUS]
        final = {o.order_id: o.state for o in snapshots if o.state.is_final}
        assert final == {i: OrderState.FILLED for i in ids}
        fills = {Execution.model_validate_json(v).execution_id for t, _, v in read if t == EXECUTIONS}
        assert fills == {e.execution_id for es in executions.values() for e in es}
    finally:
        pipe.stop()


def read_with_librdkafka(bootstrap: str, topics: list[str], group: str) -> list[tuple]:
    """Every record of ``topics`` up to their current ends, read by confluent-kafka in consumer
    group ``group``; the offsets are committed and checked on the broker."""
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                         "enable.auto.commit": False})
    consumer.subscribe(topics)
    out: list[tuple] = []
    ends: dict[tuple[str, int], int] = {}
    try:
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, f"librdkafka read {len(out)} records of {topics}, ends {ends}"
            msg = consumer.poll(0.2)
            if msg is not None:
                if msg.error():
                    raise RuntimeError(f"librdkafka: {msg.error()}")
                out.append((msg.topic(), msg.key(), msg.value()))
            assigned = consumer.assignment()
            if not assigned:
                continue  # the group is still forming
            for tp in assigned:
                if (tp.topic, tp.partition) not in ends:
                    ends[(tp.topic, tp.partition)] = consumer.get_watermark_offsets(tp, timeout=10)[1]
            positions = {(tp.topic, tp.partition): tp.offset for tp in consumer.position(assigned)}
            if all(positions[k] >= end or end == 0 for k, end in ends.items()):
                break
        consumer.commit(asynchronous=False)
        committed = {(tp.topic, tp.partition): tp.offset
                     for tp in consumer.committed(consumer.assignment(), timeout=10)}
        assert {k: v for k, v in committed.items() if ends[k]} == {k: v for k, v in ends.items() if v}, \
            "the group's committed offsets are at the topics' ends"
    finally:
        consumer.close()
    return out
