"""Fixtures: real servers from the local stack on free loopback ports, started and stopped here."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from app.local import LOCAL_BROKER_ENV, LocalStack, free_port, take_ownership  # noqa: E402
from app.settings import Settings  # noqa: E402

# The suite runs on Apache Kafka (KRaft, the production profile) unless the environment says
# otherwise; tests marked ``tansu`` (the demo's embedded broker) and stacks built with
# ``broker="tansu"`` run on Tansu.  Child processes inherit the choice.
os.environ.setdefault(LOCAL_BROKER_ENV, "kafka")


def pytest_configure(config: pytest.Config) -> None:
    """A run stopped with SIGTERM (``timeout``, CI cancelling a job) ends like Ctrl-C: pytest
    runs the fixtures' teardown, which stops the servers and services the tests started
    (they run in their own sessions, so nothing else would stop them)."""

    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    # A run killed with SIGKILL cannot stop anything: the next run stops what it left.
    left = take_ownership()
    if left:
        print(f"stopped {len(left)} processes left by an earlier run that was killed: {left}")


@pytest.fixture
def stack(tmp_path: Path, request: pytest.FixtureRequest):
    """A fresh broker + nats-server per test: Apache Kafka, or Tansu for a test marked
    ``tansu``."""
    broker = "tansu" if request.node.get_closest_marker("tansu") else None
    s = LocalStack(workdir=tmp_path / "stack", **({"broker": broker} if broker else {})).start()
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
        **stack.settings_fields(),
    )


@pytest.fixture
def child_env(stack: LocalStack, tmp_path: Path) -> dict[str, str]:
    """Environment for a service started as a child process against this stack."""
    env = dict(os.environ)
    env.update(stack.env())
    env["EXECUTION_DATA_DIR"] = str(tmp_path / "data")
    env["PYTHONUNBUFFERED"] = "1"
    env["EXECUTION_BRIDGE_WEB_PORT"] = str(free_port())  # never a fixed port on a shared machine
    env["EXECUTION_SINK_WEB_PORT"] = str(free_port())
    return env
