"""app/faust_patches.py, each change next to a control that runs Faust's (or mode's) own code in
the same scenario and shows the fault: (1) recovery seeks the stream partitions before it
resumes them; (2) one producer lane per partition; (3, 4) Tansu's settings leave Faust's methods
alone in the production profile; (5) a skipped range restarts the worker instead of being
committed; (7) no fixed sleeps at start and stop, and the cancelled tasks still unwind (their
``finally`` runs) before the loop closes; (8) seeks to the committed offsets do not overlap;
(9) a paused partition stays paused while its agent's queue drains.  These faults are in
Faust's and mode's own code, before any broker: no servers here.  (6) runs on the broker:
tests/test_kafka_io.py; its remaining window (a partition paused between the hand-over and
``getmany``) is here, with (9)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
from faust.tables.manager import TableManager
from faust.tables.recovery import Recovery
from faust.transport.consumer import Consumer
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.producer import ProducerBuffer
from faust.types import TP
from intervaltree import IntervalTree
from mode.worker import Worker

from app import faust_patches, watchdog
from app.faust_patches import install
from app.settings import Profile, Settings


async def turns(n: int = 20) -> None:
    """Let every ready task run ``n`` loop turns (no clock involved)."""
    for _ in range(n):
        await asyncio.sleep(0)


# --- 1. recovery seeks before it resumes ------------------------------------------------------


class RecoveryStub:
    """What Faust's recovery touches as it resumes the streams; records what the consumer sees."""

    def __init__(self) -> None:
        stream, changelog = TP("signals.approved", 0), TP("execution-orders-changelog", 0)
        self.stream = stream
        self.calls: list[tuple[str, bool]] = []  # (call, stream partition paused at that moment)
        self.paused = {stream}

        def record(name: str) -> None:
            self.calls.append((name, stream in self.paused))

        async def perform_seek() -> None:
            record("seek")

        def resume_partitions(tps: set) -> None:
            record("resume")
            self.paused -= set(tps)

        async def send() -> None:
            return None

        async def maybe_start() -> None:
            record("fetcher")

        consumer = SimpleNamespace(assignment=lambda: {stream, changelog}, perform_seek=perform_seek,
                                   resume_partitions=resume_partitions, resume_flow=lambda: record("flow"))
        self.app = SimpleNamespace(
            consumer=consumer, consumer_generation_id=1, conf=SimpleNamespace(broker_request_timeout=10),
            on_rebalance_complete=SimpleNamespace(send=send), flow_control=SimpleNamespace(resume=lambda: None),
            _fetcher=SimpleNamespace(maybe_start=maybe_start), on_rebalance_end=lambda: None)
        self.log = SimpleNamespace(info=lambda *a: None, dev=lambda *a: None, warning=lambda *a: None)
        self.completed = asyncio.Event()
        self.tables = SimpleNamespace(on_actives_ready=lambda: None, on_standbys_ready=lambda: None)

    def _is_changelog_tp(self, tp: TP) -> bool:
        return tp.topic.endswith("-changelog")

    async def _wait(self, coro, timeout=None) -> None:
        await coro


async def test_recovery_seeks_the_stream_partitions_while_they_are_still_paused():
    """(1) Faust resumes the stream partitions, then seeks them: in between they are fetchable
    from wherever the position was (a restarted worker already fetching changelogs fetched
    them, the records were dropped with the cleared queues, and the first record read after
    the seek lay past the committed offset: the chaos test's lost signals)."""
    install(Settings())
    patched = RecoveryStub()
    await Recovery._resume_streams(patched, generation_id=1)
    assert patched.calls == [("seek", True), ("flow", True), ("resume", True), ("fetcher", False)]

    # Control: Faust's own resumes first and seeks a partition already fetchable.
    faust = RecoveryStub()
    await faust_patches._faust_resume_streams(faust, generation_id=1)
    assert faust.calls[:2] == [("resume", True), ("seek", False)]


# --- 2. producer lanes ----------------------------------------------------------------------


async def hand_over(buffer_class: type) -> list[tuple[int, int]]:
    """Six records for partitions 0 and 1 into a producer buffer whose partition 0 cannot take
    any (its batch is full); what was handed to the producer meanwhile."""
    buf = buffer_class()
    buf.app = SimpleNamespace(conf=SimpleNamespace(producer_threaded=False))
    gate = asyncio.Event()
    handed: list[tuple[int, int]] = []

    async def send_pending(fut) -> None:
        if fut.message.partition == 0:
            await gate.wait()
        handed.append((fut.message.partition, fut.n))

    buf._send_pending = send_pending
    await buf.start()
    try:
        channel = object()
        for n in range(6):
            buf.put(SimpleNamespace(n=n, message=SimpleNamespace(channel=channel, partition=n % 2)))
        await turns(50)
        waiting = list(handed)
        gate.set()
        await asyncio.wait_for(buf.flush(), 5)
        assert sorted(handed) == [(0, 0), (0, 2), (0, 4), (1, 1), (1, 3), (1, 5)]
        return waiting
    finally:
        await buf.stop()


async def test_one_partition_waiting_does_not_hold_back_the_others_writes():
    """(2) The lanes (tests/test_batch.py has the order and flush checks); control: Faust's one
    queue holds every partition's writes behind the one that waits."""
    install(Settings())
    assert await hand_over(ProducerBuffer) == [(1, 1), (1, 3), (1, 5)]

    class FaustBuffer(ProducerBuffer):
        _handle_pending = faust_patches._faust_handle_pending
        size = faust_patches._original_size

    assert await hand_over(FaustBuffer) == []


# --- 3 and 4. Tansu's settings ----------------------------------------------------------------


def test_the_production_profile_keeps_fausts_end_offsets_and_sets_the_fetch_wait():
    """(4) is Tansu's: with the production profile (Apache Kafka) Faust's method stays; (3)
    sets the fetch wait in both profiles, and Faust's method is back for its own 1,500 ms."""
    try:
        install(Settings(profile=Profile.PRODUCTION))
        assert AIOKafkaConsumerThread._create_worker_consumer is not faust_patches._create_consumer
        assert AIOKafkaConsumerThread._highwaters is faust_patches._faust_highwaters
        install(Settings(profile=Profile.PRODUCTION, consumer_fetch_max_wait_ms=faust_patches.FAUST_FETCH_MAX_WAIT_MS))
        assert AIOKafkaConsumerThread._create_worker_consumer is faust_patches._create_consumer
        install(Settings(profile=Profile.LOCAL))
        assert AIOKafkaConsumerThread._create_worker_consumer is not faust_patches._create_consumer
        assert AIOKafkaConsumerThread._highwaters is not faust_patches._faust_highwaters
    finally:
        install(Settings())


@pytest.mark.parametrize("wait_ms", [faust_patches.FAUST_FETCH_MAX_WAIT_MS, "production"])
async def test_a_record_waits_for_the_fetch_in_flight_on_another_partition(stack, settings, wait_ms):
    """(3) on Apache Kafka: aiokafka keeps one fetch in flight per broker and, once fetched
    records have waited ``prefetch_backoff`` (0.1 s) for a busy reader, sends it without their
    partitions.  Partition 1 holds one such record; the fetch in flight is for partition 0
    alone, with nothing to return, so the broker keeps it for the whole wait.  A record
    produced to partition 1 once its buffer is read waits for that fetch: with Faust's
    1,500 ms it is not delivered within the 0.7 s this test gives it (the control); with the
    production profile's wait it is."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    if wait_ms == "production":
        wait_ms = Settings(profile=Profile.PRODUCTION).effective("consumer_fetch_max_wait_ms")
        assert wait_ms <= 100
    topic = f"fetch-wait-{wait_ms}"
    admin = AIOKafkaAdminClient(**settings.aiokafka_common())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1)])
    finally:
        await admin.close()
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    producer = AIOKafkaProducer(**settings.aiokafka_common(), linger_ms=20)
    consumer = AIOKafkaConsumer(**settings.aiokafka_common(), enable_auto_commit=False, fetch_max_wait_ms=wait_ms)
    await producer.start()
    await consumer.start()
    try:
        consumer.assign([p0, p1])
        await consumer.seek_to_end(p0, p1)
        # one batch (linger) so that one fetch brings both
        sent = [await producer.send(topic, v, partition=1) for v in (b"1", b"2")]
        await asyncio.gather(*sent)
        first = await consumer.getmany(p1, timeout_ms=10_000, max_records=1)  # "2" stays buffered
        assert [r.value for r in first[p1]] == [b"1"]
        # a busy reader: the fetcher gives up waiting for it and sends partition 0's fetch alone
        deadline = time.monotonic() + 10
        while not consumer._fetcher._in_flight:
            assert time.monotonic() < deadline, "no fetch sent while partition 1 holds a record"
            await asyncio.sleep(0.01)
        assert [r.value for r in (await consumer.getmany(p1, timeout_ms=10_000, max_records=1))[p1]] == [b"2"]
        await producer.send_and_wait(topic, b"3", partition=1)
        late = await consumer.getmany(p1, timeout_ms=700)
        delivered = [r.value for r in late.get(p1, [])]
        if wait_ms == faust_patches.FAUST_FETCH_MAX_WAIT_MS:
            assert delivered == [], "the control: the record waits for the fetch in flight"
        else:
            assert delivered == [b"3"]
    finally:
        await consumer.stop()
        await producer.stop()


# --- 5. skipped offsets -----------------------------------------------------------------------


async def test_a_skipped_range_is_not_committed(monkeypatch):
    """(5) The fetch jumps from 158 to 360 on an input topic: Faust records 159..360 as a gap and
    its next commit counts them as processed; here the worker exits for a restart instead and
    nothing past 158 is committed.  (tests/test_batch.py: retention, changelogs.)"""
    install(Settings())
    tp = TP("signals.approved", 3)
    exits: list[int] = []
    monkeypatch.setattr(watchdog.os, "_exit", exits.append)
    monkeypatch.setattr(watchdog.logging, "shutdown", lambda: None)

    def consumer() -> SimpleNamespace:
        async def earliest_offsets(*tps):
            return {t: 0 for t in tps}

        c = SimpleNamespace(_committed_offset={tp: 150}, _read_offset={tp: 158}, _gap=defaultdict(IntervalTree),
                            _acked=defaultdict(list), _acked_index=defaultdict(set),
                            earliest_offsets=earliest_offsets)
        c._acked[tp].extend(range(150, 159))
        return c

    async def jump(add_gap, c) -> int | None:
        await add_gap(c, tp, 159, 360)
        c._acked[tp].append(360)  # the record at 360 processed
        return Consumer._new_offset(c, tp)

    assert await jump(Consumer._add_gap, consumer()) == 159 and exits == [watchdog.EXIT_STALLED]
    # Control: Faust's own commits 361: 159..359 never processed.
    assert await jump(faust_patches._faust_add_gap, consumer()) == 361


# --- 7. no fixed sleeps -----------------------------------------------------------------------


async def test_the_table_manager_starts_without_a_sleep():
    install(Settings())
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def nothing() -> None:
        return None

    manager = SimpleNamespace(should_stop=False, sleep=sleep, _update_channels=nothing,
                              recovery=SimpleNamespace(start=nothing))
    await TableManager.on_start(manager)
    assert slept == []
    await faust_patches._faust_table_manager_on_start(manager)  # control: Faust's own
    assert slept == [1.0]


def stop_worker(worker_class: type) -> tuple[list, float]:
    """A mode worker's loop shut down with a task nobody stopped: (what unwound and whether the
    loop closed, seconds the shutdown took)."""
    result: list = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        worker = worker_class(loop=loop, override_logging=False, redirect_stdouts=False, daemon=False)
        unwound: list[str] = []

        async def leftover() -> None:  # a task nobody stopped: a client's reader, a timer
            try:
                await asyncio.sleep(3600)
            finally:
                await asyncio.sleep(0)  # unwinding may itself await
                unwound.append("leftover")

        loop.run_until_complete(asyncio.sleep(0))
        loop.create_task(leftover())
        began = time.monotonic()
        worker._shutdown_loop()
        result.extend([[unwound, loop.is_closed()], time.monotonic() - began])

    t = threading.Thread(target=run, daemon=True)  # mode's worker owns the thread's loop
    t.start()
    t.join(30)
    assert not t.is_alive(), "the worker's shutdown hung on a task that never ends"
    return result[0], result[1]


def test_a_stopped_worker_cancels_leftover_tasks_lets_them_unwind_and_closes_the_loop():
    """(7) mode waits 1 s for leftover tasks, cancels them and sleeps another second: 2 s of every
    graceful stop.  The control's bound is mode's own sleeps (at least 2 s, whatever the load);
    the patched stop sleeps 0.15 s at most."""
    install(Settings())
    state, took = stop_worker(Worker)
    assert state == [["leftover"], True]
    assert took < 1.0

    class ModeWorker(Worker):
        _gather_all = faust_patches._mode_gather_all
        _sentinel_task = faust_patches._mode_sentinel_task

    state, took = stop_worker(ModeWorker)  # control: mode's own
    assert state == [["leftover"], True]
    assert took >= 1.9


# --- 8. one seek at a time --------------------------------------------------------------------


@pytest.mark.parametrize("faust", [False, True], ids=["patched", "faust-control"])
async def test_concurrent_seeks_leave_the_read_offsets_where_the_positions_are(faust: bool):
    """(8) Faust seeks to the committed offsets from two places that can overlap after a
    rebalance: its fetch loop (records came back while the flow was stopped) and recovery.
    Each seek moves the fetch positions partition by partition (an OffsetFetch round trip
    each, retried while the group rebalances), then sets every read offset at the end.  A
    slow seek that read a committed offset before a late commit finished after a fresh one:
    the positions were the fresh seek's, the read offsets the stale one's, and the first
    record read looked like a gap (the worker restarted; tests/test_chaos.py, two workers).
    The control runs Faust's own perform_seek and shows that mismatch."""
    install(Settings())
    perform_seek = faust_patches._faust_perform_seek if faust else Consumer.perform_seek
    tp, other = TP("signals.approved", 0), TP("signals.approved", 1)
    position: dict[TP, int] = {}
    first_waits, late_commit_done = asyncio.Event(), asyncio.Event()
    committed = {tp: 100, other: 40}

    class Thread:  # what the consumer thread's seek does: seek each partition in turn
        def __init__(self) -> None:
            self.calls = 0

        async def seek_to_committed(self) -> dict[TP, int]:
            self.calls += 1
            seen = {}
            for i, p in enumerate((tp, other)):
                if self.calls == 1 and i == 1:
                    first_waits.set()
                    await late_commit_done.wait()  # OffsetFetch retried while the group rebalances
                seen[p] = position[p] = committed[p]
                await asyncio.sleep(0)
            return seen

    thread = Thread()
    consumer = SimpleNamespace(_read_offset={}, _committed_offset={}, seek_to_committed=thread.seek_to_committed)
    first = asyncio.create_task(perform_seek(consumer))  # reads 100 for tp, then waits
    await first_waits.wait()
    committed[tp] = 115  # offsets 100..114 processed before the rebalance, committed late
    second = asyncio.create_task(perform_seek(consumer))
    await turns()  # Faust's own second seek completes meanwhile; the patched one waits its turn
    late_commit_done.set()
    await asyncio.gather(first, second)
    if faust:
        assert consumer._read_offset != position, "Faust's own seeks no longer race: review patch 8"
    else:
        assert consumer._read_offset == position, "read offsets from one seek, positions from the other"


# --- 9. a paused partition stays paused -------------------------------------------------------


@pytest.mark.parametrize("faust", [False, True], ids=["patched", "faust-control"])
def test_a_paused_partition_stays_paused_while_its_agents_queue_drains(faust: bool):
    """(9) Under a backlog Faust stops fetching a partition whose agent's queue is full
    ("buffered") and fetches it again once the queue has drained.  A rebalance pauses every
    stream partition until recovery has sought it to its committed offset; a drain in
    between made a buffered partition active again, so its records were fetched and passed
    on before the seek (and looked like skipped offsets after it).  The control runs Faust's
    own pause_partitions and on_buffer_full and shows it."""
    install(Settings())
    pause = faust_patches._faust_pause_partitions if faust else Consumer.pause_partitions
    full = faust_patches._faust_on_buffer_full if faust else Consumer.on_buffer_full
    tp = TP("signals.approved", 0)

    class Stub:  # the consumer's partition sets, as Faust keeps them
        def __init__(self) -> None:
            self._active_partitions = {tp}
            self._paused_partitions: set = set()
            self._buffered_partitions: set = set()
            self.app = SimpleNamespace(in_recovery=False)

        def _get_active_partitions(self) -> set:
            return self._active_partitions

        def fetched(self) -> bool:  # what the fetch asks for and what getmany passes on
            return tp in self._active_partitions or tp in self._buffered_partitions

    c = Stub()
    full(c, tp)  # the orders agent's queue is full: not fetched, held records passed on
    assert tp not in c._active_partitions and tp in c._buffered_partitions
    pause(c, {tp})  # a rebalance
    if faust:
        assert c.fetched(), "Faust's own pause leaves the partition buffered (passed on)"
    else:
        assert not c.fetched()
    Consumer.on_buffer_drop(c, tp)  # the queue drains (cleared for the rebalance)
    if faust:
        assert tp in c._active_partitions, "Faust's own no longer re-activates a paused partition: review patch 9"
        return
    assert not c.fetched(), "a paused partition was made active by its queue draining"
    full(c, tp)  # a full queue while paused does not make it "buffered"
    assert not c.fetched()
    Consumer.resume_partitions(c, {tp})  # recovery has sought it: now it is fetched again
    assert c._active_partitions == {tp} and c.fetched()


# --- 10. bulk changelog replay: what it replays, and a rebalance while it runs -----------------
# Its contents against Faust's own replay run on the broker: tests/test_faust_patches_recovery.py.


def test_only_tables_whose_replay_is_the_raw_write_are_bulk_replayed(tmp_path):
    import faust

    app = faust.App("bulk-eligible", store="rocksdb://", datadir=str(tmp_path), autodiscover=False)

    async def on_event(event) -> None: ...

    assert faust_patches.bulk_eligible(app.Table("plain", key_type=bytes, value_type=bytes))
    assert not faust_patches.bulk_eligible(app.Table("callback", on_changelog_event=on_event))

    class OwnReplay(faust.Table):
        def apply_changelog_batch(self, batch) -> None: ...

    assert not faust_patches.bulk_eligible(OwnReplay(app, name="own_replay"))
    assert not faust_patches.bulk_eligible(app.Table("unbuffered", recovery_buffer_size=1))
    assert not faust_patches.bulk_eligible(app.GlobalTable("global"))


class BulkStub:
    """What the bulk replay reads of Faust's Recovery, a table over a real RocksDB partition,
    and a consumer whose fetches hand out changelog records and can let a rebalance begin."""

    def __init__(self, tmp_path, records: int = 10) -> None:
        import rocksdict

        self.tp = TP("app-t-changelog", 0)
        self.db = rocksdict.Rdict(str(tmp_path / "t-0.db"), options=rocksdict.Options(raw_mode=True))
        store = SimpleNamespace(offset_key=b"__faust\0offset__", _db_for_partition=lambda p: self.db)
        self.table = type("Table", (), {"data": store})()  # hashable, as Faust's tables are
        self.tp_to_table = {self.tp: self.table}
        self.active_highwaters = {self.tp: records - 1}
        self.signal_recovery_start = asyncio.Event()
        self.should_stop = False
        self.app = SimpleNamespace(consumer_generation_id=1, conf=SimpleNamespace(
            processing_guarantee="at_least_once", broker_request_timeout=90.0, id="app"))
        self.log = SimpleNamespace(info=lambda *a: None)
        self.records = [SimpleNamespace(offset=i, key=b"k%d" % (i % 3), value=b"v%d" % i) for i in range(records)]
        self.on_fetch: list = []  # called once per fetch, before it answers, in order
        self.buffers: dict = {self.table: []}  # Faust's replay: records taken, not written yet

    def flush_buffers(self) -> None:  # as Faust's: write what its replay took, then its offset
        for r in self.buffers[self.table]:
            self.db[r.key] = r.value
            self.db[b"__faust\0offset__"] = str(r.offset).encode()
        self.buffers[self.table].clear()

    def consumer(self, stub: "BulkStub"):
        class Fake:
            def __init__(self, **options) -> None:
                self.position_ = 0

            async def start(self) -> None: ...

            async def stop(self) -> None: ...

            def assign(self, tps) -> None: ...

            def seek(self, tp, offset: int) -> None:
                self.position_ = offset

            async def getmany(self, *tps, timeout_ms: int):
                if stub.on_fetch:
                    stub.on_fetch.pop(0)()
                got = stub.records[self.position_:self.position_ + 4]
                self.position_ += len(got)
                return {tps[0]: got} if got else {}

            async def position(self, tp) -> int:
                return self.position_

        return Fake


@pytest.mark.parametrize("event", ["revoke", "generation", "recovery_start"])
async def test_the_bulk_replay_writes_nothing_once_a_rebalance_has_begun(tmp_path, monkeypatch, event: str):
    import aiokafka

    stub = BulkStub(tmp_path)
    monkeypatch.setattr(aiokafka, "AIOKafkaConsumer", stub.consumer(stub))
    monkeypatch.setattr(faust_patches, "bulk_eligible", lambda table: True)
    offsets = {stub.tp: -1}

    def rebalance() -> None:
        if event == "revoke":  # Faust's revoke callback, as the consumer calls it
            faust_patches._on_partitions_revoked(stub, {stub.tp})
        elif event == "generation":
            stub.app.consumer_generation_id += 1
        else:
            stub.signal_recovery_start.set()

    # The rebalance begins during the second fetch: its records are not written, nor anything after.
    stub.on_fetch = [lambda: None, rebalance]
    assert await faust_patches._bulk_replay(stub, {stub.tp}, offsets) == 4
    assert offsets[stub.tp] == 3
    assert dict(stub.db.items()) == {b"k0": b"v3", b"k1": b"v1", b"k2": b"v2", b"__faust\0offset__": b"3"}

    # Recovery after the rebalance: the bulk goes on from the persisted offset.
    stub.signal_recovery_start.clear()
    assert await faust_patches._bulk_replay(stub, {stub.tp}, offsets) == 6
    assert offsets[stub.tp] == 9
    assert dict(stub.db.items()) == {b"k0": b"v9", b"k1": b"v7", b"k2": b"v8", b"__faust\0offset__": b"9"}
    stub.db.close()


async def test_records_fausts_replay_took_meanwhile_are_written_before_the_bulks_later_ones(tmp_path, monkeypatch):
    """Faust's replay task still drains records fetched before the rebalance: it takes those
    past the active offset (moving it) and writes them when its buffer is flushed.  The bulk
    skips what Faust took and flushes Faust's buffer before its own next write, so the table
    ends as an in-order replay leaves it (the newest value of k0 is offset 9, k1's 7)."""
    import aiokafka

    stub = BulkStub(tmp_path)
    monkeypatch.setattr(aiokafka, "AIOKafkaConsumer", stub.consumer(stub))
    monkeypatch.setattr(faust_patches, "bulk_eligible", lambda table: True)
    offsets = {stub.tp: -1}

    def faust_takes(*numbers: int) -> None:  # what _slurp_changelogs does with a queued record
        for i in numbers:
            if i > offsets[stub.tp]:
                offsets[stub.tp] = i
                stub.buffers[stub.table].append(stub.records[i])

    # Faust takes 4..6 while the bulk waits for its second fetch (which answers 4..7).
    stub.on_fetch = [lambda: None, lambda: faust_takes(4, 5, 6)]
    assert await faust_patches._bulk_replay(stub, {stub.tp}, offsets) == 4 + 1 + 2  # 0..3, 7, 8..9
    assert offsets[stub.tp] == 9
    stub.flush_buffers()  # as Faust does when its replay ends: without the bulk's flush, k0 = v6
    assert dict(stub.db.items()) == {b"k0": b"v9", b"k1": b"v7", b"k2": b"v8", b"__faust\0offset__": b"9"}
    stub.db.close()


# --- 11. batches without polling --------------------------------------------------------------


def batch_taker(name: str, within: float) -> tuple[Any, list[list[int]]]:
    """An agent of an app of its own taking batches of up to 10 events within ``within``
    seconds, and the values of the batches it took."""
    import faust

    app = faust.App(name, autodiscover=False)
    batches: list[list[int]] = []

    @app.agent()
    async def take(stream):
        async for events in stream.take_events(10, within=within):
            batches.append([e.value for e in events])

    return take, batches


@pytest.mark.parametrize("faust_own", [True, False], ids=["faust", "patched"])
async def test_an_idle_agent_does_not_poll_for_its_next_batch(faust_own: bool, monkeypatch):
    """(11) Faust's ``take_events`` wakes every batch window while nothing arrives (the
    control); the patched one waits for the first event.  Both hand over the same batches."""
    from faust import Stream

    install(Settings())
    if faust_own:
        monkeypatch.setattr(Stream, "take_events", faust_patches._faust_take_events)
    waits: list = []
    own_wait = Stream.wait_for_stopped

    async def counting(self, *args, **kwargs):
        waits.append(kwargs.get("timeout"))
        return await own_wait(self, *args, **kwargs)

    monkeypatch.setattr(Stream, "wait_for_stopped", counting)
    take, batches = batch_taker(f"take-{faust_own}", within=0.002)

    async with take.test_context() as agent:
        await asyncio.sleep(0.2)  # the idle window whose wake-ups are counted (100 batch windows)
        idle = len(waits)
        for v in range(3):
            await agent.put(v)
        deadline = time.monotonic() + 10
        while sum(map(len, batches)) < 3:
            assert time.monotonic() < deadline, batches
            await asyncio.sleep(0.01)
    assert [v for b in batches for v in b] == [0, 1, 2]
    if faust_own:
        assert idle >= 10, "the control: Faust's loop wakes every batch window"
    else:
        assert idle <= 1, waits


@pytest.mark.parametrize("in_hand", [False, True], ids=["drained", "records-in-hand"])
async def test_a_batch_waits_for_records_only_while_the_consumer_has_them(in_hand: bool, monkeypatch):
    """(11) With a window far longer than the test may wait: while the consumer's drain loop
    still holds fetched records, the batch waits for them (two events, one batch, once the
    loop is drained); with none in hand, a lone event goes at once instead of waiting out
    the window (Faust's own generator, the control, would hold it for the whole window)."""
    install(Settings())
    drained = faust_patches._Drained()
    drained.is_set = not in_hand
    monkeypatch.setattr(faust_patches, "_drained", drained)
    take, batches = batch_taker(f"window-{in_hand}", within=3600)

    async with take.test_context() as agent:
        await agent.put(0)
        if in_hand:
            await agent.put(1)
            started = time.monotonic() + 10
            while not drained.waiters:  # the batch has begun and waits
                assert time.monotonic() < started
                await asyncio.sleep(0.01)
            assert batches == []
            drained.set()  # the drain loop asks for the next fetch
        deadline = time.monotonic() + 10
        while not batches:
            assert time.monotonic() < deadline, "the batch waited out the window"
            await asyncio.sleep(0.01)
    assert batches == ([[0, 1]] if in_hand else [[0]])


# --- 12. persisted offsets, and table_get ---------------------------------------------------


@pytest.mark.parametrize("faust_own", [True, False], ids=["faust", "patched"])
async def test_one_offset_write_per_changelog_partition_and_round(faust_own: bool, tmp_path, monkeypatch):
    """(12) The acks of one produce round arrive together: Faust writes the persisted offset
    once per record (the control), the patched callback once per partition, the highest."""
    import faust
    from faust.stores.rocksdb import Store

    install(Settings())
    app = faust.App(f"offsets-{faust_own}", store="rocksdb://", datadir=str(tmp_path), autodiscover=False)
    table = app.Table("t", key_type=bytes, value_type=bytes)
    callback = faust_patches._faust_on_changelog_sent if faust_own else faust_patches._on_changelog_sent
    writes: list[tuple[int, int]] = []
    own = Store.set_persisted_offset

    def counting(self, tp, offset: int) -> None:
        writes.append((tp.partition, offset))
        own(self, tp, offset)

    monkeypatch.setattr(Store, "set_persisted_offset", counting)
    tps = [TP("offsets-t-changelog", p) for p in (0, 1)]
    for offset in range(5):  # one produce response: 5 records on each of two partitions
        for tp in tps:
            callback(table, SimpleNamespace(result=lambda tp=tp, o=offset: SimpleNamespace(topic_partition=tp, offset=o)))
    await turns(2)
    assert [table.data.persisted_offset(tp) for tp in tps] == [4, 4]
    if faust_own:
        assert len(writes) == 10, "the control: one RocksDB write per acknowledged record"
    else:
        assert sorted(writes) == [(0, 4), (1, 4)]


def test_table_get_reads_what_table_get_reads(tmp_path):
    import weakref

    import faust
    from faust.streams import _current_event

    app = faust.App("table-get", store="rocksdb://", datadir=str(tmp_path), autodiscover=False)
    table = app.Table("t", key_type=bytes, value_type=bytes)

    class Event:  # what the store reads of the current event: its partition
        def __init__(self, partition: int) -> None:
            self.message = SimpleNamespace(partition=partition)

    for partition, key in ((0, b"a"), (3, b"b")):
        event = Event(partition)
        token = _current_event.set(weakref.ref(event))
        try:
            table.data[key] = b"value of " + key
        finally:
            _current_event.reset(token)
    for key in (b"a", b"b", b"missing"):
        assert faust_patches.table_get(table, key) == table.get(key)
    assert faust_patches.table_get(table, b"b") == b"value of b"
    assert faust_patches.table_get(table, b"missing") is None


async def test_an_offset_that_cannot_be_written_does_not_stop_the_others(tmp_path, monkeypatch):
    import faust
    from faust.stores.rocksdb import Store

    install(Settings())
    app = faust.App("offsets-fail", store="rocksdb://", datadir=str(tmp_path), autodiscover=False)
    table = app.Table("t", key_type=bytes, value_type=bytes)
    own = Store.set_persisted_offset

    def failing(self, tp, offset: int) -> None:
        if tp.partition == 0:
            raise OSError("store closed")
        own(self, tp, offset)

    monkeypatch.setattr(Store, "set_persisted_offset", failing)
    for p in (0, 1):
        tp = TP("offsets-fail-t-changelog", p)
        faust_patches._on_changelog_sent(table, SimpleNamespace(result=lambda tp=tp: SimpleNamespace(topic_partition=tp, offset=7)))
    await turns(2)
    assert table.data.persisted_offset(TP("offsets-fail-t-changelog", 1)) == 7
    assert table.data.persisted_offset(TP("offsets-fail-t-changelog", 0)) is None


# --- 6 and 9. a partition paused between the hand-over and getmany ---------------------------


@pytest.mark.parametrize("faust_own", [True, False], ids=["faust-pause", "patched"])
async def test_a_partition_paused_after_the_hand_over_is_not_yielded_by_getmany(faust_own: bool):
    """(6, 9) The consumer thread has handed over records of two partitions; before Faust's
    ``getmany`` yields them, a rebalance pauses one (its agent's queue had filled, so it was
    also "buffered").  ``getmany`` reads the live set of active partitions at each record: with
    the patched pause (which unbuffers what it pauses) the paused partition's records are not
    yielded, so the drain never reads their offsets, and recovery's seek (1) puts the position
    back before the partition resumes.  The control, Faust's pause, leaves it buffered, and its
    records are handed to the agents while it is paused."""
    from faust.transport.utils import DefaultSchedulingStrategy

    paused_tp, active_tp = TP("signals.approved", 0), TP("signals.approved", 1)
    live = {paused_tp, active_tp}  # Faust's live set of active partitions
    handed_over = {paused_tp: ["p0", "p1"], active_tp: ["a0", "a1"]}

    async def wait_next_records(timeout: float):
        return handed_over, live

    stub = SimpleNamespace(
        _wait_next_records=wait_next_records, _get_active_partitions=lambda: live,
        _paused_partitions=set(), _buffered_partitions={paused_tp},
        app=SimpleNamespace(consumer_generation_id=1, monitor=SimpleNamespace(track_tp_end_offset=lambda tp, hw: None)),
        should_stop=False, flow_active=True, scheduler=DefaultSchedulingStrategy(),
        _to_message=lambda tp, record: record, highwater=lambda tp: 0,
    )
    pause = faust_patches._faust_pause_partitions if faust_own else faust_patches._pause_partitions
    yielded = []
    async for tp, message in Consumer.getmany(stub, timeout=1.0):
        if not yielded:
            pause(stub, {paused_tp})  # the rebalance, once the first record is out
        yielded.append(message)
    assert paused_tp not in live
    # p0 went out before the pause (delivered: the seek brings it back, a redelivery the
    # service dedupes); what is left of the paused partition must not follow it.
    assert yielded == (["p0", "a0", "p1", "a1"] if faust_own else ["p0", "a0", "a1"])
