"""The whole service against real servers, for integration tests: stack, simulator, bridge,
workers, and ways to look at what came out (Kafka topics, NATS subjects, the simulator)."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import nats
import orjson

from app import hub
from app.kafka_io import TopicTail, end_offsets, read_topic
from app.local import LocalStack, Services
from app.models import Execution, Order, OrderEvent, Position
from app.mt5 import contract
from app.sample import REFERENCE
from app.settings import Settings
from app.topics import EXECUTIONS, ORDER_EXECUTION_ARCHIVE, ORDERS_STATUS, POSITIONS, ensure_topics
from support import publish, stream_messages

#: Fast timeouts so stuck-order and retry paths finish within a test.
TEST_CONFIG = {
    "operational": {
        "submission": {
            "reply_timeout_seconds": 0.5,
            "submit_retries": 1,
            "stuck_order_timeout_seconds": 3,
            "stuck_check_interval_seconds": 0.5,
        },
        "position_reconciliation": {"reconcile_interval_minutes": 60},
    }
}


def keep_latest(latest: dict[str, Any], records: list, model: Any, key: Callable[[Any], str]) -> dict[str, Any]:
    """Fold versioned snapshots into ``latest`` (the highest version per key wins); returns it."""
    for r in records:
        m = model.model_validate_json(r.value)
        k = key(m)
        if k not in latest or m.version >= latest[k].version:
            latest[k] = m
    return latest


class Pipeline:
    def __init__(self, workdir: Path, partitions: int = 4, config: dict | None = None,
                 broker: str | None = None, env: dict[str, str] | None = None, kafka_nodes: int = 1,
                 secure: bool = False) -> None:
        """``broker``: ``tansu`` or ``kafka`` (Apache Kafka, the production profile); None is
        :class:`LocalStack`'s default (``EXECUTION_LOCAL_BROKER``: Kafka in the tests).
        ``env``: settings for every service started (``EXECUTION_...``); ``kafka_nodes``: 3
        for an Apache Kafka cluster (replication factor 3, min.insync.replicas 2); ``secure``:
        Kafka on SASL_SSL and NATS with a user, a password and TLS (:class:`app.local.Security`)."""
        self.workdir = workdir
        self.stack = LocalStack(workdir=workdir / "stack", kafka_nodes=kafka_nodes, secure=secure,
                                **({"broker": broker} if broker else {}))
        self.partitions = partitions
        self.config = config if config is not None else TEST_CONFIG
        self.env = dict(env or {})
        self.services: Services | None = None
        self.settings: Settings | None = None

    async def start(self, workers: int = 1, bridge: bool = True, simulator: bool = True) -> "Pipeline":
        self.stack.start()
        self.services = Services(self.stack, self.workdir, partitions=self.partitions, extra_env=self.env)
        self.services.supervise()
        self.settings = Settings(
            kafka_bootstrap=self.stack.kafka_url, nats_url=self.stack.nats_url,
            data_dir=self.workdir / "data", topic_partitions=self.partitions, **self.stack.settings_fields(),
        )
        await ensure_topics(self.settings)
        await self.set_config(self.config)
        if simulator:
            self.services.simulator()
            await self.wait_for_simulator()
        if bridge:
            self.services.bridge()
        for i in range(workers):
            await asyncio.to_thread(self.services.worker, f"worker-{i + 1}")
        return self

    def _nats_options(self) -> dict:
        """How this test connects to the stack's NATS (user, password and TLS when secure)."""
        if self.settings is not None:
            return self.settings.nats_options()
        return {"servers": [self.stack.nats_url]}

    def stop(self) -> None:
        if self.services:
            self.services.stop_all()
        self.stack.stop()

    # ------------------------------------------------------------------ inputs
    async def publish_signals(self, signals: list[dict], times: int = 1, rate: float | None = None, **kw: Any) -> int:
        """Publish on ``signals.approved.<symbol>``; ``kw`` as :func:`support.publish` (which
        resends until JetStream acks): returns the number of resends."""
        items = [(f"signals.approved.{s['symbol']}", orjson.dumps(s)) for s in signals] * times
        return await publish(self.stack.nats_url, items, rate=rate, connect=self._nats_options(), **kw)

    async def set_config(self, doc: dict, timeout: float = 30) -> int:
        """Write the hub config and wait until every running worker has it in force."""
        nc = await nats.connect(**self._nats_options())
        try:
            revision = await hub.write(nc, doc)
        finally:
            await nc.close()
        deadline = time.monotonic() + timeout
        for svc in (self.services.running.values() if self.services else ()):
            if svc.argv[0] != "worker" or not svc.alive:
                continue
            while (await asyncio.to_thread(self._worker_revision, svc.web_port) or 0) < revision:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{svc.name} did not take config revision {revision} in {timeout}s")
                await asyncio.sleep(0.1)
        return revision

    @staticmethod
    def _worker_revision(port: int) -> int | None:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as r:
                return orjson.loads(r.read()).get("revision")
        except Exception:
            return None

    async def send_command(self, kind: str, key: str, payload: dict | None = None, command_id: str | None = None) -> str:
        """Put a command on ``orders.commands`` as the front ends do (HTTP, NATS, CLI)."""
        import uuid

        from aiokafka import AIOKafkaProducer

        from app.models import OrderCommand, to_json, utcnow
        from app.topics import ORDERS_COMMANDS

        command_id = command_id or uuid.uuid4().hex
        cmd = OrderCommand(kind=kind, key=key, payload=payload or {}, at=utcnow(), command_id=command_id, source="test")
        producer = AIOKafkaProducer(**self.settings.aiokafka_common(), acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(ORDERS_COMMANDS, to_json(cmd), key=key.encode())
        finally:
            await producer.stop()
        return command_id

    async def broker_positions(self, magic: int | None = None) -> dict[str, contract.BrokerPositionModel]:
        snap = contract.PositionsSnapshot.model_validate(await self._request(contract.POSITIONS, {"magic": magic}))
        return {f"{p.account}:{p.symbol}": p for p in snap.positions}

    async def broker_deals(self) -> list[contract.DealEvent]:
        """Every deal the broker published (the MT5_FILLS stream)."""
        return [contract.DealEvent.model_validate_json(data)
                for _, data in await self.nats_messages("mt5.fills.>", contract.FILLS_STREAM)]

    # ------------------------------------------------------------------ the simulator
    async def _request(self, subject: str, payload: dict) -> dict:
        nc = await nats.connect(**self._nats_options())
        try:
            msg = await nc.request(subject, orjson.dumps(payload), timeout=5)
            return orjson.loads(msg.data)
        finally:
            await nc.close()

    async def sim(self, **cmd: Any) -> dict:
        return await self._request(contract.CONTROL, cmd)

    async def hold_reference_prices(self) -> None:
        """Hold every simulated market at its reference price (the sample signals are priced off it)."""
        for symbol, (mid, _) in REFERENCE.items():
            await self.sim(cmd="set_price", symbol=symbol, mid=mid, hold=True)

    async def sim_stats(self) -> dict:
        return await self._request(contract.STATS, {})

    async def wait_for_simulator(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.sim_stats()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    # ------------------------------------------------------------------ outputs
    async def _latest(self, topic: str, model: Any, key: Callable[[Any], str]) -> dict[str, Any]:
        """The highest-version snapshot per key of a topic of versioned snapshots."""
        return keep_latest({}, await read_topic(self.settings, topic, idle=0.3, timeout=300), model, key)

    async def orders(self) -> dict[str, Order]:
        """The latest snapshot of every order on ``orders.status`` (highest version)."""
        return await self._latest(ORDERS_STATUS, Order, lambda o: o.order_id)

    async def positions(self) -> dict[str, Position]:
        """The latest snapshot of every position on ``positions`` (highest version)."""
        return await self._latest(POSITIONS, Position, lambda p: p.key)

    async def executions(self, timeout: float = 30.0) -> dict[str, list[Execution]]:
        """Applied fills per order, replays removed (same execution id)."""
        seen: set[str] = set()
        out: dict[str, list[Execution]] = defaultdict(list)
        for r in await read_topic(self.settings, EXECUTIONS, idle=0.5, timeout=timeout):
            e = Execution.model_validate_json(r.value)
            if e.execution_id not in seen:
                seen.add(e.execution_id)
                out[e.order_id].append(e)
        return out

    async def events(self) -> dict[str, list[OrderEvent]]:
        """Archive events per order id, replays removed (same event id), in version order."""
        seen: set[str] = set()
        out: dict[str, list[OrderEvent]] = defaultdict(list)
        for r in await read_topic(self.settings, ORDER_EXECUTION_ARCHIVE, idle=0.3, timeout=300):
            e = OrderEvent.model_validate_json(r.value)
            if e.event_id not in seen:
                seen.add(e.event_id)
                out[e.order_id].append(e)
        return out

    async def wait_orders(self, order_ids: list[str], done: Callable[[Order], bool] | None = None, timeout: float = 60) -> dict[str, Order]:
        """Wait until every order satisfies ``done`` (default: in a final state)."""
        done = done or (lambda o: o.state.is_final)
        deadline = time.monotonic() + timeout
        orders: dict[str, Order] = {}
        async with TopicTail(self.settings, ORDERS_STATUS) as tail:  # each poll reads only what is new
            while True:
                keep_latest(orders, await tail.read(timeout=300), Order, lambda o: o.order_id)
                missing = [i for i in order_ids if i not in orders or not done(orders[i])]
                if not missing:
                    return orders
                if time.monotonic() > deadline:
                    states = {i: orders[i].state.value if i in orders else None for i in missing[:10]}
                    self.dump_workers()
                    await self.probe_fetch()
                    raise TimeoutError(f"{len(missing)} orders not done after {timeout}s: {states}")
                await asyncio.sleep(0.5)

    async def probe_fetch(self) -> None:
        """Print what a group-less consumer reads and what the worker group has committed."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from app.topics import FILLS, ORDERS_COMMANDS, SIGNALS_APPROVED

        for topic in (SIGNALS_APPROVED, ORDERS_COMMANDS, FILLS):
            records = await read_topic(self.settings, topic, idle=0.3, timeout=5, strict=False)
            print(f"probe: {topic}: {len(records)} records readable without a group")
            if topic == SIGNALS_APPROVED:
                self._probe_signals_without_orders(records, await read_topic(self.settings, ORDERS_STATUS, idle=0.3, timeout=30, strict=False))
        c = AIOKafkaConsumer(**self.settings.aiokafka_common(), group_id=self.settings.app_id,
                             enable_auto_commit=False)
        await c.start()
        try:
            tps = [TopicPartition(t, p) for t in (SIGNALS_APPROVED, ORDERS_COMMANDS, FILLS) for p in range(self.partitions)]
            end = await end_offsets(c, tps, self.settings)
            for tp in tps:
                print(f"probe: {tp.topic}[{tp.partition}] committed {await c.committed(tp)} end {end[tp]}")
        finally:
            await c.stop()

    def _probe_signals_without_orders(self, signals: list, statuses: list) -> None:
        """Print, per partition, the offset ranges of signals.approved whose order never
        appeared on orders.status (where a loss happened, for the worker's log)."""
        from tables.idempotency import order_id_for

        known = {r.key.decode() for r in statuses if r.key}
        lost: dict[int, list[int]] = defaultdict(list)
        for r in signals:
            try:
                signal_id = orjson.loads(r.value)["signal_id"]
                if order_id_for(signal_id, self.partitions) not in known:
                    lost[r.partition].append(r.offset)
            except Exception:
                continue  # a bad signal: no order expected
        for partition, offsets in sorted(lost.items()):
            ranges, start = [], offsets[0]
            for a, b in zip(offsets, offsets[1:] + [None]):
                if b != a + 1:
                    ranges.append(f"{start}-{a}" if a != start else f"{a}")
                    start = b
            print(f"probe: signals.approved[{partition}]: {len(offsets)} without an order, offsets {', '.join(ranges[:20])}")

    def dump_workers(self) -> None:
        """Ask every running worker to log its asyncio tasks (SIGUSR1): for a post-mortem."""
        import signal

        import urllib.request

        for svc in (self.services.running.values() if self.services else ()):
            if svc.argv[0] == "worker" and svc.alive:
                svc.proc.send_signal(signal.SIGUSR1)
                try:
                    url = f"http://127.0.0.1:{svc.web_port}/health?detail=1"
                    print("health:", svc.name, urllib.request.urlopen(url, timeout=3).read().decode())
                except Exception as exc:
                    print("health:", svc.name, repr(getattr(exc, "read", lambda e=exc: e)()))
        time.sleep(1.0)

    async def nats_messages(self, subjects: str = "orders.>", stream: str = "ORDERS") -> list[tuple[str, bytes]]:
        """Every message stored in a JetStream stream under ``subjects``."""
        return await stream_messages(self._nats_options(), subjects, stream)
