"""Fixtures: real servers from the local stack on free loopback ports, started and stopped here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from app.local import LocalStack  # noqa: E402
from app.settings import Settings  # noqa: E402


@pytest.fixture
def stack(tmp_path: Path):
    """A fresh Tansu + nats-server per test (each starts in well under a second)."""
    s = LocalStack(workdir=tmp_path / "stack").start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def settings(stack: LocalStack, tmp_path: Path) -> Settings:
    return Settings(
        kafka_bootstrap=stack.kafka_url,
        nats_url=stack.nats_url,
        data_dir=tmp_path / "data",
        topic_partitions=8,
    )


@pytest.fixture
def child_env(stack: LocalStack, tmp_path: Path) -> dict[str, str]:
    """Environment for a service started as a child process against this stack."""
    env = dict(os.environ)
    env.update(stack.env())
    env["EXECUTION_DATA_DIR"] = str(tmp_path / "data")
    env["PYTHONUNBUFFERED"] = "1"
    return env
