"""A broker simulator that implements the MT5 connector contract (``CONTRACT.md``).

What it does, like an MT5 trade server behind a connector (and, by default, at least as
harshly as a real broker):

* quotes every symbol of the :class:`~tables.symbols.SymbolTable` with a seeded,
  mean-reverting random walk (Ornstein-Uhlenbeck around the start price, in pips), a spread,
  and the symbol's digits, ticking every ``tick_interval`` seconds;
* fills market orders at the touch (buy at the ask, sell at the bid) with slippage bounded
  by ``deviation``, requotes (10004) when the price moved beyond ``deviation``, and fills
  orders above ``liquidity_lots`` in several deals (10010 first, the rest over the next
  ticks);
* places limit, stop and stop-limit orders (10008), triggers them from the price path and
  expires them (DAY, SPECIFIED, SPECIFIED_DAY) where the symbol allows broker expiry;
* closes a position named by its ticket (``TradeRequest.position``) and modifies working
  orders and positions' SL/TP (``mt5.orders.modify``);
* rejects with the MT5 retcodes (10013 unknown symbol / bad request, 10014 volume, 10015
  price, 10016 stops, 10018 market closed, 10019 no money, 10022 expiration, 10025 no
  changes, 10035 order type, 10036 position closed, 10038 close volume);
* dedupes submissions on ``(account, magic, comment)``: a resend of an accepted order
  returns the first result and is never executed again;
* nets positions per ``(account, symbol, magic)`` with a ticket, an average price, SL and TP;
  closes them itself when their SL or TP is reached and when an account's margin level
  falls below the stop-out level (balance, leverage, realized and floating profit in USD);
* publishes every deal (with its entry, reason, position ticket and profit) to JetStream
  (stream ``MT5_FILLS``) with ``Nats-Msg-Id`` = ``deal-{deal}``, from an outbox that
  retries until JetStream acknowledges;
* obeys control commands on ``mt5.sim.control`` (forced prices, injected rejects, lost
  replies, lost requests, position discrepancies, manual trades at the terminal, closed
  markets, balances) and reports statistics on ``mt5.sim.stats``;
* records when the first submit request of each client order id arrived (wall clock), for
  latency measurements (control command ``receipts``).

All state is changed by synchronous code on one event loop (request callbacks, the ticker),
so no locks are needed.  Prices are deterministic per symbol given the seed and the number
of ticks; slippage draws come from their own seeded generator.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import orjson
from pydantic import ValidationError

from app import retry
from app.models import MAX_LOTS, describe_validation_error, to_dict, to_json, utcnow
from app.mt5 import contract as c
from app.mt5.contract import (
    CancelRequest,
    DealEvent,
    ErrorReply,
    ModifyRequest,
    OrderStatus,
    OrderTime,
    OrderType,
    PositionsQuery,
    PositionsSnapshot,
    Retcode,
    StatusQuery,
    TradeAction,
    TradeRequest,
    TradeResult,
)
from app.sample import REFERENCE
from tables.symbols import SymbolSpec, SymbolTable

log = logging.getLogger("execution.mt5.simulator")

#: Start prices of the built-in symbols that :data:`app.sample.REFERENCE` does not list.
EXTRA_REFERENCE: dict[str, float] = {
    "NZDUSD": 0.60110,
    "USDCAD": 1.35620,
    "EURGBP": 0.85060,
    "EURCHF": 0.95170,
    "GBPJPY": 192.480,
    "AUDJPY": 99.710,
    "XAGUSD": 28.450,
}

PENDING_TYPES = frozenset(
    {
        OrderType.BUY_LIMIT, OrderType.SELL_LIMIT, OrderType.BUY_STOP, OrderType.SELL_STOP,
        OrderType.BUY_STOP_LIMIT, OrderType.SELL_STOP_LIMIT,
    }
)
STOP_LIMIT_TYPES = frozenset({OrderType.BUY_STOP_LIMIT, OrderType.SELL_STOP_LIMIT})
EPS = 1e-9
#: The account (deposit) currency of every simulated account.
ACCOUNT_CURRENCY = "USD"
#: A position remembers the tickets of at most this many of its deals (newest last).
POSITION_DEALS_KEPT = 1000

Key = tuple[str, int, str]  # (account, magic, comment)
PosKey = tuple[str, str, int]  # (account, symbol, magic)


def _r8(x: float) -> float:
    return round(x, 8)


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def next_midnight(t: datetime) -> datetime:
    """The next 00:00 UTC after ``t``: when a DAY order (or a SPECIFIED_DAY one's day) ends."""
    day = _utc(t).astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day + timedelta(days=1)


# --------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------


@dataclass
class Market:
    """One symbol's quote and price process."""

    spec: SymbolSpec
    start: float  # the mid the walk reverts to
    mid: float
    spread_points: int
    rng: random.Random
    bid: float = 0.0
    ask: float = 0.0
    held: bool = False  # set_price with hold: the walk is paused
    closed: bool = False  # close_market: no trading, no ticks

    def quote(self) -> None:
        d, p = self.spec.digits, self.spec.point
        self.bid = round(self.mid - self.spread_points * p / 2, d)
        self.ask = round(self.bid + self.spread_points * p, d)

    def points(self, price: float) -> int:
        return round(price / self.spec.point)


@dataclass
class SimOrder:
    """A broker order: the request, its state and its deals."""

    ticket: int
    request_id: int
    account: str
    magic: int
    comment: str
    symbol: str
    type: OrderType
    volume_initial: float
    price: float
    stoplimit: float
    sl: float
    tp: float
    deviation: int
    expiration: datetime | None
    state: str  # placed, partially_filled, filled, cancelled, rejected, expired
    retcode: int = 0
    result: TradeResult | None = None  # the first result: what a resend gets
    volume_filled: float = 0.0
    notional: float = 0.0  # sum of price x volume of the deals
    deals: list[DealEvent] = field(default_factory=list)
    triggered: bool = False  # stop: now a market order; stop-limit: now a limit at ``stoplimit``
    type_time: OrderTime = OrderTime.GTC
    close_position: int = 0  # a close: the ticket of the position it reduces (``TradeRequest.position``)
    position: int = 0  # the ticket of the position its latest deal went into
    reason: str = "expert"  # the reason of its deals: expert, or sl/tp/stop_out/client for broker-made orders

    @property
    def key(self) -> Key:
        return (self.account, self.magic, self.comment)

    @property
    def remaining(self) -> float:
        return max(0.0, _r8(self.volume_initial - self.volume_filled))

    @property
    def is_buy(self) -> bool:
        return self.type.is_buy

    @property
    def active(self) -> bool:
        return self.state in ("placed", "partially_filled")

    def status(self) -> OrderStatus:
        avg = self.notional / self.volume_filled if self.volume_filled > EPS else None
        return OrderStatus(
            known=True, ticket=self.ticket, state=self.state, symbol=self.symbol, type=int(self.type),
            volume_initial=self.volume_initial, volume_filled=_r8(self.volume_filled),
            price_avg=round(avg, 8) if avg is not None else None, retcode=self.retcode,
            deals=list(self.deals), magic=self.magic, comment=self.comment, account=self.account,
        )


@dataclass
class Rejection:
    """A request the broker refused without creating an order (not deduped: a new request
    with the same id is evaluated again and replaces it)."""

    request: TradeRequest
    result: TradeResult

    def status(self) -> OrderStatus:
        r = self.request
        return OrderStatus(
            known=True, ticket=0, state="rejected", symbol=r.symbol, type=int(r.type),
            volume_initial=r.volume, retcode=self.result.retcode, magic=r.magic, comment=r.comment, account=r.account,
        )


@dataclass
class Pos:
    """A net position of ``(account, symbol, magic)``; removed when it goes flat."""

    account: str
    symbol: str
    magic: int
    net: float = 0.0  # lots, + long / - short
    avg: float | None = None
    sl: float = 0.0
    tp: float = 0.0
    ticket: int = 0  # the ticket of the order that opened it (or reversed it)
    comment: str = ""  # the comment (client order id) of that order
    deals: list[int] = field(default_factory=list)  # deal tickets since it opened, newest last

    @property
    def key(self) -> PosKey:
        return (self.account, self.symbol, self.magic)

    @property
    def long(self) -> bool:
        return self.net > 0


@dataclass
class Faults:
    reject_next: list[tuple[int, bool]] = field(default_factory=list)  # (retcode, execute)
    drop_replies: int = 0
    drop_unprocessed: int = 0
    drop_status: int = 0


class Reject(Exception):
    def __init__(self, retcode: Retcode, text: str) -> None:
        super().__init__(text)
        self.retcode = retcode
        self.text = text


# --------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------


class BrokerSimulator:
    """The broker behind ``mt5.*`` subjects.  ``await start()``, ``await stop()``.

    Prices: ``volatility_pips`` is the walk's volatility in pips per sqrt(second) and
    ``mean_reversion`` its pull back to the start price per second (the defaults give a
    stationary spread of about 4 pips and moves of a few pips per second, so the sample
    traffic's pending orders, a few pips from entry, mostly trigger within seconds).

    Accounts: each has a ``balance`` (USD), the ``leverage`` and the ``stop_out_level`` (in
    percent of margin); with ``enable_stop_out`` the broker closes the position with the
    largest floating loss while the margin level is below it.  ``clock`` (default
    :func:`app.models.utcnow`) is the broker's time: expirations and deal times; tests may
    replace it to move time forward.
    """

    def __init__(
        self,
        nats_url: str = "nats://127.0.0.1:4222",
        *,
        seed: int = 7,
        symbols: SymbolTable | None = None,
        liquidity_lots: float = 5.0,
        tick_interval: float = 0.05,
        volatility_pips: float = 8.0,
        mean_reversion: float = 2.0,
        spread_pips: float = 1.0,
        metal_spread_pips: float = 2.0,
        prices: Mapping[str, float] | None = None,
        stops_level_points: int = 10,
        max_slippage_points: int = 3,
        min_volume: float = 0.01,
        volume_step: float = 0.01,
        max_volume: float = MAX_LOTS,
        margin_limit_lots: float = 500.0,
        enable_sl_tp: bool = True,
        balance: float = 100_000.0,
        leverage: float = 100.0,
        stop_out_level: float = 50.0,
        enable_stop_out: bool = True,
        hold_prices: bool = False,
        ticket_base: int | None = None,
        connect_options: Mapping[str, Any] | None = None,
        drain_timeout: float = 10.0,
    ) -> None:
        if liquidity_lots <= 0 or tick_interval <= 0:
            raise ValueError("liquidity_lots and tick_interval must be positive")
        if leverage <= 0 or stop_out_level < 0:
            raise ValueError("leverage must be positive and stop_out_level not negative")
        self.nats_url = nats_url
        self.seed = seed
        self.symbols = symbols if symbols is not None else SymbolTable()
        self.liquidity_lots = float(liquidity_lots)
        self.tick_interval = float(tick_interval)
        self.volatility_pips = float(volatility_pips)
        self.mean_reversion = float(mean_reversion)
        self.spread_pips = float(spread_pips)
        self.metal_spread_pips = float(metal_spread_pips)
        self.prices = dict(prices or {})
        self.stops_level_points = int(stops_level_points)
        self.max_slippage_points = int(max_slippage_points)
        self.min_volume = float(min_volume)
        self.volume_step = float(volume_step)
        self.max_volume = float(max_volume)
        self.margin_limit_lots = float(margin_limit_lots)
        self.enable_sl_tp = bool(enable_sl_tp)
        self.balance = float(balance)
        self.leverage = float(leverage)
        self.stop_out_level = float(stop_out_level)
        self.enable_stop_out = bool(enable_stop_out)
        self.hold_prices = bool(hold_prices)  # every market starts held at its start price
        self.clock: Callable[[], datetime] = utcnow
        self.connect_options = dict(connect_options or {})
        self.drain_timeout = drain_timeout
        # Tickets are never reused, not even across restarts or a reset: downstream dedupes
        # fills by deal ticket and JetStream by Nats-Msg-Id.  Default base: wall-clock ms.
        base = ticket_base if ticket_base is not None else time.time_ns() // 1_000_000 * 1000
        self._next_ticket = base
        self._next_deal = base
        self._next_request = 0
        self.nc: Any = None
        self.js: Any = None
        self._subs: list[Any] = []
        self._tasks: list[asyncio.Task] = []
        self._outbox: asyncio.Queue[DealEvent] | None = None
        # Outbox counters: kept across ``reset`` (deals made before it may still be in flight).
        self.published_total = 0
        self.unpublished = 0
        self._stopping = False
        self._unconvertible: set[str] = set()
        self._init_state()

    # ------------------------------------------------------------------ state
    def _init_state(self) -> None:
        self.markets: dict[str, Market] = {}
        for name in self.symbols:
            spec = self.symbols[name]
            start = self.prices.get(name)
            if start is None:
                start = REFERENCE[name][0] if name in REFERENCE else EXTRA_REFERENCE.get(name, 1.0)
            metal = name[:3] in ("XAU", "XAG", "XPT", "XPD")
            spread = max(1, round((self.metal_spread_pips if metal else self.spread_pips) * spec.points_per_pip))
            m = Market(spec, start, start, spread, random.Random(f"{self.seed}:price:{name}"),
                       held=self.hold_prices)
            m.quote()
            self.markets[name] = m
        self.slip_rng = random.Random(f"{self.seed}:slippage")
        self.orders: dict[Key, SimOrder] = {}
        self.rejections: dict[Key, Rejection] = {}
        self.active: dict[int, SimOrder] = {}  # ticket -> order not yet final
        #: Orders the broker or a person made (SL/TP/stop-out closes, manual trades), by
        #: ticket.  Not found by a status query: their deals carry another order's comment.
        self.broker_orders: dict[int, SimOrder] = {}
        self.positions: dict[PosKey, Pos] = {}
        self.margin: dict[str, float] = {}  # per-account override of margin_limit_lots
        self.balances: dict[str, float] = {}  # per-account override of ``balance``
        self.realized: Counter = Counter()  # account -> realized profit of its deals (USD)
        self.faults = Faults()
        self.ticks = 0
        self.stats: Counter = Counter()
        self.by_comment: Counter = Counter()
        self.executed: Counter = Counter()
        #: comment -> wall-clock time (``time.time()``) the first submit request for it arrived
        self.received: dict[str, float] = {}

    def _ticket(self) -> int:
        self._next_ticket += 1
        return self._next_ticket

    def _deal_ticket(self) -> int:
        self._next_deal += 1
        return self._next_deal

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> BrokerSimulator:
        from app.bridge import ensure_stream

        self._stopping = False
        self.nc = await nats.connect(
            **{"servers": self.nats_url.split(","), "max_reconnect_attempts": -1, "reconnect_time_wait": 0.5,
               "name": "mt5-simulator", **self.connect_options}
        )
        self.js = self.nc.jetstream()
        tries = iter(range(50))  # JetStream not ready yet right after the server starts: 50 tries
        await retry.until_done("JetStream not ready", lambda: ensure_stream(self.js, c.FILLS_STREAM, [c.FILLS_SUBJECTS]),
                               initial=0.1, maximum=1.0, stop=lambda: next(tries, None) is None,
                               logger=log, level=logging.INFO)
        self._outbox = asyncio.Queue()
        handlers = {
            c.SUBMIT: self._on_submit, c.CANCEL: self._on_cancel, c.MODIFY: self._on_modify, c.STATUS: self._on_status,
            c.POSITIONS: self._on_positions, c.CONTROL: self._on_control, c.STATS: self._on_stats,
        }
        for subject, handler in handlers.items():
            self._subs.append(await self.nc.subscribe(subject, queue=c.QUEUE, cb=self._guard(handler)))
        await self.nc.flush()
        self._tasks = [
            asyncio.create_task(self._ticker(), name="mt5-sim-ticker"),
            asyncio.create_task(self._publisher(), name="mt5-sim-publisher"),
        ]
        log.info("MT5 broker simulator ready on %s (seed %s, %d symbols)", self.nats_url, self.seed, len(self.markets))
        return self

    async def stop(self) -> None:
        """Stop answering, publish the deals still in the outbox (up to ``drain_timeout``)."""
        if self.nc is None:
            return
        self._stopping = True
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        self._subs = []
        ticker, publisher = self._tasks
        ticker.cancel()
        if self._outbox is not None and not self._outbox.empty():
            try:
                await asyncio.wait_for(self._outbox.join(), self.drain_timeout)
            except TimeoutError:
                log.error("stopping with %d deal events not acknowledged by JetStream", self._outbox.qsize())
        publisher.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        try:
            await self.nc.drain()
        except Exception:
            await self.nc.close()
        self.nc = None
        log.info("MT5 broker simulator stopped")

    async def __aenter__(self) -> BrokerSimulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _guard(self, handler):
        async def cb(msg) -> None:
            try:
                reply = handler(msg.data)
            except Exception as exc:  # a bug must not kill the subscription
                log.exception("%s handler failed", msg.subject)
                reply = to_json(ErrorReply(error=f"simulator error: {exc!r}"))
            if reply is not None and msg.reply:
                try:
                    await msg.respond(reply)
                except Exception as exc:
                    log.warning("reply on %s not sent: %s", msg.subject, exc)

        return cb

    # ------------------------------------------------------------------ deals to JetStream
    async def _publisher(self) -> None:
        from app.bridge import ensure_stream

        assert self._outbox is not None
        while True:
            ev = await self._outbox.get()
            data = to_json(ev)
            subject = c.fills_subject(ev.symbol)
            headers = {"Nats-Msg-Id": c.deal_msg_id(ev.deal)}
            async def recreate_stream(_exc: BaseException) -> None:  # the stream may be gone
                self.stats["publish_retries"] += 1
                try:
                    await ensure_stream(self.js, c.FILLS_STREAM, [c.FILLS_SUBJECTS])
                except Exception:
                    pass

            # NATS down, stream gone, no ack: retry, never drop
            await retry.until_done(f"deal {ev.deal} not acknowledged",
                                   lambda: self.js.publish(subject, data, timeout=2.0, headers=headers),
                                   initial=0.05, maximum=2.0, on_failure=recreate_stream, logger=log)
            self.published_total += 1
            self.unpublished -= 1
            self._outbox.task_done()

    # ------------------------------------------------------------------ prices
    async def _ticker(self) -> None:
        loop = asyncio.get_running_loop()
        next_t = loop.time()
        while True:
            next_t += self.tick_interval
            try:
                self.tick()
            except Exception:
                log.exception("tick failed")
            now = loop.time()
            if next_t < now - self.tick_interval:
                next_t = now  # fell behind: do not burst to catch up
            await asyncio.sleep(max(0.0, next_t - now))

    def tick(self) -> None:
        """One step of every price path, then matching of the working orders, the SL/TP of
        the positions, and the accounts' stop-out levels."""
        self.ticks += 1
        dt = self.tick_interval
        decay = math.exp(-self.mean_reversion * dt)
        if self.mean_reversion > 0:
            scale = math.sqrt((1 - decay * decay) / (2 * self.mean_reversion))
        else:
            scale = math.sqrt(dt)
        working: dict[str, list[SimOrder]] = {}
        for order in self.active.values():
            working.setdefault(order.symbol, []).append(order)
        with_stops = {p.symbol for p in self.positions.values() if p.sl or p.tp} if self.enable_sl_tp else set()
        for name, m in self.markets.items():
            if not m.closed and not m.held:
                shock = m.rng.gauss(0.0, 1.0)
                m.mid = m.start + (m.mid - m.start) * decay + self.volatility_pips * m.spec.pip_size * scale * shock
                m.mid = max(m.mid, m.spec.point * (m.spread_points + 1))
                m.quote()
            if name in working or name in with_stops:
                self._match(name, working.get(name, []))
        self._check_stop_outs()

    def _touch(self, m: Market, buy: bool) -> float:
        return m.ask if buy else m.bid

    def _slipped(self, m: Market, buy: bool, deviation: int, reference: float) -> float:
        """The touch moved by a random slippage of at most ``deviation`` points (and at most
        ``max_slippage_points``), never further than ``deviation`` from ``reference``."""
        touch = self._touch(m, buy)
        bound = min(deviation, self.max_slippage_points)
        slip = 0 if bound <= 0 or self.slip_rng.random() < 0.5 else self.slip_rng.randint(-bound, bound)
        price_pts = m.points(touch) + (slip if buy else -slip)  # + slip = adverse
        if reference > 0:
            ref = m.points(reference)
            price_pts = min(max(price_pts, ref - deviation), ref + deviation)
        price_pts = min(max(price_pts, m.points(touch) - deviation), m.points(touch) + deviation)
        return round(price_pts * m.spec.point, m.spec.digits)

    # ------------------------------------------------------------------ matching
    def _match(self, symbol: str, orders: list[SimOrder] | None = None) -> None:
        """Expire, trigger and fill the symbol's working orders against its quote, in ticket
        order, then close the positions whose SL or TP the quote reached."""
        m = self.markets[symbol]
        if orders is None:
            orders = [o for o in self.active.values() if o.symbol == symbol]
        now = self.clock()
        for order in orders:  # the broker expires orders on time, even with the market closed
            if order.active and order.expiration is not None and now >= order.expiration:
                self._finish(order, "expired")
        if m.closed:
            return
        for order in sorted(orders, key=lambda o: o.ticket):
            if not order.active:
                continue
            buy = order.is_buy
            if order.type.is_market:
                touch = self._touch(m, buy)
                if order.price > 0 and (m.points(touch) - m.points(order.price)) * (1 if buy else -1) > order.deviation:
                    continue  # the rest works as a limit: the requested price plus the deviation
                self._fill(order, m, touch)
                continue
            t = order.type
            if t in (OrderType.BUY_STOP, OrderType.SELL_STOP):
                if not order.triggered and (m.ask >= order.price if buy else m.bid <= order.price):
                    order.triggered = True  # now a market order
                if order.triggered:
                    self._fill(order, m, self._touch(m, buy))
                continue
            if t in STOP_LIMIT_TYPES and not order.triggered:
                if not (m.ask >= order.price if buy else m.bid <= order.price):
                    continue
                order.triggered = True  # now a limit order at ``stoplimit``
            limit = order.stoplimit if order.triggered else order.price
            if m.ask <= limit + EPS if buy else m.bid >= limit - EPS:
                self._fill(order, m, self._touch(m, buy))
        if self.enable_sl_tp:
            self._check_sl_tp(m)

    def _fill(self, order: SimOrder, m: Market, price: float) -> None:
        """One chunk (at most ``liquidity_lots``) of a working order at ``price``."""
        if order.volume_filled <= EPS and not order.type.is_market:
            # A pending order needs the margin when it triggers.
            try:
                self._check_margin(order.account, order.symbol, order.magic, order.is_buy, order.volume_initial)
            except Reject as r:
                order.retcode = order.retcode or int(r.retcode)
                self._finish(order, "rejected")
                return
        volume = min(order.remaining, self.liquidity_lots)
        if volume > EPS:
            self._deal(order, m, volume, price)

    def _finish(self, order: SimOrder, state: str) -> None:
        order.state = state
        self.active.pop(order.ticket, None)
        self.stats[f"orders_{state}"] += 1

    # ------------------------------------------------------------------ deals and positions
    def _deal(self, order: SimOrder, m: Market, volume: float, price: float) -> DealEvent | None:
        """A deal of ``order``.  A close reduces the position it names, never more than its
        volume; if that position is gone (closed by SL/TP, a stop-out or by hand), the rest of
        the close is cancelled and None is returned."""
        target = None
        if order.close_position:
            target = self._position_by_ticket(order.account, order.close_position)
            if target is None or target.long == order.is_buy:
                self._finish(order, "cancelled")
                return None
            volume = min(volume, abs(target.net))
        ev = self._book(
            account=order.account, symbol=order.symbol, magic=order.magic, buy=order.is_buy, volume=volume,
            price=price, order_id=order.comment, ticket=order.ticket, reason=order.reason, pos=target,
            sl=order.sl, tp=order.tp,
        )
        order.deals.append(ev)
        order.position = ev.position or 0
        order.volume_filled = _r8(order.volume_filled + ev.volume)
        order.notional += ev.price * ev.volume
        if order.remaining <= EPS:
            self._finish(order, "filled")
        else:
            order.state = "partially_filled"
        return ev

    def _book(
        self, *, account: str, symbol: str, magic: int, buy: bool, volume: float, price: float, order_id: str,
        ticket: int, reason: str, pos: Pos | None = None, sl: float = 0.0, tp: float = 0.0,
    ) -> DealEvent:
        """Net one deal into a position (``pos``, or the ``(account, symbol, magic)`` one),
        realize its profit, and publish it.

        The entry is ``in`` (opens or adds), ``out`` (reduces or closes: the average is kept)
        or ``inout`` (reverses: the position gets the deal's order ticket and comment, the
        deal price as average, and the order's SL/TP).  A new position gets the order's
        SL/TP; an addition replaces them only if the order has any."""
        m = self.markets[symbol]
        volume = _r8(volume)
        price = round(price, m.spec.digits)
        if pos is None:
            pos = self.positions.get((account, symbol, magic)) or Pos(account, symbol, magic)
        net = pos.net
        signed = volume if buy else -volume
        new = _r8(net + signed)
        profit = 0.0
        if abs(net) <= EPS or (net > 0) == buy:
            entry = "in"
            if abs(net) <= EPS:  # a new position: this order's ticket, comment, SL and TP
                pos.ticket, pos.comment, pos.deals, pos.avg = ticket, order_id, [], price
                pos.sl, pos.tp = sl, tp
            else:
                pos.avg = (abs(net) * (pos.avg or price) + volume * price) / abs(new)
                if sl or tp:
                    pos.sl, pos.tp = sl, tp
        else:
            closed = min(volume, abs(net))
            profit = self._profit(m, net > 0, closed, pos.avg if pos.avg is not None else price, price)
            if volume <= abs(net) + EPS:
                entry = "out"
                if abs(new) <= EPS:
                    new = 0.0
            else:
                entry = "inout"
                pos.ticket, pos.comment, pos.deals, pos.avg = ticket, order_id, [], price
                pos.sl, pos.tp = sl, tp
        pos.net = new
        ev = DealEvent(
            order_id=order_id, deal=self._deal_ticket(), ticket=ticket, symbol=symbol, side="buy" if buy else "sell",
            price=price, volume=volume, time=self.clock(), account=account, magic=magic, entry=entry, reason=reason,
            position=pos.ticket or None, profit=profit, currency=ACCOUNT_CURRENCY,
        )
        if abs(new) <= EPS:
            self.positions.pop(pos.key, None)
        else:
            pos.deals.append(ev.deal)
            del pos.deals[:-POSITION_DEALS_KEPT]
            self.positions[pos.key] = pos
        if profit:
            self.realized[account] = round(self.realized[account] + profit, 2)
        self._emit(ev)
        return ev

    def _emit(self, ev: DealEvent) -> None:
        self.stats["deals"] += 1
        if self._outbox is not None:
            self.unpublished += 1
            self._outbox.put_nowait(ev)

    def _position_by_ticket(self, account: str, ticket: int) -> Pos | None:
        if ticket <= 0:
            return None
        for p in self.positions.values():
            if p.ticket == ticket and p.account == account and abs(p.net) > EPS:
                return p
        return None

    def _broker_close(self, pos: Pos, reason: str) -> SimOrder:
        """Close a whole position with a broker-made market order (SL, TP, stop-out) at the
        touch.  Its deals carry the comment of the order that opened the position, the
        position's magic and ticket, and ``reason``; the order is kept in ``broker_orders``."""
        m = self.markets[pos.symbol]
        long = pos.long
        px = m.bid if long else m.ask
        closer = SimOrder(
            ticket=self._ticket(), request_id=0, account=pos.account, magic=pos.magic, comment=pos.comment,
            symbol=pos.symbol, type=OrderType.SELL if long else OrderType.BUY, volume_initial=abs(pos.net),
            price=0.0, stoplimit=0.0, sl=0.0, tp=0.0, deviation=0, expiration=None, state="placed",
            retcode=int(Retcode.DONE), close_position=pos.ticket, reason=reason,
        )
        self.broker_orders[closer.ticket] = closer
        self.stats[f"closed_by_{reason}"] += 1
        log.info("%s: closing position %s (%s %s %+g, magic %s) at %s", reason, pos.ticket, pos.account,
                 pos.symbol, pos.net, pos.magic, px)
        while abs(pos.net) > EPS:
            ev = self._book(account=pos.account, symbol=pos.symbol, magic=pos.magic, buy=not long,
                            volume=min(abs(pos.net), MAX_LOTS), price=px, order_id=pos.comment,
                            ticket=closer.ticket, reason=reason, pos=pos)
            closer.deals.append(ev)
            closer.position = pos.ticket
            closer.volume_filled = _r8(closer.volume_filled + ev.volume)
            closer.notional += ev.price * ev.volume
        closer.state = "filled"
        return closer

    def _check_sl_tp(self, m: Market) -> None:
        symbol = m.spec.symbol
        for pos in [p for p in self.positions.values() if p.symbol == symbol and (p.sl or p.tp)]:
            if abs(pos.net) <= EPS:
                continue
            long = pos.long
            px = m.bid if long else m.ask  # the price the position closes at
            which = None
            if pos.sl and (px <= pos.sl + EPS if long else px >= pos.sl - EPS):
                which = "sl"
            elif pos.tp and (px >= pos.tp - EPS if long else px <= pos.tp + EPS):
                which = "tp"
            if which is not None:
                self._broker_close(pos, which)

    # ------------------------------------------------------------------ money
    def _usd_per(self, ccy: str) -> float:
        """USD for one unit of ``ccy`` at the simulator's own current mid (``CCYUSD``, or
        1 / ``USDCCY``); 1.0 (logged once) for a currency no symbol converts."""
        if ccy == ACCOUNT_CURRENCY:
            return 1.0
        direct = self.markets.get(f"{ccy}{ACCOUNT_CURRENCY}")
        if direct is not None:
            return (direct.bid + direct.ask) / 2
        inverse = self.markets.get(f"{ACCOUNT_CURRENCY}{ccy}")
        if inverse is not None:
            return 2 / (inverse.bid + inverse.ask)
        if ccy not in self._unconvertible:
            self._unconvertible.add(ccy)
            log.warning("no symbol converts %s to %s: counted 1:1", ccy, ACCOUNT_CURRENCY)
        return 1.0

    def _to_usd(self, amount: float, m: Market, price: float) -> float:
        """An amount in the symbol's quote currency in USD: as is for a USD quote, divided by
        ``price`` for a USD-base pair (USDJPY), else at the current QUOTEUSD / USDQUOTE mid."""
        quote = m.spec.quote_currency
        if quote == ACCOUNT_CURRENCY:
            return amount
        if m.spec.symbol[:3] == ACCOUNT_CURRENCY:
            return amount / price
        return amount * self._usd_per(quote)

    def _profit(self, m: Market, long: bool, volume: float, avg: float, price: float) -> float:
        """The realized profit (USD, 2 decimals) of closing ``volume`` of a position at ``price``."""
        raw = volume * (price - avg) * (1 if long else -1) * m.spec.contract_size
        return round(self._to_usd(raw, m, price), 2)

    def _floating(self, pos: Pos) -> float:
        m = self.markets[pos.symbol]
        px = m.bid if pos.long else m.ask
        raw = pos.net * (px - (pos.avg if pos.avg is not None else px)) * m.spec.contract_size
        return self._to_usd(raw, m, px)

    def _margin_of(self, pos: Pos) -> float:
        m = self.markets[pos.symbol]
        mid = (m.bid + m.ask) / 2
        base_usd = 1.0 if m.spec.symbol[:3] == ACCOUNT_CURRENCY else mid * self._usd_per(m.spec.quote_currency)
        return abs(pos.net) * m.spec.contract_size * base_usd / self.leverage

    def account_state(self, account: str) -> dict[str, Any]:
        """Balance, realized and floating profit, equity, margin and margin level (USD, %)."""
        positions = [p for p in self.positions.values() if p.account == account and abs(p.net) > EPS]
        balance = self.balances.get(account, self.balance)
        realized = float(self.realized.get(account, 0.0))
        floating = sum((self._floating(p) for p in positions), 0.0)
        margin = sum((self._margin_of(p) for p in positions), 0.0)
        equity = balance + realized + floating
        return {
            "account": account, "currency": ACCOUNT_CURRENCY, "balance": balance, "realized": round(realized, 2),
            "floating": round(floating, 2), "equity": round(equity, 2), "margin": round(margin, 2),
            "margin_level": round(equity / margin * 100, 4) if margin > EPS else None,
            "leverage": self.leverage, "stop_out_level": self.stop_out_level, "positions": len(positions),
        }

    def _check_stop_outs(self) -> None:
        """While an account's margin level is below ``stop_out_level``, close its position
        with the largest floating loss (on an open market), then look again."""
        if not self.enable_stop_out or not self.positions:
            return
        by_account: dict[str, list[Pos]] = {}
        for p in self.positions.values():
            by_account.setdefault(p.account, []).append(p)
        for account, positions in sorted(by_account.items()):
            for _ in range(len(positions)):
                positions = [p for p in positions if abs(p.net) > EPS]
                floating = {id(p): self._floating(p) for p in positions}
                margin = sum(self._margin_of(p) for p in positions)
                balance = self.balances.get(account, self.balance) + float(self.realized.get(account, 0.0))
                equity = balance + sum(floating.values())
                if margin <= EPS or equity / margin * 100 >= self.stop_out_level:
                    break
                closable = [p for p in positions if not self.markets[p.symbol].closed]
                if not closable:
                    break
                worst = min(closable, key=lambda p: (floating[id(p)], p.ticket))
                log.warning("stop out %s: equity %.2f, margin %.2f (%.1f%% < %g%%)", account, equity, margin,
                            equity / margin * 100, self.stop_out_level)
                self._broker_close(worst, "stop_out")

    def _gross(self, account: str) -> float:
        return sum(abs(p.net) for p in self.positions.values() if p.account == account)

    def _check_margin(self, account: str, symbol: str, magic: int, buy: bool, volume: float) -> None:
        """Margin as gross open lots per account: refuse an order that would raise the
        account's gross exposure above its limit."""
        limit = self.margin.get(account, self.margin_limit_lots)
        pos = self.positions.get((account, symbol, magic))
        net = pos.net if pos else 0.0
        gross = self._gross(account)
        after = gross - abs(net) + abs(net + (volume if buy else -volume))
        if after > limit + EPS and after > gross + EPS:
            raise Reject(Retcode.NO_MONEY, f"no money: {after:g} lots gross above the account's {limit:g}")

    # ------------------------------------------------------------------ requests
    def _result(self, retcode: int, req: TradeRequest | None, text: str, m: Market | None = None, **kw: Any) -> TradeResult:
        if m is not None:
            kw.setdefault("bid", m.bid)
            kw.setdefault("ask", m.ask)
        if req is not None:
            kw["request_comment"] = req.comment
        kw.setdefault("request_id", self._next_request)
        return TradeResult(retcode=int(retcode), comment=text, **kw)

    def _on_submit(self, data: bytes) -> bytes | None:
        now = time.time()
        self._next_request += 1
        self.stats["requests"] += 1
        try:
            req = TradeRequest.model_validate_json(data)
        except ValidationError as exc:
            reason, _ = describe_validation_error(exc)
            comment = ""
            try:
                raw = orjson.loads(data)
                comment = str(raw.get("comment", ""))[:64] if isinstance(raw, dict) else ""
            except orjson.JSONDecodeError:
                pass
            self.stats["invalid_requests"] += 1
            return self._reply(self._result(Retcode.INVALID, None, f"invalid request: {reason}", request_comment=comment))
        self.by_comment[req.comment] += 1
        self.received.setdefault(req.comment, now)
        if self.faults.drop_unprocessed > 0:
            self.faults.drop_unprocessed -= 1
            self.stats["dropped_unprocessed"] += 1
            log.info("drop_unprocessed: request %s (%s) lost before the broker", self._next_request, req.comment)
            return None
        return self._reply(self.submit(req))

    def _reply(self, result: TradeResult) -> bytes | None:
        if self.faults.drop_replies > 0:
            self.faults.drop_replies -= 1
            self.stats["dropped_replies"] += 1
            log.info("drop_replies: reply to %s lost", result.request_comment)
            return None
        return to_json(result)

    def submit(self, req: TradeRequest) -> TradeResult:
        """Process one submission (dedupe, injected faults, checks, execution)."""
        key: Key = (req.account, req.magic, req.comment)
        if req.action is TradeAction.REMOVE:
            return self.cancel(CancelRequest(magic=req.magic, comment=req.comment, account=req.account))
        first = self.orders.get(key)
        if first is not None:
            self.stats["deduped"] += 1
            assert first.result is not None
            return first.result
        m = self.markets.get(req.symbol)
        execute_as: int | None = None
        if self.faults.reject_next:
            retcode, execute = self.faults.reject_next.pop(0)
            self.stats["injected"] += 1
            if not execute:
                result = self._result(retcode, req, f"injected retcode {retcode}", m)
                if c.classify(retcode) is not c.Outcome.UNKNOWN:
                    self.rejections[key] = Rejection(req, result)
                    self.stats["rejected"] += 1
                return result
            execute_as = retcode
        try:
            result = self._execute(req, key)
        except Reject as r:
            result = self._result(r.retcode, req, r.text, m)
            self.rejections[key] = Rejection(req, result)
            self.stats["rejected"] += 1
            return result
        if result.deal:
            self._check_stop_outs()
        if execute_as is not None:
            return self._result(execute_as, req, f"injected retcode {execute_as} (order executed)", m)
        return result

    def _expiration(self, type_time: OrderTime, expiration: datetime | None, m: Market, pending: bool) -> datetime | None:
        """When a new order stops working (None: never), or 10022.  A symbol without broker
        expiry takes GTC only; a market order executes at once and needs none."""
        if type_time is OrderTime.GTC:
            return None
        if not m.spec.broker_expiry:
            raise Reject(Retcode.INVALID_EXPIRATION,
                         f"{m.spec.symbol}: the broker does not expire orders of this symbol (GTC only)")
        if not pending:
            return None
        now = self.clock()
        if type_time is OrderTime.DAY:
            return next_midnight(now)
        if expiration is None:
            raise Reject(Retcode.INVALID_EXPIRATION, f"type_time {type_time.name} needs an expiration")
        exp = _utc(expiration)
        if type_time is OrderTime.SPECIFIED_DAY:
            exp = next_midnight(exp)  # the end of that UTC day
        if exp <= now:
            raise Reject(Retcode.INVALID_EXPIRATION, f"expiration {exp.isoformat()} is not in the future")
        return exp

    def _execute(self, req: TradeRequest, key: Key) -> TradeResult:
        t = req.type
        if req.action is TradeAction.DEAL:
            if not t.is_market:
                raise Reject(Retcode.INVALID_ORDER, f"order type {t.name} is not a market order")
        elif req.action is TradeAction.PENDING:
            if t not in PENDING_TYPES:
                raise Reject(Retcode.INVALID_ORDER, f"order type {t.name} is not a pending order")
            if req.position:
                raise Reject(Retcode.INVALID_ORDER, "a close (position) must be a market order (action DEAL)")
        else:
            raise Reject(Retcode.INVALID, f"action {req.action.name} is not supported by the simulator")
        m = self.markets.get(req.symbol)
        if m is None:
            raise Reject(Retcode.INVALID, f"unknown symbol {req.symbol}")
        if m.closed:
            raise Reject(Retcode.MARKET_CLOSED, f"market closed for {req.symbol}")
        self._check_volume(req.volume)
        buy = t.is_buy
        point = m.spec.point
        level = self.stops_level_points
        expiration = self._expiration(req.type_time, req.expiration, m, not t.is_market)
        if req.position:
            target = self._position_by_ticket(req.account, req.position)
            if target is None:
                raise Reject(Retcode.POSITION_CLOSED, f"position {req.position} is closed or unknown")
            if target.symbol != req.symbol:
                raise Reject(Retcode.INVALID, f"position {req.position} is on {target.symbol}, not {req.symbol}")
            if target.long == buy:
                raise Reject(Retcode.INVALID_ORDER,
                             f"a {t.side} does not close the {'long' if target.long else 'short'} position {req.position}")
            if req.volume > abs(target.net) + EPS:
                raise Reject(Retcode.INVALID_CLOSE_VOLUME,
                             f"close volume {req.volume:g} above the position's {abs(target.net):g}")
            if req.sl or req.tp:
                raise Reject(Retcode.INVALID_STOPS, "a close takes no SL/TP")
        if t.is_market:
            ref_pts = m.points(m.bid if buy else m.ask)  # a buy position closes at the bid
        else:
            self._check_pending_price(req, m)
            ref_pts = m.points(req.stoplimit if t in STOP_LIMIT_TYPES else req.price)
        self._check_stops(req.sl, req.tp, m, buy, ref_pts, level)
        if not req.position:  # a close reduces the exposure: no margin needed
            self._check_margin(req.account, req.symbol, req.magic, buy, req.volume)
        if t.is_market and req.price > 0:
            touch = self._touch(m, buy)
            if abs(m.points(touch) - m.points(req.price)) > req.deviation:
                raise Reject(Retcode.REQUOTE, f"requote: {touch} is {abs(touch - req.price) / point:.0f} points from {req.price}")
        order = SimOrder(
            ticket=self._ticket(), request_id=self._next_request, account=req.account, magic=req.magic,
            comment=req.comment, symbol=req.symbol, type=t, volume_initial=_r8(req.volume), price=req.price,
            stoplimit=req.stoplimit, sl=req.sl, tp=req.tp, deviation=req.deviation, expiration=expiration,
            state="placed", type_time=req.type_time, close_position=req.position,
        )
        self.orders[key] = order
        self.rejections.pop(key, None)
        self.active[order.ticket] = order
        self.stats["orders"] += 1
        self.executed[req.comment] += 1
        if t.is_market:
            price = self._slipped(m, buy, req.deviation, req.price)
            ev = self._deal(order, m, min(order.volume_initial, self.liquidity_lots), price)
            assert ev is not None  # a close's position was just checked
            retcode = Retcode.DONE if order.state == "filled" else Retcode.DONE_PARTIAL
            text = "done" if retcode is Retcode.DONE else f"done partially: {ev.volume:g} of {order.volume_initial:g} lots"
            order.result = self._result(retcode, req, text, m, order=order.ticket, deal=ev.deal, volume=ev.volume, price=ev.price)
        else:
            order.result = self._result(Retcode.PLACED, req, "placed", m, order=order.ticket)
        order.retcode = order.result.retcode
        return order.result

    def _check_volume(self, volume: float) -> None:
        if not math.isfinite(volume) or volume <= 0:
            raise Reject(Retcode.INVALID_VOLUME, f"invalid volume {volume}")
        if volume < self.min_volume - EPS:
            raise Reject(Retcode.INVALID_VOLUME, f"volume {volume} below the minimum {self.min_volume}")
        if volume > self.max_volume + EPS:
            raise Reject(Retcode.INVALID_VOLUME, f"volume {volume} above the maximum {self.max_volume}")
        steps = volume / self.volume_step
        if abs(steps - round(steps)) > 1e-6:
            raise Reject(Retcode.INVALID_VOLUME, f"volume {volume} is not a multiple of {self.volume_step}")

    def _check_pending(self, t: OrderType, price: float, stoplimit: float, m: Market) -> None:
        level = self.stops_level_points
        if price <= 0 or not math.isfinite(price):
            raise Reject(Retcode.INVALID_PRICE, f"invalid price {price}")
        p, bid, ask = m.points(price), m.points(m.bid), m.points(m.ask)
        ok = {
            OrderType.BUY_LIMIT: p <= ask - level,
            OrderType.SELL_LIMIT: p >= bid + level,
            OrderType.BUY_STOP: p >= ask + level,
            OrderType.SELL_STOP: p <= bid - level,
            OrderType.BUY_STOP_LIMIT: p >= ask + level,
            OrderType.SELL_STOP_LIMIT: p <= bid - level,
        }[t]
        if not ok:
            raise Reject(Retcode.INVALID_PRICE, f"invalid price {price} for a {t.name} at {m.bid}/{m.ask}")
        if t in STOP_LIMIT_TYPES and (stoplimit <= 0 or not math.isfinite(stoplimit)):
            raise Reject(Retcode.INVALID_PRICE, f"invalid stop-limit price {stoplimit}")

    def _check_pending_price(self, req: TradeRequest, m: Market) -> None:
        self._check_pending(req.type, req.price, req.stoplimit, m)

    def _check_stops(self, sl_price: float, tp_price: float, m: Market, buy: bool, ref_pts: int, level: int) -> None:
        for name, value in (("sl", sl_price), ("tp", tp_price)):
            if value < 0 or not math.isfinite(value):
                raise Reject(Retcode.INVALID_STOPS, f"invalid {name} {value}")
        sl, tp = m.points(sl_price), m.points(tp_price)
        if sl_price > 0 and not (sl <= ref_pts - level if buy else sl >= ref_pts + level):
            raise Reject(Retcode.INVALID_STOPS, f"invalid stops: sl {sl_price} vs {ref_pts * m.spec.point:.{m.spec.digits}f}")
        if tp_price > 0 and not (tp >= ref_pts + level if buy else tp <= ref_pts - level):
            raise Reject(Retcode.INVALID_STOPS, f"invalid stops: tp {tp_price} vs {ref_pts * m.spec.point:.{m.spec.digits}f}")

    def cancel(self, req: CancelRequest) -> TradeResult:
        order = self.orders.get((req.account, req.magic, req.comment))
        if order is None:
            return TradeResult(retcode=int(Retcode.INVALID), comment="order not found", request_comment=req.comment)
        m = self.markets[order.symbol]
        if order.type.is_market and not (order.active and order.volume_filled > EPS):
            return self._result(Retcode.INVALID_ORDER, None, "a market order cannot be removed", m,
                                order=order.ticket, request_comment=req.comment)
        if not order.active:
            return self._result(Retcode.INVALID, None, f"order already {order.state}", m,
                                order=order.ticket, request_comment=req.comment)
        if m.closed:
            return self._result(Retcode.MARKET_CLOSED, None, "market closed", m, order=order.ticket, request_comment=req.comment)
        self._finish(order, "cancelled")
        return self._result(Retcode.DONE, None, "cancelled", m, order=order.ticket, request_comment=req.comment)

    def _on_cancel(self, data: bytes) -> bytes:
        self.stats["cancel_requests"] += 1
        try:
            req = CancelRequest.model_validate_json(data)
        except ValidationError as exc:
            reason, _ = describe_validation_error(exc)
            return to_json(TradeResult(retcode=int(Retcode.INVALID), comment=f"invalid request: {reason}"))
        return to_json(self.cancel(req))

    # ------------------------------------------------------------------ modify
    def modify(self, req: ModifyRequest) -> TradeResult:
        """``TRADE_ACTION_MODIFY`` of a working pending order, or ``TRADE_ACTION_SLTP`` of a
        position (named by ``position``, or the one the filled order's deals went into)."""

        def answer(retcode: Retcode, text: str, m: Market | None = None, ticket: int = 0) -> TradeResult:
            return self._result(retcode, None, text, m, order=ticket, request_comment=req.comment)

        if req.position:
            pos = self._position_by_ticket(req.account, req.position)
            if pos is None:
                return answer(Retcode.POSITION_CLOSED, f"position {req.position} is closed or unknown")
            return self._modify_position(req, pos, answer)
        order = self.orders.get((req.account, req.magic, req.comment))
        if order is None:
            return answer(Retcode.INVALID, "order not found")
        m = self.markets[order.symbol]
        stop_as_market = order.triggered and order.type not in STOP_LIMIT_TYPES
        if order.active and not order.type.is_market and not stop_as_market:
            return self._modify_order(req, order, m, answer)
        if not order.deals:  # final without a deal (cancelled, expired, rejected), or a market order in flight
            return answer(Retcode.INVALID, f"order {order.state}: nothing to modify", m, order.ticket)
        pos = self._position_by_ticket(order.account, order.position)
        if pos is None:
            return answer(Retcode.POSITION_CLOSED, f"the position of order {order.ticket} is closed", m, order.ticket)
        return self._modify_position(req, pos, answer)

    def _modify_order(self, req: ModifyRequest, order: SimOrder, m: Market, answer) -> TradeResult:
        if m.closed:
            return answer(Retcode.MARKET_CLOSED, "market closed", m, order.ticket)
        d = m.spec.digits
        price = order.price if req.price is None else req.price
        stoplimit = order.stoplimit if req.stoplimit is None else req.stoplimit
        sl = order.sl if req.sl is None else req.sl
        tp = order.tp if req.tp is None else req.tp
        same = (round(price, d) == round(order.price, d) and round(stoplimit, d) == round(order.stoplimit, d)
                and round(sl, d) == round(order.sl, d) and round(tp, d) == round(order.tp, d))
        type_time, expiration = order.type_time, order.expiration
        if req.expiration is not None:
            if type_time not in (OrderTime.SPECIFIED, OrderTime.SPECIFIED_DAY):
                type_time = OrderTime.SPECIFIED  # an expiration given to a GTC or DAY order
            try:
                expiration = self._expiration(type_time, req.expiration, m, True)
            except Reject as r:
                return answer(r.retcode, r.text, m, order.ticket)
            same = same and expiration == order.expiration
        if same:
            return answer(Retcode.NO_CHANGES, "no changes", m, order.ticket)
        try:
            if order.triggered:  # a stop-limit whose stop triggered: now a limit at ``stoplimit``
                if round(price, d) != round(order.price, d):
                    raise Reject(Retcode.INVALID_ORDER, "the stop price of a triggered stop-limit cannot change")
                self._check_pending(OrderType.BUY_LIMIT if order.is_buy else OrderType.SELL_LIMIT, stoplimit, 0.0, m)
            else:
                self._check_pending(order.type, price, stoplimit, m)
            self._check_stops(sl, tp, m, order.is_buy, m.points(stoplimit if order.type in STOP_LIMIT_TYPES else price),
                              self.stops_level_points)
        except Reject as r:
            return answer(r.retcode, r.text, m, order.ticket)
        order.price, order.stoplimit, order.sl, order.tp = price, stoplimit, sl, tp
        order.type_time, order.expiration = type_time, expiration
        self.stats["orders_modified"] += 1
        result = answer(Retcode.DONE, "modified", m, order.ticket)
        self._match(order.symbol)  # a modified order may fill at once
        self._check_stop_outs()
        return result

    def _modify_position(self, req: ModifyRequest, pos: Pos, answer) -> TradeResult:
        m = self.markets[pos.symbol]
        if req.price is not None or req.stoplimit is not None or req.expiration is not None:
            return answer(Retcode.INVALID_ORDER, "only the SL/TP of a position can change", m, pos.ticket)
        if m.closed:
            return answer(Retcode.MARKET_CLOSED, "market closed", m, pos.ticket)
        d = m.spec.digits
        sl = pos.sl if req.sl is None else req.sl
        tp = pos.tp if req.tp is None else req.tp
        if round(sl, d) == round(pos.sl, d) and round(tp, d) == round(pos.tp, d):
            return answer(Retcode.NO_CHANGES, "no changes", m, pos.ticket)
        try:  # against the price the position closes at: the bid for a long, the ask for a short
            self._check_stops(sl, tp, m, pos.long, m.points(m.bid if pos.long else m.ask), self.stops_level_points)
        except Reject as r:
            return answer(r.retcode, r.text, m, pos.ticket)
        pos.sl, pos.tp = sl, tp
        self.stats["positions_modified"] += 1
        result = answer(Retcode.DONE, "position modified", m, pos.ticket)
        self._match(pos.symbol)
        self._check_stop_outs()
        return result

    def _on_modify(self, data: bytes) -> bytes:
        self.stats["modify_requests"] += 1
        try:
            req = ModifyRequest.model_validate_json(data)
        except ValidationError as exc:
            reason, _ = describe_validation_error(exc)
            return to_json(TradeResult(retcode=int(Retcode.INVALID), comment=f"invalid request: {reason}"))
        return to_json(self.modify(req))

    # ------------------------------------------------------------------ queries
    def status(self, q: StatusQuery) -> OrderStatus:
        key = (q.account, q.magic, q.comment)
        order = self.orders.get(key)
        if order is not None:
            return order.status()
        rejection = self.rejections.get(key)
        if rejection is not None:
            return rejection.status()
        return OrderStatus(known=False, magic=q.magic, comment=q.comment, account=q.account)

    def _on_status(self, data: bytes) -> bytes | None:
        self.stats["status_requests"] += 1
        if self.faults.drop_status > 0:
            self.faults.drop_status -= 1
            self.stats["dropped_status"] += 1
            log.info("drop_status: status query unanswered")
            return None
        try:
            q = StatusQuery.model_validate_json(data)
        except ValidationError as exc:
            return to_json(ErrorReply(error=describe_validation_error(exc)[0]))
        return to_json(self.status(q))

    def snapshot(self, account: str | None = None, magic: int | None = None) -> PositionsSnapshot:
        with_deals = "deals" in c.BrokerPositionModel.model_fields  # a newer contract lists them
        out = []
        for key, p in sorted(self.positions.items()):
            if abs(p.net) <= EPS or (account is not None and p.account != account) or (magic is not None and p.magic != magic):
                continue
            extra = {"deals": list(p.deals)} if with_deals else {}
            out.append(c.BrokerPositionModel(
                account=p.account, symbol=p.symbol, net_volume=p.net,
                avg_price=round(p.avg, 8) if p.avg is not None else None,
                magic=p.magic, ticket=p.ticket, sl=p.sl, tp=p.tp, **extra,
            ))
        return PositionsSnapshot(positions=out, at=utcnow())

    def _on_positions(self, data: bytes) -> bytes:
        try:
            q = PositionsQuery.model_validate_json(data or b"{}")
        except ValidationError as exc:
            return to_json(ErrorReply(error=describe_validation_error(exc)[0]))
        return to_json(self.snapshot(q.account, q.magic))

    # ------------------------------------------------------------------ stats and control
    def stats_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "requests": s["requests"],
            "orders": s["orders"],
            "by_comment": dict(self.by_comment),
            "executed": dict(self.executed),
            "deals": s["deals"],
            "published": self.published_total,  # since start (not reset)
            "unpublished": self.unpublished,  # made, not yet acknowledged by JetStream
            "rejected": s["rejected"],
            "deduped": s["deduped"],
            "dropped_replies": s["dropped_replies"],
            "dropped_unprocessed": s["dropped_unprocessed"],
            "open_orders": len(self.active),
            "ticks": self.ticks,
            "other": {k: v for k, v in s.items() if k not in {
                "requests", "orders", "deals", "rejected", "deduped", "dropped_replies", "dropped_unprocessed"}},
        }

    def _on_stats(self, data: bytes) -> bytes:
        return orjson.dumps(self.stats_dict())

    def _on_control(self, data: bytes) -> bytes:
        try:
            cmd = orjson.loads(data)
            if not isinstance(cmd, dict) or not isinstance(cmd.get("cmd"), str):
                raise ValueError('expected {"cmd": "...", ...}')
            out = self.control(cmd)
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            return orjson.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return orjson.dumps({"ok": True, **out})

    def _market(self, cmd: dict) -> Market:
        symbol = cmd.get("symbol")
        if symbol not in self.markets:
            raise ValueError(f"unknown symbol {symbol!r}")
        return self.markets[symbol]

    def _markets(self, cmd: dict) -> list[Market]:
        return [self._market(cmd)] if cmd.get("symbol") else list(self.markets.values())

    def manual_trade(self, account: str, symbol: str, side: str, volume: float, magic: int = 0,
                     comment: str = "") -> list[DealEvent]:
        """A trade made by hand at the terminal: a deal at the touch with reason ``client``,
        netted into the ``(account, symbol, magic)`` position and published like any deal.

        A deal that reduces that position carries the comment of the order that opened it;
        one that opens a position carries ``comment``; a reversal is made of both."""
        m = self.markets.get(symbol)
        if m is None:
            raise ValueError(f"unknown symbol {symbol!r}")
        if m.closed:
            raise ValueError(f"market closed for {symbol}")
        if side not in ("buy", "sell"):
            raise ValueError(f"side must be buy or sell, got {side!r}")
        if magic < 0:
            raise ValueError("magic must not be negative")
        try:
            self._check_volume(volume)
        except Reject as r:
            raise ValueError(r.text) from None
        buy = side == "buy"
        volume = _r8(volume)
        comment = comment[: c.MAX_COMMENT]  # MT5 truncates a longer comment
        order = SimOrder(
            ticket=self._ticket(), request_id=0, account=account, magic=magic, comment=comment, symbol=symbol,
            type=OrderType.BUY if buy else OrderType.SELL, volume_initial=volume, price=0.0, stoplimit=0.0,
            sl=0.0, tp=0.0, deviation=0, expiration=None, state="placed", retcode=int(Retcode.DONE), reason="client",
        )
        self.broker_orders[order.ticket] = order
        self.stats["manual_trades"] += 1
        price = self._touch(m, buy)
        pos = self.positions.get((account, symbol, magic))
        legs: list[tuple[float, str, Pos | None]] = []
        if pos is not None and abs(pos.net) > EPS and pos.long != buy:
            # An exit of that position: routed to the order that opened it.  A reversal is
            # two deals: an out that closes the position, an in that opens the new one.
            closing = min(volume, abs(pos.net))
            legs.append((closing, pos.comment, pos))
            if volume > closing + EPS:
                legs.append((_r8(volume - closing), comment, None))
        else:
            legs.append((volume, comment, None))
        for leg_volume, order_id, target in legs:
            ev = self._book(account=account, symbol=symbol, magic=magic, buy=buy, volume=leg_volume, price=price,
                            order_id=order_id, ticket=order.ticket, reason="client", pos=target)
            order.deals.append(ev)
            order.position = ev.position or 0
            order.volume_filled = _r8(order.volume_filled + ev.volume)
            order.notional += ev.price * ev.volume
        order.state = "filled"
        self._check_stop_outs()
        return order.deals

    def control(self, cmd: dict) -> dict[str, Any]:
        """Apply a control command (see ``CONTRACT.md``); returns extra reply fields."""
        name = cmd["cmd"]
        if name == "receipts":  # asked in bulk by the latency benchmark: do not log thousands of ids
            log.debug("control: receipts for %s comments", len(cmd.get("comments") or ()) or "all")
        else:
            log.info("control: %s", cmd)
        if name == "set_price":
            m = self._market(cmd)
            spread = m.spread_points * m.spec.point
            d = m.spec.digits
            if cmd.get("bid") is not None and cmd.get("ask") is not None:
                bid, ask = float(cmd["bid"]), float(cmd["ask"])
            elif cmd.get("bid") is not None:
                bid = float(cmd["bid"])
                ask = bid + spread
            elif cmd.get("ask") is not None:
                ask = float(cmd["ask"])
                bid = ask - spread
            elif cmd.get("mid") is not None:
                bid = float(cmd["mid"]) - spread / 2
                ask = bid + spread
            else:
                raise ValueError("set_price needs bid, ask or mid")
            bid, ask = round(bid, d), round(ask, d)
            if not (0 < bid <= ask):
                raise ValueError(f"bad quote {bid}/{ask}")
            m.bid, m.ask = bid, ask
            m.mid = (bid + ask) / 2
            m.held = bool(cmd.get("hold", m.held))
            self._match(m.spec.symbol)
            self._check_stop_outs()
            return {"symbol": m.spec.symbol, "bid": m.bid, "ask": m.ask, "held": m.held}
        if name == "release":
            for m in self._markets(cmd):
                m.held = False
            return {}
        if name == "quote":
            m = self._market(cmd)
            return {"symbol": m.spec.symbol, "bid": m.bid, "ask": m.ask, "held": m.held, "closed": m.closed,
                    "digits": m.spec.digits, "point": m.spec.point}
        if name == "reject_next":
            retcode = int(cmd["retcode"])
            count = int(cmd.get("count", 1))
            self.faults.reject_next.extend([(retcode, bool(cmd.get("execute", False)))] * count)
            return {"pending": len(self.faults.reject_next)}
        if name == "drop_replies":
            self.faults.drop_replies += int(cmd.get("count", 1))
            return {"pending": self.faults.drop_replies}
        if name == "drop_unprocessed":
            self.faults.drop_unprocessed += int(cmd.get("count", 1))
            return {"pending": self.faults.drop_unprocessed}
        if name == "drop_status":
            self.faults.drop_status += int(cmd.get("count", 1))
            return {"pending": self.faults.drop_status}
        if name == "reset_faults":
            self.faults = Faults()
            return {}
        if name == "set_position":
            account, symbol = str(cmd["account"]), str(cmd["symbol"])
            self._market(cmd)
            magic = cmd.get("magic")
            if magic is None:  # the position of that account and symbol, if there is exactly one
                same = [p for p in self.positions.values() if p.account == account and p.symbol == symbol]
                magic = same[0].magic if len(same) == 1 else 0
            magic = int(magic)
            key = (account, symbol, magic)
            net = float(cmd.get("net_volume", 0.0))
            avg = cmd.get("avg_price")
            if abs(net) <= EPS:
                self.positions.pop(key, None)
                return {"magic": magic, "ticket": 0}
            pos = self.positions.get(key)
            if pos is None:
                pos = Pos(account, symbol, magic, ticket=self._ticket(), comment=str(cmd.get("comment", ""))[: c.MAX_COMMENT])
                self.positions[key] = pos
            pos.net = _r8(net)
            pos.avg = float(avg) if avg is not None else self.markets[symbol].bid
            if cmd.get("sl") is not None:
                pos.sl = float(cmd["sl"])
            if cmd.get("tp") is not None:
                pos.tp = float(cmd["tp"])
            return {"magic": magic, "ticket": pos.ticket}
        if name == "manual_trade":
            deals = self.manual_trade(
                str(cmd["account"]), str(cmd["symbol"]), str(cmd.get("side", "")), float(cmd["volume"]),
                int(cmd.get("magic", 0)), str(cmd.get("comment", "")),
            )
            return {"order": deals[0].ticket, "deals": [to_dict(d) for d in deals]}
        if name in ("close_market", "open_market"):
            for m in self._markets(cmd):
                m.closed = name == "close_market"
            return {}
        if name == "set_margin":
            lots = float(cmd["lots"])
            if cmd.get("account"):
                self.margin[str(cmd["account"])] = lots
            else:
                self.margin_limit_lots = lots
            return {}
        if name == "set_balance":
            balance = float(cmd["balance"])
            if not math.isfinite(balance):
                raise ValueError("balance must be a finite number")
            if cmd.get("account"):
                self.balances[str(cmd["account"])] = balance
            else:
                self.balance = balance
            self._check_stop_outs()
            return {}
        if name == "set_stop_out":
            if cmd.get("enabled") is not None:
                self.enable_stop_out = bool(cmd["enabled"])
            if cmd.get("level") is not None:
                level = float(cmd["level"])
                if not (math.isfinite(level) and level >= 0):
                    raise ValueError("stop-out level must be a number >= 0")
                self.stop_out_level = level
            if cmd.get("leverage") is not None:
                leverage = float(cmd["leverage"])
                if not (math.isfinite(leverage) and leverage > 0):
                    raise ValueError("leverage must be positive")
                self.leverage = leverage
            self._check_stop_outs()
            return {"enabled": self.enable_stop_out, "level": self.stop_out_level, "leverage": self.leverage}
        if name == "account":
            return self.account_state(str(cmd["account"]))
        if name == "set_liquidity":
            lots = float(cmd["lots"])
            if lots <= 0:
                raise ValueError("liquidity must be positive")
            self.liquidity_lots = lots
            return {}
        if name == "set_tick_interval":  # a slower broker: expiries, triggers and SL/TP come later
            interval = float(cmd["seconds"])
            if not interval > 0:
                raise ValueError("set_tick_interval: seconds must be positive")
            self.tick_interval = interval
            return {}
        if name == "set_sl_tp":
            self.enable_sl_tp = bool(cmd.get("enabled", True))
            return {}
        if name == "receipts":
            wanted = cmd.get("comments")
            if wanted is None:
                return {"received": dict(self.received)}
            if not isinstance(wanted, list):
                raise ValueError("receipts: comments must be a list")
            return {"received": {c_: self.received[c_] for c_ in map(str, wanted) if c_ in self.received}}
        if name == "reset":
            self._init_state()
            return {}
        raise ValueError(f"unknown command {name!r}")


# --------------------------------------------------------------------------------------
# Helpers and the ``execution sim`` entry point
# --------------------------------------------------------------------------------------


async def control(nc, timeout: float = 5.0, **cmd: Any) -> dict[str, Any]:
    """Send a control command to a running simulator: ``await control(nc, cmd="reset")``."""
    msg = await nc.request(c.CONTROL, orjson.dumps(cmd), timeout=timeout)
    return orjson.loads(msg.data)


async def stats(nc, timeout: float = 5.0) -> dict[str, Any]:
    msg = await nc.request(c.STATS, b"{}", timeout=timeout)
    return orjson.loads(msg.data)


def _env_options(environ: Mapping[str, str]) -> dict[str, Any]:
    """Simulator knobs from ``EXECUTION_SIM_*`` environment variables."""
    kinds = {
        "liquidity_lots": float, "tick_interval": float, "volatility_pips": float, "mean_reversion": float,
        "spread_pips": float, "stops_level_points": int, "max_slippage_points": int, "margin_limit_lots": float,
        "balance": float, "leverage": float, "stop_out_level": float,
    }
    out: dict[str, Any] = {}
    for name, kind in kinds.items():
        raw = environ.get(f"EXECUTION_SIM_{name.upper()}")
        if raw:
            out[name] = kind(raw)
    for name in ("enable_sl_tp", "enable_stop_out", "hold_prices"):  # a flag is on if set to 1/true/yes/on
        raw = environ.get(f"EXECUTION_SIM_{name.upper()}")
        if raw:
            out[name] = raw.strip().lower() in ("1", "true", "yes", "on")
    return out


async def run_simulator(settings, seed: int = 7, **options: Any) -> None:
    """Run the simulator until SIGTERM/SIGINT (``execution sim``), then drain its outbox."""
    opts = {**_env_options(os.environ), **options}
    connect = settings.nats_options()
    connect.pop("servers", None)
    sim = BrokerSimulator(settings.nats_url, seed=seed, symbols=SymbolTable.from_env(),
                          connect_options=connect, **opts)
    await sim.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: stopping the simulator")
    await sim.stop()
