"""The ClickHouse sink: the derived topics into ClickHouse, so every lifecycle event is
queryable: ``orders.status``, ``executions`` and ``positions`` (the tables of the same names),
``order_execution_archive`` (table ``order_execution_archive``), ``positions.discrepancies``
(``positions_discrepancies``) and the dead-letter topics (``dead_letters``, one row per dead
letter with its reason).

A plain aiokafka consumer (group ``{app_id}-clickhouse-sink``, manual commits), not a Faust
agent: it only loads derived topics, so it needs no tables, and it must control exactly when
offsets are committed.

Delivery: at-least-once into idempotent tables.

- Records are decoded into the models; a bad one (malformed JSON, failed validation, a value
  ClickHouse cannot store, an empty value) goes to ``sink.dlq`` with the original key and
  value (cut at 512 KiB, as every dead letter: :func:`app.topics.dead_letter_of`) and headers
  ``reason``/``topic``/``partition``/``offset``; the produce is awaited before the record
  counts as done.
- Rows are buffered per table and inserted in batches (``batch_size`` records or
  ``flush_interval`` seconds, whichever first).  Offsets are committed only after every table
  of the batch was inserted.
- While ClickHouse fails, the batch is kept and retried with exponential backoff (capped at
  ``retry_max``), one log line per failure; the assigned partitions are paused and the
  consumer keeps polling, so it stays in the group however long the outage lasts.  Nothing is
  skipped, nothing unflushed is committed.
- Rebalance: on revocation the pending batch is flushed and committed once if ClickHouse is
  healthy, otherwise dropped uncommitted, so the next owner re-reads it.  A batch being read
  when the revocation lands is abandoned at that point.
- Replays (after a crash, a failed commit, a rebalance) insert rows again; the
  ReplacingMergeTree tables and their ``FINAL`` views (see :mod:`app.sinks.clickhouse`) keep
  one row per key, the latest version.

At start the schema is ensured (:meth:`~app.sinks.clickhouse.ClickHouseStore.ensure_schema`):
a database made by an older version gets the new columns before the first insert, and the
records of an older producer (without the new fields) are stored with the models' defaults.

chDB is in-process and its data directory must be opened by one process only: the sink owns
it (``execution sink``, or the demo, which runs the sink in its own process).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import defaultdict
from typing import Any

import orjson
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from pydantic import BaseModel

from app import retry
from app.http_server import ProbeServer
from app.kafka_io import end_offsets
from app.models import DeadLetter, DecodeError, Execution, Order, OrderEvent, Position, from_json
from app.settings import Settings
from app.sinks.clickhouse import TABLES, TABLES_BY_NAME, ClickHouseStore, to_row
from app.topics import (
    EXECUTIONS,
    EXECUTIONS_DLQ,
    FILLS_DLQ,
    ORDER_EXECUTION_ARCHIVE,
    ORDERS_STATUS,
    POSITIONS,
    POSITIONS_DISCREPANCIES,
    SIGNALS_DLQ,
    SINK_DLQ,
    dead_letter_of,
    ensure_topics,
)
from tables.reconcile import Discrepancy

log = logging.getLogger(__name__)

#: Source topic -> (table, model of its JSON records; None: a dead-letter topic, whose
#: records are stored as they are, with their headers).
SOURCES: dict[str, tuple[str, type[BaseModel] | None]] = {
    ORDERS_STATUS: ("orders", Order),
    EXECUTIONS: ("executions", Execution),
    POSITIONS: ("positions", Position),
    ORDER_EXECUTION_ARCHIVE: ("order_execution_archive", OrderEvent),
    POSITIONS_DISCREPANCIES: ("positions_discrepancies", Discrepancy),
    **{dlq: ("dead_letters", None) for dlq in (SIGNALS_DLQ, FILLS_DLQ, EXECUTIONS_DLQ, SINK_DLQ)},
}
TABLE_ORDER = tuple(t.name for t in TABLES)
#: Longest single wait in ``getmany``: bounds how long a stop takes to be noticed.
MAX_POLL_WAIT = 0.5


def decode(m: Any) -> tuple[str, BaseModel]:
    """(table, model) of a consumer record; :class:`DecodeError` / ValueError for a bad one."""
    table, model = SOURCES[m.topic]
    if model is None:  # a dead letter: any bytes are one
        obj: BaseModel = DeadLetter.of(m.topic, m.partition, m.offset, m.key, m.value, m.headers, m.timestamp)
    elif m.value is None:
        raise DecodeError("empty value (tombstone) on a topic of snapshots", ["<payload>"])
    else:
        obj = from_json(model, m.value)
    to_row(TABLES_BY_NAME[table], obj)  # storable (e.g. integers in range), or ValueError
    return table, obj


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Listener(ConsumerRebalanceListener):
    def __init__(self, sink: "ClickHouseSink") -> None:
        self.sink = sink

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.sink._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.sink._on_assigned(assigned)


class ClickHouseSink:
    """Kafka (``orders.status``, ``executions``, ``positions``) -> ClickHouse, at least once.

    ``store``: an open :class:`ClickHouseStore` (the caller keeps owning it), or None to open
    ``settings.resolved_clickhouse_dsn`` (closed by :meth:`stop`).
    """

    def __init__(
        self,
        settings: Settings,
        store: ClickHouseStore | None = None,
        batch_size: int = 500,
        flush_interval: float = 0.5,
        *,
        retry_initial: float = 0.2,
        retry_max: float = 5.0,
        group_id: str | None = None,
    ) -> None:
        if batch_size < 1 or flush_interval <= 0:
            raise ValueError("batch_size must be >= 1 and flush_interval > 0")
        self.settings = settings
        self.store = store
        self._owns_store = store is None
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.group_id = group_id or f"{settings.app_id}-clickhouse-sink"

        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one flush at a time: the loop or the revocation
        self._stopping = False
        self._generation = 0  # bumped on each revocation: abandons a batch being read

        # The pending batch: models per table, and the next offset per partition.
        self._pending: dict[str, list[BaseModel]] = {t: [] for t in TABLE_ORDER}
        self._offsets: dict[TopicPartition, int] = {}
        self._done: set[str] = set()  # tables of the pending batch already inserted
        self._pending_records = 0
        self._first_at: float | None = None
        self._failing = False
        self._failures_in_row = 0

        #: Offsets this sink committed (next offset to read) per partition, since the partition
        #: was last assigned to it.
        self.committed: dict[TopicPartition, int] = {}
        #: Counters: rows inserted per table, dead letters, flushes, failed attempts, commits.
        self.stats: dict[str, int] = defaultdict(int)

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Open the store (schema ensured, retried while ClickHouse is down), the topics, the
        DLQ producer and the consumer; then run the loop in a task."""
        if self._task is not None:
            return
        self._stopping = False
        await self._open_store()
        await ensure_topics(self.settings, list(SOURCES))
        s = self.settings
        self._producer = AIOKafkaProducer(**s.producer_options(), client_id=f"{s.app_id}-clickhouse-sink")
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(**s.group_consumer_options("clickhouse-sink", self.group_id))
        self._consumer.subscribe(list(SOURCES), listener=_Listener(self))
        await self._consumer.start()
        self._task = asyncio.create_task(self._loop(), name="clickhouse-sink")
        log.info("clickhouse sink started: group %s, batch %d / %.2fs -> %s",
                 self.group_id, self.batch_size, self.flush_interval, self.store.dsn if self.store else "?")

    async def run(self) -> None:
        """Start and run until :meth:`stop` (or a fatal error, which is raised)."""
        await self.start()
        assert self._task is not None
        try:
            await asyncio.shield(self._task)
        finally:
            await self.stop()

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop polling, flush and commit what is pending (once, if ClickHouse is up), leave
        the group, close the producer (and the store if the sink opened it)."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                log.warning("clickhouse sink: loop did not stop in %.0fs; cancelling (uncommitted records are re-read)", timeout)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            except Exception:
                pass  # the loop's own error: reported by run()
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            try:
                await consumer.stop()
            except Exception as exc:
                log.warning("clickhouse sink: consumer stop: %s", _short(exc))
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                await producer.stop()
            except Exception as exc:
                log.warning("clickhouse sink: producer stop: %s", _short(exc))
        if self._owns_store and self.store is not None:
            store, self.store = self.store, None
            await asyncio.to_thread(store.close)

    async def _open_store(self) -> None:
        async def open_store() -> None:
            if self.store is None:
                self.store = await asyncio.to_thread(ClickHouseStore.from_settings, self.settings)
            await asyncio.to_thread(self.store.ensure_schema)

        await retry.until_done("clickhouse sink: ClickHouse unavailable at start", open_store,
                               initial=self.retry_initial, maximum=self.retry_max, stop=lambda: self._stopping, logger=log)

    # --- observability ------------------------------------------------------------------
    @property
    def rows_inserted(self) -> int:
        return sum(self.stats[t] for t in TABLE_ORDER)

    @property
    def pending_records(self) -> int:
        return self._pending_records

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def failing(self) -> bool:
        """ClickHouse refused the last insert (the batch is held and retried)."""
        return self._failing

    async def wait_idle(self, timeout: float = 30.0, interval: float = 0.2) -> None:
        """Until every assigned partition is committed up to its end offset with nothing
        pending (TimeoutError otherwise).  Records produced later are not waited for."""
        deadline = time.monotonic() + timeout
        beginnings: dict[TopicPartition, int] = {}
        while time.monotonic() < deadline:
            if self._task is not None and self._task.done():
                self._task.result()  # raises the loop's error
                raise RuntimeError("clickhouse sink stopped")
            consumer = self._consumer
            assigned = consumer.assignment() if consumer is not None else set()
            if assigned and not self._offsets:
                try:
                    tps = sorted(assigned)
                    ends = await end_offsets(consumer, tps, self.settings)
                    missing = [tp for tp in tps if tp not in beginnings]
                    if missing:
                        beginnings.update(await consumer.beginning_offsets(missing))
                    done = {}
                    for tp in tps:
                        if tp in self.committed:
                            done[tp] = self.committed[tp]
                        else:  # committed earlier (another member, a previous run) or never
                            c = await consumer.committed(tp)
                            done[tp] = beginnings[tp] if c is None else c
                    if all(done[tp] >= ends[tp] for tp in tps) and not self._offsets:
                        return
                except Exception as exc:  # a rebalance in progress: ask again
                    log.debug("wait_idle: %s", exc)
            await asyncio.sleep(interval)
        raise TimeoutError(f"clickhouse sink not idle after {timeout}s (pending {self._pending_records}, stats {dict(self.stats)})")

    # --- the loop -----------------------------------------------------------------------
    async def _loop(self) -> None:
        delay = self.retry_initial
        try:
            while not self._stopping:
                if self._offsets and (self._failing or self._due()):
                    if await self._flush():
                        if self._failing:
                            log.info("clickhouse sink: ClickHouse insert succeeded again after %d failed attempts; resuming",
                                     self._failures_in_row)
                        self._failing, self._failures_in_row, delay = False, 0, self.retry_initial
                        self._resume()
                    else:
                        self._failing = True
                        self._pause()
                        await self._backoff(delay)
                        delay = min(delay * 2, self.retry_max)
                        continue
                elif self._failing and not self._offsets:
                    # The failed batch was dropped on revocation: start over with the new assignment.
                    self._failing, delay = False, self.retry_initial
                    self._resume()
                await self._poll(self._poll_timeout())
        finally:
            if self._offsets and not self._failing:
                await self._flush()  # one last attempt; otherwise re-read after restart
            if self._offsets:
                log.info("clickhouse sink: stopping with %d uncommitted records (re-read on restart)", self._pending_records)

    def _due(self) -> bool:
        return self._pending_records >= self.batch_size or (
            self._first_at is not None and time.monotonic() - self._first_at >= self.flush_interval
        )

    def _poll_timeout(self) -> float:
        """Until the pending batch is due; at most MAX_POLL_WAIT, so a stop is prompt."""
        if self._first_at is None:
            return min(self.flush_interval, MAX_POLL_WAIT)
        return min(MAX_POLL_WAIT, max(0.0, self.flush_interval - (time.monotonic() - self._first_at)))

    async def _poll(self, timeout: float) -> None:
        assert self._consumer is not None
        room = max(1, self.batch_size - self._pending_records)
        batch = await self._consumer.getmany(timeout_ms=int(timeout * 1000), max_records=room)
        generation = self._generation
        for msgs in batch.values():
            for m in msgs:
                if not await self._accept(m, generation):
                    return  # revoked while reading: the rest is re-read by the next owner

    async def _backoff(self, delay: float) -> None:
        """Wait ``delay`` while polling paused partitions: keeps the consumer in the group
        (``max.poll.interval.ms``) and lets a rebalance run its callbacks."""
        end = time.monotonic() + delay
        while not self._stopping and time.monotonic() < end:
            self._pause()  # also a fresh assignment after a rebalance
            await self._poll(min(MAX_POLL_WAIT, max(0.0, end - time.monotonic())))

    def _pause(self) -> None:
        if self._consumer is not None:
            self._consumer.pause(*self._consumer.assignment())

    def _resume(self) -> None:
        if self._consumer is not None:
            self._consumer.resume(*self._consumer.assignment())

    async def _accept(self, m: Any, generation: int) -> bool:
        tp = TopicPartition(m.topic, m.partition)
        try:
            table, obj = decode(m)
        except (DecodeError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, DecodeError) else str(exc)
            if not await self._dead_letter(m, reason, generation):
                return False
        else:
            self._pending[table].append(obj)
            self._done.discard(table)
        self._offsets[tp] = m.offset + 1
        self._pending_records += 1
        if self._first_at is None:
            self._first_at = time.monotonic()
        return True

    async def _dead_letter(self, m: Any, reason: str, generation: int) -> bool:
        """Produce to sink.dlq, awaited; retried until it works.  False if revoked/stopping."""
        # the agents' and the notifier's form: a value too large to send again with the headers
        # is cut (truncated, original_size, sha256), or the send would fail for ever
        value, headers = dead_letter_of(m.value or b"", reason, m.topic, m.partition, m.offset)
        if m.value is None:
            value = None  # a tombstone stays one
        assert self._producer is not None
        producer = self._producer
        try:
            await retry.until_done(
                f"clickhouse sink: dead-lettering {m.topic}[{m.partition}]@{m.offset} failed",
                lambda: producer.send_and_wait(SINK_DLQ, value=value, key=m.key, headers=headers),
                initial=self.retry_initial, maximum=self.retry_max,
                stop=lambda: self._stopping or self._generation != generation, logger=log)
        except Exception:
            return False  # stopping, or revoked: the next owner re-reads the record
        self.stats["dead_lettered"] += 1
        log.warning("clickhouse sink: %s[%d]@%d -> %s: %s", m.topic, m.partition, m.offset, SINK_DLQ, reason[:200])
        return self._generation == generation

    # --- flush and commit ---------------------------------------------------------------
    async def _flush(self) -> bool:
        async with self._lock:
            return await self._flush_locked()

    async def _flush_locked(self) -> bool:
        """Insert every table of the pending batch, then commit its offsets.  True when done
        (or nothing to do); False when it must be retried (the batch is kept)."""
        if not self._offsets:
            return True
        assert self.store is not None and self._consumer is not None
        records = self._pending_records
        try:
            for table in TABLE_ORDER:
                rows = self._pending[table]
                if rows and table not in self._done:
                    await asyncio.to_thread(self.store.insert, table, list(rows))
                    self._done.add(table)
                    self.stats[table] += len(rows)
        except Exception as exc:
            self._failures_in_row += 1
            self.stats["insert_failures"] += 1
            log.warning(
                "clickhouse sink: ClickHouse insert failed (attempt %d): %s; holding %d records of %d partitions, "
                "offsets not committed; retrying",
                self._failures_in_row, _short(exc), records, len(self._offsets),
            )
            return False
        offsets = dict(self._offsets)
        try:
            await self._consumer.commit(offsets)
        except Exception as exc:
            # The rows are in ClickHouse; keep the batch (tables marked done) and commit later,
            # or drop it on revocation: a re-read only replaces rows.
            self._failures_in_row += 1
            self.stats["commit_failures"] += 1
            log.warning("clickhouse sink: offset commit failed (attempt %d): %s; rows are stored, retrying the commit",
                        self._failures_in_row, _short(exc))
            return False
        self.committed.update(offsets)
        self.stats["flushes"] += 1
        self.stats["records"] += records
        self._clear_pending()
        return True

    def _clear_pending(self) -> None:
        for rows in self._pending.values():
            rows.clear()
        self._offsets.clear()
        self._done.clear()
        self._pending_records = 0
        self._first_at = None

    # --- rebalance ----------------------------------------------------------------------
    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        self._generation += 1
        async with self._lock:  # waits for an insert in flight
            if self._offsets:
                records = self._pending_records
                ok = (not self._failing) and await self._flush_locked()
                if not ok:
                    log.warning("clickhouse sink: partitions revoked with %d unflushed records: dropped uncommitted, "
                                "the next owner re-reads them", records)
                self._clear_pending()
        log.info("clickhouse sink: %d partitions revoked", len(revoked))

    def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        # Another member may have committed these since: the broker's offset counts now.
        for tp in assigned:
            self.committed.pop(tp, None)
        log.info("clickhouse sink: %d partitions assigned", len(assigned))


def sink_web(sink: ClickHouseSink) -> ProbeServer:
    """The sink's HTTP server: probes, metrics, and ``POST /query`` (``{"sql": "SELECT ..."}``:
    an analyst's read-only query on the store this process owns, which is the only way to
    reach an embedded chDB while the sink runs)."""

    async def ready() -> tuple[bool, dict]:
        running = sink.running
        store_ok = sink.store is not None and await asyncio.to_thread(sink.store.ping)
        return running and store_ok, {"consuming": running, "clickhouse": store_ok,
                                      "dsn": sink.store.dsn if sink.store else None}

    def metrics() -> list:
        counters = ("records", "flushes", "dead_lettered", "insert_failures", "commit_failures")
        out = [(f"sink_{k}_total", {}, sink.stats.get(k, 0)) for k in counters]  # all of them, from 0
        out += [("sink_rows_total", {"table": t}, sink.stats.get(t, 0)) for t in TABLE_ORDER]
        out.append(("sink_pending_records", {}, sink.pending_records))
        out.append(("sink_failing", {}, int(sink.failing)))
        return out

    async def query(request: web.Request) -> web.Response:
        try:
            body = await request.json() if request.method == "POST" else dict(request.query)
            sql = body.get("sql") if isinstance(body, dict) else None
            if not isinstance(sql, str) or not sql.strip():
                raise ValueError('expected {"sql": "SELECT ..."}')
        except ValueError as exc:
            return web.json_response({"error": f"bad request: {exc}"}, status=400)
        if sink.store is None:
            return web.json_response({"error": "ClickHouse is not open yet"}, status=503)
        try:
            columns, rows = await asyncio.to_thread(sink.store.select, sql)
        except Exception as exc:
            return web.json_response({"error": _short(exc)}, status=400)
        return web.Response(body=orjson.dumps({"columns": columns, "rows": rows}, default=str),
                            content_type="application/json")

    s = sink.settings
    return ProbeServer("sink", s.web_host, s.sink_web_port, ready=ready, metrics=metrics,
                       routes=[web.post("/query", query), web.get("/query", query)])


async def run_sink(settings: Settings) -> None:
    """``execution sink``: run the sink until SIGTERM or SIGINT (awaitable: ``asyncio.run``)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sink = ClickHouseSink(settings)
    web = await sink_web(sink).start()  # before the store opens: alive while ClickHouse is away
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not the main thread
            pass
    await sink.start()
    assert sink._task is not None
    task = sink._task
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        log.info("clickhouse sink: stopping")
        await sink.stop()
        await web.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):  # pragma: no cover
                pass
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
    log.info("clickhouse sink stopped: %s", dict(sink.stats))
