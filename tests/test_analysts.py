"""Analysts' and ops' view of the running processes: ``execution sql`` while ``execution sink``
runs (it owns the embedded chDB, which no other process can open then), and the probes and
metrics of the sink and the bridge, each a real child process against a real broker."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import nats
import orjson
import pytest

from app.local import Services, free_port
from app.sample import signal_dict
from app.settings import Settings
from app.topics import ensure_topics
from support import exported_names, monitoring_metric_names, wait_until
from test_clickhouse_sink import execution_records, order_records, produce

pytestmark = pytest.mark.slow


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError):
        return 0, ""


async def ready(port: int) -> bool:
    return (await asyncio.to_thread(get, port, "/readyz"))[0] == 200


def sql(services: Services, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", "sql", *args], env=services.env(),
                          capture_output=True, text=True, timeout=120)


async def test_sql_while_the_sink_runs(stack, settings: Settings, tmp_path: Path):
    await ensure_topics(settings)
    await produce(settings, order_records(range(5)) + execution_records(range(5)))
    services = Services(stack, tmp_path, partitions=settings.topic_partitions)
    try:
        sink = services.sink()
        services.extra_env["EXECUTION_SINK_URL"] = f"http://127.0.0.1:{sink.web_port}"
        await wait_until(lambda: ready(sink.web_port), timeout=90, what="the sink ready")
        assert (await asyncio.to_thread(get, sink.web_port, "/livez"))[0] == 200

        def loaded() -> list | None:
            done = sql(services, "SELECT count() AS n FROM executions", "--format", "json")
            rows = json.loads(done.stdout) if done.returncode == 0 else None
            return rows if rows == [{"n": 5}] else None

        await wait_until(lambda: asyncio.to_thread(loaded), timeout=60, what="5 executions in ClickHouse")
        table = sql(services, "SELECT order_id, state FROM orders ORDER BY order_id")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["order_id", "state"] and lines[-1] == "(5 rows)"
        assert all(line.split()[1] == "FILLED" for line in lines[2:-1])
        as_csv = sql(services, "SELECT state, count() AS n FROM orders GROUP BY state", "--format", "csv")
        assert as_csv.stdout.splitlines() == ["state,n", "FILLED,5"]

        # Read-only: ClickHouse itself refuses a write, and the answer says why.
        refused = sql(services, "DROP TABLE orders_log")
        assert refused.returncode != 0 and "readonly" in refused.stderr.lower()
        # The chDB directory is the sink's while it runs: without the sink's endpoint the
        # command says so instead of a lock error.
        unreachable = sql(services, "SELECT 1", "--url", f"http://127.0.0.1:{free_port()}")
        assert unreachable.returncode != 0 and "open in another process while `execution sink`" in unreachable.stderr

        status, metrics = await asyncio.to_thread(get, sink.web_port, "/metrics")
        assert status == 200 and 'execution_sink_rows_total{table="executions"} 5.0' in metrics
        assert "# TYPE execution_sink_rows_total counter" in metrics
        sink_used = {n for n in monitoring_metric_names() if n.startswith("execution_sink_")}
        assert sink_used and sink_used <= exported_names(metrics)
    finally:
        services.stop_all()


async def test_the_bridge_has_probes_and_counts_what_it_forwards(stack, settings: Settings, tmp_path: Path):
    await ensure_topics(settings)
    services = Services(stack, tmp_path, partitions=settings.topic_partitions)
    try:
        bridge = services.bridge()
        await wait_until(lambda: ready(bridge.web_port), timeout=60, what="the bridge ready")
        assert (await asyncio.to_thread(get, bridge.web_port, "/livez"))[0] == 200
        nc = await nats.connect(**settings.nats_options())
        try:
            js = nc.jetstream()
            s = signal_dict("probe-1", random.Random(1))
            await js.publish(f"signals.approved.{s['symbol']}", orjson.dumps(s))
            await js.publish("signals.approved.EURUSD", b"{not json")
        finally:
            await nc.close()

        async def counted() -> bool:
            _, text = await asyncio.to_thread(get, bridge.web_port, "/metrics")
            return ('execution_bridge_forwarded_total{topic="signals.approved"} 1.0' in text
                    and 'execution_bridge_dead_letters_total{topic="signals.dlq"} 1.0' in text)

        await wait_until(counted, timeout=30, what="the bridge's counters")
        _, text = await asyncio.to_thread(get, bridge.web_port, "/metrics")
        bridge_used = {n for n in monitoring_metric_names() if n.startswith("execution_bridge_")}
        assert bridge_used and bridge_used <= exported_names(text)
    finally:
        services.stop_all()
