"""``app.local.reap_orphans``: what a SIGKILLed test run left behind is stopped by the next;
processes of a runner still alive are not touched."""

from __future__ import annotations

import os
import subprocess
import time

from app.local import OWNER_ENV, reap_orphans


def spawn_sleeper(owner: int) -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"], env={**os.environ, OWNER_ENV: str(owner)}, start_new_session=True)


def test_children_of_an_ended_runner_are_killed_and_those_of_a_live_one_kept():
    gone = subprocess.Popen(["true"])
    gone.wait()  # a runner that has ended (its pid is not reused within the test)
    orphan, kept = spawn_sleeper(gone.pid), spawn_sleeper(os.getpid())
    try:
        killed = reap_orphans()
        assert orphan.pid in killed and kept.pid not in killed
        assert orphan.wait(5) == -9
        time.sleep(0.1)
        assert kept.poll() is None
    finally:
        for p in (orphan, kept):
            p.kill()
            p.wait(5)
