"""Chaos: thousands of signals while the worker is killed with SIGKILL five times at random
moments and restarted; the same with two workers, one of them killed at a time; and while
the bridge is killed, NATS restarted and ClickHouse down.
Afterwards: one order and one broker execution per signal, nothing lost, positions equal to
the sum of their fills (and to the broker's), ClickHouse equal to the topics the tables
emitted."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections import defaultdict

import pytest

from app.models import OrderState
from app.sample import REFERENCE, signal_dict
from app.sinks.clickhouse import ClickHouseStore
from app.sinks.kafka_clickhouse import ClickHouseSink
from app.topics import SIGNALS_APPROVED
from pipeline import TEST_CONFIG, Pipeline
from support import FlakyStore, topic_counts, wait_until
from tables.fills import to_units
from tables.idempotency import close_order_id, order_id_for
from tables.order_types import MAGIC

pytestmark = pytest.mark.slow

PARTITIONS = 4
#: 1,000 by default, so the whole suite stays under 10 minutes on 2 cores; the issue's 5,000 runs
#: with EXECUTION_CHAOS_SIGNALS=5000 (passed on 2026-11-27 in 414 s, five SIGKILLs; before the
#: recovery fix in app/faust_patches.py (1) and the end-offset reads in app/kafka_io.py it failed).
SIGNALS = int(os.environ.get("EXECUTION_CHAOS_SIGNALS", "1000"))
KILLS = 5
#: Signals of the bridge / NATS / ClickHouse run.
EDGE_SIGNALS = int(os.environ.get("EXECUTION_EDGE_CHAOS_SIGNALS", "800"))
#: Signals of the two-worker run (each SIGKILL is a rebalance: the survivor takes over the dead
#: worker's partitions, then gives them back when it returns).
REBALANCE_SIGNALS = int(os.environ.get("EXECUTION_REBALANCE_CHAOS_SIGNALS", "500"))


def chaos_signals(n: int, rng: random.Random, prefix: str = "chaos") -> tuple[list[dict], list[dict]]:
    """(n market signals over three accounts, a 2 % sample of them to deliver twice as an
    upstream resend would)."""
    signals = [signal_dict(f"{prefix}-{i}", rng, order_type="market", lots=rng.choice((0.01, 0.1, 1.0)),
                           account=rng.choice(("acc-1", "acc-2", "acc-3"))) for i in range(n)]
    return signals, rng.sample(signals, n // 50)


#: Signals queue up while a worker is down: here they must all be traded, not found stale.
CHAOS_CONFIG = {"operational": {**TEST_CONFIG["operational"], "order_defaults": {"max_signal_age_seconds": 3600}}}


async def check_nothing_lost_or_doubled(p: Pipeline, sink: ClickHouseSink, store: ClickHouseStore, ids: list[str],
                                        timeout: float = 400) -> None:
    """Every order FILLED, created once, submitted and executed once at the broker; each
    order's fills sum to its volume; net positions = the sum of the fills = the broker's;
    ClickHouse holds exactly these orders, positions and executions; no worker needed the
    skipped-offsets guard."""
    orders = await p.wait_orders(ids, timeout=timeout)

    assert {orders[i].state for i in ids} == {OrderState.FILLED}
    events = await p.events()
    created = [sum(1 for e in events[i] if e.type.value == "created") for i in ids]
    assert created == [1] * len(ids), "exactly one order per signal"
    stats = await p.sim_stats()
    executed = {i: stats["executed"].get(i) for i in ids if stats["executed"].get(i) != 1}
    assert not executed, f"exactly one broker execution per signal: {executed}"
    submitted = {i: stats["by_comment"].get(i) for i in ids if stats["by_comment"].get(i) != 1}
    assert not submitted, f"exactly one submission per signal: {submitted}"

    fills = await p.executions(timeout=120)
    net: dict[str, int] = defaultdict(int)
    for i in ids:
        own = [f for f in fills[i] if f.reason == "expert"]  # the rest are the exits of its position
        assert sum(to_units(f.volume) for f in own) == to_units(orders[i].volume), i
    for executions in fills.values():  # the orders' fills and the exits (SL, TP, stop-out)
        for f in executions:
            net[f"{f.account}:{f.symbol}"] += to_units(f.volume) * f.side.sign
    net = {k: v for k, v in net.items() if v}
    snap = await p._request("mt5.positions.snapshot", {"magic": MAGIC})
    broker = {f"{b['account']}:{b['symbol']}": to_units(b["net_volume"]) for b in snap["positions"]}
    ours_deals = sum(len(f) for f in fills.values())
    broker_made = {k: v for k, v in stats.items() if k.startswith("closed_by_")}
    assert net == {k: v for k, v in broker.items() if v}, (
        f"net positions differ from the broker's: {ours_deals} executions here, {stats.get('deals')} broker deals, "
        f"broker-made closes {broker_made}")

    # The positions agent applies the executions after the orders are FILLED: wait until its
    # table agrees with the fills (a position that never does is the failure).
    async def positions_table() -> dict[str, int]:
        return {k: to_units(v.net_volume) for k, v in (await p.positions()).items() if to_units(v.net_volume)}

    async def positions_agree() -> bool:
        return await positions_table() == net

    try:
        await wait_until(positions_agree, timeout=120, what="positions = the sum of their fills")
    except TimeoutError:
        table = await positions_table()
        differ = {k: (table.get(k), net.get(k)) for k in set(table) | set(net) if table.get(k) != net.get(k)}
        raise AssertionError(f"positions (table, sum of fills) differ: {differ}") from None

    await sink.wait_idle(timeout=120)
    ch = dict(store.query("SELECT state, count() FROM orders GROUP BY state"))
    assert ch == {"FILLED": len(ids)}
    ch_pos = {f"{r['account']}:{r['symbol']}": to_units(r["net_volume"]) for r in store.query_dicts("SELECT * FROM positions")}
    assert {k: v for k, v in ch_pos.items() if v} == net
    assert store.query("SELECT count() FROM executions")[0][0] == sum(len(f) for f in fills.values())
    # Row for row: ClickHouse's orders and positions are the tables' latest snapshots.
    latest, positions = await p.orders(), await p.positions()
    ch_orders = {r["order_id"]: (r["state"], r["version"], to_units(r["filled_volume"]))
                 for r in store.query_dicts("SELECT order_id, state, version, filled_volume FROM orders")}
    assert ch_orders == {i: (o.state.value, o.version, to_units(o.filled_volume)) for i, o in latest.items()}
    ch_versions = {f"{r['account']}:{r['symbol']}": (to_units(r["net_volume"]), r["version"])
                   for r in store.query_dicts("SELECT account, symbol, net_volume, version FROM positions")}
    assert ch_versions == {k: (to_units(v.net_volume), v.version) for k, v in positions.items()}
    # The safety net for skipped offsets (app/faust_patches.py, 5) must not have been needed:
    # it fired after restarts until its causes were fixed (6, 8); a restart it forces hides a loss.
    worker_log = "\n".join(svc.log_text() for svc in p.services.running.values() if svc.argv[0] == "worker")
    skipped = [line for line in worker_log.splitlines() if "the fetch skipped offsets" in line]
    print(f"worker starts: {worker_log.count('Worker ready')}, stall-watchdog restarts: "
          f"{worker_log.count('consumer stalled for')}, skipped-offsets guard fired: {len(skipped)} {skipped[:3]}")
    assert not skipped, f"a worker's fetch skipped offsets: {skipped[:3]}"


async def sigkill_chaos(tmp_path, workers: int, n: int, seed: int, prefix: str, rate: float,
                        first_kill_after: float) -> None:
    """``n`` signals (and a 2 % sample again, as an upstream resend would) published at
    ``rate`` while a worker, picked at random among ``workers``, is SIGKILLed and restarted
    ``KILLS`` times at random moments; then nothing lost or doubled."""
    p = Pipeline(tmp_path, partitions=PARTITIONS, config=CHAOS_CONFIG)
    await p.start(workers=workers)
    store = ClickHouseStore.from_dsn(f"chdb:///{tmp_path / 'chdb'}")
    store.ensure_schema()
    sink = ClickHouseSink(p.settings, store=store)
    await sink.start()
    try:
        await p.hold_reference_prices()
        rng = random.Random(seed)
        signals, dupes = chaos_signals(n, rng, prefix=prefix)
        ids = [order_id_for(s["signal_id"], PARTITIONS) for s in signals]
        publisher = asyncio.create_task(p.publish_signals(signals + dupes, rate=rate))
        names = [f"worker-{i + 1}" for i in range(workers)]

        async def killer() -> None:
            span = (len(signals) + len(dupes)) / rate
            for _ in range(KILLS):
                await asyncio.sleep(rng.uniform(first_kill_after, max(first_kill_after + 1, span / KILLS)))
                await asyncio.to_thread(p.services.restart, rng.choice(names), True)

        await asyncio.gather(publisher, killer())
        await check_nothing_lost_or_doubled(p, sink, store, ids)
        await exits_and_commands_under_chaos(p, rng, names, prefix)
    finally:
        await sink.stop()
        store.close()
        p.stop()


async def exits_and_commands_under_chaos(p: Pipeline, rng: random.Random, names: list[str], prefix: str) -> None:
    """The second act, while a worker is SIGKILLed twice: far limit orders are placed and
    cancelled, the market runs through the stops and targets of two symbols (the broker closes
    those positions), and every remaining position is closed by command.  Afterwards: every
    limit order CANCELLED (at the broker too), every close order FILLED, one close order per
    command, and everything flat: ours = the broker's = the sum of the executions, exits
    included; realized PnL = the broker's deal profit."""
    limits = []
    for i in range(20):
        s = signal_dict(f"{prefix}-limit-{i}", rng, order_type="limit", side="buy", lots=0.1, account="acc-1")
        price = round(s["entry_price"] * 0.98, 5 if s["symbol"] not in ("USDJPY", "EURJPY", "XAUUSD") else 3)
        s.update(entry_price=price, limit_price=price, stop_loss=round(price * 0.99, 5), take_profit=round(price * 1.01, 5))
        s.pop("trigger_price", None)
        limits.append(s)
    await p.publish_signals(limits)
    limit_ids = [order_id_for(s["signal_id"], PARTITIONS) for s in limits]
    await p.wait_orders(limit_ids, lambda o: o.state is OrderState.SUBMITTED, timeout=120)

    async def kill_twice() -> None:
        for _ in range(2):
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            await asyncio.to_thread(p.services.restart, rng.choice(names), True)

    async def cancels() -> None:
        for i in limit_ids:
            await p.send_command("cancel", i, command_id=f"chaos-cancel-{i[:20]}")

    async def run_through_stops() -> None:
        for symbol in ("EURUSD", "GBPUSD"):
            mid = REFERENCE[symbol][0]
            await p.sim(cmd="set_price", symbol=symbol, mid=round(mid * 1.01, 5), hold=True)  # 100+ pips up

    await asyncio.gather(kill_twice(), cancels(), run_through_stops())
    orders = await p.wait_orders(limit_ids, timeout=240)
    assert {orders[i].state for i in limit_ids} == {OrderState.CANCELLED}

    # Close whatever the broker still holds for us, a command per position (sent twice).
    held = await p.broker_positions(MAGIC)
    closes = []
    kill = asyncio.create_task(kill_twice())
    for key in held:
        account, symbol = key.split(":")
        cid = f"chaos-close-{account}-{symbol}"
        for _ in range(2):
            await p.send_command("close_position", key, {"account": account, "symbol": symbol}, command_id=cid)
        closes.append(close_order_id(cid, key, PARTITIONS))
    await kill
    closed = await p.wait_orders(closes, timeout=240)
    assert {closed[c].state for c in closes} <= {OrderState.FILLED, OrderState.REJECTED}
    events = await p.events()
    assert all(sum(1 for e in events[c] if e.type.value == "created") == 1 for c in closes)

    async def flat() -> bool:
        return not await p.broker_positions(MAGIC)

    try:
        await wait_until(flat, timeout=120, what="the broker flat for our magic")
    except TimeoutError:
        left = await p.broker_positions(MAGIC)
        ours = await p.positions()
        print("broker before closes:", {k: (v.net_volume, v.ticket) for k, v in held.items()})
        print("broker now:", {k: (v.net_volume, v.ticket) for k, v in left.items()})
        print("ours now:", {k: (v.net_volume, v.ticket) for k, v in ours.items() if k in left})
        print("closes:", [(c, closed[c].state.value, closed[c].reason, closed[c].volume, closed[c].position_ticket)
                          for c in closes])
        raise
    deals = [d for d in await p.broker_deals() if d.magic == MAGIC]
    assert {"sl", "tp"} & {d.reason for d in deals}, "the market ran through stops or targets"

    async def ours_flat() -> bool:
        return all(to_units(v.net_volume) == 0 for v in (await p.positions()).values())

    await wait_until(ours_flat, timeout=120, what="our positions flat")
    executions = [e for es in (await p.executions(timeout=120)).values() for e in es]
    assert sorted({e.deal for e in executions}) == sorted(d.deal for d in deals)
    net: dict[str, int] = defaultdict(int)
    profit: dict[str, float] = defaultdict(float)
    for d in deals:
        net[f"{d.account}:{d.symbol}"] += to_units(d.volume) * d.side.sign
        profit[f"{d.account}:{d.symbol}"] += d.profit
    assert set(net.values()) == {0}
    for key, position in (await p.positions()).items():
        assert position.realized_pnl == pytest.approx(profit[key], abs=0.01), key
    stats = await p.sim_stats()
    print(f"chaos exits: {len(deals)} deals, reasons {sorted({d.reason for d in deals})}, "
          f"{len(closes)} closes, cancel requests {stats['other'].get('cancel_requests')}")


@pytest.mark.timeout(600)
async def test_worker_sigkilled_five_times_loses_and_doubles_nothing(tmp_path):
    await sigkill_chaos(tmp_path, workers=1, n=SIGNALS, seed=99, prefix="chaos", rate=200.0, first_kill_after=2.0)


@pytest.mark.timeout(900)
async def test_one_of_two_workers_sigkilled_five_times_loses_and_doubles_nothing(tmp_path):
    """Two workers share the partitions; one of them, chosen at random, is SIGKILLed and
    restarted five times while signals flow: every kill moves partitions to the survivor,
    every restart moves some back, each with its tables rebuilt or caught up from the
    changelogs.  Before app/faust_patches.py (6, reworked), (8) and (9) the skipped-offsets
    guard fired in about one run of six here, right after a rebalance (bench/README.md)."""
    await sigkill_chaos(tmp_path, workers=2, n=REBALANCE_SIGNALS, seed=7, prefix="rebalance", rate=150.0,
                        first_kill_after=1.0)


@pytest.mark.timeout(400)
async def test_bridge_killed_nats_restarted_clickhouse_down_loses_and_doubles_nothing(tmp_path):
    """While signals flow: the bridge is SIGKILLed (working through a backlog) and restarted,
    NATS is restarted, and ClickHouse refuses inserts for a while.

    "Nothing lost" starts at JetStream's ack: the upstream publisher resends every signal until
    JetStream acknowledges it (with a message id, so a resend of one already stored is dropped).
    The bridge acks NATS only after Kafka's ack, so its kill redelivers (duplicates on Kafka,
    removed by the orders agent); the sink commits only after ClickHouse stored a batch.
    On the embedded Tansu (the demo's broker); the other chaos tests run on Apache Kafka."""
    p = Pipeline(tmp_path, partitions=PARTITIONS, config=CHAOS_CONFIG, broker="tansu")
    await p.start()
    store = FlakyStore.from_dsn(f"chdb:///{tmp_path / 'chdb'}").arm(orders_down=0, others_down=0)
    store.ensure_schema()
    sink = ClickHouseSink(p.settings, store=store, retry_max=1.0)
    await sink.start()
    try:
        await p.hold_reference_prices()
        signals, dupes = chaos_signals(EDGE_SIGNALS, random.Random(17), prefix="edge")
        ids = [order_id_for(s["signal_id"], PARTITIONS) for s in signals]
        total = len(signals) + len(dupes)
        acked = [0]
        publisher = asyncio.create_task(
            p.publish_signals(signals + dupes, rate=200.0, on_ack=lambda n: acked.__setitem__(0, n)))

        async def when_published(fraction: float) -> int:
            while acked[0] < fraction * total:
                assert not publisher.done(), "the publisher stopped early"
                await asyncio.sleep(0.02)
            return acked[0]

        bridge_pid, nats_pid = p.services.running["bridge"].proc.pid, p.stack.nats.pid
        seen: dict[str, int] = {}

        async def chaos() -> None:
            # The bridge is frozen (SIGSTOP) while a backlog builds up, thawed, and killed while
            # it works through it: some records are on Kafka and not yet acked on NATS.
            await when_published(0.15)
            os.kill(bridge_pid, signal.SIGSTOP)
            await when_published(0.25)
            os.kill(bridge_pid, signal.SIGCONT)
            await asyncio.sleep(0.05)
            seen["bridge killed"] = acked[0]
            await asyncio.to_thread(p.services.restart, "bridge", True)
            seen["clickhouse down"] = await when_published(0.4)
            store.arm(orders_down=6.0, others_down=6.0)  # from its next insert on
            seen["nats restarted"] = await when_published(0.6)
            await asyncio.to_thread(p.stack.restart_nats)

        resends, _ = await asyncio.gather(publisher, chaos())
        # Each blow landed mid-stream, and did hit.
        assert all(0 < n < total for n in seen.values()), seen
        assert p.services.running["bridge"].proc.pid != bridge_pid and p.services.running["bridge"].alive
        assert p.stack.nats.pid != nats_pid
        await check_nothing_lost_or_doubled(p, sink, store, ids, timeout=240)
        assert store.failures > 0 and sink.stats["insert_failures"] == store.failures, (store.failures, dict(sink.stats))
        forwarded = (await topic_counts(p.settings, [SIGNALS_APPROVED]))[SIGNALS_APPROVED]
        print(f"edge chaos: {seen}, publisher resends {resends}, signals on Kafka {forwarded} of {total} published "
              f"(the surplus: redelivered after the bridge's kill), ClickHouse insert failures {store.failures}, "
              f"sink {dict(sink.stats)}")
    finally:
        await sink.stop()
        store.close()
        p.stop()
