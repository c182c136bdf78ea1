"""The worker beside its floor: CPU per signal of the same record work, in one run.

    python bench/worker_floor.py [--signals 2000] [--partitions 4] [--broker kafka|tansu]

On one stack (``tests/pipeline.Pipeline``: broker, nats-server, simulator, bridge, one worker):

1. end to end, as ``bench/throughput.py``: market signals published to NATS until every
   order is FILLED and its fills applied; the worker's CPU per signal (``/proc``);
2. the records of that run, counted and copied: every record the worker consumed (its
   agents' input topics), every record it produced (its output topics and its tables'
   changelogs), the requests it sent to the connector (one per ``orders.commands`` record:
   the connector's answers).  (Order updates and alerts reach NATS through the bridge's
   notifier, not the worker: none are counted here.)
3. the floor: a plain aiokafka + rocksdict + nats-py loop doing that work and nothing more,
   on its own topics, in this process: consume the copied input records in batches, decode
   each (orjson) and read its key from RocksDB, produce the copied output records
   (``acks=all``, the service's producer settings) and wait for every ack, write the copied
   changelog records into RocksDB and send the requests to a responder in another process;
   commit the offsets on the worker's
   ``commit_interval``.  Its CPU is this process's (``time.process_time``), from its first
   fetch to its last commit; the broker's CPU meanwhile is printed beside it.

The floor runs three times: its input written by another process at the end-to-end rate (the
batch sizes the worker saw), at each ``--rates`` (300 signals/s: issue #16's rate), and as a
backlog written beforehand (the largest batches).

What the floor leaves out is the worker's own logic (the state machine, the models), Faust,
and the timers: the ratio worker / floor is what they cost, and the floor is what these
records cost with these libraries, at these batch sizes, on this machine, without any logic.
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
import orjson
import rocksdict
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from agents import orders, positions
from app.kafka_io import read_topic, topic_counts
from app.topics import (
    EXECUTIONS,
    EXECUTIONS_DLQ,
    FILLS_DLQ,
    ORDER_EXECUTION_ARCHIVE,
    ORDERS_COMMANDS,
    ORDERS_STATUS,
    POSITIONS,
    POSITIONS_DISCREPANCIES,
    SIGNALS_APPROVED,
    SIGNALS_DLQ,
    SINK_DLQ,
    SLIPPAGE_ALERTS,
    TABLES,
    changelog,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: bench.common
from bench.common import add_broker_arg, broker_line, run_main  # noqa: E402
from bench.throughput import BACKLOG_CONFIG, cpu_seconds, end_to_end, wait_settled  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

#: What the worker's agents consume (orders, positions).
CONSUMED = (*orders.INPUTS, *positions.INPUTS)
#: What the worker produces besides its changelogs.
PRODUCED = (ORDERS_COMMANDS, ORDER_EXECUTION_ARCHIVE, ORDERS_STATUS, EXECUTIONS, POSITIONS, SLIPPAGE_ALERTS,
            POSITIONS_DISCREPANCIES, SIGNALS_DLQ, FILLS_DLQ, EXECUTIONS_DLQ, SINK_DLQ)

FEEDER = """
import asyncio, pickle, sys, time
from aiokafka import AIOKafkaProducer
async def main():
    bootstrap, topic, rate, path = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    records = pickle.load(open(path, "rb"))
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False)
    await producer.start()
    start, sent, futures = time.perf_counter(), 0, []
    while sent < len(records):
        due = min(len(records), int((time.perf_counter() - start) * rate) + 1)
        futures += [await producer.send(topic, v, key=k) for k, v in records[sent:due]]
        sent = due
        await asyncio.sleep(0.005)
    await asyncio.gather(*futures)
    await producer.stop()
asyncio.run(main())
"""

RESPONDER = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    reply = b'{"retcode": 10009, "order": 1, "deal": 1, "volume": 0.1, "price": 1.1, "comment": "floor"}' * 2
    async def answer(msg): await msg.respond(reply)
    await nc.subscribe("floor.submit", cb=answer)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


class Work:
    """The records of the end-to-end run the floor repeats."""

    def __init__(self) -> None:
        self.consumed: list[tuple[bytes, bytes]] = []
        self.produced: list[tuple[bytes, bytes]] = []
        self.writes: list[tuple[bytes, bytes | None]] = []  # changelog records: RocksDB puts
        self.requests = 0

    @classmethod
    async def of_run(cls, settings) -> "Work":
        w = cls()
        changelogs = [changelog(t, settings) for t in TABLES]
        by_topic = {}
        for topic in {*CONSUMED, *PRODUCED, *changelogs}:
            by_topic[topic] = [(r.key or b"", r.value or b"") for r in await read_topic(settings, topic, idle=0.0)]
        for topic in CONSUMED:
            w.consumed += by_topic[topic]
        random.Random(7).shuffle(w.consumed)  # the topics interleaved, as they arrive
        for topic in (*PRODUCED, *changelogs):
            w.produced += by_topic[topic]
        for topic in changelogs:
            w.writes += by_topic[topic]
        w.requests = len(by_topic[ORDERS_COMMANDS])
        w.by_topic, w.changelogs = by_topic, changelogs
        return w

    def per_signal(self, n: int) -> str:
        return (f"consumed {len(self.consumed) / n:.2f}, produced {len(self.produced) / n:.2f} "
                f"(of which changelog {len(self.writes) / n:.2f}), "
                f"NATS requests {self.requests / n:.2f}")


def share(items: list, done: int, total: int, taken: int) -> tuple[list, int]:
    """The items due once ``done`` of ``total`` inputs are handled (spread evenly), from ``taken``."""
    due = len(items) * done // total
    return items[taken:due], due


def write_tables(dbs: list, writes: list[tuple[bytes, bytes | None]]) -> None:
    """The changelog records into the RocksDB partitions (None: a delete), as Faust's store does."""
    for k, v in writes:
        db = dbs[hash(k) % len(dbs)]
        if v is None:
            db.delete(k)
        else:
            db[k] = v


async def floor(settings, work: Work, workdir: Path, partitions: int, tag: str,
                rate: float | None = None, broker_pid: int | None = None) -> tuple[float, float, float]:
    """The loop over the input records, written beforehand (a backlog) or, with ``rate``, by
    another process at ``rate`` records/s while the loop runs; returns (CPU seconds, wall
    seconds, the broker's CPU seconds) from its first fetch to its last commit."""
    source = f"floor.{tag}.in"
    admin = AIOKafkaAdminClient(**settings.aiokafka_common())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, partitions, 1) for t in (source, f"floor.{tag}.out")])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(**settings.producer_options())
    await producer.start()
    responder = subprocess.Popen([sys.executable, "-c", RESPONDER, settings.nats_url], stdout=subprocess.PIPE, text=True)
    nc = await nats.connect(settings.nats_url)
    consumer = feeder = None
    try:
        if rate is None:
            await asyncio.gather(*[await producer.send(source, v, key=k) for k, v in work.consumed])
        assert responder.stdout.readline().strip() == "ready"
        dbs = [rocksdict.Rdict(str(workdir / f"floor-{tag}-{p}.db"), options=rocksdict.Options(raw_mode=True))
               for p in range(partitions)]
        # assigned, not subscribed: no group join in the figure, and the loop reads from the
        # first record on, before the paced input starts arriving
        consumer = AIOKafkaConsumer(**settings.aiokafka_common(), group_id=f"floor-{tag}",
                                    auto_offset_reset="earliest", enable_auto_commit=False,
                                    fetch_max_wait_ms=settings.effective("consumer_fetch_max_wait_ms"))
        consumer.assign([TopicPartition(source, p) for p in range(partitions)])
        await consumer.start()
        if rate is not None:
            dump = workdir / f"floor-{tag}.pickle"
            dump.write_bytes(pickle.dumps(work.consumed))
            feeder = subprocess.Popen([sys.executable, "-c", FEEDER, settings.kafka_bootstrap_servers, source, str(rate), str(dump)])
        total, done = len(work.consumed), 0
        taken = {"produced": 0, "writes": 0, "requests": 0}
        request_ids = list(range(work.requests))
        cpu, wall, broker = time.process_time(), time.perf_counter(), cpu_seconds(broker_pid)
        committed = wall
        while done < total:
            if feeder is not None and feeder.poll():
                raise RuntimeError(f"the feeder exited with {feeder.returncode}")
            batches = await consumer.getmany(timeout_ms=500, max_records=settings.agent_batch_max)
            for tp, records in batches.items():
                db = dbs[tp.partition]
                for r in records:
                    orjson.loads(r.value)
                    db.get(r.key)
                done += len(records)
            out, taken["produced"] = share(work.produced, done, total, taken["produced"])
            await asyncio.gather(*[await producer.send(f"floor.{tag}.out", v, key=k) for k, v in out])
            writes, taken["writes"] = share(work.writes, done, total, taken["writes"])
            write_tables(dbs, writes)
            requests, taken["requests"] = share(request_ids, done, total, taken["requests"])
            await asyncio.gather(
                *(nc.request("floor.submit", b'{"order_id": "%d", "volume": 0.1}' % i, timeout=10) for i in requests))
            if done >= total or time.perf_counter() - committed >= settings.commit_interval:
                await consumer.commit()  # on the worker's commit interval, as Faust does
                committed = time.perf_counter()
        return time.process_time() - cpu, time.perf_counter() - wall, cpu_seconds(broker_pid) - broker
    finally:
        if consumer is not None:
            await consumer.stop()
        await producer.stop()
        await nc.close()
        for proc in (responder, feeder):
            if proc is not None:
                proc.kill()
                proc.wait()


def floor_args(argv: list[str] | None) -> argparse.Namespace:
    """The floor scripts' arguments: --signals, --partitions, --rates, --broker."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--signals", type=int, default=2000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--rates", type=float, nargs="*", default=[300.0],
                    help="signals/s at which the floor's input also arrives (besides the end-to-end rate)")
    add_broker_arg(ap)
    return ap.parse_args(argv)


async def floor_pipeline(args: argparse.Namespace, prefix: str):
    """(workdir, a started and settled stack with one worker) for a floor script's end-to-end run."""
    from pipeline import Pipeline

    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    p = Pipeline(workdir, partitions=args.partitions, config=BACKLOG_CONFIG, broker=args.broker)
    try:
        await p.start(workers=1)
        await wait_settled(p)
    except BaseException:
        p.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return workdir, p


async def main(argv: list[str] | None = None) -> dict:
    args = floor_args(argv)
    workdir, p = await floor_pipeline(args, "bench-worker-floor-")
    try:
        e2e, _ = await end_to_end(p, args.signals, args.partitions)
        worker_ms = 1000 * sum(sec for name, sec in p.cpu_seconds.items() if name.startswith("worker")) / args.signals
        counts = await topic_counts(p.settings, [SIGNALS_APPROVED])
        assert counts[SIGNALS_APPROVED] == args.signals, counts
        work = await Work.of_run(p.settings)
        n = args.signals
        broker_pid = p.stack.kafka.pid
        per_signal = len(work.consumed) / n
        runs = []  # (label, rate or None, CPU s, wall s, broker CPU s)
        for i, rate in enumerate([e2e, *args.rates]):
            runs.append((f"paced{i}", rate, *await floor(p.settings, work, workdir, args.partitions, f"paced{i}",
                                                         rate=rate * per_signal, broker_pid=broker_pid)))
        runs.append(("backlog", None, *await floor(p.settings, work, workdir, args.partitions, "backlog",
                                                   broker_pid=broker_pid)))
        print(f"{broker_line(p.settings, args.broker)}; partitions={args.partitions}; signals={n}")
        print(f"records per signal in the end-to-end run: {work.per_signal(n)}")
        print(f"worker, end to end at {e2e:.0f} signals/s: {worker_ms:6.2f} ms CPU/signal")
        print("floor (this process), and the broker's CPU meanwhile:")
        print(f"  {'input arriving at':>24} {'passed/s':>9} {'ms CPU/signal':>14} {'cores':>6} {'broker ms/signal':>17} {'cores':>6}")
        for label, rate, cpu, wall, broker in runs:
            what = f"{rate:.0f} signals/s" if rate is not None else "a backlog"
            print(f"  {what:>24} {n / wall:9.0f} {1000 * cpu / n:14.2f} {cpu / wall:6.2f} {1000 * broker / n:17.2f} "
                  f"{broker / wall:6.2f}")
        paced_ms = 1000 * runs[0][2] / n
        backlog_ms = 1000 * runs[-1][2] / n
        print(f"ratio worker / floor at the same rate: {worker_ms / paced_ms:.2f}; "
              f"issue #16's target: 1.5 ms CPU/signal", flush=True)
        return {"worker_ms": worker_ms, "paced_ms": paced_ms, "backlog_ms": backlog_ms, "work": work}
    finally:
        p.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
