"""The whole stack beside its floor: CPU per signal, throughput and signal-to-broker latency
of the same work done by plain nats-py + aiokafka + rocksdict processes.

    python bench/stack_floor.py [--signals 2000] [--partitions 4] [--rates 300] [--broker kafka|tansu]

Issue #16's stack targets (whole stack <= 4 ms CPU/signal, >= 5 % of the raw pass-through,
p50 <= 5 ms and p99 <= 20 ms at 300 signals/s) are judged here against what the same work
costs without the service's code.  On one stack (``tests/pipeline.Pipeline``):

1. end to end, as ``bench/throughput.py``: market signals published to NATS until every order
   is FILLED; CPU per signal of each process; the raw aiokafka pass-through (msg/s) beside it;
2. the records of that run (``bench.worker_floor.Work``): what the worker consumed and
   produced, the connector requests, and of what it consumed, which records came through the
   bridge (the signals and the broker's fills) and which it wrote itself (its internal topics);
   then the service's processes are stopped: the floor has the broker and nats-server alone;
3. the floor stack, doing that work with no logic:
   - *bridge* (a process): two JetStream pull routes, signals and fills (batches of 256, each
     message validated by the project's model, produced with the service's producer settings,
     NATS acks after Kafka's; fills wait 10 ms after a short batch, as the bridge's do), and
     the notifier (the order updates read from Kafka, published to JetStream with a
     ``Nats-Msg-Id``, acks awaited together, then the offsets committed);
   - *worker* (this process): ``bench/worker_floor.py``'s loop (batches, orjson decode and a
     RocksDB read per record, outputs produced and acked, then the changelog records written
     to RocksDB, offsets committed on the commit interval); the order updates go to the
     notifier's topic, and each signal's connector request leaves as soon as its batch is done;
   - *connector* (a process): answers each request and notes when it arrived.
   Its load comes from a *source* process (not counted, as the bench publisher is not): the
   run's signals and fills published to JetStream (each signal stamped with its publish time),
   the worker's internal records written to Kafka, at each ``--rates`` and as a backlog.

Prints, per floor run: signals/s passed, CPU ms per signal by process beside the end-to-end
run's, and for the paced runs the latency from a signal's NATS publish to its request's
arrival at the connector, p50/p99, beside the direct path (requests published straight to
the connector at the same rate, same clock).
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nats
import orjson
import rocksdict
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.topics import FILLS, ORDERS_STATUS, SIGNALS_APPROVED

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: bench.common
from bench.common import broker_line, percentile, run_main  # noqa: E402
from bench.throughput import cpu_seconds, end_to_end, passthrough  # noqa: E402
from bench.worker_floor import CONSUMED, PRODUCED, Work, floor_args, floor_pipeline, share, write_tables  # noqa: E402


BATCH = 256
SENT = "Floor-Sent"  # header: a signal's publish time (time.time()), NATS -> Kafka -> request
TIMEOUT = 120.0  # seconds a floor run may take to pass its records before it is given up


def names(tag: str) -> dict[str, str]:
    """A floor run's topics, streams and subjects."""
    up = tag.upper()
    return {"in": f"floor.{tag}.in", "out": f"floor.{tag}.out", "status": f"floor.{tag}.status",
            "signals": f"floor.{tag}.signals", "fills": f"floor.{tag}.fills", "updates": f"floor.{tag}.updates",
            "submit": f"floor.{tag}.submit", "report": f"floor.{tag}.report",
            "SIGNALS": f"FLOOR_{up}_SIGNALS", "FILLS": f"FLOOR_{up}_FILLS", "UPDATES": f"FLOOR_{up}_UPDATES"}


class Load(Work):
    """The run's records, and of the consumed ones which arrive how: (kind, key, value) with
    kind ``signal`` and ``fill`` (NATS, through the bridge) or ``kafka`` (the worker's own)."""

    @classmethod
    async def of_run(cls, settings) -> "Load":
        w = await super().of_run(settings)
        kind = {SIGNALS_APPROVED: "signal", FILLS: "fill"}
        w.arrivals = [(kind.get(t, "kafka"), k, v) for t in CONSUMED for k, v in w.by_topic[t]]
        random.Random(7).shuffle(w.arrivals)
        w.status = w.by_topic[ORDERS_STATUS]
        # what the worker produces and consumes again (its answers, its executions) the source
        # writes for it: the broker takes each of those records once, as in the service
        w.other = [r for t in (*PRODUCED, *w.changelogs) if t != ORDERS_STATUS and t not in CONSUMED
                   for r in w.by_topic[t]]
        w.signals = sum(1 for k, _, _ in w.arrivals if k == "signal")
        return w


# --------------------------------------------------------------------------- the processes
# Each runs as ``python bench/stack_floor.py --role NAME ...`` and prints "ready" once connected.

async def role_source(args) -> None:
    """The load: the run's arrivals at ``rate`` signals/s (0: all at once), then "done"."""
    n = names(args.tag)
    arrivals = pickle.loads(Path(args.path).read_bytes())
    nc = await nats.connect(args.nats)
    js = nc.jetstream()
    producer = AIOKafkaProducer(bootstrap_servers=args.kafka, acks="all", enable_idempotence=False)
    await producer.start()
    print("ready", flush=True)
    signals = sum(1 for k, _, _ in arrivals if k == "signal")
    per_second = args.rate * len(arrivals) / max(1, signals)
    start, sent = time.perf_counter(), 0
    while sent < len(arrivals):
        due = min(len(arrivals), int((time.perf_counter() - start) * per_second) + 1) if args.rate else len(arrivals)
        acks = []
        for kind, key, value in arrivals[sent:due]:
            if kind == "kafka":
                acks.append(await producer.send(n["in"], value, key=key))
            else:
                headers = {SENT: repr(time.time())} if kind == "signal" else None
                acks.append(await js.publish_async(f"{n[kind + 's']}.x", value, headers=headers))
        sent = due
        await asyncio.gather(*acks)
        if args.rate:
            await asyncio.sleep(0.002)
    await producer.stop()
    await nc.close()
    print("done", flush=True)


async def role_bridge(args) -> None:
    """The bridge's and the notifier's work."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    from app.models import ApprovedSignal, Fill, from_json

    n = names(args.tag)
    nc = await nats.connect(args.nats)
    js = nc.jetstream()
    producer = AIOKafkaProducer(**orjson.loads(args.producer))
    await producer.start()

    async def route(subject: str, stream: str, model, key, linger: float) -> None:
        sub = await js.pull_subscribe(
            f"{subject}.>", durable=f"floor-{stream.lower()}", stream=stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                                  max_ack_pending=BATCH * 4))
        while True:
            try:
                msgs = await sub.fetch(BATCH, timeout=1)
            except (asyncio.TimeoutError, nats.errors.TimeoutError):
                continue
            futures = []
            for m in msgs:
                headers = [(SENT, m.headers[SENT].encode())] if m.headers and SENT in m.headers else None
                futures.append(await producer.send(n["in"], m.data, key=key(from_json(model, m.data)).encode(),
                                                   headers=headers))
            await asyncio.gather(*futures)
            for m in msgs:
                await m.ack()
            if linger and len(msgs) < BATCH:
                await asyncio.sleep(linger)

    async def notifier() -> None:
        consumer = AIOKafkaConsumer(n["status"], bootstrap_servers=args.kafka, group_id=f"floor-{args.tag}-notify",
                                    auto_offset_reset="earliest", enable_auto_commit=False,
                                    fetch_min_bytes=16384, fetch_max_wait_ms=50)
        await consumer.start()
        while True:
            batches = await consumer.getmany(timeout_ms=500)
            acks = [await js.publish_async(f"{n['updates']}.x", r.value,
                                           headers={"Nats-Msg-Id": f"{tp.partition}-{r.offset}"})
                    for tp, records in batches.items() for r in records]
            await asyncio.gather(*acks)
            if acks:
                await consumer.commit()

    tasks = [asyncio.create_task(route(n["signals"], n["SIGNALS"], ApprovedSignal, lambda s: s.signal_id, 0.0)),
             asyncio.create_task(route(n["fills"], n["FILLS"], Fill, lambda f: f.routing_key, 0.010)),
             asyncio.create_task(notifier())]
    print("ready", flush=True)
    await asyncio.gather(*tasks)


async def role_connector(args) -> None:
    """Answers each request; keeps the latency of those stamped with a publish time, by path."""
    n = names(args.tag)
    nc = await nats.connect(args.nats)
    seen: dict[str, list[float]] = {"stack": [], "direct": []}
    reply = b'{"retcode": 10009, "order": 1, "deal": 1, "volume": 0.1, "price": 1.1, "comment": "floor"}'

    async def answer(msg) -> None:
        if msg.headers and SENT in msg.headers:
            seen[msg.headers.get("Floor-Path", "stack")].append(time.time() - float(msg.headers[SENT]))
        await msg.respond(reply)

    async def report(msg) -> None:
        await msg.respond(orjson.dumps(seen))
        for v in seen.values():
            v.clear()

    await nc.subscribe(n["submit"], cb=answer)
    await nc.subscribe(n["report"], cb=report)
    await nc.flush()  # the subscriptions are the server's before "ready"
    print("ready", flush=True)
    await asyncio.Event().wait()


ROLES = {"source": role_source, "bridge": role_bridge, "connector": role_connector}


def spawn(role: str, settings, tag: str, **extra) -> subprocess.Popen:
    argv = [sys.executable, __file__, "--role", role, "--tag", tag, "--nats", settings.nats_url,
            "--kafka", settings.kafka_bootstrap_servers]
    for k, v in extra.items():
        argv += [f"--{k}", str(v)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"the floor's {role} did not start (exit {proc.wait()})")
    return proc


# --------------------------------------------------------------------------- one floor run
def check(procs: dict[str, subprocess.Popen]) -> None:
    """Raise if a process of the floor has failed."""
    for name, proc in procs.items():
        if proc.poll():
            raise RuntimeError(f"the floor's {name} exited with {proc.returncode}")


async def worker_loop(settings, load: Load, workdir: Path, partitions: int, n: dict, nc,
                      procs: dict[str, subprocess.Popen]) -> float:
    """The worker's floor; returns its CPU seconds, first fetch to last commit."""
    producer = AIOKafkaProducer(**settings.producer_options())
    await producer.start()
    dbs = [rocksdict.Rdict(str(workdir / f"{n['in']}-{p}.db"), options=rocksdict.Options(raw_mode=True))
           for p in range(partitions)]
    consumer = AIOKafkaConsumer(**settings.aiokafka_common(), group_id=n["in"], auto_offset_reset="earliest",
                                enable_auto_commit=False, fetch_max_wait_ms=settings.effective("consumer_fetch_max_wait_ms"))
    consumer.assign([TopicPartition(n["in"], p) for p in range(partitions)])
    await consumer.start()
    try:
        total, done = len(load.arrivals), 0
        taken = {"other": 0, "status": 0, "writes": 0, "requests": 0}
        extra = list(range(max(0, load.requests - load.signals)))  # requests not for a signal
        answers: list[asyncio.Future] = []  # the loop never waits for the connector, as the service does not
        cpu, committed = time.process_time(), time.perf_counter()
        deadline = time.monotonic() + TIMEOUT
        while done < total:
            check(procs)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the floor passed {done} of {total} records in {TIMEOUT:.0f} s")
            batches = await consumer.getmany(timeout_ms=500, max_records=settings.agent_batch_max)
            stamps = []
            for tp, records in batches.items():
                db = dbs[tp.partition]
                for r in records:
                    orjson.loads(r.value)
                    db.get(r.key)
                    stamps += [v for h, v in r.headers if h == SENT]
                done += len(records)
            other, taken["other"] = share(load.other, done, total, taken["other"])
            status, taken["status"] = share(load.status, done, total, taken["status"])
            await asyncio.gather(*[await producer.send(n["out"], v, key=k) for k, v in other],
                                 *[await producer.send(n["status"], v, key=k) for k, v in status])
            writes, taken["writes"] = share(load.writes, done, total, taken["writes"])
            write_tables(dbs, writes)
            more, taken["requests"] = share(extra, done, total, taken["requests"])
            answers += [asyncio.ensure_future(nc.request(n["submit"], b'{"order_id": "x", "volume": 0.1}', timeout=10,
                                                         headers={SENT: s.decode()})) for s in stamps]
            answers += [asyncio.ensure_future(nc.request(n["submit"], b'{"order_id": "%d", "volume": 0.1}' % i,
                                                         timeout=10)) for i in more]
            if done >= total or time.perf_counter() - committed >= settings.commit_interval:
                await consumer.commit()
                committed = time.perf_counter()
        await asyncio.gather(*answers)
        return time.process_time() - cpu
    finally:
        await consumer.stop()
        await producer.stop()
        for db in dbs:
            db.close()


async def direct(nc, n: dict, rate: float, count: int) -> None:
    """``count`` requests straight to the connector at ``rate``/s, stamped like the signals."""
    start, sent, pending = time.perf_counter(), 0, []
    while sent < count:
        due = min(count, int((time.perf_counter() - start) * rate) + 1)
        pending += [asyncio.ensure_future(nc.request(n["submit"], b'{"order_id": "d", "volume": 0.1}', timeout=10,
                                                     headers={SENT: repr(time.time()), "Floor-Path": "direct"}))
                    for _ in range(due - sent)]
        sent = due
        await asyncio.sleep(0.002)
    await asyncio.gather(*pending)


async def floor_run(settings, load: Load, workdir: Path, partitions: int, tag: str, rate: float | None,
                    pids: dict[str, int]) -> dict:
    """One floor run: its input at ``rate`` signals/s, or a backlog published beforehand."""
    from app.bridge import ensure_stream

    n = names(tag)
    admin = AIOKafkaAdminClient(**settings.aiokafka_common())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n[t], partitions, 1) for t in ("in", "out", "status")])
    finally:
        await admin.close()
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    for stream, subject in (("SIGNALS", "signals"), ("FILLS", "fills"), ("UPDATES", "updates")):
        await ensure_stream(js, n[stream], [f"{n[subject]}.>"])
    dump = workdir / f"{tag}.pickle"
    dump.write_bytes(pickle.dumps(load.arrivals))
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["connector"] = spawn("connector", settings, tag)
        if rate is None:  # a backlog: everything waits in NATS and Kafka before the clock starts
            procs["source"] = spawn("source", settings, tag, rate=0, path=dump)
            source_cpu = cpu_seconds(procs["source"].pid)
            assert (await asyncio.to_thread(procs["source"].stdout.readline)).strip() == "done"
            source_cpu = cpu_seconds(procs["source"].pid) - source_cpu
        else:
            await direct(nc, n, rate, load.signals)
        procs["bridge"] = spawn("bridge", settings, tag, producer=orjson.dumps(
            {**settings.producer_options(), "enable_idempotence": False}).decode())
        counted = {"bridge": procs["bridge"].pid, "simulator": procs["connector"].pid, **pids}  # by role
        before = {k: cpu_seconds(v) for k, v in counted.items()}
        wall = time.perf_counter()
        if rate is not None:
            procs["source"] = spawn("source", settings, tag, rate=rate, path=dump)
            source_cpu = cpu_seconds(procs["source"].pid)
        worker = await worker_loop(settings, load, workdir, partitions, n, nc, procs)
        while (await js.stream_info(n["UPDATES"])).state.messages < len(load.status):
            check(procs)
            if time.perf_counter() - wall > TIMEOUT:
                raise RuntimeError("the floor's notifier did not publish every order update")
            await asyncio.sleep(0.05)
        wall = time.perf_counter() - wall
        if rate is not None:
            source_cpu = cpu_seconds(procs["source"].pid) - source_cpu
        cpu = {k: cpu_seconds(v) - before[k] for k, v in counted.items()}
        cpu["worker"] = worker
        seen = orjson.loads((await nc.request(n["report"], b"", timeout=10)).data)
        assert len(seen["stack"]) == load.signals, (len(seen["stack"]), load.signals)
        tenth = max(1, len(seen["stack"]) // 10)  # in order of arrival: a queue shows as a growing latency
        return {"rate": rate, "wall": wall, "cpu": cpu, "load": source_cpu, "stack": sorted(seen["stack"]),
                "direct": sorted(seen["direct"]), "first": percentile(sorted(seen["stack"][:tenth]), 50),
                "last": percentile(sorted(seen["stack"][-tenth:]), 50)}
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
        await nc.close()


def ms(seconds: float) -> str:
    return f"{1000 * seconds:8.2f}"


async def main(argv: list[str] | None = None) -> dict:
    args = floor_args(argv)
    workdir, p = await floor_pipeline(args, "bench-stack-floor-")
    try:
        raw = await passthrough(p.settings, 20 * args.signals, args.partitions)
        e2e, _ = await end_to_end(p, args.signals, args.partitions)
        by_process = p.cpu_seconds
        service = {"broker": by_process[p.stack.broker], "nats-server": by_process["nats-server"],
                   "bridge": by_process["bridge"], "simulator": by_process["sim"],
                   "worker": sum(v for k, v in by_process.items() if k.startswith("worker"))}  # by role, as the floor's
        publisher = sum(v for k, v in by_process.items() if k.startswith("bench"))
        load = await Load.of_run(p.settings)
        p.services.stop_all()  # the floor has the broker and nats-server to itself
        pids = {"broker": p.stack.kafka.pid, "nats-server": p.stack.nats.pid}
        # first at the end-to-end rate: the batch sizes the service saw, the fair comparison
        runs = [await floor_run(p.settings, load, workdir, args.partitions, f"r{i}", rate, pids)
                for i, rate in enumerate([e2e, *args.rates])]
        runs.append(await floor_run(p.settings, load, workdir, args.partitions, "backlog", None, pids))
        n = args.signals
        print(f"{broker_line(p.settings, args.broker)}; partitions={args.partitions}; signals={n}")
        print(f"records per signal in the end-to-end run: {load.per_signal(n)}; through the bridge: "
              f"{sum(1 for k, _, _ in load.arrivals if k != 'kafka') / n:.2f}; order updates {len(load.status) / n:.2f}")
        print(f"raw aiokafka pass-through: {raw:.0f} msg/s (5 % of it: {0.05 * raw:.0f} signals/s)")
        heads = ["end to end"] + [f"floor {r['rate']:.0f}/s" if r["rate"] else "floor backlog" for r in runs]
        print(f"  {'':30}" + "".join(f"{h:>15}" for h in heads))
        print(f"  {'signals/s':30}{e2e:15.0f}" + "".join(f"{n / r['wall']:15.0f}" for r in runs))
        print(f"  {'  of the pass-through':30}{e2e / raw:15.2%}" + "".join(f"{n / r['wall'] / raw:15.2%}" for r in runs))
        print("  CPU ms/signal:")
        labels = {"broker": f"{p.stack.broker} (the broker)", "simulator": "simulator | floor's connector"}
        for name in ("worker", "broker", "bridge", "nats-server", "simulator"):
            print(f"    {labels.get(name, name):28}{1000 * service[name] / n:15.2f}"
                  + "".join(f"{1000 * r['cpu'][name] / n:15.2f}" for r in runs))
        stack_ms = 1000 * sum(service.values()) / n
        floors = [1000 * sum(r["cpu"].values()) / n for r in runs]
        print(f"    {'whole stack':28}{stack_ms:15.2f}" + "".join(f"{f:15.2f}" for f in floors))
        print(f"    {'load generator (not counted)':28}{1000 * publisher / n:15.2f}"
              + "".join(f"{1000 * r['load'] / n:15.2f}" for r in runs))
        print(f"  whole stack / its floor at the same rate: {stack_ms / floors[0]:.2f}")
        print("  latency of the floor, NATS publish -> the connector (ms), beside the direct path:")
        print(f"    {'signals/s':>10} {'p50':>8} {'p99':>8} {'direct p50':>11} {'direct p99':>11} {'p99 ratio':>10}"
              f" {'p50 first/last tenth':>22}")
        for r in runs[:-1]:
            s, d = r["stack"], r["direct"]
            print(f"    {r['rate']:10.0f} {ms(percentile(s, 50))} {ms(percentile(s, 99))} {ms(percentile(d, 50)):>11}"
                  f" {ms(percentile(d, 99)):>11} {percentile(s, 99) / percentile(d, 99):10.1f}"
                  f" {ms(r['first']):>13} /{ms(r['last'])}")
        print("issue #16's targets: whole stack <= 4 ms CPU/signal; >= 5 % of the pass-through; at 300 signals/s "
              "p50 <= 5 ms, p99 <= 20 ms (the service's latency: bench/latency.py)", flush=True)
        return {"passthrough": raw, "e2e": e2e, "stack_ms": stack_ms, "floor_ms": floors, "runs": runs, "load": load}
    finally:
        p.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def role_main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", choices=ROLES, required=True)
    for name in ("tag", "nats", "kafka", "path", "producer"):
        ap.add_argument(f"--{name}")
    ap.add_argument("--rate", type=float, default=0.0)
    asyncio.run(ROLES[ap.parse_args().role](ap.parse_args()))


if __name__ == "__main__":
    if "--role" in sys.argv:
        role_main()
    else:
        run_main(main)
