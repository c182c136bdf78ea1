"""The MT5 connector contract: retcode classes, payload models, the client's error mapping."""

from __future__ import annotations

from types import SimpleNamespace

import nats.errors
import orjson
import pytest
from pydantic import ValidationError

from app.models import Fill, from_json, to_json, utcnow
from app.mt5 import contract as c
from app.mt5.contract import (
    BadReply,
    DealEvent,
    MT5Client,
    NoReply,
    OrderStatus,
    OrderType,
    Outcome,
    PositionsSnapshot,
    Retcode,
    TradeRequest,
    TradeResult,
    classify,
)

S, P, U, R = Outcome.SUCCESS, Outcome.REPRICE, Outcome.UNKNOWN, Outcome.REJECT

#: Every retcode MetaQuotes defines (TRADE_RETCODE_*), with its class.
TABLE = {
    10004: P, 10006: R, 10007: R, 10008: S, 10009: S, 10010: S, 10011: U, 10012: U, 10013: R,
    10014: R, 10015: R, 10016: R, 10017: R, 10018: R, 10019: R, 10020: P, 10021: P, 10022: R,
    10023: R, 10024: R, 10025: R, 10026: R, 10027: R, 10028: R, 10029: R, 10030: R, 10031: U,
    10032: R, 10033: R, 10034: R, 10035: R, 10036: R, 10038: R, 10039: R, 10040: R, 10041: R,
    10042: R, 10043: R, 10044: R, 10045: R, 10046: R,
}


@pytest.mark.parametrize("code, outcome", sorted(TABLE.items()))
def test_classify_every_mt5_retcode(code, outcome):
    assert classify(code) is outcome
    assert classify(Retcode(code)) is outcome


def test_retcode_enum_is_exactly_the_mt5_list():
    assert {int(r) for r in Retcode} == set(TABLE)
    assert Retcode.DONE == 10009 and Retcode.CONNECTION == 10031 and Retcode.HEDGE_PROHIBITED == 10046
    assert 10037 not in {int(r) for r in Retcode}


@pytest.mark.parametrize("code", [0, -1, 1, 10000, 10003, 10005, 10047, 99999, "garbage", None])
def test_numbers_outside_mt5_are_unknown_outcomes(code):
    assert classify(code) is U


def test_mt5_numbers():
    assert [int(t) for t in OrderType][:8] == list(range(8))
    assert (c.TradeAction.DEAL, c.TradeAction.PENDING, c.TradeAction.REMOVE) == (1, 5, 8)
    assert (c.Filling.FOK, c.Filling.IOC, c.Filling.RETURN) == (0, 1, 2)
    assert OrderType.BUY_STOP_LIMIT.is_buy and not OrderType.SELL_LIMIT.is_buy
    assert OrderType.SELL.is_market and not OrderType.BUY_LIMIT.is_market


def test_subjects():
    assert c.SUBMIT == "mt5.orders.submit" and c.CANCEL == "mt5.orders.cancel"
    assert c.STATUS == "mt5.orders.status" and c.POSITIONS == "mt5.positions.snapshot"
    assert c.MODIFY == "mt5.orders.modify"
    assert c.fills_subject("EURUSD") == "mt5.fills.EURUSD"
    assert (c.FILLS_STREAM, c.FILLS_SUBJECTS) == ("MT5_FILLS", "mt5.fills.>")
    assert (c.CONTROL, c.STATS) == ("mt5.sim.control", "mt5.sim.stats")
    assert c.deal_msg_id(42) == "deal-42"


def test_trade_request_round_trip_and_limits():
    req = TradeRequest(action=5, symbol="EURUSD", volume=0.1, type=2, price=1.08, magic=7, comment="o-1", account="a")
    assert req.type is OrderType.BUY_LIMIT and req.action is c.TradeAction.PENDING
    raw = orjson.loads(to_json(req))
    assert raw["type"] == 2 and raw["action"] == 5 and raw["type_filling"] == 2
    assert from_json(TradeRequest, to_json(req)) == req
    assert TradeRequest(symbol="EURUSD", volume=0.1, type=0, comment="x").account == "default"
    with pytest.raises(ValidationError):
        TradeRequest(symbol="EURUSD", volume=0.1, type=0, comment="x" * 32)  # MT5 comment limit
    with pytest.raises(ValidationError):
        TradeRequest(symbol="EURUSD", volume=0.1, type=0, comment="")  # the client order id is mandatory
    with pytest.raises(ValidationError):
        TradeRequest(symbol="EURUSD", volume=0.1, type=9, comment="x")
    # Volume and price are the broker's to check (it answers with a retcode).
    assert TradeRequest(symbol="EURUSD", volume=0, type=0, comment="x").volume == 0
    # A close names its position; 0 is an ordinary order.
    assert TradeRequest(symbol="EURUSD", volume=0.1, type=1, comment="x").position == 0
    assert TradeRequest(symbol="EURUSD", volume=0.1, type=1, comment="x", position=42).position == 42
    with pytest.raises(ValidationError):
        c.ModifyRequest(comment="x" * 32)


def test_deal_event_is_a_fill_with_extras():
    ev = DealEvent(order_id="o-1", deal=5, ticket=4, symbol="EURUSD", side="sell", price=1.08117, volume=5.0,
                   time=utcnow(), account="acc-1", magic=7, entry="out")
    fill = from_json(Fill, to_json(ev))
    assert (fill.order_id, fill.deal, fill.ticket, fill.side.value, fill.volume) == ("o-1", 5, 4, "sell", 5.0)
    raw = orjson.loads(to_json(ev))
    assert raw["entry"] == "out" and raw["account"] == "acc-1" and raw["time"].endswith("Z")
    with pytest.raises(ValidationError):
        DealEvent(order_id="o", deal=1, symbol="EURUSD", side="buy", price=1.0, volume=1.0, time=utcnow(), entry="sideways")
    assert DealEvent is Fill
    # An exit the broker made: the opening order's comment, the position's ticket, the profit.
    exit_ = from_json(Fill, to_json(DealEvent(
        order_id="o-1", deal=9, ticket=8, symbol="USDJPY", side="buy", price=156.0, volume=1.0, time=utcnow(),
        account="acc-1", magic=7, entry="out", reason="tp", position=4, profit=641.03)))
    assert (exit_.reason, exit_.position, exit_.profit, exit_.currency, exit_.is_exit) == ("tp", 4, 641.03, "USD", True)
    for reason in ("expert", "client", "sl", "tp", "stop_out"):
        assert DealEvent(order_id="", deal=1, symbol="EURUSD", side="buy", price=1.0, volume=1.0, time=utcnow(),
                         reason=reason).routing_key == "deal-1"
    with pytest.raises(ValidationError):
        DealEvent(order_id="o", deal=1, symbol="EURUSD", side="buy", price=1.0, volume=1.0, time=utcnow(), reason="margin")


def test_status_and_snapshot_models():
    st = OrderStatus(known=False)
    assert st.state is None and st.deals == []
    with pytest.raises(ValidationError):
        OrderStatus(known=True, state="half_done")
    snap = from_json(PositionsSnapshot, b'{"positions": [{"account": "a", "symbol": "EURUSD", "net_volume": -1.5, "avg_price": 1.08}]}')
    assert snap.positions[0].as_tuple() == ("a", "EURUSD", -1.5, 1.08)
    assert (snap.positions[0].magic, snap.positions[0].ticket, snap.positions[0].sl) == (0, 0, 0.0)
    assert TradeResult(retcode=10010).outcome is S


class FakeNC:
    def __init__(self, answer):
        self.answer = answer
        self.sent: list[tuple[str, bytes, float]] = []

    async def request(self, subject, payload, timeout):
        self.sent.append((subject, payload, timeout))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return SimpleNamespace(data=self.answer)


@pytest.mark.parametrize(
    "exc",
    [nats.errors.TimeoutError(), nats.errors.NoRespondersError(), nats.errors.ConnectionClosedError(), TimeoutError()],
)
async def test_client_raises_no_reply(exc):
    client = MT5Client(FakeNC(exc), timeout=0.3)
    with pytest.raises(NoReply):
        await client.submit(TradeRequest(symbol="EURUSD", volume=0.1, type=0, comment="o-1"))
    with pytest.raises(NoReply):
        await client.status(7, "o-1", "a")


async def test_client_bad_reply_is_a_no_reply():
    with pytest.raises(BadReply):
        await MT5Client(FakeNC(b"not json")).positions()
    with pytest.raises(BadReply, match="boom"):
        await MT5Client(FakeNC(b'{"error": "boom"}')).status(1, "x")
    assert issubclass(BadReply, NoReply)


async def test_client_sends_the_contract_payloads():
    nc = FakeNC(b'{"retcode": 10009, "order": 3, "deal": 4, "volume": 0.1, "price": 1.1, "request_comment": "o-1"}')
    client = MT5Client(nc, timeout=0.7)
    result = await client.cancel(7, "o-1", "acc")
    assert result.retcode == 10009 and result.order == 3
    subject, payload, timeout = nc.sent[0]
    assert subject == c.CANCEL and timeout == 0.7
    assert orjson.loads(payload) == {"magic": 7, "comment": "o-1", "account": "acc"}
    nc.answer = b'{"positions": [], "at": "2024-01-01T00:00:00Z"}'
    await client.positions(None)
    assert nc.sent[-1][0] == c.POSITIONS and orjson.loads(nc.sent[-1][1]) == {"account": None, "magic": None}
    await client.positions("acc", magic=7)
    assert orjson.loads(nc.sent[-1][1]) == {"account": "acc", "magic": 7}
    nc.answer = b'{"retcode": 10025, "order": 3, "request_comment": "o-1"}'
    result = await client.modify(c.ModifyRequest(magic=7, comment="o-1", account="acc", sl=1.07))
    assert result.retcode == Retcode.NO_CHANGES
    subject, payload, _ = nc.sent[-1]
    assert subject == c.MODIFY == "mt5.orders.modify"
    assert orjson.loads(payload) == {"magic": 7, "comment": "o-1", "account": "acc", "position": 0, "price": None,
                                     "stoplimit": None, "sl": 1.07, "tp": None, "expiration": None}
