"""Commands from ops and upstream services: cancel an order, modify it, close a position.

Two front ends put the same commands on ``orders.commands`` (the orders agent, the single
writer of the tables, carries them out):

* HTTP on the worker's web server (Faust web, :8012), with ``Authorization: Bearer <token>``
  (setting ``api_token``, ``EXECUTION_API_TOKEN``; without one the endpoints answer 403):

  - ``POST /orders/{order_id}/cancel``         optional body :class:`~app.models.CancelOrder`
  - ``POST /orders/{order_id}/modify``         body :class:`~app.models.ModifyOrder`
  - ``POST /positions/{account}/{symbol}/close``  optional body :class:`~app.models.ClosePosition`

* NATS request/reply, served by every worker in the queue group ``<app_id>-commands``:
  ``execution.orders.cancel``, ``execution.orders.modify`` (``{"order_id": ..., <body>}``)
  and ``execution.positions.close`` (``{"account": ..., "symbol": ..., <body>}``); the reply
  is the HTTP answer's body with its ``status`` added.  Who may publish there is NATS's
  permissions' business (see README).

Both go through :meth:`CommandsAPI.execute`: validate the body (400 names the field), find
the worker that owns the key's partition (the ``orders`` or ``positions`` table) and forward
the request to it over HTTP (Faust's own table routing forwards method and headers but not a
body), and there decide with the pure functions of :mod:`tables.commands` against the
table (404 / 409 with ``{"error": reason}``), send the :class:`~app.models.OrderCommand`
and wait for Kafka's acknowledgement before answering 202 ``{"command_id", "key", "kind"}``.
The agent decides again when the command arrives (the state may have moved meanwhile); a
repeated ``command_id`` acts once, so a caller that got no answer sends the same command
again with the same ``command_id`` (or ``Idempotency-Key`` header).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import quote

import faust
import orjson
from faust.web import Request, Response, View
from pydantic import ValidationError
from yarl import URL

from agents.common import Context, send_all
from app.models import (
    CancelOrder,
    ClosePosition,
    CommandKind,
    DecodeError,
    ModifyOrder,
    OrderCommand,
    describe_validation_error,
    from_json,
    position_key,
    to_json,
    utcnow,
)
from app import retry
from app.runtime import Runtime
from app.topics import ORDERS_COMMANDS
from tables.commands import decide_cancel, decide_close, decide_modify
from tables.definitions import Tables

log = logging.getLogger(__name__)

SUBJECT_CANCEL = "execution.orders.cancel"
SUBJECT_MODIFY = "execution.orders.modify"
SUBJECT_CLOSE = "execution.positions.close"
SUBJECTS: dict[str, CommandKind] = {
    SUBJECT_CANCEL: CommandKind.CANCEL,
    SUBJECT_MODIFY: CommandKind.MODIFY,
    SUBJECT_CLOSE: CommandKind.CLOSE_POSITION,
}

#: Set on a request one worker forwards to the owner of the key: the owner does not forward
#: it again (during a rebalance two workers may disagree about the owner for a moment).
FORWARDED = "X-Execution-Forwarded"
#: The front end a command came through (``http``, ``nats``, ``cli``), recorded on the
#: command; taken from authenticated requests only.
SOURCE = "X-Execution-Source"
SOURCES = frozenset({"http", "nats", "cli"})
IDEMPOTENCY_KEY = "Idempotency-Key"
COMMAND_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
#: Largest request body (a command is a few dozen bytes).
MAX_BODY = 64 * 1024
#: How long a command waits for Kafka's ack, and a forwarded request for the owner's answer.
ACK_TIMEOUT = 10.0
FORWARD_TIMEOUT = 15.0
#: NATS requests handled at once per worker; more wait in the subscription.
MAX_NATS_IN_FLIGHT = 64


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]

    @classmethod
    def error(cls, status: int, reason: str) -> "Answer":
        return cls(status, {"error": reason})


@dataclass(frozen=True)
class Spec:
    """What a command kind takes: its path parameters, body model, table and URL."""

    params: tuple[str, ...]
    model: type
    body_required: bool
    action: str  # the last segment of the URL path

    def key(self, params: dict[str, str]) -> str:
        if "order_id" in params:
            return params["order_id"]
        return position_key(params["account"], params["symbol"])

    def path(self, params: dict[str, str]) -> str:
        q = {k: quote(v, safe="") for k, v in params.items()}
        if "order_id" in q:
            return f"/orders/{q['order_id']}/{self.action}"
        return f"/positions/{q['account']}/{q['symbol']}/{self.action}"


SPECS: dict[CommandKind, Spec] = {
    CommandKind.CANCEL: Spec(("order_id",), CancelOrder, body_required=False, action="cancel"),
    CommandKind.MODIFY: Spec(("order_id",), ModifyOrder, body_required=True, action="modify"),
    CommandKind.CLOSE_POSITION: Spec(("account", "symbol"), ClosePosition, body_required=False, action="close"),
}


def _bad_param(name: str, value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return f"{name}: required, a non-empty string"
    if len(value) > 128 or "/" in value or any(ord(c) < 32 for c in value):
        return f"{name}: not a valid {name} ({value[:40]!r})"
    return None


def _ident(url: URL | str) -> tuple[str, int]:
    url = URL(str(url))
    return (url.host or "", int(url.port or 80))


@dataclass
class CommandsAPI:
    app: faust.App
    rt: Runtime
    tables: Tables
    _in_flight: set[asyncio.Task] = field(default_factory=set)

    # ------------------------------------------------------------------ auth
    @property
    def token(self) -> str | None:
        return self.rt.settings.api_token_value

    def authorize(self, authorization: str | None) -> Answer | None:
        """None when ``authorization`` carries the configured bearer token; else the answer."""
        token = self.token
        if token is None:
            return Answer.error(403, "commands are disabled: no api_token is configured (EXECUTION_API_TOKEN)")
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            return Answer.error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        return None

    # ------------------------------------------------------------------ the shared path
    async def execute(
        self, kind: CommandKind, params: dict[str, Any], body: bytes, *,
        idempotency_key: str | None = None, source: str = "http", forwarded: bool = False,
    ) -> Answer:
        """Validate, route to the owner of the key, decide there, send and await the ack.

        The caller has checked the credentials (a bearer token, or NATS's permissions)."""
        spec = SPECS[kind]
        for name in spec.params:
            bad = _bad_param(name, params.get(name))
            if bad:
                return Answer.error(400, bad)
        if len(body) > MAX_BODY:
            return Answer.error(413, f"payload: larger than {MAX_BODY} bytes")
        if idempotency_key is not None and not COMMAND_ID_RE.match(idempotency_key):
            return Answer.error(400, f"{IDEMPOTENCY_KEY}: 1 to 64 of A-Z a-z 0-9 _ . : -")
        if not body.strip():
            if spec.body_required:
                return Answer.error(400, "payload: a JSON object with at least one of price, stop_loss, take_profit")
            body = b"{}"
        try:
            request = from_json(spec.model, body)
        except DecodeError as exc:
            return Answer.error(400, exc.reason)
        key = spec.key(params)
        table = self.tables.orders if "order_id" in params else self.tables.positions
        try:
            owner = self.app.router.key_store(table.name, key)
        except KeyError:
            return Answer.error(503, "no worker owns the key's partition yet (starting or rebalancing); retry")
        if _ident(owner) != _ident(self.app.conf.canonical_url):
            if forwarded:
                return Answer.error(503, "the workers disagree about the key's owner (rebalancing); retry")
            return await self._forward(owner, spec.path(params), body, idempotency_key, source)
        if not self._recovered():
            return Answer.error(503, "the tables are recovering (starting or rebalancing); retry")
        return await self._decide_and_send(kind, params, key, request, idempotency_key, source)

    def _recovered(self) -> bool:
        recovery = self.app.tables.recovery
        return recovery.completed.is_set() and not recovery.in_recovery and not self.app.rebalancing

    async def _decide_and_send(
        self, kind: CommandKind, params: dict[str, str], key: str, request: Any,
        idempotency_key: str | None, source: str,
    ) -> Answer:
        if kind is CommandKind.CANCEL:
            decision = decide_cancel(self.tables.orders.get(key))
            payload: dict[str, Any] = {}
        elif kind is CommandKind.MODIFY:
            decision = decide_modify(self.tables.orders.get(key), request)
            payload = request.changes()
        else:
            decision = decide_close(self.tables.positions.get(key), request.volume)
            payload = {"account": params["account"], "symbol": params["symbol"], "volume": request.volume or None}
        if not decision.accepted:
            return Answer.error(decision.status, decision.reason or "refused")
        command_id = request.command_id or idempotency_key or uuid.uuid4().hex
        try:
            cmd = OrderCommand(kind=kind, key=key, command_id=command_id, source=source, payload=payload, at=utcnow())
        except ValidationError as exc:  # pragma: no cover - every field was validated above
            return Answer.error(400, describe_validation_error(exc)[0])
        ctx = Context(app=self.app, rt=self.rt, tables=self.tables, topics={})
        try:
            await asyncio.wait_for(send_all(ctx, [(ORDERS_COMMANDS, key, to_json(cmd), None)]), ACK_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("command %s %s (%s): not acknowledged by Kafka (%s)", kind.value, key, command_id, type(exc).__name__)
            return Answer.error(503, f"Kafka did not acknowledge the command ({type(exc).__name__}); "
                                     f"send it again with command_id {command_id}")
        self.rt.metrics.inc("commands_accepted", kind=kind.value, source=source)
        log.info("command %s %s accepted: %s (from %s)", kind.value, key, command_id, source)
        return Answer(202, {"command_id": command_id, "key": key, "kind": kind.value})

    async def _forward(self, owner: URL, path: str, body: bytes, idempotency_key: str | None, source: str) -> Answer:
        """The request, to the worker owning the key (Faust's table routing drops the body)."""
        import aiohttp

        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json",
                   FORWARDED: "1", SOURCE: source}
        if idempotency_key:
            headers[IDEMPOTENCY_KEY] = idempotency_key
        url = URL(str(owner)).with_path(path, encoded=True)
        try:
            async with self.app.http_client.request(
                "POST", url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT),
            ) as response:
                raw = await response.read()
                status = response.status
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("command forward to %s:%s failed: %s", url.host, url.port, type(exc).__name__)
            return Answer.error(503, f"the worker owning the key did not answer ({type(exc).__name__}); retry")
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            answer = {"error": f"the worker owning the key answered {status}"}
        return Answer(status, answer)

    # ------------------------------------------------------------------ HTTP
    async def http(self, view: View, request: Request, kind: CommandKind, **params: str) -> Response:
        denied = self.authorize(request.headers.get("Authorization"))
        if denied is not None:
            headers = {"WWW-Authenticate": "Bearer"} if denied.status == 401 else None
            return view.json(denied.body, status=denied.status, headers=headers)
        try:
            body = await request.read()  # type: ignore[attr-defined]  # aiohttp: bounded by client_max_size
        except Exception as exc:
            return view.json({"error": f"payload: {exc}"}, status=413)
        source = request.headers.get(SOURCE, "http")
        answer = await self.execute(
            kind, params, body, idempotency_key=request.headers.get(IDEMPOTENCY_KEY),
            source=source if source in SOURCES else "http", forwarded=bool(request.headers.get(FORWARDED)),
        )
        return view.json(answer.body, status=answer.status)

    # ------------------------------------------------------------------ NATS
    async def nats_request(self, kind: CommandKind, data: bytes, headers: dict[str, str] | None = None) -> Answer:
        """One request on a command subject: ``{"order_id": ...}`` or ``{"account": ...,
        "symbol": ...}`` plus the body's fields."""
        if self.token is None:
            return Answer.error(403, "commands are disabled: no api_token is configured (EXECUTION_API_TOKEN)")
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            return Answer.error(400, f"malformed JSON: {exc}")
        if not isinstance(doc, dict):
            return Answer.error(400, f"expected a JSON object, got {type(doc).__name__}")
        params = {name: doc.pop(name, None) for name in SPECS[kind].params}
        return await self.execute(
            kind, params, orjson.dumps(doc) if doc else b"",
            idempotency_key=(headers or {}).get(IDEMPOTENCY_KEY), source="nats",
        )

    async def serve_nats(self) -> None:
        """Subscribe to the command subjects in the queue group (retrying until NATS answers)."""
        queue = f"{self.rt.settings.app_id}-commands"
        gate = asyncio.Semaphore(MAX_NATS_IN_FLIGHT)

        def handler(kind: CommandKind) -> Callable[[Any], Any]:
            async def on_message(msg: Any) -> None:
                await gate.acquire()
                task = asyncio.create_task(self._answer(kind, msg, gate), name=f"command-{kind.value}")
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
            return on_message

        async def subscribe() -> None:
            nc = await self.rt.nats()
            for subject, kind in SUBJECTS.items():
                await nc.subscribe(subject, queue=queue, cb=handler(kind))
            await nc.flush()

        await retry.until_done("commands: NATS not reachable", subscribe, initial=0.5, maximum=10.0, logger=log)
        log.info("commands: serving NATS %s in queue group %s", ", ".join(SUBJECTS), queue)

    async def _answer(self, kind: CommandKind, msg: Any, gate: asyncio.Semaphore) -> None:
        try:
            try:
                answer = await self.nats_request(kind, msg.data, dict(msg.headers or {}))
            except Exception:
                log.exception("command %s over NATS failed", kind.value)
                answer = Answer.error(500, "internal error")
            if msg.reply:
                await msg.respond(orjson.dumps({"status": answer.status, **answer.body}))
        except Exception as exc:
            log.warning("command %s over NATS: reply not sent (%s)", kind.value, type(exc).__name__)
        finally:
            gate.release()


def register(app: faust.App, rt: Runtime, tables: Tables) -> CommandsAPI:
    """The command endpoints on the web server, and the NATS subjects served at worker start."""
    api = CommandsAPI(app, rt, tables)

    @app.page("/orders/{order_id}/cancel")
    class CancelView(View):
        async def post(self, request: Request, order_id: str) -> Response:
            return await api.http(self, request, CommandKind.CANCEL, order_id=order_id)

    @app.page("/orders/{order_id}/modify")
    class ModifyView(View):
        async def post(self, request: Request, order_id: str) -> Response:
            return await api.http(self, request, CommandKind.MODIFY, order_id=order_id)

    @app.page("/positions/{account}/{symbol}/close")
    class CloseView(View):
        async def post(self, request: Request, account: str, symbol: str) -> Response:
            return await api.http(self, request, CommandKind.CLOSE_POSITION, account=account, symbol=symbol)

    @app.task
    async def _serve_commands_over_nats() -> None:
        await api.serve_nats()

    return api
