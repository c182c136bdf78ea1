"""ClickHouseStore on the embedded chDB engine (a data dir per test): schema, replay
idempotence and the service description's seed queries, run verbatim."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from app.models import Execution, Order, OrderIntent, OrderState, OrderType, Position, Side, TimeInForce
from app.sinks.clickhouse import TABLES, ClickHouseStore, to_row
from tables.order_types import MAGIC

# --- the seed queries of the service description ("Query Orders and Executions"), verbatim --

RECENT_ORDERS_SQL = """
-- Check recent orders
SELECT
    order_id,
    signal_id,
    symbol,
    order_type,
    state,
    entry_price,
    fill_price,
    slippage_pips,
    created_at,
    filled_at
FROM orders
WHERE created_at > now() - INTERVAL 1 DAY
ORDER BY created_at DESC
LIMIT 20;
"""

FILL_RATE_SQL = """
-- Calculate fill rate
SELECT
    COUNT(CASE WHEN state = 'FILLED' THEN 1 END) as filled,
    COUNT(CASE WHEN state = 'REJECTED' THEN 1 END) as rejected,
    COUNT(CASE WHEN state = 'CANCELLED' THEN 1 END) as cancelled,
    (COUNT(CASE WHEN state = 'FILLED' THEN 1 END) * 100.0 / COUNT(*)) as fill_rate_pct
FROM orders
WHERE created_at > now() - INTERVAL 7 DAY;
"""

SLIPPAGE_SQL = """
-- Average slippage analysis
SELECT
    symbol,
    AVG(slippage_pips) as avg_slippage,
    STDDEV(slippage_pips) as slippage_stddev,
    MAX(ABS(slippage_pips)) as max_slippage
FROM orders
WHERE state = 'FILLED'
  AND created_at > now() - INTERVAL 30 DAY
GROUP BY symbol
ORDER BY avg_slippage DESC;
"""

NOW = datetime.now(timezone.utc).replace(microsecond=0)
PIP = {"EURUSD": 0.0001, "GBPUSD": 0.0001, "USDJPY": 0.01}
PRICE = {"EURUSD": 1.1000, "GBPUSD": 1.2700, "USDJPY": 150.00}


@pytest.fixture
def store(tmp_path: Path):
    s = ClickHouseStore.from_dsn(f"chdb:///{tmp_path / 'chdb'}")
    s.ensure_schema()
    try:
        yield s
    finally:
        s.close()


def lifecycle(
    n: int, symbol: str, final: OrderState, age: timedelta, slippage: float | None = None, side: Side = Side.BUY
) -> list[Order]:
    """Every snapshot of one order, oldest first: PENDING v1, SUBMITTED v2, then the final state."""
    created = NOW - age
    base = Order(
        order_id=f"o-{n:03d}", signal_id=f"s-{n:03d}", account="acc-1", symbol=symbol, side=side,
        order_type=OrderType.MARKET, volume=1.0, entry_price=PRICE[symbol], expected_price=PRICE[symbol],
        version=1, created_at=created, updated_at=created,
    )
    snaps = [base]
    if final is OrderState.PENDING:
        return snaps
    submitted = base.model_copy(update=dict(
        state=OrderState.SUBMITTED, version=2, attempts=1, broker_ticket=1000 + n,
        submitted_at=created + timedelta(milliseconds=50), updated_at=created + timedelta(milliseconds=50)))
    snaps.append(submitted)
    if final is OrderState.SUBMITTED:
        return snaps
    done_at = created + timedelta(milliseconds=200)
    update: dict = dict(state=final, version=3, updated_at=done_at)
    if final is OrderState.FILLED:
        assert slippage is not None
        fill = PRICE[symbol] + slippage * PIP[symbol] * side.sign
        update.update(filled_volume=1.0, avg_fill_price=fill, slippage_pips=slippage, deals=(5000 + n,), filled_at=done_at)
    elif final is OrderState.REJECTED:
        update.update(retcode=10019, reason="no money")
    snaps.append(submitted.model_copy(update=update))
    return snaps


def dataset() -> list[list[Order]]:
    """Orders with a known answer to each seed query (ages relative to now)."""
    h, d = timedelta(hours=1), timedelta(days=1)
    return [
        # within 1 day (8 orders)
        lifecycle(1, "EURUSD", OrderState.FILLED, 1 * h, 0.5),
        lifecycle(2, "EURUSD", OrderState.FILLED, 2 * h, 1.5, side=Side.SELL),
        lifecycle(3, "GBPUSD", OrderState.FILLED, 3 * h, 2.0),
        lifecycle(4, "USDJPY", OrderState.FILLED, 4 * h, -2.0),
        lifecycle(5, "EURUSD", OrderState.REJECTED, 5 * h),
        lifecycle(6, "GBPUSD", OrderState.CANCELLED, 6 * h),
        lifecycle(7, "USDJPY", OrderState.SUBMITTED, 7 * h),
        lifecycle(8, "EURUSD", OrderState.REJECTED, 8 * h),
        # within 7 days
        lifecycle(9, "EURUSD", OrderState.FILLED, 3 * d, -0.5),
        lifecycle(10, "GBPUSD", OrderState.FILLED, 4 * d, 3.0),
        # within 30 days
        lifecycle(11, "GBPUSD", OrderState.FILLED, 10 * d, 1.0),
        lifecycle(12, "USDJPY", OrderState.FILLED, 20 * d, -4.0, side=Side.SELL),
        # older: in no seed query
        lifecycle(13, "EURUSD", OrderState.FILLED, 40 * d, 100.0),
    ]


def load(store: ClickHouseStore) -> list[list[Order]]:
    """Insert the dataset the way an at-least-once sink might: in order, then a replay of
    everything, then the old versions again after the new ones (separate inserts = parts)."""
    data = dataset()
    snaps = [s for order in data for s in order]
    store.insert_orders(snaps)
    store.insert_orders(snaps)  # replay
    store.insert_orders([s for order in data for s in order[:-1]])  # stale versions last
    store.insert_orders(list(reversed(snaps)))  # newest first
    return data


def test_schema_is_idempotent_and_keeps_data(store: ClickHouseStore, tmp_path: Path) -> None:
    store.ensure_schema()
    store.insert_orders(lifecycle(1, "EURUSD", OrderState.FILLED, timedelta(hours=1), 0.7))
    store.ensure_schema()
    store.ensure_schema()
    assert store.count("orders") == 1
    tables = dict(store.query("SELECT name, engine FROM system.tables WHERE database = currentDatabase()"))
    assert tables == {
        "orders_log": "ReplacingMergeTree", "orders": "View",
        "executions_log": "ReplacingMergeTree", "executions": "View",
        "positions_log": "ReplacingMergeTree", "positions": "View",
        "order_execution_archive_log": "ReplacingMergeTree", "order_execution_archive": "View",
        "positions_discrepancies_log": "ReplacingMergeTree", "positions_discrepancies": "View",
        "dead_letters_log": "ReplacingMergeTree", "dead_letters": "View",
    }
    # Persistent: a new store on the same directory sees the data.
    dsn = store.dsn
    store.close()
    again = ClickHouseStore.from_dsn(dsn)
    try:
        again.ensure_schema()
        assert again.query("SELECT order_id, state, slippage_pips FROM orders") == [("o-001", "FILLED", 0.7)]
    finally:
        again.close()


def test_columns_are_the_model_fields(store: ClickHouseStore) -> None:
    for table in TABLES:
        cols = [name for (name,) in store.query(
            "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {t:String} ORDER BY position",
            {"t": table.name})]
        expected = set(table.model.model_fields) | ({"fill_price"} if table.name == "orders" else set())
        assert set(cols) == expected, table.name
    types = dict(store.query(
        "SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = 'orders_log'"))
    assert types["created_at"] == "DateTime64(3, 'UTC')"
    assert types["filled_at"] == "Nullable(DateTime64(3, 'UTC'))"
    comments = dict(store.query(
        "SELECT table, comment FROM system.columns WHERE database = currentDatabase() AND name = 'slippage_pips'"))
    for t in ("orders_log", "executions_log"):
        assert "positive = adverse" in comments[t]


def test_replayed_and_out_of_order_snapshots_give_one_latest_row(store: ClickHouseStore) -> None:
    data = load(store)
    assert store.count("orders_log") > len(data)  # the raw table holds the replays (not merged yet)
    rows = store.query_dicts("SELECT * FROM orders ORDER BY order_id")
    assert [r["order_id"] for r in rows] == [o[-1].order_id for o in data]
    for row, snaps in zip(rows, data):
        latest = snaps[-1]
        assert row["state"] == latest.state.value
        assert row["version"] == latest.version
        assert row["fill_price"] == row["avg_fill_price"] == latest.avg_fill_price
        assert row["slippage_pips"] == latest.slippage_pips
        assert row["created_at"] == latest.created_at  # aware UTC, millisecond precision
        assert row["created_at"].tzinfo is not None
        assert row["deals"] == list(latest.deals)
        # a row reads back as the model it came from
        assert Order.model_validate({k: v for k, v in row.items() if k != "fill_price"}) == latest
    # A filter on a non-key column sees the latest snapshot only: no stale PENDING/SUBMITTED.
    assert store.query("SELECT count() FROM orders WHERE state = 'PENDING'") == [(0,)]
    assert store.query("SELECT order_id FROM orders WHERE state = 'SUBMITTED'") == [("o-007",)]
    # Merging does not change the answer.
    store.command("OPTIMIZE TABLE orders_log FINAL")
    assert store.count("orders_log") == len(data)
    assert store.query_dicts("SELECT * FROM orders ORDER BY order_id") == rows


def test_seed_recent_orders(store: ClickHouseStore) -> None:
    data = load(store)
    rows = store.query(RECENT_ORDERS_SQL)
    recent = [o[-1] for o in data[:8]]  # created within the last day, newest first
    assert [r[0] for r in rows] == [o.order_id for o in recent]
    for r, o in zip(rows, recent):
        _, signal_id, symbol, order_type, state, entry, fill, slip, created, filled = r
        assert (signal_id, symbol, order_type, state) == (o.signal_id, o.symbol, "market", o.state.value)
        assert entry == o.entry_price and fill == o.avg_fill_price and slip == o.slippage_pips
        assert created == o.created_at and filled == o.filled_at
    assert rows[0][4] == "FILLED" and rows[0][7] == 0.5 and rows[0][6] == pytest.approx(1.10005)
    assert rows[4][4] == "REJECTED" and rows[4][6] is None and rows[4][9] is None


def test_seed_fill_rate(store: ClickHouseStore) -> None:
    load(store)
    # 7 days: o-001..o-010 -> FILLED 6 (1,2,3,4,9,10), REJECTED 2, CANCELLED 1, SUBMITTED 1
    assert store.query(FILL_RATE_SQL) == [(6, 2, 1, 60.0)]


def test_seed_slippage_by_symbol(store: ClickHouseStore) -> None:
    load(store)
    rows = store.query(SLIPPAGE_SQL)
    # 30 days, FILLED: GBPUSD 2, 3, 1; EURUSD 0.5, 1.5, -0.5; USDJPY -2, -4 (o-013 is too old)
    assert [r[0] for r in rows] == ["GBPUSD", "EURUSD", "USDJPY"]
    got = {r[0]: r[1:] for r in rows}
    # STDDEV is ClickHouse's stddevSamp (sample standard deviation).
    assert got["GBPUSD"] == pytest.approx((2.0, 1.0, 3.0))
    assert got["EURUSD"] == pytest.approx((0.5, 1.0, 1.5))
    assert got["USDJPY"] == pytest.approx((-3.0, math.sqrt(2.0), 4.0))


def test_executions_replay_is_idempotent(store: ClickHouseStore) -> None:
    t0 = NOW - timedelta(minutes=5)
    execs = [
        Execution(
            execution_id=f"o-{i}:{7000 + i}", order_id=f"o-{i}", signal_id=f"s-{i}", account="acc-1",
            symbol="EURUSD", side=Side.BUY, deal=7000 + i, ticket=9000 + i, price=1.1 + i * 1e-5, volume=0.5,
            expected_price=1.1, slippage_pips=i * 0.1, cumulative_volume=0.5, avg_fill_price=1.1 + i * 1e-5,
            order_state=OrderState.PARTIALLY_FILLED, time=t0 + timedelta(seconds=i),
        )
        for i in range(1, 6)
    ]
    assert store.insert_executions(execs) == 5
    store.insert_executions(execs[2:])
    store.insert_executions(list(reversed(execs)))
    assert store.count("executions") == 5
    assert store.query("SELECT count(), round(sum(slippage_pips), 6), sum(volume) FROM executions") == [(5, 1.5, 2.5)]
    rows = store.query_dicts("SELECT * FROM executions ORDER BY execution_id")
    assert [Execution.model_validate(r) for r in rows] == execs


def test_positions_replay_is_idempotent_and_latest_wins(store: ClickHouseStore) -> None:
    def pos(symbol: str, version: int, net: float) -> Position:
        return Position(
            account="acc-1", symbol=symbol, net_volume=net, avg_open_price=1.1 if net else None,
            realized_pnl=10.0 * version, fills=version, last_deal=100 + version,
            deals=tuple(range(101, 101 + version)), version=version, updated_at=NOW + timedelta(seconds=version),
        )

    eur = [pos("EURUSD", v, n) for v, n in ((1, 1.0), (2, 2.0), (3, 0.0))]
    gbp = [pos("GBPUSD", v, n) for v, n in ((1, -1.0), (2, -0.5))]
    store.insert_positions(eur + gbp)
    store.insert_positions([eur[0], gbp[0]])  # stale, inserted after the newer versions
    store.insert_positions(list(reversed(eur + gbp)))  # replay
    rows = store.query_dicts("SELECT * FROM positions ORDER BY account, symbol")
    assert [Position.model_validate(r) for r in rows] == [eur[-1], gbp[-1]]
    assert rows[0]["avg_open_price"] is None and rows[0]["net_volume"] == 0.0


def test_unsupported_dsn_and_unstorable_values(store: ClickHouseStore) -> None:
    with pytest.raises(ValueError, match="scheme"):
        ClickHouseStore.from_dsn("postgres://x@y/z")
    order = lifecycle(1, "EURUSD", OrderState.SUBMITTED, timedelta(hours=1))[-1]
    with pytest.raises(ValueError, match="broker_ticket"):
        store.insert_orders([order.model_copy(update={"broker_ticket": 2**70})])
    assert store.insert_orders([]) == 0
    assert store.count("orders") == 0


# --- columns of the command layer and of broker exits ---------------------------------------


def exit_execution(i: int, **kw) -> Execution:
    """The stop-loss exit of a position: a sell deal of the broker, with its profit."""
    fields = dict(
        execution_id=f"o-{i}:{8000 + i}", order_id=f"o-{i}", signal_id=f"s-{i}", account="acc-1", symbol="EURUSD",
        side=Side.SELL, deal=8000 + i, ticket=None, price=1.0950, volume=0.5, expected_price=1.0950,
        slippage_pips=0.0, cumulative_volume=0.5, avg_fill_price=1.1, order_state=OrderState.FILLED,
        time=NOW - timedelta(minutes=1), entry="out", reason="sl", position=4000 + i, profit=-250.0,
        currency="EUR", magic=MAGIC,
    )
    return Execution(**{**fields, **kw})


def test_exit_and_command_columns_round_trip(store: ClickHouseStore) -> None:
    execs = [exit_execution(1), exit_execution(2, entry="inout", reason="stop_out", profit=12.34),
             exit_execution(3, entry="in", reason="expert", position=None, profit=0.0, currency="USD", magic=0)]
    store.insert_executions(execs)
    rows = store.query_dicts("SELECT * FROM executions ORDER BY execution_id")
    assert [Execution.model_validate(r) for r in rows] == execs
    assert store.query("SELECT reason, entry, position, profit, currency, magic FROM executions ORDER BY deal")[0] == (
        "sl", "out", 4001, -250.0, "EUR", MAGIC)
    # PnL of the exits by reason, as an analyst would ask it
    assert store.query("SELECT reason, sum(profit) FROM executions WHERE entry != 'in' GROUP BY reason ORDER BY reason") == [
        ("sl", -250.0), ("stop_out", 12.34)]

    close = lifecycle(1, "EURUSD", OrderState.FILLED, timedelta(hours=1), 0.0, side=Side.SELL)[-1].model_copy(update=dict(
        intent=OrderIntent.CLOSE, position_ticket=4001, commands=("c-1", "c-2")))
    gtd = lifecycle(2, "GBPUSD", OrderState.SUBMITTED, timedelta(hours=1))[-1].model_copy(update=dict(
        order_type=OrderType.LIMIT, time_in_force=TimeInForce.GTD, expires_at=NOW + timedelta(hours=3)))
    store.insert_orders([close, gtd])
    rows = store.query_dicts("SELECT * FROM orders ORDER BY order_id")
    assert [Order.model_validate({k: v for k, v in r.items() if k != "fill_price"}) for r in rows] == [close, gtd]
    assert store.query("SELECT intent, time_in_force, expires_at, position_ticket, commands FROM orders ORDER BY order_id") == [
        ("close", "GTC", None, 4001, ["c-1", "c-2"]), ("open", "GTD", NOW + timedelta(hours=3), None, [])]

    p = Position(account="acc-1", symbol="EURUSD", net_volume=0.0, realized_pnl=-250.0, currency="EUR", ticket=4001,
                 fills=2, last_deal=8001, deals=(7001, 8001), version=2, updated_at=NOW)
    store.insert_positions([p])
    [row] = store.query_dicts("SELECT * FROM positions")
    assert Position.model_validate(row) == p and (row["currency"], row["ticket"]) == ("EUR", 4001)


#: The columns this version added to each raw table.
ADDED = {
    "orders": {"intent", "time_in_force", "expires_at", "position_ticket", "commands"},
    "executions": {"entry", "reason", "position", "profit", "currency", "magic"},
    "positions": {"currency", "ticket"},
}


def test_a_database_of_the_old_schema_gets_the_new_columns(tmp_path: Path) -> None:
    """Tables and views made by the previous version (without the new columns) and rows in
    them: ``ensure_schema`` adds the columns in place, the views show them, old rows read the
    models' defaults, and a new version of an old row still replaces it."""
    dsn = f"chdb:///{tmp_path / 'old'}"
    old_tables = [replace(t, columns=tuple(c for c in t.columns if c.name not in ADDED.get(t.name, set()))) for t in TABLES]
    with ClickHouseStore.from_dsn(dsn) as old:
        for t in old_tables:
            old.command(t.create_table())
            old.command(t.create_view())
        assert "intent" not in old.columns_of("orders_log") and "profit" not in old.columns_of("executions")
        order = lifecycle(1, "EURUSD", OrderState.SUBMITTED, timedelta(hours=1))[-1]
        execution = exit_execution(1, entry="in", reason="expert", position=None, profit=0.0, currency="USD", magic=0)
        position = Position(account="acc-1", symbol="EURUSD", net_volume=1.0, avg_open_price=1.1, fills=1,
                            last_deal=8001, deals=(8001,), version=1, updated_at=NOW)
        for t, m in zip(old_tables, (order, execution, position)):  # rows of the old columns only
            old._client.insert(t.log_table, [to_row(t, m)], column_names=t.column_names)

    with ClickHouseStore.from_dsn(dsn) as store:
        store.ensure_schema()
        for t in TABLES:
            assert store.columns_of(t.log_table) == t.column_names, t.name  # in place, in order
            view = store.columns_of(t.name)
            assert ADDED.get(t.name, set()) <= set(view) and set(view) - {"fill_price"} == set(t.column_names)
        # old rows read back as the models with their defaults
        [o] = store.query_dicts("SELECT * FROM orders")
        assert Order.model_validate({k: v for k, v in o.items() if k != "fill_price"}) == order
        assert (o["intent"], o["time_in_force"], o["expires_at"], o["position_ticket"], o["commands"]) == (
            "open", "GTC", None, None, [])
        [e] = store.query_dicts("SELECT * FROM executions")
        assert Execution.model_validate(e) == execution
        assert (e["entry"], e["reason"], e["position"], e["profit"], e["currency"], e["magic"]) == (
            "in", "expert", None, 0.0, "USD", 0)
        [p] = store.query_dicts("SELECT * FROM positions")
        assert Position.model_validate(p) == position and (p["currency"], p["ticket"]) == ("USD", None)
        # new rows of every column, and a newer version of the old position replaces it
        newer = position.model_copy(update=dict(net_volume=0.0, avg_open_price=None, realized_pnl=-50.0, currency="EUR",
                                                ticket=4001, version=2))
        store.insert_positions([newer])
        store.insert_executions([exit_execution(2)])
        assert [Position.model_validate(r) for r in store.query_dicts("SELECT * FROM positions")] == [newer]
        assert store.query("SELECT deal, entry, currency FROM executions ORDER BY deal") == [
            (8001, "in", "USD"), (8002, "out", "EUR")]
        store.command("OPTIMIZE TABLE positions_log FINAL")
        assert store.query("SELECT count(), any(currency) FROM positions_log") == [(1, "EUR")]
        # and again: nothing left to add
        assert all(t.add_columns(store.columns_of(t.log_table)) == [] for t in TABLES)
        store.ensure_schema()
        assert store.count("executions") == 2
