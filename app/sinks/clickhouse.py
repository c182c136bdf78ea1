"""ClickHouse storage of the derived topics: schema, typed inserts and queries.

One implementation for both deployments: clickhouse-connect (>= 1.12) drives the embedded
chDB engine itself (``chdb:///path`` DSN -> its in-process ``ChdbClient``) and a ClickHouse
server over HTTP(S) (``clickhouse://user@host:8123/db``, ``clickhouses://`` for TLS).  Same
schema, same SQL, same Python types on both; no second backend interface is needed.

Schema (column names = model field names, datetimes ``DateTime64(3, 'UTC')``):

==================  =====================================  ==================================
raw table           engine                                 user-facing view (latest version)
==================  =====================================  ==================================
``orders_log``      ReplacingMergeTree(version)            ``orders`` (+ ``fill_price``
                    ORDER BY order_id                      = ``avg_fill_price``)
``executions_log``  ReplacingMergeTree ORDER BY            ``executions``
                    execution_id
``positions_log``   ReplacingMergeTree(version)            ``positions``
                    ORDER BY (account, symbol)
``order_execution_  ReplacingMergeTree ORDER BY event_id   ``order_execution_archive``
archive_log``
``positions_discre  ReplacingMergeTree ORDER BY (account,  ``positions_discrepancies``
pancies_log``       symbol, detected_at, kind)
``dead_letters_log`` ReplacingMergeTree ORDER BY (topic,   ``dead_letters``
                    partition, offset)
==================  =====================================  ==================================

The sink is at-least-once: a batch may be inserted again after a crash, a failed commit or a
rebalance.  The raw tables absorb that (ReplacingMergeTree keeps one row per key, the highest
``version``), but only once a background merge ran; the views read the raw tables with
``FINAL``, so a query sees exactly one row per key, the latest version, at any time.  That is
what lets the seed queries of the service description run unchanged (``FROM orders``, no
``FINAL``) and count right.  ``FINAL`` is applied before any ``WHERE`` of the outer query
(ClickHouse never moves non-key predicates to PREWHERE under FINAL), so filtering on ``state``
or ``created_at`` sees the latest snapshot only.

Schema changes: a column added to a model is added to its table's ``columns`` (with a
``default`` when the type's own is not the model's).  :meth:`ClickHouseStore.ensure_schema`,
run at every start, creates what is missing, adds the columns an existing raw table lacks
(``ALTER TABLE ... ADD COLUMN IF NOT EXISTS ... AFTER ...``, so the layout matches a fresh
table; rows written before read the DEFAULT) and recreates the views (``CREATE OR REPLACE
VIEW``), which list their columns explicitly.  The same statements run on chDB and a server.

Slippage (``slippage_pips``) is in pips, positive = adverse (worse for us): a buy filled above,
or a sell filled below, its expected price.  It is a column COMMENT of the raw tables.

chDB is in-process: a data directory must be opened by one process only (the sink owns it in
``execution sink`` and in the demo); within a process, stores on the same path share the engine
and a store on another path can only be opened once the others are closed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Iterable, Sequence
from urllib.parse import urlparse

import orjson
from pydantic import BaseModel

from app.models import DeadLetter, Execution, Order, OrderEvent, Position
from tables.reconcile import Discrepancy

log = logging.getLogger(__name__)

DT = "DateTime64(3, 'UTC')"
SLIPPAGE_COMMENT = (
    "pips, positive = adverse (worse for us): a buy filled above, or a sell filled below, "
    "the expected price"
)

INT64 = (-(2**63), 2**63 - 1)
UINT64 = (0, 2**64 - 1)


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    comment: str = ""
    #: A DEFAULT expression: what rows written before the column was added read as (the
    #: model's default), e.g. ``'USD'``.  None: the type's default (0, '', NULL, []).
    default: str | None = None

    def ddl(self) -> str:
        default = f" DEFAULT {self.default}" if self.default is not None else ""
        comment = f" COMMENT '{_sql_str(self.comment)}'" if self.comment else ""
        return f"    {self.name} {self.type}{default}{comment}"


@dataclass(frozen=True)
class Table:
    """A raw ReplacingMergeTree table and the view of its latest rows."""

    name: str  # the user-facing view
    log_table: str  # the raw table
    model: type[BaseModel]
    columns: tuple[Column, ...]
    order_by: str
    version: str | None  # ReplacingMergeTree version column (None: the last insert wins)
    comment: str
    #: Extra expressions of the view, e.g. ``avg_fill_price AS fill_price``: {after column: expr}.
    view_extra: tuple[tuple[str, str], ...] = ()

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def add_columns(self, existing: Iterable[str] | None = None) -> list[str]:
        """``ALTER TABLE ... ADD COLUMN IF NOT EXISTS``, in place (``AFTER`` its predecessor),
        for each column not in ``existing`` (None: for every column but the first): brings a
        raw table made by an older schema to this one.  Rows written before read the column's
        DEFAULT.  The view must be recreated after it (:meth:`create_view`)."""
        have = set(existing) if existing is not None else {self.columns[0].name}
        return [
            f"ALTER TABLE {self.log_table} ADD COLUMN IF NOT EXISTS {c.ddl().strip()} AFTER {prev.name}"
            for prev, c in zip(self.columns, self.columns[1:])
            if c.name not in have
        ]

    def create_table(self) -> str:
        cols = ",\n".join(c.ddl() for c in self.columns)
        engine = f"ReplacingMergeTree({self.version})" if self.version else "ReplacingMergeTree"
        return (
            f"CREATE TABLE IF NOT EXISTS {self.log_table}\n(\n{cols}\n)\n"
            f"ENGINE = {engine}\nORDER BY {self.order_by}\n"
            f"COMMENT '{_sql_str(self.comment + ' (raw, may hold replayed rows until merged: query the view ' + self.name + ')')}'"
        )

    def create_view(self) -> str:
        extra = dict(self.view_extra)
        select: list[str] = []
        for c in self.columns:
            select.append(c.name)
            if c.name in extra:
                select.append(extra[c.name])
        body = ",\n    ".join(select)
        # OR REPLACE: idempotent, and a changed definition is applied on the next start.
        return (
            f"CREATE OR REPLACE VIEW {self.name} AS\nSELECT\n    {body}\nFROM {self.log_table} FINAL"
        )


def _sql_str(s: str) -> str:
    return s.replace("\\", "\\\\").replace("'", "\\'")


ORDERS = Table(
    name="orders",
    log_table="orders_log",
    model=Order,
    order_by="order_id",
    version="version",
    comment="Order snapshots from orders.status, one row per order_id after merge, highest version wins",
    view_extra=(("avg_fill_price", "avg_fill_price AS fill_price"),),
    columns=(
        Column("order_id", "String"),
        Column("signal_id", "String"),
        Column("account", "LowCardinality(String)"),
        Column("strategy", "Nullable(String)"),
        Column("symbol", "LowCardinality(String)"),
        Column("side", "LowCardinality(String)", "buy | sell"),
        Column("order_type", "LowCardinality(String)", "market | limit | stop | stop_limit"),
        Column("volume", "Float64", "requested, lots"),
        Column("entry_price", "Float64", "the signal's entry price"),
        Column("expected_price", "Float64", "slippage reference: entry (market), limit or trigger (pending)"),
        Column("trigger_price", "Nullable(Float64)"),
        Column("limit_price", "Nullable(Float64)"),
        Column("stop_loss", "Nullable(Float64)"),
        Column("take_profit", "Nullable(Float64)"),
        Column("state", "LowCardinality(String)",
               "PENDING | SUBMITTED | PARTIALLY_FILLED | FILLED | CANCELLED | REJECTED | FAILED"),
        Column("filled_volume", "Float64", "lots"),
        Column("avg_fill_price", "Nullable(Float64)", "volume-weighted over applied fills (the view also names it fill_price)"),
        Column("slippage_pips", "Nullable(Float64)", "of avg_fill_price vs expected_price, " + SLIPPAGE_COMMENT),
        Column("arrival_price", "Nullable(Float64)", "the broker's touch when the order went out (ask: buy, bid: sell)"),
        Column("deals", "Array(Int64)", "broker deal tickets applied"),
        Column("broker_ticket", "Nullable(Int64)"),
        Column("retcode", "Nullable(Int64)"),
        Column("reason", "Nullable(String)"),
        Column("attempts", "Int64", "submissions sent to the broker"),
        Column("intent", "LowCardinality(String)", "open | close: trade a signal, or close (part of) a position",
               "'open'"),
        Column("time_in_force", "LowCardinality(String)", "GTC | DAY | GTD (pending orders)", "'GTC'"),
        Column("expires_at", f"Nullable({DT})", "when a DAY or GTD order stops working"),
        Column("position_ticket", "Nullable(Int64)", "the broker position this order opened or closes"),
        Column("commands", "Array(String)", "ids of the commands applied (cancel, modify, ...), newest last"),
        Column("pending_command", "Nullable(String)", "an accepted cancel or modify awaiting the broker (JSON)"),
        Column("version", "UInt64", "lifecycle events applied: the ReplacingMergeTree version"),
        Column("created_at", DT),
        Column("updated_at", DT),
        Column("submitted_at", f"Nullable({DT})"),
        Column("filled_at", f"Nullable({DT})"),
    ),
)

EXECUTIONS = Table(
    name="executions",
    log_table="executions_log",
    model=Execution,
    order_by="execution_id",
    version=None,
    comment="Fills applied to orders, from the executions topic, one row per execution_id after merge",
    columns=(
        Column("execution_id", "String", "{order_id}:{deal}"),
        Column("order_id", "String"),
        Column("signal_id", "String"),
        Column("account", "LowCardinality(String)"),
        Column("symbol", "LowCardinality(String)"),
        Column("side", "LowCardinality(String)", "buy | sell"),
        Column("deal", "Int64", "broker deal ticket"),
        Column("ticket", "Nullable(Int64)", "broker order ticket"),
        Column("price", "Float64"),
        Column("volume", "Float64", "lots"),
        Column("expected_price", "Float64"),
        Column("slippage_pips", "Float64", "this fill vs expected_price, " + SLIPPAGE_COMMENT),
        Column("cumulative_volume", "Float64", "order's filled volume after this fill"),
        Column("avg_fill_price", "Float64", "order's VWAP after this fill"),
        Column("order_state", "LowCardinality(String)", "order's state after this fill"),
        Column("time", DT, "broker deal time"),
        Column("entry", "LowCardinality(String)", "in | out | inout: opened/added, reduced/closed, reversed", "'in'"),
        Column("reason", "LowCardinality(String)",
               "expert (an order sent through the connector) | client (by hand at a terminal) | sl | tp | stop_out",
               "'expert'"),
        Column("position", "Nullable(Int64)", "broker position ticket"),
        Column("profit", "Float64", "the broker's profit of the deal, in currency"),
        Column("currency", "LowCardinality(String)", "the account's deposit currency", "'USD'"),
        Column("magic", "UInt64", "MT5 magic number of the deal"),
    ),
)

POSITIONS = Table(
    name="positions",
    log_table="positions_log",
    model=Position,
    order_by="(account, symbol)",
    version="version",
    comment="Net position per account and symbol, from the positions topic, highest version wins",
    columns=(
        Column("account", "LowCardinality(String)"),
        Column("symbol", "LowCardinality(String)"),
        Column("net_volume", "Float64", "lots, + long / - short"),
        Column("avg_open_price", "Nullable(Float64)", "of the open net volume; NULL when flat"),
        Column("realized_pnl_price", "Float64", "sum of (close - open) x lots x direction"),
        Column("realized_pnl", "Float64", "sum of the broker's deal profit, in currency"),
        Column("currency", "LowCardinality(String)", "the account currency of realized_pnl", "'USD'"),
        Column("ticket", "Nullable(Int64)", "the broker's position ticket (from the last deal)"),
        Column("fills", "Int64"),
        Column("last_deal", "Nullable(Int64)"),
        Column("deals", "Array(Int64)", "recent deal tickets applied (bounded)"),
        Column("corrected_deals", "Array(Int64)", "deals a correction counted before they arrived (profit pending)"),
        Column("version", "UInt64", "the ReplacingMergeTree version"),
        Column("updated_at", DT),
    ),
)

ARCHIVE = Table(
    name="order_execution_archive",
    log_table="order_execution_archive_log",
    model=OrderEvent,
    order_by="event_id",
    version=None,
    comment="Every lifecycle event from the order_execution_archive topic (the audit trail), one row per event_id",
    columns=(
        Column("event_id", "String", "{order_id}:{version}:{type}: replays give the same id"),
        Column("type", "LowCardinality(String)", "created, transition, refused, fill, slippage_alert, command_*, ..."),
        Column("order_id", "String", "'' for an event of a position (position_corrected)"),
        Column("signal_id", "String"),
        Column("symbol", "LowCardinality(String)"),
        Column("account", "LowCardinality(String)"),
        Column("from_state", "Nullable(String)"),
        Column("to_state", "Nullable(String)"),
        Column("reason", "Nullable(String)"),
        Column("detail", "String", "JSON: the event's details (JSONExtract* reads them)"),
        Column("at", DT),
    ),
)

DISCREPANCIES = Table(
    name="positions_discrepancies",
    log_table="positions_discrepancies_log",
    model=Discrepancy,
    order_by="(account, symbol, detected_at, kind)",
    version=None,
    comment="Reconciliation findings from the positions.discrepancies topic: ours vs the broker's net position",
    columns=(
        Column("account", "LowCardinality(String)"),
        Column("symbol", "LowCardinality(String)"),
        Column("kind", "LowCardinality(String)", "mismatch | missing_ours | missing_broker"),
        Column("ours_net_volume", "Float64", "lots"),
        Column("broker_net_volume", "Float64", "lots"),
        Column("difference", "Float64", "broker - ours"),
        Column("ours_avg_price", "Nullable(Float64)"),
        Column("broker_avg_price", "Nullable(Float64)"),
        Column("broker_deals", "Array(Int64)", "the deal tickets the broker's position is made of"),
        Column("broker_ticket", "Nullable(Int64)"),
        Column("detected_at", DT),
    ),
)

DEAD_LETTERS = Table(
    name="dead_letters",
    log_table="dead_letters_log",
    model=DeadLetter,
    order_by="(topic, partition, offset)",
    version=None,
    comment="Records of the dead-letter topics (signals.dlq, fills.dlq, executions.dlq, sink.dlq) and why",
    columns=(
        Column("topic", "LowCardinality(String)", "the dead-letter topic"),
        Column("partition", "Int64"),
        Column("offset", "Int64"),
        Column("key", "Nullable(String)"),
        Column("reason", "String", "why it is dead (the reason header)"),
        Column("value", "String", "the original payload (UTF-8, undecodable bytes replaced)"),
        Column("headers", "String", "JSON: the other headers (subject, route, the source topic/offset, ...)"),
        Column("at", DT, "the dead letter's Kafka timestamp"),
    ),
)

TABLES: tuple[Table, ...] = (ORDERS, EXECUTIONS, POSITIONS, ARCHIVE, DISCREPANCIES, DEAD_LETTERS)
TABLES_BY_NAME = {t.name: t for t in TABLES}


# --------------------------------------------------------------------------------------
# Model -> row
# --------------------------------------------------------------------------------------


def _cell(value: Any, col: Column) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):  # a JSON String column (an event's detail, headers)
        return orjson.dumps(value, default=str).decode()
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)  # naive = UTC, everywhere in the service
    base = col.type.removeprefix("Nullable(").removeprefix("Array(")
    if base.startswith(("Int64", "UInt64")):
        lo, hi = UINT64 if base.startswith("UInt64") else INT64
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not lo <= v <= hi:
                raise ValueError(f"{col.name}: {v} does not fit {col.type}")
    return value


def to_row(table: Table, model: BaseModel) -> list[Any]:
    """The row of ``table`` for a model; ValueError if a value cannot be stored."""
    if not isinstance(model, table.model):
        raise TypeError(f"{table.name} takes {table.model.__name__}, not {type(model).__name__}")
    return [_cell(getattr(model, c.name), c) for c in table.columns]


# --------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------


class ClickHouseStore:
    """The tables of :data:`TABLES` over one clickhouse-connect client.

    Thread-safe (one lock around the client): the sink inserts from a worker thread while
    the demo or a test queries.
    """

    def __init__(self, client: Any, dsn: str, backend: str) -> None:
        self._client = client
        self._lock = threading.RLock()
        self.dsn = dsn  # without the password (it is never put in the DSN by this service)
        #: ``"chdb"`` (embedded) or ``"server"``.
        self.backend = backend

    # --- construction -----------------------------------------------------------------
    @classmethod
    def from_dsn(cls, dsn: str, *, password: str | None = None, **client_options: Any) -> "ClickHouseStore":
        """``chdb:///abs/path`` (or ``chdb://memory``) for the embedded engine;
        ``clickhouse://user@host:8123/db`` or ``clickhouses://user@host:8443/db`` (TLS) for a
        server.  ``client_options`` go to :func:`clickhouse_connect.get_client`."""
        import clickhouse_connect

        scheme = urlparse(dsn).scheme.lower()
        options: dict[str, Any] = {"tz_mode": "aware", **client_options}
        if scheme == "chdb":
            if dsn.startswith("chdb:///"):
                from pathlib import Path

                Path(urlparse(dsn).path).mkdir(parents=True, exist_ok=True)
            client = clickhouse_connect.get_client(dsn=dsn, **options)
            backend = "chdb"
        elif scheme in ("clickhouse", "clickhouses", "http", "https"):
            # The scheme picks TLS; the DSN gives user, host, port and database.
            options.setdefault("secure", scheme in ("clickhouses", "https"))
            # No HTTP session: statements are independent, and a session would serialise
            # (or refuse) concurrent use; the store's lock serialises this process anyway.
            options.setdefault("autogenerate_session_id", False)
            server_dsn = "http" + dsn[len(scheme):] if scheme.startswith("clickhouse") else dsn
            client = clickhouse_connect.get_client(dsn=server_dsn, password=password or "", **options)
            backend = "server"
        else:
            raise ValueError(f"unsupported ClickHouse DSN scheme {scheme!r}: use chdb://, clickhouse:// or clickhouses://")
        safe = dsn
        parsed = urlparse(dsn)
        if parsed.password:
            safe = dsn.replace(f":{parsed.password}@", ":**********@")
        log.info("ClickHouse store: %s (%s)", safe, backend)
        return cls(client, safe, backend)

    @classmethod
    def from_settings(cls, settings: Any) -> "ClickHouseStore":
        pw = settings.clickhouse_password.get_secret_value() if settings.clickhouse_password else None
        return cls.from_dsn(settings.resolved_clickhouse_dsn, password=pw)

    # --- schema -------------------------------------------------------------------------
    def schema_statements(self) -> list[str]:
        """Every statement :meth:`ensure_schema` may run, per table: create the raw table,
        add the columns an older schema lacks, (re)create the view."""
        return [stmt for t in TABLES for stmt in (t.create_table(), *t.add_columns(), t.create_view())]

    def columns_of(self, table: str) -> list[str]:
        """The columns of a table (or view) of the current database, in order."""
        return [name for (name,) in self.query(
            "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {t:String} "
            "ORDER BY position", {"t": table})]

    def ensure_schema(self) -> None:
        """Create the raw tables (IF NOT EXISTS), add the columns a table made by an older
        schema lacks (``ALTER TABLE ... ADD COLUMN IF NOT EXISTS``), and (re)create the views
        so they show them: idempotent, and safe against a second process doing the same."""
        for t in TABLES:
            self.command(t.create_table())
            for stmt in t.add_columns(self.columns_of(t.log_table)):
                log.info("ClickHouse schema: %s", stmt.split(" COMMENT ")[0])
                self.command(stmt)
            self.command(t.create_view())

    # --- inserts ------------------------------------------------------------------------
    def _insert(self, table: Table, models: Sequence[BaseModel]) -> int:
        if not models:
            return 0
        rows = [to_row(table, m) for m in models]
        with self._lock:
            self._client.insert(table.log_table, rows, column_names=table.column_names)
        return len(rows)

    def insert_orders(self, orders: Sequence[Order]) -> int:
        """Insert order snapshots (any order, any repetition): returns rows written."""
        return self._insert(ORDERS, orders)

    def insert_executions(self, executions: Sequence[Execution]) -> int:
        return self._insert(EXECUTIONS, executions)

    def insert_positions(self, positions: Sequence[Position]) -> int:
        return self._insert(POSITIONS, positions)

    def insert(self, table: str, models: Sequence[BaseModel]) -> int:
        """Insert into a table of :data:`TABLES` by name."""
        return self._insert(TABLES_BY_NAME[table], models)

    # --- queries ------------------------------------------------------------------------
    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple]:
        """Rows as tuples (datetimes timezone-aware UTC).  A trailing ``;`` is fine."""
        with self._lock:
            result = self._client.query(sql, parameters=parameters)
            return [tuple(r) for r in result.result_rows]

    def query_dicts(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Rows as dicts keyed by column name."""
        with self._lock:
            result = self._client.query(sql, parameters=parameters)
            names = list(result.column_names)
            return [dict(zip(names, r)) for r in result.result_rows]

    def select(self, sql: str) -> tuple[list[str], list[tuple]]:
        """An analyst's query, read-only (ClickHouse's ``readonly=2``: no writes, no DDL;
        settings may change): (column names, rows)."""
        with self._lock:
            result = self._client.query(sql, settings={"readonly": 2})
            return list(result.column_names), [tuple(r) for r in result.result_rows]

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        with self._lock:
            return self._client.command(sql, parameters=parameters)

    def count(self, table: str) -> int:
        """Rows of a view (one per key) or raw table."""
        return int(self.query(f"SELECT count() FROM {table}")[0][0])

    def ping(self) -> bool:
        try:
            self.query("SELECT 1")
            return True
        except Exception:
            return False

    # --- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    @property
    def closed(self) -> bool:
        return self._client is None

    def __enter__(self) -> "ClickHouseStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rows_of(table: str, models: Iterable[BaseModel]) -> list[list[Any]]:
    """The rows a list of models becomes (for inspection and tests)."""
    t = TABLES_BY_NAME[table]
    return [to_row(t, m) for m in models]
