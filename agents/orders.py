"""The orders agent: the single writer of ``orders``, ``signal_orders`` and ``open_orders``.

It consumes three co-partitioned topics, a batch of records at a time
(:func:`agents.common.process_batch`: outputs acked, then tables written, then submissions
started):

* ``signals.approved`` (key signal_id): decode, dedupe, create the order (PENDING), start
  its submission;
* ``fills`` (key order_id): the join of the broker's fills with the ``orders`` table;
* ``orders.commands`` (key order_id or signal_id): the connector's replies, the broker's
  answers to status queries, and expiries of ``signal_orders``, fed back by the submitter
  tasks and the timers (Faust lets only an agent write a table).

Submissions run as tasks beside the agent so the agent never waits on the broker; their
results come back as commands.  All decisions are made by the pure logic in ``tables/``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta
from typing import Any

import faust

from agents.common import (
    BadInput,
    Batch,
    Context,
    Out,
    process_batch,
    send_all,
    until_done,
)
from app.models import (
    ApprovedSignal,
    CommandKind,
    DecodeError,
    EventType,
    Fill,
    Order,
    OrderCommand,
    OrderState,
    from_json,
    position_key,
    to_json,
    utcnow,
)
from app.mt5.contract import NoReply, Outcome, TradeRequest, classify
from app.topics import (
    EXECUTIONS,
    FILLS,
    FILLS_DLQ,
    ORDER_EXECUTION_ARCHIVE,
    SLIPPAGE_ALERTS,
    ORDERS_COMMANDS,
    ORDERS_STATUS,
    SIGNALS_APPROVED,
    SIGNALS_DLQ,
)
from tables import order_state
from tables.fills import apply_fill
from tables.idempotency import SignalSeen, expired_keys, order_id_for
from tables.order_types import (
    MAGIC,
    check_enabled,
    comment_for,
    resolve_order_type,
    trade_request_fields,
)
from tables.submission import on_broker_status, on_submit_result
from tables.symbols import UnknownSymbol

log = logging.getLogger(__name__)

INPUTS = (SIGNALS_APPROVED, FILLS, ORDERS_COMMANDS)
DLQ_FOR = {SIGNALS_APPROVED: SIGNALS_DLQ, FILLS: FILLS_DLQ, ORDERS_COMMANDS: SIGNALS_DLQ}
#: Bound on concurrent submissions in flight from one worker (backpressure on the agent).
MAX_IN_FLIGHT = 256


def transition_outputs(t: order_state.Transition) -> list[Out]:
    """The audit record of a transition and, when applied, the order's new snapshot."""
    out: list[Out] = [(ORDER_EXECUTION_ARCHIVE, t.event.order_id, to_json(t.event), None)]
    if t.applied:
        out.append((ORDERS_STATUS, t.order.order_id, to_json(t.order), None))
    return out


class OrdersAgent:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.rt = ctx.rt
        self.t = ctx.tables
        self.in_flight: dict[str, asyncio.Task] = {}
        self.slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        #: order_id -> monotonic time of the last status check (stuck orders).
        self.checked: dict[str, float] = {}
        #: order_id -> monotonic time its submission's answer was sent to orders.commands:
        #: the answer is durable and the agent will apply it, so a backlog in front of it
        #: is no reason to resume the submission (which would ask the broker again).
        self.answered: dict[str, float] = {}

    # ------------------------------------------------------------------ dispatch
    def handle(self, event: faust.EventT, b: Batch) -> None:
        topic = event.message.topic
        if topic == SIGNALS_APPROVED:
            self.on_signal(event.value, b, f"{event.message.partition}-{event.message.offset}")
        elif topic == FILLS:
            self.on_fill(event.value, b)
        else:
            self.on_command(event.value, b)

    # ------------------------------------------------------------------ signals
    def on_signal(self, raw: bytes, b: Batch, where: str = "") -> None:
        try:
            signal = from_json(ApprovedSignal, raw)
        except DecodeError as exc:
            raise BadInput(exc.reason) from None
        if signal.symbol not in self.rt.symbols:
            raise BadInput(f"symbol: unknown symbol {signal.symbol!r}")
        cfg = self.rt.config
        now = utcnow()
        order_id = order_id_for(signal.signal_id, self.rt.settings.topic_partitions)
        existing: Order | None = b.get(self.t.orders, order_id)
        seen: SignalSeen | None = b.get(self.t.signal_orders, signal.signal_id)
        if existing is not None:
            # The same signal again (redelivery, replay, a resend upstream): one order, ever.
            self.rt.metrics.inc("duplicate_signals")
            event = order_state.record(
                existing, EventType.DUPLICATE_SIGNAL, now, reason="signal already has an order",
                detail={"first_seen": seen.first_seen.isoformat() if seen else None},
                discriminator=where,  # each delivery is its own record; a replay of one is not
            )
            b.emit((ORDER_EXECUTION_ARCHIVE, order_id, to_json(event), None))
            if existing.state is OrderState.PENDING:
                b.later(lambda: self.start_submission(existing, resume=True))
            return
        order_type = resolve_order_type(signal, cfg.order_defaults)
        created = order_state.create_order(signal, order_id, order_type, now)
        outputs = transition_outputs(created)
        order = created.order
        refusal = check_enabled(order_type, cfg.order_defaults)
        if refusal:
            rejected = order_state.apply(order, EventType.REJECTED, now, reason=refusal)
            outputs += transition_outputs(rejected)
            order = rejected.order
        b.emit(*outputs)
        b.put(self.t.orders, order_id, order)
        b.put(self.t.signal_orders, signal.signal_id, SignalSeen(order_id=order_id, first_seen=now))
        self.rt.metrics.inc("orders_created", order_type=order_type.value)
        if order.state is OrderState.PENDING:
            b.put(self.t.open_orders, order_id, now.isoformat().encode())
            b.later(lambda: self.start_submission(order, resume=False))

    # ------------------------------------------------------------------ fills
    def on_fill(self, raw: bytes, b: Batch) -> None:
        try:
            fill = from_json(Fill, raw)
        except DecodeError as exc:
            raise BadInput(exc.reason) from None
        order: Order | None = b.get(self.t.orders, fill.order_id)
        if order is None:
            self.rt.metrics.inc("unknown_fills")
            raise BadInput(f"order_id: unknown order {fill.order_id!r} (deal {fill.deal})")
        self.apply_deal(order, fill, b)

    def apply_deal(self, order: Order, fill: Fill, b: Batch) -> Order:
        """Apply one broker deal to ``order`` (from the fills stream, or reported by the broker
        in a status answer: a deal that never reached us is recovered there); returns the order."""
        now = utcnow()
        cfg = self.rt.config
        try:
            r = apply_fill(order, fill, self.rt.symbols, now, alert_threshold_pips=cfg.fill_tracking.slippage_alert_threshold_pips)
        except UnknownSymbol as exc:
            raise BadInput(f"symbol: {exc}") from None
        if r.is_duplicate:
            self.rt.metrics.inc("duplicate_fills")
            return order
        outputs: list[Out] = []
        if r.execution is not None:
            outputs.append((EXECUTIONS, position_key(order.account, order.symbol), to_json(r.execution), None))
        if not r.accepted:
            refused = order_state.record(
                order, EventType.TRANSITION_REFUSED, now, reason=r.reason, detail={"deal": fill.deal, "volume": fill.volume},
                discriminator=f"deal-{fill.deal}",
            )
            outputs.append((ORDER_EXECUTION_ARCHIVE, order.order_id, to_json(refused), None))
            if r.execution is None:
                raise BadInput(f"fill refused: {r.reason}")
            b.emit(*outputs)
            return order
        t = order_state.apply(order, r.event_type, now, detail={"deal": fill.deal, "price": fill.price, "volume": fill.volume}, **r.updates)
        outputs += transition_outputs(t)
        new_order = t.order
        if not t.applied:
            # A real trade on an order we hold final (a cancel that lost the race, a timeout we
            # called a failure): the state stays, the fill figures are kept so a second late
            # deal is computed from them and a replay is recognised as a duplicate.
            new_order = order.model_copy(update=r.updates)
            outputs.append((ORDERS_STATUS, order.order_id, to_json(new_order), None))
        if r.alert:
            alert = order_state.record(
                new_order, EventType.SLIPPAGE_ALERT, now,
                reason=f"slippage {r.fill_slippage_pips} pips above {cfg.fill_tracking.slippage_alert_threshold_pips}",
                detail={"deal": fill.deal, "slippage_pips": r.fill_slippage_pips, "price": fill.price,
                        "expected_price": order.expected_price},
                discriminator=f"deal-{fill.deal}",
            )
            alert_json = to_json(alert)
            outputs += [(ORDER_EXECUTION_ARCHIVE, order.order_id, alert_json, None),
                        (SLIPPAGE_ALERTS, order.order_id, alert_json, None)]
        b.emit(*outputs)
        b.put(self.t.orders, order.order_id, new_order)
        self.rt.metrics.inc("fills", symbol=order.symbol)
        if r.fill_slippage_pips is not None:
            self.rt.metrics.observe_slippage(order.symbol, r.fill_slippage_pips)
        if new_order.state.is_final:
            self.closed(order.order_id, b)
        return new_order

    # ------------------------------------------------------------------ commands
    def on_command(self, raw: bytes, b: Batch) -> None:
        try:
            cmd = from_json(OrderCommand, raw)
        except DecodeError as exc:
            raise BadInput(exc.reason) from None
        now = utcnow()
        if cmd.kind is CommandKind.EXPIRE_SIGNAL:
            seen = b.get(self.t.signal_orders, cmd.key)
            window = self.rt.config.idempotency.check_window_hours
            if seen is not None and expired_keys([(cmd.key, seen)], now, window):
                b.delete(self.t.signal_orders, cmd.key)
            return
        order: Order | None = b.get(self.t.orders, cmd.key)
        if order is None:
            raise BadInput(f"key: command {cmd.kind.value} for unknown order {cmd.key!r}")
        if cmd.kind is CommandKind.SUBMIT_RESULT:
            step = on_submit_result(order, cmd.payload, cmd.attempt)
        else:
            # The broker's deals for this order: any that never reached us through the fills
            # stream (lost before a crash, dead-lettered while the order was unknown) are
            # applied now; the ones we have are recognised by their deal ticket.
            for raw_deal in cmd.payload.get("deals") or ():
                try:
                    deal = Fill.model_validate(raw_deal)
                except ValueError:
                    continue
                if deal.deal not in order.deals and deal.order_id == order.order_id:
                    log.info("order %s: applying deal %s reported by the broker", order.order_id, deal.deal)
                    order = self.apply_deal(order, deal, b)
            step = on_broker_status(order, cmd.payload, stuck=bool(cmd.payload.get("stuck")))
        if step.event_type is None:
            log.debug("order %s: %s ignored (%s)", order.order_id, cmd.kind.value, step.reason)
            return
        detail = {"command": cmd.kind.value, "attempt": cmd.attempt}
        if "retcode" in cmd.payload:
            detail["retcode"] = cmd.payload["retcode"]
        t = order_state.apply(order, step.event_type, now, reason=step.reason, detail=detail, **step.updates)
        b.emit(*transition_outputs(t))
        if t.applied:
            b.put(self.t.orders, order.order_id, t.order)
            self.rt.metrics.inc("order_transitions", state=t.order.state.value)
            if t.order.state.is_final:
                self.closed(order.order_id, b)

    def closed(self, order_id: str, b: Batch) -> None:
        """The order is final: it leaves ``open_orders`` and the timers' memory."""
        b.delete(self.t.open_orders, order_id)
        b.later(lambda: self.forget(order_id))

    def forget(self, order_id: str) -> None:
        self.checked.pop(order_id, None)
        self.answered.pop(order_id, None)

    # ------------------------------------------------------------------ submission
    async def start_submission(self, order: Order, *, resume: bool) -> None:
        task = self.in_flight.get(order.order_id)
        if task is not None and not task.done():
            return
        await self.slots.acquire()
        task = asyncio.create_task(self._submit(order, resume), name=f"submit-{order.order_id}")
        self.in_flight[order.order_id] = task

        def _done(t: asyncio.Task, order_id: str = order.order_id) -> None:
            self.slots.release()
            if self.in_flight.get(order_id) is t:
                del self.in_flight[order_id]
            if not t.cancelled() and t.exception() is not None:
                log.error("submission of %s failed: %r", order_id, t.exception())

        task.add_done_callback(_done)

    async def _command(self, kind: CommandKind, order_id: str, payload: dict[str, Any], attempt: int = 0) -> None:
        cmd = OrderCommand(kind=kind, key=order_id, attempt=attempt, payload=payload, at=utcnow())
        # Kafka briefly unavailable: the answer must not be lost.
        await until_done(f"command {kind.value} for {order_id}",
                         lambda: send_all(self.ctx, [(ORDERS_COMMANDS, order_id, to_json(cmd), None)]))
        if kind is not CommandKind.EXPIRE_SIGNAL:
            self.answered[order_id] = time.monotonic()

    async def _status(self, client: Any, order: Order) -> dict[str, Any] | None:
        try:
            status = await client.status(magic=MAGIC, comment=comment_for(order.order_id), account=order.account)
        except NoReply:
            return None
        return status.model_dump(mode="json")

    async def _status_until_answered(self, client: Any, order: Order) -> dict[str, Any] | None:
        """Ask about an order whose submission got no answer, again while the connector does
        not answer either (NATS restarting, the connector away), for up to the stuck-order
        timeout: only the broker's answer tells a lost order (resend it) from a live one, and
        giving up early would leave an order the broker never saw to fail as stuck."""
        deadline = time.monotonic() + self.rt.config.submission.stuck_order_timeout_seconds
        delay = 0.2
        while True:
            status = await self._status(client, order)
            if status is not None or time.monotonic() + delay >= deadline:
                return status
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _submit(self, order: Order, resume: bool) -> None:
        """Send the order, resending only when the broker says it never saw it."""
        client = await self.rt.mt5()
        cfg = self.rt.config
        if resume:
            # This order may have reached the broker before a crash: ask before any resend.
            status = await self._status(client, order)
            if status is None:
                # No answer: the broker may have it.  Never resend blind; the order stays
                # PENDING and the timer asks again.
                log.info("order %s: no answer to the status query; resume later", order.order_id)
                return
            if status.get("known"):
                await self._command(CommandKind.BROKER_STATUS, order.order_id, status)
                return
        spec = self.rt.symbols[order.symbol]
        fields = trade_request_fields(order, spec, cfg.order_defaults.max_slippage_pips, MAGIC)
        requotes = 0
        attempt = order.attempts
        retries = 0
        while True:
            attempt += 1
            self.rt.metrics.inc("submissions")
            try:
                result = await client.submit(TradeRequest(**fields))
                payload = result.model_dump(mode="json")
                outcome = classify(result.retcode)
            except NoReply:
                payload, outcome = {"no_reply": True}, Outcome.UNKNOWN
            if outcome is Outcome.UNKNOWN:
                # Unknown outcome: the broker may have the order.  Ask, never blindly resend.
                status = await self._status_until_answered(client, order)
                if status is not None and status.get("known"):
                    await self._command(CommandKind.BROKER_STATUS, order.order_id, status, attempt)
                    return
                if retries < cfg.submission.submit_retries and status is not None:
                    retries += 1
                    continue  # the broker answered that it does not have it: safe to resend
                await self._command(CommandKind.SUBMIT_RESULT, order.order_id, payload, attempt)
                return
            if outcome is Outcome.REPRICE and requotes < cfg.submission.max_requotes and payload.get("bid") and payload.get("ask"):
                requotes += 1
                fields["price"] = payload["ask"] if order.side.value == "buy" else payload["bid"]
                continue
            await self._command(CommandKind.SUBMIT_RESULT, order.order_id, payload, attempt)
            return

    # ------------------------------------------------------------------ timers
    async def check_open_orders(self) -> None:
        """Resume PENDING orders nobody is submitting; ask the broker about stuck ones."""
        sub = self.rt.config.submission
        now = utcnow()
        pending_grace = timedelta(seconds=sub.reply_timeout_seconds * (sub.submit_retries + 2) + 1)
        stuck_after = timedelta(seconds=sub.stuck_order_timeout_seconds)
        youngest_due = min(pending_grace, stuck_after)
        for key, opened in list(self.t.open_orders.items()):
            order_id = key.decode() if isinstance(key, bytes) else key
            if _opened_within(opened, now, youngest_due):
                continue  # updated no earlier than opened: too young for either check (no order read)
            order: Order | None = self.t.orders.get(order_id)
            if order is None or order.state.is_final:
                continue
            age = now - order.updated_at
            if order.state is OrderState.PENDING:
                last = self.checked.get(order_id, 0.0)
                if time.monotonic() - self.answered.get(order_id, -1e9) < sub.stuck_order_timeout_seconds:
                    continue
                if order_id not in self.in_flight and age > pending_grace and time.monotonic() - last > pending_grace.total_seconds():
                    self.checked[order_id] = time.monotonic()
                    log.info("order %s PENDING for %s: resuming its submission", order_id, age)
                    await self.start_submission(order, resume=True)
            elif order.state in (OrderState.SUBMITTED, OrderState.PARTIALLY_FILLED) and age > stuck_after:
                last = self.checked.get(order_id, 0.0)
                if time.monotonic() - last < sub.stuck_order_timeout_seconds:
                    continue
                self.checked[order_id] = time.monotonic()
                asyncio.create_task(self._check_stuck(order))

    async def _check_stuck(self, order: Order) -> None:
        client = await self.rt.mt5()
        status = await self._status(client, order)
        if status is None:
            log.warning("order %s stuck in SUBMITTED and the connector does not answer", order.order_id)
            return
        self.rt.metrics.inc("stuck_orders_checked")
        await self._command(CommandKind.BROKER_STATUS, order.order_id, {**status, "stuck": True})

    async def expire_signals(self) -> None:
        """Ask for the expiry of the dedupe entries past the window (through orders.commands,
        so the agent deletes them in order with everything else).  The table holds a day of
        signals, so the scan hands the event loop back every 1,000 entries."""
        window = self.rt.config.idempotency.check_window_hours
        now = utcnow()
        items = []
        for n, (key, seen) in enumerate(self.t.signal_orders.items(), 1):
            items.append((key.decode() if isinstance(key, bytes) else key, seen))
            if n % 1000 == 0:
                await asyncio.sleep(0)
        for signal_id in expired_keys(items, now, window):
            await self._command(CommandKind.EXPIRE_SIGNAL, signal_id, {})


def _opened_within(opened: Any, now: datetime, span: timedelta) -> bool:
    """True when an ``open_orders`` value (when the order opened) is less than ``span`` ago."""
    try:
        return now - datetime.fromisoformat(opened.decode() if isinstance(opened, bytes) else opened) < span
    except (TypeError, ValueError, AttributeError):
        return False  # unreadable: read the order instead


def register(ctx: Context) -> OrdersAgent:
    app = ctx.app
    worker = OrdersAgent(ctx)
    source = app.topic(*INPUTS, key_serializer="raw", value_serializer="raw")

    settings = ctx.rt.settings

    def dlq_for(event: faust.EventT) -> str:
        return DLQ_FOR[event.message.topic]

    @app.agent(source, name="orders")
    async def orders(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.agent_batch_max, within=settings.agent_batch_within):
            await process_batch(ctx, events, worker.handle, dlq_for, "orders")

    last = {"check": 0.0, "expire": 0.0}

    @app.timer(1.0, name="orders.timers")
    async def timers() -> None:
        if app.rebalancing or not app.assignor.assigned_actives():
            return
        cfg = ctx.rt.config
        mono = time.monotonic()
        if mono - last["check"] >= cfg.submission.stuck_check_interval_seconds:
            last["check"] = mono
            await worker.check_open_orders()
        # A twenty-fourth of the window, at most an hour: an entry lives at most 1/24 longer
        # than the window (deduping a little longer is safe), and a day's table is scanned
        # hourly rather than every minute.
        if mono - last["expire"] >= min(3600.0, cfg.idempotency.check_window_hours * 3600 / 24):
            last["expire"] = mono
            await worker.expire_signals()

    return worker


