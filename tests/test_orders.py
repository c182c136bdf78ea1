"""Orders end to end: real Tansu, NATS, the broker simulator, the bridge and Faust workers.

One pipeline for the module (a worker takes seconds to join); each test uses its own
signal ids and leaves the simulator as it found it.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from app.models import EventType, OrderState
from app.sample import REFERENCE, signal_dict
from pipeline import TEST_CONFIG, Pipeline
from support import committed_vs_end, wait_until
from tables.idempotency import order_id_for
from tables.order_state import LIFECYCLE_EVENTS

pytestmark = pytest.mark.slow

PARTITIONS = 4
LIFECYCLE = {e.value for e in LIFECYCLE_EVENTS}


@pytest.fixture(scope="module")
async def pipe(tmp_path_factory):
    p = Pipeline(tmp_path_factory.mktemp("orders"), partitions=PARTITIONS)
    await p.start()
    await p.hold_reference_prices()
    try:
        yield p
    finally:
        p.stop()


def oid(signal_id: str) -> str:
    return order_id_for(signal_id, PARTITIONS)


def types_of(events) -> list[str]:
    return [e.type.value for e in events]


async def test_same_signal_five_times_and_after_restart_is_one_order(pipe: Pipeline):
    rng = random.Random(1)
    s = signal_dict("dup-1", rng, symbol="EURUSD", order_type="market", lots=0.1)
    await pipe.publish_signals([s], times=5)
    order_id = oid("dup-1")
    orders = await pipe.wait_orders([order_id])
    assert orders[order_id].state is OrderState.FILLED

    await asyncio.to_thread(pipe.services.restart, "worker-1")
    await pipe.publish_signals([s], times=1)

    async def dups() -> int:
        return types_of((await pipe.events())[order_id]).count("duplicate_signal")

    for _ in range(60):
        if await dups() >= 5:
            break
        await asyncio.sleep(0.5)
    events = (await pipe.events())[order_id]
    assert types_of(events).count("created") == 1
    assert types_of(events).count("duplicate_signal") == 5
    stats = await pipe.sim_stats()
    assert stats["by_comment"][order_id] == 1, "one submission at the broker"
    assert stats["executed"][order_id] == 1


async def test_kill_9_right_after_submission_still_one_broker_order(pipe: Pipeline):
    rng = random.Random(2)
    signals = [signal_dict(f"kill-{i}", rng, symbol="GBPUSD", order_type="market", lots=0.1) for i in range(40)]
    ids = [oid(s["signal_id"]) for s in signals]
    publisher = asyncio.create_task(pipe.publish_signals(signals, rate=40))
    # Kill the worker as soon as the broker has seen some of these orders.
    for _ in range(200):
        stats = await pipe.sim_stats()
        if sum(1 for i in ids if i in stats["by_comment"]) >= 5:
            break
        await asyncio.sleep(0.05)
    await asyncio.to_thread(pipe.services.restart, "worker-1", True)
    await publisher
    orders = await pipe.wait_orders(ids, timeout=90)
    assert {o.state for o in orders.values() if o.order_id in ids} == {OrderState.FILLED}
    stats = await pipe.sim_stats()
    for i in ids:
        assert stats["executed"].get(i) == 1, f"{i} executed {stats['executed'].get(i)} times"
    events = await pipe.events()
    for i in ids:
        assert types_of(events[i]).count("created") == 1


async def test_each_order_type_ends_filled_with_its_events(pipe: Pipeline):
    rng = random.Random(3)
    signals = {
        t: signal_dict(f"type-{t}", rng, symbol="EURUSD", order_type=t, side="buy", lots=0.2)
        for t in ("market", "limit", "stop", "stop_limit")
    }
    await pipe.publish_signals(list(signals.values()))
    ids = {t: oid(s["signal_id"]) for t, s in signals.items()}
    await pipe.wait_orders(list(ids.values()), done=lambda o: o.state is not OrderState.PENDING)
    # Walk the price through every trigger and limit so the pending orders execute.
    limit = signals["limit"]["limit_price"]
    trig = max(signals["stop"]["trigger_price"], signals["stop_limit"]["trigger_price"])
    # The simulator matches within set_price, before it answers: the stops have triggered
    # (the stop-limit is now a limit) when the next price comes.
    await pipe.sim(cmd="set_price", symbol="EURUSD", bid=round(trig + 0.0005, 5), hold=True)
    await pipe.sim(cmd="set_price", symbol="EURUSD", bid=round(min(limit, signals["stop_limit"]["limit_price"]) - 0.0010, 5), hold=True)
    try:
        orders = await pipe.wait_orders(list(ids.values()))
    finally:
        await pipe.sim(cmd="set_price", symbol="EURUSD", mid=REFERENCE["EURUSD"][0], hold=True)
    events = await pipe.events()
    for t, i in ids.items():
        o = orders[i]
        assert o.state is OrderState.FILLED, (t, o.state, o.reason)
        assert o.order_type.value == t
        assert abs(o.filled_volume - 0.2) < 1e-9
        # Lifecycle events only (a fill 10 pips better than the limit also raises a slippage
        # alert: the seed alerts on |slippage| > threshold).  A fill may overtake the
        # connector's reply, in which case SUBMITTED is skipped.
        seq = [e for e in types_of(events[i]) if e in LIFECYCLE]
        assert seq[0] == "created" and seq[-1] == "filled", (t, seq)
        assert set(seq) <= {"created", "submitted", "partially_filled", "filled"}, (t, seq)
    subjects = {s for s, _ in await pipe.nats_messages()}
    for i in ids.values():
        assert "orders.filled.EURUSD" in subjects
        assert "orders.pending.EURUSD" in subjects


@pytest.mark.parametrize(
    "case, change, retcode",
    [
        ("invalid_volume", {"position_size": 0.015}, 10014),
        ("invalid_stops", {"stop_loss_pips": 0.1}, 10016),
        ("no_money", {"position_size": 900}, 10019),
        ("invalid_price", {"limit_wrong_side": True}, 10015),
    ],
)
async def test_broker_rejects_end_rejected_with_the_retcode(pipe: Pipeline, case, change, retcode):
    rng = random.Random(4)
    s = signal_dict(f"reject-{case}", rng, symbol="USDJPY", side="buy", order_type="market")
    if "position_size" in change:
        s["position_size"] = change["position_size"]
    if "stop_loss_pips" in change:
        s["stop_loss"] = round(s["entry_price"] - 0.001, 3)
    if change.get("limit_wrong_side"):
        s["order_type"] = "limit"
        s["limit_price"] = round(s["entry_price"] + 0.5, 3)  # a buy limit above the market
        s["take_profit"] = round(s["limit_price"] + 0.4, 3)
    await pipe.publish_signals([s])
    i = oid(s["signal_id"])
    o = (await pipe.wait_orders([i]))[i]
    assert o.state is OrderState.REJECTED
    assert o.retcode == retcode, o.reason
    events = (await pipe.events())[i]
    assert types_of(events) == ["created", "rejected"]
    assert str(retcode) in events[-1].reason
    assert any(s == "orders.rejected.USDJPY" for s, _ in await pipe.nats_messages())


async def test_market_closed_and_requotes(pipe: Pipeline):
    rng = random.Random(5)
    await pipe.sim(cmd="close_market", symbol="AUDUSD")
    closed = signal_dict("closed-1", rng, symbol="AUDUSD", order_type="market")
    await pipe.publish_signals([closed])
    o = (await pipe.wait_orders([oid("closed-1")]))[oid("closed-1")]
    await pipe.sim(cmd="open_market", symbol="AUDUSD")
    assert (o.state, o.retcode) == (OrderState.REJECTED, 10018)

    # Requoted more often than max_requotes allows: rejected; once: re-priced and filled.
    await pipe.sim(cmd="reject_next", retcode=10004, count=3)
    await pipe.publish_signals([signal_dict("requote-many", rng, symbol="AUDUSD", order_type="market")])
    o = (await pipe.wait_orders([oid("requote-many")]))[oid("requote-many")]
    assert o.state is OrderState.REJECTED and "requote" in o.reason.lower()
    await pipe.sim(cmd="reject_next", retcode=10004, count=1)
    await pipe.publish_signals([signal_dict("requote-once", rng, symbol="AUDUSD", order_type="market")])
    o = (await pipe.wait_orders([oid("requote-once")]))[oid("requote-once")]
    assert o.state is OrderState.FILLED


async def test_disabled_order_type_is_rejected_after_a_hot_config_change(pipe: Pipeline):
    rng = random.Random(6)
    cfg = {**TEST_CONFIG, "operational": {**TEST_CONFIG["operational"], "order_defaults": {"enable_stop_orders": False}}}
    await pipe.set_config(cfg)
    try:
        s = signal_dict("disabled-stop", rng, symbol="EURUSD", order_type="stop", side="sell")
        await pipe.publish_signals([s])
        o = (await pipe.wait_orders([oid("disabled-stop")]))[oid("disabled-stop")]
        assert o.state is OrderState.REJECTED and "stop" in o.reason
        assert (await pipe.sim_stats())["by_comment"].get(oid("disabled-stop")) is None
    finally:
        await pipe.set_config(TEST_CONFIG)


async def test_a_lost_submission_is_asked_about_until_the_connector_answers_then_resent(pipe: Pipeline):
    """NATS restarting or the connector away: the submission and the first status queries get
    no answer.  The order is asked about until the broker answers that it never saw it, then
    resent once; it does not fail as stuck for an outage (what the edge chaos test hit)."""
    rng = random.Random(11)
    await pipe.sim(cmd="drop_unprocessed", count=1)
    await pipe.sim(cmd="drop_status", count=2)
    await pipe.publish_signals([signal_dict("lost-then-asked", rng, symbol="USDCHF", order_type="market")])
    lost = oid("lost-then-asked")
    o = (await pipe.wait_orders([lost], timeout=60))[lost]
    stats = await pipe.sim_stats()
    await pipe.sim(cmd="reset_faults")
    assert o.state is OrderState.FILLED, (o.state, o.reason)
    assert stats["by_comment"][lost] == 2 and stats["executed"][lost] == 1  # the lost one and one resend
    assert stats["dropped_unprocessed"] >= 1 and stats["other"]["dropped_status"] == 2
    seq = types_of((await pipe.events())[lost])
    # "submitted" comes from the resend's reply, which may reach the agent after the fill
    assert seq[0] == "created" and seq[-1] == "filled" and "failed" not in seq, seq


async def test_stuck_orders_end_in_the_brokers_state_or_failed_timeout(pipe: Pipeline):
    rng = random.Random(7)
    # The broker executes the order but its replies are lost: the broker's state wins.
    await pipe.sim(cmd="drop_replies", count=10)
    await pipe.publish_signals([signal_dict("stuck-known", rng, symbol="USDCHF", order_type="market")])
    known = oid("stuck-known")
    o = (await pipe.wait_orders([known]))[known]
    await pipe.sim(cmd="reset_faults")
    assert o.state is OrderState.FILLED
    assert (await pipe.sim_stats())["executed"][known] == 1

    # The broker never sees the order (nor its resend): FAILED with reason timeout.
    await pipe.sim(cmd="drop_unprocessed", count=2)
    await pipe.publish_signals([signal_dict("stuck-unknown", rng, symbol="USDCHF", order_type="market")])
    unknown = oid("stuck-unknown")
    o = (await pipe.wait_orders([unknown], timeout=60))[unknown]
    assert (o.state, o.reason) == (OrderState.FAILED, "timeout")
    seq = types_of((await pipe.events())[unknown])
    assert seq == ["created", "submitted", "failed"]
    assert EventType.FAILED.value in seq


async def test_sigusr1_logs_the_consumer_state_of_every_input_partition(pipe: Pipeline):
    """Ops' ``kill -USR1 <worker pid>``: the consumer's view of each input partition (the
    stall watchdog's report: Faust's sets, aiokafka's fetch position) and the agents' queues."""
    import ast
    import signal

    from app.main import INPUTS

    worker = pipe.services.running["worker-1"]
    before = len(worker.log_text())
    worker.proc.send_signal(signal.SIGUSR1)
    await asyncio.to_thread(worker.wait_for_log, "consumer state: ", 5.0, before)
    line = next(x for x in worker.log_text()[before:].splitlines() if "consumer state: " in x)
    state = ast.literal_eval(line.split("consumer state: ", 1)[1].strip())
    partitions = {k: v for k, v in state.items() if k != "queues"}
    assert set(partitions) == {f"{t}[{p}]" for t in INPUTS for p in range(PARTITIONS)}
    for name, view in partitions.items():
        assert view["faust"] in (["active"], ["buffered"]), (name, view)
        assert isinstance(view["position"], int) and view["aiokafka_paused"] is False, (name, view)
    # (records waiting in the agent's queue, partitions waiting for its pressure to drop)
    assert set(state["queues"]) == {"orders", "positions"}
    for agent, actors in state["queues"].items():
        assert len(actors) == 1 and all(isinstance(n, int) and n >= 0 for n in actors[0]), (agent, actors)


async def signals_committed(pipe: Pipeline, timeout: float = 30) -> None:
    """Wait until the worker's group has committed every record of ``signals.approved``."""
    from app.topics import SIGNALS_APPROVED

    async def done() -> bool:
        committed, ends = await committed_vs_end(pipe.settings, pipe.settings.app_id, [SIGNALS_APPROVED])
        return bool(ends) and all(committed[tp] >= end for tp, end in ends.items())

    await wait_until(done, timeout, what="the worker's commit of every signal")


async def test_an_order_left_pending_by_a_killed_worker_is_resumed_after_its_restart(pipe: Pipeline):
    """``open_orders`` lives in memory: a restarted worker rebuilds it from the ``orders``
    table, and its timer resumes the PENDING order whose signal is committed (not replayed).
    Last in the module: it restarts the simulator (the connector away meanwhile)."""
    rng = random.Random(23)
    # The submitter asks the absent connector for the stuck-order timeout before it gives the
    # order up as SUBMITTED with no reply: long enough here for the order to be PENDING when
    # the worker is killed, whatever the machine's speed.
    submission = {**TEST_CONFIG["operational"]["submission"], "stuck_order_timeout_seconds": 60}
    await pipe.set_config({"operational": {**TEST_CONFIG["operational"], "submission": submission}})
    sim = pipe.services.running["sim"]
    await asyncio.to_thread(sim.stop)
    try:
        await pipe.publish_signals([signal_dict("pending-over-restart", rng, symbol="USDCHF", order_type="market")])
        pending = oid("pending-over-restart")
        await pipe.wait_orders([pending], done=lambda o: o.state is OrderState.PENDING, timeout=30)
        await signals_committed(pipe)
        await asyncio.to_thread(pipe.services.restart, "worker-1", True)
    finally:
        # Its markets start held at the reference prices: a fresh walk could drift past the
        # slippage cap before the worker resumes the order (a correct REJECTED); this test is
        # about the resumption.
        await asyncio.to_thread(pipe.services.restart, "sim", EXECUTION_SIM_HOLD_PRICES="1")
        await pipe.set_config(TEST_CONFIG)
    await pipe.wait_for_simulator()
    o = (await pipe.wait_orders([pending], timeout=60))[pending]
    assert o.state is OrderState.FILLED, (o.state, o.reason)
    assert (await pipe.sim_stats())["executed"][pending] == 1
