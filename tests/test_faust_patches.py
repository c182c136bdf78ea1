"""app/faust_patches.py: (7) a stopping worker cancels what is left and closes its loop at
once, and the cancelled tasks still unwind (their ``finally`` runs) before the loop closes;
(8) seeks to the committed offsets do not overlap; (9) a paused partition stays paused while its
agent's queue drains."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from faust.transport.consumer import Consumer
from faust.types import TP
from mode.worker import Worker

from app.faust_patches import install
from app.settings import Settings


def test_a_stopped_worker_cancels_leftover_tasks_lets_them_unwind_and_closes_the_loop():
    install(Settings())

    def run() -> None:
        loop = asyncio.new_event_loop()
        worker = Worker(loop=loop, override_logging=False, redirect_stdouts=False, daemon=False)
        unwound: list[str] = []

        async def leftover() -> None:  # a task nobody stopped: a client's reader, a timer
            try:
                await asyncio.sleep(3600)
            finally:
                await asyncio.sleep(0)  # unwinding may itself await
                unwound.append("leftover")

        loop.run_until_complete(asyncio.sleep(0))
        loop.create_task(leftover())
        worker._shutdown_loop()
        result.extend([unwound, loop.is_closed()])

    result: list = []
    t = threading.Thread(target=run, daemon=True)  # mode's worker owns the thread's loop
    t.start()
    t.join(30)
    assert not t.is_alive(), "the worker's shutdown hung on a task that never ends"
    assert result == [["leftover"], True]


async def test_concurrent_seeks_leave_the_read_offsets_where_the_positions_are():
    """(8) Faust seeks to the committed offsets from two places that can overlap after a
    rebalance: its fetch loop (records came back while the flow was stopped) and recovery.
    Each seek moves the fetch positions partition by partition (an OffsetFetch round trip
    each, retried while the group rebalances), then sets every read offset at the end.  A
    slow seek that read a committed offset before a late commit finished after a fresh one:
    the positions were the fresh seek's, the read offsets the stale one's, and the first
    record read looked like a gap (the worker restarted; tests/test_chaos.py, two workers)."""
    install(Settings())
    tp, other = TP("signals.approved", 0), TP("signals.approved", 1)
    position: dict[TP, int] = {}
    late_commit_done = asyncio.Event()
    committed = {tp: 100, other: 40}

    class Thread:  # what the consumer thread's seek does: seek each partition in turn
        def __init__(self) -> None:
            self.calls = 0

        async def seek_to_committed(self) -> dict[TP, int]:
            self.calls += 1
            seen = {}
            for i, p in enumerate((tp, other)):
                if self.calls == 1 and i == 1:
                    await late_commit_done.wait()  # OffsetFetch retried while the group rebalances
                seen[p] = position[p] = committed[p]
                await asyncio.sleep(0)
            return seen

    thread = Thread()
    consumer = SimpleNamespace(_read_offset={}, _committed_offset={}, seek_to_committed=thread.seek_to_committed)
    first = asyncio.create_task(Consumer.perform_seek(consumer))  # reads 100 for tp, then waits
    await asyncio.sleep(0.01)
    committed[tp] = 115  # offsets 100..114 processed before the rebalance, committed late
    second = asyncio.create_task(Consumer.perform_seek(consumer))
    await asyncio.sleep(0.01)
    late_commit_done.set()
    await asyncio.gather(first, second)
    assert consumer._read_offset == position, "read offsets from one seek, positions from the other"


def test_a_paused_partition_stays_paused_while_its_agents_queue_drains():
    """(9) Under a backlog Faust stops fetching a partition whose agent's queue is full
    ("buffered") and fetches it again once the queue has drained.  A rebalance pauses every
    stream partition until recovery has sought it to its committed offset; a drain in
    between made a buffered partition active again, so its records were fetched and passed
    on before the seek (and looked like skipped offsets after it)."""
    install(Settings())
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
    Consumer.on_buffer_full(c, tp)  # the orders agent's queue is full: not fetched, held records passed on
    assert tp not in c._active_partitions and tp in c._buffered_partitions
    Consumer.pause_partitions(c, {tp})  # a rebalance
    assert not c.fetched()
    Consumer.on_buffer_drop(c, tp)  # the queue drains (cleared for the rebalance)
    assert not c.fetched(), "a paused partition was made active by its queue draining"
    Consumer.on_buffer_full(c, tp)  # a full queue while paused does not make it "buffered"
    assert not c.fetched()
    Consumer.resume_partitions(c, {tp})  # recovery has sought it: now it is fetched again
    assert c._active_partitions == {tp} and c.fetched()
