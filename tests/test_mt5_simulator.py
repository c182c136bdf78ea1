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
    for cmd in ({"cmd": "reset"}, {"cmd": "set_liquidity", "lots": 5.0}, {"cmd": "set_sl_tp", "enabled": False}):
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
        (OrderType.BUY, 1.0, 1.08000, "in", 1.0, 1.0801),
        (OrderType.BUY, 1.0, 1.08100, "in", 2.0, 1.0806),  # 1 @ 1.08010 + 1 @ 1.08110
        (OrderType.SELL, 0.5, 1.08100, "out", 1.5, 1.0806),  # a reduction keeps the average
        (OrderType.SELL, 3.0, 1.08100, "inout", -1.5, 1.081),  # a reversal opens at the deal price
        (OrderType.BUY, 1.5, 1.08100, "out", None, None),  # flat: not listed
    ]
    for i, (type_, volume, bid, entry, net, avg) in enumerate(steps):
        await hold(env, bid)
        r = await env.client.submit(order(f"net-{i}", "net", type_, volume=volume))
        assert r.retcode == c.Retcode.DONE
        st = await env.client.status(MAGIC, f"net-{i}", "net")
        assert st.deals[0].entry == entry
        snap = await env.client.positions("net")
        if net is None:
            assert snap.positions == []
        else:
            [p] = snap.positions
            assert (p.account, p.symbol, p.net_volume) == ("net", "EURUSD", net)
            assert abs(p.avg_price - avg) < 1e-9, (p.avg_price, avg)
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
    # The stream drops a re-publication of the same deal.
    ack = await env.nc.jetstream().publish(c.fills_subject("EURUSD"), data, headers={"Nats-Msg-Id": f"deal-{r.deal}"})
    assert ack.duplicate
    assert len(await stream_deals(env, "js-1")) == 1


async def test_sl_tp_closures_are_their_own_deals_when_enabled(env):
    await ctl(env, cmd="set_sl_tp", enabled=True)
    await hold(env, 1.08000)
    r = await env.client.submit(order("sl-1", "sltp", volume=0.5, sl=1.07900, tp=1.08300))
    assert r.retcode == c.Retcode.DONE
    await hold(env, 1.07890)  # the bid reaches the stop loss
    assert (await env.client.positions("sltp")).positions == []
    st = await env.client.status(MAGIC, "sl-1", "sltp")
    assert (st.state, len(st.deals)) == ("filled", 1)  # the closure is not a fill of our order
    closure = await env.client.status(MAGIC, "sl-1:sl", "sltp")
    assert closure.known and [(d.side.value, d.volume, d.entry, d.price) for d in closure.deals] == [("sell", 0.5, "out", 1.0789)]
    await wait_for(lambda: published(env), what="deals published")
    assert [d["entry"] for _, _, d in await stream_deals(env, "sl-1:sl")] == ["out"]


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
