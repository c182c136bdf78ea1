"""Idempotency: one order per signal, ever, and deterministic order ids.

**Order ids.**  ``order_id_for(signal_id, partitions)`` is ``"O"`` plus a 30-hex-digit
blake2b digest of the signal id (31 characters: the length of an MT5 comment, which
carries it).  It is chosen to land on the **same Kafka partition** as the signal id under
Kafka's default partitioner (murmur2 of the key bytes, the function aiokafka's and Faust's
producers use): if the plain digest does not, the digests of ``(signal_id, "1")``,
``(signal_id, "2")``, ... are tried in turn until one does.  So the ``orders`` table
(key order_id), the ``signal_orders`` table (key signal_id), the ``fills`` topic (key
order_id) and ``signals.approved`` (key signal_id) are co-partitioned: a signal, its order
and its fills are handled by one worker, without a repartition.  The id depends only on
the signal id and the partition count (which must not change while orders are live).

**Dedupe window.**  ``signal_orders`` maps a signal id to a :class:`SignalSeen` (the order
id and when the signal was first seen).  An entry within ``check_window_hours`` of its
``first_seen`` makes the signal a duplicate; older entries are expired (removed).  The
``orders`` table, looked up by the deterministic order id, also recognises a signal
seen before, whatever the window.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from aiokafka.partitioner import DefaultPartitioner
from pydantic import field_validator

from app.models import Model, from_json, to_json

#: Prefix of every order id.
ORDER_ID_PREFIX = "O"
#: Bytes of the blake2b digest: 30 hex characters, 31 with the prefix (an MT5 comment).
ORDER_ID_DIGEST_SIZE = 15
ORDER_ID_LENGTH = len(ORDER_ID_PREFIX) + 2 * ORDER_ID_DIGEST_SIZE
#: A hard bound on candidates; the expected number is ``partitions``.
_MAX_CANDIDATES_PER_PARTITION = 1_000


def _key_bytes(key: str | bytes) -> bytes:
    return key if isinstance(key, bytes) else key.encode("utf-8")


_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``), the value of
    ``aiokafka.partitioner.murmur2``: the same arithmetic on whole little-endian words, where
    aiokafka assembles each word byte by byte (it runs for each candidate order id of each new
    signal)."""
    length = len(data)
    h = 0x9747B28C ^ length
    body = length & ~3
    for k in struct.unpack_from(f"<{length >> 2}I", data):
        k = (k * _M) & _MASK
        k = ((k ^ (k >> 24)) * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    extra = length & 3
    if extra:
        if extra == 3:
            h ^= data[body + 2] << 16
        if extra >= 2:
            h ^= data[body + 1] << 8
        h = ((h ^ data[body]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


@lru_cache(maxsize=131_072)
def key_hash(key: bytes) -> int:
    """Kafka's default partitioner hash of a key, ``murmur2(key) & 0x7fffffff``, remembered:
    an order id is hashed for every record keyed by it (status, archive, commands, three
    changelogs)."""
    return murmur2(key) & 0x7FFFFFFF


class KeyPartitioner:
    """aiokafka's ``DefaultPartitioner`` (same partitions for the same keys, random for no key)
    with the key hash remembered: the producers' ``partitioner``."""

    _default = DefaultPartitioner()

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return self._default(key, all_partitions, available)
        return all_partitions[key_hash(key) % len(all_partitions)]


def partition_for(key: str | bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``key`` among ``partitions``:
    ``(murmur2(key) & 0x7fffffff) % partitions``, as ``aiokafka.partitioner.DefaultPartitioner``
    computes it for a producer (string keys are UTF-8 encoded, as with a raw key serializer)."""
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ValueError(f"partitions must be a positive integer, got {partitions!r}")
    return key_hash(_key_bytes(key)) % partitions


def _candidate(signal_id: str, n: int) -> str:
    # The separator (a unit separator, never in a signal id) keeps candidates of
    # different signal ids apart: ("a", 1) and ("a#1", 0) do not hash the same input.
    data = signal_id if n == 0 else f"{signal_id}\x1f{n}"
    return ORDER_ID_PREFIX + hashlib.blake2b(data.encode("utf-8"), digest_size=ORDER_ID_DIGEST_SIZE).hexdigest()


def close_order_id(command_id: str, position_key: str, partitions: int) -> str:
    """The order id of a close command: deterministic from the command id, on the partition
    of the position's key (where the command is handled and the order is stored, so the close
    order's fills, keyed by this id, come to the same worker)."""
    return order_id_for(f"close\x1f{command_id}", partitions, position_key)


@lru_cache(maxsize=65_536)
def order_id_for(signal_id: str, partitions: int, partition_key: str | None = None) -> str:
    """The order id of a signal: 31 characters, on the signal id's partition (or on
    ``partition_key``'s), deterministic."""
    if not signal_id:
        raise ValueError("signal_id must not be empty")
    target = partition_for(partition_key if partition_key is not None else signal_id, partitions)
    for n in range(_MAX_CANDIDATES_PER_PARTITION * partitions):
        candidate = _candidate(signal_id, n)
        if partition_for(candidate, partitions) == target:
            return candidate
    raise RuntimeError(f"no order id on partition {target} of {partitions} for signal {signal_id!r}")  # pragma: no cover


# --------------------------------------------------------------------------------------
# The dedupe window
# --------------------------------------------------------------------------------------


class SignalSeen(Model):
    """The value of ``signal_orders``: the order made for a signal and when it was first seen."""

    order_id: str
    first_seen: datetime

    @field_validator("first_seen")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        return v if v.tzinfo is not None else v.replace(tzinfo=UTC)

    def to_bytes(self) -> bytes:
        return to_json(self)

    @classmethod
    def from_bytes(cls, raw: bytes | str) -> SignalSeen:
        """Parse; raises :class:`app.models.DecodeError` for a bad payload."""
        return from_json(cls, raw)


def _window(window_hours: float) -> timedelta:
    if not math.isfinite(window_hours) or window_hours <= 0:
        raise ValueError(f"window_hours must be a positive number, got {window_hours}")
    return timedelta(hours=window_hours)


def is_within_window(seen: SignalSeen, now: datetime, window_hours: float) -> bool:
    """True while ``now`` is less than ``window_hours`` after ``seen.first_seen`` (a
    ``first_seen`` in the future, from a clock step, counts as within)."""
    return now - seen.first_seen < _window(window_hours)


def expired_keys(items: Iterable[tuple[str, SignalSeen]], now: datetime, window_hours: float) -> list[str]:
    """The keys whose entries are past the window, in the order given."""
    window = _window(window_hours)
    return [key for key, seen in items if now - seen.first_seen >= window]
