"""The positions agent and the reconciliation timer.

``executions`` is keyed by ``{account}:{symbol}``: the orders agent repartitions the fills
there, so each position has one writer.  An execution carries the broker's profit, currency
and position ticket of its deal into the position (:func:`tables.positions.apply_to_position`).
``positions.discrepancies`` (same key) carries what reconciliation found; with
``auto_correct_discrepancies`` this agent applies them, with the broker's deal tickets, so
a deal still in flight is not counted twice.

Reconciliation asks the broker for the positions of the service's magic number only
(:data:`tables.order_types.MAGIC`); a position of another magic that comes back anyway is
counted and logged (``reconciliation_foreign_positions``), never compared nor corrected.
"""

from __future__ import annotations

import asyncio
import logging
import time

import faust

from agents.common import BadInput, Batch, Context, Out, process_batch, send_all
from app.models import (
    DecodeError,
    EventType,
    Execution,
    OrderEvent,
    Position,
    from_json,
    position_key,
    to_json,
    utcnow,
)
from app.mt5.contract import NoReply
from app.topics import (
    EXECUTIONS,
    EXECUTIONS_DLQ,
    ORDER_EXECUTION_ARCHIVE,
    POSITIONS,
    POSITIONS_DISCREPANCIES,
)
from tables.fills import to_units
from tables.idempotency import partition_for
from tables.order_types import MAGIC
from tables.positions import apply_to_position, correct_position
from tables.reconcile import BrokerPosition, Discrepancy, as_broker_position, compare, foreign_positions
from tables.symbols import UnknownSymbol

log = logging.getLogger(__name__)

INPUTS = (EXECUTIONS, POSITIONS_DISCREPANCIES)
#: A discrepancy must still be there this long after it was first seen (in-flight fills
#: make transient differences) before it is reported.
CONFIRM_DELAY_SECONDS = 2.0


class PositionsAgent:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.rt = ctx.rt
        self.positions = ctx.tables.positions
        self.last_result: dict = {}

    def handle(self, event: faust.EventT, b: Batch) -> None:
        if event.message.topic == EXECUTIONS:
            self.on_execution(event.value, b)
        else:
            self.on_discrepancy(event.value, b)

    def on_execution(self, raw: bytes, b: Batch) -> None:
        try:
            ex = from_json(Execution, raw)
        except DecodeError as exc:
            raise BadInput(exc.reason) from None
        key = position_key(ex.account, ex.symbol)
        try:
            r = apply_to_position(b.get(self.positions, key), ex, self.rt.symbols, utcnow())
        except (UnknownSymbol, ValueError) as exc:
            raise BadInput(str(exc)) from None
        if r.is_duplicate:
            return
        b.emit((POSITIONS, key, to_json(r.position), None))
        b.put(self.positions, key, r.position)

    def on_discrepancy(self, raw: bytes, b: Batch) -> None:
        try:
            d = from_json(Discrepancy, raw)
        except DecodeError as exc:
            raise BadInput(exc.reason) from None
        if not self.rt.config.position_reconciliation.auto_correct_discrepancies:
            return
        key = d.key
        current: Position | None = b.get(self.positions, key)
        ours = current.net_volume if current is not None else 0.0
        if to_units(ours) != to_units(d.ours_net_volume):
            log.info("discrepancy on %s is stale (position moved since): not corrected", key)
            return
        now = utcnow()
        try:
            corrected = correct_position(
                current, d.broker_net_volume, d.broker_avg_price, now, account=d.account, symbol=d.symbol,
                broker_deals=d.broker_deals, broker_ticket=d.broker_ticket,
            )
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        known = set(current.deals) if current is not None else set()
        event = OrderEvent(
            event_id=f"{key}:{corrected.version}:{EventType.POSITION_CORRECTED.value}",
            type=EventType.POSITION_CORRECTED,
            order_id="",
            signal_id="",
            symbol=d.symbol,
            account=d.account,
            reason=(f"reconciliation ({d.kind.value}): set to the broker's {d.broker_net_volume} lots, "
                    f"{len(d.broker_deals)} broker deals"),
            # broker_deals: the tickets now counted; deals_added: those we had not applied
            detail={**d.model_dump(mode="json"), "deals_added": [t for t in d.broker_deals if t not in known]},
            at=now,
        )
        outputs: list[Out] = [
            (ORDER_EXECUTION_ARCHIVE, key, to_json(event), None),
            (POSITIONS, key, to_json(corrected), None),
        ]
        b.emit(*outputs)
        b.put(self.positions, key, corrected)
        self.rt.metrics.inc("positions_corrected")

    # ------------------------------------------------------------------ reconciliation
    def owned(self) -> set[int]:
        return {tp.partition for tp in self.ctx.app.assignor.assigned_actives() if tp.topic == EXECUTIONS}

    async def _snapshot(self) -> list[BrokerPosition] | None:
        """The broker's positions of our magic number (None: no answer)."""
        client = await self.rt.mt5()
        try:
            snap = await client.positions(None, magic=MAGIC)
        except NoReply:
            return None
        return [as_broker_position(p) for p in snap.positions]

    def _owns(self, owned: set[int]):
        n = self.rt.settings.topic_partitions
        return lambda k: partition_for(k, n) in owned

    def _compare(self, broker: list, owned: set[int]) -> list[Discrepancy]:
        ours = {}
        for key, pos in self.positions.items():
            ours[key.decode() if isinstance(key, bytes) else key] = pos
        return compare(ours, broker, self._owns(owned), magic=MAGIC)

    async def reconcile(self, confirm_delay: float = CONFIRM_DELAY_SECONDS) -> list[Discrepancy]:
        """Compare the owned positions with the broker's; report confirmed discrepancies."""
        owned = self.owned()
        if not owned:
            return []
        first = await self._snapshot()
        if first is None:
            log.warning("reconciliation: the connector did not answer the positions query")
            self.rt.metrics.inc("reconciliations_failed")
            return []
        foreign = foreign_positions(first, MAGIC, self._owns(owned))
        if foreign:
            log.warning("reconciliation: %d broker positions of other magic numbers (not ours, not compared): %s",
                        len(foreign), [f"{b.account}:{b.symbol} magic {b.magic}" for b in foreign[:10]])
            self.rt.metrics.inc("reconciliation_foreign_positions", len(foreign))
        candidates = self._compare(first, owned)
        confirmed: list[Discrepancy] = []
        if candidates:
            await asyncio.sleep(confirm_delay)
            second = await self._snapshot()
            if second is not None:
                again = {(d.key, d.ours_net_volume, d.broker_net_volume): d for d in self._compare(second, owned)}
                confirmed = [again[k] for k in ((d.key, d.ours_net_volume, d.broker_net_volume) for d in candidates) if k in again]
        self.rt.metrics.inc("reconciliations")
        self.rt.metrics.inc("reconciliation_discrepancies", len(confirmed))
        self.last_result = {"at": utcnow().isoformat(), "checked_partitions": sorted(owned), "discrepancies": len(confirmed),
                            "foreign_positions": len(foreign)}
        if confirmed:
            log.warning("reconciliation: %d discrepancies: %s", len(confirmed), [d.key for d in confirmed])
            await send_all(self.ctx, [(POSITIONS_DISCREPANCIES, d.key, to_json(d), None) for d in confirmed])
        return confirmed


def register(ctx: Context) -> PositionsAgent:
    app = ctx.app
    worker = PositionsAgent(ctx)
    source = app.topic(*INPUTS, key_serializer="raw", value_serializer="raw")

    settings = ctx.rt.settings

    def dlq_for(event: faust.EventT) -> str:
        return EXECUTIONS_DLQ

    @app.agent(source, name="positions")
    async def positions(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.agent_batch_max, within=settings.agent_batch_within):
            await process_batch(ctx, events, worker.handle, dlq_for, "positions")

    state = {"last": time.monotonic(), "running": False}

    @app.timer(1.0, name="positions.reconcile")
    async def reconcile_timer() -> None:
        cfg = ctx.rt.config.position_reconciliation
        if not cfg.enabled or state["running"] or app.rebalancing:
            return
        if time.monotonic() - state["last"] < cfg.reconcile_interval_minutes * 60:
            return
        state["last"] = time.monotonic()
        state["running"] = True

        async def run() -> None:
            try:
                await worker.reconcile()
            except Exception:
                log.exception("reconciliation failed")
            finally:
                state["running"] = False

        asyncio.create_task(run())

    return worker
