"""NATS JetStream → Kafka bridge: a small table of routes.

Each route is a JetStream stream (created if absent) read by a durable pull consumer. Every
message is validated with the route's model and produced to the route's Kafka topic, keyed
by the route's key; the NATS message is acknowledged only after Kafka acknowledged the write
(acks=all), so a crash anywhere means redelivery, never loss.  Duplicates are possible (a
crash between the Kafka ack and the NATS ack) and are removed downstream by the order
agents' dedupe tables.

Invalid messages go to the route's dead-letter topic with the original bytes as the value
and the subject and reason as headers, and are then acknowledged.  A dead letter is keyed
like the record it stands for whenever the payload is a JSON object that names a valid id
(``signal_id``; for fills ``order_id``, else ``deal-{deal}``), so it lands on the same
partition; otherwise it has no key.  A payload larger than
``max_payload`` (64 KiB: a signal or a fill is a few hundred bytes) is invalid whatever it
holds.  A dead letter keeps at most ``MAX_DEAD_LETTER_BYTES`` of the original (NATS allows
larger messages than a Kafka record); a cut one carries the headers ``truncated``,
``original_size`` and ``sha256`` (of the whole original).  A record Kafka refuses for itself
(too large, a key that cannot be encoded) is dead-lettered too: only an unavailable Kafka
holds a batch back.  A message whose subject
is outside the route's filter is never forwarded (defence in depth: the consumer's filter
subject already excludes it, e.g. ``signals.rejected.>``).

The way back, Kafka -> NATS (order updates and alerts), is :mod:`app.notifier`, run by the
bridge beside its routes.

On SIGTERM the bridge stops fetching, finishes the batch in flight (produce, then ack; the
notifier's: publish, then commit), and closes its clients.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import nats
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError
from pydantic import BaseModel

from app import retry
from app.http_server import ProbeServer
from app.models import ApprovedSignal, DecodeError, Fill, from_json
from app.notifier import INPUTS as NOTIFIER_INPUTS
from app.notifier import Notifier
from app.settings import Settings
from app.topics import (
    FILLS,
    FILLS_DLQ,
    MAX_REASON_BYTES,
    SIGNALS_APPROVED,
    SIGNALS_DLQ,
    SINK_DLQ,
    dead_letter_value,
    ensure_topics,
)

log = logging.getLogger("execution.bridge")

#: Largest payload forwarded; anything larger is dead-lettered unread.
MAX_PAYLOAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Route:
    """One subject → topic forwarding rule."""

    name: str  # also the durable consumer name
    stream: str  # JetStream stream that captures the subjects
    subject: str  # filter subject, e.g. "signals.approved.>"
    topic: str
    dlq_topic: str
    model: type[BaseModel]
    key: Callable[[BaseModel], str]
    #: The key of a dead letter, from the raw payload (a dict, when it is a JSON object).
    dead_letter_key: Callable[[dict], str | None] = lambda d: None
    #: The setting (ms) of how long the route waits after a short batch before its next fetch.
    linger_setting: str | None = None


#: What a Kafka key taken from an unvalidated payload must look like (``ApprovedSignal.signal_id``).
_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]+$")
_ID_MAX = 128


def valid_id(v: object) -> str | None:
    """``v`` if it is a non-empty id string of at most 128 of ``[A-Za-z0-9_.:-]``, else None."""
    return v if isinstance(v, str) and len(v) <= _ID_MAX and _ID_RE.fullmatch(v) else None


def signal_dead_letter_key(d: dict) -> str | None:
    return valid_id(d.get("signal_id"))


def fill_dead_letter_key(d: dict) -> str | None:
    """The ``fills`` key a valid fill would have had: the order id, else ``deal-{deal}``."""
    order_id = valid_id(d.get("order_id"))
    if order_id:
        return order_id
    deal = d.get("deal")
    if isinstance(deal, int) and not isinstance(deal, bool) and deal > 0:
        return f"deal-{deal}"
    return None


def payload_object(raw: bytes) -> dict | None:
    """The payload as a dict if it is a JSON object (NaN/Infinity literals allowed, as in
    :func:`app.models.from_json`), else None."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            data = json.loads(raw)
        except (ValueError, TypeError, RecursionError):
            return None
    return data if isinstance(data, dict) else None


ROUTES: tuple[Route, ...] = (
    Route(
        name="bridge-signals-approved",
        stream="SIGNALS_APPROVED",
        subject="signals.approved.>",
        topic=SIGNALS_APPROVED,
        dlq_topic=SIGNALS_DLQ,
        model=ApprovedSignal,
        key=lambda s: s.signal_id,  # type: ignore[attr-defined]
        dead_letter_key=signal_dead_letter_key,
    ),
    Route(
        name="bridge-mt5-fills",
        stream="MT5_FILLS",
        subject="mt5.fills.>",
        topic=FILLS,
        dlq_topic=FILLS_DLQ,
        model=Fill,
        key=lambda f: f.routing_key,  # type: ignore[attr-defined]  # order_id or deal-{deal}
        dead_letter_key=fill_dead_letter_key,
        linger_setting="bridge_fills_linger_ms",
    ),
)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` one or more trailing tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


@dataclass
class BridgeStats:
    forwarded: Counter = field(default_factory=Counter)
    dead_lettered: Counter = field(default_factory=Counter)
    batches: Counter = field(default_factory=Counter)  # by route: JetStream fetches forwarded
    produce_retries: int = 0


class Bridge:
    def __init__(
        self,
        settings: Settings,
        routes: tuple[Route, ...] = ROUTES,
        *,
        batch_size: int = 256,
        fetch_timeout: float = 1.0,
        ack_wait: float = 30.0,
        max_payload: int = MAX_PAYLOAD_BYTES,
        notify: bool = True,
    ) -> None:
        """``notify``: run the Kafka -> NATS half too (:class:`app.notifier.Notifier`)."""
        self.settings = settings
        self.routes = routes
        self.batch_size = batch_size
        self.fetch_timeout = fetch_timeout
        self.ack_wait = ack_wait
        self.max_payload = max_payload
        self.stats = BridgeStats()
        self._stopping = asyncio.Event()
        self._nc: nats.NATS | None = None
        self._producer: AIOKafkaProducer | None = None
        self._tasks: list[asyncio.Task] = []
        self._subs: list = []
        self.notify = notify
        self.notifier: Notifier | None = None

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        topics = {r.topic for r in self.routes} | {r.dlq_topic for r in self.routes}
        if self.notify:
            topics |= {*NOTIFIER_INPUTS, SINK_DLQ}
        await ensure_topics(self.settings, sorted(topics))
        self._producer = AIOKafkaProducer(**self.settings.producer_options(), enable_idempotence=False,
                                          client_id=f"{self.settings.app_id}-bridge")
        await self._producer.start()
        self._nc = await nats.connect(**self.settings.nats_options(), max_reconnect_attempts=-1)
        js = self._nc.jetstream()
        for route in self.routes:
            await ensure_stream(js, route.stream, [route.subject])
            sub = await js.pull_subscribe(
                route.subject,
                durable=route.name,
                stream=route.stream,
                config=ConsumerConfig(
                    ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_wait=self.ack_wait,
                    max_ack_pending=self.batch_size * 4,
                    filter_subject=route.subject,
                ),
            )
            self._subs.append(sub)
            self._tasks.append(asyncio.create_task(self._run_route(route, sub), name=route.name))
        if self.notify:
            self.notifier = Notifier(self.settings, js, self._producer)
            await self.notifier.start()
        log.info("bridge started: %s", ", ".join(f"{r.subject} -> {r.topic}" for r in self.routes))

    @property
    def nats_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def routes_running(self) -> bool:
        """Every route's loop is running (started, not ended), and the notifier's if any."""
        routes = bool(self._tasks) and not any(t.done() for t in self._tasks)
        return routes and (self.notifier is None or self.notifier.running)

    async def wait(self) -> None:
        await asyncio.gather(*self._tasks)

    async def stop(self) -> None:
        """Drain: finish the batch in flight, then close."""
        self._stopping.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.notifier is not None:
            await self.notifier.stop()
        # Every fetched batch is produced and acked by now; pull subscriptions hold no
        # pushed messages, so a plain close is a complete drain (nats drain() would wait
        # for its own timeout on pull subscriptions).
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()
        if self._producer is not None:
            await self._producer.stop()
        log.info("bridge stopped: forwarded=%s dead_lettered=%s", dict(self.stats.forwarded), dict(self.stats.dead_lettered))

    # -- the loop ------------------------------------------------------------------------
    def linger(self, route: Route) -> float:
        """Seconds the route waits after a short batch before its next fetch (its setting)."""
        return getattr(self.settings, route.linger_setting) / 1000.0 if route.linger_setting else 0.0

    async def _run_route(self, route: Route, sub) -> None:
        msgs: list = []
        while not self._stopping.is_set():
            linger = self.linger(route)
            if 0 < len(msgs) < self.batch_size and linger > 0:
                # A short batch: let the next one fill for a moment (a linger, as a Kafka
                # producer's).  After an empty wait the fetch below answers at the first message.
                await asyncio.sleep(linger)
            msgs = []
            try:
                msgs = await sub.fetch(self.batch_size, timeout=self.fetch_timeout)
            except (asyncio.TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as exc:  # disconnected, reconnecting: keep going
                if self._stopping.is_set():
                    break
                log.warning("%s: fetch failed (%s); retrying", route.name, exc)
                await asyncio.sleep(0.5)
                continue
            await self._forward(route, msgs)

    async def _forward(self, route: Route, msgs: list) -> None:
        """Produce the whole batch, wait for every Kafka ack, then ack every NATS message."""
        async def produce_all() -> None:
            futures = [await self._produce(route, m) for m in msgs]
            await asyncio.gather(*futures)

        async def still_working(_exc: BaseException) -> None:
            # Kafka unavailable: keep the batch (re-producing is safe, duplicates are deduped
            # downstream) and tell NATS we are still working on it, so it is not redelivered.
            self.stats.produce_retries += 1
            for m in msgs:
                try:
                    await m.in_progress()
                except Exception:
                    pass

        await retry.until_done(f"{route.name}: produce failed", produce_all, initial=0.1, maximum=5.0,
                               on_failure=still_working, logger=log)
        for m in msgs:
            await m.ack()
        self.stats.batches[route.name] += 1

    async def _produce(self, route: Route, msg) -> asyncio.Future:
        assert self._producer is not None
        if not subject_matches(route.subject, msg.subject):
            return await self._dead_letter(route, msg, f"subject {msg.subject} is not routed by {route.subject}")
        if len(msg.data) > self.max_payload:
            return await self._dead_letter(
                route, msg, f"payload: {len(msg.data)} bytes, more than the {self.max_payload}-byte limit")
        try:
            model = from_json(route.model, msg.data)
        except DecodeError as exc:
            return await self._dead_letter(route, msg, exc.reason)
        try:
            future = await self._producer.send(route.topic, msg.data, key=route.key(model).encode())
        except (MessageSizeTooLargeError, ValueError, TypeError) as exc:
            # This record can never be written (Kafka's size limit, a key it cannot encode):
            # retrying would hold the route for ever.  Kafka being down is not among these.
            return await self._dead_letter(route, msg, f"payload: not forwardable: {type(exc).__name__}: {exc}")
        self.stats.forwarded[route.topic] += 1
        return future

    async def _dead_letter(self, route: Route, msg, reason: str) -> asyncio.Future:
        assert self._producer is not None
        self.stats.dead_lettered[route.dlq_topic] += 1
        log.info("%s: dead letter from %s: %s", route.name, msg.subject, reason)
        headers = [
            ("reason", reason.encode(errors="backslashreplace")[:MAX_REASON_BYTES]),
            ("subject", msg.subject.encode(errors="backslashreplace")),
            ("route", route.name.encode()),
        ]
        value, extra = dead_letter_value(msg.data)
        obj = payload_object(msg.data)
        key = route.dead_letter_key(obj) if obj is not None else None
        return await self._producer.send(
            route.dlq_topic, value, key=key.encode() if key else None, headers=headers + extra)


async def ensure_stream(js, name: str, subjects: list[str]) -> None:
    """Create the JetStream stream if absent; never widen or narrow an existing one."""
    try:
        await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=name,
                subjects=subjects,
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=7 * 24 * 3600,
                duplicate_window=120,
            )
        )


def bridge_web(bridge: Bridge) -> ProbeServer:
    """The bridge's probes and metrics."""

    async def ready() -> tuple[bool, dict]:
        nats_ok, routes_ok = bridge.nats_connected, bridge.routes_running
        return nats_ok and routes_ok, {"nats": nats_ok, "routes_running": routes_ok}

    def metrics() -> list:
        st = bridge.stats  # every route's topics from 0, so rate() and alerts see them before traffic
        out = [("bridge_forwarded_total", {"topic": r.topic}, st.forwarded[r.topic]) for r in bridge.routes]
        out += [("bridge_dead_letters_total", {"topic": r.dlq_topic}, st.dead_lettered[r.dlq_topic]) for r in bridge.routes]
        out.append(("bridge_produce_retries_total", {}, st.produce_retries))
        n = bridge.notifier
        if n is not None:
            out += [("bridge_notified_total", {"subject": f"{root}.>"}, n.published[root]) for root in ("orders", "alerts")]
            out.append(("bridge_dead_letters_total", {"topic": SINK_DLQ}, n.dead_lettered))
            out.append(("bridge_notify_retries_total", {}, n.publish_retries))
        return out

    s = bridge.settings
    return ProbeServer("bridge", s.web_host, s.bridge_web_port, ready=ready, metrics=metrics)


async def run_bridge(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain."""
    bridge = Bridge(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before the start: its routes forward at once
        loop.add_signal_handler(sig, stop.set)
    web = await bridge_web(bridge).start()
    await bridge.start()
    await stop.wait()
    log.info("signal received: draining")
    await bridge.stop()
    await web.stop()
