"""Fills ⋈ orders, slippage, positions and reconciliation, end to end on real servers."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import datetime, timezone

import nats
import orjson
import pytest

from app.kafka_io import read_topic
from app.models import OrderState
from app.sample import REFERENCE, signal_dict
from app.topics import FILLS_DLQ, ORDER_EXECUTION_ARCHIVE, POSITIONS_DISCREPANCIES, SLIPPAGE_ALERTS
from app.sinks.clickhouse import ClickHouseStore
from app.sinks.kafka_clickhouse import ClickHouseSink
from pipeline import TEST_CONFIG, Pipeline
from support import wait_until
from tables.fills import to_units
from tables.idempotency import order_id_for
from tables.order_types import MAGIC
from tables.symbols import DEFAULT_SYMBOLS

pytestmark = pytest.mark.slow

PARTITIONS = 4


@pytest.fixture(scope="module")
async def pipe(tmp_path_factory):
    p = Pipeline(tmp_path_factory.mktemp("fills"), partitions=PARTITIONS)
    await p.start()
    # The ClickHouse sink on chDB, in this process, beside the workers.
    p.store = ClickHouseStore.from_dsn(f"chdb:///{p.workdir / 'chdb'}")
    p.store.ensure_schema()
    p.sink = ClickHouseSink(p.settings, store=p.store)
    await p.sink.start()
    try:
        yield p
    finally:
        await p.sink.stop()
        p.store.close()
        p.stop()


def oid(signal_id: str) -> str:
    return order_id_for(signal_id, PARTITIONS)


async def publish_fills(pipe: Pipeline, fills: list[dict]) -> None:
    nc = await nats.connect(pipe.stack.nats_url)
    js = nc.jetstream()
    for i, f in enumerate(fills):
        # Each its own JetStream message id, so a deliberate duplicate deal gets through.
        await js.publish(f"mt5.fills.{f['symbol']}", orjson.dumps(f), headers={"Nats-Msg-Id": f"test-{f['deal']}-{i}"})
    await nc.close()


async def settled(pipe: Pipeline, timeout: float = 60) -> None:
    """Wait until, with the markets held, every deal the broker made for our magic is an
    execution here and the positions table equals the sum of the executions.  A few ticks
    after the hold first, so the rest of an order that was still matchable has filled."""
    first = (await pipe.sim_stats())["ticks"]

    async def done() -> bool:
        stats = await pipe.sim_stats()
        if stats["ticks"] < first + 3 or stats["unpublished"]:
            return False
        broker = {d.deal for d in await pipe.broker_deals() if d.magic == MAGIC}
        execs = await pipe.executions()
        if {e.deal for v in execs.values() for e in v} != broker:
            return False
        net: dict[str, int] = defaultdict(int)
        for v in execs.values():
            for e in v:
                net[f"{e.account}:{e.symbol}"] += to_units(e.volume) * e.side.sign
        held = {k: to_units(p.net_volume) for k, p in (await pipe.positions()).items()}
        return all(held.get(k, 0) == units for k, units in net.items())

    await wait_until(done, timeout=timeout, what="every broker deal applied, positions = executions")


async def test_a_few_hundred_signals_fills_vwap_and_positions_agree(pipe: Pipeline):
    rng = random.Random(11)
    for symbol, (mid, _) in REFERENCE.items():
        await pipe.sim(cmd="set_price", symbol=symbol, mid=mid, hold=False)
    signals = []
    for i in range(240):
        ot = rng.choices(["market", "limit", "stop", "stop_limit"], weights=[70, 12, 12, 6])[0]
        signals.append(signal_dict(f"run-{i}", rng, order_type=ot, lots=rng.choice((0.01, 0.1, 1.0, 2.0, 7.0)),
                                   account=rng.choice(("acc-1", "acc-2"))))
    await pipe.publish_signals(signals, rate=200)
    ids = [oid(s["signal_id"]) for s in signals]
    market = [oid(s["signal_id"]) for s in signals if s.get("order_type", "market") == "market"]
    await pipe.wait_orders(ids, done=lambda o: o.state is not OrderState.PENDING, timeout=120)
    await pipe.wait_orders(market, timeout=120)
    # Freeze the market so no pending order triggers while our figures, the broker's and
    # ClickHouse's are compared; let what already triggered finish its fills.
    await pipe.hold_reference_prices()
    await settled(pipe)
    orders = await pipe.orders()
    execs = await pipe.executions()
    filled = [orders[i] for i in ids if orders[i].state is OrderState.FILLED]
    # The market walks: a market order whose entry it left by more than the slippage cap
    # (3 pips) is rejected, never filled past it.
    cap = TEST_CONFIG["operational"].get("order_defaults", {}).get("max_slippage_pips", 3)
    for i in market:
        o = orders[i]
        if o.state is not OrderState.FILLED:
            assert o.state is OrderState.REJECTED and "slippage cap" in o.reason, (o.state, o.reason)
            continue
        pip = DEFAULT_SYMBOLS[o.symbol].pip_size
        for f in execs[i]:
            if f.reason == "expert":
                assert (f.price - o.entry_price) * f.side.sign <= cap * pip + 1e-9, (i, f.price, o.entry_price)
    assert len(filled) >= len(market) * 0.5
    assert any(len([f for f in execs[o.order_id] if f.reason == "expert"]) > 1 for o in filled), \
        "large orders fill in several deals"
    for o in filled:
        fills = [f for f in execs[o.order_id] if f.reason == "expert"]  # the rest: exits of its position
        assert sum(to_units(f.volume) for f in fills) == to_units(o.volume), o.order_id
        vwap = sum(f.price * f.volume for f in fills) / sum(f.volume for f in fills)
        assert o.avg_fill_price == pytest.approx(vwap, rel=1e-9)
    # Positions equal the sum of all applied fills per account and symbol.
    expected: dict[str, int] = defaultdict(int)
    for fills in execs.values():
        for f in fills:
            expected[f"{f.account}:{f.symbol}"] += to_units(f.volume) * f.side.sign
    held = await pipe.positions()
    for key, units in expected.items():
        assert to_units(held[key].net_volume) == units, key
    # ... and the broker agrees.
    snap = await pipe._request("mt5.positions.snapshot", {"magic": MAGIC})
    broker = {f"{p['account']}:{p['symbol']}": to_units(p["net_volume"]) for p in snap["positions"]}
    for key, units in expected.items():
        assert broker.get(key, 0) == units, key
    # ... and ClickHouse holds the same numbers (the seed's queries read these views).
    await pipe.sink.wait_idle(timeout=60)
    ch_orders = {r["order_id"]: r for r in pipe.store.query_dicts("SELECT * FROM orders")}
    for i in ids:
        o, row = orders[i], ch_orders[i]
        assert (row["state"], row["version"]) == (o.state.value, o.version), i
        assert to_units(row["filled_volume"]) == to_units(o.filled_volume)
        if o.avg_fill_price is not None:
            assert row["fill_price"] == pytest.approx(o.avg_fill_price, rel=1e-12)
    ch_execs = pipe.store.query("SELECT count(), sum(volume) FROM executions")[0]
    assert ch_execs[0] == sum(len(v) for v in execs.values())
    ch_pos = {f"{r['account']}:{r['symbol']}": to_units(r["net_volume"]) for r in pipe.store.query_dicts("SELECT * FROM positions")}
    for key, units in expected.items():
        assert ch_pos[key] == units, key
    # ... and every lifecycle event of the archive is a row of its table.
    archived = {orjson.loads(r.value)["event_id"] for r in await read_topic(pipe.settings, ORDER_EXECUTION_ARCHIVE, idle=0.3)}

    def archive_loaded() -> bool:
        return {e for (e,) in pipe.store.query("SELECT event_id FROM order_execution_archive")} == archived

    await wait_until(archive_loaded, timeout=60, what="the archive in ClickHouse")


async def test_duplicate_out_of_order_and_unknown_fills(pipe: Pipeline):
    rng = random.Random(12)
    # A buy limit far below the market: placed at the broker, never triggered by it.
    s = signal_dict("crafted-1", rng, symbol="EURUSD", order_type="limit", side="buy", lots=0.5, account="acc-x")
    s["limit_price"] = round(s["entry_price"] - 0.0100, 5)
    s["stop_loss"] = round(s["limit_price"] - 0.0020, 5)
    await pipe.publish_signals([s])
    i = oid("crafted-1")
    await pipe.wait_orders([i], done=lambda o: o.state is OrderState.SUBMITTED)
    now = datetime.now(timezone.utc).isoformat()
    lim = s["limit_price"]

    def fill(deal: int, price: float, volume: float, order_id: str = i) -> dict:
        return {"order_id": order_id, "deal": deal, "ticket": 777, "symbol": "EURUSD", "side": "buy",
                "price": price, "volume": volume, "time": now, "account": "acc-x", "magic": MAGIC}

    await publish_fills(pipe, [
        fill(9002, lim + 0.0008, 0.3),  # the later deal first, 8 pips adverse: an alert
        fill(9002, lim + 0.0008, 0.3),  # a duplicate
        fill(9001, lim, 0.2),
        fill(9999, lim, 0.1, order_id="Onosuchorder0000000000000000000"),
    ])
    o = (await pipe.wait_orders([i]))[i]
    assert o.state is OrderState.FILLED
    assert o.deals == (9002, 9001)
    assert o.filled_volume == pytest.approx(0.5)
    assert o.avg_fill_price == pytest.approx((0.3 * (lim + 0.0008) + 0.2 * lim) / 0.5)
    assert o.slippage_pips == pytest.approx(4.8, abs=1e-6)
    assert len((await pipe.executions())[i]) == 2
    dlq = await read_topic(pipe.settings, FILLS_DLQ, idle=0.5)
    assert any(b"unknown order" in r.headers["reason"] and b"Onosuchorder" in r.value for r in dlq)
    await wait_until(lambda: pipe.store.query(
        "SELECT count() FROM dead_letters WHERE topic = 'fills.dlq' AND reason LIKE '%unknown order%' "
        "AND value LIKE '%Onosuchorder%'")[0][0] >= 1, timeout=60, what="the dead letter in ClickHouse")
    archive = [orjson.loads(r.value) for r in await read_topic(pipe.settings, ORDER_EXECUTION_ARCHIVE, idle=0.3)]
    [alert] = [e for e in archive if e["type"] == "slippage_alert" and e["order_id"] == i]
    # the same record on its own topic, which the notifier reads instead of the whole archive
    alerts = [orjson.loads(r.value) for r in await read_topic(pipe.settings, SLIPPAGE_ALERTS, idle=0.3)]
    assert alert in alerts and all(a["type"] == "slippage_alert" for a in alerts)

    async def alerted() -> bool:  # the notifier publishes after the archive: poll NATS for it
        published = await pipe.nats_messages("alerts.execution.>", stream="EXECUTION_ALERTS")
        return {"alerts.execution.slippage", "alerts.execution.fills"} <= {s for s, _ in published} and any(
            s == "alerts.execution.slippage" and orjson.loads(d)["event_id"] == alert["event_id"] for s, d in published)

    await wait_until(alerted, timeout=30, what="the slippage and fills alerts on NATS")


async def _with(pipe: Pipeline, key: str):
    held = await pipe.positions()
    return held if key in held else None


async def test_reconciliation_finds_an_injected_discrepancy_and_corrects_it(pipe: Pipeline):
    await pipe.sim(cmd="set_position", account="acc-9", symbol="GBPUSD", net_volume=1.5, avg_price=1.2711, magic=MAGIC)
    cfg = {"operational": {**TEST_CONFIG["operational"],
                           "position_reconciliation": {"reconcile_interval_minutes": 0.05, "auto_correct_discrepancies": True}}}
    await pipe.set_config(cfg)
    try:
        held = await wait_until(lambda: _with(pipe, "acc-9:GBPUSD"), timeout=60, what="the corrected position")
        assert held["acc-9:GBPUSD"].net_volume == pytest.approx(1.5)
        found = [orjson.loads(r.value) for r in await read_topic(pipe.settings, POSITIONS_DISCREPANCIES, idle=0.3)]
        d = next(d for d in found if (d["account"], d["symbol"]) == ("acc-9", "GBPUSD"))
        assert d["kind"] == "missing_ours" and d["broker_net_volume"] == pytest.approx(1.5)
        await wait_until(lambda: pipe.store.query(
            "SELECT kind, broker_net_volume FROM positions_discrepancies WHERE account = 'acc-9' AND symbol = 'GBPUSD' "
            "LIMIT 1") == [("missing_ours", 1.5)], timeout=60, what="the discrepancy in ClickHouse")
        archive = [orjson.loads(r.value) for r in await read_topic(pipe.settings, ORDER_EXECUTION_ARCHIVE, idle=0.3)]
        assert any(e["type"] == "position_corrected" and e["symbol"] == "GBPUSD" and e["account"] == "acc-9" for e in archive)
        subjects = {s for s, _ in await pipe.nats_messages("alerts.execution.>", stream="EXECUTION_ALERTS")}
        assert "alerts.execution.reconciliation" in subjects
    finally:
        await pipe.set_config(TEST_CONFIG)


async def test_executions_the_positions_agent_cannot_apply_are_dead_lettered(pipe: Pipeline):
    """Bad records on ``executions`` (not JSON, a missing field, an unknown symbol) end in
    ``executions.dlq`` with a reason; the positions agent goes on with valid traffic."""
    from aiokafka import AIOKafkaProducer

    from app.topics import EXECUTIONS, EXECUTIONS_DLQ

    good = orjson.loads((await read_topic(pipe.settings, EXECUTIONS, idle=0.3, timeout=60))[0].value)
    bad = [
        (b"acc-1:EURUSD", b"{not json"),
        (b"acc-1:EURUSD", orjson.dumps({k: v for k, v in good.items() if k != "volume"})),
        (b"acc-1:NOPE", orjson.dumps({**good, "symbol": "NOPE", "execution_id": "x:1"})),
    ]
    producer = AIOKafkaProducer(**pipe.settings.producer_options())
    await producer.start()
    try:
        for key, value in bad:
            await producer.send_and_wait(EXECUTIONS, value, key=key)
    finally:
        await producer.stop()
    dlq = await read_topic(pipe.settings, EXECUTIONS_DLQ, expect=len(bad), timeout=60)
    assert sorted(r.value for r in dlq) == sorted(v for _, v in bad)
    reasons = {r.value: r.headers["reason"].decode() for r in dlq}
    assert "volume" in reasons[bad[1][1]] and "NOPE" in reasons[bad[2][1]], reasons
    # The worker goes on: a new signal still fills.
    rng = random.Random(5)
    s = signal_dict("after-bad-executions", rng, symbol="EURUSD", order_type="market", lots=0.1)
    await pipe.publish_signals([s])
    orders = await pipe.wait_orders([oid(s["signal_id"])])
    assert orders[oid(s["signal_id"])].state is OrderState.FILLED
