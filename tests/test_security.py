"""The whole service on secured servers: Apache Kafka with clients on SASL_SSL (SCRAM-SHA-512)
and NATS with a user, a password and TLS, certificates and passwords made by the test
(``app.local.Security``).  The services get the credentials only from their environment;
the servers refuse clients without them; and no log of any process holds a secret."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import urllib.request

import nats
import pytest
from pydantic import SecretStr
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError, KafkaError

from app.models import OrderState
from app.sample import signal_dict
from app.settings import Settings
from pipeline import Pipeline
from tables.idempotency import order_id_for

pytestmark = pytest.mark.slow

PARTITIONS = 4


def post(port: int, path: str, token: str) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"{}", method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


async def kafka_refuses(settings: Settings) -> None:
    admin = AIOKafkaAdminClient(**settings.aiokafka_common(), request_timeout_ms=5000)
    with pytest.raises((KafkaConnectionError, KafkaError)):
        try:
            await admin.start()
            await admin.describe_topics()
        finally:
            await admin.close()


async def test_the_service_on_sasl_ssl_kafka_and_tls_nats_never_logs_a_secret(tmp_path):
    token = secrets.token_hex(16)
    p = Pipeline(tmp_path, partitions=PARTITIONS, broker="kafka", secure=True, env={"EXECUTION_API_TOKEN": token})
    await p.start()
    sec = p.stack.security
    try:
        s = p.settings
        assert s.aiokafka_common()["security_protocol"] == "SASL_SSL" and p.stack.nats_url.startswith("tls://")

        # Clients without the credentials are refused by both servers.
        await kafka_refuses(s.model_copy(update={"kafka_sasl_mechanism": None, "kafka_ssl": False}))  # plaintext
        await kafka_refuses(s.model_copy(update={"kafka_password": SecretStr("not-the-password")}))
        with pytest.raises(Exception, match="(?i)authorization"):
            await nats.connect(**{**s.nats_options(), "password": "not-the-password"}, allow_reconnect=False)
        with pytest.raises(Exception):
            await nats.connect(p.stack.nats_url.replace("tls://", "nats://"), allow_reconnect=False,
                               max_reconnect_attempts=0, connect_timeout=3)

        # Signals to FILLED orders, one submission each, through the secured servers.
        await p.hold_reference_prices()
        rng = random.Random(71)
        signals = [signal_dict(f"secure-{i}", rng, order_type="market", lots=0.1) for i in range(20)]
        ids = [order_id_for(x["signal_id"], PARTITIONS) for x in signals]
        await p.publish_signals(signals)
        orders = await p.wait_orders(ids, timeout=120)
        assert {orders[i].state for i in ids} == {OrderState.FILLED}
        stats = await p.sim_stats()
        assert all(stats["by_comment"].get(i) == 1 for i in ids)

        # The API token in use: a cancel of a FILLED order is refused by its state (409).
        worker = p.services.running["worker-1"]
        status, body = await asyncio.to_thread(post, worker.web_port, f"/orders/{ids[0]}/cancel", token)
        assert status == 409, body

        # No secret in any log: the services', the servers', the stack's.
        logs = sorted(tmp_path.rglob("*.log"))
        names = {log.name for log in logs}
        assert {"worker-1.log", "bridge.log", "sim.log", "kafka.log", "nats.log"} <= names, names
        for log in logs:
            text = log.read_text(errors="replace")
            for secret in [*sec.secrets, token]:
                assert secret not in text, f"a secret in {log}"
    finally:
        p.stop()
