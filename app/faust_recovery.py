"""Faust 0.15's recovery, with the stream partitions resumed only once they are positioned.

After a rebalance Faust recovers the tables, then (``Recovery.on_recovery_completed``, or
``Recovery._resume_streams`` when nothing needed recovering) resumes the stream (non-changelog)
partitions, **then** seeks them to their committed offsets and resumes the flow.  A worker
whose tables needed recovery (a restart with its volume, e.g. after SIGKILL) is already
fetching changelogs at that point, so between the resume and the seek it fetches stream
records from wherever its position was; they reach the agents' queues or are raced against
the still-suspended flow, the queues are cleared when the flow resumes, and the first record
read after the seek can lie beyond the committed offset.  Faust takes the skipped offsets
for a gap, counts them as acknowledged and commits past them: those records are never
processed.  Seen in the worker chaos test (``tests/test_chaos.py``) as signals with no order
and no event, their offsets committed; instrumented, the restarted worker handled the record
at the committed offset, logged a gap over the next ones and went on after them.

Here the partitions are sought while still paused, the flow is resumed, and only then are
they resumed, so the first records fetched are those at the committed offsets.  Everything
else is Faust's code unchanged.  Applied by :mod:`app.faust_app` (checked for Faust 0.15).
"""

from __future__ import annotations

import asyncio
from typing import Any

from faust.tables.recovery import Recovery

__all__ = ["apply"]


async def _start_streams(self: Recovery, assignment: set, standbys_ready: bool) -> None:
    """Seek the paused stream partitions, resume the flow, then resume them and fetch."""
    app: Any = self.app
    consumer = app.consumer
    streams = {tp for tp in assignment if not self._is_changelog_tp(tp)}
    if assignment:
        self.log.info("Seek stream partitions to committed offsets (still paused).")
        await self._wait(consumer.perform_seek(), timeout=app.conf.broker_request_timeout)
    self.completed.set()
    self.log.info("Resuming flow...")
    app.flow_control.resume()
    consumer.resume_flow()
    if streams:
        consumer.resume_partitions(streams)
    await app._fetcher.maybe_start()
    self.tables.on_actives_ready()
    if standbys_ready:
        self.tables.on_standbys_ready()
    app.on_rebalance_end()
    self.log.info("Worker ready")


async def _resume_streams(self: Recovery, generation_id: int = 0) -> None:
    app: Any = self.app
    await app.on_rebalance_complete.send()
    assignment = app.consumer.assignment()
    if app.consumer_generation_id != generation_id:
        self.log.warning("Recovery rebalancing again")
        return
    if not assignment:
        self.log.info("Resuming streams with empty assignment")
    await _start_streams(self, assignment, standbys_ready=True)


async def _on_recovery_completed(self: Recovery, generation_id: int = 0) -> None:
    app: Any = self.app
    self.log.info("Restore complete!")
    await app.on_rebalance_complete.send()
    self._set_recovery_ended()
    callbacks = [
        asyncio.ensure_future(table.on_recovery_completed(self.actives_for_table[table], self.standbys_for_table[table]))
        for table in self.tables.values()
    ]
    if callbacks:
        await asyncio.wait(callbacks)
    assignment = app.consumer.assignment()
    if app.consumer_generation_id != generation_id:
        self.log.warning(f"Recovery rebalancing again app id {app.consumer_generation_id} param {generation_id}")
        return
    await _start_streams(self, assignment, standbys_ready=not app.assignor.assigned_standbys())


def apply() -> None:
    import faust

    if not faust.__version__.startswith("0.15."):
        raise RuntimeError(f"app.faust_recovery is written against Faust 0.15, not {faust.__version__}: review it")
    Recovery._resume_streams = _resume_streams  # type: ignore[method-assign]
    Recovery.on_recovery_completed = _on_recovery_completed  # type: ignore[method-assign]
