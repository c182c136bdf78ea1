"""The orders agent: the single writer of ``orders`` and ``signal_orders``, and the keeper of
``open_orders`` (in memory, :mod:`tables.open_orders`).

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
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import faust
import orjson

from agents.common import (
    BadInput,
    Batch,
    Context,
    Out,
    process_batch,
    send_all,
    until_done,
)
from app.execution_client import ExecutionClient
from app.faust_patches import stored_items, table_get
from app.models import (
    ApprovedSignal,
    CommandKind,
    DecodeError,
    EventType,
    Fill,
    ModifyOrder,
    Order,
    OrderCommand,
    OrderEvent,
    OrderIntent,
    OrderState,
    OrderType,
    Position,
    TimeInForce,
    from_json,
    position_key,
    to_json,
    utcnow,
)
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
from tables.commands import closing_lots, decide_cancel, decide_close, decide_expire, decide_modify, is_repeat, remember
from tables.fills import apply_fill, exit_execution
from tables.idempotency import SignalSeen, close_order_id, expired_keys, order_id_for
from tables.order_types import MAGIC, check_enabled, order_expiry, resolve_order_type, service_expiry
from tables.submission import on_broker_status, on_cancel_result, on_modify_result, on_submit_result
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
        self.client = ExecutionClient(ctx.rt)
        self.in_flight: dict[str, asyncio.Task] = {}
        self.slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        #: order_id -> monotonic time of the last status check (stuck orders, expiries).
        self.checked: dict[str, float] = {}
        #: order_id -> monotonic time its submission's answer was sent to orders.commands:
        #: the answer is durable and the agent will apply it, so a backlog in front of it
        #: is no reason to resume the submission (which would ask the broker again).
        self.answered: dict[str, float] = {}
        #: position key -> close order id -> {deal ticket: lots} of the close orders made on
        #: this worker: what a new close of the position must leave to them (closing_lots).
        self.closing: dict[str, dict[str, dict[int, float]]] = {}

    # ------------------------------------------------------------------ dispatch
    def handle(self, event: faust.EventT, b: Batch) -> None:
        message = event.message
        topic = message.topic
        if topic == SIGNALS_APPROVED:
            self.on_signal(event.value, b, f"{message.partition}-{message.offset}", message.timestamp)
        elif topic == FILLS:
            self.on_fill(event.value, b)
        else:
            self.on_command(event.value, b, f"{message.partition}-{message.offset}")

    # ------------------------------------------------------------------ signals
    def on_signal(self, raw: bytes, b: Batch, where: str = "", forwarded_at: float | None = None) -> None:
        try:
            signal = from_json(ApprovedSignal, raw)
        except DecodeError as exc:
            raise BadInput(exc.reason) from None
        if signal.symbol not in self.rt.symbols:
            raise BadInput(f"symbol: unknown symbol {signal.symbol!r}")
        cfg = self.rt.config
        now = utcnow()
        order_id = order_id_for(signal.signal_id, self.rt.settings.topic_partitions)
        seen: SignalSeen | None = b.get(self.t.signal_orders, signal.signal_id)
        existing: Order | None = b.get(self.t.orders, order_id)
        if seen is not None or existing is not None:
            # The same signal again (redelivery, replay, a resend upstream): one order, ever.
            self.rt.metrics.inc("duplicate_signals")
            if existing is not None:
                event = order_state.record(
                    existing, EventType.DUPLICATE_SIGNAL, now, reason="signal already has an order",
                    detail={"first_seen": seen.first_seen.isoformat() if seen else None},
                    discriminator=where,  # each delivery is its own record; a replay of one is not
                )
                b.emit((ORDER_EXECUTION_ARCHIVE, order_id, to_json(event), None))
                # Written again: after a crash the local store may hold a value whose changelog
                # record never reached Kafka; this puts it there for the partition's next owner.
                b.put(self.t.orders, order_id, existing)
                if existing.state is OrderState.PENDING:
                    b.later(lambda: self.start_submission(existing, resume=True))
            if seen is not None:
                b.put(self.t.signal_orders, signal.signal_id, seen)
            return
        order_type = resolve_order_type(signal, cfg.order_defaults)
        tif = signal.time_in_force or cfg.order_defaults.default_time_in_force
        if order_type is OrderType.MARKET:
            tif = TimeInForce.GTC  # a market order fills now or never: no time in force
        created = order_state.create_order(
            signal, order_id, order_type, now, time_in_force=tif, expires_at=order_expiry(tif, signal.expires_at, now),
        )
        outputs = transition_outputs(created)
        order = created.order
        refusal = self.refusal(signal, order, forwarded_at, now)
        if refusal:
            rejected = order_state.apply(order, EventType.REJECTED, now, reason=refusal)
            outputs += transition_outputs(rejected)
            order = rejected.order
        b.emit(*outputs)
        b.put(self.t.orders, order_id, order)
        b.put(self.t.signal_orders, signal.signal_id, SignalSeen(order_id=order_id, first_seen=now))
        self.rt.metrics.inc("orders_created", order_type=order_type.value)
        if order.state is OrderState.PENDING:
            self.opened(order, now, b)
            b.later(lambda: self.start_submission(order, resume=False))

    def refusal(self, signal: ApprovedSignal, order: Order, forwarded_at: float | None, now: datetime) -> str | None:
        """Why a new order must not be sent (REJECTED with this reason), or None."""
        cfg = self.rt.config
        if not cfg.trading.trading_enabled:
            return "halted: trading is disabled (trading.trading_enabled is false)"
        refusal = check_enabled(order.order_type, cfg.order_defaults)
        if refusal:
            return refusal
        born = signal.approved_at or (datetime.fromtimestamp(forwarded_at, timezone.utc) if forwarded_at else None)
        max_age = cfg.order_defaults.max_signal_age_seconds
        if born is not None and (now - born).total_seconds() > max_age:
            return f"stale: the signal is {(now - born).total_seconds():.1f} s old, above max_signal_age_seconds {max_age:g}"
        if order.expires_at is not None and order.expires_at <= now:
            return f"expired: expires_at {order.expires_at.isoformat()} is already past"
        return None

    def opened(self, order: Order, now: datetime, b: Batch) -> None:
        """The order is open: watched by the timers until final (with its expiry, if any),
        once the batch is committed."""
        b.later(lambda: self.t.open_orders.add(order.order_id, now, order.expires_at))

    # ------------------------------------------------------------------ fills
    def on_fill(self, raw: bytes, b: Batch) -> None:
        try:
            fill = from_json(Fill, raw)
        except DecodeError as exc:
            raise BadInput(exc.reason) from None
        if fill.symbol not in self.rt.symbols:
            raise BadInput(f"symbol: unknown symbol {fill.symbol!r}")
        if fill.magic != MAGIC:
            self.on_foreign_deal(fill, b)
            return
        order: Order | None = b.get(self.t.orders, fill.order_id) if fill.order_id else None
        if fill.is_exit:
            self.on_exit(order, fill, b)
            return
        if order is None:
            self.rt.metrics.inc("unknown_fills")
            raise BadInput(f"order_id: unknown order {fill.order_id!r} (deal {fill.deal})")
        self.apply_deal(order, fill, b)

    def on_foreign_deal(self, fill: Fill, b: Batch) -> None:
        """A deal of another magic number (a manual trade, another robot): reported in the
        audit trail and on the fills alert subject, never merged into our positions."""
        self.rt.metrics.inc("foreign_deals", symbol=fill.symbol)
        event = deal_event(fill, EventType.FOREIGN_DEAL, utcnow(),
                           f"deal of magic {fill.magic}, not this service's ({MAGIC}): not applied")
        b.emit((ORDER_EXECUTION_ARCHIVE, fill.routing_key, to_json(event), None))

    def on_exit(self, order: Order | None, fill: Fill, b: Batch) -> None:
        """An exit the broker or a person made (SL, TP, stop-out, a close at the terminal):
        it reduces the position the order opened.  Applied to the position (``executions``)
        whether or not the opening order is still in the table; the position dedupes it by
        deal ticket, ClickHouse by execution id."""
        now = utcnow()
        execution = exit_execution(order, fill, self.rt.symbols)
        reason = f"position {fill.position} reduced by {fill.volume} lots: {fill.reason} at {fill.price}"
        if order is not None:
            event = order_state.record(order, EventType.POSITION_EXIT, now, reason=reason,
                                       detail=_deal_detail(fill), discriminator=f"deal-{fill.deal}")
        else:
            event = deal_event(fill, EventType.POSITION_EXIT, now, reason)
        b.emit((EXECUTIONS, position_key(fill.account, fill.symbol), to_json(execution), None),
               (ORDER_EXECUTION_ARCHIVE, fill.routing_key, to_json(event), None))
        self.rt.metrics.inc("position_exits", symbol=fill.symbol, reason=fill.reason)

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
            key = position_key(order.account, order.symbol)
            outputs.append((EXECUTIONS, key, to_json(r.execution), None))
            deals = self.closing.get(key, {}).get(order.order_id) if order.intent is OrderIntent.CLOSE else None
            if deals is not None:
                deals[fill.deal] = fill.volume
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
            new_order = order_state.amend(order, now, **r.updates)
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
            self.rt.metrics.inc("slippage_alerts", symbol=order.symbol)
        b.emit(*outputs)
        b.put(self.t.orders, order.order_id, new_order)
        self.rt.metrics.inc("fills", symbol=order.symbol)
        if r.fill_slippage_pips is not None:
            self.rt.metrics.observe_slippage(order.symbol, r.fill_slippage_pips)
        if new_order.state.is_final:
            self.closed(order.order_id, b)
        return new_order

    # ------------------------------------------------------------------ commands
    def on_command(self, raw: bytes, b: Batch, where: str = "") -> None:
        try:
            cmd = from_json(OrderCommand, raw)
        except DecodeError as exc:
            raise BadInput(exc.reason) from None
        now = utcnow()
        kind = cmd.kind
        if kind is CommandKind.EXPIRE_SIGNAL:
            self.on_expire_signal(cmd, b, now)
            return
        if kind is CommandKind.CLOSE_POSITION:
            self.on_close_position(cmd, b, now)
            return
        order: Order | None = b.get(self.t.orders, cmd.key)
        if kind in USER_COMMANDS:
            self.on_order_command(cmd, order, b, now, where)
            return
        if order is None:
            raise BadInput(f"key: command {kind.value} for unknown order {cmd.key!r}")
        if kind is CommandKind.CANCEL_RESULT:
            self.on_cancel_result(cmd, order, b, now)
            return
        if kind is CommandKind.MODIFY_RESULT:
            self.on_modify_result(cmd, order, b, now)
            return
        if kind is CommandKind.SUBMIT_RESULT:
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
                if deal.deal not in order.deals and deal.order_id == order.order_id and not deal.is_exit:
                    log.info("order %s: applying deal %s reported by the broker", order.order_id, deal.deal)
                    order = self.apply_deal(order, deal, b)
            step = on_broker_status(order, cmd.payload, stuck=bool(cmd.payload.get("stuck")))
        if step.event_type is None:
            log.debug("order %s: %s ignored (%s)", order.order_id, kind.value, step.reason)
            if cmd.attempt > order.attempts:
                # The answer came after the order moved on (its fills overtook it): keep count.
                amended = order_state.amend(order, now, attempts=cmd.attempt)
                b.emit((ORDERS_STATUS, order.order_id, to_json(amended), None))
                b.put(self.t.orders, order.order_id, amended)
            return
        detail = {"command": kind.value, "attempt": cmd.attempt}
        if "retcode" in cmd.payload:
            detail["retcode"] = cmd.payload["retcode"]
        updates = dict(step.updates)
        if cmd.attempt > order.attempts:
            updates["attempts"] = cmd.attempt
        self.transition(order, step.event_type, now, b, reason=step.reason, detail=detail, **updates)

    def transition(self, order: Order, event_type: EventType, now: datetime, b: Batch, **kw: Any) -> Order:
        t = order_state.apply(order, event_type, now, **kw)
        b.emit(*transition_outputs(t))
        if t.applied:
            b.put(self.t.orders, order.order_id, t.order)
            self.rt.metrics.inc("order_transitions", state=t.order.state.value)
            if t.order.state.is_final:
                self.closed(order.order_id, b)
        return t.order

    def command_event(self, order: Order | None, cmd: OrderCommand, event_type: EventType, now: datetime,
                      reason: str | None, where: str = "") -> Out:
        detail = {"command": cmd.kind.value, "command_id": cmd.command_id, "source": cmd.source, **cmd.payload}
        discriminator = f"{cmd.kind.value}-{cmd.command_id or where}"
        if event_type is EventType.DUPLICATE_COMMAND:
            discriminator += f"-{where}"
        if order is not None:
            event = order_state.record(order, event_type, now, reason=reason, detail=detail, discriminator=discriminator)
        else:
            event = OrderEvent(event_id=f"{cmd.key}:{event_type.value}:{discriminator}", type=event_type, order_id=cmd.key,
                               signal_id="", symbol=str(cmd.payload.get("symbol") or ""), account=str(cmd.payload.get("account") or ""),
                               reason=reason, detail=detail, at=now)
        if event_type is EventType.COMMAND_REFUSED:
            self.rt.metrics.inc("commands_refused", command=cmd.kind.value)
        return (ORDER_EXECUTION_ARCHIVE, cmd.key, to_json(event), None)

    def on_order_command(self, cmd: OrderCommand, order: Order | None, b: Batch, now: datetime, where: str) -> None:
        """Cancel, modify or expire an order: decided against its state here; accepted, the
        broker is asked in a task whose answer comes back as a CANCEL_/MODIFY_RESULT."""
        if order is not None and is_repeat(order, cmd.command_id):
            b.emit(self.command_event(order, cmd, EventType.DUPLICATE_COMMAND, now, "command delivered again: acted on once", where))
            return
        if cmd.kind is CommandKind.MODIFY:
            try:
                changes = ModifyOrder.model_validate(cmd.payload)
            except ValueError as exc:
                b.emit(self.command_event(order, cmd, EventType.COMMAND_REFUSED, now, f"payload: {exc}", where))
                return
            decision = decide_modify(order, changes)
        elif cmd.kind is CommandKind.EXPIRE:
            decision = decide_expire(order, now)
        else:
            decision = decide_cancel(order)
        if not decision.accepted:
            b.emit(self.command_event(order, cmd, EventType.COMMAND_REFUSED, now, decision.reason, where))
            return
        assert order is not None
        b.emit(self.command_event(order, cmd, EventType.COMMAND_ACCEPTED, now, None, where))
        pending = {"kind": "modify" if cmd.kind is CommandKind.MODIFY else "cancel", "command_id": cmd.command_id,
                   "changes": changes.changes() if cmd.kind is CommandKind.MODIFY else {},
                   "reason": "expired" if cmd.kind is CommandKind.EXPIRE else "cancelled"}
        order = order.model_copy(update={"commands": remember(order, cmd.command_id),
                                         "pending_command": orjson.dumps(pending).decode()})
        b.put(self.t.orders, order.order_id, order)
        self.rt.metrics.inc("commands_accepted", command=cmd.kind.value)
        b.later(lambda: self.run_pending(order))

    async def run_pending(self, order: Order) -> None:
        """Ask the broker to carry out the order's accepted command (again, after a crash: a
        cancel or a modify repeated at the broker changes nothing more)."""
        if not order.pending_command:
            return
        key = f"command-{order.order_id}"
        task = self.in_flight.get(key)
        if task is not None and not task.done():
            return
        pending = orjson.loads(order.pending_command)
        if pending["kind"] == "modify":
            coro = self._modify(order, pending["command_id"], ModifyOrder.model_validate(pending["changes"]))
        else:
            coro = self._cancel(order, pending["command_id"], pending["reason"])
        self.in_flight[key] = await self.run_task(key, coro)

    def settled(self, order: Order, cmd: OrderCommand) -> Order:
        """The order without its pending command, once the broker answered it."""
        if order.pending_command and orjson.loads(order.pending_command).get("command_id") == cmd.command_id:
            return order.model_copy(update={"pending_command": None})
        return order

    def on_cancel_result(self, cmd: OrderCommand, order: Order, b: Batch, now: datetime) -> None:
        step = on_cancel_result(order, cmd.payload)
        settled = self.settled(order, cmd)
        if step.event_type is not None:
            self.transition(order, step.event_type, now, b, reason=step.reason, pending_command=settled.pending_command,
                            detail={"command_id": cmd.command_id, "retcode": cmd.payload.get("retcode")})
            return
        if settled is not order:
            b.put(self.t.orders, order.order_id, settled)
        # Refused or unanswered: the order filled, triggered or expired first, or the broker is
        # away.  The archive says so; unless the order is final already, its status says which
        # (the fills stream brings any fill).
        b.emit(self.command_event(order, cmd, EventType.COMMAND_REFUSED, now, step.reason))
        if order.state.is_final:
            return
        b.later(lambda: self.run_task(f"status-{order.order_id}", self._check_stuck(order, stuck=False)))

    def on_modify_result(self, cmd: OrderCommand, order: Order, b: Batch, now: datetime) -> None:
        applied, reason = on_modify_result(order, cmd.payload)
        changes = cmd.payload.get("changes") or {}
        order = self.settled(order, cmd)
        if not applied:
            b.emit(self.command_event(order, cmd, EventType.COMMAND_REFUSED, now, reason))
            b.put(self.t.orders, order.order_id, order)
            return
        updates = order_state.modified_prices(order, changes.get("price"), changes.get("stop_loss"), changes.get("take_profit"))
        modified = order_state.amend(order, now, **updates)
        event = order_state.record(modified, EventType.MODIFIED, now, reason="modified at the broker",
                                   detail={"command_id": cmd.command_id, **changes}, discriminator=cmd.command_id)
        b.emit((ORDER_EXECUTION_ARCHIVE, order.order_id, to_json(event), None),
               (ORDERS_STATUS, order.order_id, to_json(modified), None))
        b.put(self.t.orders, order.order_id, modified)

    def on_close_position(self, cmd: OrderCommand, b: Batch, now: datetime) -> None:
        """Close all or part of a position: keyed by the position, handled on its partition
        (where the positions table is local); the closing order is made there, with an id
        derived from the command id on the same partition, and submitted like any order."""
        if cmd.command_id is None:
            raise BadInput("command_id: a close needs a command id")
        account, symbol = str(cmd.payload.get("account") or ""), str(cmd.payload.get("symbol") or "")
        if position_key(account, symbol) != cmd.key:
            raise BadInput(f"key: {cmd.key!r} is not the position of account {account!r} and symbol {symbol!r}")
        order_id = close_order_id(cmd.command_id, cmd.key, self.rt.settings.topic_partitions)
        existing: Order | None = b.get(self.t.orders, order_id)
        if existing is not None:
            b.emit(self.command_event(existing, cmd, EventType.DUPLICATE_COMMAND, now, "command delivered again: acted on once"))
            return
        volume = cmd.payload.get("volume")
        position: Position | None = b.get(self.t.positions, cmd.key)
        in_flight = self.lots_being_closed(cmd.key, position, b)
        decision = decide_close(position, float(volume) if volume is not None else None, in_flight)
        if not decision.accepted or position is None or decision.side is None:
            b.emit(self.command_event(None, cmd, EventType.COMMAND_REFUSED, now, decision.reason))
            return
        created = order_state.create_close_order(
            order_id, cmd.command_id, account, symbol, decision.side, decision.volume,
            position.avg_open_price, position.ticket, now,
        )
        order = created.order
        b.emit(self.command_event(order, cmd, EventType.COMMAND_ACCEPTED, now, None), *transition_outputs(created))
        b.put(self.t.orders, order_id, order)
        self.closing.setdefault(cmd.key, {})[order_id] = {}
        self.rt.metrics.inc("commands_accepted", command=cmd.kind.value)
        self.opened(order, now, b)
        b.later(lambda: self.start_submission(order, resume=False))

    def lots_being_closed(self, key: str, position: Position | None, b: Batch) -> float:
        """Lots of the position that earlier closes made here are taking out and its net
        volume does not show yet; the settled closes are forgotten."""
        closes = self.closing.get(key)
        if not closes or position is None:
            return 0.0
        lots, settled = closing_lots(position, {oid: (b.get(self.t.orders, oid), deals) for oid, deals in closes.items()})
        for oid in settled:
            del closes[oid]
        if not closes:
            del self.closing[key]
        return lots

    def on_expire_signal(self, cmd: OrderCommand, b: Batch, now: datetime) -> None:
        """The dedupe entry is past the window: it goes, and so does its order if final (the
        order lives on in the archive and ClickHouse): the tables hold a window of orders."""
        seen: SignalSeen | None = b.get(self.t.signal_orders, cmd.key)
        window = self.rt.config.idempotency.check_window_hours
        if seen is None or not expired_keys([(cmd.key, seen)], now, window):
            return
        b.delete(self.t.signal_orders, cmd.key)
        order: Order | None = b.get(self.t.orders, seen.order_id)
        if order is not None and order.state.is_final:
            b.delete(self.t.orders, seen.order_id)

    def closed(self, order_id: str, b: Batch) -> None:
        """The order is final: it leaves ``open_orders`` and the timers' memory once the batch
        is committed."""
        b.later(lambda: self.forget(order_id))

    def forget(self, order_id: str) -> None:
        self.t.open_orders.remove(order_id)
        self.checked.pop(order_id, None)
        self.answered.pop(order_id, None)

    # ------------------------------------------------------------------ broker tasks
    async def run_task(self, name: str, coro: Any) -> asyncio.Task:
        """Run a broker call beside the agent (bounded by the in-flight slots)."""
        await self.slots.acquire()
        task = asyncio.create_task(coro, name=name)

        def _done(t: asyncio.Task) -> None:
            self.slots.release()
            if not t.cancelled() and t.exception() is not None:
                log.error("%s failed: %r", name, t.exception())

        task.add_done_callback(_done)
        return task

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

    async def _command(self, kind: CommandKind, order_id: str, payload: dict[str, Any], attempt: int = 0,
                       command_id: str | None = None) -> None:
        cmd = OrderCommand(kind=kind, key=order_id, attempt=attempt, payload=payload, at=utcnow(),
                           command_id=command_id, source="system")
        # Kafka briefly unavailable: the answer must not be lost.
        await until_done(f"command {kind.value} for {order_id}",
                         lambda: send_all(self.ctx, [(ORDERS_COMMANDS, order_id, to_json(cmd), None)]))
        if kind is not CommandKind.EXPIRE_SIGNAL:
            self.answered[order_id] = time.monotonic()

    async def _submit(self, order: Order, resume: bool) -> None:
        answer = await self.client.submit(order, resume=resume, reduce_only=self.rt.config.trading.reduce_only)
        if answer is not None:
            await self._command(answer.kind, order.order_id, answer.payload, answer.attempt)

    async def _cancel(self, order: Order, command_id: str | None, why: str) -> None:
        payload = await self.client.cancel(order)
        await self._command(CommandKind.CANCEL_RESULT, order.order_id, {**payload, "reason": why}, command_id=command_id)

    async def _modify(self, order: Order, command_id: str | None, changes: ModifyOrder) -> None:
        payload = await self.client.modify(order, changes)
        await self._command(CommandKind.MODIFY_RESULT, order.order_id, {**payload, "changes": changes.changes()},
                            command_id=command_id)

    async def _check_stuck(self, order: Order, *, stuck: bool = True) -> None:
        status = await self.client.status(order)
        if status is None:
            log.warning("order %s: the connector does not answer the status query", order.order_id)
            return
        if stuck:
            self.rt.metrics.inc("stuck_orders_checked")
        await self._command(CommandKind.BROKER_STATUS, order.order_id, {**status, "stuck": stuck})

    # ------------------------------------------------------------------ timers
    async def check_open_orders(self) -> None:
        """Resume PENDING orders nobody is submitting; ask the broker about stuck ones; expire
        orders whose time in force ran out."""
        sub = self.rt.config.submission
        now = utcnow()
        pending_grace = timedelta(seconds=sub.reply_timeout_seconds * (sub.submit_retries + 2) + 1)
        stuck_after = timedelta(seconds=sub.stuck_order_timeout_seconds)
        youngest_due = min(pending_grace, stuck_after)
        for order_id, (opened, expires) in self.t.open_orders.items():
            expired = expires is not None and expires <= now
            if not expired and now - opened < youngest_due:
                continue  # too young for either check (no order read)
            order: Order | None = table_get(self.t.orders, order_id)
            if order is None or order.state.is_final:
                self.forget(order_id)  # read open by a rebuild that overlapped its last batch
                continue
            mono = time.monotonic()
            if expired and order.symbol in self.rt.symbols:  # the broker expires it: a grace first
                due = service_expiry(order, self.rt.symbols[order.symbol], timedelta(seconds=sub.broker_expiry_grace_seconds))
                expired = due is not None and due <= now
            if expired and not order.pending_command and order.state in (OrderState.SUBMITTED, OrderState.PARTIALLY_FILLED):
                if mono - self.checked.get(order_id, 0.0) >= sub.stuck_check_interval_seconds:
                    self.checked[order_id] = mono
                    await self._command(CommandKind.EXPIRE, order_id, {}, command_id=f"expire-{order_id[:24]}-{order.version}")
                continue
            age = now - order.updated_at
            if (order.pending_command and age > pending_grace
                    and mono - self.answered.get(order_id, -1e9) > sub.stuck_order_timeout_seconds
                    and mono - self.checked.get(order_id, 0.0) > pending_grace.total_seconds()):
                self.checked[order_id] = mono
                log.info("order %s: its accepted command has no answer after %s: asking the broker again", order_id, age)
                await self.run_pending(order)
                continue
            if order.state is OrderState.PENDING:
                last = self.checked.get(order_id, 0.0)
                if mono - self.answered.get(order_id, -1e9) < sub.stuck_order_timeout_seconds:
                    continue
                if order_id not in self.in_flight and age > pending_grace and mono - last > pending_grace.total_seconds():
                    self.checked[order_id] = mono
                    log.info("order %s PENDING for %s: resuming its submission", order_id, age)
                    await self.start_submission(order, resume=True)
            elif order.state in (OrderState.SUBMITTED, OrderState.PARTIALLY_FILLED) and age > stuck_after:
                last = self.checked.get(order_id, 0.0)
                if mono - last < sub.stuck_order_timeout_seconds:
                    continue
                self.checked[order_id] = mono
                asyncio.create_task(self._check_stuck(order))

    async def track_assignment(self) -> None:
        """Rebuild ``open_orders`` from the ``orders`` table after the assignment changed (the
        table is recovered by then: the timers do not run during a rebalance).  The scan hands
        the event loop back every 1,000 orders and stops if a rebalance begins."""
        assigned = frozenset(self.ctx.app.assignor.assigned_actives())
        if self.t.open_orders.assignment == assigned:
            return
        app = self.ctx.app
        started = time.monotonic()

        async def scan() -> AsyncIterator[tuple[Any, bytes]]:
            for n, item in enumerate(stored_items(self.t.orders), 1):
                yield item
                if n % 1000 == 0:
                    await asyncio.sleep(0)
                    if app.rebalancing:
                        raise _Rebalancing

        try:
            n = await self.t.open_orders.rebuild(assigned, scan())
        except _Rebalancing:
            return  # rebuilt after this rebalance
        log.info("open_orders: %d open orders on %d partitions, from the orders table in %.2f s",
                 n, len(assigned), time.monotonic() - started)

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


#: Commands from ops and upstream services, and the timer's expiry, on one order.
USER_COMMANDS = frozenset({CommandKind.CANCEL, CommandKind.MODIFY, CommandKind.EXPIRE})


def _deal_detail(fill: Fill) -> dict[str, Any]:
    return {"deal": fill.deal, "ticket": fill.ticket, "position": fill.position, "entry": fill.entry,
            "reason": fill.reason, "magic": fill.magic, "side": fill.side.value, "price": fill.price,
            "volume": fill.volume, "profit": fill.profit, "currency": fill.currency}


def deal_event(fill: Fill, event_type: EventType, now: datetime, reason: str) -> OrderEvent:
    """An audit record about a deal that has no order of ours in the table."""
    return OrderEvent(
        event_id=f"{fill.routing_key}:{event_type.value}:deal-{fill.deal}", type=event_type, order_id=fill.order_id,
        signal_id="", symbol=fill.symbol, account=fill.account, reason=reason, detail=_deal_detail(fill), at=now,
    )


class _Rebalancing(Exception):
    """A rebalance began while ``open_orders`` was being rebuilt."""


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
        await worker.track_assignment()
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


