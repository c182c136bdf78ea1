"""The NATS → Kafka bridge against a real nats-server (JetStream) and a real Tansu broker."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import orjson
import pytest
from aiokafka.partitioner import murmur2

from app.bridge import ROUTES, Bridge, subject_matches
from app.sample import MALFORMED_CASES, malformed, signal_dict, subject_for
from app.topics import FILLS, SIGNALS_APPROVED, SIGNALS_DLQ
from support import publish, read_topic, spawn, wait_until

pytestmark = pytest.mark.tansu  # the embedded broker's path (the demo's)


def kafka_partition(key: bytes, n: int) -> int:
    """Kafka's default partitioner (the Java client's and aiokafka's)."""
    return (murmur2(key) & 0x7FFFFFFF) % n


def test_subject_matching():
    assert subject_matches("signals.approved.>", "signals.approved.EURUSD")
    assert subject_matches("signals.approved.>", "signals.approved.EURUSD.extra")
    assert not subject_matches("signals.approved.>", "signals.approved")
    assert not subject_matches("signals.approved.>", "signals.rejected.EURUSD")
    assert subject_matches("mt5.fills.*", "mt5.fills.EURUSD")
    assert not subject_matches("mt5.fills.*", "mt5.fills.EURUSD.x")


async def test_valid_signals_forwarded_and_malformed_dead_lettered(settings, stack):
    rng = random.Random(1)
    items: list[tuple[str, bytes]] = []
    expected_fields: dict[str, str] = {}  # signal_id of a malformed payload -> field its reason names
    bad_at = set(rng.sample(range(1000), 50))
    for i in range(1000):
        sid = f"sig-{i:05d}"
        if i in bad_at:
            case, payload, field = malformed(len(expected_fields), sid, rng)
            expected_fields[case + ":" + sid] = field
            items.append((f"signals.approved.{'EURUSD'}", payload))
        else:
            d = signal_dict(sid, rng)
            items.append((subject_for(d), orjson.dumps(d)))
    assert len(expected_fields) == 50

    bridge = Bridge(settings)
    await bridge.start()
    try:
        await publish(stack.nats_url, items)
        good = await read_topic(settings, SIGNALS_APPROVED, expect=950)
        dlq = await read_topic(settings, SIGNALS_DLQ, expect=50)
    finally:
        await bridge.stop()

    assert len(good) == 950
    keys = [r.key.decode() for r in good]
    assert len(set(keys)) == 950
    for r in good:
        body = orjson.loads(r.value)
        assert body["signal_id"] == r.key.decode()
        assert r.partition == kafka_partition(r.key, settings.topic_partitions)
    assert len({r.partition for r in good}) == settings.topic_partitions  # spread over all

    assert len(dlq) == 50
    originals = {payload for _, payload in items}
    fields = list(expected_fields.values())
    for r, field in zip(sorted(dlq, key=lambda r: r.value), sorted(fields)):
        assert r.value in originals  # the original bytes, untouched
        assert r.headers["subject"] == b"signals.approved.EURUSD"
        assert r.headers["reason"]
    # every reason names the bad field of its case
    reasons = [r.headers["reason"].decode() for r in dlq]
    by_case = {}
    for i in range(50):
        name, _, field = MALFORMED_CASES[i % len(MALFORMED_CASES)]
        by_case.setdefault(name, field)
    for r in dlq:
        reason = r.headers["reason"].decode()
        matching = [f for f in by_case.values() if f in reason]
        assert matching, f"reason {reason!r} names none of the bad fields"
    assert sum(1 for reason in reasons if "JSON" in reason) >= 2
    assert bridge.stats.forwarded[SIGNALS_APPROVED] == 950
    assert bridge.stats.dead_lettered[SIGNALS_DLQ] == 50


async def test_each_malformed_case_names_its_field(settings, stack):
    rng = random.Random(2)
    items = []
    for i, (name, _, field) in enumerate(MALFORMED_CASES):
        _, payload, f = malformed(i, f"bad-{i}", rng)
        assert f == field
        items.append((f"signals.approved.X{i}", payload))
    bridge = Bridge(settings)
    await bridge.start()
    try:
        await publish(stack.nats_url, items)
        dlq = await read_topic(settings, SIGNALS_DLQ, expect=len(items))
    finally:
        await bridge.stop()
    by_subject = {r.headers["subject"].decode(): r.headers["reason"].decode() for r in dlq}
    for i, (name, _, field) in enumerate(MALFORMED_CASES):
        reason = by_subject[f"signals.approved.X{i}"]
        assert field in reason, f"{name}: reason {reason!r} does not name {field}"


async def test_rejected_signals_never_reach_kafka(settings, stack):
    rng = random.Random(3)
    rejected = [("signals.rejected.EURUSD", orjson.dumps(signal_dict(f"rej-{i}", rng, symbol="EURUSD"))) for i in range(20)]
    approved = [("signals.approved.EURUSD", orjson.dumps(signal_dict(f"ok-{i}", rng, symbol="EURUSD"))) for i in range(5)]
    bridge = Bridge(settings)
    await bridge.start()
    try:
        # A stream that captures the rejected subjects exists too (as risk-mgmt would have).
        import nats

        nc = await nats.connect(stack.nats_url)
        js = nc.jetstream()
        await js.add_stream(name="SIGNALS_REJECTED", subjects=["signals.rejected.>"])
        await nc.close()
        await publish(stack.nats_url, rejected + approved)
        good = await read_topic(settings, SIGNALS_APPROVED, expect=5)
        dlq = await read_topic(settings, SIGNALS_DLQ, expect=0, idle=0.5)
    finally:
        await bridge.stop()
    assert sorted(r.key.decode() for r in good) == sorted(f"ok-{i}" for i in range(5))
    assert not any(b"rej-" in (r.value or b"") for r in good + dlq)


@pytest.mark.slow
async def test_bridge_killed_midway_loses_nothing(settings, stack, child_env, tmp_path):
    rng = random.Random(4)
    n = 2000
    items = []
    for i in range(n):
        d = signal_dict(f"kill-{i:05d}", rng)
        items.append((subject_for(d), orjson.dumps(d)))
    import nats

    from app.bridge import ensure_stream

    nc = await nats.connect(stack.nats_url)
    await ensure_stream(nc.jetstream(), "SIGNALS_APPROVED", ["signals.approved.>"])
    await nc.close()
    log = tmp_path / "bridge.log"
    proc = spawn(["bridge"], child_env, log)
    publisher = asyncio.create_task(publish(stack.nats_url, items, rate=200))

    async def forwarded() -> int:
        return len(await read_topic(settings, SIGNALS_APPROVED, timeout=2, idle=0.1))

    # Kill -9 once it has forwarded some but not all.
    await wait_until(lambda: forwarded(), timeout=60, what="bridge forwarding")
    await wait_until(lambda: _between(forwarded(), 1, n // 2), timeout=60, what="bridge halfway")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    before = await forwarded()
    assert 0 < before < n, f"kill did not land midway: {before}"
    await publisher

    proc = spawn(["bridge"], child_env, log)
    try:
        records = await read_topic(settings, SIGNALS_APPROVED, expect=n, timeout=120)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0  # SIGTERM drains and exits cleanly
    ids = {r.key.decode() for r in records}
    missing = {f"kill-{i:05d}" for i in range(n)} - ids
    assert not missing, f"{len(missing)} signals lost, e.g. {sorted(missing)[:5]}"
    assert len(records) >= n  # duplicates allowed here; the order agents dedupe


async def _between(value_coro, lo: int, hi: int) -> bool:
    v = await value_coro
    return lo <= v <= hi


def _fill(order_id: str | None, deal, **kw) -> dict:
    d = {"deal": deal, "symbol": "EURUSD", "side": "buy", "price": 1.0851, "volume": 0.1,
         "time": "2024-05-01T12:00:00Z", **kw}
    if order_id is not None:
        d["order_id"] = order_id
    return d


async def test_dead_letters_are_keyed_by_the_payloads_valid_id(settings, stack):
    """signals.dlq is keyed by the payload's signal_id and fills.dlq by its order_id (else
    ``deal-{deal}``) when the payload is a JSON object holding a valid one; otherwise no key.
    A valid fill without an order id is forwarded keyed ``deal-{deal}``."""
    from app.topics import FILLS, FILLS_DLQ

    rng = random.Random(5)
    ok = signal_dict("k-ok", rng, symbol="EURUSD")
    signals: list[tuple[bytes, bytes | None]] = [  # (payload, expected key)
        (orjson.dumps({**ok, "signal_id": "k-1", "symbol": None}), b"k-1"),
        (orjson.dumps({**ok, "signal_id": "k.2:x_Y-z", "position_size": -1}), b"k.2:x_Y-z"),
        (orjson.dumps({**ok, "signal_id": "k" * 128, "position_size": -1}), b"k" * 128),
        (orjson.dumps({"signal_id": "k-big", "pad": "x" * 70_000}), b"k-big"),  # over the size limit
        (b'{"signal_id": "k-nan", "entry_price": NaN}', b"k-nan"),
        (orjson.dumps({**ok, "signal_id": "k" * 129}), None),
        (orjson.dumps({**ok, "signal_id": "bad id"}), None),
        (orjson.dumps({**ok, "signal_id": ""}), None),
        (orjson.dumps({**ok, "signal_id": 123}), None),
        (orjson.dumps({k: v for k, v in ok.items() if k != "signal_id"}), None),
        (orjson.dumps([{"signal_id": "k-list"}]), None),
        (b'{"signal_id": "k-broken", ', None),
    ]
    fills: list[tuple[bytes, bytes | None]] = [
        (orjson.dumps(_fill("ord-1", 11, price=None)), b"ord-1"),
        (orjson.dumps(_fill("", 12, volume=0)), b"deal-12"),
        (orjson.dumps(_fill(None, 13, side="up")), b"deal-13"),
        (orjson.dumps(_fill("a b", 14, volume=-1)), b"deal-14"),
        (orjson.dumps(_fill(None, -1)), None),
        (orjson.dumps(_fill(None, "15", volume=0)), None),
        (orjson.dumps(_fill(None, True, volume=0)), None),
        (orjson.dumps(_fill(None, 1.5, volume=0)), None),
        (b"[]", None),
    ]
    good_fills = [(orjson.dumps(_fill("", 21)), b"deal-21"), (orjson.dumps(_fill("ord-2", 22)), b"ord-2")]
    items = [("signals.approved.EURUSD", p) for p, _ in signals]
    items += [("mt5.fills.EURUSD", p) for p, _ in fills + good_fills]

    bridge = Bridge(settings)
    await bridge.start()
    try:
        await publish(stack.nats_url, items)
        sig_dlq = await read_topic(settings, SIGNALS_DLQ, expect=len(signals))
        fill_dlq = await read_topic(settings, FILLS_DLQ, expect=len(fills))
        forwarded = await read_topic(settings, FILLS, expect=len(good_fills))
    finally:
        await bridge.stop()

    from app.topics import MAX_DEAD_LETTER_BYTES

    for records, cases in ((sig_dlq, signals), (fill_dlq, fills), (forwarded, good_fills)):
        assert len(records) == len(cases)
        keys = {r.value: r.key for r in records}
        for payload, key in cases:
            assert keys[payload[:MAX_DEAD_LETTER_BYTES]] == key, payload[:80]
    for r in sig_dlq + fill_dlq + forwarded:
        if r.key is not None:
            assert r.partition == kafka_partition(r.key, settings.topic_partitions)


def fill_payload(deal: int) -> bytes:
    return orjson.dumps({"order_id": f"ord-{deal}", "deal": deal, "ticket": deal, "symbol": "EURUSD", "side": "buy",
                         "price": 1.1, "volume": 0.1, "time": "2026-12-06T12:00:00Z"})


async def test_fills_arriving_while_the_route_lingers_leave_in_one_batch(settings, stack):
    """After a short batch the fills route waits ``bridge_fills_linger_ms`` before its next
    fetch: the first fill after a quiet spell goes at once, those published during the wait
    go together.  (The wait, 3 s here, is the bridge's own; publishing takes milliseconds.)"""
    settings = settings.model_copy(update={"bridge_fills_linger_ms": 3000.0})
    bridge = Bridge(settings)
    await bridge.start()
    try:
        await publish(stack.nats_url, [("mt5.fills.EURUSD", fill_payload(1))])
        await wait_until(lambda: bridge.stats.forwarded[FILLS] == 1, timeout=10.0, what="the first fill")
        await publish(stack.nats_url, [("mt5.fills.EURUSD", fill_payload(d)) for d in range(2, 22)])
        # a batch is counted once its NATS acks are sent, after its records are forwarded
        await wait_until(lambda: bridge.stats.forwarded[FILLS] == 21 and bridge.stats.batches["bridge-mt5-fills"] >= 2,
                         timeout=30.0, what="the fills published meanwhile, in a second batch")
        assert bridge.stats.batches["bridge-mt5-fills"] == 2
        # The signals route never lingers.
        assert Bridge(settings).linger(ROUTES[0]) == 0.0
    finally:
        await bridge.stop()
    fills = await read_topic(settings, FILLS, expect=21)
    assert sorted(orjson.loads(r.value)["deal"] for r in fills) == list(range(1, 22))


async def test_a_sigterm_while_the_bridge_starts_is_a_clean_stop(child_env, tmp_path):
    """The bridge takes SIGTERM from its first log line on (its web server's), not only once
    every route and the notifier have started: it finishes starting, then drains and exits 0."""
    log = tmp_path / "bridge.log"
    proc = spawn(["bridge"], child_env, log)
    try:
        await wait_until(lambda: log.exists() and b"HTTP on" in log.read_bytes(), timeout=60, interval=0.01,
                         what="the bridge's first log line")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert b"draining" in log.read_bytes()
