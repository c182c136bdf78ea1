"""app/faust_patches.py (7): a stopping worker cancels what is left and closes its loop at
once, and the cancelled tasks still unwind (their ``finally`` runs) before the loop closes."""

from __future__ import annotations

import asyncio
import threading

from mode.worker import Worker

from app.faust_patches import install
from app.settings import Settings


def test_a_stopped_worker_cancels_leftover_tasks_lets_them_unwind_and_closes_the_loop():
    install(Settings())

    def run() -> None:
        loop = asyncio.new_event_loop()
        worker = Worker(loop=loop, override_logging=False, redirect_stdouts=False, daemon=False)
        unwound: list[str] = []

        async def leftover() -> None:  # a task nobody stopped: a client's reader, a timer
            try:
                await asyncio.sleep(3600)
            finally:
                await asyncio.sleep(0)  # unwinding may itself await
                unwound.append("leftover")

        loop.run_until_complete(asyncio.sleep(0))
        loop.create_task(leftover())
        worker._shutdown_loop()
        result.extend([unwound, loop.is_closed()])

    result: list = []
    t = threading.Thread(target=run, daemon=True)  # mode's worker owns the thread's loop
    t.start()
    t.join(30)
    assert not t.is_alive(), "the worker's shutdown hung on a task that never ends"
    assert result == [["leftover"], True]
