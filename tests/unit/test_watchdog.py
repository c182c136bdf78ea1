"""The stall watchdog's decision (``app.watchdog.StallTracker``): which partitions count as
stalled, on a clock the test drives.  The first look at a partition is its baseline: the
clock starts at the second look that finds nothing moved."""

from __future__ import annotations

from app.watchdog import StallTracker

A, B = ("signals.approved", 0), ("executions", 1)


def run(tracker: StallTracker, timeline: list[tuple[float, dict]]) -> tuple[dict, list]:
    stuck: dict = {}
    never: list = []
    for now, offsets in timeline:
        stuck, never = tracker.observe(now, offsets)
    return stuck, never


def test_records_waiting_and_nothing_read_or_committed_for_the_stall_time_is_a_stall():
    tracker = StallTracker(20.0)
    stuck, _ = run(tracker, [(t, {A: (99, 100, 500), B: (10, 11, 11)}) for t in range(22)])
    assert stuck == {A: (99, 500)}  # B has read everything there is: idle, not stalled
    assert tracker.stalled_since == 1


def test_a_stall_shorter_than_the_stall_time_is_not_reported():
    tracker = StallTracker(20.0)
    stuck, _ = run(tracker, [(t, {A: (99, 100, 500)}) for t in range(21)])
    assert stuck == {}
    assert tracker.stalled_since == 1


def test_a_backpressured_partition_whose_agent_commits_is_not_stalled():
    """Faust stops fetching a partition whose agent's queue is full: its read offset stands
    still for as long as the agent needs to work the queue down, while commits go on."""
    tracker = StallTracker(20.0)
    stuck, _ = run(tracker, [(t, {A: (2000, 100 + 10 * t, 8000)}) for t in range(60)])
    assert stuck == {}
    assert tracker.stalled_since is None


def test_reading_again_after_a_pause_starts_the_clock_again():
    tracker = StallTracker(20.0)
    timeline = [(t, {A: (99, 100, 500)}) for t in range(15)]
    timeline += [(15, {A: (150, 100, 500)})]
    timeline += [(t, {A: (150, 100, 500)}) for t in range(16, 34)]
    stuck, _ = run(tracker, timeline)
    assert stuck == {}
    assert tracker.stalled_since == 16
    assert tracker.observe(36, {A: (150, 100, 500)})[0] == {A: (150, 500)}


def test_partitions_never_read_are_named_after_a_quarter_of_the_stall_time():
    tracker = StallTracker(20.0)
    _, never = run(tracker, [(t, {A: (None, None, 30), B: (5, 6, 30)}) for t in range(6)])
    assert never == []
    _, never = tracker.observe(6, {A: (None, None, 30), B: (5, 6, 30)})
    assert never == [A]  # B was read: it is stalled, but not "never fetched"


def test_a_partition_no_longer_watched_leaves_the_count():
    """A partition paused or given to another worker is not observed any more: it must not
    keep the watchdog in its stalled state."""
    tracker = StallTracker(20.0)
    run(tracker, [(t, {A: (99, 100, 500), B: (10, 11, 50)}) for t in range(10)])
    stuck, _ = tracker.observe(30, {B: (40, 41, 50)})
    assert stuck == {}
    assert tracker.stalled_since is None


async def test_the_watchdog_exits_with_the_restart_code_on_a_stall_and_reports_the_consumer_state(monkeypatch, caplog):
    """``Watchdog.check`` wired to Faust's consumer (its offsets), the broker's end offsets and
    the exit; the stall report names the partition and carries the consumer's view."""
    import asyncio
    from types import SimpleNamespace

    from faust.types import TP

    from app import watchdog

    tp, other = TP("signals.approved", 0), TP("fills", 2)
    clock = [100.0]
    exits: list[int] = []
    monkeypatch.setattr(watchdog.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(watchdog.os, "_exit", exits.append)
    monkeypatch.setattr(watchdog.logging, "shutdown", lambda: None)

    async def ends(probe, tps, settings):
        return {t: 500 for t in tps}

    monkeypatch.setattr(watchdog, "end_offsets", ends)
    completed = asyncio.Event()
    completed.set()
    consumer = SimpleNamespace(_paused_partitions={other}, _active_partitions={tp}, _read_offset={tp: 99, other: 1},
                               _committed_offset={tp: 100, other: 2})
    app = SimpleNamespace(rebalancing=False, tables=SimpleNamespace(recovery=SimpleNamespace(completed=completed)),
                          consumer=consumer, assignor=SimpleNamespace(assigned_actives=lambda: {tp, other}), agents={})
    dog = watchdog.Watchdog(app, settings=None, topics=["signals.approved", "fills"], stall_seconds=20.0)
    dog._probe = object()  # the end offsets above need no broker
    for step in range(11):
        clock[0] = 100.0 + 2 * step
        assert await dog.check() is (step > 0)
    assert exits == []
    consumer._committed_offset[tp] = 150  # the agent committed: progress
    clock[0] = 124.0
    assert await dog.check() is False
    for step in range(1, 12):
        clock[0] = 124.0 + 2 * step
        await dog.check()
    assert exits == [watchdog.EXIT_STALLED]
    assert "signals.approved[0]': (99, 500)" in caplog.text and "fills" not in caplog.text.split("consumer state")[0]
    assert "consumer state: {'signals.approved[0]': {'faust': ['active']" in caplog.text


def test_faust_patches_refuse_other_versions_than_the_pinned_ones():
    import tomllib
    from pathlib import Path

    import pytest

    from app.faust_patches import PINNED, check_versions

    check_versions()  # the installed ones are the pinned ones
    deps = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {f"{name}=={v}" for name, v in PINNED.items()} <= set(deps), "pinned in pyproject.toml, exactly"
    with pytest.raises(RuntimeError, match="aiokafka"):
        check_versions(lambda name: "0.13.0" if name == "aiokafka" else PINNED[name])
