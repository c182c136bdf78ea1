"""The small HTTP server of the processes that are not Faust workers (the bridge, the sink).

Every one answers the same probes as the worker:

* ``GET /livez``: 200 while the process's event loop answers (Kubernetes' liveness probe:
  failing it restarts the container, so it never depends on Kafka, NATS or ClickHouse);
* ``GET /readyz`` and ``GET /health``: 200 when the process can do its work (its ``ready``
  check), else 503; the JSON body says what is missing;
* ``GET /metrics``: Prometheus text from the process's counters and gauges;

plus the routes the process adds (the sink's ``/query``).  ``port`` 0 means no server.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

#: ``(name, labels, value)`` of one Prometheus series; counters end in ``_total``.
Series = tuple[str, dict[str, str], float]


def exposition(collect: Callable[[], Iterable[Metric]]) -> str:
    """Prometheus text format 0.0.4 of the metric families ``collect()`` yields, written by
    prometheus_client (a registry per scrape: the values are read when asked)."""

    class _Collector:
        def collect(self) -> Iterable[Metric]:
            return collect()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def gauge_families(prefix: str, series: Iterable[Series]) -> Iterator[Metric]:
    """One family per name: a counter for names ending in ``_total``, else a gauge."""
    by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
    for name, labels, value in series:
        by_name.setdefault(name, []).append((labels, value))
    for name, samples in by_name.items():
        full = f"{prefix}_{name}"
        family: Metric
        if name.endswith("_total"):
            family = CounterMetricFamily(full[: -len("_total")], name)
        else:
            family = GaugeMetricFamily(full, name)
        for labels, value in samples:
            family.add_sample(full, {k: str(v) for k, v in labels.items()}, value)
        yield family


def prometheus_text(prefix: str, series: Iterable[Series]) -> str:
    """Prometheus text of ``(name, labels, value)`` series (``_total``: counters)."""
    series = list(series)
    return exposition(lambda: gauge_families(prefix, series))


class ProbeServer:
    """``/livez``, ``/readyz``, ``/health`` and ``/metrics`` for one process.

    ``ready()`` returns (ready, details); ``metrics()`` the process's series."""

    def __init__(self, name: str, host: str, port: int, *, ready: Callable[[], Awaitable[tuple[bool, dict]]],
                 metrics: Callable[[], Iterable[Series]], routes: Iterable[web.RouteDef] = ()) -> None:
        self.name, self.host, self.port = name, host, port
        self._ready, self._metrics = ready, metrics
        self._app = web.Application()
        self._app.add_routes([
            web.get("/livez", self._livez), web.get("/readyz", self._readyz), web.get("/health", self._readyz),
            web.get("/metrics", self._metrics_view), *routes,
        ])
        self._runner: web.AppRunner | None = None

    async def start(self) -> "ProbeServer":
        if self.port <= 0:
            return self
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        log.info("%s: HTTP on %s:%d (/livez, /readyz, /metrics)", self.name, self.host, self.port)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _livez(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "process": self.name})

    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            ok, details = await self._ready()
        except Exception as exc:  # a failing check is "not ready", never a 500
            ok, details = False, {"error": f"{type(exc).__name__}: {exc}"}
        body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "process": self.name, **details}
        return web.json_response(body, status=200 if ok else 503)

    async def _metrics_view(self, request: web.Request) -> web.Response:
        return web.Response(body=prometheus_text("execution", self._metrics()).encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
