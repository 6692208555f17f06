"""The single writer of one builder connection, and the runner's keepalive to it.

Frames for the builder are posted without waiting (``post``) into a bounded memory channel;
``run``, the connection's one writer task, hands them to the socket in batches.  If a builder
stops reading until the channel is full, ``post`` says so and the session closes: it is not
keeping up, and nothing in the runner may wait on one builder.  An answer from the receive loop
(``reply``, a Pong) is written directly when nothing is queued or being written, else queued:
it never waits for another write.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs
import trio

from hydra_trio.net import FramedChannel
from hydra_trio.protocol.connection import ConnectionState
from hydra_trio.protocol.messages import Message, Pong

#: Frames queued for one builder before it counts as not keeping up.  Each Assign or Pong is
#: small; a builder this far behind is stuck, and waiting on it would stall the dispatcher.
OUTBOX_SIZE = 4096
#: Frames written per send_all when several are queued.
WRITE_BATCH = 64


@attrs.define(eq=False)
class Outbox:
    channel: FramedChannel
    #: when the last frame to the builder was handed to the socket (``trio.current_time``).
    last_sent: float = attrs.field(factory=trio.current_time)
    #: the sequence number of the last Ping received (the keepalive repeats it).
    last_ping_seq: int | None = None
    #: the keepalive's wait: its deadline follows ``last_sent`` (``_sent``), so the keepalive
    #: task wakes only when the builder has really been sent nothing for that long, not once
    #: per pong (2,000 builders would cost 2,000 task switches a second).
    _keepalive_wait: trio.CancelScope | None = attrs.field(default=None, init=False)
    _keepalive_silence: float = attrs.field(default=math.inf, init=False)
    #: frames posted and not yet taken by the writer (``statistics()`` would build an object
    #: per Pong just to read this).
    _queued: int = attrs.field(default=0, init=False)
    _send: trio.MemorySendChannel[Message] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[Message] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Message](OUTBOX_SIZE)

    @property
    def queued(self) -> int:
        """Frames posted and not yet taken by the writer."""
        return self._queued

    def post(self, message: Message) -> bool:
        """Queue ``message`` without waiting; False if the outbox is full."""
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            return False
        self._queued += 1
        return True

    async def reply(self, message: Message) -> bool:
        """Send an answer from the receive loop: directly when nothing is queued or being
        written (saving the writer task's scheduler pass on every Pong), else behind what is
        queued (False if the outbox is full).  Never waits for another write: a receive loop
        stuck behind a transfer crawling over a slow link would stop reading, and take the
        builder for silent."""
        if self.channel.connection.state is ConnectionState.CLOSED:
            return True  # the builder said goodbye in the same read as the frame answered here
        if self._queued or self.channel.writing:
            return self.post(message)
        await self.channel.send(message)
        self._sent()
        return True

    async def keepalive(self, interval: float, settling: Callable[[], int] = lambda: 0) -> None:
        """Send the builder a ``Pong`` of our own when we have sent it nothing for 1.5 of its
        ping intervals.  The builder's evidence that we are alive must not depend on its pings
        getting through: during an upload they wait behind its own data, and over a slow link
        with a deep queue the pong to a ping can come later than the builder's ping timeout.
        This direction is idle then, and the keepalive crosses it at once.  It repeats the
        last ping's sequence number, which the builder has already had answered, so it is not
        taken for a round trip.  It carries ``settling()``, the results received and not yet
        settled (``Pong.settling``), so that it never says "everything before was handled"
        while a result is still being committed.

        Only while the builder is heard from (a frame, or a frame's progress, within half a
        ping interval, as during an upload): a builder whose frames no longer reach us (cut
        off in one direction) must not be kept from noticing by keepalives crossing the
        other.  (With the window at 1.5 intervals, a keepalive sent 1.5 s after the builder's
        last frame delayed its detection of a builder -> runner cut to 4 s.)"""
        silence = self._keepalive_silence = 1.5 * interval  # 1 x: a pong on time is due then
        recent = 0.5 * interval
        conn = self.channel.connection
        while True:
            with trio.CancelScope(deadline=self.last_sent + silence) as self._keepalive_wait:
                await trio.sleep_forever()
            self._keepalive_wait = None
            now = trio.current_time()
            heard = now - conn.last_received < recent
            if heard and self.last_ping_seq is not None and not self._queued:
                self.post(Pong(seq=self.last_ping_seq, settling=settling()))
            self.last_sent = now

    def _sent(self) -> None:
        """A frame went out: the keepalive's wait starts again from now."""
        now = self.last_sent = trio.current_time()
        if self._keepalive_wait is not None:
            self._keepalive_wait.deadline = now + self._keepalive_silence

    async def run(self) -> None:
        """Write what is posted, in batches, until cancelled.  Raises ``ConnectionLost`` or
        ``ProtocolError`` if a write fails."""
        async for first in self._receive:
            batch = [first]
            while len(batch) < WRITE_BATCH:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            self._queued -= len(batch)
            if self.channel.connection.state is ConnectionState.CLOSED:
                continue  # the builder said goodbye: nothing more may be sent
            await self.channel.send_all(batch)
            self._sent()
