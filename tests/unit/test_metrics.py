"""The ``/metrics`` exposition: the slippage histogram is a real Prometheus histogram."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from prometheus_client.parser import text_string_to_metric_families

from app.runtime import Metrics
from app.web import prometheus

def histogram(text: str, symbol: str) -> tuple[list[tuple[float, int]], float, int]:
    """(le, cumulative count) in exposition order, _sum and _count of one symbol, read with
    prometheus_client's own parser."""
    buckets, total, count = [], None, None
    for family in text_string_to_metric_families(text):
        if family.name != "execution_slippage_pips":
            continue
        for sample in family.samples:
            if sample.labels.get("symbol") != symbol:
                continue
            if sample.name.endswith("_bucket"):
                buckets.append((float(sample.labels["le"]), int(sample.value)))
            elif sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = int(sample.value)
    assert total is not None and count is not None, text
    return buckets, total, count


def test_slippage_histogram_counts_every_observation_forever():
    rng = random.Random(7)
    rt = SimpleNamespace(metrics=Metrics())
    seen: list[float] = []
    for scrape in range(3):
        for _ in range(12_000):  # more than the old 10,000-value cap, at each step
            v = round(rng.gauss(0.3, 4), 1)
            seen.append(v)
            rt.metrics.observe_slippage("EURUSD", v)
        rt.metrics.observe_slippage("GBPUSD", -0.7)
        text = prometheus(rt, [])
        assert text.count("# TYPE execution_slippage_pips histogram") == 1
        buckets, total, count = histogram(text, "EURUSD")
        assert count == len(seen) == 12_000 * (scrape + 1)
        assert total == pytest.approx(sum(seen))
        les = [le for le, _ in buckets]
        assert les == sorted(les) and les[-1] == float("inf") and min(les) < 0
        counts = [n for _, n in buckets]
        assert counts == sorted(counts), "cumulative buckets must not decrease"
        assert counts[-1] == count
        for le, n in buckets:
            assert n == sum(1 for v in seen if v <= le), le
        g_buckets, g_total, g_count = histogram(text, "GBPUSD")
        assert g_count == scrape + 1 and g_total == pytest.approx(-0.7 * (scrape + 1))
        assert dict(g_buckets)[-1.0] == 0 and dict(g_buckets)[-0.5] == scrape + 1


def test_every_declared_counter_is_exported_from_the_start_and_others_are_refused():
    from app.runtime import COUNTERS

    m = Metrics()
    m.inc("fills", symbol="EURUSD")
    text = prometheus(SimpleNamespace(metrics=m), [])
    for name in COUNTERS:
        assert f"# TYPE execution_{name}_total counter" in text
    values = {(s.name, tuple(s.labels.items())): s.value
              for f in text_string_to_metric_families(text) for s in f.samples}
    assert values[("execution_fills_total", (("symbol", "EURUSD"),))] == 1
    assert values[("execution_orders_created_total", ())] == 0
    with pytest.raises(ValueError, match="undeclared counter"):
        m.inc("filsl")


async def test_a_batch_times_each_record_by_stage():
    import time

    from faust.types import Message

    from agents.common import process_batch

    def message(offset: int, produced_ago: float, in_faust_for: float | None) -> Message:
        m = Message("signals.approved", 0, offset, time.time() - produced_ago, 0, None, b"k", b"v", None,
                    time_in=None if in_faust_for is None else time.monotonic() - in_faust_for, generation_id=1)
        return m

    rt = SimpleNamespace(metrics=Metrics())
    ctx = SimpleNamespace(app=SimpleNamespace(consumer_generation_id=1), rt=rt)
    events = [SimpleNamespace(message=message(1, 0.30, 0.10)), SimpleNamespace(message=message(2, 5.0, None))]
    await process_batch(ctx, events, lambda event, batch: None, lambda e: "signals.dlq", "orders")

    stages = {}
    for family in text_string_to_metric_families(prometheus(rt, [])):
        if family.name == "execution_stage_seconds":
            for s in family.samples:
                stages[(s.labels["stage"], s.name.rsplit("_", 1)[-1], s.labels.get("le"))] = s.value
    # one record timed (the other never went through Faust's monitor), split at the conductor
    assert stages[("kafka", "count", None)] == 1 and stages[("faust", "count", None)] == 1
    assert stages[("kafka", "sum", None)] == pytest.approx(0.20, abs=0.05)
    assert stages[("faust", "sum", None)] == pytest.approx(0.10, abs=0.05)
    assert stages[("faust", "bucket", "0.05")] == 0 and stages[("faust", "bucket", "0.2")] == 1
    assert ("commit", "count", None) not in stages, "an empty batch commits nothing"
    with pytest.raises(ValueError):
        rt.metrics.observe_stage("orders", "elsewhere", 1.0)


def test_fausts_sensor_keeps_per_partition_and_rebalance_metrics_and_skips_per_record_ones():
    from faust.types import TP, Message
    from prometheus_client import CollectorRegistry, generate_latest

    from app.web import FaustSensor

    registry = CollectorRegistry()
    sensor = FaustSensor.create(registry, "execution_faust")
    message = Message("fills", 1, 7, 0.0, 0, None, b"k", b"v", None)
    sensor.on_message_in(TP("fills", 1), 7, message)
    assert message.time_in is not None, "Faust's base monitor still times the message (execution_stage_seconds)"
    sensor.on_tp_commit({TP("fills", 1): 8})
    names = {f.name for f in registry.collect()}
    assert {"execution_faust_consumer_commit_latency", "execution_faust_rebalance_done_latency",
            "execution_faust_total_rebalances", "execution_faust_topic_partition_offset_commited",
            "execution_faust_topic_partition_end_offset"} <= names
    assert not names & {f"execution_faust_{n}" for n in FaustSensor.PER_RECORD}
    text = generate_latest(registry).decode()
    assert 'execution_faust_topic_partition_offset_commited{partition="1",topic="fills"} 8.0' in text
