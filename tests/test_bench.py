"""Smoke tests of the benchmark scripts in ``bench/``: each script's main coroutine runs with
tiny sizes against the real local stack, and its output and counts are checked.  Nothing is
timed here: the figures themselves are only printed by the scripts."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(name: str):
    """A bench script as a module (``bench/`` is not a package)."""
    key = f"bench_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------
# The parsing and statistics the scripts rely on (pure)
# --------------------------------------------------------------------------------------


FAUST_LOG = """\
[2026-11-26 23:23:11,810] [7283] [INFO] [^---Recovery]: Highwater for active changelog partitions:
+Highwater - Active-----------------+-----------+-----------+
| topic                             | partition | highwater |
+-----------------------------------+-----------+-----------+
| execution-open_orders-changelog   | 0         | -1        |
| 〃                                | 1         | -1        |
| execution-orders-changelog        | 0         | 534       |
| 〃                                | 1         | 482       |
+-----------------------------------+-----------+-----------+
[2026-11-26 23:23:11,813] [7283] [INFO] [^---Recovery]: active offsets at start of reading:
+Reading Starts At - Active---------+-----------+--------+
| topic                             | partition | offset |
+-----------------------------------+-----------+--------+
| execution-open_orders-changelog   | 0         | -1     |
| 〃                                | 1         | -1     |
| execution-orders-changelog        | 0         | -1     |
| 〃                                | 1         | 100    |
+-----------------------------------+-----------+--------+
[2026-11-26 23:23:11,814] [7283] [INFO] [^---Recovery]: Restoring state from changelog topics...
[2026-11-26 23:23:12,314] [7283] [INFO] [^---Recovery]: Done reading from changelog topics
[2026-11-26 23:23:12,354] [7283] [INFO] [^---Recovery]: Worker ready
"""


def test_recovery_reads_the_replay_from_faust_log_lines():
    rec = load("recovery")
    hw = rec.log_tables(FAUST_LOG, "Highwater - Active")
    assert hw == [{("execution-open_orders-changelog", 0): -1, ("execution-open_orders-changelog", 1): -1,
                   ("execution-orders-changelog", 0): 534, ("execution-orders-changelog", 1): 482}]
    spawned = rec.log_time(FAUST_LOG.splitlines()[0]) - 5.0
    r = rec.parse_recovery(FAUST_LOG, "execution-orders-changelog", spawned, spawned + 6.0)
    assert r.replayed == 535 + 382  # highwater (the last offset) minus the offset read up to
    assert r.replay_seconds == pytest.approx(0.5) and r.rounds == 1
    assert r.ready_seconds == pytest.approx(5.544) and r.health_seconds == pytest.approx(6.0)
    assert r.records_per_second == pytest.approx(917 / 0.5)
    none = rec.parse_recovery(FAUST_LOG.replace("Restoring state", "Resuming flow"), "x", spawned, spawned + 6)
    assert (none.replayed, none.replay_seconds, none.records_per_second) == (0, 0.0, None)
    assert rec.changelog_topic("execution") == "execution-orders-changelog"


def test_latency_bucket_quantile_matches_prometheus():
    lat = load("latency")
    buckets = [(0.001, 0.0), (0.002, 10.0), (0.005, 90.0), (0.01, 100.0), (math.inf, 100.0)]
    assert lat.bucket_quantile(0.5, buckets) == pytest.approx(0.002 + 0.003 * 40 / 80)
    assert lat.bucket_quantile(0.05, buckets) == pytest.approx(0.001 + 0.001 * 5 / 10)
    assert lat.bucket_quantile(0.99, buckets) == pytest.approx(0.005 + 0.005 * 9 / 10)
    assert math.isnan(lat.bucket_quantile(0.5, [(math.inf, 0.0)]))


def test_latency_percentiles_and_trend():
    lat = load("latency")
    values = [float(v) for v in range(1, 1001)]
    assert (lat.percentile(values, 50), lat.percentile(values, 99), lat.percentile(values, 99.9)) == (500, 990, 999)
    steady = lat.Run(10, order=["a", "b", "c", "d"], published={"a": 0.0, "b": 0.1, "c": 0.2, "d": 0.3},
                     received={"a": 0.05, "b": 0.15, "c": 0.25, "d": 0.35})
    assert steady.trend() == pytest.approx(0.0, abs=1e-6) and steady.kept_up()
    queued = lat.Run(10, order=["a", "b", "c", "d"], published={"a": 0.0, "b": 0.1, "c": 0.2, "d": 0.3},
                     received={"a": 0.05, "b": 0.25, "c": 0.45, "d": 0.65})
    assert queued.trend() == pytest.approx(1000.0) and not queued.kept_up()
    lost = lat.Run(10, order=["a", "b"], published={"a": 0.0, "b": 0.1}, received={"a": 0.05})
    assert lost.reached == 1 and not lost.kept_up()


# --------------------------------------------------------------------------------------
# The scripts against the real stack, tiny sizes
# --------------------------------------------------------------------------------------


async def test_hot_path_script_measures_each_step_beside_its_baseline():
    hot = load("hot_path")
    figures = await hot.measure(50)
    assert set(figures) == {"bare await", "until_done", "tenacity loop", "murmur2", "aiokafka murmur2", "order_id_for",
                            "wait_first"}
    assert all(math.isfinite(v) and v > 0 for v in figures.values())
    lines = hot.report(figures)
    assert [ln.split()[0] for ln in lines] == ["until_done(step)", "until_done(step)", "murmur2", "order_id_for,", "record"]
    assert all("ratio" in ln for ln in lines[:3] + lines[4:])


THROUGHPUT_OUTPUT = """\
broker: Apache Kafka 4.3.2 (production profile); producer_max_batch_size=16384
raw aiokafka consume->produce pass-through:      12889 msg/s
end to end NATS -> FILLED order + position:         177 signals/s (publisher alone: 1975/s)
ratio end-to-end / pass-through: 0.01
CPU per signal during the end-to-end run (33.9 s wall, 1.54 of 2 cores busy):
  worker-1                        3.79 ms/signal  (0.67 cores)
  kafka                           2.58 ms/signal  (0.46 cores)
  bridge                          0.61 ms/signal  (0.11 cores)
  all                             8.68 ms/signal -> at most 230 signals/s on 2 cores with every core busy
machine: 2 CPUs; load average (1 min) 0.7 at the start, 2.8 at the end (other processes share this machine)
"""


def test_ab_reads_the_figures_and_compares_the_medians():
    ab = load("ab")
    assert ab.parse(THROUGHPUT_OUTPUT) == {"signals/s": 177.0, "worker ms/signal": 3.79, "bridge ms/signal": 0.61,
                                           "broker ms/signal": 2.58, "stack ms/signal": 8.68, "load at start": 0.7}
    a, b = ab.Side("A", ab.ROOT), ab.Side("B", ab.ROOT)
    a.runs = [{"signals/s": 100.0, "worker ms/signal": 4.0}, {"signals/s": 120.0, "worker ms/signal": 5.0},
              {"signals/s": 300.0, "worker ms/signal": 3.0}]
    b.runs = [{"signals/s": 150.0, "worker ms/signal": 2.0}]
    lines = ab.summary(a, b)
    assert lines[1].split() == ["signals/s", "120.00", "150.00", "1.25"]
    assert lines[2].split() == ["worker", "ms/signal", "4.00", "2.00", "0.50"]
    assert len(lines) == 3  # no stack figure on either side: no row


def test_ab_checks_out_each_revision_into_its_own_worktree(tmp_path):
    import argparse
    import subprocess

    ab = load("ab")
    # HEAD twice: a shallow clone (CI's) may hold no other revision.
    a, b = ab.sides(argparse.Namespace(rev=["HEAD", "HEAD"], env=None), tmp_path)
    try:
        heads = [subprocess.run(["git", "-C", str(s.tree), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip() for s in (a, b)]
        expected = [subprocess.run(["git", "-C", str(ab.ROOT), "rev-parse", rev], capture_output=True, text=True,
                                   check=True).stdout.strip() for rev in ("HEAD", "HEAD")]
        assert heads == expected and a.tree != b.tree
        assert all((s.tree / "bench" / "throughput.py").exists() for s in (a, b))
    finally:
        for s in (a, b):
            subprocess.run(["git", "-C", str(ab.ROOT), "worktree", "remove", "--force", str(s.tree)], check=False)


@pytest.mark.slow
def test_ab_script_alternates_two_environments(capsys):
    a, b = load("ab").main(["--env", "EXECUTION_AGENT_BATCH_WITHIN=0.002", "--env", "EXECUTION_AGENT_BATCH_WITHIN=0.01",
                            "--rounds", "1", "--", "--signals", "20", "--broker", "kafka"])
    assert len(a.runs) == len(b.runs) == 1
    assert all(r["signals/s"] > 0 and r["worker ms/signal"] > 0 for r in a.runs + b.runs)
    out = capsys.readouterr().out
    assert "round 1 A:" in out and "round 1 B:" in out and "B / A" in out


@pytest.mark.slow
async def test_latency_script_every_signal_reaches_the_broker(capsys):
    runs = await load("latency").main(["--rates", "50", "--signals", "25", "--timeout", "60", "--broker", "kafka"])
    out = capsys.readouterr().out
    assert "broker: Apache Kafka" in out and "(production profile)" in out
    [(rate, direct, svc)] = runs
    assert rate == 50
    assert (svc.n, svc.reached, svc.publish_errors) == (25, 25, 0)
    assert (direct.n, direct.reached) == (25, 25)
    assert len(set(svc.order)) == 25 and all(len(c) == 31 for c in svc.order)  # MT5 comments = order ids
    assert all(svc.received[c] > svc.published[c] for c in svc.order)  # received after published
    assert len(svc.in_kafka) == 25  # every signal found on signals.approved
    assert len(svc.handled) == 25 and "Kafka -> handler" in out  # and its order's handler time
    assert all(svc.in_kafka[c] - 0.002 <= svc.handled[c] <= svc.received[c] for c in svc.order)
    assert "reached the broker 25/25" in out and "p50 ms" in out and "MISSING" not in out
    # the worker's own stage timers: every signal (and its fill) timed into the orders agent
    stages = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("    orders ")}
    assert set(stages) >= {"kafka", "faust", "commit"}, out
    assert float(stages["kafka"][-1]) >= 25 and float(stages["faust"][-1]) >= 25


@pytest.mark.slow
async def test_recovery_script_replays_every_record_once_and_nothing_with_the_data_dir(capsys):
    [r] = await load("recovery").main(["--orders", "300", "--timeout", "120", "--broker", "kafka"])
    out = capsys.readouterr().out
    assert "broker: Apache Kafka" in out and "execution-orders-changelog" in out
    # the changelog is filled in batches of several records; Kafka's end offsets need no check
    assert "producer_max_batch_size=16384; producer_linger_ms=0; broker_end_offsets_check=False" in out
    assert r.filled.records == 300
    assert r.cold.replayed == 300 and r.cold.rounds >= 1  # the empty data dir: the whole changelog
    assert r.warm.replayed == 0  # the data dir kept: nothing to replay
    ok, total = r.verified
    assert total >= 5 and ok == total  # sampled orders served as FILLED after recovery
    rss, peak = r.memory  # the recovered worker's memory, printed
    assert 0 < rss <= peak and "RSS (peak) MiB" in out
    assert "WARNING" not in out


@pytest.mark.slow
async def test_bridge_floor_script_runs_both_on_the_same_messages(capsys):
    med = await load("bridge_floor").main(["--messages", "300", "--rounds", "2", "--broker", "kafka"])
    out = capsys.readouterr().out
    assert "broker: Apache Kafka" in out and "acks=all" in out
    # both drained every message (the bridge run asserts none was dead-lettered), alternated
    assert out.count(" floor :") == 2 and out.count(" bridge:") == 2
    assert "ratio bridge / floor" in out
    assert all(cpu > 0 and rate > 0 for cpu, rate in med.values())


@pytest.mark.slow
async def test_worker_floor_script_repeats_the_records_of_the_run(capsys):
    n = 30
    result = await load("worker_floor").main(["--signals", str(n), "--rates", "--broker", "kafka"])
    out = capsys.readouterr().out
    work = result["work"]
    # per FILLED market order at least: the signal, the connector's answer, a fill (the orders
    # agent) and an execution (the positions agent); the floor loop took all of them
    assert len(work.consumed) >= 4 * n and work.requests >= n
    assert len(work.produced) > len(work.writes) >= 3 * n  # each order in three tables at least
    assert "records per signal in the end-to-end run: consumed" in out and "ratio worker / floor" in out
    assert result["worker_ms"] > 0 and result["paced_ms"] > 0 and result["backlog_ms"] > 0


@pytest.mark.slow
async def test_stack_floor_script_passes_every_signal_through_its_floor(capsys):
    n = 30
    result = await load("stack_floor").main(["--signals", str(n), "--rates", "--broker", "kafka"])
    out = capsys.readouterr().out
    arrivals = result["load"].arrivals
    # each signal and at least one fill per FILLED order come through the floor's bridge
    assert sum(1 for kind, _, _ in arrivals if kind == "signal") == n
    assert sum(1 for kind, _, _ in arrivals if kind == "fill") >= n
    assert len(result["load"].status) >= 3 * n  # PENDING, SUBMITTED, FILLED: the notifier's work
    # a floor at the end-to-end rate and a backlog, each signal's request timed at the connector
    # (floor_run asserts one per signal) and the direct path beside the paced run
    paced, backlog = result["runs"]
    assert paced["rate"] == result["e2e"] and backlog["rate"] is None
    assert len(paced["stack"]) == len(backlog["stack"]) == n and len(paced["direct"]) == n
    # CPU by process of the stack (a few signals: the connector's may stay under a clock tick)
    assert set(paced["cpu"]) == {"worker", "broker", "bridge", "nats-server", "simulator"}
    assert paced["cpu"]["worker"] > 0 and all(f > 0 for f in result["floor_ms"])
    assert "whole stack / its floor at the same rate" in out and "p50 first/last tenth" in out


@pytest.mark.slow
async def test_throughput_script_with_two_workers(capsys):
    result = await load("throughput").main(["--signals", "40", "--workers", "2", "--broker", "kafka"])
    out = capsys.readouterr().out
    assert "broker: Apache Kafka" in out and "pass-through" in out and "[2 workers]" in out
    assert result["passthrough"] > 0 and set(result["runs"]) == {2}
    # CPU per signal for each process of the stack, both workers among them, and the ceiling
    assert "CPU per signal" in out and all(f"{name} " in out for name in ("worker-1", "worker-2", "kafka", "nats-server"))
    assert "ms/signal -> at most" in out
    e2e, pub = result["runs"][2]
    assert e2e > 0 and pub > 0  # end_to_end itself asserts every order FILLED


@pytest.mark.slow
async def test_fetch_wait_script_reads_every_record(capsys):
    out = await load("fetch_wait").main(["--waits", "50", "5", "--messages", "10", "--rate", "50", "--broker", "tansu"])
    text = capsys.readouterr().out
    assert "broker: Tansu" in text and "(local profile)" in text and "fetch_max_wait_ms" in text
    assert set(out) == {50, 5} and all(len(v) == 10 and v[0] >= 0 for v in out.values())


@pytest.mark.slow
async def test_idle_script_measures_the_worker_at_each_fetch_wait(capsys):
    rows = await load("idle").main(["--waits", "50", "--seconds", "2", "--broker", "kafka"])
    text = capsys.readouterr().out
    assert "broker: Apache Kafka" in text and "(production profile)" in text and "worker % core" in text
    assert [w for w, _, _ in rows] == [50]
    assert all(worker > 0 and broker > 0 for _, worker, broker in rows)  # a running worker costs something


REQUEST_LOG = b"""\
[unrelated line]
Completed request:{"requestHeader":{"requestApiKey":0,"clientId":"execution-worker","requestApiKeyName":"PRODUCE"},"request":{"topicData":[{"name":"orders.status"},{"name":"execution-orders-changelog"}]},"localTimeMs":1.5,"remoteTimeMs":0.0}
Completed request:{"requestHeader":{"requestApiKey":0,"clientId":"execution-worker","requestApiKeyName":"PRODUCE"},"request":{"topicData":[{"name":"execution-signal_orders-changelog"}]},"localTimeMs":0.5,"remoteTimeMs":0.0}
Completed request:{"requestHeader":{"requestApiKey":0,"clientId":"execution-worker","requestApiKeyName":"PRODUCE"},"request":{"topicData":[{"name":"execution-orders-changelog"}]},"localTimeMs":1.5,"remoteTimeMs":0.0}
Completed request:{"requestHeader":{"requestApiKey":1,"clientId":"aiokafka-0.12.0","requestApiKeyName":"FETCH"},"request":{},"localTimeMs":1.0,"remoteTimeMs":50.0}
"""


def test_requests_census_counts_by_client_and_what_a_produce_writes(tmp_path):
    requests = load("requests")
    log = tmp_path / "kafka-requests.log"
    log.write_bytes(b"before the window\n" + REQUEST_LOG + b"after the window\n")
    start = len(b"before the window\n")
    census = requests.Census.read(log, start, start + len(REQUEST_LOG))
    assert dict(census.count) == {("execution-worker", "PRODUCE changelog+orders.status"): 1,
                                  ("execution-worker", "PRODUCE changelog"): 2,
                                  ("aiokafka (default id)", "FETCH"): 1}
    assert census.total == 4
    lines = census.lines(2, "signal")
    assert lines[1].split() == ["execution-worker", "PRODUCE", "changelog", "1.00", "1.000", "0.0"]  # the most first
    assert lines[-1].split() == ["all", "2.00"]
    assert ["aiokafka", "(default", "id)", "FETCH", "0.50", "1.000", "50.0"] in [ln.split() for ln in lines]


@pytest.mark.slow
async def test_requests_script_counts_the_brokers_requests_by_client(capsys):
    result = await load("requests").main(["--signals", "30", "--warmup", "10"])
    out = capsys.readouterr().out
    assert "broker: Apache Kafka" in out and "requests per signal / requests per pass-through message" in out
    run = result["end_to_end"]
    # the worker fetched and wrote, the bridge forwarded signals and fills
    assert run[("execution-worker", "FETCH")] > 0
    assert any(c == "execution-worker" and api.startswith("PRODUCE") and "changelog" in api for c, api in run)
    assert any(c == "execution-bridge" and api.startswith("PRODUCE") and "fills" in api for c, api in run)
    assert any(c == "aiokafka (default id)" and api == "PRODUCE bench.in" for c, api in result["baseline"])


@pytest.mark.slow
async def test_throughput_gives_up_on_a_stack_that_makes_no_progress(tmp_path):
    """A run whose orders stop moving (here: no worker at all) ends with the orders by state
    after the stall time, instead of waiting for ever."""
    from pipeline import Pipeline

    throughput = load("throughput")
    p = Pipeline(tmp_path, partitions=2, broker="kafka")
    await p.start(workers=0)
    try:
        with pytest.raises(RuntimeError, match=r"nothing new for 2 s: 0 of 5 executions; orders by state \{'missing': 5\}"):
            await throughput.end_to_end(p, 5, 2, stall=2.0)
    finally:
        p.stop()
