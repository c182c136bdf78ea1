"""The whole trade lifecycle against the harsh simulator (SL/TP triggering, stop-outs,
expiries, requotes): exits, commands, time in force, the slippage cap, stale signals, the halt
switch and reduce-only, end to end on real servers."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from datetime import timedelta

import pytest

from app.models import EventType, OrderIntent, OrderState, utcnow
from app.sample import REFERENCE, signal_dict
from pipeline import TEST_CONFIG, Pipeline
from support import wait_until
from tables.fills import to_units
from tables.idempotency import close_order_id, order_id_for
from tables.order_types import MAGIC
from tables.symbols import DEFAULT_SYMBOLS

pytestmark = pytest.mark.slow

PARTITIONS = 4


@pytest.fixture(scope="module")
async def pipe(tmp_path_factory):
    p = Pipeline(tmp_path_factory.mktemp("lifecycle"), partitions=PARTITIONS)
    await p.start()
    try:
        yield p
    finally:
        p.stop()


def oid(signal_id: str) -> str:
    return order_id_for(signal_id, PARTITIONS)


def pip(symbol: str) -> float:
    return DEFAULT_SYMBOLS[symbol].pip_size


async def test_every_position_closed_by_sl_tp_a_close_or_a_stop_out(pipe: Pipeline):
    """Positions opened by market orders end flat through each kind of exit; ours equal the
    broker's, the executions (exits included) sum to them, realized PnL equals the broker's
    deal profit; a manual trade of another magic is reported and never merged."""
    await pipe.hold_reference_prices()
    rng = random.Random(14)
    accounts = ("lc-a", "lc-b")
    plan = {"EURUSD": "sl", "GBPUSD": "tp", "USDJPY": "close", "AUDUSD": "stop_out"}
    signals = []
    for symbol in plan:
        for account in accounts:
            for n in range(2):
                signals.append(signal_dict(f"lc-{symbol}-{account}-{n}", rng, symbol=symbol, order_type="market",
                                           side="buy", lots=0.1, account=account))
    await pipe.publish_signals(signals)
    ids = [oid(s["signal_id"]) for s in signals]
    orders = await pipe.wait_orders(ids)
    assert {orders[i].state for i in ids} == {OrderState.FILLED}, {i: (orders[i].state, orders[i].reason) for i in ids}
    assert all(orders[i].attempts >= 1 and orders[i].position_ticket for i in ids)

    # A manual trade at the terminal (magic 0) on a symbol we hold.
    await pipe.sim(cmd="manual_trade", account="lc-a", symbol="EURUSD", side="buy", volume=0.3, magic=0, comment="")

    # Stop-loss: the bid falls through every EURUSD stop (20 pips below entry).
    mid = REFERENCE["EURUSD"][0]
    await pipe.sim(cmd="set_price", symbol="EURUSD", mid=round(mid - 30 * pip("EURUSD"), 5), hold=True)
    # Take-profit: the bid rises through every GBPUSD target (40 pips above entry).
    mid = REFERENCE["GBPUSD"][0]
    await pipe.sim(cmd="set_price", symbol="GBPUSD", mid=round(mid + 50 * pip("GBPUSD"), 5), hold=True)
    # Close commands: half, then the rest (USDJPY of both accounts, and AUDUSD of lc-a, whose
    # manual EURUSD trade a stop-out would close too).  The rest is asked for as soon as the
    # half is FILLED (its deal may not be in the position yet), or with the half still in
    # flight: either way it closes only what the half leaves.
    closes = []
    for account, symbol, wait in (("lc-a", "USDJPY", True), ("lc-b", "USDJPY", False), ("lc-a", "AUDUSD", False)):
        key = f"{account}:{symbol}"
        await wait_until(lambda k=key: _net(pipe, k, 0.2), timeout=60, what=f"position {key}")
        for volume in (0.1, None):
            cid = await pipe.send_command("close_position", key, {"account": account, "symbol": symbol, "volume": volume})
            closes.append(close_order_id(cid, key, PARTITIONS))
            if wait:
                await pipe.wait_orders([closes[-1]])
    # A stop-out: lc-b's balance is gone; the broker closes what is left (its AUDUSD).
    await pipe.sim(cmd="set_balance", account="lc-b", balance=-1_000_000)

    await wait_until(lambda: _broker_flat(pipe), timeout=60, what="the broker flat for our magic")
    deals = [d for d in await pipe.broker_deals() if d.magic == MAGIC and d.account in accounts]
    positions = await wait_until(lambda: _positions_flat(pipe, accounts), timeout=60, what="our positions flat")

    closed = await pipe.wait_orders(closes)
    assert all(closed[c].state is OrderState.FILLED and closed[c].intent is OrderIntent.CLOSE for c in closes), \
        {c: (closed[c].state, closed[c].intent, closed[c].reason) for c in closes}
    assert [closed[c].filled_volume for c in closes] == [0.1] * len(closes)
    assert {d.reason for d in deals} == {"expert", "sl", "tp", "stop_out"}

    # Executions (the orders' fills and the exits) sum to the position, deal by deal.
    executions = [e for es in (await pipe.executions()).values() for e in es if e.account in accounts]
    assert sorted(e.deal for e in executions) == sorted(d.deal for d in deals)
    net: dict[str, int] = defaultdict(int)
    for e in executions:
        net[f"{e.account}:{e.symbol}"] += to_units(e.volume) * e.side.sign
    assert set(net.values()) == {0}
    # Realized PnL is the broker's deal profit.
    profit: dict[str, float] = defaultdict(float)
    for d in deals:
        profit[f"{d.account}:{d.symbol}"] += d.profit
    for key, p in positions.items():
        assert p.realized_pnl == pytest.approx(profit[key], abs=0.01), key
        assert p.currency == "USD"
    # Exits are in the audit trail of the order that opened the position.
    events = await pipe.events()
    exits = [e for es in events.values() for e in es if e.type is EventType.POSITION_EXIT]
    assert {e.detail["reason"] for e in exits} >= {"sl", "tp", "stop_out"}
    # The manual trade: reported, not merged.
    foreign = [e for es in events.values() for e in es if e.type is EventType.FOREIGN_DEAL]
    assert len(foreign) == 1 and foreign[0].detail["magic"] == 0
    broker_all = await pipe.broker_positions()
    assert broker_all["lc-a:EURUSD"].net_volume == pytest.approx(0.3) and broker_all["lc-a:EURUSD"].magic == 0
    assert positions["lc-a:EURUSD"].net_volume == 0
    for symbol in plan:
        await pipe.sim(cmd="release", symbol=symbol)


async def _net(pipe: Pipeline, key: str, volume: float) -> bool:
    p = (await pipe.positions()).get(key)
    return p is not None and p.net_volume == pytest.approx(volume)


async def _broker_flat(pipe: Pipeline) -> bool:
    return not [p for p in (await pipe.broker_positions(MAGIC)).values() if p.account.startswith("lc-")]


async def _positions_flat(pipe: Pipeline, accounts) -> dict | None:
    held = {k: p for k, p in (await pipe.positions()).items() if p.account in accounts}
    return held if held and all(p.net_volume == 0 for p in held.values()) else None


async def test_cancel_modify_and_repeated_commands(pipe: Pipeline):
    await pipe.hold_reference_prices()
    rng = random.Random(15)
    mid = REFERENCE["EURUSD"][0]
    far = signal_dict("cmd-limit", rng, symbol="EURUSD", order_type="limit", side="buy", lots=0.1, account="cm-a")
    far.update(entry_price=round(mid - 50 * pip("EURUSD"), 5), limit_price=round(mid - 50 * pip("EURUSD"), 5),
               stop_loss=round(mid - 80 * pip("EURUSD"), 5), take_profit=round(mid + 20 * pip("EURUSD"), 5))
    await pipe.publish_signals([far])
    i = oid("cmd-limit")
    await pipe.wait_orders([i], lambda o: o.state is OrderState.SUBMITTED)

    new_price = round(mid - 40 * pip("EURUSD"), 5)
    await pipe.send_command("modify", i, {"price": new_price}, command_id="m-1")
    o = (await pipe.wait_orders([i], lambda o: o.limit_price == new_price))[i]
    assert o.state is OrderState.SUBMITTED and o.expected_price == new_price
    await pipe.send_command("modify", i, {"price": new_price}, command_id="m-1")  # delivered again
    await pipe.send_command("cancel", i, command_id="c-1")
    o = (await pipe.wait_orders([i]))[i]
    assert o.state is OrderState.CANCELLED and o.reason == "cancelled"
    await pipe.send_command("cancel", i, command_id="c-1")  # delivered again
    await pipe.send_command("cancel", i, command_id="c-2")  # a new cancel of a final order

    # A filled market order: cancel refused; SL/TP move on its position at the broker.
    market = signal_dict("cmd-market", rng, symbol="EURUSD", order_type="market", side="buy", lots=0.1, account="cm-a")
    await pipe.publish_signals([market])
    m = oid("cmd-market")
    await pipe.wait_orders([m])
    await pipe.send_command("cancel", m, command_id="c-3")
    new_sl = round(mid - 10 * pip("EURUSD"), 5)
    await pipe.send_command("modify", m, {"stop_loss": new_sl}, command_id="m-2")
    await pipe.wait_orders([m], lambda o: o.stop_loss == new_sl)
    assert (await pipe.broker_positions(MAGIC))["cm-a:EURUSD"].sl == pytest.approx(new_sl)

    def kinds(order_id):
        return [(e.type, e.detail.get("command_id")) for e in events[order_id] if "command" in e.type.value or e.type is EventType.MODIFIED]

    events = await wait_until(lambda: _events_with(pipe, m, EventType.MODIFIED), timeout=60, what="command records")
    assert kinds(i).count((EventType.COMMAND_ACCEPTED, "m-1")) == 1
    assert (EventType.DUPLICATE_COMMAND, "m-1") in kinds(i) and (EventType.DUPLICATE_COMMAND, "c-1") in kinds(i)
    assert kinds(i).count((EventType.MODIFIED, "m-1")) == 1
    refused = [e for e in events[i] if e.type is EventType.COMMAND_REFUSED]
    assert [e.detail["command_id"] for e in refused] == ["c-2"] and "CANCELLED" in refused[0].reason
    refused = [e for e in events[m] if e.type is EventType.COMMAND_REFUSED]
    assert [e.detail["command_id"] for e in refused] == ["c-3"] and "FILLED" in refused[0].reason
    # The broker saw one cancel and one modify of the limit order, however often they came.
    stats = await pipe.sim_stats()
    assert stats["other"].get("cancel_requests", 0) >= 1
    await pipe.sim(cmd="release")


async def _events_with(pipe: Pipeline, order_id: str, event_type: EventType):
    events = await pipe.events()
    return events if any(e.type is event_type for e in events.get(order_id, ())) else None


async def test_day_gtd_expiry_by_the_broker_and_by_the_service(pipe: Pipeline):
    await pipe.hold_reference_prices()
    rng = random.Random(16)
    expires = (utcnow() + timedelta(seconds=2)).isoformat()
    signals = []
    for symbol in ("EURUSD", "XAGUSD"):  # the broker expires EURUSD orders; silver is ours to expire
        quote = await pipe.sim(cmd="quote", symbol=symbol)
        mid, digits = (quote["bid"] + quote["ask"]) / 2, quote["digits"]
        await pipe.sim(cmd="set_price", symbol=symbol, mid=mid, hold=True)
        s = signal_dict(f"gtd-{symbol}", rng, symbol="EURUSD", order_type="limit", side="buy", lots=0.1, account="ex-a")
        price = round(mid - 60 * pip(symbol), digits)
        s.update(symbol=symbol, entry_price=price, limit_price=price, stop_loss=round(price - 30 * pip(symbol), digits),
                 take_profit=round(price + 30 * pip(symbol), digits), time_in_force="GTD", expires_at=expires)
        signals.append(s)
    day = signal_dict("day-EURUSD", rng, symbol="EURUSD", order_type="limit", side="sell", lots=0.1, account="ex-a")
    price = round(REFERENCE["EURUSD"][0] + 60 * pip("EURUSD"), 5)
    day.update(entry_price=price, limit_price=price, stop_loss=round(price + 30 * pip("EURUSD"), 5),
               take_profit=round(price - 30 * pip("EURUSD"), 5), time_in_force="DAY")
    # A broker whose clock steps every 1.5 s expires EURUSD up to 1.5 s late: the service
    # must leave it that grace, not cancel it on time.
    await pipe.sim(cmd="set_tick_interval", seconds=1.5)
    try:
        await pipe.publish_signals([*signals, day])
        gtd = [oid("gtd-EURUSD"), oid("gtd-XAGUSD")]
        done = await pipe.wait_orders(gtd, timeout=60)
    finally:
        await pipe.sim(cmd="set_tick_interval", seconds=0.05)
    for i in gtd:
        assert (done[i].state, done[i].reason) == (OrderState.CANCELLED, "expired"), done[i]
    broker = {s: (await pipe._request("mt5.orders.status", {"magic": MAGIC, "comment": oid(f"gtd-{s}"), "account": "ex-a"}))["state"]
              for s in ("EURUSD", "XAGUSD")}
    assert broker == {"EURUSD": "expired", "XAGUSD": "cancelled"}
    d = (await pipe.wait_orders([oid("day-EURUSD")], lambda o: o.state is OrderState.SUBMITTED))[oid("day-EURUSD")]
    assert d.expires_at is not None and d.expires_at.hour == 0 and d.expires_at > utcnow()
    await pipe.sim(cmd="release")


async def test_slippage_cap_stale_signals_halt_and_reduce_only(pipe: Pipeline):
    await pipe.hold_reference_prices()
    rng = random.Random(17)
    mid, digits = REFERENCE["EURUSD"]
    # The market is 10 pips above the entry of a buy: requoted, and the cap (3 pips) refuses.
    away = signal_dict("cap-1", rng, symbol="EURUSD", order_type="market", side="buy", lots=0.1, account="cap-a")
    entry = round(mid - 10 * pip("EURUSD"), digits)
    away.update(entry_price=entry, stop_loss=round(entry - 20 * pip("EURUSD"), digits),
                take_profit=round(entry + 40 * pip("EURUSD"), digits))
    # A signal that waited two minutes (a backlog after an outage): not traded.
    stale = signal_dict("stale-1", rng, symbol="EURUSD", order_type="market", side="buy", lots=0.1, account="cap-a")
    stale["approved_at"] = (utcnow() - timedelta(seconds=120)).isoformat()
    await pipe.publish_signals([away, stale])
    got = await pipe.wait_orders([oid("cap-1"), oid("stale-1")])
    cap = got[oid("cap-1")]
    assert cap.state is OrderState.REJECTED and "slippage cap" in cap.reason and cap.filled_volume == 0
    assert got[oid("stale-1")].state is OrderState.REJECTED and got[oid("stale-1")].reason.startswith("stale")
    assert oid("stale-1") not in (await pipe.sim_stats())["by_comment"]

    # An open long to reduce later.
    base = signal_dict("ro-open", rng, symbol="EURUSD", order_type="market", side="buy", lots=0.2, account="ro-a")
    await pipe.publish_signals([base])
    assert (await pipe.wait_orders([oid("ro-open")]))[oid("ro-open")].state is OrderState.FILLED

    trading = {"trading_enabled": False}
    await pipe.set_config({"operational": {**TEST_CONFIG["operational"], "trading": trading}})
    try:
        await pipe.publish_signals([signal_dict("halt-1", rng, symbol="EURUSD", order_type="market", lots=0.1, account="ro-a")])
        o = (await pipe.wait_orders([oid("halt-1")]))[oid("halt-1")]
        assert o.state is OrderState.REJECTED and o.reason.startswith("halted")
        await pipe.set_config({"operational": {**TEST_CONFIG["operational"], "trading": {"reduce_only": True}}})
        grow = signal_dict("ro-grow", rng, symbol="EURUSD", order_type="market", side="buy", lots=0.1, account="ro-a")
        shrink = signal_dict("ro-shrink", rng, symbol="EURUSD", order_type="market", side="sell", lots=0.1, account="ro-a")
        await pipe.publish_signals([grow, shrink])
        got = await pipe.wait_orders([oid("ro-grow"), oid("ro-shrink")])
        assert got[oid("ro-grow")].state is OrderState.REJECTED and got[oid("ro-grow")].reason.startswith("reduce_only")
        assert got[oid("ro-shrink")].state is OrderState.FILLED
    finally:
        await pipe.set_config(TEST_CONFIG)
    assert (await pipe.broker_positions(MAGIC))["ro-a:EURUSD"].net_volume == pytest.approx(0.1)
    await pipe.sim(cmd="release")


async def test_cancel_racing_a_fill_ends_consistent(pipe: Pipeline):
    """A cancel sent while the market crosses the limit: the order ends CANCELLED untouched, or
    FILLED with the cancel refused; the executions and the broker agree either way."""
    rng = random.Random(18)
    symbol = "USDCHF"
    mid, digits = REFERENCE[symbol]
    ids = []
    for n in range(4):
        await pipe.sim(cmd="set_price", symbol=symbol, mid=mid, hold=True)
        s = signal_dict(f"race-{n}", rng, symbol=symbol, order_type="limit", side="buy", lots=0.1, account="race-a")
        price = round(mid - 3 * pip(symbol), digits)
        s.update(entry_price=price, limit_price=price, stop_loss=round(price - 30 * pip(symbol), digits),
                 take_profit=round(price + 30 * pip(symbol), digits))
        await pipe.publish_signals([s])
        i = oid(f"race-{n}")
        ids.append(i)
        await pipe.wait_orders([i], lambda o: o.state is OrderState.SUBMITTED)
        crossing = pipe.sim(cmd="set_price", symbol=symbol, mid=round(mid - 6 * pip(symbol), digits), hold=True)
        cancel = pipe.send_command("cancel", i, command_id=f"race-cancel-{n}")
        await asyncio.gather(*((crossing, cancel) if n % 2 else (cancel, crossing)))
    orders = await pipe.wait_orders(ids)
    executions = await pipe.executions()
    events = await pipe.events()
    for i in ids:
        o = orders[i]
        filled = sum(to_units(e.volume) for e in executions.get(i, ()) if e.reason == "expert")
        assert to_units(o.filled_volume) == filled
        if o.state is OrderState.FILLED:
            assert any(e.type is EventType.COMMAND_REFUSED for e in events[i]), [e.type for e in events[i]]
        else:
            assert o.state is OrderState.CANCELLED
        status = await pipe._request("mt5.orders.status", {"magic": MAGIC, "comment": i, "account": "race-a"})
        assert status["volume_filled"] == pytest.approx(o.filled_volume)
    await pipe.sim(cmd="release")


async def test_modify_racing_a_trigger_ends_consistent(pipe: Pipeline):
    """A stop order's trigger moved while the market runs through it: either the modify lands
    first (the order works at the new trigger) or the trigger does (the order fills and the
    modify is refused, or applies to the position's SL/TP only); the archive says which, and
    the order, its executions and the broker agree."""
    rng = random.Random(19)
    symbol = "AUDUSD"
    mid, digits = REFERENCE[symbol]
    ids = []
    for n in range(4):
        await pipe.sim(cmd="set_price", symbol=symbol, mid=mid, hold=True)
        s = signal_dict(f"mrace-{n}", rng, symbol=symbol, order_type="stop", side="buy", lots=0.1, account="mrace-a")
        trigger = round(mid + 4 * pip(symbol), digits)
        s.update(entry_price=trigger, trigger_price=trigger, stop_loss=round(trigger - 30 * pip(symbol), digits),
                 take_profit=round(trigger + 30 * pip(symbol), digits))
        await pipe.publish_signals([s])
        i = oid(f"mrace-{n}")
        ids.append(i)
        await pipe.wait_orders([i], lambda o: o.state is OrderState.SUBMITTED)
        through = pipe.sim(cmd="set_price", symbol=symbol, mid=round(mid + 8 * pip(symbol), digits), hold=True)
        modify = pipe.send_command("modify", i, {"price": round(mid + 20 * pip(symbol), digits)}, command_id=f"mrace-{n}")
        await asyncio.gather(*((through, modify) if n % 2 else (modify, through)))
    await pipe.sim(cmd="set_price", symbol=symbol, mid=mid, hold=True)

    def answered(events, i):
        return any(e.type in (EventType.MODIFIED, EventType.COMMAND_REFUSED) for e in events.get(i, ()))

    events = await wait_until(lambda: _all_answered(pipe, ids, answered), timeout=60, what="every modify answered")
    orders = await pipe.wait_orders(ids, lambda o: o.state in (OrderState.SUBMITTED, OrderState.FILLED))
    executions = await pipe.executions()
    for i in ids:
        o = orders[i]
        status = await pipe._request("mt5.orders.status", {"magic": MAGIC, "comment": i, "account": "mrace-a"})
        filled = sum(to_units(e.volume) for e in executions.get(i, ()) if e.reason == "expert")
        assert to_units(o.filled_volume) == filled == to_units(status["volume_filled"]), i
        modified = [e for e in events[i] if e.type is EventType.MODIFIED]
        if o.state is OrderState.SUBMITTED:  # the modify won: the order works at its new trigger
            assert modified and o.trigger_price == round(mid + 20 * pip(symbol), digits)
            assert status["state"] == "placed"
        else:  # the trigger won: the order filled at the old trigger; the price change was refused
            assert not [e for e in modified if "price" in e.detail]
            assert any(e.type is EventType.COMMAND_REFUSED for e in events[i])
    for i in ids:
        if orders[i].state is OrderState.SUBMITTED:
            await pipe.send_command("cancel", i)
    await pipe.wait_orders([i for i in ids if orders[i].state is OrderState.SUBMITTED])
    await pipe.sim(cmd="release")


async def _all_answered(pipe: Pipeline, ids, answered):
    events = await pipe.events()
    return events if all(answered(events, i) for i in ids) else None
