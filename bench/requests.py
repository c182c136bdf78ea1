"""The Apache Kafka broker's requests per signal, by client and API, beside a raw pass-through.

    python bench/requests.py [--signals 2000] [--partitions 4] [--warmup 0]

On one stack (``tests/pipeline.Pipeline`` on Apache Kafka, the production profile) whose
broker logs every completed request (``KafkaServer.request_log``): the raw aiokafka
consume -> produce pass-through of ``bench/throughput.py`` (the baseline), then its end-to-end
pass (market signals published to NATS until every order is FILLED and its fills applied).
For each, the requests the broker completed, by client id and API, per message (baseline)
or per signal, with the broker's mean local time per request (``localTimeMs``: the time a
request held a broker thread) and the time fetches were held waiting for data.

The broker's CPU per signal goes with its requests far more than with its records (issue #16:
~5 ms per signal at ~130 signals/s, under 1 ms for a backlog); this shows which client asks
how often.  The request log costs the broker CPU itself: no CPU figure is taken here.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: bench.common
from bench.common import broker_line, run_main  # noqa: E402
from bench.throughput import BACKLOG_CONFIG, end_to_end, passthrough, wait_settled  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

PREFIX = b"Completed request:"


class Census:
    """Requests per (client id, API) read from a broker's request log, from a byte offset on."""

    def __init__(self) -> None:
        self.count: dict[tuple[str, str], int] = defaultdict(int)
        self.local_ms: dict[tuple[str, str], float] = defaultdict(float)
        self.remote_ms: dict[tuple[str, str], float] = defaultdict(float)

    @classmethod
    def read(cls, path: Path, start: int, end: int) -> "Census":
        c = cls()
        with open(path, "rb") as f:
            f.seek(start)
            for line in f.read(end - start).splitlines():
                if line.startswith(PREFIX):
                    c.add(orjson.loads(line[len(PREFIX):]))
        return c

    def add(self, entry: dict) -> None:
        header = entry["requestHeader"]
        api = header.get("requestApiKeyName") or str(header["requestApiKey"])
        if api == "PRODUCE":  # by what it writes: one request carries the records of many topics
            api += " " + "+".join(sorted({topic_kind(t["name"]) for t in entry.get("request", {}).get("topicData", ())}))
        key = (client_name(header.get("clientId") or ""), api)
        self.count[key] += 1
        self.local_ms[key] += float(entry.get("localTimeMs") or 0.0)
        self.remote_ms[key] += float(entry.get("remoteTimeMs") or 0.0)

    @property
    def total(self) -> int:
        return sum(self.count.values())

    def lines(self, per: int, unit: str) -> list[str]:
        width = max([16, *(len(k[1]) for k in self.count)])
        out = [f"  {'client':<24} {'API':<{width}} {f'per {unit}':>10} {'local ms':>9} {'held ms':>8}"]
        for key in sorted(self.count, key=lambda k: -self.count[k]):
            n = self.count[key]
            out.append(f"  {key[0]:<24} {key[1]:<{width}} {n / per:10.2f} {self.local_ms[key] / n:9.3f} "
                       f"{self.remote_ms[key] / n:8.1f}")
        out.append(f"  {'all':<24} {'':<{width}} {self.total / per:10.2f}")
        return out


def topic_kind(topic: str) -> str:
    """A topic's name, or ``changelog`` for any table's changelog."""
    return "changelog" if topic.endswith("-changelog") else topic


def client_name(client_id: str) -> str:
    """A client id without the numbers aiokafka puts in its default (``aiokafka-0.12.0``)."""
    return "aiokafka (default id)" if client_id.startswith("aiokafka-") else client_id or "(none)"


async def main(argv: list[str] | None = None) -> dict:
    from pipeline import Pipeline

    ap = argparse.ArgumentParser()
    ap.add_argument("--signals", type=int, default=2000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=0,
                    help="signals passed end to end first, unmeasured (the broker's JIT warms up)")
    args = ap.parse_args(argv)
    p = Pipeline(Path(tempfile.mkdtemp(prefix="bench-requests-")), partitions=args.partitions,
                 config=BACKLOG_CONFIG, broker="kafka")
    p.stack.kafka_request_log = True
    await p.start()
    try:
        await wait_settled(p)
        if args.warmup:
            await end_to_end(p, args.warmup, args.partitions, name="warmup")
        log = p.stack.kafka.requests_log_path
        a = log.stat().st_size
        raw = await passthrough(p.settings, args.signals, args.partitions)
        b = log.stat().st_size
        e2e, _ = await end_to_end(p, args.signals, args.partitions)
        c = log.stat().st_size
        base, run = Census.read(log, a, b), Census.read(log, b, c)
    finally:
        p.stop()
    shutil.rmtree(p.workdir, ignore_errors=True)
    print(f"{broker_line(p.settings, 'kafka')}; partitions={args.partitions}; signals={args.signals}")
    print(f"baseline: raw aiokafka consume->produce pass-through, {raw:.0f} msg/s "
          f"(its producer writes all {args.signals} messages first):")
    print("\n".join(base.lines(args.signals, "message")))
    print(f"end to end NATS -> FILLED order + position, {e2e:.0f} signals/s:")
    print("\n".join(run.lines(args.signals, "signal")))
    ratio = (run.total / args.signals) / (base.total / args.signals) if base.total else float("nan")
    print(f"requests per signal / requests per pass-through message: {ratio:.1f}")
    return {"baseline": dict(base.count), "end_to_end": dict(run.count), "signals_per_s": e2e, "passthrough": raw}


if __name__ == "__main__":
    run_main(main)
