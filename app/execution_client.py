"""The execution client: the one place that speaks the MT5 connector contract for orders.

Submit, cancel, modify and status, with one retry and unknown-outcome policy:

* **no reply / UNKNOWN retcode** (10011, 10012, 10031, anything outside the MT5 range): the
  order may exist.  Ask the broker (status: open orders, history, deals), again while the
  connector does not answer, for up to the stuck-order timeout.  Known: the broker's state
  wins and nothing is resent.  Not known: a resend is safe (the connector dedupes on
  ``(account, magic, comment)`` anyway), at most ``submit_retries`` times.
* **REPRICE** (10004, 10020, 10021): a market order is resent at the broker's quote only
  while :func:`tables.order_types.reprice` keeps every fill within the slippage cap of the
  signal's entry, at most ``max_requotes`` times; a pending order's price is never moved.
* **SUCCESS / REJECT**: final answers.

Every answer is returned as a :class:`Answer` (the command kind and payload the orders agent
applies through ``orders.commands``); nothing here writes a table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from tenacity import AsyncRetrying, retry_if_result, stop_before_delay

from app import retry
from app.models import CommandKind, ModifyOrder, Order, OrderIntent, OrderType
from app.mt5.contract import ModifyRequest, NoReply, Outcome, TradeRequest, classify
from tables.order_types import MAGIC, comment_for, reduce_only_refusal, reprice, trade_request_fields

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """What the broker said: applied by the orders agent as a command of ``kind``."""

    kind: CommandKind
    payload: dict[str, Any] = field(default_factory=dict)
    attempt: int = 0


class ExecutionClient:
    def __init__(self, rt: Any) -> None:
        self.rt = rt  # app.runtime.Runtime: the MT5 client, config, symbols, metrics

    # ------------------------------------------------------------------ status
    async def status(self, order: Order) -> dict[str, Any] | None:
        """The broker's view of ``order``, or None when the connector does not answer."""
        client = await self.rt.mt5()
        try:
            status = await client.status(magic=MAGIC, comment=comment_for(order.order_id), account=order.account)
        except NoReply:
            return None
        return status.model_dump(mode="json")

    async def status_until_answered(self, order: Order) -> dict[str, Any] | None:
        """Ask again while the connector does not answer (NATS restarting, the connector
        away), for up to the stuck-order timeout: only the broker's answer tells a lost order
        (resend it) from a live one."""
        retrying = AsyncRetrying(
            wait=retry.backoff(0.2, 5.0), retry=retry_if_result(lambda status: status is None),
            stop=stop_before_delay(self.rt.config.submission.stuck_order_timeout_seconds),
            retry_error_callback=lambda state: None)  # no answer by then: None, as the caller expects
        return await retrying(self.status, order)

    # ------------------------------------------------------------------ submit
    async def submit(self, order: Order, *, resume: bool, reduce_only: bool = False) -> Answer | None:
        """Send ``order``; resend only when the broker says it never saw it.  ``resume``: the
        order may have reached the broker before (a crash, a timer): ask first.  None: no
        answer from anyone, the order stays PENDING and is asked about later.
        ``reduce_only``: an opening order is sent only if it reduces the broker's position."""
        if resume:
            status = await self.status(order)
            if status is None:
                log.info("order %s: no answer to the status query; resume later", order.order_id)
                return None
            if status.get("known"):
                return Answer(CommandKind.BROKER_STATUS, status, order.attempts)
        client = await self.rt.mt5()
        if reduce_only and order.intent is OrderIntent.OPEN:
            refusal = await self.grows_position(order)
            if refusal is None:
                return None  # the connector did not answer: asked again later
            if refusal:
                return Answer(CommandKind.SUBMIT_RESULT, {"refused": refusal}, order.attempts)
        cfg = self.rt.config
        spec = self.rt.symbols[order.symbol]
        cap = cfg.order_defaults.max_slippage_pips
        fields = trade_request_fields(order, spec, cap, MAGIC)
        if order.intent is OrderIntent.CLOSE:
            ticket = await self.position_ticket(order)
            if ticket is None:
                return None  # the connector did not answer: asked again later
            if not ticket:
                return Answer(CommandKind.SUBMIT_RESULT, {"refused": "the position is already closed at the broker"},
                              order.attempts)
            fields["position"] = ticket
        requotes = retries = 0
        attempt = order.attempts
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
                status = await self.status_until_answered(order)
                if status is not None and status.get("known"):
                    return Answer(CommandKind.BROKER_STATUS, status, attempt)
                if retries < cfg.submission.submit_retries and status is not None:
                    retries += 1
                    continue  # the broker answered that it does not have it: safe to resend
                return Answer(CommandKind.SUBMIT_RESULT, payload, attempt)
            if outcome is Outcome.REPRICE and requotes < cfg.submission.max_requotes:
                if order.order_type is not OrderType.MARKET:
                    requotes += 1
                    continue  # a pending order is resent at its own price, never the market's
                if payload.get("bid") and payload.get("ask"):
                    step = reprice(order, spec, cap, payload["bid"], payload["ask"])
                    if isinstance(step, str):
                        return Answer(CommandKind.SUBMIT_RESULT, {**payload, "refused": step}, attempt)
                    requotes += 1
                    fields["price"], fields["deviation"] = step
                    continue
            return Answer(CommandKind.SUBMIT_RESULT, payload, attempt)

    async def position_ticket(self, order: Order) -> int | None:
        """The ticket of the broker's position a close order reduces (0: there is none on the
        other side of the order; None: the connector does not answer).  Asked at submission:
        the ticket our table last saw may be an older position's (a reversal's deals can reach
        the table in either order)."""
        client = await self.rt.mt5()
        try:
            snap = await client.positions(order.account, MAGIC)
        except NoReply:
            return None
        for p in snap.positions:
            if p.symbol == order.symbol and p.magic == MAGIC and p.net_volume * order.side.sign < 0:
                return p.ticket
        return 0

    async def grows_position(self, order: Order) -> str | None:
        """The reason ``order`` would grow the broker's position ("" when it only reduces
        it; None when the connector does not answer)."""
        client = await self.rt.mt5()
        try:
            snap = await client.positions(order.account, MAGIC)
        except NoReply:
            return None
        net = sum(p.net_volume for p in snap.positions if p.symbol == order.symbol and p.magic == MAGIC)
        return reduce_only_refusal(order, net)

    # ------------------------------------------------------------------ cancel and modify
    async def cancel(self, order: Order) -> dict[str, Any]:
        """Remove the order (its unfilled rest) at the broker.  No answer: the broker is asked
        what became of the order, and its status is the answer (``{"status": ...}``)."""
        client = await self.rt.mt5()
        try:
            result = await client.cancel(magic=MAGIC, comment=comment_for(order.order_id), account=order.account)
            return result.model_dump(mode="json")
        except NoReply:
            return {"no_reply": True, "status": await self.status_until_answered(order)}

    async def modify(self, order: Order, changes: ModifyOrder) -> dict[str, Any]:
        """Change the order's price or SL/TP (of the order while it works, of its position once
        filled).  A modify is idempotent at the broker (the same values again: 10025)."""
        client = await self.rt.mt5()
        spec = self.rt.symbols[order.symbol]

        def rounded(p: float | None) -> float | None:
            return spec.round_price(p) if p is not None else None

        filled = order.filled_volume > 0 and order.order_type is OrderType.MARKET or order.state.value == "FILLED"
        req = ModifyRequest(
            magic=MAGIC, comment=comment_for(order.order_id), account=order.account,
            position=int(order.position_ticket or 0) if filled else 0,
            price=rounded(changes.price), sl=rounded(changes.stop_loss), tp=rounded(changes.take_profit),
        )
        try:
            result = await client.modify(req)
            return result.model_dump(mode="json")
        except NoReply:
            return {"no_reply": True}
