"""The bridge beside its floor: CPU per message and msg/s of the same work, side by side.

    python bench/bridge_floor.py [--messages 20000] [--rounds 2] [--broker kafka|tansu]

On one local stack (a broker and nats-server, nothing else), each round runs, alternated:

* floor: a plain nats-py + aiokafka loop doing the bridge's work and nothing more: JetStream
  pull in batches of 256, the project's ``ApprovedSignal`` validation (``app.models.from_json``),
  produce keyed by ``signal_id`` with the service's producer settings (``acks=all``), then each
  NATS ack after Kafka acknowledged the whole batch;
* bridge: ``app.bridge.Bridge`` itself, with one route of the same shape.

Each drains its own backlog of ``--messages`` approved signals, published to its own stream
before the clock starts.  Both run in this process, and the CPU figure is this process's
(``time.process_time``) from connecting to the last ack, so the connect and start costs are
in both (closing them is not); nats-server's and the broker's CPU are not.  Prints, per round and as the median of
the rounds, CPU ms per message and msg/s of each, and the ratio bridge / floor.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nats
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from app.bridge import Bridge, Route, ensure_stream, signal_dead_letter_key
from app.local import LocalStack
from app.models import ApprovedSignal, from_json
from app.sample import signal_dict
from app.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: bench.common
from bench.common import add_broker_arg, broker_line, run_main  # noqa: E402

BATCH = 256


def route_for(tag: str) -> Route:
    return Route(name=f"bench-{tag}", stream=f"BENCH_{tag.upper()}", subject=f"bench.{tag}.>",
                 topic=f"bench.{tag}.out", dlq_topic=f"bench.{tag}.dlq", model=ApprovedSignal,
                 key=lambda s: s.signal_id, dead_letter_key=signal_dead_letter_key)


async def fill(settings: Settings, route: Route, n: int) -> None:
    """Create the route's topics, and publish ``n`` approved signals to its stream (JetStream-acked)."""
    admin = AIOKafkaAdminClient(**settings.aiokafka_common())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, settings.topic_partitions, 1) for t in (route.topic, route.dlq_topic)])
    finally:
        await admin.close()
    nc = await nats.connect(**settings.nats_options())
    js = nc.jetstream()
    await ensure_stream(js, route.stream, [route.subject])
    rng = random.Random(7)
    prefix = route.subject[:-1]
    for start in range(0, n, 500):
        acks = []
        for i in range(start, min(n, start + 500)):
            s = signal_dict(f"{route.name}-{i}", rng, order_type="market", lots=0.1)
            acks.append(js.publish(prefix + s["symbol"], orjson.dumps(s)))
        await asyncio.gather(*acks)
    await nc.close()


def now() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


async def floor(settings: Settings, route: Route, n: int) -> tuple[float, float]:
    """The bridge's work in the fewest lines nats-py and aiokafka allow; returns :func:`now`
    at the last ack (closing the clients is left out, as for the bridge)."""
    nc = await nats.connect(**settings.nats_options())
    producer = AIOKafkaProducer(**settings.producer_options(), enable_idempotence=False)
    await producer.start()
    try:
        sub = await nc.jetstream().pull_subscribe(
            route.subject, durable=route.name, stream=route.stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                                  max_ack_pending=BATCH * 4, filter_subject=route.subject))
        done = 0
        while done < n:
            msgs = await sub.fetch(BATCH, timeout=5)
            futures = []
            for m in msgs:
                s = from_json(ApprovedSignal, m.data)
                futures.append(await producer.send(route.topic, m.data, key=s.signal_id.encode()))
            await asyncio.gather(*futures)
            for m in msgs:
                await m.ack()
            done += len(msgs)
        return now()
    finally:
        await producer.stop()
        await nc.close()


class _CountingBridge(Bridge):
    """The bridge, telling when ``n`` messages are acknowledged to NATS."""

    def __init__(self, settings: Settings, route: Route, n: int) -> None:
        super().__init__(settings, (route,), notify=False)  # the signals route alone, as its floor
        self.n, self.acked, self.all_acked = n, 0, asyncio.Event()

    async def _forward(self, route: Route, msgs: list) -> None:
        await super()._forward(route, msgs)
        self.acked += len(msgs)
        if self.acked >= self.n:
            self.all_acked.set()


async def bridge(settings: Settings, route: Route, n: int) -> tuple[float, float]:
    """The bridge; returns :func:`now` at its last ack (its stop waits for a fetch to time out)."""
    b = _CountingBridge(settings, route, n)
    await b.start()
    try:
        await asyncio.wait_for(b.all_acked.wait(), timeout=600)
        done = now()
        assert b.stats.forwarded[route.topic] == n and not b.stats.dead_lettered, b.stats
        return done
    finally:
        await b.stop()


async def measure(settings: Settings, run, route: Route, n: int) -> tuple[float, float]:
    """(CPU ms per message, msg/s) of one drain of ``n`` messages."""
    await fill(settings, route, n)
    cpu, wall = now()
    cpu_done, wall_done = await run(settings, route, n)
    return 1000 * (cpu_done - cpu) / n, n / (wall_done - wall)


async def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=2)
    add_broker_arg(ap)
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-bridge-floor-"))
    stack = LocalStack(workdir=workdir / "stack", broker=args.broker).start()
    try:
        settings = Settings(kafka_bootstrap=stack.kafka_url, nats_url=stack.nats_url, data_dir=workdir / "data",
                            **stack.settings_fields())
        print(f"{broker_line(settings, args.broker)}; messages={args.messages} per run; "
              f"pull batch {BATCH}; producer acks={settings.producer_options().get('acks')}", flush=True)
        results: dict[str, list[tuple[float, float]]] = {"floor": [], "bridge": []}
        for r in range(args.rounds):
            order = ("floor", "bridge") if r % 2 == 0 else ("bridge", "floor")
            for name in order:
                run = floor if name == "floor" else bridge
                cpu, rate = await measure(settings, run, route_for(f"{name}{r}"), args.messages)
                results[name].append((cpu, rate))
                print(f"round {r + 1} {name:6s}: {cpu:6.3f} ms CPU/message  {rate:8.0f} msg/s", flush=True)
        med = {k: (statistics.median(c for c, _ in v), statistics.median(m for _, m in v)) for k, v in results.items()}
        print(f"median of {args.rounds} rounds:")
        print(f"  floor  (nats-py + aiokafka loop): {med['floor'][0]:6.3f} ms CPU/message  {med['floor'][1]:8.0f} msg/s")
        print(f"  bridge (app.bridge.Bridge):       {med['bridge'][0]:6.3f} ms CPU/message  {med['bridge'][1]:8.0f} msg/s")
        print(f"  ratio bridge / floor: CPU {med['bridge'][0] / med['floor'][0]:.2f}, "
              f"throughput {med['bridge'][1] / med['floor'][1]:.2f}")
        return med
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
