"""The worker's web endpoints (Faust's web server, port 8012 by default).

* ``/readyz`` (and ``/health``, with ``?detail=1`` for the consumer's state): 200 only when
  the Kafka broker answers and the tables have recovered (the readiness probe: a worker
  replaying its changelogs is alive but not ready).
* ``/livez``: 200 while the event loop answers and the app has not crashed, recovering or
  not (the liveness probe).
* ``/metrics``: Prometheus text format.
* ``/orders/{order_id}``: the order from the ``orders`` table, answered by the worker that
  owns the key's partition (Faust forwards the request to it).
* ``/positions/{account}/{symbol}``: one position, routed the same way;
  ``/positions``: the positions held by this worker's partitions (``worker`` says which).
* ``/config``: the operational config in force here, and its hub revision.
* ``/openapi.json``: the OpenAPI 3.1 document of these endpoints (:mod:`app.openapi`).
* ``POST /orders/{order_id}/cancel``, ``POST /orders/{order_id}/modify``,
  ``POST /positions/{account}/{symbol}/close``: commands, with a bearer token; and the same
  on NATS (``execution.orders.cancel`` ...): :mod:`app.commands_api`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import faust
from faust.web import Request, Response, View
from faust.sensors.monitor import Monitor
from faust.sensors.prometheus import FaustMetrics, PrometheusMonitor
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from app import commands_api, openapi
from app.faust_patches import active_partitions, paused_partitions, read_offset, read_offsets, table_get
from app.models import OrderState, position_key, to_dict
from app.http_server import exposition, gauge_families
from app.runtime import COUNTERS, Histogram, Runtime
from tables.definitions import Tables


def _buckets(h: Histogram) -> list[tuple[str, int]]:
    """A histogram's cumulative buckets as prometheus_client takes them (``le`` as text)."""
    return [("+Inf" if le == float("inf") else repr(le), n) for le, n in h.cumulative()]


def prometheus(rt: Runtime, extra: list[tuple[str, dict[str, str], float]]) -> str:
    """The worker's own metrics in Prometheus text format (prometheus_client): every declared
    counter (from 0), the slippage histogram per symbol, and the gauges in ``extra``."""

    def collect() -> Iterator[Metric]:
        by_name: dict[str, list[tuple[tuple, float]]] = {}
        for (name, labels), value in sorted(rt.metrics.counters.items()):
            by_name.setdefault(name, []).append((labels, value))
        for name, help_text in COUNTERS.items():
            family = CounterMetricFamily(f"execution_{name}", help_text)
            for labels, value in by_name.get(name) or [((), 0)]:  # declared counters show from the start
                family.add_sample(f"execution_{name}_total", dict(labels), value)
            yield family
        hist = HistogramMetricFamily("execution_slippage_pips", "slippage per fill, pips, + = adverse",
                                     labels=["symbol"])
        for symbol, h in sorted(rt.metrics.slippage.items()):
            # Cumulative counts kept since the process started (never re-bucketed from samples).
            hist.add_metric([symbol], buckets=_buckets(h), sum_value=None)
            # prometheus_client leaves _count and _sum out when a bucket is negative (gauge
            # histograms); slippage has favourable, negative values and is counted all the same.
            hist.add_sample("execution_slippage_pips_count", {"symbol": symbol}, h.count)
            hist.add_sample("execution_slippage_pips_sum", {"symbol": symbol}, h.sum)
        yield hist
        stages = HistogramMetricFamily(
            "execution_stage_seconds", "time of a record in each stage of a worker, by agent (app.runtime.STAGES)",
            labels=["agent", "stage"])
        for (agent, stage), h in sorted(rt.metrics.stages.items()):
            stages.add_metric([agent, stage], buckets=_buckets(h), sum_value=h.sum)
        yield stages
        yield from gauge_families("execution", extra)

    return exposition(collect)


class FaustSensor(PrometheusMonitor):
    """Faust's Prometheus sensor for what its per-batch and per-rebalance hooks see: offsets
    read and committed per partition (consumer lag), commit latency, rebalances and
    assignments, send errors, web requests.  Its per-record hooks (every message, stream
    event, table read or write and send) run Faust's base monitor only: on the worker's one
    busy thread they cost several per cent of its time (bench/README.md), and the service's
    own counters already count what matters per record.  The families those hooks would
    fill are not exported, rather than exported at 0."""

    on_message_in = Monitor.on_message_in
    on_stream_event_in = Monitor.on_stream_event_in
    on_stream_event_out = Monitor.on_stream_event_out
    on_message_out = Monitor.on_message_out
    on_table_get = Monitor.on_table_get
    on_table_set = Monitor.on_table_set
    on_table_del = Monitor.on_table_del
    on_send_initiated = Monitor.on_send_initiated
    on_send_completed = Monitor.on_send_completed

    PER_RECORD = ("messages_received", "active_messages", "messages_received_per_topics",
                  "messages_received_per_topics_partition", "events_runtime_latency", "total_events",
                  "total_active_events", "total_events_per_stream", "table_operations", "topic_messages_sent",
                  "total_sent_messages", "producer_send_latency")

    @classmethod
    def create(cls, registry: CollectorRegistry, prefix: str) -> "FaustSensor":
        metrics = FaustMetrics.create(registry, prefix)
        for name in cls.PER_RECORD:
            registry.unregister(getattr(metrics, name))
        return cls(metrics=metrics)


def register(app: faust.App, rt: Runtime, tables: Tables) -> None:
    broker_check: dict[str, Any] = {"at": 0.0, "ok": False}
    # Faust's own Prometheus sensor (FaustSensor) as execution_faust_*, served with the
    # service's metrics on /metrics.
    faust_registry = CollectorRegistry(auto_describe=True)
    app.monitor = FaustSensor.create(faust_registry, "execution_faust")

    async def broker_reachable() -> bool:
        if time.monotonic() - broker_check["at"] < 2.0:
            return broker_check["ok"]
        ok = False
        for server in rt.settings.kafka_bootstrap_servers.split(","):
            host, _, port = server.rpartition(":")
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host or "127.0.0.1", int(port)), 1.0)
                writer.close()
                ok = True
                break
            except (OSError, asyncio.TimeoutError, ValueError):
                continue
        broker_check.update(at=time.monotonic(), ok=ok)
        return ok

    def recovered() -> bool:
        recovery = app.tables.recovery
        return recovery.completed.is_set() and not recovery.in_recovery and not app.rebalancing

    async def readiness() -> tuple[bool, bool]:
        """(broker reachable, tables recovered): ready when both (``/readyz``, ``execution_ready``)."""
        return await broker_reachable(), recovered()

    @app.page("/livez")
    class Live(View):
        """Liveness: the event loop answers and the app has not crashed.  Never depends on
        Kafka or on recovery, so a long changelog replay does not get the pod killed."""

        async def get(self, request: Request) -> Response:
            crashed = app.crashed
            body = {"status": "crashed" if crashed else "alive", "recovering": not recovered()}
            if crashed:
                body["reason"] = repr(app.crash_reason)[:300]
            return self.json(body, status=503 if crashed else 200)

    @app.page("/readyz")
    class Ready(View):
        """Readiness: the same check as ``/health``."""

        async def get(self, request: Request) -> Response:
            return await Health.get(self, request)  # type: ignore[arg-type]

    @app.page("/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            broker, tables_ok = await readiness()
            body = {
                "status": "ok" if broker and tables_ok else "unavailable",
                "broker": broker,
                "tables_recovered": tables_ok,
                "assigned_partitions": len(app.assignor.assigned_actives()),
                "rebalances": app.rebalancing_count,  # since this worker started
                "config_revision": rt.hub.revision,
            }
            if request.query.get("detail"):
                consumer = app.consumer
                body["paused"] = sorted(f"{tp.topic}[{tp.partition}]" for tp in paused_partitions(consumer))
                body["active"] = sorted(f"{tp.topic}[{tp.partition}]" for tp in active_partitions(consumer))
                body["read_offsets"] = {f"{tp.topic}[{tp.partition}]": o for tp, o in read_offsets(consumer).items()}
                body["flow_control_suspended"] = app.flow_control.is_active() is False
                body["rebalancing"] = app.rebalancing
            return self.json(body, status=200 if broker and tables_ok else 503)

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            extra: list[tuple[str, dict[str, str], float]] = []
            consumer = app.consumer
            for tp in sorted(app.assignor.assigned_actives()):
                try:
                    hw = consumer.highwater(tp)
                except Exception:
                    continue
                read = read_offset(consumer, tp)  # last offset handed to an agent
                lag = max(0, (hw or 0) - ((read + 1) if read is not None else 0))
                extra.append(("consumer_lag", {"topic": tp.topic, "partition": str(tp.partition)}, lag))
            states: dict[str, int] = {s.value: 0 for s in OrderState}
            for order_id, _ in tables.open_orders.items():
                order = table_get(tables.orders, order_id)
                if order is not None:
                    states[order.state.value] += 1
            for state, n in states.items():
                if not OrderState(state).is_final:
                    extra.append(("open_orders", {"state": state}, n))
            extra.append(("ready", {}, int(all(await readiness()))))  # 1 when /readyz answers 200
            extra.append(("config_revision", {}, rt.hub.revision))
            extra.append(("config_rejected", {}, rt.hub.rejected))
            text = prometheus(rt, extra) + generate_latest(faust_registry).decode()
            return self.text(text, content_type="text/plain; version=0.0.4")

    @app.page("/orders/{order_id}")
    @app.table_route(table=tables.orders, match_info="order_id")
    async def order(web: View, request: Request, order_id: str) -> Response:
        found = tables.orders.get(order_id)
        if found is None:
            return web.json({"error": f"order {order_id} not found"}, status=404)
        return web.json(to_dict(found))

    @app.page("/positions/{account}/{symbol}")
    async def position(web: View, request: Request, account: str, symbol: str) -> Response:
        key = position_key(account, symbol)
        routed = await _route(app, tables.positions, key, request)
        if routed is not None:
            return routed
        found = tables.positions.get(key)
        if found is None:
            return web.json({"error": f"no position {key}"}, status=404)
        return web.json(to_dict(found))

    @app.page("/positions")
    class Positions(View):
        async def get(self, request: Request) -> Response:
            out = [to_dict(p) for _, p in tables.positions.items()]
            return self.json({"worker": app.conf.canonical_url.host, "positions": out})

    @app.page("/openapi.json")
    class OpenAPI(View):
        async def get(self, request: Request) -> Response:
            return self.json(openapi.document())

    @app.page("/config")
    class Config(View):
        async def get(self, request: Request) -> Response:
            return self.json({"revision": rt.hub.revision, "config": rt.hub.current.model_dump(mode="json")})

    commands_api.register(app, rt, tables)


async def _route(app: faust.App, table: faust.Table, key: str, request: Request) -> Response | None:
    """Forward to the worker owning ``key``'s partition, or None when that is this worker."""
    from faust.exceptions import SameNode

    try:
        return await app.router.route_req(table.name, key, app.web, request)
    except SameNode:
        return None
