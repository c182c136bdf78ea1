"""A broker simulator that implements the MT5 connector contract (``CONTRACT.md``).

What it does, like an MT5 trade server behind a connector:

* quotes every symbol of the :class:`~tables.symbols.SymbolTable` with a seeded,
  mean-reverting random walk (Ornstein-Uhlenbeck around the start price, in pips), a spread,
  and the symbol's digits, ticking every ``tick_interval`` seconds;
* fills market orders at the touch (buy at the ask, sell at the bid) with slippage bounded
  by ``deviation``, requotes (10004) when the price moved beyond ``deviation``, and fills
  orders above ``liquidity_lots`` in several deals (10010 first, the rest over the next
  ticks);
* places limit, stop and stop-limit orders (10008) and triggers them from the price path;
* rejects with the MT5 retcodes (10013 unknown symbol / bad request, 10014 volume, 10015
  price, 10016 stops, 10018 market closed, 10019 no money, 10022 expiration, 10035 order
  type);
* dedupes submissions on ``(account, magic, comment)``: a resend of an accepted order
  returns the first result and is never executed again;
* nets positions per ``(account, symbol)`` with an average price;
* publishes every deal to JetStream (stream ``MT5_FILLS``) with ``Nats-Msg-Id`` =
  ``deal-{deal}``, from an outbox that retries until JetStream acknowledges;
* obeys control commands on ``mt5.sim.control`` (forced prices, injected rejects, lost
  replies, lost requests, position discrepancies, closed markets) and reports statistics
  on ``mt5.sim.stats``;
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
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import nats
import orjson
from pydantic import ValidationError

from app.models import MAX_LOTS, describe_validation_error, to_json, utcnow
from app.mt5 import contract as c
from app.mt5.contract import (
    CancelRequest,
    DealEvent,
    ErrorReply,
    OrderStatus,
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
EPS = 1e-9

Key = tuple[str, int, str]  # (account, magic, comment)


def _r8(x: float) -> float:
    return round(x, 8)


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
    net: float = 0.0
    avg: float | None = None
    sl: float = 0.0
    tp: float = 0.0
    sltp_comment: str = ""
    magic: int = 0


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
        enable_sl_tp: bool = False,
        ticket_base: int | None = None,
        connect_options: Mapping[str, Any] | None = None,
        drain_timeout: float = 10.0,
    ) -> None:
        if liquidity_lots <= 0 or tick_interval <= 0:
            raise ValueError("liquidity_lots and tick_interval must be positive")
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
            m = Market(spec, start, start, spread, random.Random(f"{self.seed}:price:{name}"))
            m.quote()
            self.markets[name] = m
        self.slip_rng = random.Random(f"{self.seed}:slippage")
        self.orders: dict[Key, SimOrder] = {}
        self.rejections: dict[Key, Rejection] = {}
        self.active: dict[int, SimOrder] = {}  # ticket -> order not yet final
        self.positions: dict[tuple[str, str], Pos] = {}
        self.margin: dict[str, float] = {}  # per-account override of margin_limit_lots
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
        delay = 0.1
        for attempt in range(50):
            try:
                await ensure_stream(self.js, c.FILLS_STREAM, [c.FILLS_SUBJECTS])
                break
            except Exception as exc:  # JetStream not ready yet right after the server starts
                if attempt == 49:
                    raise
                log.info("JetStream not ready (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        self._outbox = asyncio.Queue()
        handlers = {
            c.SUBMIT: self._on_submit, c.CANCEL: self._on_cancel, c.STATUS: self._on_status,
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
            delay = 0.05
            while True:
                try:
                    await self.js.publish(subject, data, timeout=2.0, headers=headers)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # NATS down, stream gone, no ack: retry, never drop
                    self.stats["publish_retries"] += 1
                    log.warning("deal %s not acknowledged (%s); retrying in %.2fs", ev.deal, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    try:
                        await ensure_stream(self.js, c.FILLS_STREAM, [c.FILLS_SUBJECTS])
                    except Exception:
                        pass
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
        """One step of every price path, then matching of the working orders."""
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
        for name, m in self.markets.items():
            if m.closed:
                continue
            if not m.held:
                shock = m.rng.gauss(0.0, 1.0)
                m.mid = m.start + (m.mid - m.start) * decay + self.volatility_pips * m.spec.pip_size * scale * shock
                m.mid = max(m.mid, m.spec.point * (m.spread_points + 1))
                m.quote()
            if name in working or self.enable_sl_tp:
                self._match(name, working.get(name, []))

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
        """Trigger and fill the symbol's working orders against its quote, in ticket order."""
        m = self.markets[symbol]
        if m.closed:
            return
        if orders is None:
            orders = [o for o in self.active.values() if o.symbol == symbol]
        now = utcnow()
        for order in sorted(orders, key=lambda o: o.ticket):
            if not order.active:
                continue
            buy = order.is_buy
            if order.type.is_market:
                self._fill(order, m, self._touch(m, buy))
                continue
            if order.expiration is not None and now >= order.expiration:
                self._finish(order, "expired")
                continue
            t = order.type
            if t in (OrderType.BUY_STOP, OrderType.SELL_STOP):
                if not order.triggered and (m.ask >= order.price if buy else m.bid <= order.price):
                    order.triggered = True  # now a market order
                if order.triggered:
                    self._fill(order, m, self._touch(m, buy))
                continue
            if t in (OrderType.BUY_STOP_LIMIT, OrderType.SELL_STOP_LIMIT) and not order.triggered:
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
                self._check_margin(order.account, order.symbol, order.is_buy, order.volume_initial)
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
    def _deal(self, order: SimOrder, m: Market, volume: float, price: float) -> DealEvent:
        volume = _r8(volume)
        price = round(price, m.spec.digits)
        entry = self._apply_position(order.account, order.symbol, volume if order.is_buy else -volume, price)
        ev = DealEvent(
            order_id=order.comment, deal=self._deal_ticket(), ticket=order.ticket, symbol=order.symbol,
            side=order.type.side, price=price, volume=volume, time=utcnow(),
            account=order.account, magic=order.magic, entry=entry,
        )
        order.deals.append(ev)
        order.volume_filled = _r8(order.volume_filled + volume)
        order.notional += price * volume
        if order.remaining <= EPS:
            self._finish(order, "filled")
        else:
            order.state = "partially_filled"
        if self.enable_sl_tp and (order.sl or order.tp) and entry != "out":
            pos = self.positions[(order.account, order.symbol)]
            pos.sl, pos.tp, pos.sltp_comment, pos.magic = order.sl, order.tp, order.comment, order.magic
        self._emit(ev)
        return ev

    def _emit(self, ev: DealEvent) -> None:
        self.stats["deals"] += 1
        if self._outbox is not None:
            self.unpublished += 1
            self._outbox.put_nowait(ev)

    def _apply_position(self, account: str, symbol: str, signed: float, price: float) -> str:
        """Net a deal into the position; the deal's entry: in, out or inout (a reversal)."""
        pos = self.positions.setdefault((account, symbol), Pos())
        net = pos.net
        new = _r8(net + signed)
        if abs(net) <= EPS or (net > 0) == (signed > 0):
            pos.avg = (abs(net) * (pos.avg or 0.0) + abs(signed) * price) / abs(new)
            entry = "in"
        elif abs(signed) <= abs(net) + EPS:
            entry = "out"
            if abs(new) <= EPS:
                new, pos.avg = 0.0, None
        else:
            pos.avg = price
            entry = "inout"
        pos.net = new
        if abs(new) <= EPS:
            pos.net, pos.avg, pos.sl, pos.tp = 0.0, None, 0.0, 0.0
        return entry

    def _check_sl_tp(self, m: Market) -> None:
        symbol = m.spec.symbol
        for (account, sym), pos in list(self.positions.items()):
            if sym != symbol or abs(pos.net) <= EPS or not (pos.sl or pos.tp):
                continue
            long = pos.net > 0
            px = m.bid if long else m.ask
            which = None
            if pos.sl and (px <= pos.sl if long else px >= pos.sl):
                which = "sl"
            elif pos.tp and (px >= pos.tp if long else px <= pos.tp):
                which = "tp"
            if which is None:
                continue
            # The closing deal belongs to a broker-made order, not to ours: its own id.
            comment = f"{pos.sltp_comment}:{which}"
            closer = SimOrder(
                ticket=self._ticket(), request_id=0, account=account, magic=pos.magic, comment=comment,
                symbol=symbol, type=OrderType.SELL if long else OrderType.BUY, volume_initial=abs(pos.net),
                price=0.0, stoplimit=0.0, sl=0.0, tp=0.0, deviation=0, expiration=None, state="placed",
                retcode=int(Retcode.DONE),
            )
            closer.result = TradeResult(retcode=int(Retcode.DONE), order=closer.ticket, comment=f"closed by {which}",
                                        request_comment=comment)
            self.orders[closer.key] = closer
            self.stats[f"closed_by_{which}"] += 1
            while closer.remaining > EPS:
                self._deal(closer, m, min(closer.remaining, MAX_LOTS), px)

    def _gross(self, account: str) -> float:
        return sum(abs(p.net) for (a, _), p in self.positions.items() if a == account)

    def _check_margin(self, account: str, symbol: str, buy: bool, volume: float) -> None:
        """Margin as gross open lots per account: refuse an order that would raise the
        account's gross exposure above its limit."""
        limit = self.margin.get(account, self.margin_limit_lots)
        pos = self.positions.get((account, symbol))
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
        if execute_as is not None:
            return self._result(execute_as, req, f"injected retcode {execute_as} (order executed)", m)
        return result

    def _execute(self, req: TradeRequest, key: Key) -> TradeResult:
        t = req.type
        if req.action is TradeAction.DEAL:
            if not t.is_market:
                raise Reject(Retcode.INVALID_ORDER, f"order type {t.name} is not a market order")
        elif req.action is TradeAction.PENDING:
            if t not in PENDING_TYPES:
                raise Reject(Retcode.INVALID_ORDER, f"order type {t.name} is not a pending order")
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
        if t.is_market:
            ref_pts = m.points(m.bid if buy else m.ask)  # a buy position closes at the bid
        else:
            if req.type_time in (c.OrderTime.SPECIFIED, c.OrderTime.SPECIFIED_DAY):
                exp = req.expiration
                if exp is None or (exp if exp.tzinfo else exp.replace(tzinfo=UTC)) <= utcnow():
                    raise Reject(Retcode.INVALID_EXPIRATION, "expiration missing or in the past")
            self._check_pending_price(req, m)
            ref_pts = m.points(req.stoplimit if t in (OrderType.BUY_STOP_LIMIT, OrderType.SELL_STOP_LIMIT) else req.price)
        self._check_stops(req, m, buy, ref_pts, level)
        self._check_margin(req.account, req.symbol, buy, req.volume)
        if t.is_market and req.price > 0:
            touch = self._touch(m, buy)
            if abs(m.points(touch) - m.points(req.price)) > req.deviation:
                raise Reject(Retcode.REQUOTE, f"requote: {touch} is {abs(touch - req.price) / point:.0f} points from {req.price}")
        expiration = req.expiration if req.type_time in (c.OrderTime.SPECIFIED, c.OrderTime.SPECIFIED_DAY) else None
        if expiration is not None and expiration.tzinfo is None:
            expiration = expiration.replace(tzinfo=UTC)
        order = SimOrder(
            ticket=self._ticket(), request_id=self._next_request, account=req.account, magic=req.magic,
            comment=req.comment, symbol=req.symbol, type=t, volume_initial=_r8(req.volume), price=req.price,
            stoplimit=req.stoplimit, sl=req.sl, tp=req.tp, deviation=req.deviation, expiration=expiration,
            state="placed",
        )
        self.orders[key] = order
        self.rejections.pop(key, None)
        self.active[order.ticket] = order
        self.stats["orders"] += 1
        self.executed[req.comment] += 1
        if t.is_market:
            price = self._slipped(m, buy, req.deviation, req.price)
            ev = self._deal(order, m, min(order.volume_initial, self.liquidity_lots), price)
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

    def _check_pending_price(self, req: TradeRequest, m: Market) -> None:
        t, level = req.type, self.stops_level_points
        if req.price <= 0 or not math.isfinite(req.price):
            raise Reject(Retcode.INVALID_PRICE, f"invalid price {req.price}")
        p, bid, ask = m.points(req.price), m.points(m.bid), m.points(m.ask)
        ok = {
            OrderType.BUY_LIMIT: p <= ask - level,
            OrderType.SELL_LIMIT: p >= bid + level,
            OrderType.BUY_STOP: p >= ask + level,
            OrderType.SELL_STOP: p <= bid - level,
            OrderType.BUY_STOP_LIMIT: p >= ask + level,
            OrderType.SELL_STOP_LIMIT: p <= bid - level,
        }[t]
        if not ok:
            raise Reject(Retcode.INVALID_PRICE, f"invalid price {req.price} for a {t.name} at {m.bid}/{m.ask}")
        if t in (OrderType.BUY_STOP_LIMIT, OrderType.SELL_STOP_LIMIT) and (req.stoplimit <= 0 or not math.isfinite(req.stoplimit)):
            raise Reject(Retcode.INVALID_PRICE, f"invalid stop-limit price {req.stoplimit}")

    def _check_stops(self, req: TradeRequest, m: Market, buy: bool, ref_pts: int, level: int) -> None:
        for name, value in (("sl", req.sl), ("tp", req.tp)):
            if value < 0 or not math.isfinite(value):
                raise Reject(Retcode.INVALID_STOPS, f"invalid {name} {value}")
        sl, tp = m.points(req.sl), m.points(req.tp)
        if req.sl > 0 and not (sl <= ref_pts - level if buy else sl >= ref_pts + level):
            raise Reject(Retcode.INVALID_STOPS, f"invalid stops: sl {req.sl} vs {ref_pts * m.spec.point:.{m.spec.digits}f}")
        if req.tp > 0 and not (tp >= ref_pts + level if buy else tp <= ref_pts - level):
            raise Reject(Retcode.INVALID_STOPS, f"invalid stops: tp {req.tp} vs {ref_pts * m.spec.point:.{m.spec.digits}f}")

    def cancel(self, req: CancelRequest) -> TradeResult:
        order = self.orders.get((req.account, req.magic, req.comment))
        if order is None:
            return TradeResult(retcode=int(Retcode.INVALID), comment="order not found", request_comment=req.comment)
        m = self.markets[order.symbol]
        if order.type.is_market:
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

    def snapshot(self, account: str | None = None) -> PositionsSnapshot:
        out = [
            c.BrokerPositionModel(account=a, symbol=s, net_volume=p.net, avg_price=round(p.avg, 8) if p.avg is not None else None)
            for (a, s), p in sorted(self.positions.items())
            if abs(p.net) > EPS and (account is None or a == account)
        ]
        return PositionsSnapshot(positions=out, at=utcnow())

    def _on_positions(self, data: bytes) -> bytes:
        try:
            q = PositionsQuery.model_validate_json(data or b"{}")
        except ValidationError as exc:
            return to_json(ErrorReply(error=describe_validation_error(exc)[0]))
        return to_json(self.snapshot(q.account))

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
            net = float(cmd.get("net_volume", 0.0))
            avg = cmd.get("avg_price")
            if abs(net) <= EPS:
                self.positions.pop((account, symbol), None)
            else:
                pos = self.positions.setdefault((account, symbol), Pos())
                pos.net = _r8(net)
                pos.avg = float(avg) if avg is not None else self.markets[symbol].bid
            return {}
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
        if name == "set_liquidity":
            lots = float(cmd["lots"])
            if lots <= 0:
                raise ValueError("liquidity must be positive")
            self.liquidity_lots = lots
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
    }
    out: dict[str, Any] = {}
    for name, kind in kinds.items():
        raw = environ.get(f"EXECUTION_SIM_{name.upper()}")
        if raw:
            out[name] = kind(raw)
    raw = environ.get("EXECUTION_SIM_ENABLE_SL_TP")
    if raw:
        out["enable_sl_tp"] = raw.strip().lower() in ("1", "true", "yes", "on")
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
