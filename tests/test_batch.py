"""The agents' batch (held outputs and table writes) and the producer lanes, without servers:
the integration tests run both against Tansu; these pin down the rules in milliseconds."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from faust.streams import current_event
from faust.transport.producer import ProducerBuffer
from faust.types import Message

from agents.common import BadInput, Batch, process_batch
from app import faust_patches
from app.runtime import Metrics


class Table(dict):
    """A dict that records which event was current at each write, as Faust's tables need."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[str, object, object]] = []

    def __setitem__(self, key, value):
        self.writes.append(("set", key, current_event()))
        super().__setitem__(key, value)

    def pop(self, key, default=None):
        self.writes.append(("del", key, current_event()))
        return super().pop(key, default)


class Producer:
    """Faust's producer as the batch uses it: ``send`` returns the future of the broker's ack."""

    def __init__(self, sent: dict[str, list]) -> None:
        self.sent = sent

    async def send(self, topic, key, value, partition, timestamp, headers):
        self.sent.setdefault(topic, []).append((key, value, dict(headers) if headers else None))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


class Event(SimpleNamespace):
    """Faust holds the current event by weak reference: a class instance, not a SimpleNamespace."""

    __hash__ = object.__hash__


def event(topic: str, value: bytes, offset: int) -> Event:
    return Event(value=value, message=Message(topic, 0, offset, time.time(), 0, None, b"k", value, None,
                                              time_in=time.monotonic(), generation_id=1))


def context(sent: dict[str, list]) -> SimpleNamespace:
    return SimpleNamespace(rt=SimpleNamespace(metrics=Metrics()),
                           app=SimpleNamespace(consumer_generation_id=1, producer=Producer(sent)))


def test_reads_see_earlier_writes_and_a_rollback_undoes_one_event():
    t = Table()
    t["a"] = 1
    b = Batch()
    b.put(t, "a", 2)
    assert b.get(t, "a") == 2 and t["a"] == 1, "held until commit"
    point = b.savepoint()
    b.put(t, "a", 3)
    b.delete(t, "b")
    b.put(t, "c", 4)
    b.emit(("out", "k", b"v", None))
    b.later(lambda: None)
    assert (b.get(t, "a"), b.get(t, "c")) == (3, 4)
    b.rollback(point)
    assert (b.get(t, "a"), b.get(t, "b"), b.get(t, "c")) == (2, None, None)
    assert not b.outputs and not b.after


async def test_commit_sends_then_writes_in_each_events_context_then_runs_the_follow_ups():
    t = Table()
    t["gone"] = 0
    sent: dict[str, list] = {}
    ctx = context(sent)
    order: list[str] = []
    e1, e2 = event("in", b"1", 1), event("in", b"2", 2)
    b = Batch()
    b.event = e1
    b.put(t, "x", 1)
    b.emit(("out", "x", b"x1", None))
    b.later(lambda: order.append(f"sync, {len(sent['out'])} sent, x={t.get('x')}"))
    b.event = e2
    b.delete(t, "gone")
    b.put(t, "x", 2)
    b.emit(("out", "x", b"x2", None), ("out", "y", b"y", None))

    async def follow_up() -> None:
        order.append("async")

    b.later(lambda: 1 / 0)  # a failing follow-up is logged; the others still run
    b.later(follow_up)
    await b.commit(ctx, "test")
    assert [v for _, v, _ in sent["out"]] == [b"x1", b"x2", b"y"], "same key in order"
    assert t == {"x": 2}
    assert [(op, key, ev) for op, key, ev in t.writes[1:]] == [("set", "x", e2), ("del", "gone", e2)]
    assert order == ["sync, 3 sent, x=2", "async"]
    assert current_event() is None


async def test_bad_input_in_a_batch_is_dead_lettered_alone():
    t = Table()
    sent: dict[str, list] = {}
    ctx = context(sent)

    def handler(ev, b: Batch) -> None:
        b.put(t, ev.value, 1)
        b.emit(("out", ev.value, ev.value, None))
        if ev.value == b"bad":
            raise BadInput("value: bad on purpose")
        if ev.value == b"bug":
            raise KeyError("oops")

    events = [event("in", v, i) for i, v in enumerate([b"a", b"bad", b"b", b"bug"])]
    await process_batch(ctx, events, handler, lambda ev: "in.dlq", "test")
    assert set(t) == {b"a", b"b"}
    assert [v for _, v, _ in sent["out"]] == [b"a", b"b"]
    reasons = [h["reason"] for _, _, h in sent["in.dlq"]]
    assert reasons == [b"value: bad on purpose", b"internal error: KeyError: 'oops'"]
    assert [h["offset"] for _, _, h in sent["in.dlq"]] == [b"1", b"3"]


async def test_events_from_before_a_rebalance_are_neither_handled_nor_acknowledged():
    sent: dict[str, list] = {}
    ctx = context(sent)
    handled: list[bytes] = []
    old, new = event("in", b"old", 7), event("in", b"new", 3)
    old.message.generation_id = 0  # fetched before the rebalance, still in the batch
    await process_batch(ctx, [old, new], lambda ev, b: handled.append(ev.value), lambda ev: "dlq", "test")
    assert handled == [b"new"]
    assert old.message.acked is True and new.message.acked is False, "Faust's ack of the old one becomes a no-op"

    # A rebalance while the batch commits: its events are not acknowledged either.
    def rebalance(ev, b: Batch) -> None:
        b.emit(("out", "k", ev.value, None))
        ctx.app.consumer_generation_id = 2

    late = event("in", b"late", 4)
    await process_batch(ctx, [late], rebalance, lambda ev: "dlq", "test")
    assert late.message.acked is True


async def test_producer_lanes_keep_partition_order_and_do_not_block_each_other():
    faust_patches._install_lanes()
    buf = ProducerBuffer()
    buf.app = SimpleNamespace(conf=SimpleNamespace(producer_threaded=False))
    gate = asyncio.Event()
    handed: list[tuple[int, int]] = []

    async def send_pending(fut) -> None:
        if fut.message.partition == 0:
            await gate.wait()  # partition 0's batch is full: its records wait for a request
        handed.append((fut.message.partition, fut.n))

    buf._send_pending = send_pending
    await buf.start()
    try:
        channel = object()
        for n in range(6):
            buf.put(SimpleNamespace(n=n, message=SimpleNamespace(channel=channel, partition=n % 2)))
        for _ in range(50):
            await asyncio.sleep(0)
        assert handed == [(1, 1), (1, 3), (1, 5)], "partition 1 went on while partition 0 waited"
        assert buf.size == 3, "records waiting in a lane are still in the buffer (flush waits for them)"
        gate.set()
        await asyncio.wait_for(buf.flush(), 5)
        assert buf.size == 0
        assert [n for p, n in handed if p == 0] == [0, 2, 4], "order within a partition kept"
    finally:
        await buf.stop()


async def test_a_skipped_range_on_an_input_topic_restarts_the_worker_instead_of_being_committed(monkeypatch, caplog):
    """Faust counts offsets the fetch jumped over as processed; on our input topics the worker
    exits (restart code) before anything past them is acknowledged, unless retention deleted
    them; changelog topics (compacted) keep Faust's behaviour."""
    from faust.types import TP

    from app import faust_patches, watchdog
    from app.watchdog import EXIT_STALLED

    exits: list[int] = []
    gaps: list[tuple] = []

    async def faust_gap(self, tp, a, b):
        gaps.append((tp.topic, a, b))

    monkeypatch.setattr(faust_patches, "_faust_add_gap", faust_gap)
    monkeypatch.setattr(watchdog.os, "_exit", exits.append)
    monkeypatch.setattr(watchdog.logging, "shutdown", lambda: None)

    class Consumer:
        earliest = 0
        _read_offset: dict = {}
        _committed_offset: dict = {}

        async def earliest_offsets(self, *tps):
            return {tp: self.earliest for tp in tps}

    c = Consumer()
    await faust_patches._add_gap(c, TP("signals.approved", 3), 159, 360)  # read 158, then 360
    assert exits == [EXIT_STALLED] and gaps == []
    assert "signals.approved[3]: the fetch skipped offsets 159..359" in caplog.text
    await faust_patches._add_gap(c, TP("execution-orders-changelog", 3), 10, 20)
    assert exits == [EXIT_STALLED] and gaps == [("execution-orders-changelog", 10, 20)]
    c.earliest = 300  # 159..299 deleted by retention: accepted, no restart loop
    await faust_patches._add_gap(c, TP("signals.approved", 3), 159, 360)
    assert exits == [EXIT_STALLED] and gaps[-1] == ("signals.approved", 159, 360)
