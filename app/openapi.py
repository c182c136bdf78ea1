"""The OpenAPI 3.1 document of a worker's HTTP endpoints (:8012), served at ``/openapi.json``.

The bodies' schemas are the models' own (pydantic's JSON Schema), so the document cannot
drift from what the endpoints validate; the paths, statuses and headers are written here,
beside the views in :mod:`app.web` and :mod:`app.commands_api`.  ``tests/test_openapi.py``
checks the running worker against it with schemathesis.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic import BaseModel

from app.models import MAX_PRICE, CancelOrder, ClosePosition, ModifyOrder, Order, Position

REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
HEALTH = {
    "type": "object", "required": ["status", "broker", "tables_recovered", "assigned_partitions"],
    "properties": {
        "status": {"enum": ["ok", "unavailable"]},
        "broker": {"type": "boolean", "description": "the Kafka broker answers"},
        "tables_recovered": {"type": "boolean"},
        "assigned_partitions": {"type": "integer", "minimum": 0},
        "rebalances": {"type": "integer", "minimum": 0, "description": "since this worker started"},
        "config_revision": {"type": "integer"},
    },
}
LIVE = {
    "type": "object", "required": ["status", "recovering"],
    "properties": {"status": {"enum": ["alive", "crashed"]}, "recovering": {"type": "boolean"},
                   "reason": {"type": "string"}},
}
ACCEPTED = {
    "type": "object", "required": ["command_id", "key", "kind"],
    "properties": {
        "command_id": {"type": "string", "description": "the command's id: send it again to retry safely"},
        "key": {"type": "string", "description": "order_id, or account:symbol for a close"},
        "kind": {"enum": ["cancel", "modify", "close_position"]},
    },
}
#: A path parameter as :func:`app.commands_api._bad_param` takes it: 1 to 128 characters, no
#: ``/``, no control character.
PARAM = {"type": "string", "pattern": "^[^/\\u0000-\\u001f]{1,128}$"}
PRICES = ("price", "stop_loss", "take_profit")


def _component_schemas() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in (Order, Position, CancelOrder, ModifyOrder, ClosePosition):
        schema = _schema(model)
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    # What ModifyOrder's validators add to its fields: finite positive prices, at least one.
    modify = out["ModifyOrder"]
    for name in PRICES:
        modify["properties"][name]["anyOf"] = [
            {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": MAX_PRICE}, {"type": "null"}]
    modify["anyOf"] = [{"required": [name], "properties": {name: {"type": "number"}}} for name in PRICES]
    out.update(Error=ERROR, Health=HEALTH, Live=LIVE, CommandAccepted=ACCEPTED)
    return out


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    # mode="serialization": what the endpoints answer (responses) and accept (the command
    # bodies have no fields whose two modes differ).
    return model.model_json_schema(ref_template=REF, mode="serialization")


def _command(summary: str, body: str, body_required: bool, params: list[dict], refused: str) -> dict[str, Any]:
    errors = {
        "400": "a bad field or path parameter (the answer names it)",
        "401": "no or a wrong bearer token",
        "403": "commands are off: no EXECUTION_API_TOKEN is configured",
        "404": "unknown order or position",
        "409": refused,
        "413": "body larger than 64 KiB",
        "503": "no worker owns the key yet, tables recovering, or Kafka did not acknowledge: retry (same command_id)",
    }
    return {
        "summary": summary,
        "security": [{"bearer": []}],
        "parameters": params + [{
            "name": "Idempotency-Key", "in": "header", "required": False,
            "schema": {"type": "string", "pattern": r"^[A-Za-z0-9_.:\-]{1,64}$"},
            "description": "the command id, if the body has none: the same id acts once",
        }],
        "requestBody": {"required": body_required, "content": {"application/json": {"schema": _ref(body)}}},
        "responses": {
            "202": _json(_ref("CommandAccepted"), "accepted: on orders.commands, acknowledged by Kafka"),
            **{code: _json(_ref("Error"), why) for code, why in errors.items()},
        },
    }


@lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    order_id = {"name": "order_id", "in": "path", "required": True, "schema": PARAM}
    account = {"name": "account", "in": "path", "required": True, "schema": PARAM}
    symbol = {"name": "symbol", "in": "path", "required": True, "schema": PARAM}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "execution worker",
            "version": "0.1.0",
            "description": "Orders, positions, probes and commands of a worker of the order-execution "
                           "service. Reads are answered by the worker owning the key (requests are "
                           "forwarded); commands are decided there and put on orders.commands.",
        },
        "components": {
            "schemas": _component_schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "the token of EXECUTION_API_TOKEN"}},
        },
        "paths": {
            "/livez": {"get": {"summary": "liveness: the worker runs, recovering or not", "responses": {
                "200": _json(_ref("Live"), "alive"), "503": _json(_ref("Live"), "crashed")}}},
            "/readyz": {"get": {"summary": "readiness: broker reachable and tables recovered", "responses": {
                "200": _json(_ref("Health"), "ready"), "503": _json(_ref("Health"), "not ready")}}},
            "/health": {"get": {
                "summary": "readiness, with ?detail=1 the consumer's partitions and offsets",
                "parameters": [{"name": "detail", "in": "query", "required": False, "schema": {"type": "string"}}],
                "responses": {"200": _json(_ref("Health"), "ready"), "503": _json(_ref("Health"), "not ready")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
                "description": "Prometheus text format 0.0.4", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/config": {"get": {"summary": "the operational config in force and its hub revision", "responses": {
                "200": _json({"type": "object", "required": ["revision", "config"], "properties": {
                    "revision": {"type": "integer"}, "config": {"type": "object"}}}, "the config")}}},
            "/openapi.json": {"get": {"summary": "this document", "responses": {
                "200": _json({"type": "object"}, "OpenAPI 3.1")}}},
            "/orders/{order_id}": {"get": {
                "summary": "an order, from the worker owning it", "parameters": [order_id],
                "responses": {"200": _json(_ref("Order"), "the order"),
                              "404": _json(_ref("Error"), "no such order (or no longer held: see ClickHouse)")}}},
            "/positions/{account}/{symbol}": {"get": {
                "summary": "a net position, from the worker owning it", "parameters": [account, symbol],
                "responses": {"200": _json(_ref("Position"), "the position"),
                              "404": _json(_ref("Error"), "no such position")}}},
            "/positions": {"get": {"summary": "the positions this worker's partitions hold", "responses": {
                "200": _json({"type": "object", "required": ["worker", "positions"], "properties": {
                    "worker": {"type": "string"}, "positions": {"type": "array", "items": _ref("Position")}}},
                    "this worker's positions")}}},
            "/orders/{order_id}/cancel": {"post": _command(
                "cancel a working order", "CancelOrder", False, [order_id],
                "the order's state refuses it (e.g. FILLED): the reason says why")},
            "/orders/{order_id}/modify": {"post": _command(
                "change a working order's price, or the SL/TP of an order or its position", "ModifyOrder", True,
                [order_id], "the order's state refuses it (e.g. REJECTED): the reason says why")},
            "/positions/{account}/{symbol}/close": {"post": _command(
                "close all of a position, or volume lots of it", "ClosePosition", False, [account, symbol],
                "nothing to close (flat), or more than is open")},
        },
    }
