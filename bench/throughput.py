"""End-to-end throughput on one worker, beside a raw aiokafka pass-through on the same broker.

    python bench/throughput.py [--signals 2000] [--partitions 4] [--workers 1 2]

Prints, in one run on the same Tansu broker:

* baseline: raw aiokafka consume -> produce pass-through (msg/s), with the same producer
  settings as the service;
* end to end: approved signals published to NATS until every order is FILLED and its fills
  are applied (signals/s);
* the ratio, and the broker settings both ran with (``producer_max_batch_size``,
  ``broker_end_offsets_check``; see app/settings.py);
* with ``--workers 1 2``: the end-to-end figure with each number of workers (a fresh stack
  for each, the same signals, measured once every worker is healthy and the assignment
  settled), side by side with the ratio to the first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.kafka_io import topic_counts
from app.sample import signal_dict
from app.topics import EXECUTIONS, ORDERS_STATUS
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: bench.common
from bench.common import add_broker_arg, broker_line, run_main  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


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


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def processes(p) -> dict[str, int | None]:
    """The stack's processes by name: the broker, nats-server, each service, this script."""
    procs = {p.stack.broker: p.stack.kafka.pid, "nats-server": p.stack.nats.pid}
    for name, svc in p.services.running.items():
        procs[name] = svc.proc.pid if svc.proc else None
    procs["bench (publisher, reader)"] = os.getpid()
    return procs


def cpu_report(before: dict[str, float], after: dict[str, float], n: int, wall: float) -> list[str]:
    """CPU per signal by process, and the rate those costs allow on this machine's cores."""
    used = {k: after[k] - before.get(k, 0.0) for k in after}
    total = sum(used.values())
    cores = os.cpu_count() or 1
    lines = [f"CPU per signal during the end-to-end run ({wall:.1f} s wall, {total / wall:.2f} of {cores} cores busy):"]
    for name, sec in sorted(used.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:28s} {1000 * sec / n:7.2f} ms/signal  ({sec / wall:.2f} cores)")
    if total > 0:
        lines.append(f"  {'all':28s} {1000 * total / n:7.2f} ms/signal -> at most {cores * n / total:.0f} signals/s "
                     f"on {cores} cores with every core busy")
    return lines


#: The hub config of a backlog run: signals published at once wait their turn for longer than
#: the default ``max_signal_age_seconds`` when the service is slower than the publisher, and
#: would end REJECTED as stale (the rule working, not what is measured here).
BACKLOG_CONFIG = {"operational": {"order_defaults": {"max_signal_age_seconds": 3600}}}
#: Seconds without a new execution or order status before a run is given up as stalled.
STALL_SECONDS = 60.0


async def end_to_end(p, n: int, partitions: int, name: str = "bench", stall: float = STALL_SECONDS) -> tuple[float, float]:
    """Publish ``n`` market signals (ids ``{name}-{i}``) and wait until each has its execution;
    (signals/s end to end, signals/s published).  Sets ``p.cpu`` and ``p.cpu_seconds``.
    Raises RuntimeError (with the orders by state) after ``stall`` seconds without progress."""
    from tables.idempotency import order_id_for

    await p.hold_reference_prices()
    rng = random.Random(1)
    signals = [signal_dict(f"{name}-{i}", rng, order_type="market", lots=0.1) for i in range(n)]
    ids = {order_id_for(s["signal_id"], partitions) for s in signals}
    before = await topic_counts(p.settings, [EXECUTIONS, ORDERS_STATUS])  # an earlier pass's
    procs = processes(p)
    cpu_before = {k: cpu_seconds(v) for k, v in procs.items()}
    start = time.perf_counter()
    await p.publish_signals(signals)
    published = time.perf_counter() - start
    seen, progress = -1, time.monotonic()
    while True:
        counts = await topic_counts(p.settings, [EXECUTIONS, ORDERS_STATUS])
        done = counts[EXECUTIONS] - before[EXECUTIONS]
        if done >= n:
            break
        moved = counts[EXECUTIONS] + counts[ORDERS_STATUS]  # fills, or at least orders moving
        if moved > seen:
            seen, progress = moved, time.monotonic()
        elif time.monotonic() - progress > stall:
            orders = await p.orders()
            states = Counter(orders[i].state.value if i in orders else "missing" for i in ids)
            raise RuntimeError(f"nothing new for {stall:.0f} s: {done} of {n} executions; "
                               f"orders by state {dict(states)}"
                               f" (logs in {p.workdir})")
        await asyncio.sleep(0.2)
    elapsed = time.perf_counter() - start
    cpu_after = {k: cpu_seconds(v) for k, v in procs.items()}
    p.cpu = cpu_report(cpu_before, cpu_after, n, elapsed)
    p.cpu_seconds = {k: cpu_after[k] - cpu_before.get(k, 0.0) for k in cpu_after}  # by process name
    orders = await p.orders()
    assert sum(1 for i in ids if orders[i].state.value == "FILLED") == n
    return n / elapsed, n / published


def worker_health(port: int) -> dict | None:
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return json.loads(r.read())
    except (OSError, ValueError):  # not up yet, or 503 while it recovers or rebalances
        return None


def restarts_seen(p) -> int:
    return getattr(p.services, "restarts", 0) if p.services else 0


async def wait_settled(p, timeout: float = 120.0) -> float:
    """Wait until every worker is healthy (tables recovered, not rebalancing) with the same
    partition assignment on two polls a second apart: joining workers rebalance the others."""
    workers = [svc for svc in p.services.running.values() if svc.argv[0] == "worker"]
    start = time.monotonic()
    deadline = start + timeout
    last = None
    while time.monotonic() < deadline:
        health = [await asyncio.to_thread(worker_health, svc.web_port) for svc in workers]
        now = [h["assigned_partitions"] if h and h.get("status") == "ok" else None for h in health]
        if None not in now and all(now) and now == last:
            return time.monotonic() - start
        last = now
        await asyncio.sleep(1.0)
    raise TimeoutError(f"workers not settled after {timeout}s: {last}")


async def run_workers(args, workers: int, with_passthrough: bool) -> tuple[float | None, float, float, object, list[str]]:
    """A fresh stack with ``workers`` workers: (pass-through msg/s or None, end-to-end, publisher)."""
    from pipeline import Pipeline

    p = Pipeline(Path(tempfile.mkdtemp(prefix="bench-throughput-")), partitions=args.partitions, config=BACKLOG_CONFIG,
                 broker=args.broker)
    await p.start(workers=workers)
    clean = False
    try:
        await wait_settled(p)
        raw = await passthrough(p.settings, args.signals, args.partitions) if with_passthrough else None
        if args.warmup:  # the same work first, unmeasured: the JVM's JIT compiles the broker's hot paths
            await end_to_end(p, args.warmup, args.partitions, name="warmup")
        e2e, pub = await end_to_end(p, args.signals, args.partitions)
        restarts = restarts_seen(p)
        if restarts:
            print(f"NOTE: with {workers} worker(s) the stall watchdog restarted a worker {restarts} times "
                  f"during the run (a restart stops that worker for its startup and recovery); logs in {p.workdir}",
                  flush=True)
        clean = not restarts
        return raw, e2e, pub, p.settings, p.cpu
    finally:
        p.stop()
        if clean:  # kept after restarts or a failure: the logs say why
            shutil.rmtree(p.workdir, ignore_errors=True)


async def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--signals", type=int, default=2000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[1],
                    help="worker counts to compare, e.g. 1 2 (a fresh stack for each, same signals)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="signals passed end to end first, unmeasured, on the same stack")
    add_broker_arg(ap)
    args = ap.parse_args(argv)
    runs: dict[int, tuple[float, float]] = {}
    raw = None
    for i, w in enumerate(args.workers):
        r, e2e, pub, s, cpu = await run_workers(args, w, with_passthrough=i == 0)
        runs[w] = (e2e, pub)
        if i == 0:
            raw = r
            print(f"{broker_line(s, args.broker)}; partitions={args.partitions}; signals={args.signals}"
                  + (f" after {args.warmup} unmeasured" if args.warmup else ""))
            print(f"raw aiokafka consume->produce pass-through: {raw:10.0f} msg/s")
            print(f"end to end NATS -> FILLED order + position:  {e2e:10.0f} signals/s (publisher alone: {pub:.0f}/s)"
                  + ("" if w == 1 else f" [{w} workers]"))
            print(f"ratio end-to-end / pass-through: {e2e / raw:.2f}", flush=True)
        if i > 0:
            print(f"[{w} workers] end to end {e2e:.0f} signals/s")
        print("\n".join(cpu), flush=True)
    if len(runs) > 1:
        first = args.workers[0]
        print(f"scale-out (a fresh stack per worker count, {args.signals} signals each; "
              f"the pass-through ran on the first stack):")
        print(f"  {'workers':>7} {'signals/s':>10} {'publisher/s':>12} {f'vs {first} worker(s)':>16} {'vs pass-through':>16}")
        for w, (e2e, pub) in runs.items():
            print(f"  {w:7d} {e2e:10.0f} {pub:12.0f} {e2e / runs[first][0]:16.2f} {e2e / raw:16.2f}")
    return {"passthrough": raw, "runs": runs}


if __name__ == "__main__":
    run_main(main)
