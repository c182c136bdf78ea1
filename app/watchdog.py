"""Stall watchdog: a worker whose consumer stopped fetching while records wait is restarted.

Observed here with Tansu: after a worker is killed with SIGKILL and restarted, its Faust
consumer occasionally joins the group, recovers its tables, reports ready, and then never
fetches a record (every agent idle in ``stream.events()``, read offsets frozen at the
committed ones, records waiting on every partition).  Whatever the cause (broker or
client), the remedy that always works is a new consumer: the watchdog compares the
broker's end offsets with what the agents have read, and when there is lag and nothing
was read for ``stall_seconds``, it logs the evidence and exits the process with
:data:`EXIT_STALLED` so the supervisor (Kubernetes, ``app.local.Services``) starts it again.
Before that it tries the cheap cure that works in practice: partitions that were never
positioned are sought to their committed offsets once.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer

from app.kafka_io import end_offsets
from app.settings import Settings

log = logging.getLogger(__name__)

EXIT_STALLED = 75  # EX_TEMPFAIL: restart me


def exit_for_restart() -> None:
    """End the worker at once with :data:`EXIT_STALLED` (logs flushed, nothing acknowledged
    or committed on the way out): its supervisor restarts it from the committed offsets."""
    logging.shutdown()
    os._exit(EXIT_STALLED)


class Watchdog:
    def __init__(self, app: faust.App, settings: Settings, topics: list[str], stall_seconds: float = 20.0) -> None:
        self.app = app
        self.settings = settings
        self.topics = set(topics)
        self.stall_seconds = stall_seconds
        self.stalled_since: float | None = None
        self._last: dict[Any, int | None] = {}
        self._since: dict[Any, float] = {}
        self._reseeked = False
        self._probe: AIOKafkaConsumer | None = None

    async def check(self) -> bool:
        """One look; True while stalled.  Exits the process once stalled for long enough."""
        app = self.app
        if app.rebalancing or not app.tables.recovery.completed.is_set():
            self._since.clear()
            self.stalled_since = None
            return False
        # A partition paused because its agent's buffer is full (a slow agent, NATS down for
        # the notifier) is backpressure, not a stall: only unpaused partitions count.
        paused = set(getattr(app.consumer, "_paused_partitions", ()))
        tps = [tp for tp in app.assignor.assigned_actives() if tp.topic in self.topics and tp not in paused]
        if not tps:
            self._since.clear()
            self.stalled_since = None
            return False
        if self._probe is None:
            self._probe = AIOKafkaConsumer(**self.settings.aiokafka_common(), enable_auto_commit=False)
            await self._probe.start()
        end = await end_offsets(self._probe, tps, self.settings)
        now = time.monotonic()
        stuck: dict[Any, tuple[int | None, int]] = {}
        for tp in tps:
            read = app.consumer._read_offset.get(tp)
            lagging = end[tp] > ((read + 1) if read is not None else 0)
            if not lagging or read != self._last.get(tp):
                self._since.pop(tp, None)
            else:
                since = self._since.setdefault(tp, now)
                if now - since >= self.stall_seconds:
                    stuck[tp] = (read, end[tp])
            self._last[tp] = read
        self.stalled_since = min(self._since.values()) if self._since else None
        if not self._since:
            self._reseeked = False
        never_read = [tp for tp, since in self._since.items() if self._last.get(tp) is None and now - since >= self.stall_seconds / 4]
        if never_read and not self._reseeked:
            # The usual shape of the stall: partitions assigned but never positioned.  A seek
            # to the committed offsets is tried once before the restart.
            self._reseeked = True
            log.warning("partitions never fetched: %s; seeking to committed offsets",
                        sorted(f"{tp.topic}[{tp.partition}]" for tp in never_read))
            await app.consumer.seek_to_committed()
            return True
        if stuck:
            waiting = {f"{tp.topic}[{tp.partition}]": v for tp, v in sorted(stuck.items())}
            log.error("consumer stalled for %.0fs+ with records waiting (read, end): %s; exiting for a restart; "
                      "consumer state: %s", self.stall_seconds, waiting, consumer_state(app, list(stuck)))
            exit_for_restart()
        return bool(self._since)

    async def close(self) -> None:
        if self._probe is not None:
            await self._probe.stop()


def consumer_state(app: faust.App, tps: list) -> dict[str, Any]:
    """What the worker's consumer knows of ``tps`` (for the stall report): Faust's view (active,
    buffered = its agent's queue under pressure, paused), aiokafka's (fetch position, paused,
    records fetched and not yet handed over) and the agents' queues."""
    consumer: Any = app.consumer
    out: dict[str, Any] = {}
    try:
        ak = consumer._thread._ensure_consumer()
        assignment = ak._subscription.subscription.assignment
        for tp in tps:
            state = assignment.state_value(tp)
            held = ak._fetcher._records.get(tp)
            out[f"{tp.topic}[{tp.partition}]"] = {
                "faust": [name for name, tps_ in (("active", consumer._active_partitions or ()),
                                                  ("buffered", consumer._buffered_partitions),
                                                  ("paused", consumer._paused_partitions)) if tp in tps_],
                "position": state._position, "aiokafka_paused": state.paused,
                "held": type(held).__name__ if held is not None else None,
            }
        out["queues"] = {
            agent.name: [(a.stream.channel.queue.qsize(), len(a.stream.channel.queue._pending_pressure_drop_callbacks))
                         for a in agent._actors]
            for agent in app.agents.values()
        }
    except Exception as exc:  # a report, never a reason to fail
        out["error"] = repr(exc)
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
