"""``execution demo``: the whole flow on the embedded defaults, in one command.

Starts the local stack (Tansu or Apache Kafka, nats-server), the MT5 broker simulator, the bridge, a worker
and the ClickHouse sink (chDB, in this process); publishes a realistic mix of approved
signals priced off the simulator's market (every order type, a few duplicates, a few
malformed, some the broker rejects, plus risk-rejected signals that must never be acted
on); waits until the pipeline is idle; prints a summary from ClickHouse and writes the
transaction-cost report.  Ctrl-C stops everything.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import nats
import nats.js.errors
import orjson

from app import hub
from app.kafka_io import read_topic, topic_counts
from app.local import LocalStack, Services
from app.mt5 import contract
from app.notifier import ALERTS_STREAM, ORDERS_STREAM
from app.report import render_report
from app.sample import REFERENCE, malformed, signal_dict, subject_for
from app.settings import Settings
from app.topics import FILLS_DLQ, ORDERS_STATUS, POSITIONS_DISCREPANCIES, SIGNALS_APPROVED, SIGNALS_DLQ, ensure_topics
from tables.reconcile import compare

#: Seed queries of the service description (run unchanged against ClickHouse).
FILL_RATE_SQL = """
SELECT
    COUNT(CASE WHEN state = 'FILLED' THEN 1 END) as filled,
    COUNT(CASE WHEN state = 'REJECTED' THEN 1 END) as rejected,
    COUNT(CASE WHEN state = 'CANCELLED' THEN 1 END) as cancelled,
    (COUNT(CASE WHEN state = 'FILLED' THEN 1 END) * 100.0 / COUNT(*)) as fill_rate_pct
FROM orders
WHERE created_at > now() - INTERVAL 7 DAY
"""
#: How the demo configures the hub: reconcile often enough to see it in a short run.
DEMO_CONFIG = {"operational": {"position_reconciliation": {"reconcile_interval_minutes": 0.25}}}


def build_traffic(n: int, seed: int, quotes: dict[str, float]) -> tuple[list[tuple[str, bytes]], Counter]:
    """n approved signals (all order types, ~3% duplicates, ~3% malformed, ~3% that the
    broker rejects) priced off ``quotes`` (symbol -> mid), plus ~2% risk-rejected ones."""
    rng = random.Random(seed)
    items: list[tuple[str, bytes]] = []
    mix: Counter = Counter()
    sent: list[tuple[str, bytes]] = []
    for i in range(n):
        r = rng.random()
        sid = f"demo-{seed}-{i:06d}"
        symbol = rng.choice(list(REFERENCE))
        if r < 0.03 and sent:
            items.append(rng.choice(sent))  # a redelivered duplicate
            mix["duplicate"] += 1
            continue
        if r < 0.06:
            _, payload, _ = malformed(i, sid, rng)
            items.append(("signals.approved.EURUSD", payload))
            mix["malformed"] += 1
            continue
        ot = rng.choices(["market", "limit", "stop", "stop_limit"], weights=[70, 12, 12, 6])[0]
        lots = rng.choice((0.01, 0.1, 0.5, 1.0, 2.0, 8.0))
        d = signal_dict(sid, rng, symbol=symbol, order_type=ot, lots=lots,
                        account=rng.choice(("acc-1", "acc-2")), mid=quotes.get(symbol))
        if r < 0.09:
            d["position_size"] = 0.015  # not a multiple of the volume step: the broker rejects it
            mix["broker_reject"] += 1
        else:
            mix[ot] += 1
        item = (subject_for(d), orjson.dumps(d))
        items.append(item)
        sent.append(item)
        if rng.random() < 0.02:  # a signal the risk service rejected: must never become an order
            d = signal_dict(f"risk-rejected-{seed}-{i}", rng, symbol=symbol)
            items.append((f"signals.rejected.{symbol}", orjson.dumps(d)))
            mix["risk_rejected"] += 1
    return items, mix


class Progress:
    """One line that fills as work is done: redrawn in place on a terminal, printed at each
    quarter otherwise (a log file, CI)."""

    def __init__(self, label: str, total: int, width: int = 30) -> None:
        self.label, self.total, self.width = label, max(1, total), width
        self.tty = sys.stdout.isatty()
        self._quarter = -1

    def update(self, done: int, note: str = "") -> None:
        frac = min(1.0, done / self.total)
        if self.tty:
            bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
            sys.stdout.write(f"\r  {self.label} [{bar}] {done}/{self.total} {note}\033[K")
            sys.stdout.flush()
        elif int(frac * 4) > self._quarter:
            self._quarter = int(frac * 4)
            print(f"  {self.label} {done}/{self.total} {note}".rstrip(), flush=True)

    def done(self) -> None:
        if self.tty:
            sys.stdout.write("\n")
            sys.stdout.flush()


def log_to_file(path: Path) -> None:
    """The demo's own libraries (aiokafka, the sink, chDB's client) log to ``path``, so the
    console shows the demo's progress and summary only."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


async def _publish(nats_url: str, items: list[tuple[str, bytes]], rate: float) -> None:
    from app.bridge import ensure_stream

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_stream(js, "SIGNALS_APPROVED", ["signals.approved.>"])
    start = time.monotonic()
    progress = Progress("publishing", len(items))
    for i, (subject, data) in enumerate(items):
        if subject.startswith("signals.approved."):
            await js.publish(subject, data)
        else:
            await nc.publish(subject, data)
        delay = start + (i + 1) / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        progress.update(i + 1)
    progress.done()
    await nc.flush()
    await nc.close()


async def _request(nats_url: str, subject: str, payload: dict) -> dict:
    nc = await nats.connect(nats_url)
    try:
        return orjson.loads((await nc.request(subject, orjson.dumps(payload), timeout=5)).data)
    finally:
        await nc.close()


async def _wait_ready(nats_url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await _request(nats_url, contract.STATS, {})
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def _metrics(port: int) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3).read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            key = name.split("{")[0]
            out[key] = out.get(key, 0.0) + float(value)
    return out


async def run(signals: int, rate: float, seed: int, workdir: Path) -> int:
    from app.sinks.clickhouse import ClickHouseStore
    from app.sinks.kafka_clickhouse import ClickHouseSink

    stack = LocalStack(workdir=workdir / "stack").start()
    services = Services(stack, workdir)
    services.supervise()
    settings = Settings(kafka_bootstrap=stack.kafka_url, nats_url=stack.nats_url, data_dir=workdir / "data")
    sink = None
    try:
        broker = "Apache Kafka" if stack.broker == "kafka" else "Tansu"
        print(f"  kafka ({broker}) {stack.kafka_url}, NATS {stack.nats_url}, chDB {settings.resolved_clickhouse_dsn}", flush=True)
        await ensure_topics(settings)
        nc = await nats.connect(stack.nats_url)
        await hub.write(nc, DEMO_CONFIG)
        await nc.close()
        services.simulator(seed=seed)
        await _wait_ready(stack.nats_url)
        services.bridge()
        print("  starting the worker (joins the group, recovers its tables)...", flush=True)
        worker = await asyncio.to_thread(services.worker, "worker-1")
        store = ClickHouseStore.from_dsn(settings.resolved_clickhouse_dsn)
        store.ensure_schema()
        sink = ClickHouseSink(settings, store=store)
        await sink.start()

        quotes = {}
        for symbol in REFERENCE:
            q = await _request(stack.nats_url, contract.CONTROL, {"cmd": "quote", "symbol": symbol})
            quotes[symbol] = (q["bid"] + q["ask"]) / 2
        items, mix = build_traffic(signals, seed, quotes)
        print(f"  traffic: {dict(mix)}", flush=True)
        await _publish(stack.nats_url, items, rate)
        expected_orders = sum(v for k, v in mix.items() if k in ("market", "limit", "stop", "stop_limit", "broker_reject"))
        await _wait_idle(store, expected_orders)
        # End of the session: freeze the market so the final figures hold still, and let
        # anything that was already triggering finish.
        for symbol in REFERENCE:
            q = await _request(stack.nats_url, contract.CONTROL, {"cmd": "quote", "symbol": symbol})
            await _request(stack.nats_url, contract.CONTROL,
                           {"cmd": "set_price", "symbol": symbol, "bid": q["bid"], "ask": q["ask"], "hold": True})
        await _wait_idle(store, expected_orders, idle_for=3.0)
        await sink.wait_idle(timeout=60)
        await asyncio.sleep(1.0)
        await sink.stop()
        sink = None
        print(await _summary(settings, store, stack.nats_url, worker.web_port, mix), flush=True)
        orders = store.query_dicts("SELECT * FROM orders")
        executions = store.query_dicts("SELECT * FROM executions")
        report = workdir / "transaction-cost-report.html"
        report.write_text(render_report(orders, executions))
        print(f"\n  transaction-cost report: {report}", flush=True)
        return 0
    finally:
        if sink is not None:
            await sink.stop()
        services.stop_all()
        stack.stop()


async def _wait_idle(store, expected_orders: int, idle_for: float = 4.0, timeout: float = 300.0) -> None:
    """Until ClickHouse holds every order and nothing changed for ``idle_for`` seconds."""
    last, since, deadline = None, time.monotonic(), time.monotonic() + timeout
    progress = Progress("orders in ClickHouse", expected_orders)
    while time.monotonic() < deadline:
        rows = store.query("SELECT state, count() FROM orders GROUP BY state ORDER BY state")
        now = tuple(rows)
        total = sum(n for _, n in rows)
        if now != last:
            last, since = now, time.monotonic()
            progress.update(total, " ".join(f"{s} {n}" for s, n in rows))
        elif total >= expected_orders and time.monotonic() - since >= idle_for:
            progress.done()
            return
        await asyncio.sleep(0.5)
    progress.done()
    print("  (timed out waiting for the pipeline to go idle)", flush=True)


async def _summary(settings: Settings, store, nats_url: str, web_port: int, mix: Counter) -> str:
    lines = ["", "== summary =="]
    by_state = store.query("SELECT state, count() FROM orders GROUP BY state ORDER BY state")
    lines.append("  orders by state: " + ", ".join(f"{s} {n}" for s, n in by_state))
    filled, rejected, cancelled, rate = store.query(FILL_RATE_SQL)[0]
    lines.append(f"  fill rate: {rate:.1f}% (filled {filled}, rejected {rejected}, cancelled {cancelled})")
    lines.append("  slippage by symbol (pips, + = adverse):")
    for symbol, n, avg, worst in store.query(
        "SELECT symbol, count(), avg(slippage_pips), max(slippage_pips) FROM executions GROUP BY symbol ORDER BY symbol"
    ):
        lines.append(f"    {symbol:<8} fills {n:>5}  avg {avg:>7.3f}  max {worst:>7.3f}")
    positions = store.query_dicts("SELECT * FROM positions ORDER BY account, symbol")
    lines.append("  positions (account, symbol, net lots, avg open price, realized PnL = the broker's deal profit):")
    for p in positions:
        avg = f"{p['avg_open_price']:.5f}" if p.get("avg_open_price") is not None else "-"
        lines.append(f"    {p['account']:<6} {p['symbol']:<8} {p['net_volume']:>8.2f} {avg:>12} "
                     f"{p['realized_pnl']:>12.2f} {p.get('currency') or ''}")
    from tables.order_types import MAGIC

    snap = await _request(nats_url, contract.POSITIONS, {"magic": MAGIC})
    broker = [(b["account"], b["symbol"], b["net_volume"], b.get("avg_price")) for b in snap.get("positions", [])]
    from app.models import Position

    ours = {f"{p['account']}:{p['symbol']}": Position.model_validate(p) for p in positions}
    diffs = compare(ours, broker, lambda k: True)
    m = _metrics(web_port)
    lines.append(
        f"  reconciliation: ClickHouse positions vs broker: {len(diffs)} discrepancies; "
        f"worker ran {int(m.get('execution_reconciliations_total', 0))} reconciliations, "
        f"found {int(m.get('execution_reconciliation_discrepancies_total', 0))}"
    )
    for d in diffs[:5]:
        lines.append(f"    {d.key}: ours {d.ours_net_volume} broker {d.broker_net_volume}")
    snapshots = (await topic_counts(settings, [ORDERS_STATUS]))[ORDERS_STATUS]
    published, alerts = await _nats_counts(nats_url, snapshots)
    lines.append(f"  NATS (the bridge's notifier): {published} order updates on orders.> (of {snapshots} snapshots on "
                 f"orders.status), {alerts} alerts on alerts.execution.>")
    counts = await topic_counts(settings, [SIGNALS_APPROVED, SIGNALS_DLQ, FILLS_DLQ, POSITIONS_DISCREPANCIES])
    lines.append(f"  signals on Kafka: {counts[SIGNALS_APPROVED]} (risk-rejected published: {mix.get('risk_rejected', 0)}, forwarded: 0)")
    reasons = Counter()
    for topic in (SIGNALS_DLQ, FILLS_DLQ):
        for r in await read_topic(settings, topic, idle=0.3):
            reasons[f"{topic}: {r.headers.get('reason', b'?').decode().split(':')[0]}"] += 1
    lines.append(f"  dead letters: {sum(reasons.values())}")
    for reason, n in reasons.most_common(10):
        lines.append(f"    {n:>5}  {reason[:100]}")
    return "\n".join(lines)


async def _nats_counts(nats_url: str, expected: int, timeout: float = 10.0) -> tuple[int, int]:
    """Messages in JetStream's ``ORDERS`` and ``EXECUTION_ALERTS`` streams, once the order
    updates reach ``expected`` (the notifier follows the Kafka topic) or after ``timeout``."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()

        async def count(stream: str) -> int:
            try:
                return (await js.stream_info(stream)).state.messages
            except nats.js.errors.NotFoundError:
                return 0

        deadline = time.monotonic() + timeout
        while (published := await count(ORDERS_STREAM[0])) < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return published, await count(ALERTS_STREAM[0])
    finally:
        await nc.close()


def run_demo(signals: int = 300, rate: float = 100.0, seed: int = 42, workdir: Path | None = None) -> int:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="execution-demo-"))
    print(f"execution demo: {signals} signals at {rate}/s, seed {seed}; logs in {workdir}", flush=True)
    log_to_file(workdir / "demo.log")

    def _terminate(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        return asyncio.run(run(signals, rate, seed, workdir))
    except KeyboardInterrupt:
        print("\ninterrupted: stopped everything", flush=True)
        return 130
