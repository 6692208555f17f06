"""What outlives one connection of a builder: ``BuilderState``, and how sessions end.

A builder process holds one ``BuilderState`` across all its connections: its machine id, the
drain request, the executors it runs builds with, and a bounded record of what happened to
its connections (``events``, typed ``BuilderEvent``s, for tests and diagnostics).  How a
session ended is an ``Ended``: a ``SessionEnd`` to act on and the words that are logged.
"""

from __future__ import annotations

import enum
import functools
import random
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import trio

from hydra_trio.builder.attempt import Send
from hydra_trio.builder.buildusers import BuildUserPool
from hydra_trio.builder.config import BuilderConfig
from hydra_trio.builder.executor import execute
from hydra_trio.builder.inputs import Fetch
from hydra_trio.builder.nixexec import execute_nix
from hydra_trio.builder.servers import ServerList
from hydra_trio.builder.standby import Standby, for_builds
from hydra_trio.nixstore import NixStore
from hydra_trio.protocol.messages import Assign, Result

#: Runs one build (``executor.execute``'s signature).
Executor = Callable[[Assign, Path, Send, dict[str, str], Fetch], Awaitable[Result]]
#: Runs one Nix build in a store (``nixexec.execute_nix``'s signature).
NixExecutor = Callable[[NixStore, Assign, Path, Send, dict[str, str], Fetch], Awaitable[Result]]

#: Events kept in ``BuilderState.events`` at most (the oldest are dropped).
MAX_EVENTS = 1000


class SessionEnd(enum.Enum):
    """Why a connection attempt or a session ended."""

    #: no stream to the runner could be opened (refused, unreachable, timed out, TLS failed).
    CONNECT_FAILED = "connect-failed"
    #: the stream opened, but the hello exchange failed (lost, malformed, or too slow).
    HANDSHAKE_FAILED = "handshake-failed"
    #: the runner answered the hello with a ``Reject`` (a standby, bad credentials, ...).
    REJECTED = "rejected"
    #: the runner is a hot standby (``Reject`` code ``standby``): not a fault; the leader it
    #: names (``Ended.leader``) is tried next.
    STANDBY = "standby"
    #: the stream failed (EOF, reset, a send or receive error).
    CONNECTION_LOST = "connection-lost"
    #: the runner broke the protocol (a malformed frame, more fetch data than requested).
    PROTOCOL_ERROR = "protocol-error"
    #: no frame from the runner for the ping timeout: the keepalive watchdog fired.
    RUNNER_SILENT = "runner-silent"
    #: the runner said ``Goodbye``.
    GOODBYE = "goodbye"
    #: the runner said ``Goodbye`` because it stops on purpose (``runner-stopping``): not a
    #: fault, reconnect soon (to it, or to another runner of the list).
    RUNNER_STOPPING = "runner-stopping"
    #: this builder drained: its builds finished and it said ``Goodbye``.
    DRAINED = "drained"
    #: closed without a recorded reason.
    CLOSED = "closed"


@attrs.frozen
class Ended:
    """How a session ended: ``end`` to act on, ``reason`` in words (as logged)."""

    end: SessionEnd
    reason: str
    #: for ``STANDBY``: the leader's builder address the standby named ("" if none).
    leader: str = ""


class EventKind(enum.Enum):
    """What ``BuilderState.events`` records."""

    #: a stream to the runner was opened.
    CONNECTED = "connected"
    #: the keepalive watchdog fired (the session then ends as ``RUNNER_SILENT``).
    WATCHDOG = "watchdog"
    #: a connection attempt or session ended (``ended`` says how).
    DISCONNECTED = "disconnected"


@attrs.frozen
class BuilderEvent:
    """One event of a builder's connections, at ``time`` (``trio.current_time()``)."""

    time: float
    kind: EventKind
    #: for ``DISCONNECTED``: how the attempt or session ended.
    ended: Ended | None = None

    @property
    def end(self) -> SessionEnd | None:
        """For ``DISCONNECTED``: how it ended (None for other events)."""
        return self.ended.end if self.ended is not None else None

    @property
    def reason(self) -> str:
        """Why it disconnected ("" for other events)."""
        return self.ended.reason if self.ended is not None else ""


@attrs.define(eq=False)
class BuilderState:
    """What survives between sessions of one builder process."""

    config: BuilderConfig
    machine_id: str
    #: this process's ``Hello.instance``: the runner tells it from another builder that has
    #: the same machine id (a copied work dir).
    instance: str = attrs.field(factory=lambda: uuid.uuid4().hex)
    rng: random.Random = attrs.field(factory=random.Random)
    #: set by SIGTERM or an operator's drain: finish running builds, then say goodbye.
    draining: bool = False
    drain_event: trio.Event = attrs.field(factory=trio.Event)
    sessions: int = 0
    #: what happened to the connections, oldest first; bounded by ``MAX_EVENTS``.
    events: list[BuilderEvent] = attrs.field(factory=list)
    #: whether the warning about a ping interval too long for the runner was logged.
    warned_ping_interval: bool = False
    #: runs one build (replaceable by embedders and tests).
    execute: Executor = execute
    #: runs one Nix build (``Assign.drv``) in a store (replaceable by embedders and tests).
    execute_nix: NixExecutor = execute_nix
    #: the store the ``nix`` executor builds in; None: from ``config.nix_store``.
    nix_store: NixStore | None = None
    #: when (``trio.current_time()``) a runner last said it is stopping, until a session is
    #: established again (see ``session._next_delay``).
    runner_stopped_at: float | None = None
    #: the runners to connect to (``config.addresses``), and the one tried next.
    servers: ServerList = attrs.field(init=False)
    #: the build users not running a build (``config.build_users``), or None.
    build_users: BuildUserPool | None = attrs.field(init=False)
    #: shells standing by for the next builds (``standby``; filled by ``run_builder``), or
    #: None: builds have no cgroups here, or run as build users.
    standby: Standby | None = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.servers = ServerList(self.config.addresses)
        users = self.config.build_users
        self.build_users = BuildUserPool(users) if users is not None else None
        self.standby = None
        if self.execute is execute:
            if self.config.sandbox is not None:
                self.execute = functools.partial(self.execute, sandbox=self.config.sandbox)
            if self.build_users is not None:
                self.execute = functools.partial(self.execute, users=self.build_users)
            else:
                builds = self.config.work_dir.absolute() / "builds"
                sandboxed = self.config.sandbox is not None
                self.standby = for_builds(builds, self.config.max_jobs, sandboxed=sandboxed)
                if self.standby is not None:
                    self.execute = functools.partial(self.execute, standby=self.standby)

    def record(self, kind: EventKind, ended: Ended | None = None) -> None:
        self.events.append(BuilderEvent(trio.current_time(), kind, ended))
        del self.events[:-MAX_EVENTS]

    def request_drain(self) -> None:
        self.draining = True
        self.drain_event.set()
