"""What the benchmark scripts share: the broker line every script prints, a percentile, and
the command-line entry that ends with the machine's load (a shared 2-core machine: the
figures move with it)."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
from pathlib import Path
from typing import Any, Awaitable, Callable

from app.local import BROKERS, LOCAL_BROKER_ENV, kafka_version, tansu_binary


def add_broker_arg(ap: argparse.ArgumentParser) -> None:
    """``--broker tansu|kafka``: the local stack's broker (default ``EXECUTION_LOCAL_BROKER``,
    else Tansu); Apache Kafka runs in the production profile."""
    ap.add_argument("--broker", choices=BROKERS, default=os.environ.get(LOCAL_BROKER_ENV) or "tansu",
                    help="tansu: the embedded broker; kafka: Apache Kafka (KRaft) from Maven Central jars")


def broker_name(broker: str) -> str:
    return f"Apache Kafka {kafka_version()}" if broker == "kafka" else f"Tansu {Path(tansu_binary()).name}"


def broker_line(settings: Any, broker: str) -> str:
    return (f"broker: {broker_name(broker)} ({settings.profile.value} profile); "
            f"producer_max_batch_size={settings.effective('producer_max_batch_size')}; "
            f"producer_linger_ms={settings.effective('producer_linger_ms')}; "
            f"broker_end_offsets_check={settings.effective('broker_end_offsets_check')}; "
            f"consumer_fetch_max_wait_ms={settings.effective('consumer_fetch_max_wait_ms')}")


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (``q`` in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(round(q * len(sorted_values) / 100, 9)) - 1))
    return sorted_values[k]


def run_main(main: Callable[[], Awaitable[Any]]) -> None:
    """Run a script's ``main`` and print the load average at its start and end."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    load = os.getloadavg()[0]

    async def run() -> Any:
        # SIGTERM cancels the script, so its ``finally`` blocks stop the stack it started.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
        return await main()

    try:
        asyncio.run(run())
    except asyncio.CancelledError:
        raise SystemExit(143) from None
    print(f"machine: {os.cpu_count()} CPUs; load average (1 min) {load:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end (other processes share this machine)")
