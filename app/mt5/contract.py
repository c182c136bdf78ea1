"""The MT5 connector contract: NATS subjects, payload models, retcodes, and a client.

The connector (a real MT5 gateway, or :mod:`app.mt5.simulator`) answers four request/reply
subjects and publishes every deal to JetStream.  ``CONTRACT.md`` beside this module is the
written contract; this module is its executable form.

MT5 has no client-order-id field: an order is correlated by ``magic`` plus ``comment``,
where ``comment`` carries our client order id (at most 31 characters).  The connector
dedupes submissions on ``(account, magic, comment)``: a resend of an order the broker
already accepted is not executed again, it returns the first result.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum, IntEnum
from typing import Literal

import nats.errors
from pydantic import Field

from app.models import DecodeError, Fill, Model, from_json, to_json, utcnow

# --------------------------------------------------------------------------------------
# Subjects
# --------------------------------------------------------------------------------------

#: Request/reply: a :class:`TradeRequest` -> a :class:`TradeResult`.
SUBMIT = "mt5.orders.submit"
#: Request/reply: a :class:`CancelRequest` -> a :class:`TradeResult`.
CANCEL = "mt5.orders.cancel"
#: Request/reply: a :class:`ModifyRequest` -> a :class:`TradeResult`.
MODIFY = "mt5.orders.modify"
#: Request/reply: a :class:`StatusQuery` -> an :class:`OrderStatus`.
STATUS = "mt5.orders.status"
#: Request/reply: a :class:`PositionsQuery` -> a :class:`PositionsSnapshot`.
POSITIONS = "mt5.positions.snapshot"
#: Deal events (:class:`DealEvent`), one subject per symbol, stored in :data:`FILLS_STREAM`.
FILLS = "mt5.fills.{symbol}"
#: The JetStream stream holding the deal events, and its subjects.
FILLS_STREAM = "MT5_FILLS"
FILLS_SUBJECTS = "mt5.fills.>"
#: Simulator only: control commands and statistics (request/reply, JSON objects).
CONTROL = "mt5.sim.control"
STATS = "mt5.sim.stats"
#: Queue group of the connector's subscriptions.
QUEUE = "mt5-connector"
#: Length limit of an MT5 order comment: our client order id must fit.
MAX_COMMENT = 31


def fills_subject(symbol: str) -> str:
    return FILLS.format(symbol=symbol)


def deal_msg_id(deal: int) -> str:
    """The ``Nats-Msg-Id`` of a deal event: JetStream drops a re-publication of the deal."""
    return f"deal-{deal}"


# --------------------------------------------------------------------------------------
# MT5 enumerations (numbers as in MQL5 / the MetaTrader5 Python package)
# --------------------------------------------------------------------------------------


class Retcode(IntEnum):
    """``TRADE_RETCODE_*``: the trade server's return codes."""

    REQUOTE = 10004
    REJECT = 10006
    CANCEL = 10007
    PLACED = 10008
    DONE = 10009
    DONE_PARTIAL = 10010
    ERROR = 10011
    TIMEOUT = 10012
    INVALID = 10013
    INVALID_VOLUME = 10014
    INVALID_PRICE = 10015
    INVALID_STOPS = 10016
    TRADE_DISABLED = 10017
    MARKET_CLOSED = 10018
    NO_MONEY = 10019
    PRICE_CHANGED = 10020
    PRICE_OFF = 10021
    INVALID_EXPIRATION = 10022
    ORDER_CHANGED = 10023
    TOO_MANY_REQUESTS = 10024
    NO_CHANGES = 10025
    SERVER_DISABLES_AT = 10026
    CLIENT_DISABLES_AT = 10027
    LOCKED = 10028
    FROZEN = 10029
    INVALID_FILL = 10030
    CONNECTION = 10031
    ONLY_REAL = 10032
    LIMIT_ORDERS = 10033
    LIMIT_VOLUME = 10034
    INVALID_ORDER = 10035
    POSITION_CLOSED = 10036
    # 10037 is not assigned by MetaQuotes.
    INVALID_CLOSE_VOLUME = 10038
    CLOSE_ORDER_EXIST = 10039
    LIMIT_POSITIONS = 10040
    REJECT_CANCEL = 10041
    LONG_ONLY = 10042
    SHORT_ONLY = 10043
    CLOSE_ONLY = 10044
    FIFO_CLOSE = 10045
    HEDGE_PROHIBITED = 10046


class Outcome(str, Enum):
    """What a retcode means for the client."""

    #: The broker accepted the order (placed, done, partially done).
    SUCCESS = "success"
    #: The price moved: re-price from the result's bid/ask and resend (same comment).
    REPRICE = "reprice"
    #: The order may or may not exist at the broker: query status before any resend.
    UNKNOWN = "unknown"
    #: Final rejection: do not resend.
    REJECT = "reject"


_SUCCESS = frozenset({Retcode.PLACED, Retcode.DONE, Retcode.DONE_PARTIAL})
_REPRICE = frozenset({Retcode.REQUOTE, Retcode.PRICE_CHANGED, Retcode.PRICE_OFF})
_UNKNOWN = frozenset({Retcode.ERROR, Retcode.TIMEOUT, Retcode.CONNECTION})


def classify(retcode: int) -> Outcome:
    """SUCCESS 10008-10010; REPRICE 10004/10020/10021; UNKNOWN 10011/10012/10031; every other
    code of 10006-10046 is a final REJECT.  A number outside the MT5 range (0, garbage) is
    UNKNOWN: nothing says the order did not reach the broker, so ask before resending."""
    try:
        code = int(retcode)
    except (TypeError, ValueError):
        return Outcome.UNKNOWN
    if code in _SUCCESS:
        return Outcome.SUCCESS
    if code in _REPRICE:
        return Outcome.REPRICE
    if code in _UNKNOWN:
        return Outcome.UNKNOWN
    if Retcode.REJECT <= code <= Retcode.HEDGE_PROHIBITED:
        return Outcome.REJECT
    return Outcome.UNKNOWN


class TradeAction(IntEnum):
    """``TRADE_ACTION_*``."""

    DEAL = 1
    PENDING = 5
    SLTP = 6
    MODIFY = 7
    REMOVE = 8
    CLOSE_BY = 10


class OrderType(IntEnum):
    """``ORDER_TYPE_*``."""

    BUY = 0
    SELL = 1
    BUY_LIMIT = 2
    SELL_LIMIT = 3
    BUY_STOP = 4
    SELL_STOP = 5
    BUY_STOP_LIMIT = 6
    SELL_STOP_LIMIT = 7
    CLOSE_BY = 8

    @property
    def is_buy(self) -> bool:
        return self in (OrderType.BUY, OrderType.BUY_LIMIT, OrderType.BUY_STOP, OrderType.BUY_STOP_LIMIT)

    @property
    def is_market(self) -> bool:
        return self in (OrderType.BUY, OrderType.SELL)

    @property
    def side(self) -> str:
        return "buy" if self.is_buy else "sell"


class Filling(IntEnum):
    """``ORDER_FILLING_*``."""

    FOK = 0
    IOC = 1
    RETURN = 2
    BOC = 3


class OrderTime(IntEnum):
    """``ORDER_TIME_*``."""

    GTC = 0
    DAY = 1
    SPECIFIED = 2
    SPECIFIED_DAY = 3


# The MetaTrader5 package's flat names, for code written against it.
TRADE_ACTION_DEAL, TRADE_ACTION_PENDING, TRADE_ACTION_REMOVE = TradeAction.DEAL, TradeAction.PENDING, TradeAction.REMOVE
ORDER_TYPE_BUY, ORDER_TYPE_SELL = OrderType.BUY, OrderType.SELL
ORDER_TYPE_BUY_LIMIT, ORDER_TYPE_SELL_LIMIT = OrderType.BUY_LIMIT, OrderType.SELL_LIMIT
ORDER_TYPE_BUY_STOP, ORDER_TYPE_SELL_STOP = OrderType.BUY_STOP, OrderType.SELL_STOP
ORDER_TYPE_BUY_STOP_LIMIT, ORDER_TYPE_SELL_STOP_LIMIT = OrderType.BUY_STOP_LIMIT, OrderType.SELL_STOP_LIMIT
ORDER_FILLING_FOK, ORDER_FILLING_IOC, ORDER_FILLING_RETURN = Filling.FOK, Filling.IOC, Filling.RETURN
ORDER_TIME_GTC, ORDER_TIME_SPECIFIED = OrderTime.GTC, OrderTime.SPECIFIED

#: ``OrderStatus.state`` values.
BrokerOrderState = Literal["placed", "partially_filled", "filled", "cancelled", "rejected", "expired"]
FINAL_BROKER_STATES = frozenset({"filled", "cancelled", "rejected", "expired"})


# --------------------------------------------------------------------------------------
# Payloads
# --------------------------------------------------------------------------------------


class TradeRequest(Model):
    """An ``MqlTradeRequest`` plus the account it is routed to.  ``comment`` is our client
    order id: mandatory here (it is the correlation and dedupe key) and at most 31 chars.

    Volume and prices are not range-checked by the model: checking them is the broker's job
    and it answers with a retcode (10014, 10015, 10016)."""

    action: TradeAction = TradeAction.DEAL
    symbol: str = Field(min_length=1, max_length=32)
    volume: float  # lots
    type: OrderType
    price: float = 0.0  # market: the expected price (0: none); pending: the order price (trigger for stop-limit)
    stoplimit: float = 0.0  # stop-limit: the limit price of the order placed on trigger
    sl: float = 0.0
    tp: float = 0.0
    deviation: int = Field(0, ge=0)  # points
    type_filling: Filling = Filling.RETURN
    type_time: OrderTime = OrderTime.GTC
    expiration: datetime | None = None  # with type_time SPECIFIED
    #: A close: the ticket of the position this deal reduces (MqlTradeRequest.position).  The
    #: order must be on the other side of the position and at most its volume (10038); a
    #: position already closed answers 10036.  0: an ordinary order.
    position: int = Field(0, ge=0)
    magic: int = Field(0, ge=0)
    comment: str = Field(min_length=1, max_length=MAX_COMMENT)
    account: str = Field("default", min_length=1, max_length=64)


class TradeResult(Model):
    """An ``MqlTradeResult`` plus the echo of the client order id."""

    retcode: int
    order: int = 0  # broker order ticket, 0 if none
    deal: int = 0  # deal ticket of the fill made now, 0 if none
    volume: float = 0.0  # lots filled now (0 for a placed pending order)
    price: float = 0.0  # price of the deal made now
    bid: float = 0.0
    ask: float = 0.0
    comment: str = ""  # the broker's message text
    request_id: int = 0
    request_comment: str = ""  # echo of TradeRequest.comment (the client order id)

    @property
    def outcome(self) -> Outcome:
        return classify(self.retcode)


class CancelRequest(Model):
    """Remove a pending order (``TRADE_ACTION_REMOVE``), found by magic + comment."""

    magic: int = Field(0, ge=0)
    comment: str = Field(min_length=1, max_length=MAX_COMMENT)
    account: str = Field("default", min_length=1, max_length=64)


class StatusQuery(Model):
    """Look an order up by magic + comment: open orders, then history orders and deals."""

    magic: int = Field(0, ge=0)
    comment: str = Field(min_length=1, max_length=MAX_COMMENT)
    account: str = Field("default", min_length=1, max_length=64)


#: A deal event on ``mt5.fills.{symbol}`` is an :class:`app.models.Fill`: one model, one name.
DealEvent = Fill


class ModifyRequest(Model):
    """Change a working order, found by magic + comment (``TRADE_ACTION_MODIFY``): its price,
    stop-limit price, SL, TP or expiration; or, once the order has filled, the SL/TP of the
    position it opened (``TRADE_ACTION_SLTP``).  With ``position`` set, the SL/TP of that
    position, whatever the comment.  A field left None keeps its value; 0 removes an SL/TP.

    Answers: 10009 DONE; 10025 NO_CHANGES; 10015 / 10016 for a price or stops on the wrong
    side of the market; 10013 for an unknown order; 10036 when the position is closed;
    10035 for a price change of a filled order (only SL/TP can change then)."""

    magic: int = Field(0, ge=0)
    comment: str = Field(min_length=1, max_length=MAX_COMMENT)
    account: str = Field("default", min_length=1, max_length=64)
    position: int = Field(0, ge=0)
    price: float | None = None
    stoplimit: float | None = None
    sl: float | None = None
    tp: float | None = None
    expiration: datetime | None = None


class OrderStatus(Model):
    """The broker's view of an order.  ``known=False``: the broker has no such order."""

    known: bool
    ticket: int = 0
    state: BrokerOrderState | None = None
    symbol: str | None = None
    type: int | None = None
    volume_initial: float = 0.0
    volume_filled: float = 0.0
    price_avg: float | None = None  # volume-weighted price of the deals
    retcode: int = 0  # of the original submission
    deals: list[DealEvent] = Field(default_factory=list)
    magic: int = 0
    comment: str = ""
    account: str = "default"


class PositionsQuery(Model):
    account: str | None = None  # None: every account
    magic: int | None = None  # None: every magic number


class BrokerPositionModel(Model):
    """One net position (:data:`tables.reconcile.BrokerPosition` as a model)."""

    account: str
    symbol: str
    net_volume: float  # lots, + long / - short
    avg_price: float | None = None
    magic: int = 0  # positions are netted per (account, symbol, magic)
    ticket: int = 0  # the position's ticket (the ticket of the order that opened it)
    sl: float = 0.0
    tp: float = 0.0
    #: Tickets of the deals that made the position since it opened (newest last, at most
    #: the last 1,000): a reconciliation correction carries them, so a deal still on its
    #: way to us is recognised as already counted.
    deals: list[int] = Field(default_factory=list)

    def as_tuple(self) -> tuple[str, str, float, float | None]:
        return (self.account, self.symbol, self.net_volume, self.avg_price)


class PositionsSnapshot(Model):
    positions: list[BrokerPositionModel] = Field(default_factory=list)
    at: datetime = Field(default_factory=utcnow)


class ErrorReply(Model):
    """What the connector answers to a query it cannot parse."""

    error: str


# --------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------


class NoReply(Exception):
    """No answer: the request timed out, nobody listens, or the connection failed.
    The outcome of a submission is then unknown: query its status before any resend."""


class BadReply(NoReply):
    """An answer that is not the contract's payload (treated like no answer)."""


class MT5Client:
    """Request/reply client of the connector over a connected ``nats.aio.client.Client``."""

    def __init__(self, nc, timeout: float = 2.0) -> None:
        self.nc = nc
        self.timeout = timeout

    async def _request(self, subject: str, payload: bytes, model: type[Model]) -> Model:
        try:
            msg = await self.nc.request(subject, payload, timeout=self.timeout)
        except (TimeoutError, nats.errors.Error) as exc:
            raise NoReply(f"{subject}: {type(exc).__name__}: {exc}") from exc
        try:
            return from_json(model, msg.data)
        except DecodeError as exc:
            try:
                error = from_json(ErrorReply, msg.data).error
            except DecodeError:
                error = exc.reason
            raise BadReply(f"{subject}: {error}") from None

    async def submit(self, req: TradeRequest) -> TradeResult:
        return await self._request(SUBMIT, to_json(req), TradeResult)  # type: ignore[return-value]

    async def cancel(self, magic: int, comment: str, account: str = "default") -> TradeResult:
        req = CancelRequest(magic=magic, comment=comment, account=account)
        return await self._request(CANCEL, to_json(req), TradeResult)  # type: ignore[return-value]

    async def modify(self, req: ModifyRequest) -> TradeResult:
        return await self._request(MODIFY, to_json(req), TradeResult)  # type: ignore[return-value]

    async def status(self, magic: int, comment: str, account: str = "default") -> OrderStatus:
        q = StatusQuery(magic=magic, comment=comment, account=account)
        return await self._request(STATUS, to_json(q), OrderStatus)  # type: ignore[return-value]

    async def positions(self, account: str | None = None, magic: int | None = None) -> PositionsSnapshot:
        q = PositionsQuery(account=account, magic=magic)
        return await self._request(POSITIONS, to_json(q), PositionsSnapshot)  # type: ignore[return-value]
