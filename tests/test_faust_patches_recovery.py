"""app/faust_patches.py (10), bulk changelog replay, on the broker (Apache Kafka by default):
two tables' changelogs (several partitions, tombstones, empty values, keys written many times)
are recovered by a worker with Faust's own replay (``bulk_recovery`` off: the control) and by
a worker with the bulk replay, each into its own data dir; both RocksDB trees must hold exactly
what the changelog says (the last value of every key, deleted keys gone, the persisted offset
of every partition at its last record), and the bulk worker's log must show that the bulk
path replayed every record and that Faust's own replay found nothing to read.  Then more
records (tombstones of keys present, new keys) and a restart of both with their data dirs
kept: the bulk replay starts after the persisted offset and reads only the new records.

The worker is this file run as a script (below): the service's Faust app
(:func:`app.faust_app.create_app`, so the patches are installed as in the service) with two
plain tables and no agents, so nothing but recovery writes to the tables."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

TABLES = ("bulk_a", "bulk_b")
PARTITIONS = 4
APP_ID = "recovery-test"
REPO = Path(__file__).resolve().parent.parent
READY = "[^---Recovery]: Worker ready"


def changelog(table: str) -> str:
    return f"{APP_ID}-{table}-changelog"


if __name__ == "__main__":  # the worker
    sys.path.insert(0, str(REPO))
    from app.faust_app import create_app

    faust_app = create_app()
    for name in TABLES:
        faust_app.Table(name, key_type=bytes, value_type=bytes)
    faust_app.main()
    sys.exit(0)


import pytest  # noqa: E402
from aiokafka import AIOKafkaProducer  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402
from rocksdict import AccessType, Options, Rdict  # noqa: E402

from app.faust_patches import BULK_DONE  # noqa: E402
from app.local import free_port  # noqa: E402
from app.settings import Settings  # noqa: E402

OFFSET_KEY = b"__faust\0offset__"


class Changelog:
    """What the changelog says each partition's table should hold after a replay."""

    def __init__(self) -> None:
        self.state: dict[tuple[str, int], dict[bytes, bytes]] = {}
        self.last: dict[tuple[str, int], int] = {}
        self.records = 0

    def apply(self, table: str, partition: int, offset: int, key: bytes, value: bytes | None) -> None:
        part = self.state.setdefault((table, partition), {})
        if value is None:
            part.pop(key, None)
        else:
            part[key] = value
        self.last[(table, partition)] = max(offset, self.last.get((table, partition), -1))
        self.records += 1

    def expected(self) -> dict[tuple[str, int], dict[bytes, bytes]]:
        return {tp: {**kv, OFFSET_KEY: str(self.last[tp]).encode()} for tp, kv in self.state.items()}


async def produce(settings: Settings, log: Changelog, rng: random.Random, n: int, keys: int) -> None:
    """``n`` records per table, spread over the partitions, in batches of various sizes: puts
    (some of them empty values), and tombstones of keys written before."""
    producer = AIOKafkaProducer(**settings.producer_options())
    await producer.start()
    try:
        futures = []
        for i in range(n * len(TABLES)):
            table = TABLES[i % len(TABLES)]
            partition = rng.randrange(PARTITIONS)
            key = b"k%d-%d" % (partition, rng.randrange(keys))
            roll = rng.random()
            value = None if roll < 0.2 else b"" if roll < 0.25 else b"v%d-%s" % (i, b"x" * rng.randrange(300))
            fut = await producer.send(changelog(table), value, key=key, partition=partition)
            futures.append((table, partition, key, value, fut))
            if rng.random() < 0.01:
                await producer.flush()
        for table, partition, key, value, fut in futures:
            meta = await fut
            log.apply(table, partition, meta.offset, key, value)
    finally:
        await producer.stop()


def read_tables(data_dir: Path) -> dict[tuple[str, int], dict[bytes, bytes]]:
    """Every table partition's RocksDB contents under a worker's data dir (the worker stopped)."""
    found: dict[tuple[str, int], dict[bytes, bytes]] = {}
    for path in data_dir.rglob("*.db"):
        m = re.fullmatch(r"(\w+)-(\d+)\.db", path.name)
        if not m or m.group(1) not in TABLES:
            continue
        db = Rdict(str(path), options=Options(raw_mode=True), access_type=AccessType.read_only())
        try:
            contents = dict(db.items())
        finally:
            db.close()
        if contents:
            found[(m.group(1), int(m.group(2)))] = contents
    return found


class Worker:
    def __init__(self, stack, workdir: Path, name: str, bulk: bool) -> None:
        self.data_dir = workdir / name
        self.log_path = workdir / f"{name}.log"
        self.env = dict(os.environ)
        self.env.update(stack.env())
        self.env.update(
            EXECUTION_APP_ID=APP_ID, EXECUTION_DATA_DIR=str(self.data_dir), EXECUTION_WEB_PORT=str(free_port()),
            EXECUTION_TOPIC_PARTITIONS=str(PARTITIONS), EXECUTION_BULK_RECOVERY=str(bulk).lower(),
            PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
        )

    def run_once(self, timeout: float = 120.0) -> str:
        """Start, wait until the worker is ready (recovery done), stop it; its log of this run."""
        before = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as out:
            proc = subprocess.Popen([sys.executable, __file__, "worker", "-l", "info"], env=self.env, cwd=REPO,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while READY not in self.text(before):
                assert proc.poll() is None, f"the worker exited:\n{self.text(before)[-3000:]}"
                assert time.monotonic() < deadline, f"not ready after {timeout}s:\n{self.text(before)[-3000:]}"
                time.sleep(0.1)  # polling the log for a line, not waiting for time to pass
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, self.text(before)[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return self.text(before)

    def text(self, start: int = 0) -> str:
        return self.log_path.read_bytes()[start:].decode(errors="replace") if self.log_path.exists() else ""


def bulk_replayed(log: str) -> list[int]:
    """The records each bulk replay of this run wrote (its "done" lines), and none left."""
    found = re.findall(re.escape(BULK_DONE) + r" \((.*?)\): (\d+) records in .*?; (\d+) left", log)
    assert all(why == "complete" and left == "0" for why, _, left in found), found
    return [int(n) for _, n, _ in found]


@pytest.fixture
async def topics(settings: Settings) -> None:
    admin = AIOKafkaAdminClient(**settings.aiokafka_common())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(changelog(t), PARTITIONS, settings.topic_replication_factor,
                                            topic_configs={"cleanup.policy": "compact"}) for t in TABLES])
    finally:
        await admin.close()


async def test_bulk_recovery_leaves_the_tables_as_fausts_replay_does(stack, settings: Settings, topics, tmp_path):
    assert settings.effective("bulk_recovery") is True  # the default in this profile
    log, rng = Changelog(), random.Random(16)
    await produce(settings, log, rng, n=3000, keys=150)
    faust, bulk = Worker(stack, tmp_path, "faust", bulk=False), Worker(stack, tmp_path, "bulk", bulk=True)

    # An empty data dir (a lost volume): everything is replayed.
    control = faust.run_once()
    assert "Restoring state from changelog topics" in control and BULK_DONE not in control
    assert read_tables(faust.data_dir) == log.expected()
    patched = bulk.run_once()
    assert bulk_replayed(patched) == [log.records]
    assert "Restoring state from changelog topics" not in patched  # Faust's replay had nothing left
    assert read_tables(bulk.data_dir) == log.expected() == read_tables(faust.data_dir)

    # Kept data dirs: only what was written since, from after the persisted offsets.
    before = log.records
    await produce(settings, log, rng, n=500, keys=200)
    control = faust.run_once()
    patched = bulk.run_once()
    assert bulk_replayed(patched) == [log.records - before]
    assert "Restoring state from changelog topics" not in patched
    assert read_tables(bulk.data_dir) == log.expected() == read_tables(faust.data_dir)

    # Nothing new: neither replays anything.
    assert BULK_DONE not in bulk.run_once()
    assert read_tables(bulk.data_dir) == log.expected()
