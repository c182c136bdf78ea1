"""Every Kafka topic of the service, by name, and their creation.

Topics are created explicitly with the configured partition count: a broker's auto-create
would pick its own default, and Faust refuses a table whose changelog partition count
differs from its source topic's (co-partitioning is what makes a join a table lookup).
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


@dataclass(frozen=True)
class TopicSpec:
    name: str
    compacted: bool = False
    #: Topics read by the same co-partitioned agents must share the partition count.
    copartitioned: bool = True


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


async def ensure_topics(settings: Settings, names: list[str] | None = None, attempts: int = 30) -> None:
    """Create the service's topics if absent (idempotent; retried while the broker starts)."""
    specs = [t for t in TOPICS if names is None or t.name in names]
    wanted = [
        NewTopic(
            name=t.name,
            num_partitions=settings.topic_partitions,
            replication_factor=settings.topic_replication_factor,
            topic_configs={"cleanup.policy": "compact"} if t.compacted else {},
        )
        for t in specs
    ]
    for attempt in range(attempts):
        admin = AIOKafkaAdminClient(**settings.aiokafka_common())
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [t for t in wanted if t.name not in existing]
            if missing:
                try:
                    await admin.create_topics(missing)
                except TopicAlreadyExistsError:
                    pass  # a concurrent creator won
                log.info("created topics %s", [t.name for t in missing])
            return
        except TopicAlreadyExistsError:
            return
        except Exception as exc:  # broker not up yet
            if attempt == attempts - 1:
                raise
            log.debug("ensure_topics: %s; retrying", exc)
            await asyncio.sleep(0.5)
        finally:
            await admin.close()
