"""``execution demo``: the whole flow on the embedded defaults, in one command.

Starts the local stack (Tansu, nats-server), the MT5 broker simulator, the bridge and a
worker; publishes a realistic mix of approved signals (every order type, some duplicates,
some malformed, some that the broker rejects, plus rejected signals that must never be
acted on); waits until the pipeline is idle; prints a summary.  Ctrl-C stops everything.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson

from app.kafka_io import read_topic, topic_counts
from app.local import LocalStack
from app.sample import malformed, signal_dict, subject_for
from app.settings import Settings
from app.topics import ORDERS_STATUS, SIGNALS_APPROVED, SIGNALS_DLQ


def build_traffic(n: int, seed: int) -> tuple[list[tuple[str, bytes]], dict[str, int]]:
    """n approved signals: all order types, ~3% duplicates, ~3% malformed; + rejected ones."""
    rng = random.Random(seed)
    items: list[tuple[str, bytes]] = []
    mix: Counter = Counter()
    sent: list[tuple[str, bytes]] = []
    for i in range(n):
        r = rng.random()
        sid = f"demo-{seed}-{i:06d}"
        if r < 0.03 and sent:
            items.append(rng.choice(sent))  # redelivered duplicate
            mix["duplicate"] += 1
        elif r < 0.06:
            _, payload, _ = malformed(i, sid, rng)
            items.append(("signals.approved.EURUSD", payload))
            mix["malformed"] += 1
        else:
            ot = rng.choices(["market", "limit", "stop", "stop_limit"], weights=[70, 12, 12, 6])[0]
            lots = rng.choice((0.01, 0.1, 0.5, 1.0, 2.0, 5.0))
            d = signal_dict(sid, rng, order_type=ot, lots=lots, account=rng.choice(("acc-1", "acc-2")))
            item = (subject_for(d), orjson.dumps(d))
            items.append(item)
            sent.append(item)
            mix[ot] += 1
        if rng.random() < 0.02:  # a rejected signal: must never become an order
            d = signal_dict(f"rejected-{seed}-{i}", rng)
            items.append((f"signals.rejected.{d['symbol']}", orjson.dumps(d)))
            mix["rejected_by_risk"] += 1
    return items, dict(mix)


async def _publish(nats_url: str, items: list[tuple[str, bytes]], rate: float) -> None:
    import nats

    from app.bridge import ensure_stream

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_stream(js, "SIGNALS_APPROVED", ["signals.approved.>"])
    start = time.monotonic()
    for i, (subject, data) in enumerate(items):
        if subject.startswith("signals.approved."):
            await js.publish(subject, data)
        else:
            await nc.publish(subject, data)
        delay = start + (i + 1) / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if (i + 1) % max(1, len(items) // 10) == 0:
            print(f"  published {i + 1}/{len(items)}", flush=True)
    await nc.close()


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def run_demo(signals: int = 300, rate: float = 200.0, seed: int = 42, workdir: Path | None = None) -> int:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="execution-demo-"))
    print(f"execution demo: {signals} signals at {rate}/s, seed {seed}; logs in {workdir}", flush=True)
    stack = LocalStack(workdir=workdir / "stack").start()
    settings = Settings(kafka_bootstrap=stack.kafka_url, nats_url=stack.nats_url, data_dir=workdir / "data")
    env = dict(os.environ, **stack.env(), EXECUTION_DATA_DIR=str(workdir / "data"), PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen] = []
    interrupted = False

    def _interrupt(*_: object) -> None:
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        print(f"  kafka (Tansu) {stack.kafka_url}, NATS {stack.nats_url}", flush=True)
        for name in _services():
            procs.append(_spawn([name], env, workdir / f"{name}.log"))
        items, mix = build_traffic(signals, seed)
        print(f"  traffic: {mix}", flush=True)
        asyncio.run(_publish(stack.nats_url, items, rate))
        summary = asyncio.run(_wait_idle_and_summarise(settings))
        print(summary, flush=True)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping", flush=True)
        return 130
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        stack.stop()


def _services() -> list[str]:
    """The service processes the demo runs, in start order."""
    return ["bridge"]


async def _wait_idle_and_summarise(settings: Settings, idle_for: float = 3.0, timeout: float = 300.0) -> str:
    topics = [SIGNALS_APPROVED, SIGNALS_DLQ, ORDERS_STATUS]
    last, since = None, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = await topic_counts(settings, topics)
        if counts != last:
            last, since = counts, time.monotonic()
        elif time.monotonic() - since >= idle_for:
            break
        await asyncio.sleep(0.5)
    lines = ["", "== summary =="]
    for t, n in (last or {}).items():
        lines.append(f"  {t:<28} {n:>7} records")
    reasons = Counter()
    consumer_dlq = await _read_dlq_reasons(settings)
    reasons.update(consumer_dlq)
    if reasons:
        lines.append("  dead letters by reason:")
        for r, n in reasons.most_common(8):
            lines.append(f"    {n:>5}  {r[:100]}")
    return "\n".join(lines)


async def _read_dlq_reasons(settings: Settings) -> list[str]:
    records = await read_topic(settings, SIGNALS_DLQ, idle=0.5)
    return [r.headers.get("reason", b"?").decode().split(":")[0] for r in records]
