"""The worker's Faust app: tables, agents and timers wired to the live runtime.

``execution worker`` runs it (``faust -A app.main worker`` works too).  Topics must exist
before the worker subscribes; ``execution worker`` creates them (:func:`app.topics.ensure_topics`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import types
from pathlib import Path
from typing import Any

import agents
import app as app_pkg
import tables as tables_pkg
from agents import orders, positions
from agents.common import Context
from app import watchdog, web
from app.faust_app import create_app
from app.runtime import Runtime
from app.settings import get_settings
from app.topics import TOPICS
from tables.definitions import define_tables

settings = get_settings()
app = create_app(settings)
runtime = Runtime(settings)
tables = define_tables(app)
context = Context(
    app=app,
    rt=runtime,
    tables=tables,
    topics={t.name: app.topic(t.name, key_serializer="raw", value_serializer="raw") for t in TOPICS},
)
orders_agent = orders.register(context)
positions_agent = positions.register(context)
web.register(app, runtime, tables)
INPUTS = [*orders.INPUTS, *positions.INPUTS]
dog = watchdog.register(app, settings, INPUTS)


@app.on_before_shutdown.connect
async def _close(sender: Any, **kwargs: Any) -> None:
    """A clean stop closes what the service opened beside Faust: the watchdog's offset probe
    (else aiokafka logs "Unclosed AIOKafkaConsumer" at exit) and the NATS connection."""
    await dog.close()
    await runtime.close()


@app.task
async def _connect() -> None:
    """Connect NATS (and load the hub's config) as the worker starts, not on first use."""
    import signal

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _dump_tasks)
    await runtime.nats()


def _dump_tasks() -> None:
    """``kill -USR1 <pid>``: log what the consumer knows of each input partition (the stall
    watchdog's report), where every asyncio task is waiting (its await chain), and where the
    project's own coroutines that no task shows are waiting (an agent's, inside Faust's)."""
    log = logging.getLogger("execution.tasks")
    inputs = sorted(tp for tp in app.assignor.assigned_actives() if tp.topic in INPUTS)
    log.warning("consumer state: %s", watchdog.consumer_state(app, inputs))
    for task in asyncio.all_tasks():
        log.warning("task %s: %s", task.get_name(), " -> ".join(_await_chain(task.get_coro())))
    for obj in gc.get_objects():
        if isinstance(obj, (types.CoroutineType, types.AsyncGeneratorType)):
            frame = getattr(obj, "cr_frame", None) or getattr(obj, "ag_frame", None)
            if frame is not None and frame.f_code.co_filename.startswith(_OWN_CODE):
                log.warning("coroutine: %s", " -> ".join(_await_chain(obj)))


#: Where this project's modules live (the coroutines ``_dump_tasks`` reports besides tasks).
_OWN_CODE = tuple(str(Path(m.__file__).resolve().parent) + os.sep for m in (agents, app_pkg, tables_pkg))


def _await_chain(coro: Any, limit: int = 30) -> list[str]:
    """``file:line function`` of each coroutine ``coro`` awaits, down to what it waits on."""
    chain: list[str] = []
    while coro is not None and len(chain) < limit:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            chain.append(repr(coro)[:160])
            break
        chain.append(f"{frame.f_code.co_filename.rsplit('site-packages/', 1)[-1]}:{frame.f_lineno} {frame.f_code.co_name}")
        nxt = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None) or getattr(coro, "gi_yieldfrom", None)
        if nxt is None and "coro" in frame.f_locals and frame.f_locals["coro"] is not coro:
            nxt = frame.f_locals["coro"]  # a wrapper holding the coroutine it runs
        coro = nxt
    return chain
