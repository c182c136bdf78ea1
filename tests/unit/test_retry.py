"""app.retry: the one retry-with-backoff of the service."""

from __future__ import annotations

import asyncio
import logging

import pytest

from app.retry import backoff, delay, until_done


async def test_retries_until_the_step_succeeds_logging_each_failure(caplog):
    calls, cleaned = [], []

    async def step() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError(f"down {len(calls)}")
        return "done"

    with caplog.at_level(logging.WARNING, logger="app.retry"):
        assert await until_done("kafka away", step, initial=0.001, maximum=0.002, on_failure=cleaned.append) == "done"
    assert len(calls) == 3 and [str(e) for e in cleaned] == ["down 1", "down 2"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("kafka away (attempt 1: ConnectionError: down 1); again in")


async def test_stop_gives_up_with_the_last_error():
    attempts = []

    async def step() -> None:
        attempts.append(1)
        raise TimeoutError(f"no answer {len(attempts)}")

    cleaned = []
    with pytest.raises(TimeoutError, match="no answer 3"):
        await until_done("x", step, initial=0.001, maximum=0.001, stop=lambda: len(attempts) >= 3,
                         on_failure=cleaned.append)
    assert len(attempts) == 3
    assert [str(e) for e in cleaned] == ["no answer 1", "no answer 2"], "the last failure is raised, not cleaned up"


async def test_an_awaitable_on_failure_is_awaited_before_the_next_try():
    order = []

    async def step() -> str:
        order.append("step")
        if len(order) < 2:
            raise ConnectionError("down")
        return "ok"

    async def on_failure(exc: BaseException) -> None:
        await asyncio.sleep(0)
        order.append("cleaned")

    assert await until_done("x", step, initial=0.001, on_failure=on_failure) == "ok"
    assert order == ["step", "cleaned", "step"]


async def test_cancellation_is_never_retried():
    attempts = []

    async def step() -> None:
        attempts.append(1)
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await until_done("x", step, initial=0.001)
    assert attempts == [1]


def tenacity_wait(wait, attempt: int) -> float:
    from tenacity import RetryCallState

    state = RetryCallState(None, None, (), {})
    state.attempt_number = attempt
    return wait(state)


def test_the_delay_doubles_from_initial_to_maximum_as_tenacity_wait_exponential_does():
    from tenacity import wait_exponential

    assert [delay(n, 0.2, 5.0) for n in range(1, 8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    for n in (1, 2, 3, 5, 6, 40, 2000):
        assert delay(n, 0.2, 5.0) == pytest.approx(tenacity_wait(wait_exponential(multiplier=0.2, min=0.2, max=5.0), n))
    assert delay(10**6, 0.2, 5.0) == 5.0  # hours of outage: no overflow
    for initial, maximum in ((1e-25, 5.0), (1.0, 0.5), (2.0, 1e308)):  # as tenacity: never below initial, reaches maximum
        expected = tenacity_wait(wait_exponential(multiplier=initial, min=initial, max=maximum), 2000)
        assert delay(2000, initial, maximum) == pytest.approx(expected), (initial, maximum)


def test_backoff_gives_tenacity_the_delay():
    assert [tenacity_wait(backoff(0.2, 5.0), n) for n in range(1, 8)] == [delay(n, 0.2, 5.0) for n in range(1, 8)]


async def test_each_failure_logs_the_wait_of_the_schedule(caplog):
    calls = []

    async def step() -> None:
        calls.append(1)
        if len(calls) < 4:
            raise OSError("away")

    with caplog.at_level(logging.WARNING, logger="app.retry"):
        await until_done("nats away", step, initial=0.001, maximum=0.002)
    assert [r.args[1] for r in caplog.records] == [1, 2, 3]
    assert [r.args[-1] for r in caplog.records] == [0.001, 0.002, 0.002]
