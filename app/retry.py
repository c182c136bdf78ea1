"""Retrying with exponential backoff, one way for the whole service (tenacity).

:func:`until_done` awaits a step until it succeeds: for effects that must not be dropped while
a broker (Kafka, NATS, ClickHouse) is away, so the step must be safe to repeat.  Each failure
is logged once with the wait before the next try; ``stop`` (checked after each failure) gives
up and raises the last error, e.g. when the process is stopping.  Cancellation is never
retried.  (The ClickHouse sink's flush keeps its own doubling delay: while it waits it keeps
polling the paused consumer to stay in its group, so it is a loop, not a retried call.)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_never, wait_exponential

T = TypeVar("T")
log = logging.getLogger(__name__)


def backoff(initial: float, maximum: float) -> wait_exponential:
    """``initial``, doubling at each failure, at most ``maximum`` seconds."""
    return wait_exponential(multiplier=initial, min=initial, max=maximum)


def _log_failure(what: str, logger: logging.Logger, level: int) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        logger.log(level, "%s (attempt %d: %s: %s); again in %.1fs",
                   what, state.attempt_number, type(exc).__name__, exc, wait)
    return before_sleep


async def until_done(
    what: str, step: Callable[[], Awaitable[T]], *, initial: float = 0.2, maximum: float = 5.0,
    stop: Callable[[], bool] | None = None, on_failure: Callable[[BaseException], Awaitable[Any] | Any] | None = None,
    logger: logging.Logger = log, level: int = logging.WARNING,
) -> T:
    """``await step()`` until it returns.  ``on_failure(exc)`` runs after each failure (a clean
    up, or telling an upstream the work is still in progress); ``stop()`` True gives up."""

    async def after_failure(state: RetryCallState) -> None:
        _log_failure(what, logger, level)(state)
        if on_failure is not None and state.outcome is not None:
            result = on_failure(state.outcome.exception())
            if isinstance(result, Awaitable):
                await result

    retrying = AsyncRetrying(
        wait=backoff(initial, maximum),
        retry=retry_if_exception_type(Exception),
        stop=(lambda _state: stop()) if stop is not None else stop_never,
        before_sleep=after_failure,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            result = await step()
    return result
