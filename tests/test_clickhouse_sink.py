"""The ClickHouse sink against a real Tansu broker (``stack``/``settings`` fixtures) and chDB in
a temporary directory: loading, dead letters, a ClickHouse outage, and a restart."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from app.models import Execution, Order, OrderIntent, OrderState, OrderType, Position, Side, to_json
from app.settings import Settings
from app.sinks.clickhouse import TABLES, ClickHouseStore, to_row
from app.sinks.kafka_clickhouse import ClickHouseSink
from app.topics import EXECUTIONS, MAX_DEAD_LETTER_BYTES, ORDERS_STATUS, POSITIONS, SINK_DLQ, ensure_topics
import support
from support import FlakyStore, read_topic, wait_until
from tables.order_types import MAGIC

SOURCES = [ORDERS_STATUS, EXECUTIONS, POSITIONS]
#: The columns the exit / PnL / command-layer version added to each raw table.
ADDED = {
    "orders": {"intent", "time_in_force", "expires_at", "position_ticket", "commands"},
    "executions": {"entry", "reason", "position", "profit", "currency", "magic"},
    "positions": {"currency", "ticket"},
}
NOW = datetime.now(timezone.utc).replace(microsecond=0)


# --- data -----------------------------------------------------------------------------


def order_snapshots(n: int, final: OrderState = OrderState.FILLED) -> list[Order]:
    """PENDING v1, SUBMITTED v2, final v3 (FILLED with 0.1 x n pips of slippage)."""
    created = NOW - timedelta(minutes=n)
    o = Order(
        order_id=f"o-{n:04d}", signal_id=f"s-{n:04d}", account="acc-1", symbol="EURUSD", side=Side.BUY,
        order_type=OrderType.MARKET, volume=1.0, entry_price=1.1, expected_price=1.1, version=1,
        created_at=created, updated_at=created,
    )
    sub = o.model_copy(update=dict(state=OrderState.SUBMITTED, version=2, attempts=1, submitted_at=created))
    upd: dict = dict(state=final, version=3)
    if final is OrderState.FILLED:
        upd.update(filled_volume=1.0, avg_fill_price=1.1 + n * 1e-5, slippage_pips=round(n * 0.1, 6),
                   deals=(10_000 + n,), filled_at=created + timedelta(seconds=1))
    return [o, sub, sub.model_copy(update=upd)]


def execution(n: int) -> Execution:
    return Execution(
        execution_id=f"o-{n:04d}:{10_000 + n}", order_id=f"o-{n:04d}", signal_id=f"s-{n:04d}", account="acc-1",
        symbol="EURUSD", side=Side.BUY, deal=10_000 + n, price=1.1 + n * 1e-5, volume=1.0, expected_price=1.1,
        slippage_pips=round(n * 0.1, 6), cumulative_volume=1.0, avg_fill_price=1.1 + n * 1e-5,
        order_state=OrderState.FILLED, time=NOW,
    )


def position(symbol: str, version: int) -> Position:
    return Position(account="acc-1", symbol=symbol, net_volume=float(version), avg_open_price=1.1, fills=version,
                    last_deal=version, version=version, updated_at=NOW + timedelta(seconds=version))


async def produce(settings: Settings, records: list[tuple[str, bytes | None, bytes | None]]) -> None:
    producer = AIOKafkaProducer(**settings.producer_options())
    await producer.start()
    try:
        for topic, key, value in records:
            await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()


def order_records(ns: range, final: OrderState = OrderState.FILLED) -> list[tuple[str, bytes, bytes]]:
    return [(ORDERS_STATUS, s.order_id.encode(), to_json(s)) for n in ns for s in order_snapshots(n, final)]


def execution_records(ns: range) -> list[tuple[str, bytes, bytes]]:
    return [(EXECUTIONS, b"acc-1:EURUSD", to_json(execution(n))) for n in ns]


def position_records(symbol: str, versions: range) -> list[tuple[str, bytes, bytes]]:
    return [(POSITIONS, f"acc-1:{symbol}".encode(), to_json(position(symbol, v))) for v in versions]


async def committed_vs_end(settings: Settings, group_id: str) -> tuple[dict, dict]:
    return await support.committed_vs_end(settings, group_id, SOURCES)


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def dsn(tmp_path: Path) -> str:
    return f"chdb:///{tmp_path / 'chdb'}"


@pytest.fixture
async def topics(settings: Settings) -> Settings:
    """The stack's settings with the sink's topics created.  Shorter group timeouts than the
    local profile's 6 s: Tansu completes a join after half the session timeout and, on a
    restart, waits for the previous member's session to expire, which these tests do often."""
    await ensure_topics(settings, SOURCES + [SINK_DLQ])
    return settings.model_copy(update=dict(
        broker_session_timeout=2.0, broker_rebalance_timeout=2.0, broker_heartbeat_interval=0.5))


def check_loaded(store: ClickHouseStore, orders: int, executions: int) -> None:
    rows = store.query("SELECT state, count(), round(sum(slippage_pips), 4) FROM orders GROUP BY state")
    assert rows == [("FILLED", orders, round(sum(n * 0.1 for n in range(1, orders + 1)), 4))]
    assert store.query("SELECT count(), uniqExact(execution_id) FROM executions") == [(executions, executions)]


# --- tests ------------------------------------------------------------------------------


async def test_sink_loads_topics_and_dead_letters_bad_records(topics: Settings, dsn: str) -> None:
    settings = topics
    bad = [
        (ORDERS_STATUS, b"o-bad", b"{not json"),
        (EXECUTIONS, b"acc-1:EURUSD", b'{"execution_id": "x", "order_id": "y"}'),  # fields missing
        (ORDERS_STATUS, b"o-big", to_json(order_snapshots(999)[1].model_copy(update={"broker_ticket": 2**63}))),
    ]
    await produce(settings, order_records(range(1, 31)) + bad[:2] + execution_records(range(1, 31))
                  + position_records("EURUSD", range(1, 6)) + position_records("GBPUSD", range(1, 3)) + bad[2:])
    store = ClickHouseStore.from_dsn(dsn)
    store.ensure_schema()
    sink = ClickHouseSink(settings, store=store, batch_size=50, flush_interval=0.2)
    try:
        await sink.start()
        await sink.wait_idle(timeout=30)
        check_loaded(store, orders=30, executions=30)
        assert store.query("SELECT symbol, net_volume, version FROM positions ORDER BY symbol") == [
            ("EURUSD", 5.0, 5), ("GBPUSD", 2.0, 2)]
        assert sink.stats["orders"] == 90 and sink.stats["executions"] == 30 and sink.stats["dead_lettered"] == 3
        # ... and the dead letters are queryable, with their reasons (the sink reads sink.dlq too)
        await wait_until(lambda: store.count("dead_letters") == 3, timeout=30, what="3 dead letters in ClickHouse")
        rows = {r["key"]: r for r in store.query_dicts("SELECT * FROM dead_letters")}
        assert rows["o-bad"]["topic"] == SINK_DLQ and rows["o-bad"]["value"] == "{not json"
        assert "malformed JSON" in rows["o-bad"]["reason"]
        assert orjson.loads(rows["o-bad"]["headers"])["topic"] == ORDERS_STATUS

        # More snapshots while running, some replayed: still one row per order.
        await produce(settings, order_records(range(25, 36)))
        await sink.wait_idle(timeout=30)
        check_loaded(store, orders=35, executions=30)
    finally:
        await sink.stop()
        store.close()

    committed, ends = await committed_vs_end(settings, sink.group_id)
    assert committed == ends and sum(ends.values()) == 90 + 2 + 30 + 7 + 1 + 33

    dlq = await read_topic(settings, SINK_DLQ, expect=3, idle=0.5)
    assert sorted(r.key for r in dlq) == [b"acc-1:EURUSD", b"o-bad", b"o-big"]
    by_key = {r.key: r for r in dlq}
    assert by_key[b"o-bad"].value == b"{not json"
    assert by_key[b"o-bad"].headers["topic"] == ORDERS_STATUS.encode()
    assert b"malformed JSON" in by_key[b"o-bad"].headers["reason"]
    assert b"signal_id" in by_key[b"acc-1:EURUSD"].headers["reason"]
    assert b"broker_ticket" in by_key[b"o-big"].headers["reason"]
    for r in dlq:
        assert {"reason", "topic", "partition", "offset"} <= set(r.headers)
        tp = TopicPartition(r.headers["topic"].decode(), int(r.headers["partition"]))
        assert int(r.headers["offset"]) < ends[tp]


async def test_clickhouse_unavailable_for_a_while(topics: Settings, dsn: str, caplog) -> None:
    settings = topics
    caplog.set_level(logging.INFO, logger="app.sinks.kafka_clickhouse")
    await produce(settings, order_records(range(1, 21)) + execution_records(range(1, 21))
                  + position_records("EURUSD", range(1, 4)))
    store = FlakyStore.from_dsn(dsn).arm(orders_down=1.0, others_down=2.5)
    store.ensure_schema()
    sink = ClickHouseSink(settings, store=store, batch_size=40, flush_interval=0.1, retry_initial=0.1, retry_max=0.4)
    try:
        await sink.start()
        await wait_until(lambda: store.failures >= 3, timeout=20, what="failed inserts")
        # Down: nothing committed, the batch is held, and the consumer keeps its partitions.
        assert sink.committed == {}
        assert sink.pending_records > 0
        committed, _ = await committed_vs_end(settings, sink.group_id)
        assert sum(committed.values()) == 0
        # Records arriving during the outage wait on the paused partitions.
        await produce(settings, order_records(range(21, 31)) + execution_records(range(21, 31))
                      + position_records("EURUSD", range(4, 6)))
        await sink.wait_idle(timeout=30)
        check_loaded(store, orders=30, executions=30)
        assert store.query("SELECT net_volume, version FROM positions") == [(5.0, 5)]
        assert store.failures >= 3 and sink.stats["insert_failures"] == store.failures
        assert sink.stats["dead_lettered"] == 0
    finally:
        await sink.stop()
        store.close()

    committed, ends = await committed_vs_end(settings, sink.group_id)
    assert committed == ends and sum(ends.values()) == 90 + 30 + 5
    failures = [r.getMessage() for r in caplog.records if "ClickHouse insert failed" in r.getMessage()]
    assert len(failures) == store.failures  # one line per failure
    assert "attempt 1)" in failures[0] and "offsets not committed" in failures[0]
    assert any("succeeded again" in r.getMessage() for r in caplog.records)


async def test_restart_resumes_from_committed_offsets(topics: Settings, dsn: str) -> None:
    settings = topics
    await produce(settings, order_records(range(1, 21)) + execution_records(range(1, 11)))
    store = ClickHouseStore.from_dsn(dsn)
    store.ensure_schema()
    try:
        first = ClickHouseSink(settings, store=store, flush_interval=0.1)
        await first.start()
        await first.wait_idle(timeout=30)
        await first.stop()
        inserted_first = first.rows_inserted
        assert inserted_first == 70

        await produce(settings, order_records(range(15, 26)) + execution_records(range(5, 16)))  # overlaps
        # A replay of already loaded rows changes nothing either.
        store.insert_orders([s for n in range(1, 21) for s in order_snapshots(n)])
        second = ClickHouseSink(settings, store=store, flush_interval=0.1)
        await second.start()
        await second.wait_idle(timeout=30)
        await second.stop()
        assert second.rows_inserted == 33 + 11  # only the new records: resumed at the commit
        check_loaded(store, orders=25, executions=15)
    finally:
        store.close()
    committed, ends = await committed_vs_end(settings, first.group_id)
    assert committed == ends


async def test_rebalance_while_clickhouse_down_drops_the_batch_for_the_next_owner(
    topics: Settings, dsn: str, caplog
) -> None:
    """Sink A holds a failing batch when sink B joins the group: A's revoked batch is dropped
    uncommitted and re-read (by B, or by A once ClickHouse is back); nothing lost or doubled."""
    settings = topics
    caplog.set_level(logging.INFO, logger="app.sinks.kafka_clickhouse")
    await produce(settings, order_records(range(1, 31)) + execution_records(range(1, 31)))
    flaky = FlakyStore.from_dsn(dsn).arm(orders_down=3600, others_down=3600)
    flaky.ensure_schema()
    healthy = ClickHouseStore.from_dsn(dsn)  # same chDB engine, a second client
    a = ClickHouseSink(settings, store=flaky, batch_size=1000, flush_interval=0.1, retry_initial=0.1, retry_max=0.3)
    b = ClickHouseSink(settings, store=healthy, flush_interval=0.1)
    try:
        await a.start()
        await wait_until(lambda: flaky.failures >= 2 and a.pending_records == 120, timeout=20, what="A holding all")
        await b.start()
        await wait_until(lambda: b.rows_inserted > 0, timeout=20, what="B loading its partitions")
        assert any("partitions revoked with 120 unflushed records" in r.getMessage() for r in caplog.records)
        assert a.committed == {}
        flaky.arm(orders_down=0, others_down=0)  # ClickHouse is back for A
        await a.wait_idle(timeout=30)
        await b.wait_idle(timeout=30)
        check_loaded(healthy, orders=30, executions=30)
        assert a.rows_inserted > 0 and a.rows_inserted + b.rows_inserted == 120
    finally:
        await b.stop()
        await a.stop()
        healthy.close()
        flaky.close()
    committed, ends = await committed_vs_end(settings, a.group_id)
    assert committed == ends and sum(ends.values()) == 120


async def test_rebalance_flushes_and_commits_the_pending_batch(topics: Settings, dsn: str) -> None:
    """ClickHouse up: a batch pending at revocation is inserted and committed before the
    partitions go, so the next owner starts after it."""
    settings = topics
    await produce(settings, order_records(range(1, 21)))
    store = ClickHouseStore.from_dsn(dsn)
    store.ensure_schema()
    a = ClickHouseSink(settings, store=store, batch_size=1000, flush_interval=3600)  # holds its batch
    b = ClickHouseSink(settings, store=store, flush_interval=0.1)
    try:
        await a.start()
        await wait_until(lambda: a.pending_records == 60, timeout=20, what="A holding the batch")
        assert a.rows_inserted == 0
        await b.start()  # rebalance: A flushes and commits in on_partitions_revoked
        await wait_until(lambda: a.stats["flushes"] == 1, timeout=20, what="A's flush on revocation")
        assert a.rows_inserted == 60 and a.stats["records"] == 60  # inserted and committed
        a.flush_interval = 0.1
        await a.wait_idle(timeout=30)
        await b.wait_idle(timeout=30)
        assert b.rows_inserted == 0  # nothing re-read
        check_loaded(store, orders=20, executions=0)
    finally:
        await b.stop()
        await a.stop()
        store.close()
    committed, ends = await committed_vs_end(settings, a.group_id)
    assert committed == ends and sum(ends.values()) == 60


async def test_sink_upgrades_an_old_database_and_stores_the_new_columns(topics: Settings, dsn: str) -> None:
    """A chDB database made by the previous version (no exit, PnL or command columns), with
    rows: the sink's start adds the columns, then loads records with the new fields, and
    records of an older producer (without them) get the models' defaults."""
    settings = topics
    old_tables = [replace(t, columns=tuple(c for c in t.columns if c.name not in ADDED.get(t.name, set()))) for t in TABLES]
    with ClickHouseStore.from_dsn(dsn) as old:
        for t in old_tables:
            old.command(t.create_table())
            old.command(t.create_view())
        old._client.insert("positions_log", [to_row(old_tables[2], position("EURUSD", 1))],
                           column_names=old_tables[2].column_names)

    sl = execution(1).model_copy(update=dict(
        execution_id="o-0001:20001", deal=20_001, side=Side.SELL, entry="out", reason="sl", position=30_001,
        profit=-120.5, currency="EUR", magic=MAGIC))
    legacy = orjson.loads(to_json(execution(2)))
    for f in ADDED["executions"]:
        legacy.pop(f)
    closed = position("EURUSD", 2).model_copy(update=dict(net_volume=0.0, avg_open_price=None, realized_pnl=-120.5,
                                                         currency="EUR", ticket=30_001))
    close = order_snapshots(3)[-1].model_copy(update=dict(intent=OrderIntent.CLOSE, position_ticket=30_001,
                                                          commands=("close-1",)))
    await produce(settings, [
        (EXECUTIONS, b"acc-1:EURUSD", to_json(sl)),
        (EXECUTIONS, b"acc-1:EURUSD", orjson.dumps(legacy)),
        (POSITIONS, b"acc-1:EURUSD", to_json(closed)),
        (ORDERS_STATUS, close.order_id.encode(), to_json(close)),
    ])
    store = ClickHouseStore.from_dsn(dsn)  # the sink runs ensure_schema itself
    sink = ClickHouseSink(settings, store=store, flush_interval=0.1)
    try:
        await sink.start()
        await sink.wait_idle(timeout=30)
        assert sink.stats["dead_lettered"] == 0
        assert store.query(
            "SELECT deal, entry, reason, position, profit, currency, magic FROM executions ORDER BY deal") == [
            (10_002, "in", "expert", None, 0.0, "USD", 0), (20_001, "out", "sl", 30_001, -120.5, "EUR", MAGIC)]
        assert store.query("SELECT version, net_volume, realized_pnl, currency, ticket FROM positions") == [
            (2, 0.0, -120.5, "EUR", 30_001)]
        assert store.query("SELECT intent, time_in_force, position_ticket, commands FROM orders") == [
            ("close", "GTC", 30_001, ["close-1"])]
    finally:
        await sink.stop()
        store.close()


async def test_a_bad_record_too_large_to_send_again_whole_is_dead_lettered_cut(topics: Settings, dsn: str) -> None:
    """A record that fits in a produce request alone but not with the dead letter's headers:
    its dead letter is cut (truncated, original_size, sha256) and the sink goes on; sent
    whole, the producer refused it every time and the partition stood still."""
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    settings = topics
    key, limit = b"o-huge", 1048576  # aiokafka's default max_request_size
    size = limit
    while DefaultRecordBatchBuilder.estimate_size_in_bytes(key, b"x" * size, []) > limit - 8:
        size -= 1
    huge = b"<" + b"x" * (size - 1)  # not JSON
    first, after = order_records(range(1, 2)), order_records(range(2, 3))
    await produce(settings, first + [(ORDERS_STATUS, key, huge)] + after)
    store = ClickHouseStore.from_dsn(dsn)  # the sink makes the schema
    sink = ClickHouseSink(settings, store=store, flush_interval=0.1)
    try:
        await sink.start()
        await sink.wait_idle(timeout=30)
        check_loaded(store, orders=2, executions=0)  # the order after it too
        assert sink.stats["dead_lettered"] == 1
    finally:
        await sink.stop()
        store.close()
    (dead,) = await read_topic(settings, SINK_DLQ, expect=1, idle=0.5)
    assert dead.key == key and dead.value == huge[:MAX_DEAD_LETTER_BYTES]
    assert dead.headers["truncated"] == b"1" and dead.headers["original_size"] == str(len(huge)).encode()
    assert dead.headers["sha256"] == hashlib.sha256(huge).hexdigest().encode()
    assert b"malformed JSON" in dead.headers["reason"] and dead.headers["topic"] == ORDERS_STATUS.encode()
