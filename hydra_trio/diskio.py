"""Writing received file data to disk and hashing it, off the event loop.

A transfer's receiving side both writes and hashes every byte (the runner an upload, a builder
a fetched input).  Both are slow next to a loopback socket: sha256 runs at ~1.5 GB/s, and a
write into pages the kernel has to find first (a fresh virtual machine's memory) can be slower
still.  ``write_and_hash`` runs the two in two worker threads at the same time (both release
the GIL), so a batch costs the slower of the two instead of their sum.  Batches too small for
a second thread hop to pay off do both in one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

#: Batches smaller than this are written and hashed in one thread hop.
PARALLEL_MIN = 256 * 1024


async def write_and_hash(
    size: int,
    write: Callable[[], None],
    hash_: Callable[[], None],
    both: Callable[[], None],
) -> None:
    """Call ``write`` and ``hash_`` in two worker threads at the same time (or ``both`` in one,
    for a batch of fewer than ``PARALLEL_MIN`` bytes).  An exception from ``write`` is raised
    as it is (not in an ``ExceptionGroup``), once the hashing is over too."""
    if size < PARALLEL_MIN:
        await trio.to_thread.run_sync(both)
        return
    await beside(lambda: trio.to_thread.run_sync(write), lambda: trio.to_thread.run_sync(hash_))


async def beside(
    main: Callable[[], Awaitable[object]], background: Callable[[], Awaitable[object]]
) -> None:
    """Run ``main`` with ``background`` running beside it (a reader ahead of a sender, a
    writer behind a receiver); return when both are done.  An exception from ``main``
    cancels ``background`` and is raised as it is, not in an ``ExceptionGroup``, so callers
    catch it as they would from ``main`` alone.  ``background`` reports its own failures
    (as the transfers do, through a list the caller checks)."""
    failed: list[Exception] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(background)
        try:
            await main()
        except Exception as exc:
            failed.append(exc)
            nursery.cancel_scope.cancel()
    if failed:
        raise failed[0]
