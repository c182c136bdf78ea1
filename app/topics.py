"""Every Kafka topic of the service, by name, and their creation.

Topics are created explicitly with the configured partition count: a broker's auto-create
would pick its own default, and Faust refuses a table whose changelog partition count
differs from its source topic's (co-partitioning is what makes a join a table lookup).

An existing co-partitioned topic (or table changelog) whose partition count differs from
``EXECUTION_TOPIC_PARTITIONS`` refuses the start (:class:`PartitionCountMismatch`): order ids
and the keys' partitions depend on the count, so running on would route records to the wrong
partitions.  Partitions are never added or removed here; that is a migration.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from app.settings import Settings

log = logging.getLogger(__name__)

# Input (from the bridge)
SIGNALS_APPROVED = "signals.approved"  # key: signal_id
SIGNALS_DLQ = "signals.dlq"  # bad signals: original bytes, headers reason/subject
FILLS = "fills"  # key: order_id (the MT5 client order id), co-partitioned with signals
FILLS_DLQ = "fills.dlq"
# Internal: broker replies, status checks and expiries fed back to the orders agent
ORDERS_COMMANDS = "orders.commands"  # key: order_id (or signal_id): same partition as the signal
# Audit trail and derived topics (for analysts and the ClickHouse sink)
ORDER_EXECUTION_ARCHIVE = "order_execution_archive"  # every lifecycle event, key: order_id
ORDERS_STATUS = "orders.status"  # each state change: the Order snapshot, key: order_id
EXECUTIONS = "executions"  # each applied fill, key: "{account}:{symbol}" (feeds positions)
POSITIONS = "positions"  # each position update, key: "{account}:{symbol}"
POSITIONS_DISCREPANCIES = "positions.discrepancies"
#: Slippage alerts (also in the archive), key: order_id.  Named after the NATS subject it feeds:
#: the notifier reads these instead of the whole archive.
SLIPPAGE_ALERTS = "alerts.execution.slippage"
EXECUTIONS_DLQ = "executions.dlq"  # executions/discrepancies the positions agent cannot apply
SINK_DLQ = "sink.dlq"

#: Largest value of a dead letter: well below a producer's 1 MiB request limit, headers included.
MAX_DEAD_LETTER_BYTES = 512 * 1024
#: Longest ``reason`` header.
MAX_REASON_BYTES = 4000


def dead_letter_value(value: bytes) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A dead letter's value and extra headers: the original bytes, cut to
    :data:`MAX_DEAD_LETTER_BYTES` with ``truncated``/``original_size``/``sha256`` (of the
    whole original) when larger, so a dead letter always fits in a Kafka record."""
    if len(value) <= MAX_DEAD_LETTER_BYTES:
        return value, []
    return value[:MAX_DEAD_LETTER_BYTES], [
        ("truncated", b"1"),
        ("original_size", str(len(value)).encode()),
        ("sha256", hashlib.sha256(value).hexdigest().encode()),
    ]


def dead_letter_of(value: bytes, reason: str, topic: str, partition: int, offset: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The value and headers of the dead letter of a record read from Kafka: the original
    bytes (:func:`dead_letter_value`), why it is dead, and where it was read."""
    value, extra = dead_letter_value(value)
    return value, [
        ("reason", reason.encode(errors="backslashreplace")[:MAX_REASON_BYTES]),
        ("topic", topic.encode()),
        ("partition", str(partition).encode()),
        ("offset", str(offset).encode()),
        *extra,
    ]


class PartitionCountMismatch(SystemExit):
    """An existing topic has another partition count than the settings.

    A :class:`SystemExit` (status 1, its message on stderr, no traceback) so that every
    process meeting it at start (worker, bridge, sink) refuses to run; catch it by name to
    handle it."""

    def __init__(self, mismatches: list[tuple[str, int]], wanted: int) -> None:
        self.mismatches, self.wanted = mismatches, wanted
        listed = ", ".join(f"{name} has {n} partitions" for name, n in mismatches)
        super().__init__(
            f"refusing to start: topic {listed}, but the settings say EXECUTION_TOPIC_PARTITIONS={wanted} "
            "(order ids and co-partitioning depend on it): set EXECUTION_TOPIC_PARTITIONS to the "
            "topics' count, or migrate the topics")

    def __str__(self) -> str:
        return str(self.code)


#: The Faust tables (``tables/definitions.py``): their changelogs are created here too.
TABLES = ("signal_orders", "orders", "positions")


def changelog(table: str, settings: Settings) -> str:
    return f"{settings.app_id}-{table}-changelog"


def is_changelog(name: str, settings: Settings) -> bool:
    """A Faust table's changelog topic (``<app_id>-<table>-changelog``): co-partitioned with
    the table's source topics."""
    return name.startswith(f"{settings.app_id}-") and name.endswith("-changelog")


@dataclass(frozen=True)
class TopicSpec:
    name: str
    compacted: bool = False
    #: Topics read by the same co-partitioned agents must share the partition count.
    copartitioned: bool = True
    #: A fixed partition count (Faust's leader topic: 1); None: ``topic_partitions``.
    partitions: int | None = None


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(SIGNALS_APPROVED),
    TopicSpec(SIGNALS_DLQ),
    TopicSpec(FILLS),
    TopicSpec(FILLS_DLQ),
    TopicSpec(ORDERS_COMMANDS),
    TopicSpec(ORDER_EXECUTION_ARCHIVE),
    TopicSpec(ORDERS_STATUS),
    TopicSpec(EXECUTIONS),
    TopicSpec(POSITIONS),
    TopicSpec(POSITIONS_DISCREPANCIES),
    TopicSpec(SLIPPAGE_ALERTS),
    TopicSpec(EXECUTIONS_DLQ),
    TopicSpec(SINK_DLQ),
)


class TopicsNotServed(Exception):
    """Topics created but not in the broker's metadata yet."""


async def ensure_topics(settings: Settings, names: list[str] | None = None, attempts: int = 30) -> None:
    """Create the service's topics if absent (idempotent; retried while the broker starts).

    Raises :class:`PartitionCountMismatch` if one of them that already exists and is
    co-partitioned (all of :data:`TOPICS`; with ``names`` None, the tables' changelogs too)
    has another partition count than ``settings.topic_partitions``."""
    specs = [t for t in TOPICS if names is None or t.name in names]
    if names is None:
        # The tables' changelogs too, before any worker starts: Faust would create them itself,
        # but Apache Kafka can leave a topic created that way out of the group's metadata for
        # a moment, and the worker then joins without its partitions (PartitionsMismatch).
        specs += [TopicSpec(changelog(t, settings), compacted=True) for t in TABLES]
        # Faust's assignor leader topic, which a worker otherwise creates while joining (its
        # client logs an ERROR per metadata refresh until the broker serves it).
        specs.append(TopicSpec(f"{settings.app_id}-__assignor-__leader", copartitioned=False, partitions=1))
    wanted = [
        NewTopic(
            name=t.name,
            num_partitions=t.partitions or settings.topic_partitions,
            replication_factor=settings.topic_replication_factor,
            topic_configs={"cleanup.policy": "compact"} if t.compacted else {},
        )
        for t in specs
    ]
    copartitioned = {t.name for t in specs if t.copartitioned}
    for attempt in range(attempts):
        admin = AIOKafkaAdminClient(**settings.aiokafka_common())
        try:
            await admin.start()
            existing = await partition_counts(admin)
            check_partitions(settings, {
                name: n for name, n in existing.items()
                if n is not None and (name in copartitioned or (names is None and is_changelog(name, settings)))
            })
            missing = [t for t in wanted if t.name not in existing]
            if missing:
                try:
                    await admin.create_topics(missing)
                except TopicAlreadyExistsError:
                    pass  # a concurrent creator won
                log.info("created topics %s", [t.name for t in missing])
            # Apache Kafka answers CreateTopics before its metadata lists the new topics with
            # a leader for every partition: return only once they are all served, so callers
            # never see them absent or leaderless.
            unserved = await unserved_topics(admin, [t.name for t in wanted])
            if unserved:
                raise TopicsNotServed(unserved)
            if names is None:
                # The group coordinator too: on a new cluster Kafka creates __consumer_offsets
                # at the first FindCoordinator, and a worker joining meanwhile logs ERRORs.
                await admin.find_coordinator(f"{settings.app_id}")
            return
        except Exception as exc:  # (PartitionCountMismatch is a SystemExit) broker not up yet, or new topics not in its metadata yet
            if attempt == attempts - 1:
                raise
            log.debug("ensure_topics: %s; retrying", exc)
            await asyncio.sleep(0.5)
        finally:
            await admin.close()


async def partition_counts(admin: AIOKafkaAdminClient) -> dict[str, int | None]:
    """Every existing topic and its partition count, None while the broker reports an error
    for it (a topic being created: not known yet).  One metadata request."""
    return {
        t["topic"]: len(t["partitions"]) if t["error_code"] == 0 else None
        for t in await admin.describe_topics()
    }


async def unserved_topics(admin: AIOKafkaAdminClient, names: list[str]) -> list[str]:
    """Those of ``names`` the broker does not serve yet: unknown, or a partition without a leader."""
    described = {t["topic"]: t for t in await admin.describe_topics(names)}
    return [name for name in names
            if (t := described.get(name)) is None or t["error_code"] != 0 or not t["partitions"]
            or any(p["leader"] < 0 for p in t["partitions"])]


def check_partitions(settings: Settings, counts: dict[str, int]) -> None:
    """Raise :class:`PartitionCountMismatch` for the topics whose count is not the setting's."""
    bad = sorted((name, n) for name, n in counts.items() if n != settings.topic_partitions)
    if bad:
        raise PartitionCountMismatch(bad, settings.topic_partitions)
