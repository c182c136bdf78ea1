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
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

#: ``(name, labels, value)`` of one Prometheus series; counters end in ``_total``.
Series = tuple[str, dict[str, str], float]


def prometheus_text(prefix: str, series: Iterable[Series]) -> str:
    """Prometheus exposition text: ``# TYPE`` once per name (``counter`` for names ending in
    ``_total``, else ``gauge``), then its samples."""
    by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
    for name, labels, value in series:
        by_name.setdefault(name, []).append((labels, value))
    lines = []
    for name, samples in by_name.items():
        kind = "counter" if name.endswith("_total") else "gauge"
        lines.append(f"# TYPE {prefix}_{name} {kind}")
        for labels, value in samples:
            inner = ",".join(f'{k}="{str(v).replace(chr(34), "")}"' for k, v in sorted(labels.items()))
            lines.append(f"{prefix}_{name}{'{' + inner + '}' if inner else ''} {value}")
    return "\n".join(lines) + "\n"


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
