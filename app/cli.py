"""``execution``: the one command of the service.

    execution up        run the local stack (Tansu + nats-server) in the foreground
    execution bridge    NATS signals.approved.> / mt5.fills.> -> Kafka
    execution worker    the Faust worker (agents, tables, web on :8012)
    execution sim       the MT5 broker simulator
    execution sink      the derived topics into ClickHouse
    execution demo      the end-to-end demo on the embedded defaults
    execution config    show or set the operational config in the central hub
    execution settings  print the effective settings (secrets masked)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time


def _logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _own_children() -> None:
    from app.local import take_ownership

    left = take_ownership()
    if left:
        print(f"stopped {len(left)} processes left by an earlier run that was killed: {left}", flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    from app.local import LocalStack

    _own_children()
    stack = LocalStack().start()
    print(f"kafka: {stack.kafka_url}\nnats:  {stack.nats_url}\nlogs:  {stack.workdir}", flush=True)
    print("export " + " ".join(f"{k}={v}" for k, v in stack.env().items()), flush=True)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stop:
            time.sleep(0.2)
    finally:
        stack.stop()
    return 0


def cmd_bridge(args: argparse.Namespace) -> int:
    from app.bridge import run_bridge
    from app.settings import get_settings

    asyncio.run(run_bridge(get_settings()))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from app.settings import get_settings
    from app.topics import ensure_topics

    asyncio.run(ensure_topics(get_settings()))
    from app.main import app

    argv = ["execution", "worker", "-l", args.log_level]
    if args.web_port:
        argv += ["--web-port", str(args.web_port)]
    sys.argv = argv
    app.main()
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    from app.mt5.simulator import run_simulator
    from app.settings import get_settings

    asyncio.run(run_simulator(get_settings(), seed=args.seed))
    return 0


def cmd_sink(args: argparse.Namespace) -> int:
    from app.settings import get_settings
    from app.sinks.kafka_clickhouse import run_sink

    asyncio.run(run_sink(get_settings()))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """``execution config show`` / ``execution config set a.b.c=VALUE [...]`` (VALUE is JSON)."""
    import nats

    from app import hub
    from app.settings import get_settings

    async def run() -> int:
        nc = await nats.connect(**get_settings().nats_options())
        try:
            doc, revision = await hub.read(nc)
            if args.action == "show":
                print(json.dumps({"revision": revision, "stored": doc,
                                  "effective": hub.parse(doc).model_dump(mode="json")}, indent=2))
                return 0
            for assignment in args.assignments:
                path, sep, raw = assignment.partition("=")
                if not sep:
                    print(f"expected PATH=VALUE, got {assignment!r}", file=sys.stderr)
                    return 2
                try:
                    value = json.loads(raw)
                except json.JSONDecodeError:
                    value = raw  # a bare word: a string
                hub.set_path(doc, path, value)
            try:
                new_revision = await hub.write(nc, doc)
            except ValueError as exc:
                print(f"rejected: {exc}", file=sys.stderr)
                return 2
            print(f"stored revision {new_revision}")
            return 0
        finally:
            await nc.close()

    return asyncio.run(run())


def cmd_settings(args: argparse.Namespace) -> int:
    from app.settings import get_settings

    print(json.dumps(get_settings().describe(), indent=2, default=str))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from app.demo import run_demo

    _own_children()
    return run_demo(signals=args.signals, rate=args.rate, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="execution", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default=os.environ.get("EXECUTION_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run Tansu + nats-server locally").set_defaults(func=cmd_up)
    sub.add_parser("bridge", help="NATS -> Kafka bridge").set_defaults(func=cmd_bridge)
    w = sub.add_parser("worker", help="Faust worker")
    w.add_argument("--web-port", type=int, default=None)
    w.set_defaults(func=cmd_worker)
    s = sub.add_parser("sim", help="MT5 broker simulator")
    s.add_argument("--seed", type=int, default=7)
    s.set_defaults(func=cmd_sim)
    sub.add_parser("sink", help="derived topics -> ClickHouse").set_defaults(func=cmd_sink)
    c = sub.add_parser("config", help="show or set the operational config in the central hub")
    c.add_argument("action", choices=["show", "set"])
    c.add_argument("assignments", nargs="*", help="PATH=VALUE, e.g. operational.fill_tracking.slippage_alert_threshold_pips=3")
    c.set_defaults(func=cmd_config)
    d = sub.add_parser("demo", help="end-to-end demo on the embedded defaults")
    d.add_argument("--signals", type=int, default=300)
    d.add_argument("--rate", type=float, default=200.0, help="signals per second")
    d.add_argument("--seed", type=int, default=42)
    d.set_defaults(func=cmd_demo)
    sub.add_parser("settings", help="print effective settings").set_defaults(func=cmd_settings)
    args = parser.parse_args(argv)
    if args.command != "worker":
        _logging(args.log_level)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
