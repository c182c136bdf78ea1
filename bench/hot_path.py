"""Per-call costs on the worker's hot path, each beside its baseline, in this process.

    python bench/hot_path.py [--calls 100000]

No stack: these are the small steps every signal goes through, timed in a loop
(``time.perf_counter``, best of three rounds), each printed in microseconds per call beside
its baseline and the ratio:

* ``app.retry.until_done`` (every acknowledged send of the worker: each batch's outputs and
  each submission's answer to Kafka, each batch of notifications to JetStream) against a bare
  ``await step()``, and against the same step in a tenacity ``AsyncRetrying`` loop (how
  ``until_done`` was written before);
* ``tables.idempotency.murmur2`` (Kafka's key hash: each candidate order id of each new
  signal, each new key the producers partition) against ``aiokafka.partitioner.murmur2``;
* ``tables.idempotency.order_id_for`` of a new signal id (its cache bypassed) at 8 partitions;
* a record's hand-over to the conductor: Faust's ``wait_first(delivery, suspend_flow.wait())``
  (four tasks and an ``asyncio.wait``) against a plain ``await`` of the delivery.  A plain
  await, where the delivery cannot wait, made the worker slower end to end (bench/README.md,
  "Per-call costs"): the figure is kept as the measure of that experiment.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from mode import Service
from tenacity import AsyncRetrying, retry_if_exception_type, stop_never

from app.retry import backoff, until_done
from tables import idempotency
from tables.idempotency import ORDER_ID_LENGTH

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: bench.common
from bench.common import run_main  # noqa: E402


def best_us(run: Callable[[], float], rounds: int = 3) -> float:
    """The best of ``rounds`` runs of ``run`` (which returns its own µs per call)."""
    return min(run() for _ in range(rounds))


async def best_us_async(run: Callable[[], Awaitable[float]], rounds: int = 3) -> float:
    return min([await run() for _ in range(rounds)])


async def step() -> int:
    return 1


async def tenacity_until_done(initial: float = 0.2, maximum: float = 5.0) -> int:
    """The step in a tenacity loop, as ``until_done`` ran it before."""
    async for attempt in AsyncRetrying(wait=backoff(initial, maximum), retry=retry_if_exception_type(Exception),
                                       stop=stop_never, reraise=True):
        with attempt:
            result = await step()
    return result


async def per_call(calls: int, call: Callable[[], object]) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        await call()
    return (time.perf_counter() - start) / calls * 1e6


def per_call_sync(calls: int, call: Callable[[], object]) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def line(what: str, us: float, baseline: str, base_us: float) -> str:
    return f"  {what:<44} {us:8.2f} us/call   {baseline:<34} {base_us:8.2f} us/call   ratio {us / base_us:6.2f}"


async def measure(calls: int) -> dict[str, float]:
    """Every figure, in µs per call."""
    out: dict[str, float] = {}
    out["bare await"] = await best_us_async(lambda: per_call(calls, step))
    out["until_done"] = await best_us_async(lambda: per_call(calls, lambda: until_done("x", step)))
    out["tenacity loop"] = await best_us_async(lambda: per_call(max(1, calls // 10), tenacity_until_done))
    key = idempotency.order_id_for("bench-signal", 8).encode()
    out["murmur2"] = best_us(lambda: per_call_sync(calls, lambda: idempotency.murmur2(key)))
    out["aiokafka murmur2"] = best_us(lambda: per_call_sync(calls, lambda: aiokafka_murmur2(key)))
    ids = iter(range(10**9))
    uncached = idempotency.order_id_for.__wrapped__

    def new_order_id() -> None:
        idempotency.key_hash.cache_clear()
        uncached(f"signal-{next(ids)}", 8)

    out["order_id_for"] = best_us(lambda: per_call_sync(max(1, calls // 10), new_order_id))
    consumer, suspend_flow = Service(), asyncio.Event()
    out["wait_first"] = await best_us_async(
        lambda: per_call(max(1, calls // 10), lambda: consumer.wait_first(step(), suspend_flow.wait())))
    return out


def report(f: dict[str, float]) -> list[str]:
    return [
        line("until_done(step)", f["until_done"], "bare await step()", f["bare await"]),
        line("until_done(step)", f["until_done"], "tenacity AsyncRetrying loop", f["tenacity loop"]),
        line(f"murmur2 (an order id, {ORDER_ID_LENGTH} bytes)", f["murmur2"], "aiokafka.partitioner.murmur2", f["aiokafka murmur2"]),
        f"  {'order_id_for, a new signal, 8 partitions':<44} {f['order_id_for']:8.2f} us/call",
        line("record delivery: await delivery", f["bare await"], "wait_first(delivery, suspend wait)", f["wait_first"]),
    ]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=100_000)
    args = ap.parse_args()
    print(f"per-call costs on the worker's hot path ({args.calls} calls, best of 3; Python {sys.version.split()[0]}):")
    print("\n".join(report(await measure(args.calls))), flush=True)


if __name__ == "__main__":
    run_main(main)
