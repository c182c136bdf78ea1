"""One Kafka hop on the local broker: produce -> consume latency by consumer ``fetch_max_wait_ms``.

    python bench/fetch_wait.py [--waits 1500 500 50 5] [--messages 60] [--rate 20]

Why: at low rates ``bench/latency.py`` shows about 0.4 s between the bridge's Kafka record
and the broker submission, whatever the rate.  Faust's aiokafka consumer is created with
``fetch_max_wait_ms=1500`` (hard-coded in ``faust/transport/drivers/aiokafka.py``).  A broker
that answers a waiting fetch as soon as records arrive makes that wait harmless; this script
shows what the local broker does with it.  For each wait, on one fresh Tansu: a raw aiokafka
consumer (no group) tails a topic while a producer with the service's settings sends
``--messages`` records at ``--rate``/s, each carrying its send time; prints p50/p99/max of
receive minus send, and the ratio of the p50 to the smallest wait's p50 (the baseline).

Prints the broker and its settings (``bench.common.broker_line``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import shutil
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.local import LocalStack
from app.settings import Settings
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: bench.common
from bench.common import add_broker_arg, broker_line, percentile, run_main  # noqa: E402


async def hop(settings: Settings, topic: str, partitions: int, wait_ms: int, n: int, rate: float) -> list[float]:
    """Latencies (ms, ascending) of ``n`` records sent at ``rate`` through one consumer."""
    consumer = AIOKafkaConsumer(**settings.aiokafka_common(), enable_auto_commit=False, fetch_max_wait_ms=wait_ms)
    await consumer.start()
    producer = AIOKafkaProducer(**settings.producer_options())
    await producer.start()
    try:
        tps = [TopicPartition(topic, q) for q in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        got: list[float] = []

        async def consume() -> None:
            while len(got) < n:
                for msgs in (await consumer.getmany(timeout_ms=2000)).values():
                    now = time.time()
                    got.extend((now - float(m.value.decode())) * 1000.0 for m in msgs)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.5)  # the consumer's first fetches are in flight
        start = time.perf_counter()
        for i in range(n):
            await producer.send_and_wait(topic, repr(time.time()).encode(), key=str(i).encode())
            await asyncio.sleep(max(0.0, start + (i + 1) / rate - time.perf_counter()))
        await asyncio.wait_for(task, 30 + 3 * wait_ms / 1000)
        return sorted(got)
    finally:
        await producer.stop()
        await consumer.stop()


async def main(argv: list[str] | None = None) -> dict[int, list[float]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--waits", type=int, nargs="+", default=[1500, 500, 50, 5], help="fetch_max_wait_ms values")
    ap.add_argument("--messages", type=int, default=60)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--partitions", type=int, default=4)
    add_broker_arg(ap)
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-fetch-wait-"))
    stack = LocalStack(workdir=workdir, broker=args.broker).start()
    out: dict[int, list[float]] = {}
    try:
        s = Settings(kafka_bootstrap=stack.kafka_url, nats_url=stack.nats_url, topic_partitions=args.partitions,
                     profile=stack.profile)
        admin = AIOKafkaAdminClient(**s.aiokafka_common())
        await admin.start()
        await admin.create_topics([NewTopic("bench.hop", args.partitions, 1)])
        await admin.close()
        for w in args.waits:
            out[w] = await hop(s, "bench.hop", args.partitions, w, args.messages, args.rate)
        print(f"{broker_line(s, args.broker)}; partitions={args.partitions}; "
              f"{args.messages} records at {args.rate:.0f}/s per wait")
        base = percentile(out[min(args.waits)], 50)
        print(f"  {'fetch_max_wait_ms':>17} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {f'p50 / p50 at {min(args.waits)}':>16}")
        for w, lat in out.items():
            note = "  (Faust's consumer)" if w == 1500 else ""
            print(f"  {w:17d} {percentile(lat, 50):8.1f} {percentile(lat, 99):8.1f} {lat[-1]:8.1f} "
                  f"{percentile(lat, 50) / base:16.0f}{note}")
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return out


if __name__ == "__main__":
    run_main(main)
