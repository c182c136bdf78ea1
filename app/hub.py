"""The central hub: operational config in a NATS JetStream key-value bucket, hot-reloaded.

In the spirit of the seed's ``ConfigClient``: start from the safe defaults
(:data:`app.config.SAFE_DEFAULTS`), then take the document stored under the key
``execution`` in the bucket ``execution_config``; watch the key and apply every change
to the running process.  A change that does not validate is rejected with one clear log
line and the last good config stays in force.  A partial document is merged over the safe
defaults, so ``{"operational": {"fill_tracking": {"slippage_alert_threshold_pips": 3}}}``
changes one value.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson
from pydantic import ValidationError

from app.config import SAFE_DEFAULTS, OperationalConfig

log = logging.getLogger(__name__)

BUCKET = "execution_config"
KEY = "execution"


def parse(raw: bytes | str | dict) -> OperationalConfig:
    """A hub document, merged over the safe defaults and validated (raises ValueError)."""
    try:
        doc = raw if isinstance(raw, dict) else orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("the config document must be a JSON object")
    merged = _merge(SAFE_DEFAULTS.model_dump(mode="json"), doc)
    try:
        return OperationalConfig.model_validate(merged)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(errors) from None


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def set_path(doc: dict, dotted: str, value: Any) -> dict:
    """``set_path(doc, "operational.fill_tracking.slippage_alert_threshold_pips", 3)``."""
    node = doc
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return doc


class ConfigHub:
    """The live operational config of one process: ``hub.current`` is always valid."""

    def __init__(self, defaults: OperationalConfig = SAFE_DEFAULTS) -> None:
        self.current = defaults
        self.revision = 0
        self.rejected = 0
        self._listeners: list[Callable[[OperationalConfig], None]] = []
        self._watch_task: asyncio.Task | None = None
        self._watcher: Any = None

    def on_change(self, fn: Callable[[OperationalConfig], None]) -> None:
        self._listeners.append(fn)

    async def start(self, nc: Any) -> None:
        """Load the hub's document (if any) and follow its changes.  Never raises for a
        missing or invalid document: the safe defaults (or last good config) stay."""
        js = nc.jetstream()
        kv = await bucket(js)
        try:
            entry = await kv.get(KEY)
            self._apply(entry.value, entry.revision)
        except Exception as exc:  # KeyNotFoundError: nothing stored yet
            if type(exc).__name__ not in ("KeyNotFoundError", "KeyDeletedError"):
                log.warning("config hub: could not read %s/%s: %s; using safe defaults", BUCKET, KEY, exc)
        self._watcher = await kv.watch(KEY, include_history=False)
        self._watch_task = asyncio.create_task(self._follow(), name="config-hub-watch")

    async def _follow(self) -> None:
        async for entry in self._watcher:
            if entry is None:  # end of the initial values
                continue
            if entry.operation in ("DEL", "PURGE"):
                self._set(SAFE_DEFAULTS, entry.revision, "deleted in the hub: back to safe defaults")
                continue
            self._apply(entry.value, entry.revision)

    def _apply(self, raw: bytes | None, revision: int) -> None:
        if revision and revision <= self.revision:
            return
        try:
            cfg = parse(raw or b"{}")
        except ValueError as exc:
            self.rejected += 1
            log.error("config hub: rejected revision %s of %s/%s: %s; keeping revision %s", revision, BUCKET, KEY, exc, self.revision)
            return
        self._set(cfg, revision, "applied")

    def _set(self, cfg: OperationalConfig, revision: int, what: str) -> None:
        changed = cfg != self.current
        self.current, self.revision = cfg, revision
        if changed:
            log.info("config hub: %s revision %s", what, revision)
            for fn in self._listeners:
                fn(cfg)

    async def stop(self) -> None:
        if self._watch_task:
            self._watch_task.cancel()
        if self._watcher is not None:
            try:
                await self._watcher.stop()
            except Exception:
                pass
        self._watch_task = self._watcher = None


async def bucket(js: Any) -> Any:
    try:
        return await js.key_value(BUCKET)
    except Exception:
        return await js.create_key_value(bucket=BUCKET, history=10)


async def read(nc: Any) -> tuple[dict, int]:
    """The stored document (possibly partial) and its revision; ``({}, 0)`` when unset."""
    kv = await bucket(nc.jetstream())
    try:
        entry = await kv.get(KEY)
    except Exception:
        return {}, 0
    return orjson.loads(entry.value or b"{}"), entry.revision


async def write(nc: Any, doc: dict) -> int:
    """Validate ``doc`` and store it; returns the new revision (raises ValueError if invalid)."""
    parse(doc)
    kv = await bucket(nc.jetstream())
    return await kv.put(KEY, orjson.dumps(doc))
