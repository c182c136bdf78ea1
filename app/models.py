"""Pydantic v2 models of everything that crosses a topic, a table or a subject.

Serialised with orjson (:func:`to_json` / :func:`from_json`).  Names match the topics, the
tables and the ClickHouse columns: one name for one thing.

Sign convention, everywhere: slippage is in pips and **positive = adverse** (worse for us):
a buy filled above, or a sell filled below, its expected price.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SYMBOL_RE = re.compile(r"^[A-Z]{6}$")
#: Upper bound for any price: catches absurd values (a mistyped exponent) at the edge.
MAX_PRICE = 1_000_000.0
#: Upper bound for a single order, in lots.
MAX_LOTS = 1_000.0


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Side(str, Enum):
    BUY = "buy"
    SELL = "sell"

    @property
    def sign(self) -> int:
        """+1 for buy, -1 for sell: net volume and slippage direction."""
        return 1 if self is Side.BUY else -1


class OrderType(str, Enum):
    MARKET = "market"
    LIMIT = "limit"
    STOP = "stop"
    STOP_LIMIT = "stop_limit"


class TimeInForce(str, Enum):
    """How long a pending order works: until cancelled, until the end of the trading day
    (UTC), or until the signal's ``expires_at``."""

    GTC = "GTC"
    DAY = "DAY"
    GTD = "GTD"


class OrderIntent(str, Enum):
    """Why an order exists: to trade a signal, or to close (part of) a position."""

    OPEN = "open"
    CLOSE = "close"


class OrderState(str, Enum):
    PENDING = "PENDING"
    SUBMITTED = "SUBMITTED"
    PARTIALLY_FILLED = "PARTIALLY_FILLED"
    FILLED = "FILLED"
    CANCELLED = "CANCELLED"
    REJECTED = "REJECTED"
    FAILED = "FAILED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({OrderState.FILLED, OrderState.CANCELLED, OrderState.REJECTED, OrderState.FAILED})


class Model(BaseModel):
    """Base: strict about unknown numbers (no NaN/inf), frozen unless a model opts out."""

    model_config = ConfigDict(allow_inf_nan=False, extra="ignore", frozen=True, use_enum_values=False)


def _price(v: float | None, name: str) -> float | None:
    if v is None:
        return None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite positive price")
    if v >= MAX_PRICE:
        raise ValueError(f"{name} {v} is not a plausible price")
    return v


class ApprovedSignal(Model):
    """A risk-approved trading signal, as published on NATS ``signals.approved.{symbol}``."""

    signal_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")
    symbol: str
    signal_type: Side
    entry_price: float
    stop_loss: float | None = None
    take_profit: float | None = None
    position_size: float = Field(gt=0, le=MAX_LOTS, description="lots")
    order_type: OrderType | None = None  # None: the operational default_order_type
    trigger_price: float | None = None  # stop and stop-limit: where the order triggers
    limit_price: float | None = None  # limit and stop-limit: worst acceptable price
    account: str = Field("default", min_length=1, max_length=64)
    strategy: str | None = Field(None, max_length=64)
    approved_at: datetime | None = None
    time_in_force: TimeInForce | None = None  # pending orders; None: the configured default
    expires_at: datetime | None = None  # with GTD

    @field_validator("approved_at", "expires_at")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        return v if v is None or v.tzinfo is not None else v.replace(tzinfo=timezone.utc)

    @field_validator("symbol")
    @classmethod
    def _symbol(cls, v: str) -> str:
        if not SYMBOL_RE.match(v):
            raise ValueError("symbol must be six upper-case letters, e.g. EURUSD")
        return v

    @field_validator("entry_price", "stop_loss", "take_profit", "trigger_price", "limit_price")
    @classmethod
    def _prices(cls, v: float | None, info: Any) -> float | None:
        return _price(v, info.field_name)

    @field_validator("stop_loss")
    @classmethod
    def _stop_loss_side(cls, v: float | None, info: Any) -> float | None:
        # Fields validate in order: signal_type and entry_price are already in info.data.
        side, entry = info.data.get("signal_type"), info.data.get("entry_price")
        if v is not None and side is not None and entry is not None and (entry - v) * side.sign <= 0:
            where = "below" if side is Side.BUY else "above"
            raise ValueError(f"must be {where} entry_price {entry} for a {side.value}")
        return v

    @field_validator("take_profit")
    @classmethod
    def _take_profit_side(cls, v: float | None, info: Any) -> float | None:
        side, entry = info.data.get("signal_type"), info.data.get("entry_price")
        if v is not None and side is not None and entry is not None and (v - entry) * side.sign <= 0:
            where = "above" if side is Side.BUY else "below"
            raise ValueError(f"must be {where} entry_price {entry} for a {side.value}")
        return v

    @model_validator(mode="after")
    def _stop_limit(self) -> "ApprovedSignal":
        if self.order_type is OrderType.STOP_LIMIT and (self.trigger_price is None or self.limit_price is None):
            raise ValueError("a stop_limit order needs trigger_price and limit_price")
        if self.time_in_force is TimeInForce.GTD and self.expires_at is None:
            raise ValueError("expires_at: a GTD order needs expires_at")
        if self.expires_at is not None and self.time_in_force not in (TimeInForce.GTD, None):
            raise ValueError(f"expires_at: only a GTD order takes expires_at, not {self.time_in_force.value}")
        return self


#: ``Fill.entry``: the deal opened or added to a position (in), reduced or closed it (out),
#: or reversed it (inout).
DealEntry = Literal["in", "out", "inout"]
#: ``Fill.reason`` (MT5 ``DEAL_REASON_*``): ``expert`` a deal of an order sent through the
#: connector (ours, or another program's), ``client`` an order placed at a terminal by hand
#: (desktop, mobile, web), ``sl`` / ``tp`` the position's stop-loss / take-profit triggered,
#: ``stop_out`` the broker closed the position for want of margin.
DealReason = Literal["expert", "client", "sl", "tp", "stop_out"]
#: Deal reasons of exits the broker or a person made: the deal belongs to no order of ours,
#: it reduces the position that ``Fill.position`` names.
EXIT_REASONS = frozenset({"client", "sl", "tp", "stop_out"})


class Fill(Model):
    """A broker deal, as the connector publishes it on ``mt5.fills.{symbol}`` and the bridge
    forwards it to the ``fills`` topic (key ``order_id``).

    ``order_id`` is the client order id (MT5 comment) of the order the deal belongs to; for
    an exit the broker made (SL, TP, stop-out) or a close at the terminal, it is the client
    order id of the order that **opened the position** (``position`` is that order's ticket),
    so the exit is routed to the partition of the order it closes.  A deal of another magic
    number (a manual trade, another robot) carries whatever comment it had, possibly none.
    """

    order_id: str = Field("", max_length=64)  # client order id (MT5 comment); "" only on foreign deals
    deal: int = Field(gt=0)  # broker deal ticket: unique per deal, the dedupe key everywhere
    ticket: int | None = Field(None, gt=0)  # broker order ticket of the deal's order
    symbol: str
    side: Side
    price: float
    volume: float = Field(gt=0, le=MAX_LOTS)
    time: datetime
    account: str = Field("default", min_length=1, max_length=64)
    magic: int = Field(0, ge=0)
    entry: DealEntry = "in"
    reason: DealReason = "expert"
    position: int | None = Field(None, gt=0)  # MT5 DEAL_POSITION_ID: the position's ticket
    profit: float = 0.0  # the deal's profit in ``currency`` (0 for an entry in)
    currency: str = Field("USD", min_length=3, max_length=3)  # the account's deposit currency

    @field_validator("symbol")
    @classmethod
    def _symbol(cls, v: str) -> str:
        return ApprovedSignal._symbol(v)

    @field_validator("price")
    @classmethod
    def _p(cls, v: float) -> float:
        return _price(v, "price")  # type: ignore[return-value]

    @property
    def is_exit(self) -> bool:
        """An exit made by the broker or by hand: reduces a position, fills no order of ours."""
        return self.reason in EXIT_REASONS

    @property
    def routing_key(self) -> str:
        """The ``fills`` topic key: the order id, or ``deal-{deal}`` for a deal without one."""
        return self.order_id or f"deal-{self.deal}"


# --------------------------------------------------------------------------------------
# Deterministic identifiers
# --------------------------------------------------------------------------------------


def digest(*parts: str, size: int = 10) -> str:
    """A short stable hex digest of the parts (blake2b)."""
    h = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=size)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# orjson helpers and decode errors
# --------------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def to_json(model: BaseModel) -> bytes:
    return orjson.dumps(model.model_dump(mode="python"), option=orjson.OPT_UTC_Z)


def to_dict(model: BaseModel) -> dict[str, Any]:
    return orjson.loads(to_json(model))


class DecodeError(ValueError):
    """A payload that is not a valid model: ``reason`` names the bad field(s)."""

    def __init__(self, reason: str, fields: list[str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fields = fields or []


def describe_validation_error(exc: ValidationError) -> tuple[str, list[str]]:
    parts: list[str] = []
    fields: list[str] = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err.get("loc", ())) or "<payload>"
        fields.append(loc)
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts), fields


def from_json(model: type[M], raw: bytes | str) -> M:
    """Parse and validate, raising :class:`DecodeError` with a reason that names the field."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson is strict JSON.  The stdlib parser also takes NaN/Infinity literals; if it
        # can read the payload, validation below names the non-finite field (error path only).
        try:
            data = json.loads(raw)
        except (ValueError, TypeError):
            raise DecodeError(f"malformed JSON: {exc}", ["<payload>"]) from None
    if not isinstance(data, dict):
        raise DecodeError(f"expected a JSON object, got {type(data).__name__}", ["<payload>"])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        reason, fields = describe_validation_error(exc)
        raise DecodeError(reason, fields) from None


# --------------------------------------------------------------------------------------
# Orders and their lifecycle events
# --------------------------------------------------------------------------------------


class EventType(str, Enum):
    """What happened to an order.  The first seven drive the state machine."""

    CREATED = "created"
    SUBMITTED = "submitted"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    FAILED = "failed"
    #: An event the state machine refused: recorded, never applied.
    TRANSITION_REFUSED = "transition_refused"
    #: Informational records in the audit trail (no state change).
    DUPLICATE_SIGNAL = "duplicate_signal"
    SLIPPAGE_ALERT = "slippage_alert"
    POSITION_CORRECTED = "position_corrected"
    #: A command (cancel, modify, close, expire) accepted, refused, or delivered again.
    COMMAND_ACCEPTED = "command_accepted"
    COMMAND_REFUSED = "command_refused"
    DUPLICATE_COMMAND = "duplicate_command"
    #: The broker confirmed a modify: the order's (or its position's) prices changed.
    MODIFIED = "modified"
    #: A deal the broker or a person made that reduced the position this order opened
    #: (stop-loss, take-profit, stop-out, a close at the terminal).
    POSITION_EXIT = "position_exit"
    #: A deal of another magic number (a manual trade, another robot): reported, not applied.
    FOREIGN_DEAL = "foreign_deal"


class Order(Model):
    """The value of the ``orders`` table (key: ``order_id``) and of the ``orders.status`` topic."""

    order_id: str
    signal_id: str
    account: str
    strategy: str | None = None
    symbol: str
    side: Side
    order_type: OrderType
    volume: float  # requested, lots
    entry_price: float  # the signal's entry price
    expected_price: float  # slippage reference: entry (market), limit or trigger (pending)
    trigger_price: float | None = None
    limit_price: float | None = None
    stop_loss: float | None = None
    take_profit: float | None = None
    state: OrderState = OrderState.PENDING
    filled_volume: float = 0.0
    avg_fill_price: float | None = None  # volume-weighted over applied fills
    slippage_pips: float | None = None  # of avg_fill_price vs expected_price, + = adverse
    #: The broker's touch when the order went out (ask for a buy, bid for a sell, from its
    #: answer to the submission): the arrival price of transaction-cost analysis.
    arrival_price: float | None = None
    deals: tuple[int, ...] = ()  # broker deal tickets applied: a repeated one is a duplicate
    broker_ticket: int | None = None
    retcode: int | None = None
    reason: str | None = None
    attempts: int = 0  # submissions sent to the broker
    intent: OrderIntent = OrderIntent.OPEN
    time_in_force: TimeInForce = TimeInForce.GTC
    expires_at: datetime | None = None  # when a DAY or GTD order stops working
    position_ticket: int | None = None  # the broker position this order opened or closes
    #: Ids of the commands applied to this order, newest last (bounded): a repeat acts once.
    commands: tuple[str, ...] = ()
    #: An accepted cancel or modify whose broker answer has not been applied yet (JSON:
    #: kind, command_id, changes, reason): the timer sends it again after a crash.
    pending_command: str | None = None
    version: int = 0  # number of lifecycle events applied
    created_at: datetime
    updated_at: datetime
    submitted_at: datetime | None = None
    filled_at: datetime | None = None

    @property
    def remaining_volume(self) -> float:
        return max(0.0, round(self.volume - self.filled_volume, 8))


class OrderEvent(Model):
    """One lifecycle event: a record of ``order_execution_archive`` (the audit trail)."""

    event_id: str  # deterministic: f"{order_id}:{version}:{type}" - replays produce the same id
    type: EventType
    order_id: str
    signal_id: str
    symbol: str
    account: str
    from_state: OrderState | None = None
    to_state: OrderState | None = None
    reason: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)
    at: datetime


class DeadLetter(Model):
    """A record of a dead-letter topic (``signals.dlq``, ``fills.dlq``, ``executions.dlq``,
    ``sink.dlq``) as the ClickHouse table ``dead_letters`` keeps it: where it is, why it is
    dead (the ``reason`` header) and what it held."""

    topic: str  # the dead-letter topic
    partition: int
    offset: int
    key: str | None = None
    reason: str  # the ``reason`` header ("" if absent)
    value: str  # the original bytes, as UTF-8 (undecodable bytes replaced)
    headers: dict[str, str] = Field(default_factory=dict)  # the others: subject, route, topic, offset...
    at: datetime  # the record's Kafka timestamp

    @classmethod
    def of(cls, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
           headers: Any, timestamp_ms: int) -> "DeadLetter":
        text = {k: (v or b"").decode(errors="replace") for k, v in (headers or ())}
        return cls(topic=topic, partition=partition, offset=offset,
                   key=key.decode(errors="replace") if key is not None else None,
                   reason=text.pop("reason", ""), value=(value or b"").decode(errors="replace"), headers=text,
                   at=datetime.fromtimestamp(timestamp_ms / 1000, timezone.utc))


# --------------------------------------------------------------------------------------
# Fills applied to orders, and positions
# --------------------------------------------------------------------------------------


class Execution(Model):
    """A fill applied to its order: a record of the derived topic ``executions``."""

    execution_id: str  # f"{order_id}:{deal}" - deterministic
    order_id: str
    signal_id: str
    account: str
    symbol: str
    side: Side
    deal: int
    ticket: int | None = None
    price: float
    volume: float
    expected_price: float
    slippage_pips: float  # this fill vs expected_price, + = adverse
    cumulative_volume: float  # order's filled volume after this fill
    avg_fill_price: float  # order's VWAP after this fill
    order_state: OrderState  # order's state after this fill
    time: datetime  # broker deal time
    entry: DealEntry = "in"
    reason: DealReason = "expert"
    position: int | None = None  # broker position ticket
    profit: float = 0.0  # the broker's profit of this deal, in ``currency``
    currency: str = "USD"
    magic: int = 0


class Position(Model):
    """Net position per account and symbol: the ``positions`` table (key ``{account}:{symbol}``)."""

    account: str
    symbol: str
    net_volume: float = 0.0  # lots, + long / - short
    avg_open_price: float | None = None  # of the open net volume; None when flat
    realized_pnl_price: float = 0.0  # sum of (close - open) x lots x direction: price terms
    realized_pnl: float = 0.0  # sum of the broker's deal profit, in ``currency``
    currency: str = "USD"  # the account currency of realized_pnl
    ticket: int | None = None  # the broker's position ticket (from the last deal)
    fills: int = 0
    last_deal: int | None = None
    deals: tuple[int, ...] = ()  # recent deal tickets applied (bounded): dedupe on replay
    #: Deals whose volume a reconciliation correction took from the broker before they reached
    #: us: when one arrives only its profit is added (its volume is in net_volume already).
    corrected_deals: tuple[int, ...] = ()
    version: int = 0
    updated_at: datetime

    @property
    def key(self) -> str:
        return position_key(self.account, self.symbol)


def position_key(account: str, symbol: str) -> str:
    return f"{account}:{symbol}"


# --------------------------------------------------------------------------------------
# Commands: how timers and broker calls feed back into the single writer of the tables
# --------------------------------------------------------------------------------------


class CommandKind(str, Enum):
    #: The connector's answer to a submission: ``payload`` is the TradeResult (or
    #: ``{"no_reply": true}``), ``attempt`` the submission it answers.
    SUBMIT_RESULT = "submit_result"
    #: The broker's view of an order after a status query: ``payload`` is the OrderStatus.
    BROKER_STATUS = "broker_status"
    #: A ``signal_orders`` entry is past the idempotency window: remove it (a tombstone).
    EXPIRE_SIGNAL = "expire_signal"
    #: From ops and upstream services (HTTP, NATS, CLI): ``command_id`` makes a repeat act once.
    CANCEL = "cancel"  # key order_id
    MODIFY = "modify"  # key order_id; payload: ModifyOrder
    CLOSE_POSITION = "close_position"  # key "{account}:{symbol}"; payload: ClosePosition
    #: The order's time in force ran out (the service's timer).
    EXPIRE = "expire"
    #: The connector's answer to a cancel / modify: ``payload`` the TradeResult (or no_reply).
    CANCEL_RESULT = "cancel_result"
    MODIFY_RESULT = "modify_result"


class OrderCommand(Model):
    """A record of the internal topic ``orders.commands`` (key: order_id, or signal_id for
    EXPIRE_SIGNAL; both land on the signal's partition)."""

    kind: CommandKind
    key: str
    attempt: int = 0
    payload: dict[str, Any] = Field(default_factory=dict)
    at: datetime
    command_id: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")
    source: str | None = Field(None, max_length=64)  # who asked: http, nats, cli, system


class ModifyOrder(Model):
    """``POST /orders/{order_id}/modify``: any of the order's price (the limit price of a
    limit, the trigger of a stop or stop-limit), stop-loss and take-profit.  SL/TP of a
    filled order move the SL/TP of the position it opened."""

    price: float | None = None
    stop_loss: float | None = None
    take_profit: float | None = None
    command_id: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")

    @field_validator("price", "stop_loss", "take_profit")
    @classmethod
    def _prices(cls, v: float | None, info: Any) -> float | None:
        return _price(v, info.field_name)

    @model_validator(mode="after")
    def _something(self) -> "ModifyOrder":
        if self.price is None and self.stop_loss is None and self.take_profit is None:
            raise ValueError("give at least one of price, stop_loss, take_profit")
        return self

    def changes(self) -> dict[str, float]:
        return {k: v for k, v in (("price", self.price), ("stop_loss", self.stop_loss),
                                   ("take_profit", self.take_profit)) if v is not None}


class ClosePosition(Model):
    """``POST /positions/{account}/{symbol}/close``: all of the position, or ``volume`` lots."""

    volume: float | None = Field(None, gt=0, le=MAX_LOTS)
    command_id: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")


class CancelOrder(Model):
    """``POST /orders/{order_id}/cancel``."""

    command_id: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")
