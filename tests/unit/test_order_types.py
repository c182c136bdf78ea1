"""Order types: enable flags, MT5 type/action mapping, deviation, trade request fields."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from app.config import OrderDefaults
from app.models import ApprovedSignal, OrderType, Side
from app.mt5 import contract
from tables.order_state import create_order
from tables.order_types import (
    MAGIC,
    MT5Action,
    MT5Filling,
    MT5OrderType,
    check_enabled,
    comment_for,
    deviation_points,
    mt5_action,
    mt5_type,
    resolve_order_type,
    trade_request_fields,
)
from tables.symbols import DEFAULT_SYMBOLS, SymbolTable

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
OID = "O" + "a" * 30


def signal(**kw) -> ApprovedSignal:
    base = dict(signal_id="sig-1", symbol="EURUSD", signal_type=Side.BUY, entry_price=1.10000, position_size=0.25, account="acc-7")
    base.update(kw)
    return ApprovedSignal(**base)


# --------------------------------------------------------------------------------------
# MT5 numbers
# --------------------------------------------------------------------------------------


def test_mt5_numbers():
    assert [(m.name, m.value) for m in MT5OrderType] == [
        ("BUY", 0), ("SELL", 1), ("BUY_LIMIT", 2), ("SELL_LIMIT", 3),
        ("BUY_STOP", 4), ("SELL_STOP", 5), ("BUY_STOP_LIMIT", 6), ("SELL_STOP_LIMIT", 7),
    ]
    assert (MT5Action.DEAL, MT5Action.PENDING) == (1, 5)
    assert (MT5Filling.FOK, MT5Filling.IOC, MT5Filling.RETURN) == (0, 1, 2)
    assert MAGIC == 20_261_124


def test_mt5_numbers_agree_with_the_connector_contract():
    for m in MT5OrderType:
        assert contract.OrderType[m.name] == m.value
    for m in MT5Action:
        assert contract.TradeAction[m.name] == m.value
    for m in MT5Filling:
        assert contract.Filling[m.name] == m.value


@pytest.mark.parametrize(
    "side,order_type,expected,action",
    [
        (Side.BUY, OrderType.MARKET, 0, 1),
        (Side.SELL, OrderType.MARKET, 1, 1),
        (Side.BUY, OrderType.LIMIT, 2, 5),
        (Side.SELL, OrderType.LIMIT, 3, 5),
        (Side.BUY, OrderType.STOP, 4, 5),
        (Side.SELL, OrderType.STOP, 5, 5),
        (Side.BUY, OrderType.STOP_LIMIT, 6, 5),
        (Side.SELL, OrderType.STOP_LIMIT, 7, 5),
    ],
)
def test_side_and_type_mapping(side, order_type, expected, action):
    assert mt5_type(side, order_type) == expected
    assert isinstance(mt5_type(side, order_type), MT5OrderType)
    assert mt5_action(order_type) == action
    # string values work too (as they come off the wire)
    assert mt5_type(side.value, order_type.value) == expected


# --------------------------------------------------------------------------------------
# Resolution and enable flags
# --------------------------------------------------------------------------------------


def test_resolve_order_type():
    assert resolve_order_type(signal(), OrderDefaults()) is OrderType.MARKET
    assert resolve_order_type(signal(), OrderDefaults(default_order_type="limit")) is OrderType.LIMIT
    assert resolve_order_type(signal(order_type="stop"), OrderDefaults(default_order_type="limit")) is OrderType.STOP
    assert resolve_order_type(signal(), None) is OrderType.MARKET


@pytest.mark.parametrize(
    "limit_on,stop_on,disabled",
    [
        (True, True, set()),
        (False, True, {OrderType.LIMIT}),
        (True, False, {OrderType.STOP, OrderType.STOP_LIMIT}),
        (False, False, {OrderType.LIMIT, OrderType.STOP, OrderType.STOP_LIMIT}),
    ],
)
def test_enable_flags(limit_on, stop_on, disabled):
    d = OrderDefaults(enable_limit_orders=limit_on, enable_stop_orders=stop_on)
    for t in OrderType:
        reason = check_enabled(t, d)
        if t in disabled:
            assert reason and t.value in reason and "disabled" in reason
        else:
            assert reason is None


def test_enable_flag_names_the_setting():
    assert "enable_limit_orders" in check_enabled(OrderType.LIMIT, OrderDefaults(enable_limit_orders=False))
    assert "enable_stop_orders" in check_enabled(OrderType.STOP_LIMIT, OrderDefaults(enable_stop_orders=False))
    assert check_enabled(OrderType.MARKET, OrderDefaults(enable_limit_orders=False, enable_stop_orders=False)) is None


# --------------------------------------------------------------------------------------
# Deviation and comment
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "symbol,pips,points",
    [
        ("EURUSD", 3, 30),  # 5 digits: pip 0.0001 = 10 points of 0.00001
        ("EURUSD", 0, 0),
        ("EURUSD", 2.5, 25),
        ("USDJPY", 3, 30),  # 3 digits: pip 0.01 = 10 points of 0.001
        ("XAUUSD", 3, 30),  # 2 digits, pip 0.1 (stated) = 10 points of 0.01
        ("XAGUSD", 1.5, 15),
    ],
)
def test_deviation_points(symbol, pips, points):
    assert deviation_points(pips, DEFAULT_SYMBOLS[symbol]) == points


def test_deviation_points_four_digit_quote_and_gold_by_the_cent():
    table = SymbolTable({"EURUSD": {"digits": 4}, "XAUUSD": {"pip_size": 0.01}})
    assert deviation_points(3, table["EURUSD"]) == 3  # pip = point
    assert deviation_points(3, table["XAUUSD"]) == 3


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf")])
def test_deviation_points_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        deviation_points(bad, DEFAULT_SYMBOLS["EURUSD"])


def test_comment_for():
    assert comment_for(OID) == OID and len(OID) == 31
    with pytest.raises(ValueError):
        comment_for(OID + "b")
    with pytest.raises(ValueError):
        comment_for("")


# --------------------------------------------------------------------------------------
# Trade request fields
# --------------------------------------------------------------------------------------


def fields_for(order_type: OrderType, symbol: str = "EURUSD", pips: float = 3, magic: int = MAGIC, **kw):
    o = create_order(signal(symbol=symbol, **kw), OID, order_type, T0).order
    return trade_request_fields(o, DEFAULT_SYMBOLS[symbol], pips, magic)


def test_market_request():
    f = fields_for(OrderType.MARKET, stop_loss=1.0950, take_profit=1.1100)
    assert f == {
        "action": 1, "symbol": "EURUSD", "volume": 0.25, "type": 0, "price": 1.10000, "stoplimit": 0.0,
        "sl": 1.0950, "tp": 1.1100, "deviation": 30, "type_filling": 2, "magic": MAGIC, "comment": OID,
        "account": "acc-7", "type_time": 0, "expiration": None, "position": 0,
    }
    req = contract.TradeRequest(**f)
    assert req.type is contract.OrderType.BUY and req.action is contract.TradeAction.DEAL
    assert req.type_filling is contract.Filling.RETURN


def test_limit_request():
    f = fields_for(OrderType.LIMIT, signal_type=Side.SELL, limit_price=1.10200)
    assert (f["action"], f["type"], f["price"], f["stoplimit"]) == (5, 3, 1.10200, 0.0)
    assert (f["sl"], f["tp"]) == (0.0, 0.0)
    contract.TradeRequest(**f)


def test_stop_request():
    f = fields_for(OrderType.STOP, trigger_price=1.10300)
    assert (f["action"], f["type"], f["price"], f["stoplimit"]) == (5, 4, 1.10300, 0.0)


def test_stop_limit_request():
    f = fields_for(OrderType.STOP_LIMIT, signal_type=Side.SELL, trigger_price=1.09900, limit_price=1.09850)
    assert (f["action"], f["type"], f["price"], f["stoplimit"]) == (5, 7, 1.09900, 1.09850)
    req = contract.TradeRequest(**f)
    assert (req.price, req.stoplimit) == (1.09900, 1.09850)


def test_prices_rounded_to_digits_and_magic_overridable():
    f = fields_for(OrderType.MARKET, symbol="USDJPY", entry_price=151.123456, stop_loss=150.00049, magic=42)
    assert (f["price"], f["sl"], f["magic"], f["deviation"]) == (151.123, 150.0, 42, 30)
    g = fields_for(OrderType.LIMIT, symbol="XAUUSD", entry_price=2300.0, limit_price=2299.456, pips=5)
    assert (g["price"], g["deviation"]) == (2299.46, 50)


def test_fields_are_plain_json_values():
    import orjson

    f = fields_for(OrderType.STOP_LIMIT, trigger_price=1.10100, limit_price=1.10150)
    assert all(type(f[k]) is int for k in ("action", "type", "type_filling", "deviation", "magic"))
    assert orjson.loads(orjson.dumps(f)) == f


def test_spec_of_another_symbol_is_refused():
    o = create_order(signal(), OID, OrderType.MARKET, T0).order
    with pytest.raises(ValueError):
        trade_request_fields(o, DEFAULT_SYMBOLS["USDJPY"], 3, MAGIC)


def test_long_order_id_is_refused():
    o = create_order(signal(), OID + "x", OrderType.MARKET, T0).order
    with pytest.raises(ValueError):
        trade_request_fields(o, DEFAULT_SYMBOLS["EURUSD"], 3, MAGIC)
