"""Stall watchdog: a worker whose consumer stopped fetching while records wait is restarted.

Observed here with Tansu: after a worker is killed with SIGKILL and restarted, its Faust
consumer occasionally joins the group, recovers its tables, reports ready, and then never
fetches a record (every agent idle in ``stream.events()``, read offsets frozen at the
committed ones, records waiting on every partition).  Whatever the cause (broker or
client), the remedy that always works is a new consumer: the watchdog compares the
broker's end offsets with what the agents have read, and when there is lag and nothing
was read or committed for ``stall_seconds`` (:class:`StallTracker`), it logs the evidence
and exits the process with :data:`EXIT_STALLED` so the supervisor (Kubernetes,
``app.local.Services``) starts it again.
Before that it tries the cheap cure that works in practice: partitions that were never
positioned are sought to their committed offsets once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer

from app.faust_patches import agent_queues, committed_offset, paused_partitions, partition_debug_view, read_offset
from app.kafka_io import end_offsets
from app.settings import Settings

log = logging.getLogger(__name__)

EXIT_STALLED = 75  # EX_TEMPFAIL: restart me


def exit_for_restart() -> None:
    """End the worker at once with :data:`EXIT_STALLED` (logs flushed, nothing acknowledged
    or committed on the way out): its supervisor restarts it from the committed offsets."""
    logging.shutdown()
    os._exit(EXIT_STALLED)


class StallTracker:
    """Which partitions are stalled: records waiting (end offset past the read offset) and no
    progress for ``stall_seconds``.  Progress is the read offset *or* the committed offset
    moving: a partition whose agent's queue is full is not fetched (Faust's backpressure), so
    its read offset stands still while the agent works through the queue and commits; counting
    only reads restarted busy workers under a backlog.  The price: a real fetch stall is seen
    once the agent has also worked its queue down, up to that much later.  Plain Python, no
    clock of its own."""

    def __init__(self, stall_seconds: float) -> None:
        self.stall_seconds = stall_seconds
        self._last: dict[Any, tuple[int | None, int | None]] = {}
        self._since: dict[Any, float] = {}

    def reset(self) -> None:
        self._since.clear()

    @property
    def stalled_since(self) -> float | None:
        return min(self._since.values()) if self._since else None

    def observe(self, now: float, offsets: Mapping[Any, tuple[int | None, int | None, int]]) -> tuple[dict, list]:
        """``offsets``: per partition (read, committed, end).  Returns ({partition: (read, end)}
        stalled for ``stall_seconds``, [partitions never read and waiting for a quarter of it])."""
        stuck: dict[Any, tuple[int | None, int]] = {}
        for tp in [tp for tp in self._since if tp not in offsets]:
            del self._since[tp]
        for tp, (read, committed, end) in offsets.items():
            lagging = end > ((read + 1) if read is not None else 0)
            mark = (read, committed)
            if not lagging or mark != self._last.get(tp):
                self._since.pop(tp, None)
            else:
                since = self._since.setdefault(tp, now)
                if now - since >= self.stall_seconds:
                    stuck[tp] = (read, end)
            self._last[tp] = mark
        never_read = [tp for tp, since in self._since.items()
                      if self._last[tp][0] is None and now - since >= self.stall_seconds / 4]
        return stuck, never_read


class Watchdog:
    def __init__(self, app: faust.App, settings: Settings, topics: list[str], stall_seconds: float = 20.0) -> None:
        self.app = app
        self.settings = settings
        self.topics = set(topics)
        self.stall_seconds = stall_seconds
        self.tracker = StallTracker(stall_seconds)
        self._reseeked = False
        self._probe: AIOKafkaConsumer | None = None

    @property
    def stalled_since(self) -> float | None:
        return self.tracker.stalled_since

    async def check(self) -> bool:
        """One look; True while stalled.  Exits the process once stalled for long enough."""
        app: Any = self.app
        if app.rebalancing or not app.tables.recovery.completed.is_set():
            self.tracker.reset()
            return False
        # Partitions Faust paused (a rebalance, recovery) are not expected to move.
        paused = paused_partitions(app.consumer)
        tps = [tp for tp in app.assignor.assigned_actives() if tp.topic in self.topics and tp not in paused]
        if not tps:
            self.tracker.reset()
            return False
        if self._probe is None:
            self._probe = AIOKafkaConsumer(**self.settings.aiokafka_common(), enable_auto_commit=False)
            await self._probe.start()
        end = await end_offsets(self._probe, tps, self.settings)
        consumer = app.consumer
        stuck, never_read = self.tracker.observe(time.monotonic(), {
            tp: (read_offset(consumer, tp), committed_offset(consumer, tp), end[tp]) for tp in tps})
        if self.tracker.stalled_since is None:
            self._reseeked = False
        if never_read and not self._reseeked:
            # The usual shape of the stall: partitions assigned but never positioned.  A seek
            # to the committed offsets is tried once before the restart.
            self._reseeked = True
            log.warning("partitions never fetched: %s; seeking to committed offsets",
                        sorted(f"{tp.topic}[{tp.partition}]" for tp in never_read))
            await consumer.seek_to_committed()
            return True
        if stuck:
            waiting = {f"{tp.topic}[{tp.partition}]": v for tp, v in sorted(stuck.items())}
            log.error("consumer stalled for %.0fs+ with records waiting (read, end): %s; exiting for a restart; "
                      "consumer state: %s", self.stall_seconds, waiting, consumer_state(app, list(stuck)))
            exit_for_restart()
        return self.tracker.stalled_since is not None

    async def close(self) -> None:
        if self._probe is not None:
            probe, self._probe = self._probe, None
            await probe.stop()


def consumer_state(app: Any, tps: list) -> dict[str, Any]:
    """What the worker's consumer knows of ``tps`` (for the stall report): Faust's view (active,
    buffered = its agent's queue under pressure, paused), aiokafka's (fetch position, paused,
    records fetched and not yet handed over) and the agents' queues (size, partitions waiting
    for the pressure to drop).  Reads other threads' state without locks: a report, no more."""
    out: dict[str, Any] = {f"{tp.topic}[{tp.partition}]": partition_debug_view(app.consumer, tp) for tp in tps}
    try:
        out["queues"] = agent_queues(app)
    except Exception as exc:  # noqa: BLE001 - a report, never a reason to fail
        out["queues"] = repr(exc)
    return out


def register(app: faust.App, settings: Settings, topics: list[str], interval: float = 2.0) -> Watchdog:
    dog = Watchdog(app, settings, topics)

    @app.timer(interval, name="watchdog")
    async def watch() -> None:
        try:
            await dog.check()
        except Exception as exc:  # the watchdog never takes the worker down by mistake
            log.debug("watchdog check failed: %s", exc)

    return dog
