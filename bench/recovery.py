"""Table recovery speed: changelog records per second when a worker starts with an empty data dir.

    python bench/recovery.py [--orders 10000 100000] [--partitions 4] [--records-per-order 1]
    python bench/recovery.py --orders 1000000        # the 1M case: filling takes minutes

For each size, on a fresh local stack (Tansu + nats-server, no bridge, no simulator):

1. the ``orders`` table's changelog topic (``<app id>-orders-changelog``, i.e.
   ``execution-orders-changelog``) is filled directly with a raw aiokafka producer: FILLED
   orders as :class:`app.models.Order` JSON (what the table's codec stores), keyed by order id
   on the partition the order id hashes to (the order id is co-partitioned with its signal, so
   that is where the worker's own changelog writes land);
2. a worker (``app.local.Services.worker``) starts with an EMPTY data dir, as after losing its
   RocksDB volume, and rebuilds the table from the changelog.  Figures from the worker's log
   (Faust's recovery lines, with their own timestamps): the records it had to replay (the
   highwater minus the start offset of each partition of the orders changelog), the replay
   time ("Restoring state from changelog topics..." to "Done reading from changelog topics",
   or with ``bulk_recovery`` (app/faust_patches.py, 10) from the bulk replay's first line to
   the last of its and Faust's), and records/s; from outside: the time from spawning the
   process to ``/health`` = 200;
3. a sample of orders (the last one of every partition and some random ones) is read back
   through ``GET /orders/{id}``: they must be there and FILLED;
   Its resident memory then (and its peak), from /proc: the worker holding every order;
4. baseline, side by side: the same worker stopped (SIGTERM) and restarted with its data dir
   kept: it should replay nothing, and the difference is the cost of the replay.

Prints the broker and its settings: the raw producer here uses the service's producer
settings, so with ``producer_max_batch_size=1`` the changelog is written one record per
batch; with batches of several records Tansu reports a short end offset and the replay
relies on ``broker_end_offsets_check`` (app/kafka_io.end_offsets) to read it all.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from app.faust_patches import BULK_DONE, BULK_START
from app.models import ApprovedSignal, OrderState, OrderType, to_json
from app.sample import signal_dict
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: bench.common
from bench.common import add_broker_arg, broker_line, run_main  # noqa: E402
from tables.idempotency import order_id_for, partition_for
from tables.order_state import create_order

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

#: The table whose changelog is filled (``tables/definitions.py``).
TABLE = "orders"
READY = "[^---Recovery]: Worker ready"
RESTORING = "Restoring state from changelog topics..."
DONE_READING = "Done reading from changelog topics"


def changelog_topic(app_id: str, table: str = TABLE) -> str:
    """Faust's changelog topic of a table: ``<app id>-<table>-changelog``."""
    return f"{app_id}-{table}-changelog"


# --------------------------------------------------------------------------------------
# Filling the changelog
# --------------------------------------------------------------------------------------


def order_versions(i: int, rng: random.Random, partitions: int, now: datetime) -> list:
    """The PENDING, SUBMITTED and FILLED snapshots of one realistic market order."""
    sig = ApprovedSignal.model_validate(signal_dict(f"rec-{i}", rng, order_type="market"))
    oid = order_id_for(sig.signal_id, partitions)
    pending = create_order(sig, oid, OrderType.MARKET, now).order
    ticket = 1_700_000_000_000_000 + i
    submitted = pending.model_copy(update={
        "state": OrderState.SUBMITTED, "attempts": 1, "version": 2, "submitted_at": now, "updated_at": now,
    })
    price = pending.expected_price
    filled = submitted.model_copy(update={
        "state": OrderState.FILLED, "retcode": 10009, "broker_ticket": ticket, "deals": (ticket,),
        "filled_volume": pending.volume, "avg_fill_price": price, "slippage_pips": 0.0, "version": 4,
        "filled_at": now, "updated_at": now,
    })
    return [pending, submitted, filled]


@dataclass
class Filled:
    records: int
    seconds: float
    last_per_partition: dict[int, str] = field(default_factory=dict)
    sample: list[str] = field(default_factory=list)


async def fill_changelog(settings, topic: str, orders: int, partitions: int, records_per_order: int = 1,
                         seed: int = 1, chunk: int = 2000) -> Filled:
    """Write ``orders`` orders (the last ``records_per_order`` versions of each) to ``topic``."""
    admin = AIOKafkaAdminClient(**settings.aiokafka_common())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, settings.topic_replication_factor,
                                            topic_configs={"cleanup.policy": "compact"})])
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()
    producer = AIOKafkaProducer(**settings.producer_options())
    await producer.start()
    rng = random.Random(seed)
    now = datetime.now(UTC)
    out = Filled(0, 0.0)
    sample_every = max(1, orders // 20)
    start = time.perf_counter()
    try:
        futures = []
        for i in range(orders):
            versions = order_versions(i, rng, partitions, now)[-records_per_order:]
            oid = versions[-1].order_id
            part = partition_for(oid, partitions)
            for order in versions:
                futures.append(await producer.send(topic, to_json(order), key=oid.encode(), partition=part))
            out.last_per_partition[part] = oid
            if i % sample_every == 0:
                out.sample.append(oid)
            if len(futures) >= chunk:
                await asyncio.gather(*futures)
                out.records += len(futures)
                futures = []
        await asyncio.gather(*futures)
        out.records += len(futures)
    finally:
        await producer.stop()
    out.seconds = time.perf_counter() - start
    return out


# --------------------------------------------------------------------------------------
# Reading the worker's log
# --------------------------------------------------------------------------------------


def log_time(line: str) -> float | None:
    """The wall-clock time of a Faust log line ``[2026-11-26 23:21:19,429] [pid] [INFO] ...``."""
    if not line.startswith("["):
        return None
    try:
        return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def log_tables(text: str, title: str) -> list[dict[tuple[str, int], int]]:
    """Every Faust log table titled ``title`` (e.g. "Highwater - Active"), as
    ``{(topic, partition): value}``, in log order."""
    found: list[dict[tuple[str, int], int]] = []
    lines = text.splitlines()
    for n, line in enumerate(lines):
        if not line.startswith(f"+{title}"):
            continue
        table: dict[tuple[str, int], int] = {}
        topic = ""
        for row in lines[n + 1:]:
            if row.startswith("+"):  # a border: under the header, or the end of the table
                if table:
                    break
                continue
            if not row.startswith("|"):
                break
            cells = [c.strip() for c in row.strip().strip("|").split("|")]
            if len(cells) != 3 or cells[1] == "partition":
                continue
            topic = topic if cells[0] == "〃" else cells[0]
            table[(topic, int(cells[1]))] = int(cells[2])
        found.append(table)
    return found


@dataclass
class Recovery:
    replayed: int  # orders-changelog records the worker had to read (highwater - start offset)
    replay_seconds: float  # Faust's replay: "Restoring state..." to "Done reading..." or the bulk replay's lines (0 if none)
    ready_seconds: float  # spawn to Faust's "Worker ready"
    health_seconds: float  # spawn to /health 200 (from outside)
    rounds: int  # recovery rounds (more than 1 if a rebalance restarted it)

    @property
    def records_per_second(self) -> float | None:
        return self.replayed / self.replay_seconds if self.replay_seconds > 0 else None


def parse_recovery(text: str, topic: str, spawned: float, health_at: float) -> Recovery:
    """The figures of one worker start from the part of its log written since the spawn."""
    ready_at = restoring_at = done_at = None
    rounds = bulk_rounds = 0
    for line in text.splitlines():
        t = log_time(line)
        if t is None:
            continue
        if RESTORING in line or BULK_START in line:
            rounds += RESTORING in line
            bulk_rounds += BULK_START in line
            restoring_at = restoring_at or t
        elif DONE_READING in line or BULK_DONE in line:
            done_at = t
        elif READY in line and ready_at is None:
            ready_at = t
    highwaters = log_tables(text, "Highwater - Active")
    starts = log_tables(text, "Reading Starts At - Active")
    replayed = 0
    if highwaters and starts:
        hw, st = highwaters[0], starts[0]
        replayed = sum(max(0, v - st.get(k, -1)) for k, v in hw.items() if k[0] == topic)
    replay = (done_at - restoring_at) if restoring_at and done_at else 0.0
    return Recovery(replayed, replay, (ready_at or health_at) - spawned, health_at - spawned,
                    max(rounds, bulk_rounds))


# --------------------------------------------------------------------------------------
# Starting workers and waiting for them
# --------------------------------------------------------------------------------------


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


async def wait_healthy(svc, timeout: float) -> float:
    """Poll ``/health`` until 200; returns the wall-clock time it answered 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _ = await asyncio.to_thread(http_get, svc.web_port, "/health", 2.0)
        if status == 200:
            return time.time()
        if not svc.alive:
            raise RuntimeError(f"{svc.name} exited:\n{svc.log_text()[-3000:]}")
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{svc.name}: /health not 200 after {timeout}s:\n{svc.log_text()[-3000:]}")


async def timed_start(start, svc_log_size: int, topic: str, timeout: float) -> tuple:
    spawned = time.time()
    svc = start()
    health_at = await wait_healthy(svc, timeout)
    await asyncio.to_thread(svc.wait_for_log, READY, timeout, svc_log_size)
    return svc, parse_recovery(svc.log_text()[svc_log_size:], topic, spawned, health_at)


def memory_mib(pid: int | None) -> tuple[float, float]:
    """(resident, peak resident) MiB of a process, from /proc (0, 0 once it is gone)."""
    found = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024  # kB
    except (OSError, ValueError):
        pass
    return found.get("VmRSS", 0.0), found.get("VmHWM", 0.0)


def check_sample(svc, ids: list[str]) -> tuple[int, int]:
    """How many of ``ids`` the worker serves as FILLED orders."""
    ok = 0
    for oid in ids:
        status, body = http_get(svc.web_port, f"/orders/{oid}")
        if status == 200 and orjson.loads(body).get("state") == "FILLED":
            ok += 1
    return ok, len(ids)


@dataclass
class SizeResult:
    orders: int
    filled: Filled
    cold: Recovery
    warm: Recovery
    verified: tuple[int, int]
    memory: tuple[float, float]  # the recovered worker's (RSS, peak RSS) MiB, holding every order


async def run_size(orders: int, partitions: int, records_per_order: int, timeout: float,
                   workdir: Path | None = None, keep: bool = False, broker: str | None = None) -> tuple[SizeResult, object]:
    from pipeline import Pipeline

    workdir = workdir or Path(tempfile.mkdtemp(prefix=f"bench-recovery-{orders}-"))
    p = Pipeline(workdir, partitions=partitions, config={}, broker=broker)
    await p.start(workers=0, bridge=False, simulator=False)
    try:
        s = p.settings
        topic = changelog_topic(s.app_id)
        filled = await fill_changelog(s, topic, orders, partitions, records_per_order)
        name = "worker-1"
        assert not (workdir / name).exists()  # an empty data dir
        cold_svc, cold = await timed_start(lambda: p.services.worker(name, wait=False), 0, topic, timeout)
        ids = sorted(set(filled.last_per_partition.values()) | set(filled.sample))
        verified = await asyncio.to_thread(check_sample, cold_svc, ids)
        memory = memory_mib(cold_svc.proc.pid if cold_svc.proc else None)
        cold_svc.stop()
        size = len(cold_svc.log_text())

        def restart():
            new = p.services.restart(name, wait=False)
            new.web_port = cold_svc.web_port
            return new

        _, warm = await timed_start(restart, size, topic, timeout)
        return SizeResult(orders, filled, cold, warm, verified, memory), s
    finally:
        p.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def fmt_rate(r: float | None) -> str:
    return f"{r:10.0f}" if r else f"{'-':>10}"


def report(results: list[SizeResult], settings, partitions: int, records_per_order: int, broker: str) -> None:
    print(f"{broker_line(settings, broker)}; bulk_recovery={settings.effective('bulk_recovery')}; "
          f"partitions={partitions}; table={TABLE} "
          f"(changelog {changelog_topic(settings.app_id)}); {records_per_order} changelog record(s) per order")
    print(f"{'':9} {'changelog filled':^19} | {'worker start, EMPTY data dir':^41} | {'restart, data dir KEPT':^22} | {'empty/kept':>10}")
    print(f"{'orders':>9} {'records':>9} {'rec/s':>9} | {'replayed':>9} {'replay s':>9} {'records/s':>10} "
          f"{'health s':>10} | {'replayed':>9} {'health s':>10} | {'health s':>10} | {'RSS (peak) MiB':>15} | sample read back")
    for r in results:
        c, w = r.cold, r.warm
        ratio = c.health_seconds / w.health_seconds if w.health_seconds > 0 else float("nan")
        print(f"{r.orders:9d} {r.filled.records:9d} {r.filled.records / r.filled.seconds:9.0f} | "
              f"{c.replayed:9d} {c.replay_seconds:9.2f} {fmt_rate(c.records_per_second)} {c.health_seconds:10.2f} | "
              f"{w.replayed:9d} {w.health_seconds:10.2f} | {ratio:10.1f} | {r.memory[0]:6.0f} ({r.memory[1]:5.0f}) | "
              f"{r.verified[0]}/{r.verified[1]} FILLED")
        if c.replayed != r.filled.records:
            print(f"  WARNING: the worker replayed {c.replayed} records, {r.filled.records} were written")
        if c.rounds > 1 or w.rounds > 0:
            print(f"  note: recovery rounds: empty dir {c.rounds}, kept dir {w.rounds}")
    print("replay s: Faust's own log, 'Restoring state from changelog topics' (or the bulk replay's first line) to "
          "'Done reading' (or the bulk replay's last); health s: from "
          "spawning the worker process to /health 200 (includes Python start-up and the group join); RSS: the "
          "worker recovered from the empty data dir, holding every order, after the sample was read back")


async def main(argv: list[str] | None = None) -> list[SizeResult]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orders", type=int, nargs="+", default=[10_000, 100_000],
                    help="table sizes (orders); 1000000 is the issue's largest case (slow to fill)")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--records-per-order", type=int, default=1, choices=(1, 2, 3),
                    help="changelog records per order: 1 = FILLED only (a compacted changelog); "
                         "3 = PENDING, SUBMITTED, FILLED (uncompacted, as Tansu keeps it)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds a worker may take to become healthy")
    ap.add_argument("--keep", action="store_true", help="keep the work dirs (logs) under the temp dir")
    add_broker_arg(ap)
    args = ap.parse_args(argv)
    results = []
    settings = None
    for n in args.orders:
        r, settings = await run_size(n, args.partitions, args.records_per_order, args.timeout, keep=args.keep,
                                       broker=args.broker)
        results.append(r)
        print(f"... {n} orders: replayed {r.cold.replayed} records in {r.cold.replay_seconds:.2f}s", flush=True)
    report(results, settings, args.partitions, args.records_per_order, args.broker)
    return results


if __name__ == "__main__":
    run_main(main)
