"""Retrying with exponential backoff, one schedule for the whole service.

:func:`until_done` awaits a step until it succeeds: for effects that must not be dropped while
a broker (Kafka, NATS, ClickHouse) is away, so the step must be safe to repeat.  Each failure
is logged once with the wait before the next try; ``stop`` (checked after each failure) gives
up and raises the last error, e.g. when the process is stopping.  Cancellation is never
retried.  It is a plain loop: it wraps every acknowledged send of the worker to Kafka (and the
bridge's to Kafka and JetStream), where tenacity's per-call machinery cost more than the
send's own bookkeeping.  :func:`delay` is the schedule; :func:`backoff` hands the same schedule to
tenacity's retry loops (status polling in ``app.execution_client``).  (The ClickHouse sink's
flush keeps its own doubling delay: while it waits it keeps polling the paused consumer to
stay in its group, so it is a loop, not a retried call.)
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tenacity import RetryCallState

T = TypeVar("T")
log = logging.getLogger(__name__)


def delay(attempt: int, initial: float, maximum: float) -> float:
    """The wait after failed attempt ``attempt`` (1-based): ``initial`` doubling, at most
    ``maximum`` and never below ``initial`` (tenacity's ``wait_exponential`` with those bounds)."""
    # 2.0 ** 1023 is the largest power a float holds: a long outage overflows to inf, not an error.
    return max(initial, min(maximum, initial * 2.0 ** min(attempt - 1, 1023)))


def backoff(initial: float, maximum: float) -> Callable[[RetryCallState], float]:
    """:func:`delay` as a tenacity ``wait``."""
    return lambda state: delay(state.attempt_number, initial, maximum)


async def until_done(
    what: str, step: Callable[[], Awaitable[T]], *, initial: float = 0.2, maximum: float = 5.0,
    stop: Callable[[], bool] | None = None, on_failure: Callable[[BaseException], Awaitable[Any] | Any] | None = None,
    logger: logging.Logger = log, level: int = logging.WARNING,
) -> T:
    """``await step()`` until it returns.  ``on_failure(exc)`` runs after each failure (a clean
    up, or telling an upstream the work is still in progress); ``stop()`` True gives up."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await step()
        except Exception as exc:  # CancelledError is a BaseException: never retried
            if stop is not None and stop():
                raise
            wait = delay(attempt, initial, maximum)
            logger.log(level, "%s (attempt %d: %s: %s); again in %.1fs", what, attempt, type(exc).__name__, exc, wait)
            if on_failure is not None:
                result = on_failure(exc)
                if inspect.isawaitable(result):
                    await result
        await asyncio.sleep(wait)
