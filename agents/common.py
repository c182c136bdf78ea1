"""What every agent shares: the context it runs in, acknowledged output, dead letters, and
the batch that holds a batch of input events' effects until the broker acknowledged them.

Ordering rule of every agent, which is what makes at-least-once safe: compute the effect
with the pure logic, **send every output and wait for the broker's acks, then write the
table**.  A crash before the table write replays the input, recomputes the same records
(deterministic ids) and sends them again; consumers dedupe.  A crash after it replays an
input the table already reflects, which the logic recognises as a duplicate.

The agents apply that rule to a batch of events at a time (:class:`Batch`): each event
reads the tables through the batch (so it sees the writes of the events before it), its
outputs and table writes are held; the batch then sends all outputs at once, waits for
every ack, and only then writes the tables and runs the after-commit effects (starting a
submission).  The input offsets are acknowledged after that.  One round of acks per batch
instead of one per event is what lets the producer fill each request.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import faust
from faust.streams import _current_event

from app import retry
from app.faust_patches import table_get
from app.runtime import Runtime
from app.topics import dead_letter_of
from tables.definitions import Tables

log = logging.getLogger(__name__)


class BadInput(ValueError):
    """A record that can never be processed: it goes to a dead-letter topic with the reason."""


@dataclass
class Context:
    app: faust.App
    rt: Runtime
    tables: Tables
    topics: dict[str, faust.TopicT]

    def topic(self, name: str) -> faust.TopicT:
        return self.topics[name]


Out = tuple[str, str, bytes, dict[str, bytes] | None]  # (topic, key, value, headers)


async def send_all(ctx: Context, records: list[Out]) -> None:
    """Send records and wait until the broker acknowledged every one.

    Records with the same topic and key are handed to the producer in order (so their
    order in the partition is kept); different keys are handed over concurrently, so one
    produce request carries a record for every partition that has one waiting.  They go
    straight to Faust's producer: a ``Topic.send`` per record cost several times as much
    (its message futures and sensors), and nothing here needs them.
    """
    if not records:
        return
    chains: dict[tuple[str, Any], list[Out]] = {}
    for record in records:
        chains.setdefault((record[0], record[1]), []).append(record)
    producer = ctx.app.producer

    async def chain(items: list[Out]) -> list[asyncio.Future]:
        futures = []
        for topic, key, value, headers in items:
            futures.append(await producer.send(
                topic, key.encode() if isinstance(key, str) else key, value,
                partition=None, timestamp=None, headers=list(headers.items()) if headers else None,
            ))
        return futures

    if len(chains) == 1:
        futures = await chain(records)
    else:
        futures = [f for fs in await asyncio.gather(*(chain(c) for c in chains.values())) for f in fs]
    await asyncio.gather(*futures)


async def until_done(what: str, step: Callable[[], Awaitable[Any]]) -> Any:
    """Await ``step()`` until it succeeds, backing off 0.2 s doubling to 5 s: for effects that
    must not be dropped while a broker (Kafka, NATS) is away; ``step`` must be safe to repeat."""
    return await retry.until_done(f"{what}: not acknowledged", step, initial=0.2, maximum=5.0, logger=log)


_DELETED = object()


class Batch:
    """The held effects of a batch of input events: outputs, table writes, after-commit work.

    Handlers read tables with :meth:`get` (a value written earlier in the batch wins), and
    record effects with :meth:`emit`, :meth:`put`, :meth:`delete` and :meth:`later`.
    :meth:`savepoint` / :meth:`rollback` undo one event's effects when it turns out to be
    bad input, so a dead letter never leaves half an effect behind.

    A write remembers the event it was made for: Faust sends a table write to the
    changelog partition of the event being processed, so the commit replays each write in
    the context of its event.
    """

    def __init__(self) -> None:
        self.event: faust.EventT | None = None  # the event being handled
        self.outputs: list[Out] = []
        self.writes: dict[tuple[int, Any], tuple[Any, Any, Any, Any]] = {}
        self.after: list[Callable[[], Awaitable[Any] | None]] = []
        self._undo: list[tuple[tuple[int, Any], tuple[Any, Any, Any, Any] | None]] = []

    def get(self, table: Any, key: Any) -> Any:
        held = self.writes.get((id(table), key))
        if held is None:
            return table_get(table, key)
        return None if held[2] is _DELETED else held[2]

    def put(self, table: Any, key: Any, value: Any) -> None:
        slot = (id(table), key)
        self._undo.append((slot, self.writes.get(slot)))
        self.writes[slot] = (table, key, value, self.event)

    def delete(self, table: Any, key: Any) -> None:
        self.put(table, key, _DELETED)

    def emit(self, *records: Out) -> None:
        self.outputs.extend(records)

    def later(self, fn: Callable[[], Awaitable[Any] | None]) -> None:
        """Run ``fn`` after the batch is committed (outputs acked, tables written)."""
        self.after.append(fn)

    def savepoint(self) -> tuple[int, int, int]:
        return len(self.outputs), len(self.after), len(self._undo)

    def rollback(self, point: tuple[int, int, int]) -> None:
        n_out, n_after, n_undo = point
        del self.outputs[n_out:]
        del self.after[n_after:]
        while len(self._undo) > n_undo:
            slot, previous = self._undo.pop()
            if previous is None:
                self.writes.pop(slot, None)
            else:
                self.writes[slot] = previous

    def __bool__(self) -> bool:
        return bool(self.outputs or self.writes or self.after)

    async def commit(self, ctx: Context, what: str) -> None:
        """Send every output and wait for the acks (retrying while the broker is away: the
        records are deterministic, consumers dedupe a resend), then write the tables, then
        run the after-commit work."""
        await until_done(f"{what}: {len(self.outputs)} outputs", lambda: send_all(ctx, self.outputs))
        token = _current_event.set(None)
        try:
            for table, key, value, event in self.writes.values():
                _current_event.set(weakref.ref(event) if event is not None else None)
                if value is _DELETED:
                    table.pop(key, None)
                else:
                    table[key] = value
        finally:
            _current_event.reset(token)
        for fn in self.after:
            try:
                result = fn()
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:  # the batch is committed: one failed follow-up must not undo the rest
                log.exception("%s: after-commit step %r failed", what, fn)


async def process_batch(
    ctx: Context, events: list[faust.EventT], handler: Callable[[faust.EventT, Batch], None],
    dlq_for: Callable[[faust.EventT], str], what: str,
) -> None:
    """Run ``handler(event, batch)`` for each event, then commit the batch.

    A handler is a plain function (no I/O, nothing awaited): it reads tables through the
    batch and records effects in it.
    Bad input, and any error of a handler (a bug: retrying the same pure computation gives
    the same error), undoes that event's effects and dead-letters it with the reason; the
    rest of the batch goes on.
    """
    generation = ctx.app.consumer_generation_id
    events = [e for e in events if not _stale(e, generation)]
    observe_arrival(ctx, what, events)
    batch = Batch()
    for event in events:
        point = batch.savepoint()
        batch.event = event
        try:
            handler(event, batch)
        except Exception as exc:
            batch.rollback(point)
            dlq = dlq_for(event)
            ctx.rt.metrics.inc("dead_letters", topic=dlq)
            if isinstance(exc, BadInput):
                log.warning("%s: dead letter (%s)", what, exc)
                reason = str(exc)
            else:
                log.exception("%s: error on %s:%s@%s", what, event.message.topic, event.message.partition, event.message.offset)
                reason = f"internal error: {type(exc).__name__}: {exc}"
            batch.emit(dead_letter(dlq, event, reason))
    if batch:
        started = time.monotonic()
        await batch.commit(ctx, what)
        ctx.rt.metrics.observe_stage(what, "commit", time.monotonic() - started)
    generation = ctx.app.consumer_generation_id
    for event in events:
        _stale(event, generation)


def observe_arrival(ctx: Context, agent: str, events: list[faust.EventT]) -> None:
    """Time each record took to reach the handler, in two stages (app.runtime.STAGES): from
    its Kafka timestamp to Faust's conductor (``message.time_in``, monotonic, set by Faust's
    monitor), and from there to now."""
    if not events:
        return
    wall, mono = time.time(), time.monotonic()
    metrics = ctx.rt.metrics
    for event in events:
        message = event.message
        if message.time_in is None:
            continue
        in_faust = mono - message.time_in
        metrics.observe_stage(agent, "faust", in_faust)
        metrics.observe_stage(agent, "kafka", max(0.0, wall - message.timestamp - in_faust))


def _stale(event: faust.EventT, generation: int) -> bool:
    """True for an event fetched before the current consumer generation (a rebalance since).

    Faust's stream skips such records when it hands them out, but a batch may hold them
    across the rebalance, and ``take_events`` acknowledges whatever it yielded.  After a
    rebalance the partition was sought back to its committed offset, so acknowledging an
    old, higher offset would make Faust treat the offsets between as a gap and commit past
    records nobody processed.  The event is marked acknowledged on the message itself, which
    makes Faust's ack a no-op: it will be fetched and processed again (replays are safe).
    """
    message = event.message
    if message.generation_id == generation:
        return False
    message.acked = True
    return True


def dead_letter(dlq: str, event: faust.EventT, reason: str) -> Out:
    """The original bytes (cut when too large for a record), where they came from and why
    they are dead."""
    msg = event.message
    raw = msg.value if isinstance(msg.value, bytes) else bytes(msg.value or b"")
    value, headers = dead_letter_of(raw, reason, msg.topic, msg.partition, msg.offset)
    key = msg.key if msg.key is not None else b""
    return (dlq, key, value, dict(headers))
