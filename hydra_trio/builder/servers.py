"""The runners a builder may connect to (``--server A:PORT,B:PORT``), and which one is next.

Several runners may share one database: one leads, the others stand by and answer a hello
with ``Reject`` code ``standby`` naming the leader (docs/protocol.md, "Several runners").  A
builder given their addresses tries them in turn, goes straight to the leader a standby
names, and backs off only when a whole round of addresses failed; with one address it
behaves as it always did (every failure backs off).
"""

from __future__ import annotations

import attrs

from hydra_trio import net


@attrs.define(eq=False)
class ServerList:
    addresses: tuple[net.HostPort, ...]
    index: int = 0
    #: failures since the last success or the last full round.
    misses: int = 0

    def __attrs_post_init__(self) -> None:
        if not self.addresses:
            raise ValueError("a builder needs at least one runner address")

    @property
    def current(self) -> net.HostPort:
        return self.addresses[self.index]

    def connected(self) -> None:
        """A session was established with ``current``."""
        self.misses = 0

    def failed(self, leader: str = "") -> bool:
        """``current`` failed or refused (a standby naming ``leader``, when it did): move on.
        Returns whether a whole round has failed, so the caller backs off before the next."""
        named = [i for i, a in enumerate(self.addresses) if str(a) == leader] if leader else []
        if named and named[0] != self.index:
            self.index = named[0]
        else:
            self.index = (self.index + 1) % len(self.addresses)
        self.misses += 1
        if self.misses >= len(self.addresses):
            self.misses = 0
            return True
        return False
