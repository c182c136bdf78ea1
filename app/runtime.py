"""What a worker process holds besides Faust: settings, symbols, the live config, the NATS
connection and the MT5 connector client, and the counters behind ``/metrics``.

Connections open lazily on first use (agents start before any Faust startup hook we could
await), guarded by a lock so concurrent first uses share one connection.
"""

from __future__ import annotations

import asyncio
import logging
import math
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import nats

from app import retry
from app.hub import ConfigHub
from app.settings import Settings
from tables.symbols import SymbolTable

log = logging.getLogger(__name__)


#: Upper bounds of the slippage histogram buckets, pips (+ = adverse, - = in our favour).
SLIPPAGE_BUCKETS: tuple[float, ...] = (
    -10.0, -5.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, math.inf)


#: Upper bounds of the stage-latency histogram buckets, seconds.
STAGE_BUCKETS: tuple[float, ...] = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, math.inf)

#: Where a record's time goes in a worker, per agent (``execution_stage_seconds``): ``kafka``
#: from the record's timestamp (its producer's send) until Faust's conductor took it from the
#: consumer (broker, fetch, the consumer thread's hand-over); ``faust`` from there to the
#: agent's handler (Faust's stream delivery, the batch window); ``commit`` the batch's commit
#: (outputs acked, tables written, after-commit work), once per batch.
STAGES: tuple[str, ...] = ("kafka", "faust", "commit")


@dataclass
class Histogram:
    """A Prometheus histogram: fixed buckets, counters that only grow (per process)."""

    bounds: tuple[float, ...] = SLIPPAGE_BUCKETS  # sorted, the last one +Inf
    #: Observations per bucket (not cumulative): ``counts[i]`` holds bounds[i-1] < v <= bounds[i].
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        if math.isnan(value):
            return  # no bucket holds NaN, and it would poison the sum for ever
        self.counts[min(bisect_left(self.bounds, value), len(self.counts) - 1)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(le, observations <= le)`` for every bucket, as exposed."""
        out, running = [], 0
        for le, n in zip(self.bounds, self.counts):
            running += n
            out.append((le, running))
        return out


#: Every counter a worker exports (``execution_<name>_total``), with its help text: /metrics
#: lists each from the start (at 0), so dashboards and alert rules never meet a missing
#: series, and the tests check the rules in ``k8s/`` use only these names.
COUNTERS: dict[str, str] = {
    "orders_created": "orders created from approved signals",
    "order_transitions": "order state transitions, by the state reached",
    "duplicate_signals": "signals seen again (redelivery, replay) and not executed again",
    "submissions": "trade requests sent to the broker",
    "fills": "broker deals applied to orders",
    "duplicate_fills": "deals seen again (their ticket already applied)",
    "unknown_fills": "deals for no known order (to fills.dlq)",
    "foreign_deals": "deals of another magic number (manual trades), reported, not merged",
    "position_exits": "exits (SL, TP, stop-out, closes) applied to positions",
    "slippage_alerts": "fills whose slippage was above the alert threshold",
    "stuck_orders_checked": "orders asked about at the broker after no news for the stuck-order timeout",
    "commands_accepted": "cancel, modify and close commands accepted",
    "commands_refused": "commands the order's state refused",
    "dead_letters": "input records dead-lettered, by dead-letter topic",
    "reconciliations": "position reconciliations run against the broker",
    "reconciliations_failed": "reconciliations that could not get the broker's snapshot",
    "reconciliation_discrepancies": "differences between our positions and the broker's",
    "reconciliation_foreign_positions": "broker positions of another magic number (not ours)",
    "positions_corrected": "positions set to the broker's by auto-correction",
}


@dataclass
class Metrics:
    """Process-local counters (Prometheus counters are per process too)."""

    counters: Counter = field(default_factory=Counter)
    #: symbol -> slippage histogram (pips), exposed as ``execution_slippage_pips``.
    slippage: dict[str, Histogram] = field(default_factory=dict)

    #: (agent, stage) -> seconds, exposed as ``execution_stage_seconds``.
    stages: dict[tuple[str, str], Histogram] = field(default_factory=dict)

    def inc(self, name: str, n: int = 1, **labels: str) -> None:
        if name not in COUNTERS:
            raise ValueError(f"undeclared counter {name!r}: add it to app.runtime.COUNTERS")
        self.counters[(name, tuple(sorted(labels.items())))] += n

    def observe_stage(self, agent: str, stage: str, seconds: float) -> None:
        hist = self.stages.get((agent, stage))
        if hist is None:
            if stage not in STAGES:
                raise ValueError(f"unknown stage {stage!r}")
            hist = self.stages[(agent, stage)] = Histogram(bounds=STAGE_BUCKETS)
        hist.observe(seconds)

    def observe_slippage(self, symbol: str, pips: float) -> None:
        hist = self.slippage.get(symbol)
        if hist is None:
            hist = self.slippage[symbol] = Histogram()
        hist.observe(pips)


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.symbols = SymbolTable.from_env()
        self.hub = ConfigHub()
        self.metrics = Metrics()
        self._nc: Any = None
        self._mt5: Any = None
        self._lock = asyncio.Lock()
        self._hub_task: asyncio.Task | None = None

    @property
    def config(self):
        """The live operational config (``OperationalConfig.operational``)."""
        return self.hub.current.operational

    async def nats(self) -> Any:
        if self._nc is None or self._nc.is_closed:
            async with self._lock:
                if self._nc is None or self._nc.is_closed:
                    nc = await nats.connect(
                        **self.settings.nats_options(),
                        connect_timeout=2,
                        max_reconnect_attempts=-1,
                        reconnect_time_wait=0.5,
                    )
                    log.info("connected to NATS %s", nc.connected_url.netloc if nc.connected_url else "?")
                    self._nc = nc
                    self._hub_task = asyncio.create_task(self._start_hub(nc), name="config-hub")
        return self._nc

    async def _start_hub(self, nc: Any) -> None:
        """Follow the central hub; until it answers, the safe defaults (or last good) apply."""
        await retry.until_done(
            "config hub unavailable: safe defaults stay", lambda: asyncio.wait_for(self.hub.start(nc), timeout=10),
            initial=1.0, maximum=30.0, on_failure=lambda _exc: self.hub.stop(), logger=log)
        log.info("config hub: following %s (revision %s)", "execution_config/execution", self.hub.revision)

    async def mt5(self) -> Any:
        from app.mt5.contract import MT5Client

        nc = await self.nats()
        if self._mt5 is None:
            self._mt5 = MT5Client(nc, timeout=self.config.submission.reply_timeout_seconds)
        self._mt5.timeout = self.config.submission.reply_timeout_seconds
        return self._mt5

    async def close(self) -> None:
        if self._hub_task is not None:
            self._hub_task.cancel()
        await self.hub.stop()
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()
