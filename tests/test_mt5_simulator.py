"""The MT5 broker simulator against a real nats-server with JetStream (from ``app.local``).

One server and one simulator for the module; every test starts from ``reset`` and uses its
own accounts and client order ids.  Prices are held with ``set_price(hold=True)`` wherever
a test needs them exact.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import nats
import orjson
import pytest

from app.local import free_port, nats_server
from app.models import Fill, from_json, utcnow
from app.mt5 import contract as c
from app.mt5.contract import (
    MT5Client,
    NoReply,
    OrderType,
    Outcome,
    TradeAction,
    TradeRequest,
    classify,
)
from app.mt5.simulator import BrokerSimulator, control, stats

MAGIC = 424242
SPREAD = 0.0001  # EURUSD: 1 pip = 10 points


@pytest.fixture(scope="module")
async def env(tmp_path_factory):
    server = nats_server(free_port(), tmp_path_factory.mktemp("mt5-nats")).start()
    url = f"nats://127.0.0.1:{server.port}"
    sim = BrokerSimulator(url, seed=11)
    nc = None
    try:
        await sim.start()
        nc = await nats.connect(url)
        yield type("Env", (), {"url": url, "sim": sim, "nc": nc, "client": MT5Client(nc, timeout=2.0)})
    finally:
        if nc is not None:
            await nc.close()
        await sim.stop()
        server.stop()


@pytest.fixture(autouse=True)
async def fresh(env):
    defaults = (
        {"cmd": "reset"}, {"cmd": "set_liquidity", "lots": 5.0}, {"cmd": "set_sl_tp", "enabled": True},
        {"cmd": "set_balance", "balance": 100_000.0}, {"cmd": "set_stop_out", "enabled": True, "level": 50.0, "leverage": 100.0},
    )
    env.sim.clock = utcnow
    for cmd in defaults:
        assert (await control(env.nc, **cmd))["ok"]
    yield


async def ctl(env, **cmd) -> dict:
    reply = await control(env.nc, **cmd)
    assert reply["ok"], reply
    return reply


async def hold(env, bid: float, symbol: str = "EURUSD", **kw) -> dict:
    return await ctl(env, cmd="set_price", symbol=symbol, bid=bid, hold=True, **kw)


def order(comment: str, account: str, type: OrderType = OrderType.BUY, volume: float = 0.1, **kw) -> TradeRequest:
    action = TradeAction.DEAL if type.is_market else TradeAction.PENDING
    fields = {"action": action, "symbol": "EURUSD", "volume": volume, "type": type, "magic": MAGIC,
              "comment": comment, "account": account, **kw}
    return TradeRequest(**fields)


async def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def stream_deals(env, order_id: str | None = None) -> list[tuple[dict, bytes, dict]]:
    """(headers, data, parsed) of every deal event in MT5_FILLS (optionally one order's)."""
    js = env.nc.jetstream()
    info = await js.stream_info(c.FILLS_STREAM)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        m = await js.get_msg(c.FILLS_STREAM, seq)
        d = orjson.loads(m.data)
        if order_id is None or d["order_id"] == order_id:
            out.append((m.headers or {}, m.data, d))
    return out


async def published(env) -> bool:
    return (await stats(env.nc))["unpublished"] == 0


# --------------------------------------------------------------------------------------
# Prices
# --------------------------------------------------------------------------------------


def test_price_paths_are_seeded_and_quoted_at_the_symbols_digits():
    a, b, other = BrokerSimulator(seed=5), BrokerSimulator(seed=5), BrokerSimulator(seed=6)
    for _ in range(200):
        for s in (a, b, other):
            s.tick()
    quotes = lambda s: {k: (m.bid, m.ask) for k, m in s.markets.items()}
    assert quotes(a) == quotes(b)
    assert quotes(a) != quotes(other)
    for symbol, digits in (("EURUSD", 5), ("USDJPY", 3), ("XAUUSD", 2)):
        m = a.markets[symbol]
        assert m.spec.digits == digits
        assert round(m.bid, digits) == m.bid and round(m.ask, digits) == m.ask
        assert m.ask > m.bid
        assert round((m.ask - m.bid) / m.spec.point) == m.spread_points
        assert abs(m.bid - m.start) < 60 * m.spec.pip_size  # mean-reverting: stays near its start
    assert a.markets["EURUSD"].spread_points == 10 and a.markets["XAUUSD"].spread_points == 20


# --------------------------------------------------------------------------------------
# Market orders
# --------------------------------------------------------------------------------------


async def test_market_orders_fill_at_the_touch_within_deviation(env):
    await hold(env, 1.08000)  # ask 1.08010
    for i in range(30):
        buy = i % 2 == 0
        touch = 1.08010 if buy else 1.08000
        req = order(f"mkt-{i}", "mkt", OrderType.BUY if buy else OrderType.SELL, price=touch, deviation=3)
        r = await env.client.submit(req)
        assert r.retcode == c.Retcode.DONE, r
        assert r.order > 0 and r.deal > 0 and r.volume == 0.1 and r.request_comment == f"mkt-{i}"
        assert abs(r.price - touch) <= 3e-5 + 1e-12, (r.price, touch)
        assert (r.bid, r.ask) == (1.08000, 1.08010)
    exact = await env.client.submit(order("mkt-exact", "mkt", OrderType.SELL, price=0, deviation=0))
    assert (exact.retcode, exact.price) == (c.Retcode.DONE, 1.08000)


async def test_requote_beyond_deviation_then_a_repriced_resend_fills(env):
    quote = await hold(env, 1.08000)
    requested = quote["ask"]  # the client saw 1.08010 ...
    await hold(env, 1.08030)  # ... and the market moved 3 pips before the order arrived
    r = await env.client.submit(order("rq-1", "rq", price=requested, deviation=10))
    assert r.retcode == c.Retcode.REQUOTE and classify(r.retcode) is Outcome.REPRICE
    assert (r.order, r.deal, r.bid, r.ask) == (0, 0, 1.08030, 1.08040)
    # A requote is not an order: the same id re-priced is evaluated afresh (not deduped).
    r2 = await env.client.submit(order("rq-1", "rq", price=r.ask, deviation=10))
    assert r2.retcode == c.Retcode.DONE and abs(r2.price - 1.08040) <= 1e-4
    s = await stats(env.nc)
    assert s["by_comment"]["rq-1"] == 2 and s["executed"]["rq-1"] == 1
    # Within deviation (30 points exactly): no requote.
    r3 = await env.client.submit(order("rq-2", "rq", price=1.08010, deviation=30))
    assert r3.retcode == c.Retcode.DONE


async def test_large_orders_fill_in_several_deals(env):
    await hold(env, 1.08000)
    r = await env.client.submit(order("big-1", "big", OrderType.SELL, volume=12.0, deviation=5))
    assert r.retcode == c.Retcode.DONE_PARTIAL and classify(r.retcode) is Outcome.SUCCESS
    assert r.volume == 5.0 and r.deal > 0
    st = await wait_for(lambda: _filled(env, "big-1", "big"), what="big-1 filled")
    assert [d.volume for d in st.deals] == [5.0, 5.0, 2.0]
    assert st.deals[0].deal == r.deal and len({d.deal for d in st.deals}) == 3
    assert {d.ticket for d in st.deals} == {r.order} and st.ticket == r.order
    assert st.volume_initial == st.volume_filled == 12.0 and st.retcode == c.Retcode.DONE_PARTIAL
    assert all(d.side.value == "sell" and d.order_id == "big-1" for d in st.deals)
    await wait_for(lambda: published(env), what="deals published")
    deals = await stream_deals(env, "big-1")
    assert sorted(d["deal"] for _, _, d in deals) == sorted(d.deal for d in st.deals)
    assert abs(sum(d["volume"] for _, _, d in deals) - 12.0) < 1e-9
    snap = await env.client.positions("big")
    assert [(p.symbol, p.net_volume) for p in snap.positions] == [("EURUSD", -12.0)]


async def test_the_rest_of_a_large_market_order_waits_within_its_deviation(env):
    """The rest of a market order works as a limit at the requested price plus the deviation:
    a market that ran away leaves it waiting (no fill past the client's bound); a cancel
    removes it."""
    sim = env.sim  # driven directly until the market has run: a tick between would fill the rest
    sim.control({"cmd": "set_price", "symbol": "EURUSD", "bid": 1.08000, "hold": True})
    r = sim.submit(order("rest-1", "rest", OrderType.BUY, volume=8.0, price=1.08010, deviation=5))
    assert r.retcode == c.Retcode.DONE_PARTIAL and r.volume == 5.0
    sim.control({"cmd": "set_price", "symbol": "EURUSD", "bid": 1.08020, "hold": True})  # ask 20 points above
    sim.tick()
    st = await env.client.status(MAGIC, "rest-1", "rest")
    assert (st.state, st.volume_filled) == ("partially_filled", 5.0)
    assert (await env.client.cancel(MAGIC, "rest-1", "rest")).retcode == c.Retcode.DONE
    st = await env.client.status(MAGIC, "rest-1", "rest")
    assert (st.state, st.volume_filled) == ("cancelled", 5.0)
    # Back within the deviation, a rest fills.
    r = await env.client.submit(order("rest-2", "rest", OrderType.BUY, volume=8.0, price=1.08030, deviation=5))
    await hold(env, 1.08000)
    st = await wait_for(lambda: _filled(env, "rest-2", "rest"), what="rest-2 filled")
    assert st.volume_filled == 8.0 and all(d.price <= 1.08035 for d in st.deals)


async def _filled(env, comment: str, account: str):
    st = await env.client.status(MAGIC, comment, account)
    return st if st.state == "filled" else None


# --------------------------------------------------------------------------------------
# Pending orders
# --------------------------------------------------------------------------------------

PENDING_CASES = [
    # type, price, stoplimit, [(bid to set, fill price expected or None)]
    (OrderType.BUY_LIMIT, 1.07950, 0.0, [(1.07960, None), (1.07930, 1.07940)]),
    (OrderType.SELL_LIMIT, 1.08060, 0.0, [(1.08050, None), (1.08065, 1.08065)]),
    (OrderType.BUY_STOP, 1.08060, 0.0, [(1.08040, None), (1.08055, 1.08065)]),
    (OrderType.SELL_STOP, 1.07950, 0.0, [(1.07960, None), (1.07945, 1.07945)]),
    # stop-limit: the trigger places a limit at ``stoplimit``, which fills only at or better
    (OrderType.BUY_STOP_LIMIT, 1.08060, 1.08040, [(1.08055, None), (1.08025, 1.08035)]),
    (OrderType.SELL_STOP_LIMIT, 1.07950, 1.07970, [(1.07945, None), (1.07975, 1.07975)]),
]


@pytest.mark.parametrize("type_, price, stoplimit, steps", PENDING_CASES, ids=[t.name for t, *_ in PENDING_CASES])
async def test_pending_orders_trigger_on_forced_prices(env, type_, price, stoplimit, steps):
    await hold(env, 1.08000)
    comment = f"pend-{type_.name.lower()}"
    r = await env.client.submit(order(comment, "pend", type_, volume=0.3, price=price, stoplimit=stoplimit))
    assert r.retcode == c.Retcode.PLACED and r.order > 0 and r.deal == 0 and r.volume == 0
    st = await env.client.status(MAGIC, comment, "pend")
    assert (st.known, st.state, st.ticket, st.retcode) == (True, "placed", r.order, c.Retcode.PLACED)
    for bid, fill in steps:
        await hold(env, bid)
        st = await env.client.status(MAGIC, comment, "pend")
        if fill is None:
            assert st.state == "placed" and st.deals == [], (bid, st)
        else:
            assert st.state == "filled", (bid, st)
            assert [(d.price, d.volume, d.ticket) for d in st.deals] == [(fill, 0.3, r.order)]
            assert st.deals[0].side.value == type_.side


async def test_pending_orders_also_trigger_on_their_own(env):
    assert not (await ctl(env, cmd="quote", symbol="GBPUSD"))["held"]
    quote = await ctl(env, cmd="quote", symbol="GBPUSD")
    await hold(env, quote["bid"], symbol="GBPUSD")  # place against a known quote, then let it run
    reqs = [
        order("nat-limit", "nat", OrderType.BUY_LIMIT, symbol="GBPUSD", price=round(quote["ask"] - 0.0002, 5)),
        order("nat-stop", "nat", OrderType.SELL_STOP, symbol="GBPUSD", price=round(quote["bid"] - 0.0002, 5)),
    ]
    for req in reqs:
        assert (await env.client.submit(req)).retcode == c.Retcode.PLACED
    await ctl(env, cmd="release", symbol="GBPUSD")
    for req in reqs:
        await wait_for(lambda req=req: _filled(env, req.comment, "nat"), timeout=20, what=f"{req.comment} triggered")


async def test_cancel_and_expiry(env):
    await hold(env, 1.08000)
    placed = await env.client.submit(order("cx-1", "cx", OrderType.BUY_LIMIT, price=1.07900))
    r = await env.client.cancel(MAGIC, "cx-1", "cx")
    assert (r.retcode, r.order) == (c.Retcode.DONE, placed.order)
    assert (await env.client.status(MAGIC, "cx-1", "cx")).state == "cancelled"
    assert (await env.client.cancel(MAGIC, "cx-1", "cx")).retcode == c.Retcode.INVALID  # already final
    assert (await env.client.cancel(MAGIC, "cx-nope", "cx")).retcode == c.Retcode.INVALID  # not found
    await env.client.submit(order("cx-mkt", "cx"))
    assert (await env.client.cancel(MAGIC, "cx-mkt", "cx")).retcode == c.Retcode.INVALID_ORDER
    # TRADE_ACTION_REMOVE through submit is the same as a cancel.
    await env.client.submit(order("cx-2", "cx", OrderType.SELL_LIMIT, price=1.08100))
    removed = await env.client.submit(TradeRequest(action=TradeAction.REMOVE, symbol="EURUSD", volume=0.1,
                                                   type=OrderType.SELL_LIMIT, magic=MAGIC, comment="cx-2", account="cx"))
    assert removed.retcode == c.Retcode.DONE
    assert (await env.client.status(MAGIC, "cx-2", "cx")).state == "cancelled"

    soon = utcnow() + timedelta(seconds=0.3)
    r = await env.client.submit(order("cx-exp", "cx", OrderType.BUY_LIMIT, price=1.07900, type_time=c.OrderTime.SPECIFIED, expiration=soon))
    assert r.retcode == c.Retcode.PLACED

    async def expired():
        return (await env.client.status(MAGIC, "cx-exp", "cx")).state == "expired"

    await wait_for(expired, what="expiry")


# --------------------------------------------------------------------------------------
# Rejections
# --------------------------------------------------------------------------------------

past = utcnow() - timedelta(minutes=1)
REJECT_CASES = [
    # id, request fields, expected retcode (EURUSD held at 1.08000 / 1.08010, stops level 10 points)
    ("volume_zero", {"volume": 0.0}, 10014),
    ("volume_negative", {"volume": -1.0}, 10014),
    ("volume_not_a_step", {"volume": 0.015}, 10014),
    ("volume_below_min", {"volume": 0.001}, 10014),
    ("volume_above_max", {"volume": 1500.0}, 10014),
    ("buy_limit_above_ask", {"type": OrderType.BUY_LIMIT, "price": 1.08100}, 10015),
    ("sell_stop_above_bid", {"type": OrderType.SELL_STOP, "price": 1.08050}, 10015),
    ("buy_stop_too_close", {"type": OrderType.BUY_STOP, "price": 1.08015}, 10015),
    ("stop_limit_without_limit", {"type": OrderType.BUY_STOP_LIMIT, "price": 1.08100}, 10015),
    ("pending_without_price", {"type": OrderType.SELL_LIMIT, "price": 0.0}, 10015),
    ("buy_sl_above_bid", {"sl": 1.08050}, 10016),
    ("buy_sl_too_close", {"sl": 1.07995}, 10016),
    ("sell_tp_above_ask", {"type": OrderType.SELL, "tp": 1.08100}, 10016),
    ("buy_limit_sl_above_price", {"type": OrderType.BUY_LIMIT, "price": 1.07900, "sl": 1.07950}, 10016),
    ("no_money", {"volume": 600.0}, 10019),
    ("unknown_symbol", {"symbol": "ABCDEF"}, 10013),
    ("market_type_as_pending", {"action": TradeAction.PENDING, "type": OrderType.BUY}, 10035),
    ("pending_type_as_deal", {"action": TradeAction.DEAL, "type": OrderType.BUY_LIMIT, "price": 1.07900}, 10035),
    ("expiration_in_the_past", {"type": OrderType.BUY_LIMIT, "price": 1.07900, "type_time": 2, "expiration": past}, 10022),
]


@pytest.mark.parametrize("case, fields, retcode", REJECT_CASES, ids=[c_[0] for c_ in REJECT_CASES])
async def test_rejects_with_the_mt5_retcode(env, case, fields, retcode):
    await hold(env, 1.08000)
    fields = dict(fields)
    type_ = fields.pop("type", OrderType.BUY)
    req = order(f"rej-{case}"[:31], "rej", type_, **fields)
    r = await env.client.submit(req)
    assert r.retcode == retcode, r
    assert classify(r.retcode) is Outcome.REJECT
    assert (r.order, r.deal, r.volume) == (0, 0, 0.0) and r.request_comment == req.comment and r.comment
    st = await env.client.status(MAGIC, req.comment, "rej")
    assert (st.known, st.state, st.retcode, st.ticket, st.deals) == (True, "rejected", retcode, 0, [])
    assert req.comment not in (await stats(env.nc))["executed"]


async def test_a_rejected_id_can_be_sent_again(env):
    await hold(env, 1.08000)
    assert (await env.client.submit(order("rej-again", "rej2", volume=0.015))).retcode == 10014
    r = await env.client.submit(order("rej-again", "rej2", volume=0.02))
    assert r.retcode == c.Retcode.DONE
    assert (await env.client.status(MAGIC, "rej-again", "rej2")).state == "filled"


async def test_market_closed(env):
    await hold(env, 1.08000)
    pending = await env.client.submit(order("mc-pend", "mc", OrderType.BUY_LIMIT, price=1.07950))
    await ctl(env, cmd="close_market", symbol="EURUSD")
    try:
        r = await env.client.submit(order("mc-1", "mc"))
        assert r.retcode == c.Retcode.MARKET_CLOSED and classify(r.retcode) is Outcome.REJECT
        await ctl(env, cmd="set_price", symbol="EURUSD", bid=1.07900, hold=True)
        assert (await env.client.status(MAGIC, "mc-pend", "mc")).state == "placed"  # no trading while closed
        assert (await env.client.cancel(MAGIC, "mc-pend", "mc")).retcode == c.Retcode.MARKET_CLOSED
        assert (await env.client.submit(order("mc-gbp", "mc", symbol="GBPUSD"))).retcode == c.Retcode.DONE
    finally:
        await ctl(env, cmd="open_market", symbol="EURUSD")
    assert pending.retcode == c.Retcode.PLACED
    assert (await env.client.submit(order("mc-2", "mc"))).retcode == c.Retcode.DONE


async def test_margin_per_account_and_at_trigger(env):
    await hold(env, 1.08000)
    await ctl(env, cmd="set_margin", account="poor", lots=1.0)
    assert (await env.client.submit(order("m-1", "poor", volume=2.0))).retcode == c.Retcode.NO_MONEY
    assert (await env.client.submit(order("m-2", "poor", volume=1.0))).retcode == c.Retcode.DONE
    # Closing needs no margin; a pending order that cannot be paid for when it triggers is rejected.
    assert (await env.client.submit(order("m-3", "poor", OrderType.SELL, volume=1.0))).retcode == c.Retcode.DONE
    assert (await env.client.submit(order("m-4", "rich", OrderType.BUY_LIMIT, volume=2.0, price=1.07950))).retcode == c.Retcode.PLACED
    await ctl(env, cmd="set_margin", account="rich", lots=1.0)
    await hold(env, 1.07900)
    st = await env.client.status(MAGIC, "m-4", "rich")
    assert (st.state, st.deals, st.retcode) == ("rejected", [], c.Retcode.PLACED)


async def test_injected_rejects_and_unknown_outcomes(env):
    await hold(env, 1.08000)
    await ctl(env, cmd="reject_next", retcode=10006, count=2)
    for i in range(2):
        assert (await env.client.submit(order(f"inj-{i}", "inj"))).retcode == 10006
    assert (await env.client.submit(order("inj-2", "inj"))).retcode == c.Retcode.DONE
    # An injected requote carries the quote to re-price from.
    await ctl(env, cmd="reject_next", retcode=10004)
    r = await env.client.submit(order("inj-rq", "inj"))
    assert (r.retcode, r.bid, r.ask) == (10004, 1.08000, 1.08010)
    # 10012 TIMEOUT without processing: the broker has no trace of it.
    await ctl(env, cmd="reject_next", retcode=10012)
    r = await env.client.submit(order("inj-to", "inj"))
    assert r.retcode == 10012 and classify(r.retcode) is Outcome.UNKNOWN
    assert not (await env.client.status(MAGIC, "inj-to", "inj")).known
    # 10011 ERROR although the order executed: status tells the truth, a resend the first result.
    await ctl(env, cmd="reject_next", retcode=10011, execute=True)
    r = await env.client.submit(order("inj-ex", "inj"))
    assert r.retcode == 10011
    st = await env.client.status(MAGIC, "inj-ex", "inj")
    assert (st.known, st.state, len(st.deals)) == (True, "filled", 1)
    again = await env.client.submit(order("inj-ex", "inj"))
    assert again.retcode == c.Retcode.DONE and again.order == st.ticket and again.deal == st.deals[0].deal
    assert (await stats(env.nc))["executed"]["inj-ex"] == 1


async def test_unparsable_submission_is_invalid(env):
    msg = await env.nc.request(c.SUBMIT, b'{"symbol": "EURUSD", "comment": "bad-1"}', timeout=2)
    r = from_json(c.TradeResult, msg.data)
    assert r.retcode == c.Retcode.INVALID and r.request_comment == "bad-1" and "volume" in r.comment
    reply = await control(env.nc, cmd="no_such_command")
    assert reply["ok"] is False and "no_such_command" in reply["error"]


# --------------------------------------------------------------------------------------
# Dedupe, lost replies, lost requests
# --------------------------------------------------------------------------------------


async def test_resubmission_is_deduped_and_returns_the_first_result(env):
    await hold(env, 1.08000)
    first = await env.client.submit(order("dup-1", "dup", volume=0.5))
    await hold(env, 1.08200)  # the market moved: a new execution would differ
    second = await env.client.submit(order("dup-1", "dup", volume=0.5, price=1.08210, deviation=0))
    assert second == first
    other_account = await env.client.submit(order("dup-1", "dup-b", volume=0.5))
    assert other_account.order != first.order  # the key is (account, magic, comment)
    s = await stats(env.nc)
    assert s["by_comment"]["dup-1"] == 3 and s["executed"]["dup-1"] == 2 and s["deduped"] == 1
    st = await env.client.status(MAGIC, "dup-1", "dup")
    assert len(st.deals) == 1
    snap = await env.client.positions("dup")
    assert [p.net_volume for p in snap.positions] == [0.5]


async def test_drop_replies_is_a_stuck_order_the_broker_knows(env):
    await hold(env, 1.08000)
    await ctl(env, cmd="drop_replies", count=1)
    client = MT5Client(env.nc, timeout=0.5)
    with pytest.raises(NoReply):
        await client.submit(order("stuck-1", "stuck"))
    st = await client.status(MAGIC, "stuck-1", "stuck")
    assert (st.known, st.state, len(st.deals)) == (True, "filled", 1)
    again = await client.submit(order("stuck-1", "stuck"))
    assert (again.retcode, again.order, again.deal) == (c.Retcode.DONE, st.ticket, st.deals[0].deal)
    s = await stats(env.nc)
    assert s["executed"]["stuck-1"] == 1 and s["dropped_replies"] == 1


async def test_drop_unprocessed_is_an_order_the_broker_never_saw(env):
    await hold(env, 1.08000)
    await ctl(env, cmd="drop_unprocessed", count=1)
    client = MT5Client(env.nc, timeout=0.5)
    with pytest.raises(NoReply):
        await client.submit(order("lost-1", "lost"))
    st = await client.status(MAGIC, "lost-1", "lost")
    assert st.known is False and st.state is None and st.deals == []
    assert "lost-1" not in (await stats(env.nc))["executed"]
    r = await client.submit(order("lost-1", "lost"))  # unknown at the broker: safe to resend
    assert r.retcode == c.Retcode.DONE
    s = await stats(env.nc)
    assert s["executed"]["lost-1"] == 1 and s["by_comment"]["lost-1"] == 2 and s["dropped_unprocessed"] == 1


async def test_reset_faults(env):
    await ctl(env, cmd="drop_replies", count=5)
    await ctl(env, cmd="reset_faults")
    assert (await env.client.submit(order("rf-1", "rf"))).retcode == c.Retcode.DONE


# --------------------------------------------------------------------------------------
# Positions and deal events
# --------------------------------------------------------------------------------------


async def test_positions_are_netted_with_an_average_price(env):
    await hold(env, 1.08000)
    steps = [
        # type, volume, bid, entry, net, avg, profit (USD), position ticket: the order of step i
        (OrderType.BUY, 1.0, 1.08000, "in", 1.0, 1.0801, 0.0, 0),
        (OrderType.BUY, 1.0, 1.08100, "in", 2.0, 1.0806, 0.0, 0),  # 1 @ 1.08010 + 1 @ 1.08110
        (OrderType.SELL, 0.5, 1.08100, "out", 1.5, 1.0806, 20.0, 0),  # a reduction keeps the average
        (OrderType.SELL, 3.0, 1.08100, "inout", -1.5, 1.081, 60.0, 3),  # a reversal: new ticket, deal price
        (OrderType.BUY, 1.5, 1.08100, "out", None, None, -15.0, 3),  # flat: not listed
    ]
    tickets = []
    for i, (type_, volume, bid, entry, net, avg, profit, opener) in enumerate(steps):
        await hold(env, bid)
        r = await env.client.submit(order(f"net-{i}", "net", type_, volume=volume))
        assert r.retcode == c.Retcode.DONE
        tickets.append(r.order)
        st = await env.client.status(MAGIC, f"net-{i}", "net")
        [deal] = st.deals
        assert (deal.entry, deal.reason, deal.profit, deal.currency) == (entry, "expert", profit, "USD"), deal
        assert (deal.order_id, deal.position, deal.magic, deal.account) == (f"net-{i}", tickets[opener], MAGIC, "net")
        snap = await env.client.positions("net")
        if net is None:
            assert snap.positions == []
        else:
            [p] = snap.positions
            assert (p.account, p.symbol, p.net_volume, p.magic, p.ticket) == ("net", "EURUSD", net, MAGIC, tickets[opener])
            assert abs(p.avg_price - avg) < 1e-9, (p.avg_price, avg)
    assert (await ctl(env, cmd="account", account="net"))["realized"] == 65.0
    await env.client.submit(order("net-other", "net-2", OrderType.SELL, symbol="USDJPY", volume=0.2))
    await ctl(env, cmd="set_position", account="net-3", symbol="XAUUSD", net_volume=0.3, avg_price=2345.6)
    everyone = await env.client.positions(None)
    tuples = {p.as_tuple()[:3] for p in everyone.positions}
    assert ("net-2", "USDJPY", -0.2) in tuples and ("net-3", "XAUUSD", 0.3) in tuples
    assert [p.account for p in (await env.client.positions("net-3")).positions] == ["net-3"]
    await ctl(env, cmd="set_position", account="net-3", symbol="XAUUSD", net_volume=0)
    assert (await env.client.positions("net-3")).positions == []


async def test_deal_events_reach_jetstream_once_and_parse_as_fills(env):
    await hold(env, 1.08000)
    r = await env.client.submit(order("js-1", "js", OrderType.SELL, volume=0.7))
    await wait_for(lambda: published(env), what="deals published")
    [(headers, data, raw)] = await stream_deals(env, "js-1")
    assert headers.get("Nats-Msg-Id") == f"deal-{r.deal}"
    fill = from_json(Fill, data)
    assert (fill.order_id, fill.deal, fill.ticket, fill.symbol, fill.side.value) == ("js-1", r.deal, r.order, "EURUSD", "sell")
    assert (fill.price, fill.volume) == (r.price, 0.7)
    assert (raw["account"], raw["magic"], raw["entry"]) == ("js", MAGIC, "in")
    assert (raw["reason"], raw["position"], raw["profit"], raw["currency"]) == ("expert", r.order, 0.0, "USD")
    assert (fill.reason, fill.position, fill.is_exit, fill.routing_key) == ("expert", r.order, False, "js-1")
    # The stream drops a re-publication of the same deal.
    ack = await env.nc.jetstream().publish(c.fills_subject("EURUSD"), data, headers={"Nats-Msg-Id": f"deal-{r.deal}"})
    assert ack.duplicate
    assert len(await stream_deals(env, "js-1")) == 1


async def test_stats_shape(env):
    await hold(env, 1.08000)
    await env.client.submit(order("st-1", "st"))
    s = await stats(env.nc)
    for key in ("requests", "orders", "by_comment", "executed", "deals"):
        assert key in s
    assert (s["requests"], s["orders"], s["by_comment"], s["executed"], s["deals"]) == (1, 1, {"st-1": 1}, {"st-1": 1}, 1)


async def test_receipts_record_when_each_order_first_arrived(env):
    await hold(env, 1.08000)
    before = time.time()
    await env.client.submit(order("rc-1", "rc"))
    between = time.time()
    await env.client.submit(order("rc-2", "rc"))
    await env.client.submit(order("rc-1", "rc"))  # a deduped resend keeps the first receipt
    after = time.time()
    got = (await ctl(env, cmd="receipts", comments=["rc-1", "rc-2", "never-sent"]))["received"]
    assert set(got) == {"rc-1", "rc-2"}  # ids never received are left out
    assert before <= got["rc-1"] <= between <= got["rc-2"] <= after
    assert (await ctl(env, cmd="receipts"))["received"] == got  # no list: every receipt
    await ctl(env, cmd="reset")
    assert (await ctl(env, cmd="receipts"))["received"] == {}
    bad = await control(env.nc, cmd="receipts", comments="rc-1")
    assert bad["ok"] is False and "list" in bad["error"]


# --------------------------------------------------------------------------------------
# Exits the broker makes: SL, TP, stop-out
# --------------------------------------------------------------------------------------


async def account_deals(env, account: str) -> list[Fill]:
    """Every deal event of ``account`` in MT5_FILLS, once all are published, oldest first."""
    await wait_for(lambda: published(env), what="deals published")
    return [from_json(Fill, data) for _, data, raw in await stream_deals(env) if raw["account"] == account]


def test_sl_tp_and_stop_out_are_on_by_default():
    sim = BrokerSimulator()
    assert sim.enable_sl_tp and sim.enable_stop_out
    assert (sim.balance, sim.leverage, sim.stop_out_level) == (100_000.0, 100.0, 50.0)
    from app.mt5.simulator import _env_options

    assert _env_options({}) == {}
    assert _env_options({"EXECUTION_SIM_ENABLE_SL_TP": "0", "EXECUTION_SIM_BALANCE": "500"}) == {
        "enable_sl_tp": False, "balance": 500.0}


def test_hold_prices_starts_every_market_held_at_its_start_price():
    from app.mt5.simulator import _env_options

    assert _env_options({"EXECUTION_SIM_HOLD_PRICES": "1"}) == {"hold_prices": True}
    assert not any(m.held for m in BrokerSimulator().markets.values())
    sim = BrokerSimulator(hold_prices=True, prices={"EURUSD": 1.2345})
    assert all(m.held for m in sim.markets.values())
    eurusd = sim.markets["EURUSD"]
    assert (eurusd.bid, eurusd.ask) == (1.23445, 1.23455)


async def test_stop_loss_closes_the_position_routed_to_the_opening_order(env):
    await hold(env, 1.08000)
    r = await env.client.submit(order("sl-1", "sltp", volume=0.5, sl=1.07900, tp=1.08300))
    assert r.retcode == c.Retcode.DONE
    [p] = (await env.client.positions("sltp")).positions
    assert (p.ticket, p.magic, p.sl, p.tp) == (r.order, MAGIC, 1.079, 1.083)
    await hold(env, 1.07910)  # not yet
    assert len((await env.client.positions("sltp")).positions) == 1
    await hold(env, 1.07890)  # the bid reaches the stop loss
    assert (await env.client.positions("sltp")).positions == []
    st = await env.client.status(MAGIC, "sl-1", "sltp")
    assert (st.state, len(st.deals)) == ("filled", 1)  # the exit is not a fill of our order
    entry, exit_ = await account_deals(env, "sltp")
    assert (entry.deal, entry.entry, entry.reason, entry.position) == (r.deal, "in", "expert", r.order)
    # The exit: the opening order's comment and the position's ticket, a broker-made order ticket.
    assert (exit_.order_id, exit_.position, exit_.magic, exit_.reason, exit_.entry) == ("sl-1", r.order, MAGIC, "sl", "out")
    assert exit_.ticket not in (None, r.order) and exit_.is_exit and exit_.routing_key == "sl-1"
    assert (exit_.side.value, exit_.volume, exit_.price) == ("sell", 0.5, 1.0789)
    assert (exit_.profit, exit_.currency) == (-60.0, "USD")  # 0.5 lot x (1.07890 - 1.08010) x 100000
    assert not (await env.client.status(MAGIC, "sl-1:sl", "sltp")).known  # no made-up comments
    assert (await stats(env.nc))["other"]["closed_by_sl"] == 1
    acct = await ctl(env, cmd="account", account="sltp")
    assert (acct["realized"], acct["equity"], acct["margin"], acct["margin_level"]) == (-60.0, 99_940.0, 0.0, None)


async def test_take_profit_of_a_usdjpy_short_is_converted_at_the_deal_price(env):
    await hold(env, 157.000, symbol="USDJPY")  # ask 157.010
    r = await env.client.submit(order("tp-1", "tpjpy", OrderType.SELL, symbol="USDJPY", volume=1.0, tp=156.000))
    assert (r.retcode, r.price) == (c.Retcode.DONE, 157.0)
    await hold(env, 155.990, symbol="USDJPY")  # the ask reaches the take profit
    assert (await env.client.positions("tpjpy")).positions == []
    _, exit_ = await account_deals(env, "tpjpy")
    assert (exit_.order_id, exit_.position, exit_.reason, exit_.entry, exit_.side.value) == ("tp-1", r.order, "tp", "out", "buy")
    assert exit_.price == 156.0
    assert exit_.profit == round(100_000 * 1.0 / 156.0, 2) == 641.03  # 100000 JPY at 156.000


async def test_sl_tp_can_be_switched_off_and_a_cross_converts_at_its_usd_quote(env):
    await ctl(env, cmd="set_sl_tp", enabled=False)
    await hold(env, 1.27000, symbol="GBPUSD")  # mid 1.27005: GBP -> USD
    await hold(env, 0.85000, symbol="EURGBP")  # ask 0.85010
    r = await env.client.submit(order("x-1", "cross", symbol="EURGBP", volume=1.0, sl=0.84900))
    assert r.retcode == c.Retcode.DONE
    await hold(env, 0.84800, symbol="EURGBP")
    [p] = (await env.client.positions("cross")).positions  # SL/TP off: validated, kept, never triggered
    assert p.sl == 0.849
    await ctl(env, cmd="set_sl_tp", enabled=True)
    await hold(env, 0.84790, symbol="EURGBP")
    assert (await env.client.positions("cross")).positions == []
    _, exit_ = await account_deals(env, "cross")
    assert exit_.reason == "sl" and exit_.price == 0.8479
    assert exit_.profit == round(1.0 * (0.84790 - 0.85010) * 100_000 * 1.27005, 2)


async def test_stop_out_closes_the_largest_loss_when_the_margin_level_falls(env):
    await ctl(env, cmd="set_balance", account="so", balance=1_000.0)
    await hold(env, 1.08000)
    await hold(env, 1.27000, symbol="GBPUSD")
    eur = await env.client.submit(order("so-eur", "so", volume=1.0))  # margin 1080.05 USD at 1:100
    gbp = await env.client.submit(order("so-gbp", "so", OrderType.SELL, symbol="GBPUSD", volume=0.1))
    assert eur.retcode == gbp.retcode == c.Retcode.DONE
    acct = await ctl(env, cmd="account", account="so")
    assert acct["balance"] == 1_000.0 and acct["equity"] == 989.0 and acct["margin"] == round(1080.05 + 127.005, 2)
    await hold(env, 1.07700)  # equity 689, margin 1204: 57 % > 50 %
    assert len((await env.client.positions("so")).positions) == 2
    await hold(env, 1.07600)  # equity 589, margin 1203: 49 % < 50 %: the EURUSD loss goes
    [left] = (await env.client.positions("so")).positions
    assert (left.symbol, left.net_volume, left.ticket) == ("GBPUSD", -0.1, gbp.order)
    exits = [d for d in await account_deals(env, "so") if d.is_exit]
    assert [(d.order_id, d.position, d.reason, d.entry, d.magic, d.volume) for d in exits] == [
        ("so-eur", eur.order, "stop_out", "out", MAGIC, 1.0)]
    assert exits[0].profit == -410.0 and exits[0].price == 1.076
    acct = await ctl(env, cmd="account", account="so")
    assert acct["realized"] == -410.0 and acct["margin_level"] > 50
    # Another account with the default balance is untouched by the same move.
    assert (await env.client.submit(order("so-rich", "so-rich", volume=1.0))).retcode == c.Retcode.DONE
    await hold(env, 1.07000)
    assert len((await env.client.positions("so-rich")).positions) == 1
    # Switched off, nothing is closed; a smaller balance set later stops the account out at once.
    await ctl(env, cmd="set_stop_out", enabled=False)
    await ctl(env, cmd="set_balance", account="so-rich", balance=100.0)
    assert len((await env.client.positions("so-rich")).positions) == 1
    await ctl(env, cmd="set_stop_out", enabled=True)
    assert (await env.client.positions("so-rich")).positions == []


# --------------------------------------------------------------------------------------
# Closes by position ticket
# --------------------------------------------------------------------------------------


def close(comment: str, account: str, position: int, volume: float, type: OrderType = OrderType.SELL, **kw) -> TradeRequest:
    return order(comment, account, type, volume=volume, position=position, **kw)


async def test_close_by_position_ticket_partial_then_full(env):
    await hold(env, 1.08000)
    opened = await env.client.submit(order("cl-open", "cl", volume=1.0))
    ticket = opened.order
    r = await env.client.submit(close("cl-1", "cl", ticket, 0.4))
    assert r.retcode == c.Retcode.DONE and r.volume == 0.4
    [deal] = (await env.client.status(MAGIC, "cl-1", "cl")).deals
    assert (deal.order_id, deal.entry, deal.reason, deal.position, deal.profit) == ("cl-1", "out", "expert", ticket, -4.0)
    [p] = (await env.client.positions("cl")).positions
    assert (p.net_volume, p.ticket, p.avg_price) == (0.6, ticket, 1.0801)
    for req, retcode in (
        (close("cl-big", "cl", ticket, 0.7), c.Retcode.INVALID_CLOSE_VOLUME),
        (close("cl-side", "cl", ticket, 0.1, OrderType.BUY), c.Retcode.INVALID_ORDER),
        (close("cl-sl", "cl", ticket, 0.1, sl=1.08100), c.Retcode.INVALID_STOPS),
        (close("cl-pend", "cl", ticket, 0.1, OrderType.SELL_LIMIT, action=TradeAction.PENDING, price=1.08100),
         c.Retcode.INVALID_ORDER),
        (close("cl-nope", "cl", 123456, 0.1), c.Retcode.POSITION_CLOSED),
        (close("cl-acct", "cl-other", ticket, 0.1), c.Retcode.POSITION_CLOSED),  # another account's position
    ):
        res = await env.client.submit(req)
        assert res.retcode == retcode, (req.comment, res)
        assert (await env.client.status(MAGIC, req.comment, req.account)).state == "rejected"
    assert (await env.client.submit(close("cl-1", "cl", ticket, 0.4))) == r  # deduped: the first result
    full = await env.client.submit(close("cl-2", "cl", ticket, 0.6))
    assert full.retcode == c.Retcode.DONE
    assert (await env.client.positions("cl")).positions == []
    assert (await env.client.submit(close("cl-3", "cl", ticket, 0.1))).retcode == c.Retcode.POSITION_CLOSED
    deals = await account_deals(env, "cl")
    assert [(d.order_id, d.entry, d.position) for d in deals] == [("cl-open", "in", ticket), ("cl-1", "out", ticket),
                                                                   ("cl-2", "out", ticket)]
    assert not any(d.is_exit for d in deals)  # our own closes are fills of our close orders


async def test_a_large_close_fills_in_chunks_and_its_rest_is_cancelled_if_the_position_goes(env):
    sim = env.sim  # driven directly: no tick can run between these synchronous calls
    sim.control({"cmd": "set_price", "symbol": "EURUSD", "bid": 1.08, "hold": True})
    sim.liquidity_lots = 0.5
    opened = sim.submit(order("ch-open", "ch", volume=1.0))
    assert (opened.retcode, opened.volume) == (c.Retcode.DONE_PARTIAL, 0.5)  # opened in two chunks
    sim.tick()
    assert sim.snapshot("ch").positions[0].net_volume == 1.0
    r = sim.submit(close("ch-all", "ch", opened.order, 1.0))
    assert (r.retcode, r.volume) == (c.Retcode.DONE_PARTIAL, 0.5)
    sim.tick()
    st = sim.status(c.StatusQuery(magic=MAGIC, comment="ch-all", account="ch"))
    assert (st.state, [d.entry for d in st.deals]) == ("filled", ["out", "out"])
    assert sim.snapshot("ch").positions == []
    opened = sim.submit(order("ch-open2", "ch", volume=1.0))
    sim.tick()
    r = sim.submit(close("ch-1", "ch", opened.order, 0.8))
    assert (r.retcode, r.volume) == (c.Retcode.DONE_PARTIAL, 0.5)
    sim.control({"cmd": "set_position", "account": "ch", "symbol": "EURUSD", "net_volume": 0})  # gone
    sim.tick()
    st = sim.status(c.StatusQuery(magic=MAGIC, comment="ch-1", account="ch"))
    assert (st.state, st.volume_filled) == ("cancelled", 0.5)


# --------------------------------------------------------------------------------------
# Modify
# --------------------------------------------------------------------------------------


def modify(comment: str, account: str, **kw) -> c.ModifyRequest:
    return c.ModifyRequest(magic=MAGIC, comment=comment, account=account, **kw)


async def test_modify_a_pending_order(env):
    await hold(env, 1.08000)
    placed = await env.client.submit(order("md-1", "md", OrderType.BUY_LIMIT, volume=0.2, price=1.07900))
    for req, retcode in (
        (modify("md-1", "md"), c.Retcode.NO_CHANGES),
        (modify("md-1", "md", price=1.07900), c.Retcode.NO_CHANGES),
        (modify("md-1", "md", price=1.08100), c.Retcode.INVALID_PRICE),  # a buy limit above the ask
        (modify("md-1", "md", sl=1.07950), c.Retcode.INVALID_STOPS),  # SL above the order price
        (modify("md-1", "md", expiration=utcnow() - timedelta(minutes=1)), c.Retcode.INVALID_EXPIRATION),
        (modify("md-nope", "md", price=1.07900), c.Retcode.INVALID),
    ):
        res = await env.client.modify(req)
        assert res.retcode == retcode, (req, res)
    r = await env.client.modify(modify("md-1", "md", price=1.07950, sl=1.07850, tp=1.08200))
    assert (r.retcode, r.order, r.request_comment) == (c.Retcode.DONE, placed.order, "md-1")
    await hold(env, 1.07945)  # ask 1.07955: not at the new limit yet
    assert (await env.client.status(MAGIC, "md-1", "md")).state == "placed"
    await hold(env, 1.07940)  # ask 1.07950: the modified limit fills (the old one would not)
    st = await env.client.status(MAGIC, "md-1", "md")
    assert st.state == "filled" and st.deals[0].price == 1.0795
    [p] = (await env.client.positions("md")).positions
    assert (p.sl, p.tp, p.ticket) == (1.0785, 1.082, placed.order)  # the SL/TP came with the fill


async def test_modify_a_triggered_stop_limit_moves_its_limit(env):
    await hold(env, 1.08000)
    await env.client.submit(order("msl-1", "msl", OrderType.BUY_STOP_LIMIT, price=1.08060, stoplimit=1.08040))
    await hold(env, 1.08055)  # ask 1.08065: triggered, now a buy limit at 1.08040
    assert (await env.client.status(MAGIC, "msl-1", "msl")).state == "placed"
    assert (await env.client.modify(modify("msl-1", "msl", price=1.08100))).retcode == c.Retcode.INVALID_ORDER
    assert (await env.client.modify(modify("msl-1", "msl", stoplimit=1.08060))).retcode == c.Retcode.INVALID_PRICE
    assert (await env.client.modify(modify("msl-1", "msl", stoplimit=1.08050))).retcode == c.Retcode.DONE
    await hold(env, 1.08040)  # ask 1.08050
    st = await env.client.status(MAGIC, "msl-1", "msl")
    assert st.state == "filled" and st.deals[0].price == 1.0805


async def test_a_modified_order_is_matched_at_once(env):
    await hold(env, 1.08000)
    await env.client.submit(order("md-now", "md-now", OrderType.BUY_LIMIT, price=1.07900))
    env.sim.stops_level_points = 0  # allow a limit at the touch
    try:
        r = await env.client.modify(modify("md-now", "md-now", price=1.08010))
    finally:
        env.sim.stops_level_points = 10
    assert r.retcode == c.Retcode.DONE
    st = await env.client.status(MAGIC, "md-now", "md-now")
    assert st.state == "filled" and st.deals[0].price == 1.0801


async def test_modify_the_sl_tp_of_a_position(env):
    await hold(env, 1.08000)
    opened = await env.client.submit(order("mp-1", "mp", volume=0.3, sl=1.07800))
    assert (await env.client.modify(modify("mp-1", "mp", price=1.07900))).retcode == c.Retcode.INVALID_ORDER
    assert (await env.client.modify(modify("mp-1", "mp", sl=1.07800))).retcode == c.Retcode.NO_CHANGES
    assert (await env.client.modify(modify("mp-1", "mp", sl=1.08050))).retcode == c.Retcode.INVALID_STOPS  # above the bid
    r = await env.client.modify(modify("mp-1", "mp", sl=1.07950, tp=1.08200))
    assert (r.retcode, r.order) == (c.Retcode.DONE, opened.order)
    [p] = (await env.client.positions("mp")).positions
    assert (p.sl, p.tp) == (1.0795, 1.082)
    # By position ticket, whatever the comment; 0 removes the TP.
    r = await env.client.modify(modify("anything", "mp", position=opened.order, tp=0.0))
    assert r.retcode == c.Retcode.DONE
    [p] = (await env.client.positions("mp")).positions
    assert (p.sl, p.tp) == (1.0795, 0.0)
    await hold(env, 1.07950)  # the modified SL triggers
    assert (await env.client.positions("mp")).positions == []
    [exit_] = [d for d in await account_deals(env, "mp") if d.is_exit]
    assert (exit_.order_id, exit_.reason, exit_.position, exit_.price) == ("mp-1", "sl", opened.order, 1.0795)
    assert (await env.client.modify(modify("mp-1", "mp", sl=1.07000))).retcode == c.Retcode.POSITION_CLOSED
    assert (await env.client.modify(modify("x", "mp", position=opened.order, sl=1.07))).retcode == c.Retcode.POSITION_CLOSED
    # A cancelled order that never filled has nothing to modify.
    await env.client.submit(order("mp-c", "mp", OrderType.BUY_LIMIT, price=1.07800))
    await env.client.cancel(MAGIC, "mp-c", "mp")
    assert (await env.client.modify(modify("mp-c", "mp", price=1.07700))).retcode == c.Retcode.INVALID


# --------------------------------------------------------------------------------------
# Manual trades, magic numbers, set_position
# --------------------------------------------------------------------------------------


async def test_manual_trades_net_per_magic_and_the_snapshot_filters_by_magic(env):
    await hold(env, 1.08000)
    ours = await env.client.submit(order("mt-1", "mt", volume=0.3))
    hand = await ctl(env, cmd="manual_trade", account="mt", symbol="EURUSD", side="sell", volume=0.1, comment="by hand")
    [d] = hand["deals"]
    assert (d["reason"], d["magic"], d["entry"], d["order_id"], d["position"], d["price"]) == (
        "client", 0, "in", "by hand", hand["order"], 1.08)
    both = (await env.client.positions("mt")).positions
    assert {(p.magic, p.net_volume, p.ticket) for p in both} == {(MAGIC, 0.3, ours.order), (0, -0.1, hand["order"])}
    [mine] = (await env.client.positions("mt", magic=MAGIC)).positions
    assert (mine.net_volume, mine.ticket) == (0.3, ours.order)
    assert [p.magic for p in (await env.client.positions(None, magic=0)).positions] == [0]
    # A close at the terminal of our position: an exit routed to the order that opened it.
    cut = await ctl(env, cmd="manual_trade", account="mt", symbol="EURUSD", side="sell", volume=0.1, magic=MAGIC)
    [d] = cut["deals"]
    assert (d["reason"], d["entry"], d["order_id"], d["position"], d["magic"], d["profit"]) == (
        "client", "out", "mt-1", ours.order, MAGIC, -1.0)
    assert (await env.client.positions("mt", magic=MAGIC)).positions[0].net_volume == 0.2
    # A reversal by hand is two deals: the out of our position, then the in of a new one.
    rev = await ctl(env, cmd="manual_trade", account="mt", symbol="EURUSD", side="sell", volume=0.5, magic=MAGIC, comment="flip")
    assert [(d["entry"], d["order_id"], d["volume"], d["position"]) for d in rev["deals"]] == [
        ("out", "mt-1", 0.2, ours.order), ("in", "flip", 0.3, rev["order"])]
    fills = [d for d in await account_deals(env, "mt") if d.reason == "client"]
    assert len(fills) == 4 and all(f.is_exit for f in fills)
    bad = await control(env.nc, cmd="manual_trade", account="mt", symbol="EURUSD", side="up", volume=0.1)
    assert bad["ok"] is False


async def test_set_position_defaults_to_the_only_magic_of_the_account_and_symbol(env):
    await hold(env, 1.08000)
    ours = await env.client.submit(order("sp-1", "sp", volume=0.3))
    reply = await ctl(env, cmd="set_position", account="sp", symbol="EURUSD", net_volume=0.5, avg_price=1.07)
    assert (reply["magic"], reply["ticket"]) == (MAGIC, ours.order)
    [p] = (await env.client.positions("sp")).positions
    assert (p.magic, p.net_volume, p.avg_price, p.ticket) == (MAGIC, 0.5, 1.07, ours.order)
    await ctl(env, cmd="manual_trade", account="sp", symbol="EURUSD", side="buy", volume=0.1)
    reply = await ctl(env, cmd="set_position", account="sp", symbol="EURUSD", net_volume=0.2)  # two magics: 0
    assert reply["magic"] == 0
    assert {(p.magic, p.net_volume) for p in (await env.client.positions("sp")).positions} == {(MAGIC, 0.5), (0, 0.2)}
    await ctl(env, cmd="set_position", account="sp", symbol="EURUSD", net_volume=0, magic=MAGIC)
    assert [p.magic for p in (await env.client.positions("sp")).positions] == [0]


# --------------------------------------------------------------------------------------
# Time in force
# --------------------------------------------------------------------------------------


async def test_day_and_specified_orders_expire_at_their_time(env):
    from app.mt5.simulator import next_midnight

    await hold(env, 1.08000)
    now = utcnow()
    midnight = next_midnight(now)
    assert midnight > now and (midnight - now) <= timedelta(days=1) and midnight.hour == 0
    cases = {
        "tif-day": dict(type_time=c.OrderTime.DAY),
        "tif-spec": dict(type_time=c.OrderTime.SPECIFIED, expiration=now + timedelta(hours=2)),
        "tif-sday": dict(type_time=c.OrderTime.SPECIFIED_DAY, expiration=now),  # the end of today
        "tif-gtc": dict(),
    }
    for comment, kw in cases.items():
        r = await env.client.submit(order(comment, "tif", OrderType.BUY_LIMIT, price=1.07900, **kw))
        assert r.retcode == c.Retcode.PLACED, (comment, r)

    async def states():
        return {k: (await env.client.status(MAGIC, k, "tif")).state for k in cases}

    try:
        env.sim.clock = lambda: now + timedelta(hours=2, seconds=1)
        env.sim.tick()
        expected = {"tif-day": "placed", "tif-spec": "expired", "tif-sday": "placed", "tif-gtc": "placed"}
        if midnight <= now + timedelta(hours=2, seconds=1):  # run close to midnight
            expected.update({"tif-day": "expired", "tif-sday": "expired"})
        assert await states() == expected
        env.sim.clock = lambda: midnight - timedelta(seconds=1)
        env.sim.tick()
        assert (await states())["tif-day"] == expected["tif-day"]
        env.sim.clock = lambda: midnight
        env.sim.tick()
        assert await states() == {"tif-day": "expired", "tif-spec": "expired", "tif-sday": "expired", "tif-gtc": "placed"}
    finally:
        env.sim.clock = utcnow
    st = await env.client.status(MAGIC, "tif-day", "tif")
    assert (st.known, st.state, st.retcode, st.deals) == (True, "expired", c.Retcode.PLACED, [])
    assert (await env.client.modify(modify("tif-day", "tif", price=1.07800))).retcode == c.Retcode.INVALID


async def test_symbols_without_broker_expiry_take_gtc_only(env):
    await hold(env, 28.450, symbol="XAGUSD")  # ask 28.470
    assert env.sim.symbols["XAGUSD"].broker_expiry is False
    later = utcnow() + timedelta(hours=1)
    for i, kw in enumerate((dict(type_time=c.OrderTime.DAY), dict(type_time=c.OrderTime.SPECIFIED, expiration=later),
                            dict(type_time=c.OrderTime.SPECIFIED_DAY, expiration=later))):
        r = await env.client.submit(order(f"ag-{i}", "ag", OrderType.BUY_LIMIT, symbol="XAGUSD", price=28.300, **kw))
        assert r.retcode == c.Retcode.INVALID_EXPIRATION, r
    r = await env.client.submit(order("ag-mkt", "ag", symbol="XAGUSD", type_time=c.OrderTime.DAY))
    assert r.retcode == c.Retcode.INVALID_EXPIRATION
    assert (await env.client.submit(order("ag-gtc", "ag", OrderType.BUY_LIMIT, symbol="XAGUSD", price=28.300))).retcode == c.Retcode.PLACED
    assert (await env.client.modify(modify("ag-gtc", "ag", expiration=later))).retcode == c.Retcode.INVALID_EXPIRATION
    # On a symbol the broker expires, an expiration makes a GTC order SPECIFIED.
    await hold(env, 1.08000)
    await env.client.submit(order("eu-gtc", "ag", OrderType.BUY_LIMIT, price=1.07900))
    assert (await env.client.modify(modify("eu-gtc", "ag", expiration=later))).retcode == c.Retcode.DONE
    assert env.sim.orders[("ag", MAGIC, "eu-gtc")].expiration == later
