"""End-to-end throughput on one worker, beside a raw aiokafka pass-through on the same broker.

    python bench/throughput.py [--signals 2000] [--partitions 4]

Prints, in one run on the same Tansu broker:

* baseline: raw aiokafka consume -> produce pass-through (msg/s), with the same producer
  settings as the service;
* end to end: approved signals published to NATS until every order is FILLED and its fills
  are applied (signals/s);
* the ratio, and the setting ``producer_max_batch_size`` both ran with (Tansu's local
  profile forces one record per batch; see app/settings.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402

from app.kafka_io import topic_counts  # noqa: E402
from app.sample import REFERENCE, signal_dict  # noqa: E402
from app.topics import EXECUTIONS, ORDERS_STATUS  # noqa: E402


async def passthrough(settings, n: int, partitions: int) -> float:
    admin = AIOKafkaAdminClient(**settings.aiokafka_common())
    await admin.start()
    await admin.create_topics([NewTopic(t, partitions, 1) for t in ("bench.in", "bench.out")])
    await admin.close()
    producer = AIOKafkaProducer(**settings.producer_options())
    await producer.start()
    payload = os.urandom(300)
    futs = [await producer.send("bench.in", payload, key=str(i).encode()) for i in range(n)]
    await asyncio.gather(*futs)
    consumer = AIOKafkaConsumer("bench.in", **settings.aiokafka_common(), group_id="bench", auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    start, done = time.perf_counter(), 0
    while done < n:
        batch = await consumer.getmany(timeout_ms=500, max_records=1000)
        out = []
        for msgs in batch.values():
            for m in msgs:
                out.append(await producer.send("bench.out", m.value, key=m.key))
        await asyncio.gather(*out)
        await consumer.commit()
        done += len(out)
    elapsed = time.perf_counter() - start
    await consumer.stop()
    await producer.stop()
    return n / elapsed


async def end_to_end(p, n: int, partitions: int) -> tuple[float, float]:
    from tables.idempotency import order_id_for

    for symbol, (mid, _) in REFERENCE.items():
        await p.sim(cmd="set_price", symbol=symbol, mid=mid, hold=True)
    rng = random.Random(1)
    signals = [signal_dict(f"bench-{i}", rng, order_type="market", lots=0.1) for i in range(n)]
    ids = {order_id_for(s["signal_id"], partitions) for s in signals}
    start = time.perf_counter()
    await p.publish_signals(signals)
    published = time.perf_counter() - start
    while True:
        counts = await topic_counts(p.settings, [EXECUTIONS, ORDERS_STATUS])
        if counts[EXECUTIONS] >= n:
            break
        await asyncio.sleep(0.2)
    elapsed = time.perf_counter() - start
    orders = await p.orders()
    assert sum(1 for i in ids if orders[i].state.value == "FILLED") == n
    return n / elapsed, n / published


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--signals", type=int, default=2000)
    ap.add_argument("--partitions", type=int, default=4)
    args = ap.parse_args()
    from pipeline import Pipeline

    p = Pipeline(Path(tempfile.mkdtemp(prefix="bench-")), partitions=args.partitions, config={})
    await p.start()
    try:
        s = p.settings
        print(f"broker: Tansu (local profile); producer_max_batch_size={s.effective('producer_max_batch_size')}; "
              f"partitions={args.partitions}; signals={args.signals}")
        raw = await passthrough(s, args.signals, args.partitions)
        e2e, pub = await end_to_end(p, args.signals, args.partitions)
        print(f"raw aiokafka consume->produce pass-through: {raw:10.0f} msg/s")
        print(f"end to end NATS -> FILLED order + position:  {e2e:10.0f} signals/s (publisher alone: {pub:.0f}/s)")
        print(f"ratio end-to-end / pass-through: {e2e / raw:.2f}")
    finally:
        p.stop()


if __name__ == "__main__":
    asyncio.run(main())
