"""``execution``: the one command of the service.

    execution up        run the local stack (Tansu or Apache Kafka, nats-server) in the foreground
    execution bridge    NATS signals.approved.> / mt5.fills.> -> Kafka
    execution worker    the Faust worker (agents, tables, web on :8012)
    execution sim       the MT5 broker simulator
    execution sink      the derived topics into ClickHouse
    execution demo      the end-to-end demo on the embedded defaults
    execution config    show or set the operational config in the central hub
    execution settings  print the effective settings (secrets masked)
    execution orders    show, cancel or modify an order (through a worker's web server)
    execution positions close (part of) a position (through a worker's web server)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from types import SimpleNamespace
from typing import Any

import click


def _logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _own_children() -> None:
    from app.local import take_ownership

    left = take_ownership()
    if left:
        print(f"stopped {len(left)} processes left by an earlier run that was killed: {left}", flush=True)


def cmd_up(args: SimpleNamespace) -> int:
    from app.local import LocalStack

    _own_children()
    stack = LocalStack(broker=args.broker, kafka_nodes=args.kafka_nodes).start()
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


def cmd_bridge(args: SimpleNamespace) -> int:
    from app.bridge import run_bridge
    from app.settings import get_settings

    asyncio.run(run_bridge(get_settings()))
    return 0


def cmd_worker(args: SimpleNamespace) -> int:
    from app.settings import get_settings
    from app.topics import ensure_topics

    asyncio.run(ensure_topics(get_settings()))
    from faust.cli.faust import cli as faust_cli

    from app.main import app

    # What App.main() does, with the arguments given, not read from sys.argv.
    app.finalize()
    app.worker_init()
    app.worker_init_post_autodiscover()
    faust_args = ["worker", "-l", args.log_level] + (["--web-port", str(args.web_port)] if args.web_port else [])
    faust_cli.main(args=faust_args, prog_name="execution", app=app)
    return 0


def cmd_sim(args: SimpleNamespace) -> int:
    from app.mt5.simulator import run_simulator
    from app.settings import get_settings

    asyncio.run(run_simulator(get_settings(), seed=args.seed))
    return 0


def cmd_sink(args: SimpleNamespace) -> int:
    from app.settings import get_settings
    from app.sinks.kafka_clickhouse import run_sink

    asyncio.run(run_sink(get_settings()))
    return 0


def cmd_config(args: SimpleNamespace) -> int:
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


def _sql_rows(settings, sql: str, url: str, timeout: float) -> tuple[list[str], list[list]]:
    """Through the running sink's ``/query`` (the process that owns an embedded chDB); with no
    sink answering, straight to ClickHouse: a server, or the chDB directory if no process holds it."""
    status, answer = _http("POST", url.rstrip("/") + "/query", {"sql": sql}, timeout=timeout)
    if status == 200:
        return answer["columns"], answer["rows"]
    if status:
        raise SystemExit(f"execution sql: {answer.get('error', answer)}")
    from app.sinks.clickhouse import ClickHouseStore

    dsn = settings.resolved_clickhouse_dsn
    try:
        store = ClickHouseStore.from_settings(settings)
    except Exception as exc:
        if dsn.startswith("chdb"):  # chDB allows one process per directory
            raise SystemExit(
                f"execution sql: no sink answers at {url}, and the embedded ClickHouse at {dsn} "
                f"could not be opened here ({str(exc).splitlines()[0][:200]}): it is open in another "
                "process while `execution sink` or the demo runs; point --url at that sink") from None
        raise SystemExit(f"execution sql: {dsn}: {exc}") from None
    try:
        columns, rows = store.select(sql)
    except Exception as exc:
        raise SystemExit(f"execution sql: {str(exc).splitlines()[0][:500]}") from None
    finally:
        store.close()
    return columns, [list(r) for r in rows]


def cmd_sql(args: SimpleNamespace) -> int:
    """``execution sql "SELECT ..." [--format table|csv|json]``: read-only queries on the
    service's ClickHouse tables, while the service runs."""
    import csv
    import io

    from app.settings import get_settings

    settings = get_settings()
    columns, rows = _sql_rows(settings, args.query, args.url or settings.sink_url, args.timeout)
    if args.format == "json":
        import orjson

        print(orjson.dumps([dict(zip(columns, r)) for r in rows], default=str, option=orjson.OPT_INDENT_2).decode())
    elif args.format == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        print(out.getvalue(), end="")
    else:
        cells = [[str(c) for c in columns]] + [["" if v is None else str(v) for v in r] for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        print("\n".join(lines))
        print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return 0


def cmd_settings(args: SimpleNamespace) -> int:
    from app.settings import get_settings

    print(json.dumps(get_settings().describe(), indent=2, default=str))
    return 0


#: The worker's web server the ``orders`` and ``positions`` commands talk to.
DEFAULT_URL = "http://127.0.0.1:8012"


def _http(method: str, url: str, body: dict | None = None, *, token: bool = False,
          command_id: str | None = None, timeout: float = 30.0) -> tuple[int, dict]:
    """One request to a worker's web server (standard library only): (status, JSON body)."""
    import urllib.error
    import urllib.request

    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        secret = os.environ.get("EXECUTION_API_TOKEN", "")
        if secret:
            headers["Authorization"] = f"Bearer {secret}"
        headers["X-Execution-Source"] = "cli"
    if command_id:
        headers["Idempotency-Key"] = command_id
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        return 0, {"error": f"{url}: {getattr(e, 'reason', e)}"}
    try:
        answer = json.loads(raw or b"{}")
    except ValueError:
        answer = {"error": raw.decode(errors="replace")[:500]}
    return status, answer if isinstance(answer, dict) else {"answer": answer}


def _print_answer(status: int, answer: dict) -> int:
    print(json.dumps({"status": status, **answer} if status else answer, indent=2))
    return 0 if status in (200, 202) else 1


def cmd_orders(args: SimpleNamespace) -> int:
    """``execution orders show|cancel|modify ORDER_ID``."""
    from urllib.parse import quote

    base = f"{args.url.rstrip('/')}/orders/{quote(args.order_id, safe='')}"
    if args.action == "show":
        return _print_answer(*_http("GET", base))
    if args.action == "cancel":
        return _print_answer(*_http("POST", f"{base}/cancel", {}, token=True, command_id=args.command_id))
    changes = {k: v for k, v in (("price", args.price), ("stop_loss", args.stop_loss),
                                 ("take_profit", args.take_profit)) if v is not None}
    return _print_answer(*_http("POST", f"{base}/modify", changes, token=True, command_id=args.command_id))


def cmd_positions(args: SimpleNamespace) -> int:
    """``execution positions close ACCOUNT SYMBOL [--volume V]``."""
    from urllib.parse import quote

    url = f"{args.url.rstrip('/')}/positions/{quote(args.account, safe='')}/{quote(args.symbol, safe='')}/close"
    body = {"volume": args.volume} if args.volume is not None else {}
    return _print_answer(*_http("POST", url, body, token=True, command_id=args.command_id))


def cmd_demo(args: SimpleNamespace) -> int:
    from app.demo import run_demo

    _own_children()
    os.environ["EXECUTION_LOCAL_BROKER"] = args.broker  # app.local.LOCAL_BROKER_ENV: the demo's LocalStack
    if args.broker == "kafka":  # the demo's own clients (the sink) too: Kafka refuses the local 4 s session
        os.environ["EXECUTION_PROFILE"] = "production"
    return run_demo(signals=args.signals, rate=args.rate, seed=args.seed)


# ------------------------------------------------------------------ the command line (click, as Faust's)
BROKER = click.option("--broker", type=click.Choice(["tansu", "kafka"]), default="tansu", show_default=True,
                      help="tansu: the embedded broker (pip only); kafka: Apache Kafka (KRaft) from Maven Central "
                           "jars (needs Java 17+, and Maven the first time)")
TOKEN_NOTE = "The token comes from EXECUTION_API_TOKEN. Prints the answer; exit 0 on 200/202, else 1."


def _url_option(f):
    return click.option("--url", default=DEFAULT_URL, show_default=True, help="a worker's web server")(f)


def _command_id_option(f):
    return click.option("--command-id", default=None,
                        help="makes a repeat act once (sent as Idempotency-Key); default: a new id")(f)


def _run(func, **kw: Any) -> None:
    """Call a ``cmd_*`` function with its arguments as attributes; its return is the exit code."""
    raise SystemExit(func(SimpleNamespace(**kw)))


@click.group(help="The order-execution service: its processes, the local stack and demo, and ops commands.",
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", envvar="EXECUTION_LOG_LEVEL", default="info", show_default=True)
@click.pass_context
def cli(ctx: click.Context, log_level: str) -> None:
    ctx.obj = {"log_level": log_level}
    if ctx.invoked_subcommand != "worker":  # Faust configures the worker's logging itself
        _logging(log_level)


@cli.command(help="run Tansu (or Apache Kafka) + nats-server locally, in the foreground")
@BROKER
@click.option("--kafka-nodes", type=click.Choice(["1", "3"]), default="1",
              help="with --broker kafka: 3 runs a cluster (replication factor 3, min.insync.replicas 2)")
def up(broker: str, kafka_nodes: str) -> None:
    _run(cmd_up, broker=broker, kafka_nodes=int(kafka_nodes))


@cli.command(help="NATS -> Kafka bridge")
def bridge() -> None:
    _run(cmd_bridge)


@cli.command(help="the Faust worker (agents, tables, web on :8012)")
@click.option("--web-port", type=int, default=None)
@click.pass_context
def worker(ctx: click.Context, web_port: int | None) -> None:
    _run(cmd_worker, log_level=ctx.obj["log_level"], web_port=web_port)


@cli.command(help="the MT5 broker simulator")
@click.option("--seed", type=int, default=7, show_default=True)
def sim(seed: int) -> None:
    _run(cmd_sim, seed=seed)


@cli.command(help="derived topics -> ClickHouse (HTTP on :8014 with /query)")
def sink() -> None:
    _run(cmd_sink)


@cli.command(help="show or set the operational config in the central hub")
@click.argument("action", type=click.Choice(["show", "set"]))
@click.argument("assignments", nargs=-1)
def config(action: str, assignments: tuple[str, ...]) -> None:
    """ASSIGNMENTS: PATH=VALUE, e.g. operational.fill_tracking.slippage_alert_threshold_pips=3"""
    _run(cmd_config, action=action, assignments=list(assignments))


@cli.command(help="the end-to-end demo on the embedded defaults")
@click.option("--signals", type=int, default=300, show_default=True)
@click.option("--rate", type=float, default=200.0, show_default=True, help="signals per second")
@click.option("--seed", type=int, default=42, show_default=True)
@BROKER
def demo(signals: int, rate: float, seed: int, broker: str) -> None:
    _run(cmd_demo, signals=signals, rate=rate, seed=seed, broker=broker)


@cli.command(help="print the effective settings (secrets masked)")
def settings() -> None:
    _run(cmd_settings)


@cli.command(help="a read-only SQL query on the ClickHouse tables, while the service runs: sent to the running "
                  "sink's /query (EXECUTION_SINK_URL, or --url), which owns the embedded chDB; with no sink "
                  "answering, straight to ClickHouse")
@click.argument("query")
@click.option("--format", "format_", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--url", default=None, help="the sink's HTTP server (default: the setting sink_url)")
@click.option("--timeout", type=float, default=60.0, show_default=True)
def sql(query: str, format_: str, url: str | None, timeout: float) -> None:
    _run(cmd_sql, query=query, format=format_, url=url, timeout=timeout)


@cli.group(help="show, cancel or modify an order. " + TOKEN_NOTE)
def orders() -> None:
    pass


@orders.command("show", help="the order, from the worker that owns it")
@click.argument("order_id")
@_url_option
def orders_show(order_id: str, url: str) -> None:
    _run(cmd_orders, action="show", order_id=order_id, url=url, command_id=None)


@orders.command("cancel", help="cancel a working limit, stop or stop-limit order")
@click.argument("order_id")
@_url_option
@_command_id_option
def orders_cancel(order_id: str, url: str, command_id: str | None) -> None:
    _run(cmd_orders, action="cancel", order_id=order_id, url=url, command_id=command_id)


@orders.command("modify", help="change an order's price, stop-loss or take-profit")
@click.argument("order_id")
@click.option("--price", type=float, default=None)
@click.option("--stop-loss", type=float, default=None)
@click.option("--take-profit", type=float, default=None)
@_url_option
@_command_id_option
def orders_modify(order_id: str, price: float | None, stop_loss: float | None, take_profit: float | None,
                  url: str, command_id: str | None) -> None:
    _run(cmd_orders, action="modify", order_id=order_id, price=price, stop_loss=stop_loss, take_profit=take_profit,
         url=url, command_id=command_id)


@cli.group(help="close (part of) a position. " + TOKEN_NOTE)
def positions() -> None:
    pass


@positions.command("close", help="close all of a position, or --volume lots of it")
@click.argument("account")
@click.argument("symbol")
@click.option("--volume", type=float, default=None, help="lots (default: all)")
@_url_option
@_command_id_option
def positions_close(account: str, symbol: str, volume: float | None, url: str, command_id: str | None) -> None:
    _run(cmd_positions, account=account, symbol=symbol, volume=volume, url=url, command_id=command_id)


def main(argv: list[str] | None = None) -> int:
    cli.main(args=argv, prog_name="execution")  # exits with the command's code
    return 0


if __name__ == "__main__":
    sys.exit(main())
