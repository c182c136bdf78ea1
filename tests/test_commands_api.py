"""The command front ends (app/commands_api.py): HTTP on the workers' web servers, NATS
request/reply and the CLI, against real servers: Tansu, nats-server, the broker simulator,
the bridge and two Faust workers sharing the partitions (so requests are forwarded to the
owner of the key, bodies included).

Each test uses its own orders.  What the orders agent does with the commands is checked by
the end-to-end test at the bottom only.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nats
import orjson
import pytest

from app.kafka_io import read_topic
from app.models import CommandKind, OrderCommand, OrderState
from app.sample import signal_dict
from app.topics import ORDERS_COMMANDS
from pipeline import Pipeline
from tables.idempotency import order_id_for

pytestmark = pytest.mark.slow

PARTITIONS = 4
TOKEN = "t0k3n-" + "s3cr3t-do-not-log-4f1c9a"
ACCOUNT = "cmd-http"
NATS_ACCOUNT = "cmd-nats"
CLI_ACCOUNT = "cmd-cli"
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- helpers
def http(port: int, method: str, path: str, body: object = None, token: str | None = TOKEN,
         headers: dict[str, str] | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    h = dict(headers or {})
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


async def ahttp(*args, **kw) -> tuple[int, dict]:
    return await asyncio.to_thread(http, *args, **kw)


async def nats_req(url: str, subject: str, payload: object, headers: dict[str, str] | None = None) -> dict:
    nc = await nats.connect(url)
    try:
        data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        msg = await nc.request(subject, data, timeout=20, headers=headers)
        return orjson.loads(msg.data)
    finally:
        await nc.close()


def cli(*args: str, port: int, token: str | None = TOKEN) -> tuple[int, dict]:
    env = dict(os.environ)
    env.pop("EXECUTION_API_TOKEN", None)
    if token is not None:
        env["EXECUTION_API_TOKEN"] = token
    proc = subprocess.run([sys.executable, "-m", "app.cli", *args, "--url", f"http://127.0.0.1:{port}"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    return proc.returncode, json.loads(proc.stdout)


FRONT_END_KINDS = (CommandKind.CANCEL, CommandKind.MODIFY, CommandKind.CLOSE_POSITION)


async def commands(pipe: Pipeline) -> dict[str, OrderCommand]:
    """The commands from the front ends on ``orders.commands``, by command id (the orders
    agent's own follow-ups, e.g. ``cancel_result``, may carry the same id: left out)."""
    out = {}
    for r in await read_topic(pipe.settings, ORDERS_COMMANDS, idle=0.3, timeout=60):
        try:
            cmd = OrderCommand.model_validate_json(r.value)
        except ValueError:
            continue
        if cmd.command_id and cmd.kind in FRONT_END_KINDS:
            assert cmd.command_id not in out, f"one record per command: {cmd.command_id}"
            assert r.key.decode() == cmd.key, "keyed by the order id / position key"
            out[cmd.command_id] = cmd
    return out


async def wait_health(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status, body = await ahttp(port, "GET", "/health", token=None)
        if status == 200 and body.get("assigned_partitions", 0) > 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker on {port} not healthy with partitions: {body}")
        await asyncio.sleep(0.5)


def far_limit(signal_id: str, rng: random.Random) -> dict:
    """A buy limit 200 pips below a held market: it works at the broker and never fills."""
    s = signal_dict(signal_id, rng, symbol="EURUSD", order_type="limit", side="buy", lots=0.1, account=ACCOUNT)
    s["limit_price"] = round(s["entry_price"] - 0.0200, 5)
    s["stop_loss"] = round(s["limit_price"] - 0.0020, 5)
    return s


def oid(signal_id: str) -> str:
    return order_id_for(signal_id, PARTITIONS)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
async def pipe(tmp_path_factory):
    p = Pipeline(tmp_path_factory.mktemp("commands"), partitions=PARTITIONS)
    await p.start(workers=0)
    try:
        await p.hold_reference_prices()
        p.services.extra_env["EXECUTION_API_TOKEN"] = TOKEN
        for name in ("worker-1", "worker-2"):
            svc = await asyncio.to_thread(p.services.worker, name)
            await asyncio.to_thread(svc.wait_for_log, "commands: serving NATS", 60)
        for w in workers(p):
            await wait_health(w.web_port)
        yield p
    finally:
        p.stop()


def workers(p: Pipeline) -> list:
    return [p.services.running[n] for n in ("worker-1", "worker-2")]


@pytest.fixture(scope="module")
async def orders(pipe: Pipeline) -> dict[str, str]:
    """A FILLED market buy (and so a long position of ACCOUNT in EURUSD), and far-away
    limit orders working at the broker: name -> order id."""
    rng = random.Random(11)
    # The market orders are priced off the reference: hold it there, or a walk past the
    # slippage cap (3 pips) rejects them.
    await pipe.hold_reference_prices()
    # One position per test that closes some (ACCOUNT for HTTP), so a close that takes
    # effect cannot change what another test sees.
    markets = {f"market-{a}": signal_dict(f"cmd-market-{a}", rng, symbol="EURUSD", order_type="market", side="buy",
                                          lots=0.2, account=a) for a in (ACCOUNT, NATS_ACCOUNT, CLI_ACCOUNT)}
    limits = {name: far_limit(f"cmd-{name}", rng) for name in ("http-cancel", "http-modify", "nats", "cli")}
    signals = {**markets, **limits}
    await pipe.publish_signals(list(signals.values()))
    ids = {name: oid(s["signal_id"]) for name, s in signals.items()}
    ids["market"] = ids[f"market-{ACCOUNT}"]
    # A market order passes SUBMITTED on its way to FILLED: each kind is waited for in its own state.
    states = await pipe.wait_orders([ids[n] for n in markets], done=lambda o: o.state.is_final)
    states.update(await pipe.wait_orders([ids[n] for n in limits], done=lambda o: o.state is not OrderState.PENDING))
    assert all(states[ids[n]].state is OrderState.FILLED for n in markets), states
    assert all(states[ids[n]].state is OrderState.SUBMITTED for n in limits), states
    # The positions are in the positions table once the positions agent applied the fills.
    port = workers(pipe)[0].web_port
    for account in (ACCOUNT, NATS_ACCOUNT, CLI_ACCOUNT):
        deadline = time.monotonic() + 30
        while (await ahttp(port, "GET", f"/positions/{account}/EURUSD", token=None))[0] != 200:
            assert time.monotonic() < deadline, f"position {account}:EURUSD never appeared"
            await asyncio.sleep(0.25)
    return ids


# ---------------------------------------------------------------------------- auth
async def test_mutating_endpoints_need_the_bearer_token_read_only_ones_do_not(pipe: Pipeline, orders: dict[str, str]):
    order_id = orders["http-cancel"]
    for w in workers(pipe):
        for token in (None, "wrong", TOKEN + "x", ""):
            for path, body in ((f"/orders/{order_id}/cancel", {}), (f"/orders/{order_id}/modify", {"price": 1.05}),
                               (f"/positions/{ACCOUNT}/EURUSD/close", {})):
                status, answer = await ahttp(w.web_port, "POST", path, body, token=token)
                assert status == 401, (path, token, status, answer)
                assert "error" in answer
        # Not "Bearer": a basic-auth header with the token in it is refused too.
        status, _ = await ahttp(w.web_port, "POST", f"/orders/{order_id}/cancel", {}, token=None,
                                headers={"Authorization": f"Basic {TOKEN}"})
        assert status == 401
        status, answer = await ahttp(w.web_port, "GET", f"/orders/{order_id}", token=None)
        assert status == 200 and answer["state"] == "SUBMITTED"
        status, _ = await ahttp(w.web_port, "GET", f"/positions/{ACCOUNT}/EURUSD", token=None)
        assert status == 200
    assert not [c for c in (await commands(pipe)).values() if c.key == order_id], "nothing refused was sent"


async def test_with_no_token_configured_the_commands_are_off(tmp_path: Path):
    p = Pipeline(tmp_path, partitions=PARTITIONS)
    await p.start(workers=0, bridge=False, simulator=False)
    try:
        p.services.extra_env["EXECUTION_API_TOKEN"] = ""  # set but empty: none
        w = await asyncio.to_thread(p.services.worker, "worker-1")
        await asyncio.to_thread(w.wait_for_log, "commands: serving NATS", 60)
        for token in (None, "anything", ""):
            status, answer = await ahttp(w.web_port, "POST", "/orders/o-1/cancel", {}, token=token)
            assert status == 403 and "api_token" in answer["error"], answer
        status, _ = await ahttp(w.web_port, "POST", "/positions/a/EURUSD/close", {}, token="x")
        assert status == 403
        answer = await nats_req(p.stack.nats_url, "execution.orders.cancel", {"order_id": "o-1"})
        assert answer["status"] == 403, answer
        code, answer = await asyncio.to_thread(cli, "orders", "cancel", "o-1", port=w.web_port, token="anything")
        assert code == 1 and answer["status"] == 403
        status, _ = await ahttp(w.web_port, "GET", "/health", token=None)
        assert status in (200, 503)  # read-only endpoints stay on
    finally:
        p.stop()


# ---------------------------------------------------------------------------- refusals
async def test_an_invalid_body_is_400_naming_the_field(pipe: Pipeline, orders: dict[str, str]):
    order_id = orders["http-modify"]
    for w in workers(pipe):
        port = w.web_port
        cases = [
            (f"/orders/{order_id}/modify", {"price": -1}, "price"),
            (f"/orders/{order_id}/modify", {"stop_loss": "abc"}, "stop_loss"),
            (f"/orders/{order_id}/modify", {"take_profit": 1e9}, "take_profit"),
            (f"/orders/{order_id}/modify", {}, "price"),  # nothing to change
            (f"/orders/{order_id}/modify", {"price": 1.06, "command_id": "has space"}, "command_id"),
            (f"/positions/{ACCOUNT}/EURUSD/close", {"volume": 0}, "volume"),
            (f"/positions/{ACCOUNT}/EURUSD/close", {"volume": -0.1}, "volume"),
            (f"/orders/{order_id}/cancel", [1, 2], "object"),
        ]
        for path, body, field in cases:
            status, answer = await ahttp(port, "POST", path, body)
            assert status == 400 and field in answer["error"], (path, body, status, answer)
        status, answer = await ahttp(port, "POST", f"/orders/{order_id}/modify", raw=b"{not json")
        assert status == 400 and "JSON" in answer["error"]
        status, answer = await ahttp(port, "POST", f"/orders/{order_id}/modify", raw=b"")
        assert status == 400 and "price" in answer["error"]
        status, answer = await ahttp(port, "POST", f"/orders/{order_id}/cancel", {}, headers={"Idempotency-Key": "a b"})
        assert status == 400 and "Idempotency-Key" in answer["error"]
    url = pipe.stack.nats_url
    answer = await nats_req(url, "execution.orders.modify", {"order_id": order_id, "price": -1})
    assert answer["status"] == 400 and "price" in answer["error"]
    answer = await nats_req(url, "execution.orders.cancel", {"id": order_id})
    assert answer["status"] == 400 and "order_id" in answer["error"]
    answer = await nats_req(url, "execution.positions.close", {"account": ACCOUNT, "volume": 1})
    assert answer["status"] == 400 and "symbol" in answer["error"]
    answer = await nats_req(url, "execution.orders.cancel", b"[")
    assert answer["status"] == 400 and "JSON" in answer["error"]
    assert not [c for c in (await commands(pipe)).values() if c.key == order_id]


async def test_unknown_order_or_position_is_404(pipe: Pipeline, orders: dict[str, str]):
    missing = oid("cmd-never-sent")
    for w in workers(pipe):
        for path, body in ((f"/orders/{missing}/cancel", None), (f"/orders/{missing}/modify", {"stop_loss": 1.0}),
                           ("/positions/nobody/EURUSD/close", None), (f"/positions/{ACCOUNT}/GBPUSD/close", {"volume": 0.1})):
            status, answer = await ahttp(w.web_port, "POST", path, body)
            assert status == 404 and answer == {"error": answer["error"]} and "unknown" in answer["error"], (path, answer)
    answer = await nats_req(pipe.stack.nats_url, "execution.orders.cancel", {"order_id": missing})
    assert answer == {"status": 404, "error": "unknown order"}
    answer = await nats_req(pipe.stack.nats_url, "execution.positions.close", {"account": "nobody", "symbol": "EURUSD"})
    assert answer == {"status": 404, "error": "unknown position"}


async def test_what_the_state_refuses_is_409(pipe: Pipeline, orders: dict[str, str]):
    market = orders["market"]
    for w in workers(pipe):
        status, answer = await ahttp(w.web_port, "POST", f"/orders/{market}/cancel")
        assert status == 409 and "FILLED" in answer["error"], answer
        status, answer = await ahttp(w.web_port, "POST", f"/orders/{market}/modify", {"price": 1.07})
        assert status == 409 and "market" in answer["error"], answer
        status, answer = await ahttp(w.web_port, "POST", f"/positions/{ACCOUNT}/EURUSD/close", {"volume": 5})
        assert status == 409 and "above" in answer["error"], answer
    answer = await nats_req(pipe.stack.nats_url, "execution.orders.cancel", {"order_id": market})
    assert answer["status"] == 409 and "FILLED" in answer["error"]
    assert not [c for c in (await commands(pipe)).values() if c.key == market]


# ---------------------------------------------------------------------------- accepted
async def test_accepted_commands_are_on_the_topic_when_answered(pipe: Pipeline, orders: dict[str, str]):
    w1, w2 = workers(pipe)
    cancel_id, modify_id = orders["http-cancel"], orders["http-modify"]
    # Through both workers: for each key one of them is not the owner and forwards, body included.
    status, answer = await ahttp(w1.web_port, "POST", f"/orders/{cancel_id}/cancel", {"command_id": "ops-cancel-1"})
    assert (status, answer) == (202, {"command_id": "ops-cancel-1", "key": cancel_id, "kind": "cancel"})
    expected = {"ops-cancel-1": (CommandKind.CANCEL, cancel_id, {})}
    for i, w in enumerate((w1, w2)):
        cid = f"ops-modify-{i}"
        status, answer = await ahttp(w.web_port, "POST", f"/orders/{modify_id}/modify",
                                     {"price": 1.0603, "take_profit": 1.0950}, headers={"Idempotency-Key": cid})
        assert status == 202 and answer["command_id"] == cid and answer["kind"] == "modify", answer
        expected[cid] = (CommandKind.MODIFY, modify_id, {"price": 1.0603, "take_profit": 1.0950})
        # The body's command_id wins over the header.
        status, answer = await ahttp(w.web_port, "POST", f"/positions/{ACCOUNT}/EURUSD/close",
                                     {"volume": 0.05, "command_id": f"ops-close-{i}"}, headers={"Idempotency-Key": "ignored"})
        assert status == 202 and answer["command_id"] == f"ops-close-{i}", answer
        assert answer["key"] == f"{ACCOUNT}:EURUSD" and answer["kind"] == "close_position"
        expected[f"ops-close-{i}"] = (CommandKind.CLOSE_POSITION, f"{ACCOUNT}:EURUSD",
                                      {"account": ACCOUNT, "symbol": "EURUSD", "volume": 0.05})
    # No body, no header: a fresh id; volume None closes all.
    status, answer = await ahttp(w2.web_port, "POST", f"/positions/{ACCOUNT}/EURUSD/close")
    assert status == 202 and len(answer["command_id"]) == 32, answer
    expected[answer["command_id"]] = (CommandKind.CLOSE_POSITION, f"{ACCOUNT}:EURUSD",
                                      {"account": ACCOUNT, "symbol": "EURUSD", "volume": None})
    # 202 came after Kafka's ack: the commands are readable now, no waiting.
    on_topic = await commands(pipe)
    for cid, (kind, key, payload) in expected.items():
        cmd = on_topic[cid]
        assert (cmd.kind, cmd.key, cmd.payload, cmd.source) == (kind, key, payload, "http"), cmd
    # Sent through both workers, both modifies were decided and sent by the owner alone.
    owners = [w.name for w in (w1, w2) if "ops-modify-0" in w.log_text()]
    assert len(owners) == 1 and "ops-modify-1" in pipe.services.running[owners[0]].log_text(), owners


async def test_commands_over_nats(pipe: Pipeline, orders: dict[str, str]):
    url = pipe.stack.nats_url
    order_id = orders["nats"]
    answer = await nats_req(url, "execution.orders.modify",
                            {"order_id": order_id, "stop_loss": 1.0550, "command_id": "nats-mod-1"})
    assert answer == {"status": 202, "command_id": "nats-mod-1", "key": order_id, "kind": "modify"}
    answer = await nats_req(url, "execution.orders.cancel", {"order_id": order_id}, headers={"Idempotency-Key": "nats-cancel-1"})
    assert answer == {"status": 202, "command_id": "nats-cancel-1", "key": order_id, "kind": "cancel"}
    answer = await nats_req(url, "execution.positions.close", {"account": NATS_ACCOUNT, "symbol": "EURUSD", "volume": 0.01})
    assert answer["status"] == 202 and answer["kind"] == "close_position", answer
    close_id = answer["command_id"]
    on_topic = await commands(pipe)
    assert (on_topic["nats-mod-1"].kind, on_topic["nats-mod-1"].payload) == (CommandKind.MODIFY, {"stop_loss": 1.0550})
    assert on_topic["nats-cancel-1"].kind is CommandKind.CANCEL and on_topic["nats-cancel-1"].key == order_id
    assert on_topic[close_id].payload == {"account": NATS_ACCOUNT, "symbol": "EURUSD", "volume": 0.01}
    assert {on_topic[c].source for c in ("nats-mod-1", "nats-cancel-1", close_id)} == {"nats"}


async def test_commands_from_the_cli(pipe: Pipeline, orders: dict[str, str]):
    order_id = orders["cli"]
    for w in workers(pipe):
        code, answer = await asyncio.to_thread(cli, "orders", "show", order_id, port=w.web_port, token=None)
        assert code == 0 and answer["order_id"] == order_id and answer["status"] == 200
    port = workers(pipe)[1].web_port
    code, answer = await asyncio.to_thread(cli, "orders", "modify", order_id, "--stop-loss", "1.0560",
                                           "--command-id", "cli-mod-1", port=port)
    assert code == 0 and answer == {"status": 202, "command_id": "cli-mod-1", "key": order_id, "kind": "modify"}
    code, answer = await asyncio.to_thread(cli, "orders", "modify", order_id, "--price", "-1", port=port)
    assert code == 1 and answer["status"] == 400 and "price" in answer["error"]
    code, answer = await asyncio.to_thread(cli, "orders", "cancel", order_id, port=port, token=None)
    assert code == 1 and answer["status"] == 401
    code, answer = await asyncio.to_thread(cli, "orders", "cancel", orders["market"], port=port)
    assert code == 1 and answer["status"] == 409
    code, answer = await asyncio.to_thread(cli, "orders", "cancel", oid("cmd-never-sent"), port=port)
    assert code == 1 and answer["status"] == 404
    code, answer = await asyncio.to_thread(cli, "orders", "cancel", order_id, port=port)
    assert code == 0 and answer["status"] == 202 and answer["kind"] == "cancel"
    cancel_id = answer["command_id"]
    code, answer = await asyncio.to_thread(cli, "positions", "close", CLI_ACCOUNT, "EURUSD", "--volume", "0.02", port=port)
    assert code == 0 and answer["status"] == 202 and answer["key"] == f"{CLI_ACCOUNT}:EURUSD"
    close_id = answer["command_id"]
    on_topic = await commands(pipe)
    assert on_topic["cli-mod-1"].payload == {"stop_loss": 1.056} and on_topic["cli-mod-1"].source == "cli"
    assert on_topic[cancel_id].kind is CommandKind.CANCEL and on_topic[cancel_id].key == order_id
    assert on_topic[close_id].payload["volume"] == 0.02


async def test_the_token_is_never_logged_nor_shown(pipe: Pipeline, orders: dict[str, str]):
    for w in workers(pipe):
        log = w.log_text()
        assert "command cancel" in log or "command modify" in log or "command close_position" in log
        assert TOKEN not in log, f"{w.name} logged the API token"
    env = {**os.environ, "EXECUTION_API_TOKEN": TOKEN}
    out = subprocess.run([sys.executable, "-m", "app.cli", "settings"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and TOKEN not in out.stdout + out.stderr
    assert json.loads(out.stdout)["api_token"] == "**********"


# ---------------------------------------------------------------------------- the goal
async def test_cancel_limit_order_end_to_end(pipe: Pipeline, orders: dict[str, str]):
    signal = far_limit("cmd-e2e-cancel", random.Random(99))
    await pipe.publish_signals([signal])
    order_id = oid(signal["signal_id"])
    await pipe.wait_orders([order_id], done=lambda o: o.state is OrderState.SUBMITTED)
    status, answer = await ahttp(workers(pipe)[0].web_port, "POST", f"/orders/{order_id}/cancel", {"command_id": "e2e-cancel"})
    assert status == 202, answer
    final = await pipe.wait_orders([order_id], timeout=30)
    assert final[order_id].state is OrderState.CANCELLED
    status, body = await ahttp(workers(pipe)[1].web_port, "GET", f"/orders/{order_id}", token=None)
    assert status == 200 and body["state"] == "CANCELLED"


# ---------------------------------------------------------------------------- the API description
async def test_the_workers_answer_as_their_openapi_document_says(pipe: Pipeline, tmp_path: Path):
    """``/openapi.json`` is :func:`app.openapi.document`, and schemathesis, generating requests
    from it (valid and invalid, with and without the token) against a running worker, finds
    every answer's status, content type and body as documented and no server error."""
    from app.openapi import document

    port = workers(pipe)[0].web_port
    status, served = await ahttp(port, "GET", "/openapi.json", token=None)
    assert status == 200 and served == json.loads(json.dumps(document()))
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "schemathesis.cli", "run", f"http://127.0.0.1:{port}/openapi.json",
         "--checks", "all", "--max-examples", "15", "--header", f"Authorization: Bearer {TOKEN}",
         "--request-timeout", "30", "--seed", "7"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
