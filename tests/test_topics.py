"""Topic creation against the real local Kafka (Tansu): a partition count that differs from
``EXECUTION_TOPIC_PARTITIONS`` on an existing co-partitioned topic refuses the start."""

from __future__ import annotations

import subprocess
import sys

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.topics import FILLS, SIGNALS_APPROVED, TOPICS, PartitionCountMismatch, ensure_topics


async def create(settings, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(**settings.aiokafka_common())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name=name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def partition_counts(settings) -> dict[str, int]:
    admin = AIOKafkaAdminClient(**settings.aiokafka_common())
    await admin.start()
    try:
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics()}
    finally:
        await admin.close()


async def test_existing_topic_with_another_partition_count_is_refused(settings):
    assert settings.topic_partitions == 8
    await create(settings, FILLS, 3)
    with pytest.raises(PartitionCountMismatch) as info:
        await ensure_topics(settings)
    message = str(info.value)
    assert "fills" in message and "3 partitions" in message and "EXECUTION_TOPIC_PARTITIONS=8" in message
    # a narrower ensure that includes the topic refuses too; one that does not, passes
    with pytest.raises(PartitionCountMismatch, match="fills"):
        await ensure_topics(settings, [SIGNALS_APPROVED, FILLS])
    await ensure_topics(settings, [SIGNALS_APPROVED])
    assert (await partition_counts(settings))[SIGNALS_APPROVED] == 8


async def test_a_table_changelog_with_another_partition_count_is_refused(settings):
    changelog = f"{settings.app_id}-orders-changelog"
    await create(settings, changelog, 3)
    with pytest.raises(PartitionCountMismatch, match=changelog):
        await ensure_topics(settings)


async def test_matching_topics_pass_and_ensure_is_idempotent(settings):
    await create(settings, SIGNALS_APPROVED, 8)
    await create(settings, f"{settings.app_id}-orders-changelog", 8)
    await ensure_topics(settings)
    await ensure_topics(settings)
    counts = await partition_counts(settings)
    assert all(counts[t.name] == 8 for t in TOPICS)


@pytest.mark.parametrize("command", ["worker", "bridge"])
async def test_the_process_exits_non_zero_naming_the_topic(settings, child_env, command):
    await create(settings, SIGNALS_APPROVED, 3)
    env = {**child_env, "EXECUTION_TOPIC_PARTITIONS": "8"}
    done = subprocess.run([sys.executable, "-m", "app.cli", command], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "signals.approved" in done.stderr and "3 partitions" in done.stderr
    assert "EXECUTION_TOPIC_PARTITIONS=8" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
