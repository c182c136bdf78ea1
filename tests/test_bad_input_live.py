"""Bad input through the live pipeline: thousands of generated malformed signals and fills
(the strategies of the unit property tests, ``tests/bad_payloads.py``), interleaved with valid
signals, go through the real NATS, bridge, Kafka and worker.

Signals are published on NATS ``signals.approved.<symbol>`` (the bridge dead-letters what does
not decode, the orders agent what names an unknown symbol); fills arrive both on NATS
``mt5.fills.<symbol>`` (through the bridge) and raw on the Kafka ``fills`` topic (straight to
the orders agent).  Afterwards:

* every bad payload is in its dead-letter topic (``signals.dlq`` or ``fills.dlq``) with a
  ``reason`` header naming what is wrong with it (the field, the payload, its size);
* nothing bad became an order, and no dead letter is a valid signal;
* no process stopped or restarted and no agent crashed;
* every valid signal became exactly one order, submitted once and FILLED.

The payloads are drawn with fixed seeds: every run publishes the same ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from bad_payloads import (
    FILL_FIELDS,
    FILL_PRICES,
    SIGNAL_FIELDS,
    SIGNAL_PRICES,
    VALID_FILL,
    VALID_SIGNAL,
    any_fill_payload,
    any_signal_payload,
    bad_number,
    bad_utf8,
    collect,
    huge,
    json_bytes,
    json_values,
    mutated,
    padded,
    with_unknown_symbol,
)
from hypothesis import strategies as st
from pipeline import Pipeline
from support import publish

from app.bridge import MAX_PAYLOAD_BYTES
from app.kafka_io import Record, read_topic
from app.models import ApprovedSignal, DecodeError, Fill, OrderState, from_json
from app.sample import signal_dict
from app.topics import FILLS, FILLS_DLQ, MAX_DEAD_LETTER_BYTES, SIGNALS_DLQ
from tables.idempotency import order_id_for
from tables.symbols import DEFAULT_SYMBOLS

pytestmark = pytest.mark.slow

PARTITIONS = 4
#: nats-server's default max_payload (payload and headers): the largest message NATS itself
#: lets through, less room for the publisher's ``Nats-Msg-Id`` header.
NATS_MAX_PAYLOAD = 1024 * 1024 - 256
#: Raw Kafka fills stay below the worker's producer limit (Faust's 1,000,000 bytes) minus the
#: dead letter's headers; the boundary itself is ``test_fill_at_the_kafka_record_limit...``.
KAFKA_FILL_MAX = 900_000
VALID_SIGNALS = 200
#: Agent-level markers of a crash inside a worker process (Faust's supervisor restarts the
#: agent, and the record it was handling is skipped).
CRASH_MARKERS = ("Crashed reason=", "Restarting dead")


@dataclass(frozen=True)
class Bad:
    """One malformed payload, how it is sent, where it must end and what its reason names."""

    family: str
    payload: bytes | None
    via: str  # "nats" (subject) or "kafka" (raw to the fills topic)
    subject: str | None
    dlq: str
    names: tuple[str, ...]  # the reason must contain one of these

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.payload or b"").hexdigest()


# --- what each payload is, independently of the pipeline ------------------------------------


def _fields_named(exc: DecodeError) -> tuple[str, ...]:
    names = {f.split(".")[0] for f in exc.fields}
    if "<payload>" in names:  # not JSON, not an object, or a rule across fields
        names |= {"JSON", "object"}
    return tuple(sorted(names))


def signal_verdict(raw: bytes) -> tuple[str, ...] | None:
    """What a dead letter of this signal must name, or None when it is a valid signal."""
    if len(raw) > MAX_PAYLOAD_BYTES:
        return ("payload",)
    try:
        s = from_json(ApprovedSignal, raw)
    except DecodeError as exc:
        return _fields_named(exc)
    return None if s.symbol in DEFAULT_SYMBOLS else ("symbol",)


def fill_verdict(raw: bytes | None, via: str) -> tuple[str, ...]:
    """What a dead letter of this fill must name (every generated fill is bad: a well-formed
    one names an order that does not exist)."""
    if via == "nats" and len(raw or b"") > MAX_PAYLOAD_BYTES:
        return ("payload",)
    try:
        from_json(Fill, raw if raw is not None else b"")
    except DecodeError as exc:
        return _fields_named(exc)
    return ("order_id",)


TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def subject_token(raw: bytes | None) -> str:
    """The symbol of the payload when it makes a subject token (as a publisher would route
    it), else a placeholder."""
    try:
        sym = orjson.loads(raw or b"").get("symbol")
    except (orjson.JSONDecodeError, AttributeError):
        return "UNKNOWN"
    return sym if isinstance(sym, str) and TOKEN.match(sym) else "UNKNOWN"


# --- the generated traffic ------------------------------------------------------------------


def bad_signals() -> tuple[list[Bad], int]:
    """(bad signals, how many drawn ones were valid after all and left out)."""
    families = {
        "any": (any_signal_payload(), 700),
        "mutated": (mutated(VALID_SIGNAL, SIGNAL_FIELDS), 700),
        "wrong_number": (bad_number(VALID_SIGNAL, SIGNAL_PRICES, "position_size").map(lambda t: t[1]), 300),
        "bad_utf8": (bad_utf8(VALID_SIGNAL, ["signal_id", "symbol", "strategy", "account", "signal_type"]), 150),
        "unknown_symbol": (with_unknown_symbol(VALID_SIGNAL), 150),
        "huge": (huge(VALID_SIGNAL, MAX_PAYLOAD_BYTES + 1, NATS_MAX_PAYLOAD), 8),
    }
    # The edges: one byte over the bridge's limit, and the largest message NATS carries.
    edges = [padded(VALID_SIGNAL, MAX_PAYLOAD_BYTES + 1), padded(VALID_SIGNAL, NATS_MAX_PAYLOAD)]
    out, valid = [], 0
    for seed, (family, (strategy, n)) in enumerate(families.items()):
        for raw in collect(strategy, n, at=100 + seed) + (edges if family == "huge" else []):
            names = signal_verdict(raw)
            if names is None:
                valid += 1
                continue
            out.append(Bad(family, raw, "nats", f"signals.approved.{subject_token(raw)}", SIGNALS_DLQ, names))
    return out, valid


def bad_fills() -> list[Bad]:
    nats_families = {
        "any": (any_fill_payload(), 150),
        "mutated": (mutated(VALID_FILL, FILL_FIELDS), 200),
        "wrong_number": (bad_number(VALID_FILL, FILL_PRICES, "volume").map(lambda t: t[1]), 100),
        "huge": (huge(VALID_FILL, MAX_PAYLOAD_BYTES + 1, NATS_MAX_PAYLOAD), 5),
    }
    kafka_families = {
        "any": (any_fill_payload(), 250),
        "mutated": (mutated(VALID_FILL, FILL_FIELDS), 450),
        "json_values": (json_values.map(json_bytes), 100),
        "wrong_number": (bad_number(VALID_FILL, FILL_PRICES, "volume").map(lambda t: t[1]), 200),
        "bad_utf8": (bad_utf8(VALID_FILL, ["order_id", "symbol", "side", "time"]), 100),
        "huge": (huge(VALID_FILL, 64 * 1024, KAFKA_FILL_MAX), 5),
        "tombstone": (st.just(None), 1),
    }
    edges = [padded(VALID_FILL, MAX_PAYLOAD_BYTES + 1), padded(VALID_FILL, NATS_MAX_PAYLOAD)]
    out = []
    for seed, (family, (strategy, n)) in enumerate(nats_families.items()):
        for raw in collect(strategy, n, at=200 + seed) + (edges if family == "huge" else []):
            out.append(Bad(family, raw, "nats", f"mt5.fills.{subject_token(raw)}", FILLS_DLQ, fill_verdict(raw, "nats")))
    for seed, (family, (strategy, n)) in enumerate(kafka_families.items()):
        for raw in collect(strategy, n, at=300 + seed):
            out.append(Bad(family, raw, "kafka", None, FILLS_DLQ, fill_verdict(raw, "kafka")))
    return out


def valid_signals(n: int) -> list[dict]:
    rng = random.Random(6)
    return [signal_dict(f"valid-{i}", rng, order_type="market", lots=rng.choice((0.01, 0.1, 1.0)),
                        account=rng.choice(("acc-1", "acc-2"))) for i in range(n)]


# --- checks ---------------------------------------------------------------------------------


def dead_letter_digest(r: Record) -> str:
    """The sha256 of the original payload: the header of a cut dead letter, else the value's."""
    if r.headers.get("truncated"):
        return r.headers["sha256"].decode()
    return hashlib.sha256(r.value or b"").hexdigest()


def check_dead_letters(sent: list[Bad], records: list[Record], topic: str) -> None:
    """Every bad payload sent towards ``topic`` is there, with a reason naming its problem."""
    by_digest: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_digest[dead_letter_digest(r)].append(r)
        assert r.headers.get("reason"), f"a dead letter without a reason: {r.value[:200]!r}"
        if r.headers.get("truncated"):
            assert len(r.value) == MAX_DEAD_LETTER_BYTES
    wanted = Counter(b.digest for b in sent)
    missing = [b for b in sent if len(by_digest.get(b.digest, ())) < wanted[b.digest]]
    assert not missing, (
        f"{len(missing)} of {len(sent)} bad payloads never reached {topic}, e.g. "
        + "; ".join(f"{b.family}/{b.via}: {(b.payload or b'')[:120]!r}" for b in missing[:5]))
    unnamed = []
    for b in sent:
        reasons = [r.headers["reason"].decode(errors="replace") for r in by_digest[b.digest]]
        if not any(name in reason for reason in reasons for name in b.names):
            unnamed.append((b.family, (b.payload or b"")[:80], b.names, reasons[:2]))
    assert not unnamed, f"{len(unnamed)} dead letters whose reason does not name the problem, e.g. {unnamed[:5]}"


def crashes(p: Pipeline) -> list[str]:
    """Lines of the service logs that tell of a crashed agent."""
    return [line for svc in p.services.running.values() for line in svc.log_text().splitlines()
            if any(m in line for m in CRASH_MARKERS)]


async def produce_raw(p: Pipeline, topic: str, items: list[tuple[bytes | None, bytes | None]], rate: float | None = None) -> None:
    """Records as-is (key, value), each acknowledged by Kafka before the next."""
    producer = AIOKafkaProducer(**p.settings.producer_options())
    await producer.start()
    try:
        for i, (key, value) in enumerate(items):
            await producer.send_and_wait(topic, value, key=key)
            if rate and i % 50 == 49:
                await asyncio.sleep(50 / rate)
    finally:
        await producer.stop()


# --- the tests ------------------------------------------------------------------------------


@pytest.mark.timeout(300)
async def test_generated_bad_signals_and_fills_are_dead_lettered_beside_valid_traffic(tmp_path):
    signals, left_out = bad_signals()
    fills = bad_fills()
    assert len(signals) >= 1500 and len(fills) >= 1200, (len(signals), len(fills))
    assert left_out < len(signals) // 10, "the generator mostly makes bad payloads"
    families = Counter(b.family for b in signals + fills)
    assert families["huge"] >= 10 and families["bad_utf8"] >= 200 and families["unknown_symbol"] >= 100, families

    good = valid_signals(VALID_SIGNALS)
    good_ids = [order_id_for(s["signal_id"], PARTITIONS) for s in good]
    # One NATS stream of bad signals, bad fills and valid signals, a valid one every few.
    rng = random.Random(7)
    nats_bad = [b for b in signals + fills if b.via == "nats"]
    rng.shuffle(nats_bad)
    step = max(1, len(nats_bad) // len(good))
    items: list[tuple[str, bytes]] = []
    for i, s in enumerate(good):
        items += [(b.subject, b.payload) for b in nats_bad[i * step:(i + 1) * step]]
        items.append((f"signals.approved.{s['symbol']}", orjson.dumps(s)))
    items += [(b.subject, b.payload) for b in nats_bad[len(good) * step:]]
    kafka_bad = [b for b in fills if b.via == "kafka"]
    keys = [None, b"O1", b"\xff\xfe-not-utf8", b""]
    kafka_items = [(keys[i % len(keys)] if b.payload is not None else b"O1", b.payload) for i, b in enumerate(kafka_bad)]

    p = Pipeline(tmp_path, partitions=PARTITIONS)
    await p.start()
    try:
        await p.hold_reference_prices()
        procs = {name: svc.proc.pid for name, svc in p.services.running.items()}

        await asyncio.gather(publish(p.stack.nats_url, items), produce_raw(p, FILLS, kafka_items, rate=500))
        orders = await p.wait_orders(good_ids, timeout=120)

        # The valid traffic: one order each, submitted once, FILLED; nothing else became an order.
        assert {orders[i].state for i in good_ids} == {OrderState.FILLED}
        assert set(orders) == set(good_ids), f"orders from bad input: {sorted(set(orders) - set(good_ids))[:5]}"
        events = await p.events()
        assert [sum(1 for e in events[i] if e.type.value == "created") for i in good_ids] == [1] * len(good_ids)
        stats = await p.sim_stats()
        assert all(stats["by_comment"].get(i) == 1 for i in good_ids), "one broker submission per valid signal"

        # Every bad payload in its dead-letter topic, with a reason naming the problem.
        signal_dlq = await read_topic(p.settings, SIGNALS_DLQ, expect=len(signals), timeout=90)
        fill_dlq = await read_topic(p.settings, FILLS_DLQ, expect=len(fills), timeout=90)
        check_dead_letters(signals, signal_dlq, SIGNALS_DLQ)
        check_dead_letters(fills, fill_dlq, FILLS_DLQ)
        valid_digests = {hashlib.sha256(orjson.dumps(s)).hexdigest() for s in good}
        assert not valid_digests & {dead_letter_digest(r) for r in signal_dlq}, "a valid signal was dead-lettered"
        # Both layers took part: the bridge (undecodable, oversized) and the orders agent
        # (unknown symbols, unknown orders, whatever came raw through Kafka).
        by_layer = Counter("bridge" if "route" in r.headers else "agent" for r in signal_dlq + fill_dlq)
        assert by_layer["bridge"] > 1000 and by_layer["agent"] > 1000, by_layer

        # Nobody stopped: the same processes, alive, no agent crashed, nothing restarted.
        assert {n: s.proc.pid for n, s in p.services.running.items() if s.alive} == procs
        assert getattr(p.services, "restarts", 0) == 0
        assert crashes(p) == []
    finally:
        p.stop()


@pytest.mark.timeout(180)
async def test_fill_at_the_kafka_record_limit_is_dead_lettered_without_a_crash(tmp_path):
    """Raw fills as large as a Kafka record can be: each must still reach ``fills.dlq`` (cut,
    if need be), the agent must not crash, and a valid signal behind them still fills."""
    p = Pipeline(tmp_path, partitions=PARTITIONS)
    await p.start()
    try:
        sizes = (999_900, 1_040_000)
        fills = [padded({**VALID_FILL, "order_id": f"O-limit-{n}"}, n) for n in sizes]
        await produce_raw(p, FILLS, [(f"O-limit-{n}".encode(), raw) for n, raw in zip(sizes, fills)])
        s = valid_signals(1)[0]
        await p.publish_signals([s])
        await p.wait_orders([order_id_for(s["signal_id"], PARTITIONS)], timeout=60)
        dlq = await read_topic(p.settings, FILLS_DLQ, idle=1.0)
        crashed = crashes(p)
        assert {r.key for r in dlq} >= {f"O-limit-{n}".encode() for n in sizes}, f"fills.dlq keys: {[r.key for r in dlq]}"
        assert all(b"order_id" in r.headers["reason"] for r in dlq)
        assert crashed == []
    finally:
        p.stop()
