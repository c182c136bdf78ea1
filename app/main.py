"""The worker's Faust app: tables, agents and timers wired to the live runtime.

``execution worker`` runs it (``faust -A app.main worker`` works too).  Topics must exist
before the worker subscribes; ``execution worker`` creates them (:func:`app.topics.ensure_topics`).
"""

from __future__ import annotations

import asyncio
import logging

from agents import notify, orders, positions
from agents.common import Context
from app.faust_app import create_app
from app.runtime import Runtime
from app.settings import get_settings
from app.topics import TOPICS
from app import watchdog, web
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
notify.register(context)
web.register(app, runtime, tables)
INPUTS = [*orders.INPUTS, *positions.INPUTS, *notify.INPUTS]
watchdog.register(app, settings, INPUTS)


@app.task
async def _connect() -> None:
    """Connect NATS (and load the hub's config) as the worker starts, not on first use."""
    import signal

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _dump_tasks)
    await runtime.nats()


def _dump_tasks() -> None:
    """``kill -USR1 <pid>``: log what the consumer knows of each input partition (the stall
    watchdog's report) and where every asyncio task is waiting (its await chain)."""
    log = logging.getLogger("execution.tasks")
    inputs = sorted(tp for tp in app.assignor.assigned_actives() if tp.topic in INPUTS)
    log.warning("consumer state: %s", watchdog.consumer_state(app, inputs))
    for task in asyncio.all_tasks():
        chain, coro = [], task.get_coro()
        while coro is not None and len(chain) < 30:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                chain.append(f"{frame.f_code.co_filename.rsplit('site-packages/', 1)[-1]}:{frame.f_lineno} {frame.f_code.co_name}")
            nxt = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None) or getattr(coro, "gi_yieldfrom", None)
            if nxt is None and frame is not None and "coro" in frame.f_locals and frame.f_locals["coro"] is not coro:
                nxt = frame.f_locals["coro"]
            if nxt is not None and not hasattr(nxt, "cr_frame") and not hasattr(nxt, "ag_frame") and not hasattr(nxt, "gi_frame"):
                chain.append(repr(nxt)[:160])
                nxt = None
            coro = nxt
        log.warning("task %s: %s", task.get_name(), " -> ".join(chain))
    import gc
    import types

    for obj in gc.get_objects():
        if isinstance(obj, (types.CoroutineType, types.AsyncGeneratorType)):
            frame = getattr(obj, "cr_frame", None) or getattr(obj, "ag_frame", None)
            if frame is not None and ("/work/" in frame.f_code.co_filename or "agents/" in frame.f_code.co_filename):
                chain, coro = [], obj
                while coro is not None and len(chain) < 30:
                    fr = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None) or getattr(coro, "gi_frame", None)
                    if fr is None:
                        chain.append(repr(coro)[:120])
                        break
                    chain.append(f"{fr.f_code.co_filename.rsplit('site-packages/', 1)[-1]}:{fr.f_lineno} {fr.f_code.co_name}")
                    coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None) or getattr(coro, "gi_yieldfrom", None)
                log.warning("coroutine: %s", " -> ".join(chain))
