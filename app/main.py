"""The worker's Faust app: tables, agents and timers wired to the live runtime.

``execution worker`` runs it (``faust -A app.main worker`` works too).  Topics must exist
before the worker subscribes; ``execution worker`` creates them (:func:`app.topics.ensure_topics`).
"""

from __future__ import annotations

from agents import notify, orders, positions
from agents.common import Context
from app.faust_app import create_app
from app.runtime import Runtime
from app.settings import get_settings
from app.topics import TOPICS
from app import web
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


@app.task
async def _connect() -> None:
    """Connect NATS (and load the hub's config) as the worker starts, not on first use."""
    await runtime.nats()


@app.on_before_shutdown.connect
async def _close(app_, **kwargs) -> None:  # noqa: ANN001
    await runtime.close()
