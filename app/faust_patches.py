"""Where this service changes Faust's (and aiokafka's) behaviour, all in one place.

:func:`install` applies every change (idempotent); :func:`app.faust_app.create_app` calls it.
Each is written against Faust 0.15 / aiokafka 0.14 (checked at install) and has a test:

1. **Recovery seeks before it resumes** (``Recovery``): a restarted worker fetched stream
   records past its committed offsets and committed over records nobody processed.
2. **Producer lanes** (``ProducerBuffer``): one drain lane per topic partition instead of one
   queue for all, so a table write waiting for its partition no longer blocks the others.
3. **Consumer fetch wait** (``consumer_fetch_max_wait_ms``): Faust fixes 1,500 ms.  Tansu
   answers a waiting fetch only when the wait ends, so every hop cost up to 1.5 s there; on
   Apache Kafka aiokafka keeps one fetch in flight per broker and leaves out of it the
   partitions that still hold fetched records, so a record arriving on one of those waits for
   the in-flight fetch, up to the whole wait (both profiles set a shorter one).
4. **End offsets checked by a fetch** (``broker_end_offsets_check``): Tansu 0.6 reports a
   short end offset when the last batch holds several records, and Faust's recovery stops
   at it (:func:`app.kafka_io.end_offsets`).
5. **No skipped offsets on input topics** (``Consumer._add_gap``): when the fetch jumps over
   offsets Faust counts them as processed and commits past them; on our (uncompacted,
   untransactional) input topics that lost signals.  The worker exits instead, to restart
   from its committed offsets.  A safety net: (6) and (8) removed the causes found.
6. **The consumer thread hands over records of partitions active at that moment, never all**
   (``AIOKafkaConsumerThread._fetch_records``): Faust hands its live set of active partitions
   to the consumer thread; when recovery empties it in between, aiokafka takes the empty set
   for "every partition", hands over the paused stream partitions' records, Faust drops them
   and aiokafka's position has moved past them: the fetch jump behind (5).  A fetch begun
   before a rebalance must not hand over, after it, partitions that are paused by then.
7. **No fixed sleeps at start and stop** (``TableManager.on_start``, mode's ``Worker``): every
   start waited 1 s for tables that might still be defined (ours all are, at import), every
   graceful stop waited 2 s after everything was committed, flushed and closed.
8. **One seek to the committed offsets at a time** (``Consumer.perform_seek``): two that
   overlapped after a rebalance left the fetch positions of one and the read offsets of the
   other, which looked like skipped offsets to (5) and restarted the worker.
9. **A paused partition stays paused while its agent's queue drains** (``Consumer``'s
   ``pause_partitions``, ``on_buffer_full``): a drain could make a
   partition that a rebalance had paused active again, before recovery sought it.
11. **Batches without polling** (``Stream.take_events``): an agent waiting for its next batch
   woke every batch window (2 ms) with nothing to do, a tenth of a core for an idle worker and
   a quarter of a busy one's CPU per signal (``bench/README.md``); it now waits for the first
   event, then the window, as before, but no longer than the consumer has records in hand
   (``Consumer.getmany``): once every fetched record is in the agents' queues and the agent's
   queue is empty, more can only come with the next fetch, and the batch goes.
12. **One persisted-offset write per changelog partition and produce round**
   (``Collection._on_changelog_sent``): Faust writes the changelog offset into the partition's
   RocksDB after every acknowledged table write; the acks of one produce response arrive
   together, and only the highest offset of each partition is kept, so it is written once,
   on the next turn of the event loop.  (At-least-once only: a crash in between replays a
   few more changelog records, which rewrite the same values.)

Reading tables: :func:`table_get` reads a table with one store lookup where ``Table.get``
made two (``key in store``, then ``store[key]``) and went through Faust's sensors;
:func:`stored_items` hands out a table's stored bytes undecoded (the open-orders index is
rebuilt from them).

Proof of each, and its control (Faust's or mode's own code run in the same scenario, showing
the fault; the patched test also fails when the patch is not installed).  Faults (1, 2, 5, 7,
8, 9, 11) are in Faust's and mode's code, before any broker, so their controls need no server;
on Apache Kafka the chaos tests (``tests/test_chaos.py``, which also assert that (5) never
fired) guard them end to end.  (4) works around Tansu and acts only in the local profile:
the production profile (Apache Kafka) keeps Faust's method.  (3) acts in both (its control
on Apache Kafka: a consumer with Faust's wait leaves a record unfetched).  (10) is a speed-up,
not a fault: its control is Faust's own replay of the same changelogs, which must leave the
same tables and persisted offsets.

===  =====================================================  ===========  ==========================
#    test                                                   broker       control
===  =====================================================  ===========  ==========================
1    test_faust_patches.py::test_recovery_seeks_...         none         Faust resumes, then seeks
2    test_faust_patches.py::test_one_partition_waiting_...  none         Faust's queue holds all
     (test_batch.py: order within a lane, flush)
3    test_faust_patches.py::test_a_record_waits_for_...     Kafka        Faust's 1,500 ms wait
     (bench/fetch_wait.py: Tansu's latency per hop; bench/idle.py, bench/latency.py)
4    test_kafka_io.py::test_end_offsets_are_right_...       Tansu        Tansu's short ListOffsets
     (and the production-profile test of 3)
5    test_faust_patches.py::test_a_skipped_range_...        none         Faust commits the gap
     (test_batch.py: retention, changelogs)
6    test_kafka_io.py::test_the_consumer_thread_hands_...   Kafka        Faust hands records over
     (test_faust_patches.py::test_a_partition_paused_after_   none         Faust's pause yields them
     the_hand_over_...: getmany, with 9)
7    test_faust_patches.py: table manager, worker stop      none         1 s, and >= 2 s to stop
8    test_faust_patches.py::test_concurrent_seeks_...       none         read offsets != positions
9    test_faust_patches.py::test_a_paused_partition_...     none         drain re-activates it
10   test_faust_patches_recovery.py::test_bulk_recovery_..  Kafka        Faust's replay (setting off)
     (test_faust_patches.py: it stops writing when a        none         the same tables' contents
     rebalance begins; bench/recovery.py: records/s)
11   test_faust_patches.py::test_an_idle_agent_does_...     none         Faust wakes every window
     (bench/idle.py, bench/throughput.py: CPU)
12   test_faust_patches.py::test_one_offset_write_per_...   none         one write per record
     (test_faust_patches_recovery.py: recovery from them)
===  =====================================================  ===========  ==========================
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from typing import Any, Callable

from faust.stores.base import SerializedStore
from faust.streams import Stream, _tracks_buffer_agen
from faust.tables.base import Collection
from faust.tables.manager import TableManager
from faust.tables.recovery import Recovery
from faust.transport.consumer import Consumer
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.producer import ProducerBuffer
from mode import Service
from mode.utils.aiter import aiter
from mode.utils.futures import notify
from mode.utils.times import want_seconds
from mode.worker import Worker

from app.kafka_io import end_offsets
from app.settings import Settings

__all__ = [
    "install", "read_offset", "read_offsets", "committed_offset", "active_partitions", "paused_partitions",
    "buffered_partitions", "aiokafka_client", "partition_debug_view", "agent_queues", "bulk_eligible",
    "BULK_START", "BULK_DONE", "table_get", "stored_items",
]

log = logging.getLogger(__name__)


#: The versions these changes were written and tested against (pinned in pyproject.toml).
PINNED = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0", "mode-streaming": "0.7.1"}


def check_versions(installed: Callable[[str], str] | None = None) -> None:
    """Refuse to patch other versions of Faust, aiokafka or mode than the pinned ones: the
    patched internals change between releases."""
    from importlib.metadata import version

    installed = installed or version
    wrong = {name: installed(name) for name in PINNED if installed(name) != PINNED[name]}
    if wrong:
        raise RuntimeError(f"app.faust_patches is written against {PINNED}, not {wrong}: review it, then the pins")


def install(settings: Settings) -> None:
    """Apply every change below; the two broker-dependent ones and (10) follow ``settings``."""
    check_versions()
    Recovery._resume_streams = _resume_streams  # type: ignore[method-assign]
    Recovery.on_recovery_completed = _on_recovery_completed  # type: ignore[method-assign]
    _install_lanes()
    Consumer._add_gap = _add_gap  # type: ignore[method-assign]
    AIOKafkaConsumerThread._fetch_records = _fetch_records  # type: ignore[method-assign]
    TableManager.on_start = _table_manager_on_start  # type: ignore[method-assign]
    Worker._gather_all = _gather_all  # type: ignore[method-assign]
    Worker._sentinel_task = _sentinel_task  # type: ignore[method-assign]
    Consumer.perform_seek = _perform_seek  # type: ignore[method-assign]
    Consumer.pause_partitions = _pause_partitions  # type: ignore[method-assign]
    Consumer.on_buffer_full = _on_buffer_full  # type: ignore[method-assign]
    Recovery._seek_offsets = _seek_offsets  # type: ignore[method-assign]
    Recovery.on_partitions_revoked = _on_partitions_revoked  # type: ignore[method-assign]
    Stream.take_events = _take_events  # type: ignore[method-assign]
    Consumer.getmany = _getmany  # type: ignore[method-assign]
    Collection._on_changelog_sent = _on_changelog_sent  # type: ignore[method-assign]
    _set_bulk(bool(settings.effective("bulk_recovery")), settings)
    _set_consumer(
        fetch_max_wait_ms=settings.effective("consumer_fetch_max_wait_ms"),
        check_end_offsets=bool(settings.effective("broker_end_offsets_check")),
    )


# --- 1. recovery ------------------------------------------------------------------------
# After a rebalance Faust recovers the tables, then (``Recovery.on_recovery_completed``, or
# ``Recovery._resume_streams`` when nothing needed recovering) resumes the stream (non-changelog)
# partitions, **then** seeks them to their committed offsets and resumes the flow.  A worker
# whose tables needed recovery (a restart with its volume, e.g. after SIGKILL) is already
# fetching changelogs at that point, so between the resume and the seek it fetches stream
# records from wherever its position was; they reach the agents' queues or are raced against
# the still-suspended flow, the queues are cleared when the flow resumes, and the first record
# read after the seek can lie beyond the committed offset.  Faust takes the skipped offsets
# for a gap, counts them as acknowledged and commits past them: those records are never
# processed.  Seen in the worker chaos test (``tests/test_chaos.py``) as signals with no order
# and no event, their offsets committed; instrumented, the restarted worker handled the record
# at the committed offset, logged a gap over the next ones and went on after them.
#
# Here the partitions are sought while still paused, the flow is resumed, and only then are
# they resumed, so the first records fetched are those at the committed offsets.  Everything
# else is Faust's code unchanged.


#: Faust's own, for the control tests (tests/test_faust_patches.py).
_faust_resume_streams = Recovery._resume_streams
_faust_on_recovery_completed = Recovery.on_recovery_completed


async def _start_streams(self: Recovery, assignment: set, standbys_ready: bool) -> None:
    """Seek the paused stream partitions, resume the flow, then resume them and fetch."""
    app: Any = self.app
    consumer = app.consumer
    streams = {tp for tp in assignment if not self._is_changelog_tp(tp)}
    if assignment:
        self.log.info("Seek stream partitions to committed offsets (still paused).")
        await self._wait(consumer.perform_seek(), timeout=app.conf.broker_request_timeout)
    self.completed.set()
    self.log.info("Resuming flow...")
    app.flow_control.resume()
    consumer.resume_flow()
    if streams:
        consumer.resume_partitions(streams)
    await app._fetcher.maybe_start()
    self.tables.on_actives_ready()
    if standbys_ready:
        self.tables.on_standbys_ready()
    app.on_rebalance_end()
    self.log.info("Worker ready")


async def _resume_streams(self: Recovery, generation_id: int = 0) -> None:
    app: Any = self.app
    await app.on_rebalance_complete.send()
    assignment = app.consumer.assignment()
    if app.consumer_generation_id != generation_id:
        self.log.warning("Recovery rebalancing again")
        return
    if not assignment:
        self.log.info("Resuming streams with empty assignment")
    await _start_streams(self, assignment, standbys_ready=True)


async def _on_recovery_completed(self: Recovery, generation_id: int = 0) -> None:
    app: Any = self.app
    self.log.info("Restore complete!")
    await app.on_rebalance_complete.send()
    self._set_recovery_ended()
    callbacks = [
        asyncio.ensure_future(table.on_recovery_completed(self.actives_for_table[table], self.standbys_for_table[table]))
        for table in self.tables.values()
    ]
    if callbacks:
        await asyncio.wait(callbacks)
    assignment = app.consumer.assignment()
    if app.consumer_generation_id != generation_id:
        self.log.warning(f"Recovery rebalancing again app id {app.consumer_generation_id} param {generation_id}")
        return
    await _start_streams(self, assignment, standbys_ready=not app.assignor.assigned_standbys())


# --- 2. producer lanes ------------------------------------------------------------------
# Table writes reach Kafka through Faust's ``ProducerBuffer``: a queue drained by one task
# that hands the records to aiokafka one at a time.  aiokafka holds one open batch per
# partition; when that batch is full, the next record for the partition waits until the
# batch has left in a produce request.  Meanwhile every other partition's writes wait
# behind it in the one queue.  With ``producer_max_batch_size=1`` (one record per batch,
# the local profile's old Tansu workaround) that was every write: table writes ran at
# about one record per round trip.  With 16 KiB batches it happens when a batch fills.
#
# Here the single drain task becomes a dispatcher: each record goes to the lane of its topic
# partition, each lane hands its records over in order (the order within a partition is
# kept), and the lanes run side by side, so one produce request carries a record for every
# partition that has one.  :attr:`ProducerBuffer.size` counts the records still in lanes,
# so ``flush()`` (which Faust awaits before committing offsets) still waits for all of them.

_original_size = ProducerBuffer.size
_faust_handle_pending = ProducerBuffer._handle_pending  # a mode ServiceTask


async def _handle_pending(self: ProducerBuffer) -> None:
    lanes: dict[tuple[int, Any], deque] = {}
    self._lane_backlog = 0  # type: ignore[attr-defined]

    async def drain(key: tuple[int, Any], lane: deque) -> None:
        try:
            while lane:
                await self._send_pending(lane[0])
                lane.popleft()
                self._lane_backlog -= 1  # type: ignore[attr-defined]
                self.message_sent.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # as in Faust: a record that cannot be produced crashes the producer
            log.exception("producer lane %s failed", key)
            await self.crash(exc)
        finally:
            if lanes.get(key) is lane:
                del lanes[key]

    while not self.should_stop:
        fut = await self.pending.get()
        self._lane_backlog += 1  # type: ignore[attr-defined]
        msg = fut.message
        key = (id(msg.channel), msg.partition)
        lane = lanes.get(key)
        if lane is None:
            lanes[key] = lane = deque((fut,))
            asyncio.ensure_future(drain(key, lane))
        else:
            lane.append(fut)


def _size(self: ProducerBuffer) -> int:
    return _original_size.fget(self) + getattr(self, "_lane_backlog", 0)


def _install_lanes() -> None:
    if getattr(ProducerBuffer, "_execution_lanes", False):
        return
    # mode collects ``@Service.task`` methods at class creation by name and looks them up
    # with ``getattr`` when the service starts, so a new ServiceTask under the same name
    # replaces what runs.
    ProducerBuffer._handle_pending = Service.task(_handle_pending)  # type: ignore[method-assign]
    ProducerBuffer.size = property(_size)  # type: ignore[method-assign, assignment]
    ProducerBuffer._execution_lanes = True  # type: ignore[attr-defined]


# --- 3 and 4. the worker's consumer: fetch wait, end offsets ------------------------------
# (4) is Tansu's: the production profile (Apache Kafka) keeps Faust's method, untouched; (3)
# sets the fetch wait of both profiles (Faust's method is put back only for a 1,500 ms wait).
_create_consumer = AIOKafkaConsumerThread._create_worker_consumer
_faust_highwaters = AIOKafkaConsumerThread._highwaters
#: The fetch wait Faust's aiokafka driver fixes (``_create_worker_consumer``).
FAUST_FETCH_MAX_WAIT_MS = 1500


def _set_consumer(fetch_max_wait_ms: int, check_end_offsets: bool) -> None:
    """Faust creates its consumer with ``fetch_max_wait_ms=1500``, fixed in its aiokafka
    driver; the value is set on the consumer before it starts, which is when aiokafka hands
    it to its fetcher.  Faust's recovery reads the changelogs' end offsets through
    ``_highwaters``; with the check on it gets them from :func:`app.kafka_io.end_offsets`.
    Each is replaced only when its setting differs from Faust's behaviour (the local
    profile), and Faust's method is put back otherwise."""

    def _create_worker_consumer(self: AIOKafkaConsumerThread, transport: Any) -> Any:
        consumer = _create_consumer(self, transport)
        consumer._fetch_max_wait_ms = fetch_max_wait_ms
        return consumer

    async def _highwaters(self: AIOKafkaConsumerThread, partitions: list) -> Mapping:
        consumer = self._ensure_consumer()
        if self.consumer.in_transaction:
            return {tp: consumer.last_stable_offset(tp) for tp in partitions}
        return await end_offsets(consumer, list(partitions), check=True)

    AIOKafkaConsumerThread._create_worker_consumer = (  # type: ignore[method-assign]
        _create_consumer if fetch_max_wait_ms == FAUST_FETCH_MAX_WAIT_MS else _create_worker_consumer)
    AIOKafkaConsumerThread._highwaters = _highwaters if check_end_offsets else _faust_highwaters  # type: ignore[method-assign]


# --- 5. skipped offsets ----------------------------------------------------------------------
# Faust's consumer remembers the last offset it read per partition; when the next record it
# reads is further on, it records the offsets between as a "gap" and counts them as acknowledged
# (``Consumer._add_gap``, ``_new_offset``): right for compacted topics and transaction
# markers, where offsets really are missing.  Our input topics have neither, so a gap means
# the fetch position ran ahead of what was processed.  Seen in the worker chaos test
# (5,000 signals, SIGKILLs): after a restart the consumer read orders.commands[0] at 361 right
# after seeking to 158, and in another run 1,059 signals of one partition were committed
# without orders.  The cause found later is fixed by (6); this stays as the safety net for
# any other way a fetch can run ahead.  The skipped records cannot be re-read in place
# (Faust drops records below its read offset), so the worker exits with the watchdog's
# restart code before anything past the gap is acknowledged: the restart resumes from the
# committed offset and reads them (a replay of records already processed is harmless: every
# effect is idempotent).  Records already deleted by retention cannot be re-read: that gap
# is logged and accepted, or a worker down for longer than the retention would restart for
# ever.
_faust_add_gap = Consumer._add_gap


async def _add_gap(self: Consumer, tp: Any, offset_from: int, offset_to: int) -> None:
    if tp.topic.endswith("-changelog"):
        await _faust_add_gap(self, tp, offset_from, offset_to)
        return
    try:
        earliest = (await self.earliest_offsets(tp)).get(tp)
    except Exception:  # the broker unreachable: assume the records are there
        earliest = None
    if earliest is not None and earliest > offset_from:
        log.error("%s[%s]: offsets %d..%d were deleted (retention) before they were processed; going on "
                  "from %d", tp.topic, tp.partition, offset_from, earliest - 1, earliest)
        await _faust_add_gap(self, tp, offset_from, offset_to)
        return
    log.error("%s[%s]: the fetch skipped offsets %d..%d (last read %s, committed %s); exiting to re-read "
              "them from the committed offset", tp.topic, tp.partition, offset_from, offset_to - 1,
              self._read_offset.get(tp), self._committed_offset.get(tp))
    from app.watchdog import exit_for_restart  # here: app.watchdog imports this module

    exit_for_restart()


# --- 6. what the consumer thread fetches ------------------------------------------------------
# Faust's consumer asks its consumer thread for records of ``active_partitions``: the live set
# the main thread keeps (``Consumer._active_partitions``), checked non-empty there, read by the
# thread when its turn comes.  aiokafka's ``Fetcher.fetched_records(partitions)`` treats an
# *empty* collection as "every assigned partition", and drains records for each into the
# answer, moving its fetch position past them.  When the set empties in between (recovery
# pauses the changelog partitions it has finished while the stream partitions are still
# paused), the thread hands over the stream partitions' records, Faust's ``getmany`` drops
# them (not active) and aiokafka's position now lies past records nobody processed.  The
# thread runs two calls at a time (mode's ``MethodQueue``), so such a fetch runs beside
# recovery's seek, which goes partition by partition (one OffsetFetch round trip each): a
# partition sought before the drain went on from past its committed offset: the worker read
# orders.commands[2] from 522 after seeking to 190, and (5) caught it.  Captured with the 5,000-signal chaos test:
# "fetched with empty active set: orders.commands[2] 190..521, ... (all paused)", then the gap
# 191..522.  A first fix handed aiokafka a snapshot of the set taken when the call began:
# the right set at that moment, but aiokafka's ``fetched_records`` waits for records, and
# when a rebalance begins meanwhile it waits for the new assignment (no timeout) and then
# goes on with the partitions it was given.  A call begun before a rebalance thus handed
# over, after it, the records of every stream partition the new assignment kept, still
# paused for recovery, between two of recovery's per-partition seeks; Faust dropped them, and
# the partitions already sought went on from past their committed offsets (two workers, one
# SIGKILLed at a time: "orders.commands[0] skipped 70..113, last read 69"; instrumented, a
# fetch of all eight stream partitions at 09:17:24.522 with the seeks at .495-.517 and
# .529-.534).  Here aiokafka gets a view of the live set that is never empty to it and
# answers "is this partition active" when it hands records over: a partition paused while
# the call waits gets nothing handed over.  A partition paused between the hand-over and
# Faust's ``getmany`` (a few lines of the main thread) is still dropped there (getmany reads
# the live set at each record, and the pause (9) unbuffers the partition:
# test_faust_patches.py::test_a_partition_paused_after_the_hand_over_...), but its pause came
# before recovery's seek of it (1), which puts the position back.


class _ActiveNow:
    """Faust's set of active partitions as aiokafka's ``fetched_records`` reads it: never
    empty (an empty collection means "every partition" there) and read at each hand-over."""

    __slots__ = ("live",)

    def __init__(self, live: Any) -> None:
        self.live = live

    def __bool__(self) -> bool:
        return True

    def __contains__(self, tp: Any) -> bool:
        return tp in self.live

    def __iter__(self) -> Any:
        return iter(tuple(self.live))


_faust_fetch_records = AIOKafkaConsumerThread._fetch_records


async def _fetch_records(self: AIOKafkaConsumerThread, consumer: Any, active_partitions: Any,
                         timeout: float | None = None, max_records: int | None = None) -> Any:
    """Faust's own, with the live view of the set; nothing when the set is empty as it starts."""
    if active_partitions is None:  # a client-only app: every partition
        return await _faust_fetch_records(self, consumer, None, timeout=timeout, max_records=max_records)
    if not active_partitions:
        return {}
    return await _faust_fetch_records(self, consumer, _ActiveNow(active_partitions), timeout=timeout,
                                      max_records=max_records)


# --- 7. no fixed sleeps at start and stop -------------------------------------------------
# Faust's table manager sleeps 1 s as it starts, so that tables defined late (by code that
# runs after the app was created) are registered before the consumer subscribes; a table
# added after that raises "Too late to add tables".  Ours are all defined at import
# (tables/definitions.py, before the worker starts), so the sleep only delayed every start.
# mode's worker, once the app has stopped (offsets committed, producer flushed, tables
# closed, group left), waits up to 1 s for the tasks still around, cancels them and sleeps
# another second before closing the loop: 2 s of every graceful stop, a rolling restart or a
# rebalance handed over to a stopping pod waits for nothing.  Here the tasks get 0.1 s, and
# the cancelled ones a few loop turns to unwind.  Together with the local profile's shorter
# session (``broker_session_timeout``), a worker starts in 3.6 s instead of 6.2, stops in 0.4 s
# instead of 2.3, and a SIGKILLed one is back in 9.5 s instead of 13.


_faust_table_manager_on_start = TableManager.on_start
_mode_gather_all = Worker._gather_all
_mode_sentinel_task = Worker._sentinel_task


async def _table_manager_on_start(self: TableManager) -> None:
    if not self.should_stop:
        await self._update_channels()
        await self.recovery.start()


def _gather_all(self: Worker) -> None:
    for _ in range(10):
        if not asyncio.all_tasks(loop=self.loop):
            break
        self.loop.run_until_complete(asyncio.sleep(0.01))
    for task in asyncio.all_tasks(loop=self.loop):
        task.cancel()


async def _sentinel_task(self: Worker) -> None:
    await asyncio.sleep(0.05)


# --- 8. one seek to the committed offsets at a time ------------------------------------------
# Faust seeks every partition to its committed offset from two places: its fetch loop, when
# records come back after the flow was stopped (a rebalance began while it fetched), and
# recovery, before the stream partitions are resumed (1).  Both run through the consumer
# thread, which runs two calls at a time, so after a rebalance they can overlap.  A seek
# moves the fetch positions partition by partition (one OffsetFetch round trip each, retried
# while the group rebalances) and sets Faust's read offsets for all of them at the end.  If
# the committed offset moves between the two (records processed before the rebalance are
# committed late, as Faust does after a revoke), the slower seek can leave the position
# where the other put it and the read offset where it read it: a worker that had just been
# sought and resumed read signals.approved[0] at 114 with its read offset at 100, took
# 101..113 for a gap, and (5) restarted it (tests/test_chaos.py, two workers, one SIGKILLed
# at a time).  That log fits this sequence and fits (6)'s second cause as well; instrumented
# runs showed two seeks after most rebalances, the fetch loop's finishing as late as 6 s
# after the revoke; tests/test_faust_patches.py reproduces the race on Faust's own
# perform_seek.  Read offset behind the position: a false gap and a needless restart; ahead
# of it: the records between are skipped as already read (harmless only because a committed
# offset lies behind them).
# Here a seek waits for the one before it, so positions and read offsets come from the same
# OffsetFetch answers; the later seek wins both.


_faust_perform_seek = Consumer.perform_seek


async def _perform_seek(self: Consumer) -> None:
    lock = getattr(self, "_execution_seek_lock", None)
    if lock is None:
        lock = self._execution_seek_lock = asyncio.Lock()  # type: ignore[attr-defined]
    async with lock:
        await _faust_perform_seek(self)


# --- 9. a paused partition stays paused while its agent's queue drains --------------------------
# When an agent's queue is under pressure Faust stops fetching the partition whose record
# filled it: ``on_buffer_full`` moves it from the active to the "buffered" set, and
# ``on_buffer_drop``, called when the queue has drained to half, moves it back to the active
# set.  Neither looks at the paused set, and pausing does not empty the buffered set.  A
# rebalance under a backlog pauses every stream partition until recovery has sought it to
# its committed offset (1), and clears the agents' queues; the queue's next read then runs
# the pending drain callbacks, which can make a paused, buffered partition active again: the
# consumer thread fetches it and Faust's ``getmany`` (which passes on records of active *or
# buffered* partitions) hands its records to the agent before the seek: a false gap as in
# (6) and (8), or, for a partition already sought, a jump past its committed offset.  Found
# by reading Faust's code while chasing (6), not seen in a log (the instrumented runs logged
# no such drain at the failures (6) explains).  Here pausing a partition takes it out of the
# buffered set too and a paused partition is never marked buffered, so a drain, which only
# re-activates buffered partitions, cannot make a paused one active: only
# ``resume_partitions`` does.


_faust_pause_partitions = Consumer.pause_partitions
_faust_on_buffer_full = Consumer.on_buffer_full


def _pause_partitions(self: Consumer, tps: Any) -> None:
    tpset = set(tps)
    _faust_pause_partitions(self, tpset)
    self._buffered_partitions.difference_update(tpset)


def _on_buffer_full(self: Consumer, tp: Any) -> None:
    if tp not in self._paused_partitions:
        _faust_on_buffer_full(self, tp)


# --- 10. bulk changelog replay ---------------------------------------------------------------
# Faust replays a changelog record by record: its consumer thread hands each one to the main
# thread, the conductor turns it into an Event (decoding the value with the table's codec: a
# pydantic model per record, thrown away), an asyncio queue passes it to ``_slurp_changelogs``,
# which per record logs two eager f-strings, awaits ``table.on_changelog_event``, recomputes
# ``need_recovery()`` over every partition and re-arms a ``wait_for`` timer, and every 1,000
# records ``Store.apply_changelog_batch`` writes them: one RocksDB WriteBatch per partition and
# the persisted offset.  That write is the only part that matters, and py-spy puts it at 2.5 %
# of the main thread's samples; the main thread is busy all along and manages ~4,000 records/s
# (bench/README.md, "Bulk changelog replay").
#
# Here, when recovery seeks the active changelog partitions (``Recovery._seek_offsets``, after
# it has read their highwaters, start offsets and checked their consistency), each partition
# with records to replay is read directly by a plain aiokafka consumer of its own (assigned,
# no group, sought to the partition's start offset + 1, large fetches) up to the highwater
# Faust read (on Tansu the fetch-checked one, (4)), and each fetched run of records is
# written as Faust writes it: the raw key and value bytes into the table's RocksDB partition
# DB, a delete for a tombstone, and the persisted offset (the last record's offset), all in
# one WriteBatch.  Faust's active offsets move with the writes, so Faust's seek that follows
# puts its consumer at the end and ``need_recovery()`` finds nothing left: Faust's replay does
# nothing, or replays only what the bulk left, from where it stopped.  So stopping early is
# always safe, and the bulk stops (nothing written after the stop) when
#
# * a rebalance begins (``Recovery.on_partitions_revoked``, a new generation or a new
#   recovery signalled): checked right before every write, with no await between the check
#   and the write; the DB is looked up at each write (a revoked partition's DB is closed);
#   Faust's ``_wait`` cancels it at an await, between whole WriteBatches;
# * its time is up: Faust runs the seek under ``broker_request_timeout`` and takes a timeout
#   for a stop of the service, so the bulk gives itself half of it and Faust's replay reads
#   the rest (a log line says so);
# * a partition makes no progress for a while, a record has no key, or anything fails
#   (logged; Faust's replay reads the rest).
#
# Faust's own replay task (``_slurp_changelogs``) keeps running meanwhile: records of these
# partitions fetched before the rebalance can still be in its queue (it is cleared only when
# the flow resumes, after the seek).  It takes a record only past the partition's active
# offset and moves that offset, as the bulk does, so each record is taken by one of them, in
# offset order; but it applies what it took only when its buffer is flushed.  So before each
# write the bulk flushes Faust's buffers: what Faust took (lower offsets) reaches RocksDB
# before what the bulk took after it, never over it.  (For the same reason the bulk writes
# with RocksDB's write-ahead log, as Faust does: without it, measured 1.2 us/record cheaper,
# a crash could keep Faust's logged writes of an offset without the bulk's records below it.)
#
# Only tables whose replay is exactly that write take part: a RocksDB store on rocksdict,
# Faust's own ``Collection.apply_changelog_batch``, ``Store.apply_changelog_batch`` and
# ``on_changelog_event`` and no ``on_changelog_event`` callback (so no side effect of
# Faust's replay is skipped: ours, tables/definitions.py, have none), not global, and a
# recovery buffer > 1; and never with ``exactly_once`` (transactions: Faust reads the last
# stable offset).  Anything else is left to Faust.  Standby partitions are left to Faust as
# well (they are read continuously, not replayed once).  ``bulk_recovery`` (app/settings.py)
# turns it off.

from faust.stores.rocksdb import Store as _RocksStore  # noqa: E402
from faust.tables.base import Collection as _Collection  # noqa: E402

_faust_seek_offsets = Recovery._seek_offsets
_faust_on_partitions_revoked = Recovery.on_partitions_revoked

#: Log lines of the bulk replay (bench/recovery.py reads them).
BULK_START = "Bulk changelog replay: reading"
BULK_DONE = "Bulk changelog replay: done"


class _Bulk:
    enabled = False
    #: aiokafka connection options (bootstrap servers, credentials): Settings.aiokafka_common().
    options: dict[str, Any] = {}
    fetch_max_wait_ms = 100
    #: Per partition and per fetch.  Measured on Kafka (4 partitions): 1-2 MiB per partition
    #: replays faster than 8 (the next fetch is under way sooner); 64 MiB never binds.
    max_partition_fetch_bytes = 2 * 1024 * 1024
    fetch_max_bytes = 64 * 1024 * 1024
    #: Seconds without progress on a partition before it is left to Faust.
    idle_seconds = 10.0
    #: Records replayed by the bulk since the process started (tests, /metrics).
    records = 0


def _set_bulk(enabled: bool, settings: Settings) -> None:
    _Bulk.enabled = enabled
    _Bulk.options = settings.aiokafka_common() if enabled else {}
    _Bulk.fetch_max_wait_ms = min(int(settings.effective("consumer_fetch_max_wait_ms")), 100)


def bulk_eligible(table: Any) -> bool:
    """Whether Faust's replay of ``table`` is exactly the raw write the bulk replay makes."""
    store = table.data
    return (
        isinstance(store, _RocksStore) and bool(getattr(store, "use_rocksdict", False))
        and type(store).apply_changelog_batch is _RocksStore.apply_changelog_batch
        and type(table).apply_changelog_batch is _Collection.apply_changelog_batch
        and type(table).on_changelog_event is _Collection.on_changelog_event
        and getattr(table, "_on_changelog_event", None) is None
        and not getattr(table, "is_global", False) and getattr(table, "recovery_buffer_size", 0) > 1
    )


def _on_partitions_revoked(self: Recovery, revoked: Any) -> None:
    self._execution_revokes = getattr(self, "_execution_revokes", 0) + 1  # type: ignore[attr-defined]
    _faust_on_partitions_revoked(self, revoked)


async def _seek_offsets(self: Recovery, consumer: Any, tps: Any, offsets: Any, title: str) -> None:
    if title == "active" and _Bulk.enabled and tps:
        try:
            await _bulk_replay(self, set(tps), offsets)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - what was written is consistent; Faust reads the rest
            log.exception("bulk changelog replay failed; Faust's replay reads the rest")
    await _faust_seek_offsets(self, consumer, tps, offsets, title)


async def _bulk_replay(self: Recovery, tps: set, offsets: Any) -> int:
    """Replay the active changelog partitions ``tps`` up to their highwaters into RocksDB,
    moving ``offsets`` (Faust's active offsets: the last offset applied) with the writes."""
    import rocksdict
    from aiokafka import AIOKafkaConsumer, TopicPartition

    app: Any = self.app
    if "exactly_once" in str(app.conf.processing_guarantee):
        return 0
    work: dict[Any, tuple[Any, Any, int]] = {}  # aiokafka tp -> (Faust tp, table, highwater)
    for tp in tps:
        table = self.tp_to_table.get(tp)
        highwater, start = self.active_highwaters.get(tp), offsets.get(tp)
        if table is None or highwater is None or start is None or highwater - start <= 0:
            continue
        if bulk_eligible(table):
            work[TopicPartition(tp.topic, tp.partition)] = (tp, table, highwater)
    if not work:
        return 0
    total = sum(hw - offsets[tp] for tp, _, hw in work.values())
    revokes, generation = getattr(self, "_execution_revokes", 0), app.consumer_generation_id

    def rebalancing() -> bool:
        return (getattr(self, "_execution_revokes", 0) != revokes or app.consumer_generation_id != generation
                or self.signal_recovery_start.is_set() or self.should_stop)

    started = time.monotonic()
    deadline = started + float(app.conf.broker_request_timeout) / 2
    self.log.info("%s %d records of %d changelog partitions", BULK_START, total, len(work))
    kafka = AIOKafkaConsumer(
        **_Bulk.options, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
        fetch_max_wait_ms=_Bulk.fetch_max_wait_ms, max_partition_fetch_bytes=_Bulk.max_partition_fetch_bytes,
        fetch_max_bytes=_Bulk.fetch_max_bytes, client_id=f"{app.conf.id}-bulk-recovery",
    )
    applied = 0
    why = "complete"
    await kafka.start()
    try:
        kafka.assign(list(work))
        for atp, (tp, _, _) in work.items():
            kafka.seek(atp, max(0, offsets[tp] + 1))
        pending = set(work)
        progress = {atp: started for atp in work}
        while pending:
            if rebalancing():
                why = "stopped: a rebalance began"
                break
            now = time.monotonic()
            if now > deadline:
                why = "stopped: out of time"
                break
            stalled = {atp for atp in pending if now - progress[atp] > _Bulk.idle_seconds}
            if stalled:
                log.warning("bulk changelog replay: no progress on %s; Faust's replay reads them", sorted(stalled))
                pending -= stalled
                if not pending:
                    break
            batches = await kafka.getmany(*pending, timeout_ms=500)
            await asyncio.sleep(0)  # aiokafka's fetch task sends the next requests before the writes
            if rebalancing():  # nothing of this fetch is written
                why = "stopped: a rebalance began"
                break
            for atp, records in batches.items():
                tp, table, highwater = work[atp]
                store = table.data
                batch = rocksdict.WriteBatch(raw_mode=True)
                seen, last, n = offsets[tp], None, 0
                for r in records:
                    if r.offset > highwater:
                        break
                    if r.offset <= seen:
                        continue
                    if r.key is None:  # Faust's replay fails on it; leave the partition to it
                        pending.discard(atp)
                        break
                    if r.value is None:
                        batch.delete(r.key)
                    else:
                        batch.put(r.key, r.value)
                    last, n = r.offset, n + 1
                if last is not None:
                    if any(self.buffers.values()):  # Faust's records claimed before these: first
                        self.flush_buffers()
                    batch.put(store.offset_key, str(last).encode())
                    store._db_for_partition(tp.partition).write(batch)
                    offsets[tp] = last
                    applied += n
                    progress[atp] = time.monotonic()
                if offsets[tp] >= highwater:
                    pending.discard(atp)
            for atp in list(pending):  # past the highwater without a record there (markers)
                if await kafka.position(atp) > work[atp][2]:
                    pending.discard(atp)
    finally:
        await kafka.stop()
        _Bulk.records += applied
    seconds = time.monotonic() - started
    left = sum(max(0, hw - offsets[tp]) for tp, _, hw in work.values())
    self.log.info("%s (%s): %d records in %.2f s (%.0f records/s); %d left to Faust's replay", BULK_DONE, why,
                  applied, seconds, applied / seconds if seconds > 0 else 0.0, left)
    return applied



# --- 11. batches without polling -----------------------------------------------------------
# Faust's ``Stream.take_events`` waits for a full buffer with the batch window as a timeout, in
# a loop: an agent with nothing to do wakes every ``within`` (``agent_batch_within``, 2 ms: 500
# times a second per agent), which cost an idle worker about 9 % of a core and a busy one the
# same in wake-ups that find nothing.  The same generator, but it first waits, without a
# timeout, for the first event of a batch, then up to ``within`` for the rest or a full buffer,
# and ends the wait early once the consumer's drain loop has handed every record it fetched
# to the agents (it waits for the next fetch: ``_drained``) and the agent's own queue is
# empty: at a trickle a signal no longer waits out the window for records that cannot come
# before the next fetch; under load a batch still takes everything fetched meanwhile.


class _Drained:
    """Whether the consumer's drain loop holds no fetched record (it waits for the next
    fetch), and the batches to tell when that becomes true."""

    def __init__(self) -> None:
        self.is_set = True
        self.waiters: set[asyncio.Event] = set()

    def set(self) -> None:
        if not self.is_set:
            self.is_set = True
            for waiter in self.waiters:
                waiter.set()


_drained = _Drained()
_faust_getmany = Consumer.getmany


async def _getmany(self: Consumer, timeout: float) -> AsyncGenerator[Any, None]:
    # Called by the drain loop once the records of the last call are all delivered.
    _drained.set()
    first = True
    async for item in _faust_getmany(self, timeout=timeout):
        if first:
            _drained.is_set = first = False
        yield item


_faust_take_events = Stream.take_events


@_tracks_buffer_agen
async def _take_events(self: Stream, max_: int, within: Any) -> AsyncGenerator[Sequence[Any], None]:
    buffer: list[Any] = []
    events: list[Any] = []
    buffer_full = asyncio.Event()
    buffer_consumed = asyncio.Event()
    buffer_started = asyncio.Event()  # set by the first event of a batch
    wake = asyncio.Event()  # the buffer is full, or nothing more can come before the next fetch
    channel = self.channel

    def nothing_more() -> bool:
        """Every fetched record is delivered and none waits in this agent's queue."""
        return _drained.is_set and channel.empty()
    timeout = want_seconds(within) if within else None
    stream_enable_acks: bool = self.enable_acks
    buffer_consuming: asyncio.Future | None = None
    channel_it = aiter(self.channel)

    async def add_to_buffer(value: Any) -> Any:
        try:
            nonlocal buffer_consuming
            if buffer_consuming is not None:
                try:
                    await buffer_consuming
                finally:
                    buffer_consuming = None
            buffer.append(value)
            event = self.current_event
            if event is None:
                raise RuntimeError("Take buffer found current_event is None")
            events.append(event)
            buffer_started.set()
            if nothing_more():
                wake.set()  # the last record fetched is in the batch
            if len(buffer) >= max_:
                buffer_full.set()
                wake.set()
                buffer_consumed.clear()
                await self.wait(buffer_consumed)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.log.exception("Error adding to take buffer: %r", exc)
            await self.crash(exc)
        return value

    self.enable_acks = False
    self.add_processor(add_to_buffer)
    self._enable_passive(channel_it)
    try:
        while not self.should_stop:
            await self.wait_for_stopped(buffer_started)  # type: ignore[arg-type]
            if timeout is not None:
                deadline = self.loop.time() + timeout
                _drained.waiters.add(wake)
                try:
                    while not buffer_full.is_set() and not nothing_more():
                        remaining = deadline - self.loop.time()
                        if remaining <= 0:
                            break
                        wake.clear()
                        await self.wait_for_stopped(wake, timeout=remaining)  # type: ignore[arg-type]
                finally:
                    _drained.waiters.discard(wake)
            else:
                await self.wait_for_stopped(buffer_full)  # type: ignore[arg-type]
            if buffer:
                buffer_consuming = self.loop.create_future()
                try:
                    yield list(events)
                finally:
                    buffer.clear()
                    for event in events:
                        await self.ack(event)
                    events.clear()
                    notify(buffer_consuming)
                    buffer_full.clear()
                    buffer_started.clear()
                    buffer_consumed.set()
    finally:
        self.enable_acks = stream_enable_acks
        self._processors.remove(add_to_buffer)


# --- 12. persisted offsets ---------------------------------------------------------------
# Faust's callback for an acknowledged changelog record writes its offset into the
# partition's RocksDB (``set_persisted_offset``): a RocksDB put per table write.  Here the
# callback keeps the highest offset per (store, partition) and one call scheduled on the loop
# writes them all.  Offsets are written after their records' acks, as before, so recovery
# never skips a record; at most it replays some it already has.

_faust_on_changelog_sent = Collection._on_changelog_sent
_pending_offsets: dict[tuple[int, Any], tuple[Any, Any, int]] = {}


def _on_changelog_sent(self: Collection, fut: Any) -> None:
    if self.app.in_transaction:
        _faust_on_changelog_sent(self, fut)
        return
    res = fut.result()
    if not _pending_offsets:
        asyncio.get_running_loop().call_soon(_write_offsets)
    slot = (id(self.data), res.topic_partition)
    held = _pending_offsets.get(slot)
    if held is None or held[2] < res.offset:
        _pending_offsets[slot] = (self.data, res.topic_partition, res.offset)


def _write_offsets() -> None:
    pending = list(_pending_offsets.values())
    _pending_offsets.clear()
    for store, tp, offset in pending:
        try:
            store.set_persisted_offset(tp, offset)
        except Exception as exc:  # noqa: BLE001 - a missing offset only means a longer replay
            log.warning("persisted offset %s of %s not written (%r): recovery replays from the previous one",
                        offset, tp, exc)


def table_get(table: Any, key: Any) -> Any:
    """``table.get(key)`` with one store lookup (Faust's asks ``key in store`` first), without
    Faust's per-read sensor call; tables without a serialized store (Faust's memory store, a
    plain mapping) take their own ``get``."""
    store = getattr(table, "data", None)
    if not isinstance(store, SerializedStore):
        return table.get(key)
    raw = store._get(store._encode_key(key))
    return None if raw is None else store._decode_value(raw)


def stored_items(table: Any) -> Iterator[tuple[Any, Any]]:
    """The (key, value) pairs a table holds for the partitions this worker is active for, as
    stored (RocksDB bytes, undecoded); a table without a serialized store gives its items."""
    store = getattr(table, "data", None)
    if isinstance(store, SerializedStore):
        return store._iteritems()
    return iter(list(table.items()))


# --- reading Faust's and aiokafka's private state ------------------------------------------
# The rest of the service (the watchdog, /health and /metrics, app.kafka_io) reads a few of
# Faust's and aiokafka's private attributes; it does so only through these functions, so that
# every use of their internals is here, next to the pins.  They read, never write, and copy
# what they return.


def read_offset(consumer: Consumer, tp: Any) -> int | None:
    """The offset of the last record of ``tp`` Faust's consumer handed to an agent."""
    return consumer._read_offset.get(tp)


def read_offsets(consumer: Consumer) -> dict[Any, int | None]:
    """Every partition's read offset (:func:`read_offset`)."""
    return dict(consumer._read_offset)


def committed_offset(consumer: Consumer, tp: Any) -> int | None:
    """The offset Faust's consumer last committed for ``tp`` (its next record to read)."""
    return consumer._committed_offset.get(tp)


def active_partitions(consumer: Consumer) -> set:
    """The partitions Faust's consumer fetches now (neither paused nor held back by a full
    agent queue)."""
    return set(getattr(consumer, "_active_partitions", None) or ())


def paused_partitions(consumer: Consumer) -> set:
    """The partitions Faust's consumer paused (a rebalance, recovery)."""
    return set(getattr(consumer, "_paused_partitions", None) or ())


def buffered_partitions(consumer: Consumer) -> set:
    """The partitions not fetched because their agent's queue is full (Faust's backpressure)."""
    return set(getattr(consumer, "_buffered_partitions", None) or ())


def aiokafka_client(consumer: Any) -> Any:
    """An ``AIOKafkaConsumer``'s client (``AIOKafkaClient``): its cluster metadata, requests
    to one broker."""
    return consumer._client


def partition_debug_view(consumer: Consumer, tp: Any) -> dict[str, Any]:
    """What the worker's consumer knows of ``tp``, for a report: Faust's sets it is in, and
    aiokafka's fetch position, paused flag and the records fetched and not yet handed over.
    Reads the consumer thread's state without locks; aiokafka's part is replaced by the error
    when it cannot be read."""
    sets = (("active", active_partitions(consumer)), ("buffered", buffered_partitions(consumer)),
            ("paused", paused_partitions(consumer)))
    view: dict[str, Any] = {"faust": [name for name, members in sets if tp in members]}
    try:
        ak = consumer._thread._ensure_consumer()  # type: ignore[attr-defined]
        state = ak._subscription.subscription.assignment.state_value(tp)
        held = ak._fetcher._records.get(tp)
        view.update(position=state._position, aiokafka_paused=state.paused,
                    held=type(held).__name__ if held is not None else None)
    except Exception as exc:  # noqa: BLE001 - a report, never a reason to fail
        view["aiokafka"] = repr(exc)
    return view


def agent_queues(app: Any) -> dict[str, list[tuple[int, int]]]:
    """Per agent, per actor: (records in its queue, partitions waiting for the queue to drain)."""
    return {
        agent.name: [(a.stream.channel.queue.qsize(), len(a.stream.channel.queue._pending_pressure_drop_callbacks))
                     for a in agent._actors]
        for agent in app.agents.values()
    }
