"""What every agent shares: the context it runs in, acknowledged output, dead letters.

Ordering rule of every agent, which is what makes at-least-once safe: compute the effect
with the pure logic, **send every output and wait for the broker's acks, then write the
table**.  A crash before the table write replays the input, recomputes the same records
(deterministic ids) and sends them again; consumers dedupe.  A crash after it replays an
input the table already reflects, which the logic recognises as a duplicate.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import faust

from app.runtime import Runtime
from tables.definitions import Tables

log = logging.getLogger(__name__)


class BadInput(ValueError):
    """A record that can never be processed: it goes to a dead-letter topic with the reason."""


@dataclass
class Context:
    app: faust.App
    rt: Runtime
    tables: Tables
    topics: dict[str, faust.TopicT]

    def topic(self, name: str) -> faust.TopicT:
        return self.topics[name]


Out = tuple[str, str, bytes, dict[str, bytes] | None]  # (topic, key, value, headers)


async def send_all(ctx: Context, records: list[Out]) -> None:
    """Send records and wait until the broker acknowledged every one."""
    futures = []
    for topic, key, value, headers in records:
        fut = await ctx.topic(topic).send(
            key=key.encode() if isinstance(key, str) else key, value=value, headers=headers, force=True
        )
        futures.append(fut)
    if futures:
        await asyncio.gather(*futures)


def dead_letter(dlq: str, event: faust.EventT, reason: str) -> Out:
    """The original bytes, with where they came from and why they are dead."""
    msg = event.message
    headers = {
        "reason": reason.encode()[:4000],
        "topic": msg.topic.encode(),
        "partition": str(msg.partition).encode(),
        "offset": str(msg.offset).encode(),
    }
    key = msg.key if msg.key is not None else b""
    return (dlq, key, msg.value if isinstance(msg.value, bytes) else bytes(msg.value or b""), headers)


async def process_safely(
    ctx: Context, event: faust.EventT, handler: Any, dlq: str, what: str, attempts: int | None = 8
) -> None:
    """Run ``handler(event)``; bad input and repeated internal errors go to ``dlq``.

    Transient failures (Kafka or NATS unavailable) are retried with backoff: the event is
    not given up while the failure might pass.  After ``attempts`` failures of the same
    event it is dead-lettered with the error, so one poison record never stops a worker;
    ``attempts=None`` retries for ever (an output that must not be skipped).
    """
    delay, attempt = 0.2, 0
    while True:
        attempt += 1
        try:
            await handler(event)
            return
        except BadInput as exc:
            ctx.rt.metrics.inc("dead_letters", topic=dlq)
            log.warning("%s: dead letter (%s)", what, exc)
            await send_all(ctx, [dead_letter(dlq, event, str(exc))])
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if attempt == attempts:
                log.exception("%s: giving up on %s:%s@%s", what, event.message.topic, event.message.partition, event.message.offset)
                ctx.rt.metrics.inc("dead_letters", topic=dlq)
                await send_all(ctx, [dead_letter(dlq, event, f"internal error: {type(exc).__name__}: {exc}")])
                return
            log.warning("%s: attempt %s failed (%s: %s); retrying in %.1fs", what, attempt, type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
