"""A fault-injecting TCP proxy: the chaos suite's network where namespaces are not permitted.

One process per builder link: it listens on 127.0.0.1 (port 0; it prints ``PORT <n>``), and
forwards every connection to ``--upstream``.  Commands arrive one per line on stdin and are
answered ``ok <command>`` on stdout once in effect:

- ``drop both|up|down``: a silent blackhole in that direction (``up`` is builder -> runner):
  the proxy keeps reading and discards, never closes, never resets, and never connects a new
  connection upstream while any direction is dropped.  The kernel on each side still ACKs
  every byte, so TCP keepalive and ``TCP_USER_TIMEOUT`` see a healthy link: only the
  application's pings can tell (stricter than a real blackhole).
- ``delay both|up|down SECONDS``: each chunk is forwarded that long after it arrived.
- ``loss both|up|down P``: emulated packet loss.  A byte stream cannot lose packets, so each
  chunk is, with probability P, "lost" and retransmitted as TCP would: after a retransmission
  timeout of max(0.2, round-trip delay + 0.2) s, doubling for each further loss (each again
  with probability P), with everything behind it waiting (head-of-line blocking).
- ``rate BYTES_PER_SECOND``: a token bucket in each direction (0: unlimited).
- ``heal``: drop, delay and loss are off again (the rate stays).

Connections that existed while a direction was dropped stay dead after ``heal`` (their bytes
are gone, as on a real link whose blackhole outlasted the peers' patience); new ones work.
The netns backend uses the kernel instead (iptables, tc); this proxy is only its fallback.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import random
import sys

import trio

CHUNK = 64 * 1024
#: Bytes a direction holds before the proxy stops reading (so TCP flow control pushes back on
#: the sender, as a router's short queue and the receiver's window would).  Without a bound,
#: a rate-limited upload would pile up megabytes here, and the pings behind them would wait
#: seconds: bufferbloat the kernel backend (tbf with a 256 KiB limit) does not have.
QUEUE_LIMIT = 256 * 1024


class Settings:
    def __init__(self) -> None:
        self.dropped: set[str] = set()
        self.delay = {"up": 0.0, "down": 0.0}
        self.loss = {"up": 0.0, "down": 0.0}
        self.rate = 0.0
        self.rng = random.Random()

    def lost_for(self, direction: str) -> float:
        """Extra seconds a chunk waits for its emulated retransmissions (usually 0)."""
        loss = self.loss[direction]
        extra, rto = 0.0, max(0.2, self.delay["up"] + self.delay["down"] + 0.2)
        while loss and self.rng.random() < loss:
            extra += rto
            rto *= 2
        return extra


async def pump(
    settings: Settings,
    direction: str,
    source: trio.SocketStream,
    sink: trio.SocketStream | None,
) -> None:
    """Forward ``source`` to ``sink`` under ``settings`` for ``direction``.  Once a byte of
    this direction was dropped, the direction is dead: a stream with a hole cannot go on."""
    dead = sink is None
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    queued = 0
    arrived = trio.Event()
    room = trio.Event()
    finished = False

    async def reader() -> None:
        nonlocal arrived, finished, dead, queued, room
        last_release = 0.0
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            while data := await source.receive_some(CHUNK):
                if direction in settings.dropped or dead:
                    dead = True
                    continue
                now = trio.current_time()
                wait = settings.delay[direction] + settings.lost_for(direction)
                release = max(now + wait, last_release)
                last_release = release
                queue.append((release, data))
                queued += len(data)
                arrived.set()
                while queued > QUEUE_LIMIT and not dead and direction not in settings.dropped:
                    room = trio.Event()
                    with trio.move_on_after(0.05):  # (re-checks for a blackhole switched on)
                        await room.wait()
        finished = True
        arrived.set()

    async def writer() -> None:
        nonlocal arrived, dead, queued
        assert sink is not None
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            while True:
                while not queue:
                    if finished:
                        if not dead:
                            await sink.send_eof()  # a FIN only while the link works
                        return
                    arrived = trio.Event()
                    await arrived.wait()
                release, data = queue.popleft()
                queued -= len(data)
                room.set()
                await trio.sleep_until(release)
                if direction in settings.dropped or dead:
                    dead = True
                    continue
                await sink.send_all(data)
                if settings.rate:
                    await trio.sleep(len(data) / settings.rate)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        if sink is not None:
            nursery.start_soon(writer)


async def serve(upstream_host: str, upstream_port: int) -> None:
    settings = Settings()
    #: every socket stays open (and referenced) until the proxy exits: a blackhole never
    #: closes anything.
    held: list[trio.SocketStream] = []

    async def handle(client: trio.SocketStream) -> None:
        held.append(client)
        upstream: trio.SocketStream | None = None
        if not settings.dropped:  # a SYN into a blackhole: nothing reaches the runner
            try:
                upstream = await trio.open_tcp_stream(upstream_host, upstream_port)
            except OSError:
                await client.aclose()
                return
            held.append(upstream)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, settings, "up", client, upstream)
            if upstream is not None:
                nursery.start_soon(pump, settings, "down", upstream, client)

    def apply(words: list[str]) -> None:
        if words[0] == "drop":
            settings.dropped |= {"up", "down"} if words[1] == "both" else {words[1]}
        elif words[0] in ("delay", "loss"):
            table = settings.delay if words[0] == "delay" else settings.loss
            for direction in ("up", "down") if words[1] == "both" else (words[1],):
                table[direction] = float(words[2])
        elif words[0] == "rate":
            settings.rate = float(words[1])
        elif words[0] == "heal":
            settings.dropped.clear()
            settings.delay = {"up": 0.0, "down": 0.0}
            settings.loss = {"up": 0.0, "down": 0.0}
        else:
            raise ValueError(words[0])

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())  # a helper script, not the daemon
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        print(f"PORT {port}", flush=True)
        buffer = b""
        while data := await stdin.receive_some(4096):
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                words = line.decode().split()
                if words:
                    apply(words)
                    print(f"ok {' '.join(words)}", flush=True)
        nursery.cancel_scope.cancel()  # stdin closed: the test is done with us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the queue runner")
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    # SIGINT is how the test stops every process it started: exit quietly.
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, host, int(port))


if __name__ == "__main__":
    main()
