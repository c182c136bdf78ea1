"""The NATS authorization README documents for the command subjects (``k8s/nats-authorization.conf``),
on a real nats-server started with that file: only the service answers ``execution.>``, only the
order-managing users send commands, and nobody else can send, intercept or forge them."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import nats
import pytest

from app.commands_api import SUBJECT_CANCEL, SUBJECTS
from app.local import Server, free_port, nats_server_binary

CONF = Path(__file__).resolve().parent.parent / "k8s" / "nats-authorization.conf"
PASSWORDS = {"EXECUTION_NATS_PASSWORD": "exec-secret", "OPS_NATS_PASSWORD": "ops-secret",
             "READER_NATS_PASSWORD": "reader-secret"}


@pytest.fixture
def nats_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    shutil.copy(CONF, tmp_path / CONF.name)
    port = free_port()
    (tmp_path / "server.conf").write_text(f"listen: 127.0.0.1:{port}\ninclude ./{CONF.name}\n")
    for name, value in PASSWORDS.items():  # the server reads them from its environment
        monkeypatch.setenv(name, value)
    server = Server("nats-auth", [nats_server_binary(), "-c", str(tmp_path / "server.conf")], port,
                    tmp_path / "nats.log").start()
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        server.stop()


class Client:
    """A connection as one user, collecting the permission errors the server sends it."""

    def __init__(self) -> None:
        self.errors: asyncio.Queue[str] = asyncio.Queue()
        self.nc = None

    async def connect(self, url: str, user: str, password: str) -> "Client":
        async def on_error(exc: Exception) -> None:
            await self.errors.put(str(exc))

        self.nc = await nats.connect(url, user=user, password=password, error_cb=on_error,
                                     allow_reconnect=False)
        return self

    async def violation(self) -> str:
        message = (await asyncio.wait_for(self.errors.get(), 10)).lower()  # nats-py lowercases it
        assert "permissions violation" in message, message
        return message


async def test_only_the_service_answers_and_only_ops_send_commands(nats_url: str):
    service = await Client().connect(nats_url, "execution", PASSWORDS["EXECUTION_NATS_PASSWORD"])
    ops = await Client().connect(nats_url, "ops", PASSWORDS["OPS_NATS_PASSWORD"])
    reader = await Client().connect(nats_url, "reader", PASSWORDS["READER_NATS_PASSWORD"])
    received: list[bytes] = []

    async def answer(msg) -> None:
        received.append(msg.data)
        await msg.respond(b'{"status": 202}')

    try:
        for subject in SUBJECTS:
            await service.nc.subscribe(subject, queue="execution-commands", cb=answer)
        await service.nc.flush()

        # ops sends a command and gets the service's answer
        reply = await ops.nc.request(SUBJECT_CANCEL, b'{"order_id": "o-1"}', timeout=10)
        assert reply.data == b'{"status": 202}'

        # a reader cannot send one: the server refuses the publish, the service never sees it
        await reader.nc.publish(SUBJECT_CANCEL, b'{"order_id": "o-2"}', reply=reader.nc.new_inbox())
        assert SUBJECT_CANCEL in await reader.violation()

        # neither ops nor a reader can listen in on (or answer in place of) the service
        for client in (ops, reader):
            await client.nc.subscribe("execution.>")
            assert "execution.>" in await client.violation()

        # ops cannot forge order updates
        await ops.nc.publish("orders.filled.EURUSD", b"{}")
        assert "orders.filled.eurusd" in await ops.violation()

        # the service still gets exactly what ops sent
        reply = await ops.nc.request(SUBJECT_CANCEL, b'{"order_id": "o-3"}', timeout=10)
        assert reply.data == b'{"status": 202}'
        assert received == [b'{"order_id": "o-1"}', b'{"order_id": "o-3"}']
    finally:
        for client in (service, ops, reader):
            if client.nc is not None:
                await client.nc.close()


async def test_a_wrong_password_is_refused(nats_url: str):
    with pytest.raises(Exception, match="(?i)authorization"):
        await Client().connect(nats_url, "ops", "not-the-password")


async def test_the_service_publishes_order_updates_and_alerts_that_ops_receive(nats_url: str):
    """Every subject the service's notifier publishes (``app.notifier``) is allowed to the
    service's user, and ops can subscribe to the alerts; readers get order updates only."""
    service = await Client().connect(nats_url, "execution", PASSWORDS["EXECUTION_NATS_PASSWORD"])
    ops = await Client().connect(nats_url, "ops", PASSWORDS["OPS_NATS_PASSWORD"])
    reader = await Client().connect(nats_url, "reader", PASSWORDS["READER_NATS_PASSWORD"])
    subjects = ["orders.filled.EURUSD", "alerts.execution.slippage", "alerts.execution.reconciliation",
                "alerts.execution.fills"]
    try:
        ops_sub = await ops.nc.subscribe("alerts.execution.>")
        reader_sub = await reader.nc.subscribe("orders.>")
        await ops.nc.flush()
        await reader.nc.flush()
        for subject in subjects:
            await service.nc.publish(subject, subject.encode())
        await service.nc.flush()
        got = [(await ops_sub.next_msg(timeout=10)).subject for _ in range(3)]
        assert got == subjects[1:]
        assert (await reader_sub.next_msg(timeout=10)).subject == "orders.filled.EURUSD"
        assert service.errors.empty(), service.errors.get_nowait()
        await reader.nc.subscribe("alerts.execution.>")
        assert "alerts.execution.>" in await reader.violation()
    finally:
        for client in (service, ops, reader):
            if client.nc is not None:
                await client.nc.close()
