"""What a worker with nothing to do costs, by consumer fetch wait.

    python bench/idle.py [--waits 1500 100 50 10] [--seconds 20] [--broker kafka|tansu]

For each ``consumer_fetch_max_wait_ms``, a fresh stack (one worker, the profile of the broker),
a few signals through it so every agent has fetched and committed, then the CPU the worker and
the broker use over ``--seconds`` with no input (``/proc/<pid>/stat``), as a share of a core,
beside the longest wait's (the baseline: Faust's own 1,500 ms).

Why: a short wait costs fetch requests while idle, but aiokafka keeps one fetch in flight per
broker and leaves out of it every partition that still holds fetched records; a record
arriving on such a partition waits for that fetch to come back, up to the whole wait
(``bench/latency.py`` shows it as the worker's ``kafka`` stage).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: bench.common
from bench.common import add_broker_arg, broker_line, run_main  # noqa: E402
from bench.throughput import cpu_seconds  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


async def idle_cost(broker: str, wait_ms: int, seconds: float) -> tuple[str, float, float]:
    """(settings line, worker cores, broker cores) while idle with this fetch wait."""
    from app.sample import signal_dict
    from pipeline import Pipeline
    from tables.idempotency import order_id_for

    p = Pipeline(Path(tempfile.mkdtemp(prefix="bench-idle-")), partitions=4, config={}, broker=broker,
                 env={"EXECUTION_CONSUMER_FETCH_MAX_WAIT_MS": str(wait_ms)})
    await p.start()
    try:
        await p.hold_reference_prices()
        rng = random.Random(3)
        signals = [signal_dict(f"idle-{wait_ms}-{i}", rng, order_type="market", lots=0.1) for i in range(20)]
        await p.publish_signals(signals)
        await p.wait_orders([order_id_for(s["signal_id"], 4) for s in signals])
        worker = p.services.running["worker-1"].proc.pid
        broker_pid = p.stack.kafka.pid
        before = (cpu_seconds(worker), cpu_seconds(broker_pid), time.perf_counter())
        await asyncio.sleep(seconds)  # the measurement window: nothing is sent
        wall = time.perf_counter() - before[2]
        line = broker_line(p.settings, broker).replace(
            f"consumer_fetch_max_wait_ms={p.settings.effective('consumer_fetch_max_wait_ms')}", "")
        return line.rstrip("; "), (cpu_seconds(worker) - before[0]) / wall, (cpu_seconds(broker_pid) - before[1]) / wall
    finally:
        p.stop()
        shutil.rmtree(p.workdir, ignore_errors=True)


async def main(argv: list[str] | None = None) -> list[tuple[int, float, float]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--waits", type=int, nargs="+", default=[1500, 100, 50, 10], help="fetch waits, ms")
    ap.add_argument("--seconds", type=float, default=20.0, help="idle measurement window per wait")
    add_broker_arg(ap)
    args = ap.parse_args(argv)
    rows: list[tuple[int, float, float]] = []
    line = ""
    for wait in args.waits:
        line, worker, broker = await idle_cost(args.broker, wait, args.seconds)
        rows.append((wait, worker, broker))
    base = max(rows)  # the longest wait
    print(f"{line}; one worker, idle for {args.seconds:.0f} s after 20 signals")
    print(f"  {'fetch_max_wait_ms':>17} {'worker % core':>14} {'broker % core':>14} {'worker / at ' + str(base[0]):>18}")
    for wait, worker, broker in rows:
        ratio = worker / base[1] if base[1] else float("nan")
        print(f"  {wait:17d} {100 * worker:14.1f} {100 * broker:14.1f} {ratio:18.1f}")
    return rows


if __name__ == "__main__":
    run_main(main)
