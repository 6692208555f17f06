"""A builder connection's results: checked and committed in order, off the receive loop.

A ``Result`` is fenced when it arrives (``submit``, on the receive loop): a current one takes
its attempt's uploads with it (``UploadReceiver.take``), a stale one is counted and dropped.
``run``, a task in the session's nursery, then settles them one at a time in the order they
arrived: the uploads are checked and kept (blocking work, in worker threads) and the result is
committed to the farm, or, for a successful Nix build, its outputs are imported into the
runner's store first (``import_and_commit``, beside, so later results need not wait).  After
each, uploads no result can commit any more are dropped.

Ordering, which moving this off the receive loop must not change:

- A frame about an attempt whose result is still being settled (a duplicate Result, a late
  log chunk) waits for it (``settled``), so it is judged against the committed result exactly
  as when the receive loop did the commit itself.
- A Ping is answered at once, its Pong saying how many results are still settling
  (``Pong.settling``, 1.6: liveness must not wait for a commit of 100,000 files); when some
  are, a second Pong with ``settling`` 0 is sent once the results before it are settled
  (``reply_after``): a builder that has that one has had everything it sent before the
  ping handled, as when the loop did it all in order.
- Nothing here is acknowledged to the builder: a committed result reaches the database through
  the persister like every other change, and a build's slot (the next Assign) is freed only by
  the commit.
- When the receive loop ends by itself (goodbye, EOF, a protocol error, silence), ``finish``
  settles what was received before the session detaches, so a drained builder's last result is
  never lost; a drained builder's Nix imports finish too.  Only a session closed by the runner
  (superseded, not reading) drops what is pending, as its builds are requeued anyway.
"""

from __future__ import annotations

import logging

import attrs
import trio

from hydra_trio.nixstore import label_path
from hydra_trio.protocol.messages import BuildStatus, Message, Result
from hydra_trio.runner import nix
from hydra_trio.runner.blobs import PendingUpload, Storage
from hydra_trio.runner.farm import Farm
from hydra_trio.runner.model import Build, Machine, Session
from hydra_trio.runner.uploads import UploadReceiver

log = logging.getLogger("hydra_trio.runner")

#: Results received and not yet settled, at most; the receive loop waits beyond (a builder
#: runs at most its job slots' worth of builds, so only a hostile one gets here).
MAX_PENDING = 64


@attrs.frozen
class _Settle:
    """A result to settle: the build it is current for (None: stale) and its uploads."""

    result: Result
    build: Build | None
    uploads: dict[str, PendingUpload]


#: What the queue holds: a result to settle, or an answer to post after the ones before it.
_Item = _Settle | Message


@attrs.define(eq=False)
class ResultCommitter:
    farm: Farm
    session: Session
    machine: Machine
    storage: Storage
    uploads: UploadReceiver
    #: the session's: settling and imports run there.
    nursery: trio.Nursery
    #: (build id, attempt) of the results received and not settled yet, with a count.
    _pending: dict[tuple[str, int], int] = attrs.field(factory=dict, init=False)
    _settled_event: trio.Event = attrs.field(factory=trio.Event, init=False)
    _settling: int = attrs.field(default=0, init=False)
    #: Nix results whose outputs are being imported into the runner's store.
    importing: int = attrs.field(default=0, init=False)
    _imports_changed: trio.Event = attrs.field(factory=trio.Event, init=False)
    _send: trio.MemorySendChannel[_Item] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[_Item] = attrs.field(init=False)
    _done: trio.Event = attrs.field(factory=trio.Event, init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[_Item](MAX_PENDING)

    async def submit(self, result: Result) -> None:
        """A Result frame arrived (on the receive loop): fence it and queue it."""
        ref = (result.build_id, result.attempt)
        build = self.farm.current(self.session, self.machine, *ref, kind="result")
        # Only a current result has its uploads checked and kept: one from another machine's
        # build or an old attempt is counted and dropped.
        uploads = self.uploads.take(*ref) if build is not None else {}
        if build is not None:
            result = self.uploads.full_listing(result)
        self._pending[ref] = self._pending.get(ref, 0) + 1
        self._settling += 1
        await self._send.send(_Settle(result, build, uploads))

    @property
    def settling(self) -> int:
        """Results received and not settled yet."""
        return self._settling

    async def reply_after(self, message: Message) -> bool:
        """Queue ``message`` to be posted once every result received before it is settled.
        False if none is pending: the caller answers at once."""
        if not self._pending:
            return False
        await self._send.send(message)
        return True

    async def settled(self, build_id: str, attempt: int) -> None:
        """Wait until no result of this attempt is waiting to be settled."""
        while (build_id, attempt) in self._pending:
            await self._settled_event.wait()

    async def run(self) -> None:
        """Settle the results in the order they arrived, until ``finish``."""
        try:
            async for item in self._receive:
                if not isinstance(item, _Settle):
                    self.session.post(item)
                    continue
                try:
                    await self._settle(item.result, item.build, item.uploads)
                finally:
                    self._forget((item.result.build_id, item.result.attempt))
        finally:
            self._done.set()

    def _forget(self, ref: tuple[str, int]) -> None:
        self._settling -= 1
        left = self._pending.pop(ref) - 1
        if left:
            self._pending[ref] = left
        self._settled_event.set()
        self._settled_event = trio.Event()

    async def _settle(
        self, result: Result, build: Build | None, uploads: dict[str, PendingUpload]
    ) -> None:
        if build is not None:
            result = await self.uploads.check(result, uploads)
            if build.spec.drv and result.status is BuildStatus.SUCCESS:
                self.nursery.start_soon(self.import_and_commit, build, result)
            else:
                self.farm.on_result(self.session, self.machine, result, trio.current_time())
        await self.uploads.drop_stale(self.machine)

    async def import_and_commit(self, build: Build, result: Result) -> None:
        """Import a Nix build's output closure into the runner's store, then commit its result
        (``upload-failed`` if the import failed).  The build stays running on its machine
        meanwhile: if the connection dies first, this is cancelled with it and the build is
        requeued as for any lost builder; a result no longer current is dropped by the farm."""
        self.importing += 1
        try:
            outputs = build.spec.drv_outputs
            storage = self.storage
            result = await nix.import_outputs(storage.nix, storage.blobs, outputs, result)
            # The uploaded files are exports of paths now in the runner's store: later
            # submissions that find those paths valid use them instead of exporting again.
            storage.nix_exports.update((label_path(f.path), f) for f in result.outputs)
            self.farm.on_result(self.session, self.machine, result, trio.current_time())
        finally:
            self.importing -= 1
            self._imports_changed.set()
            self._imports_changed = trio.Event()

    async def finish(self, *, imports: bool) -> None:
        """No more results will come: settle those received (and with ``imports``, wait for
        the Nix imports too).  The caller bounds the wait."""
        self._send.close()
        await self._done.wait()
        while imports and self.importing:
            await self._imports_changed.wait()
