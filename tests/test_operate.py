"""Operating it: two workers share the partitions and take over from each other (a graceful
stop, a SIGKILL); the web endpoints answer from both; a hub config change reaches both; the
demo runs end to end."""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.models import OrderState
from app.sample import REFERENCE, signal_dict
from pipeline import TEST_CONFIG, Pipeline
from support import exported_names, monitoring_metric_names
from tables.idempotency import order_id_for

pytestmark = pytest.mark.slow

PARTITIONS = 4


def get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


async def wait_health(port: int, timeout: float = 60) -> dict:
    for _ in range(int(timeout * 2)):
        status, body = await asyncio.to_thread(get, port, "/health")
        if status == 200:
            return body
        await asyncio.sleep(0.5)
    raise TimeoutError(f"worker on {port} not healthy: {body}")


async def test_two_workers_share_partitions_and_take_over(tmp_path: Path):
    # A static member (the production profile) that stops keeps its partitions until its
    # session expires, so worker-2 takes over after that: a short session keeps it brief.
    p = Pipeline(tmp_path, partitions=PARTITIONS, env={"EXECUTION_BROKER_SESSION_TIMEOUT": "8"})
    await p.start(workers=2)
    try:
        for symbol, (mid, _) in REFERENCE.items():
            await p.sim(cmd="set_price", symbol=symbol, mid=mid, hold=True)
        w1, w2 = p.services.running["worker-1"], p.services.running["worker-2"]
        h1, h2 = await wait_health(w1.web_port), await wait_health(w2.web_port)
        assert h1["assigned_partitions"] > 0 and h2["assigned_partitions"] > 0, "partitions are shared"
        # the probes Kubernetes uses: ready = /health; alive, and not recovering
        assert (await asyncio.to_thread(get, w1.web_port, "/readyz"))[0] == 200
        assert (await asyncio.to_thread(get, w1.web_port, "/livez")) == (200, {"status": "alive", "recovering": False})
        # every worker metric the alert rules and the dashboard use is on a live /metrics
        with urllib.request.urlopen(f"http://127.0.0.1:{w1.web_port}/metrics", timeout=10) as r:
            live = exported_names(r.read().decode())
        used = {n for n in monitoring_metric_names() if not n.startswith(("execution_bridge_", "execution_sink_"))}
        assert used <= live, used - live

        rng = random.Random(21)
        first = [signal_dict(f"two-{i}", rng, order_type="market", lots=0.1) for i in range(40)]
        await p.publish_signals(first)
        ids = [order_id_for(s["signal_id"], PARTITIONS) for s in first]
        await p.wait_orders(ids)

        # Every order is answered by either worker (forwarded to the owner of its partition).
        for i in ids[:10]:
            for w in (w1, w2):
                status, body = await asyncio.to_thread(get, w.web_port, f"/orders/{i}")
                assert status == 200 and body["order_id"] == i and body["state"] == "FILLED"

        # A config change in the hub reaches both workers.
        cfg = {"operational": {**TEST_CONFIG["operational"], "fill_tracking": {"slippage_alert_threshold_pips": 7}}}
        await p.set_config(cfg)
        for w in (w1, w2):
            for _ in range(20):
                _, body = await asyncio.to_thread(get, w.web_port, "/config")
                if body["config"]["operational"]["fill_tracking"]["slippage_alert_threshold_pips"] == 7:
                    break
                await asyncio.sleep(0.5)
            else:
                raise AssertionError(f"{w.name} did not get the config change: {body}")

        # worker-1 stops; worker-2 takes all partitions, with the tables recovered.
        await asyncio.to_thread(w1.stop)
        for _ in range(120):
            status, body = await asyncio.to_thread(get, w2.web_port, "/health")
            if status == 200 and body["assigned_partitions"] > h2["assigned_partitions"]:
                break
            await asyncio.sleep(0.5)
        else:
            raise AssertionError(f"worker-2 did not take over: {body}")
        for i in ids[:10]:
            status, body = await asyncio.to_thread(get, w2.web_port, f"/orders/{i}")
            assert status == 200 and body["state"] == "FILLED", "table recovered from the changelog"

        # The same signals again plus new ones: no duplicate order, nothing lost.
        second = [signal_dict(f"two-b-{i}", rng, order_type="market", lots=0.1) for i in range(20)]
        await p.publish_signals(first + second)
        ids2 = [order_id_for(s["signal_id"], PARTITIONS) for s in second]
        orders = await p.wait_orders(ids + ids2)
        assert all(orders[i].state is OrderState.FILLED for i in ids + ids2)
        events = await p.events()
        for i in ids + ids2:
            assert [e.type.value for e in events[i]].count("created") == 1
        stats = await p.sim_stats()
        assert all(stats["executed"][i] == 1 for i in ids + ids2)
        _, metrics = 200, await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{w2.web_port}/metrics", timeout=5).read().decode())
        assert "execution_duplicate_signals_total" in metrics
        assert "execution_consumer_lag" in metrics
        # Faust's own sensor: worker-2 committed offsets and went through the take-over rebalance
        faust = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples
                 if s.name.startswith("execution_faust_") and not s.labels}
        assert faust["execution_faust_consumer_commit_latency_count"] > 0, faust
        assert faust["execution_faust_rebalance_done_latency_count"] >= 2, faust

        # worker-1 comes back and the two share again; then worker-2 dies without leaving the
        # group (SIGKILL) while signals flow, and is restarted: it must get partitions again
        # (with static membership on Tansu it re-joined for ever) and nothing may be lost.
        w1 = await asyncio.to_thread(p.services.restart, "worker-1")
        await wait_shared(w1, w2)
        third = [signal_dict(f"two-c-{i}", rng, order_type="market", lots=0.1) for i in range(120)]
        publisher = asyncio.create_task(p.publish_signals(third, rate=40.0))
        await asyncio.sleep(1.0)
        w2 = await asyncio.to_thread(p.services.restart, "worker-2", True)
        await publisher
        await wait_shared(w1, w2)
        ids3 = [order_id_for(s["signal_id"], PARTITIONS) for s in third]
        orders = await p.wait_orders(ids3)
        assert all(orders[i].state is OrderState.FILLED for i in ids3)
        events = await p.events()
        assert all([e.type.value for e in events[i]].count("created") == 1 for i in ids3)
        stats = await p.sim_stats()
        assert all(stats["executed"][i] == 1 for i in ids3)
    finally:
        p.stop()


async def wait_shared(*workers, timeout: float = 90) -> None:
    """Until every worker reports partitions assigned (the group has rebalanced over them)."""
    body: dict = {}
    for _ in range(int(timeout * 2)):
        counts = []
        for w in workers:
            status, body = await asyncio.to_thread(get, w.web_port, "/health")
            counts.append(body.get("assigned_partitions", 0) if status == 200 else 0)
        if all(counts):
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"partitions not shared by {[w.name for w in workers]}: {counts}, {body}")


def test_the_demo_command_runs_end_to_end(tmp_path: Path):
    """``execution demo`` itself, small: it must finish and print a consistent summary."""
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "demo", "--signals", "60", "--rate", "60", "--seed", "5"],
        capture_output=True, text=True, timeout=400, cwd=Path(__file__).resolve().parent.parent,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "== summary ==" in out
    assert "orders by state:" in out and "FILLED" in out
    assert "fill rate:" in out
    assert "slippage by symbol" in out
    assert "reconciliation: ClickHouse positions vs broker: 0 discrepancies" in out
    assert "dead letters:" in out
    assert "forwarded: 0" in out
    # every order snapshot reached NATS once, through the bridge's notifier
    nats_line = re.search(r"NATS \(the bridge's notifier\): (\d+) order updates on orders.> \(of (\d+) snapshots", out)
    assert nats_line and int(nats_line[1]) == int(nats_line[2]) > 0, out[-3000:]
    assert "internal error" not in out  # no record dead-lettered by a bug
    report = out.split("transaction-cost report:")[-1].strip().splitlines()[0]
    from app.report import CHARTS

    assert all(f'id="chart-{i}"' in Path(report).read_text() for i in range(CHARTS))
    # the console shows the demo's progress and summary; the libraries log to a file
    assert " INFO " not in out and "aiokafka" not in out
    logs = Path(out.split("logs in ")[1].split()[0])
    assert "aiokafka" in (logs / "demo.log").read_text()


async def test_static_membership_a_quick_restart_keeps_the_group_a_late_one_rebalances(tmp_path: Path):
    """Static membership on Apache Kafka, as the StatefulSet runs it (``consumer_group_instance_id``
    = the pod's name): a worker SIGKILLed and back within its session timeout gets its
    partitions again without a rebalance of the other worker; one that stays away past it has
    its partitions moved to the other, whose tables recover them.  Both times are printed."""
    session = 20.0
    p = Pipeline(tmp_path, partitions=PARTITIONS, broker="kafka",
                 env={"EXECUTION_BROKER_SESSION_TIMEOUT": str(session)})
    assert p.stack.profile == "production"
    await p.start(workers=2)
    try:
        await p.hold_reference_prices()
        w1, w2 = p.services.running["worker-1"], p.services.running["worker-2"]
        await wait_shared(w1, w2)
        rng = random.Random(33)
        first = [signal_dict(f"static-a-{i}", rng, order_type="market", lots=0.1) for i in range(20)]
        await p.publish_signals(first)
        ids = [order_id_for(s["signal_id"], PARTITIONS) for s in first]
        await p.wait_orders(ids)
        before = await wait_health(w2.web_port)
        mine = before["assigned_partitions"]

        # SIGKILL and back at once: the same member id returns, no rebalance of worker-2.
        killed = time.monotonic()
        w1 = await asyncio.to_thread(p.services.restart, "worker-1", True)
        back = await wait_health(w1.web_port)
        quick = time.monotonic() - killed
        assert back["assigned_partitions"] > 0, "worker-1 has its partitions again"
        after = await wait_health(w2.web_port)
        assert (after["rebalances"], after["assigned_partitions"]) == (before["rebalances"], mine), \
            "worker-2 was not rebalanced"
        second = [signal_dict(f"static-b-{i}", rng, order_type="market", lots=0.1) for i in range(20)]
        await p.publish_signals(second)
        ids2 = [order_id_for(s["signal_id"], PARTITIONS) for s in second]
        assert all(o.state is OrderState.FILLED for o in (await p.wait_orders(ids2)).values())

        # SIGKILL and away: after the session timeout worker-2 takes every partition over.
        killed = time.monotonic()
        await asyncio.to_thread(p.services.running["worker-1"].kill)
        body: dict = {}
        while time.monotonic() - killed < session + 90:
            status, body = await asyncio.to_thread(get, w2.web_port, "/health")
            if status == 200 and body["assigned_partitions"] > mine:
                break
            await asyncio.sleep(0.5)
        else:
            raise AssertionError(f"worker-2 did not take over: {body}")
        late = time.monotonic() - killed
        assert body["rebalances"] > before["rebalances"]
        assert late >= session * 0.9, "the partitions waited for the session to expire"
        for i in ids + ids2:
            status, order = await asyncio.to_thread(get, w2.web_port, f"/orders/{i}")
            assert status == 200 and order["state"] == "FILLED", "tables recovered from the changelogs"
        print(f"static membership (session {session:.0f}s): SIGKILL + restart -> worker-1 healthy in "
              f"{quick:.1f}s, no rebalance; SIGKILL, no restart -> worker-2 holds every partition after {late:.1f}s")
    finally:
        p.stop()


async def test_a_worker_starts_and_stops_without_an_error_line(stack, settings, tmp_path: Path):
    """A fresh cluster, a worker started and stopped with SIGTERM: no ERROR line from start
    (topics, Faust's leader topic and the group coordinator are ready before it joins) to a
    clean exit (the watchdog's probe consumer and the NATS connection closed)."""
    from app.local import Services
    from app.topics import ensure_topics

    await ensure_topics(settings)
    services = Services(stack, tmp_path, partitions=settings.topic_partitions)
    worker = await asyncio.to_thread(services.worker, "worker-1")
    await wait_health(worker.web_port)
    worker.stop()
    assert worker.proc.returncode == 0
    log = worker.log_text()
    assert "[ERROR]" not in log and "Unclosed" not in log and "Traceback" not in log, \
        [line for line in log.splitlines() if "ERROR" in line or "Unclosed" in line][:5]
