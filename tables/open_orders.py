"""``open_orders``: the orders not final yet on this worker's partitions, in memory.

The timers watch these orders (a PENDING one nobody submits, a stuck one, an expiry).  The
index is derived from the ``orders`` table, so it needs no changelog of its own: the orders
agent adds an order once the batch that opened it is committed and removes it once the batch
that made it final is; after each change of assignment it is rebuilt from the ``orders``
table of the partitions now held (:meth:`OpenOrders.rebuild`), the stored orders read as raw
bytes, and only the open ones decoded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import orjson

from app.models import OrderState

#: ``(opened, expires)``: when the order was created, and when its time in force ends (if it does).
Entry = tuple[datetime, datetime | None]

_STATE = b'"state":"'
_FINAL = frozenset(s.value.encode() for s in OrderState if s.is_final)


def open_entry(raw: bytes) -> Entry | None:
    """The index entry of a stored order (its JSON), or None when the order is final.

    The state is found in the bytes: a JSON string cannot hold an unescaped ``"state":"``,
    so its first occurrence is the order's own field, and a final order is not decoded."""
    at = raw.find(_STATE)
    if at >= 0:
        start = at + len(_STATE)
        if raw[start:raw.find(b'"', start)] in _FINAL:
            return None
    d = orjson.loads(raw)
    expires = d.get("expires_at")
    return datetime.fromisoformat(d["created_at"]), datetime.fromisoformat(expires) if expires else None


class OpenOrders:
    """order_id -> :data:`Entry`, and the assignment it was built for."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.assignment: frozenset | None = None  # None: to be rebuilt

    def add(self, order_id: str, opened: datetime, expires: datetime | None) -> None:
        self.entries[order_id] = (opened, expires)

    def remove(self, order_id: str) -> None:
        self.entries.pop(order_id, None)

    def items(self) -> list[tuple[str, Entry]]:
        return list(self.entries.items())

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, order_id: object) -> bool:
        return order_id in self.entries

    async def rebuild(self, assignment: frozenset, stored: AsyncIterator[tuple[Any, bytes]]) -> int:
        """Rebuild from the stored orders of ``assignment``; returns the number of open orders.

        The agent keeps adding and removing orders while this awaits.  An order it opens
        meanwhile is kept.  One it closes meanwhile may still be read open (the store's
        iterator reads a snapshot) and come back: the timer drops it the first time it reads
        the order final."""
        self.entries.clear()
        self.assignment = None
        async for key, raw in stored:
            self._load(key, raw)
        self.assignment = assignment
        return len(self.entries)

    def _load(self, key: Any, raw: bytes) -> None:
        entry = open_entry(raw)
        if entry is not None:
            self.entries.setdefault(key.decode() if isinstance(key, bytes) else key, entry)
