"""Faust's producer buffer with one lane per topic partition.

Table writes reach Kafka through Faust's ``ProducerBuffer``: a queue drained by one task
that hands the records to aiokafka one at a time.  aiokafka holds one open batch per
partition; when that batch is full, the next record for the partition waits until the
batch has left in a produce request.  With the Tansu local profile a batch holds one
record (``producer_max_batch_size=1``), so every changelog record whose partition already
has one waiting blocks the whole queue for a produce round trip, records for all other
partitions included: table writes ran at about one record per round trip.

Here the single drain task becomes a dispatcher: each record goes to the lane of its topic
partition, each lane hands its records over in order (the order within a partition is
kept), and the lanes run side by side, so one produce request carries a record for every
partition that has one.  :attr:`ProducerBuffer.size` counts the records still in lanes,
so ``flush()`` (which Faust awaits before committing offsets) still waits for all of them.

Installed by :func:`install` (called when the Faust app is created).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from faust.transport.producer import ProducerBuffer
from mode import Service

log = logging.getLogger(__name__)

_original_size = ProducerBuffer.size


async def _handle_pending(self: ProducerBuffer) -> None:
    lanes: dict[tuple[int, Any], deque] = {}
    self._lane_backlog = 0  # type: ignore[attr-defined]

    async def drain(key: tuple[int, Any], lane: deque) -> None:
        try:
            while lane:
                await self._send_pending(lane[0])
                lane.popleft()
                self._lane_backlog -= 1  # type: ignore[attr-defined]
                self.message_sent.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # as in Faust: a record that cannot be produced crashes the producer
            log.exception("producer lane %s failed", key)
            await self.crash(exc)
        finally:
            if lanes.get(key) is lane:
                del lanes[key]

    while not self.should_stop:
        fut = await self.pending.get()
        self._lane_backlog += 1  # type: ignore[attr-defined]
        msg = fut.message
        key = (id(msg.channel), msg.partition)
        lane = lanes.get(key)
        if lane is None:
            lanes[key] = lane = deque((fut,))
            asyncio.ensure_future(drain(key, lane))
        else:
            lane.append(fut)


def _size(self: ProducerBuffer) -> int:
    return _original_size.fget(self) + getattr(self, "_lane_backlog", 0)


def install() -> None:
    """Replace the buffer's drain task and size (idempotent)."""
    if getattr(ProducerBuffer, "_execution_lanes", False):
        return
    # mode collects ``@Service.task`` methods at class creation by name and looks them up
    # with ``getattr`` when the service starts, so a new ServiceTask under the same name
    # replaces what runs.
    ProducerBuffer._handle_pending = Service.task(_handle_pending)  # type: ignore[method-assign]
    ProducerBuffer.size = property(_size)  # type: ignore[method-assign, assignment]
    ProducerBuffer._execution_lanes = True  # type: ignore[attr-defined]
