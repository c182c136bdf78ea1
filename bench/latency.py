"""Latency from NATS publish to broker submission, at fixed publish rates.

    python bench/latency.py [--rates 100 1000 5000] [--seconds 2] [--max-signals 2000] [--signals N]

One local stack (Tansu, nats-server, the MT5 simulator, the bridge, one worker), prices held
at the reference mids so market orders fill without requotes.  For each rate:

* baseline ("direct"): the same number of trade requests published straight to
  ``mt5.orders.submit`` at the same rate: the broker hop alone, no bridge, Kafka or worker
  (on a closed market, so they are refused without deals and add no fills to the service);
* the service: approved signals published to JetStream (``signals.approved.<symbol>``) at the
  rate, paced by the clock; each signal's publish time (``time.time()`` just before the
  publish) is matched with the time the simulator received the order's first trade request
  (its ``receipts``: the order id is ``tables.idempotency.order_id_for(signal_id,
  partitions)``, the MT5 comment ``tables.order_types.comment_for(order_id)``), same machine,
  same wall clock.  The service's latency is also split at the signal's Kafka record on
  ``signals.approved`` (its CreateTime, millisecond resolution): NATS -> Kafka (the bridge)
  and Kafka -> broker (the worker), and the worker's part again at its orders agent's handler
  (the order's ``created_at`` on ``orders.status``): Kafka -> handler (fetch, Faust's stream)
  and handler -> broker (the batch's commit, then the submission).

Prints per rate: the achieved publish rate, how many signals reached the broker, the rate at
which they reached it, p50/p99/p99.9/max latency of both runs and the ratio of the p99s, and
the worker restarts by the stall watchdog if any.  When the service cannot keep up with a
rate, the signals queue and the latency grows along the run; the output says so (with the
p50 of the first and last tenth of the signals) instead of presenting those figures as the
service's latency.  Between rates the stack is left to drain
(every order filled and applied) so a rate does not inherit the previous one's backlog.

Prints the broker and ``producer_max_batch_size`` (Tansu's local profile forces 1).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import nats
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from app.kafka_io import end_offsets, read_topic, topic_counts
from app.mt5 import contract
from app.sample import REFERENCE, signal_dict
from app.topics import EXECUTIONS, ORDERS_STATUS, SIGNALS_APPROVED
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: bench.common
from bench.common import add_broker_arg, broker_line, percentile, run_main  # noqa: E402
from tables.idempotency import order_id_for
from tables.order_types import comment_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

#: A symbol the simulator quotes but the sample signals never use: the baseline's market,
#: closed so its requests are received (and timed) but make no deals.
DIRECT_SYMBOL = "NZDUSD"
RECEIPTS_CHUNK = 2000


@dataclass
class Run:
    """One paced run: what was published when, and when the broker received it."""

    target_rate: float
    published: dict[str, float] = field(default_factory=dict)  # comment -> publish time
    order: list[str] = field(default_factory=list)  # comments in publish order
    received: dict[str, float] = field(default_factory=dict)  # comment -> broker receipt time
    signal_ids: dict[str, str] = field(default_factory=dict)  # comment -> signal id (service runs)
    in_kafka: dict[str, float] = field(default_factory=dict)  # comment -> signals.approved record time
    handled: dict[str, float] = field(default_factory=dict)  # comment -> the order's created_at (its handler ran)
    publish_errors: int = 0

    @property
    def n(self) -> int:
        return len(self.order)

    @property
    def achieved_rate(self) -> float:
        times = [self.published[c] for c in self.order]
        span = times[-1] - times[0] if len(times) > 1 else 0.0
        return (len(times) - 1) / span if span > 0 else float("inf")

    @property
    def reached(self) -> int:
        return sum(1 for c in self.order if c in self.received)

    @property
    def broker_rate(self) -> float:
        """Signals per second reaching the broker, over the span of the receipts (comparable
        with the publish rate: a service that keeps up receives as fast as it is sent)."""
        times = [self.received[c] for c in self.order if c in self.received]
        span = max(times) - min(times) if len(times) > 1 else 0.0
        return (len(times) - 1) / span if span > 0 else float("inf")

    def latencies_ms(self, comments: list[str] | None = None) -> list[float]:
        return sorted((self.received[c] - self.published[c]) * 1000.0
                      for c in (comments if comments is not None else self.order) if c in self.received)

    def split_ms(self) -> tuple[list[float], list[float]]:
        """(publish -> Kafka record, Kafka record -> broker receipt) latencies, ms, ascending.
        Kafka record times have millisecond resolution."""
        bridge = sorted((self.in_kafka[c] - self.published[c]) * 1000.0 for c in self.order if c in self.in_kafka)
        worker = sorted((self.received[c] - self.in_kafka[c]) * 1000.0
                        for c in self.order if c in self.in_kafka and c in self.received)
        return bridge, worker

    def worker_split_ms(self) -> tuple[list[float], list[float]]:
        """The worker's part split at its handler: (Kafka record -> the orders agent's handler,
        i.e. fetch and Faust's stream machinery; handler -> broker receipt, i.e. the batch's
        commit: outputs acked, tables written, then the submission), ms, ascending."""
        got = [c for c in self.order if c in self.in_kafka and c in self.handled and c in self.received]
        return (sorted((self.handled[c] - self.in_kafka[c]) * 1000.0 for c in got),
                sorted((self.received[c] - self.handled[c]) * 1000.0 for c in got))

    def stats(self) -> dict[str, float]:
        lat = self.latencies_ms()
        tenth = max(1, self.n // 10)
        first, last = self.latencies_ms(self.order[:tenth]), self.latencies_ms(self.order[-tenth:])
        # the first and last tenth of the signals, in publish order: a queue shows as growth
        return {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "p999": percentile(lat, 99.9),
                "max": lat[-1] if lat else float("nan"), "first_p50": percentile(first, 50),
                "last_p50": percentile(last, 50)}

    def trend(self) -> float:
        """How fast the latency grows along the run: the least-squares slope of latency against
        publish time, in ms per second of publishing.  About 0 when the service keeps up; about
        1000 x (1 - service rate / publish rate) when signals queue."""
        pts = [(self.published[c], self.received[c] - self.published[c]) for c in self.order if c in self.received]
        if len(pts) < 3:
            return 0.0
        mt = sum(t for t, _ in pts) / len(pts)
        ml = sum(v for _, v in pts) / len(pts)
        var = sum((t - mt) ** 2 for t, _ in pts)
        return 1000.0 * sum((t - mt) * (v - ml) for t, v in pts) / var if var > 0 else 0.0

    def kept_up(self) -> bool:
        """Every signal reached the broker and the latency did not grow along the run (a queue
        grows by ``1 - service rate / publish rate`` seconds per second; 100 ms/s is the limit)."""
        return self.reached == self.n and self.trend() < 100.0


async def paced(n: int, rate: float, send) -> list[float]:
    """Call ``await send(i)`` for i in 0..n-1 at ``rate`` per second, by the clock (catching up
    in bursts when behind); returns each call's ``time.time()`` taken just before it."""
    times = [0.0] * n
    start = time.perf_counter()
    i = 0
    while i < n:
        due = min(n, int((time.perf_counter() - start) * rate) + 1)
        while i < due:
            times[i] = time.time()
            await send(i)
            i += 1
        if i < n:
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
    return times


async def receipts(nc, comments: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in range(0, len(comments), RECEIPTS_CHUNK):
        chunk = comments[k:k + RECEIPTS_CHUNK]
        msg = await nc.request(contract.CONTROL, orjson.dumps({"cmd": "receipts", "comments": chunk}), timeout=10)
        reply = orjson.loads(msg.data)
        if not reply.get("ok"):
            raise RuntimeError(f"receipts: {reply}")
        out.update(reply["received"])
    return out


async def wait_receipts(nc, run: Run, timeout: float) -> None:
    """Collect receipts until every published comment has one, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        missing = [c for c in run.order if c not in run.received]
        if missing:
            run.received.update(await receipts(nc, missing))
        if run.reached == run.n or time.monotonic() > deadline:
            return
        await asyncio.sleep(1.0)


async def direct_run(nc, rate: float, n: int, tag: str, partitions: int, timeout: float) -> Run:
    """The baseline: trade requests straight to ``mt5.orders.submit`` at ``rate``."""
    run = Run(rate)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)  # replies (10018, market closed) land here and are dropped
    payloads = []
    for i in range(n):
        comment = comment_for(order_id_for(f"direct-{tag}-{i}", partitions))
        run.order.append(comment)
        payloads.append(orjson.dumps({
            "action": 1, "symbol": DIRECT_SYMBOL, "volume": 0.1, "type": i % 2, "price": 0.0,
            "deviation": 30, "magic": 20240611, "comment": comment, "account": "bench-direct"}))

    async def send(i: int) -> None:
        await nc.publish(contract.SUBMIT, payloads[i], reply=inbox)

    times = await paced(n, rate, send)
    await nc.flush()
    run.published = dict(zip(run.order, times))
    await wait_receipts(nc, run, timeout)
    await sub.unsubscribe()
    return run


async def service_run(p, nc, rate: float, n: int, tag: str, partitions: int, timeout: float,
                      rng: random.Random) -> Run:
    """Approved signals through the whole service at ``rate``."""
    run = Run(rate)
    js = nc.jetstream()
    items = []
    for i in range(n):
        s = signal_dict(f"lat-{tag}-{i}", rng, order_type="market", lots=0.1)
        comment = comment_for(order_id_for(s["signal_id"], partitions))
        run.order.append(comment)
        run.signal_ids[comment] = s["signal_id"]
        items.append((f"signals.approved.{s['symbol']}", s))
    acks: list[asyncio.Future] = []

    async def send(i: int) -> None:
        subject, s = items[i]
        s["approved_at"] = datetime.now(UTC).isoformat()  # approved as it is sent: never stale in a long run
        acks.append(await js.publish_async(subject, orjson.dumps(s)))

    times = await paced(n, rate, send)
    run.published = dict(zip(run.order, times))
    results = await asyncio.gather(*acks, return_exceptions=True)
    run.publish_errors = sum(1 for r in results if isinstance(r, BaseException))
    await wait_receipts(nc, run, timeout)
    by_signal = await kafka_times(p.settings, SIGNALS_APPROVED, set(run.signal_ids.values()))
    run.in_kafka = {c: by_signal[sid] for c, sid in run.signal_ids.items() if sid in by_signal}
    run.handled = await created_times(p.settings, {order_id_for(run.signal_ids[c], partitions): c for c in run.order})
    return run


async def created_times(settings, comments_by_order: dict[str, str]) -> dict[str, float]:
    """comment -> ``created_at`` of its order on ``orders.status`` (the orders agent's handler
    time, ``utcnow()`` when it took the signal), in seconds."""
    out: dict[str, float] = {}
    for r in await read_topic(settings, ORDERS_STATUS, idle=0.3, timeout=120):
        key = r.key.decode() if r.key else ""
        comment = comments_by_order.get(key)
        if comment is not None and comment not in out:
            out[comment] = orjson.loads(r.value)["created_at"]
    return {c: datetime.fromisoformat(t).timestamp() for c, t in out.items()}


async def kafka_times(settings, topic: str, keys: set[str]) -> dict[str, float]:
    """The record timestamp (CreateTime: when the bridge produced it, ms) of the first record of
    each key in ``keys`` on ``topic``, in seconds."""
    consumer = AIOKafkaConsumer(**settings.aiokafka_common(), enable_auto_commit=False)
    await consumer.start()
    out: dict[str, float] = {}
    try:
        tps = [TopicPartition(topic, q) for q in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            await consumer._client.force_metadata_update()
            tps = [TopicPartition(topic, q) for q in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await end_offsets(consumer, tps, settings)
        remaining = {tp for tp in tps if end[tp] > 0}
        while remaining:
            for tp in list(remaining):
                if await consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                for m in msgs:
                    k = m.key.decode() if m.key else ""
                    if k in keys and k not in out:
                        out[k] = m.timestamp / 1000.0
    finally:
        await consumer.stop()
    return out


async def wait_drained(p, expected_executions: int, timeout: float) -> bool:
    """Wait until every filled order's execution is on the ``executions`` topic (the worker is idle)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await topic_counts(p.settings, [EXECUTIONS]))[EXECUTIONS] >= expected_executions:
            return True
        await asyncio.sleep(0.5)
    return False


def ms(x: float) -> str:
    return f"{x:8.1f}"


def _ms_or_missing(x: float) -> str:
    return "none received" if math.isnan(x) else f"{x:.1f} ms"


def report_rate(rate: float, direct: Run, svc: Run) -> list[str]:
    d, s = direct.stats(), svc.stats()
    lines = [
        (f"rate {rate:>6.0f}/s  signals {svc.n:6d}  published at {svc.achieved_rate:7.0f}/s  "
         f"reached the broker {svc.reached}/{svc.n} at {svc.broker_rate:7.0f}/s  "
         f"latency trend {svc.trend():+.0f} ms/s"
         + (f"  publish errors {svc.publish_errors}" if svc.publish_errors else "")),
        f"  {'':28}{'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>8} {'max ms':>8}",
        (f"  {'direct to the broker (base)':28}{ms(d['p50'])} {ms(d['p99'])} {ms(d['p999'])} {ms(d['max'])}"
         f"   ({direct.reached}/{direct.n} received, published at {direct.achieved_rate:.0f}/s)"),
        (f"  {'NATS -> service -> broker':28}{ms(s['p50'])} {ms(s['p99'])} {ms(s['p999'])} {ms(s['max'])}"
         f"   ratio p99 service/direct: {s['p99'] / d['p99']:.0f}"),
    ]
    bridge, worker = svc.split_ms()
    if bridge and worker:
        lines.append(f"  {'  of which NATS -> Kafka':28}{ms(percentile(bridge, 50))} {ms(percentile(bridge, 99))} "
                     f"{ms(percentile(bridge, 99.9))} {ms(bridge[-1])}   (bridge; Kafka record time, ms resolution)")
        lines.append(f"  {'  of which Kafka -> broker':28}{ms(percentile(worker, 50))} {ms(percentile(worker, 99))} "
                     f"{ms(percentile(worker, 99.9))} {ms(worker[-1])}   (worker)")
        to_handler, to_broker = svc.worker_split_ms()
        if to_handler:
            lines.append(f"  {'    Kafka -> handler':28}{ms(percentile(to_handler, 50))} {ms(percentile(to_handler, 99))} "
                         f"{ms(percentile(to_handler, 99.9))} {ms(to_handler[-1])}   (fetch, Faust's stream, the batch wait)")
            lines.append(f"  {'    handler -> broker':28}{ms(percentile(to_broker, 50))} {ms(percentile(to_broker, 99))} "
                         f"{ms(percentile(to_broker, 99.9))} {ms(to_broker[-1])}   (outputs acked, tables, submission)")
    if svc.n < 1000:
        lines.append(f"  ({svc.n} signals: p99.9 is the maximum; more with --seconds or --signals)")
    if svc.achieved_rate < 0.95 * rate:
        lines.append(f"  NOTE: the publisher reached only {svc.achieved_rate:.0f}/s of the {rate:.0f}/s asked "
                     "(this machine could not publish faster beside the running stack)")
    if not svc.kept_up():
        lines.append(f"  NOT KEPT UP: the service passed {svc.broker_rate:.0f} signals/s to the broker while "
                     f"{svc.achieved_rate:.0f}/s were published; signals queued (latency grew "
                     f"{svc.trend():.0f} ms per second of publishing: p50 of the first tenth of the signals "
                     f"{_ms_or_missing(s['first_p50'])}, of the last tenth {_ms_or_missing(s['last_p50'])}), "
                     "so these latencies are mostly queueing and depend on how long the rate is held (--seconds)")
    if svc.reached < svc.n:
        lines.append(f"  MISSING: {svc.n - svc.reached} signals had not reached the broker when the wait ended")
    return lines


StageSnapshot = dict[tuple[str, str], tuple[list[tuple[float, float]], float, float]]


def stage_snapshot(p) -> StageSnapshot:
    """The workers' ``execution_stage_seconds`` histograms, summed over workers:
    (agent, stage) -> (cumulative buckets, sum, count)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], tuple[dict[float, float], list[float]]] = {}
    for svc in p.services.running.values():
        if svc.argv[0] != "worker" or not svc.alive:
            continue
        text = urllib.request.urlopen(f"http://127.0.0.1:{svc.web_port}/metrics", timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            if family.name != "execution_stage_seconds":
                continue
            for sample in family.samples:
                key = (sample.labels["agent"], sample.labels["stage"])
                buckets, totals = out.setdefault(key, ({}, [0.0, 0.0]))
                if sample.name.endswith("_bucket"):
                    le = float(sample.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + sample.value
                elif sample.name.endswith("_sum"):
                    totals[0] += sample.value
                elif sample.name.endswith("_count"):
                    totals[1] += sample.value
    return {k: (sorted(b.items()), t[0], t[1]) for k, (b, t) in out.items()}


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile on cumulative buckets (linear within a bucket)."""
    total = buckets[-1][1] if buckets else 0
    if not total:
        return math.nan
    rank, lower, below = q * total, 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / max(n - below, 1e-12)
        lower, below = le, n
    return lower


def stage_lines(before: StageSnapshot, after: StageSnapshot) -> list[str]:
    """Per agent and stage (app.runtime.STAGES), what this rate added: records (batches for
    ``commit``), mean, and p50/p99 estimated from the buckets."""
    lines = [f"  {'worker stages (its /metrics)':28}{'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'n':>8}"]
    for key in sorted(after):
        b1, s1, n1 = after[key]
        b0, s0, n0 = before.get(key, ([], 0.0, 0.0))
        old = dict(b0)
        delta = [(le, n - old.get(le, 0.0)) for le, n in b1]
        n = n1 - n0
        if n <= 0:
            continue
        agent, stage = key
        lines.append(f"  {'  ' + agent + ' ' + stage:28}{ms(1000 * bucket_quantile(0.5, delta))} "
                     f"{ms(1000 * bucket_quantile(0.99, delta))} {ms(1000 * (s1 - s0) / n)} {n:8.0f}")
    lines.append("    (kafka: record timestamp -> Faust's conductor; faust: conductor -> handler; "
                 "commit: per batch)")
    return lines


async def main(argv: list[str] | None = None) -> list[tuple[float, Run, Run]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[100, 1000, 5000], help="publish rates, signals/s")
    ap.add_argument("--seconds", type=float, default=2.0, help="publishing time per rate (signals = rate x seconds)")
    ap.add_argument("--signals", type=int, default=None, help="signals per rate (overrides --seconds)")
    ap.add_argument("--max-signals", type=int, default=2000,
                    help="cap on rate x seconds (the service drains a few dozen signals/s here: 2000 take a minute)")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=300,
                    help="seconds to wait for every signal of a rate to reach the broker, and again to drain")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (service logs); kept anyway after "
                    "restarts or missing signals")
    add_broker_arg(ap)
    args = ap.parse_args(argv)
    from pipeline import Pipeline

    p = Pipeline(Path(tempfile.mkdtemp(prefix="bench-latency-")), partitions=args.partitions, config={},
                 broker=args.broker)
    await p.start()
    out: list[tuple[float, Run, Run]] = []
    keep = args.keep
    nc = await nats.connect(p.stack.nats_url)
    try:
        for symbol, (mid, _) in REFERENCE.items():
            await p.sim(cmd="set_price", symbol=symbol, mid=mid, hold=True)
        await p.sim(cmd="set_margin", lots=1e9)  # random sides on one account: never 10019
        await p.sim(cmd="close_market", symbol=DIRECT_SYMBOL)
        rng = random.Random(1)
        # Warm up the path (connections, first fetches) outside the figures.
        warm = await service_run(p, nc, 50, 50, "warmup", args.partitions, args.timeout, rng)
        executions = warm.n
        await wait_drained(p, executions, args.timeout)
        print(f"{broker_line(p.settings, args.broker)}; partitions={args.partitions}; one worker; "
              f"rates={' '.join(f'{r:.0f}' for r in args.rates)}/s", flush=True)
        for rate in args.rates:
            n = args.signals or max(1, min(args.max_signals, int(rate * args.seconds)))
            tag = f"{rate:.0f}"
            restarts = getattr(p.services, "restarts", 0)
            direct = await direct_run(nc, rate, n, tag, args.partitions, args.timeout)
            before = await asyncio.to_thread(stage_snapshot, p)
            svc = await service_run(p, nc, rate, n, tag, args.partitions, args.timeout, rng)
            executions += svc.n
            drained = await wait_drained(p, executions, args.timeout)
            lines = report_rate(rate, direct, svc) + stage_lines(before, await asyncio.to_thread(stage_snapshot, p))
            if n < rate * args.seconds and not args.signals:
                lines.insert(1, f"  (capped at --max-signals {args.max_signals}: {n / rate:.1f}s of publishing)")
            restarted = getattr(p.services, "restarts", 0) - restarts
            if restarted:
                lines.append(f"  RESTARTS: the stall watchdog (app/watchdog.py) restarted the worker {restarted} times "
                             "during this rate (each restart stops submissions for its startup and recovery)")
            if restarted or svc.reached < svc.n or not drained:
                keep = True  # the logs say why
            if not drained:
                lines.append(f"  (the service had not applied every fill {args.timeout:.0f}s later; "
                             "the next rate starts with a backlog)")
            print("\n".join(lines), flush=True)
            out.append((rate, direct, svc))
        print("latency = broker receipt (simulator, time.time()) - NATS publish (time.time()), same machine")
    finally:
        await nc.close()
        p.stop()
        if keep:
            print(f"logs kept in {p.workdir}")
        else:
            shutil.rmtree(p.workdir, ignore_errors=True)
    return out


if __name__ == "__main__":
    run_main(main)
