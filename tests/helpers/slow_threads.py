"""``--slow-threads MIN-MAX``: every ``trio.to_thread.run_sync`` job first sleeps a random
MIN..MAX seconds of real time in its worker thread, as on a loaded machine.

The autojump clock jumps whenever every trio task waits, including while a worker thread is
busy, and ``wait_until``'s polling moves virtual time on by a few hundred seconds per real
second meanwhile.  A test whose virtual deadline (a ping timeout, ``fetch_timeout``, a
``fail_after``) can expire while a thread does work the test expects done in time fails under
this option (``python -m pytest --slow-threads 0.5-1.5 tests/test_liveness.py``), where a
quiet machine hides it.  Tests that replace the threads themselves (``synchronous_threads``,
``run_inline``) patch over it, as they should.  Not part of ``make test``: a way to look.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import pytest
import trio


def parse(value: str) -> tuple[float, float]:
    """``"0.5-1.5"`` -> (0.5, 1.5); ``"0.1"`` -> (0.1, 0.1)."""
    low, _, high = value.partition("-")
    try:
        bounds = float(low), float(high or low)
    except ValueError:
        bounds = (1.0, 0.0)
    if not 0 <= bounds[0] <= bounds[1]:
        raise pytest.UsageError(f"--slow-threads {value}: want MIN-MAX seconds, 0 <= MIN <= MAX")
    return bounds


def slow_run_sync(low: float, high: float) -> Callable[..., Any]:
    """``trio.to_thread.run_sync``, each job delayed ``low``..``high`` s in its thread."""
    run_sync = trio.to_thread.run_sync

    async def slowed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def late() -> Any:
            time.sleep(random.uniform(low, high))
            return fn(*args)

        return await run_sync(late, **kwargs)

    return slowed
