"""Each builder's link to the queue runner, and the faults the chaos suite puts on it.

Two backends give every link the same methods (``blackhole``, ``heal``, ``link_down``,
``lossy``, ``rate``):

- ``netns`` (the real one): each builder runs in its own network namespace
  (``ip netns exec``), joined to the runner's by a veth pair on its own /30.  Faults are the
  kernel's: ``iptables -j DROP`` on the namespace's INPUT (runner -> builder) and/or OUTPUT
  (builder -> runner) chain for a silent blackhole; ``-m statistic --mode random
  --probability P -j DROP`` for random loss; delay through ``-j NFQUEUE`` and ``nfqdelay.py``
  (netem where the kernel has it is not needed: the queue holds the packets in the kernel, so
  TCP sees a real round trip); ``tc ... tbf`` rate limits; ``ip link set ... down``.  The rules
  live in the builder's namespace only, so nothing on the host (and nothing another test or
  engineer runs there) is ever touched.
- ``proxy`` (the fallback where namespaces are not permitted): each builder dials the runner
  through its own ``faultproxy.py`` process on loopback, which discards, delays, emulates loss
  and rate-limits in user space (see its docstring for how faithful that is).

Names: every namespace and interface starts with ``htc-`` and a token unique to this pytest
process; ``NetnsNetwork.close`` deletes every one it created, and ``cleanup_leftovers``
deletes any of this process's that a crash left behind.
"""

from __future__ import annotations

import enum
import functools
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import attrs
import trio

HERE = Path(__file__).parent
#: Unique to this pytest process: every namespace and interface name starts with it.
TOKEN = f"htc-{os.getpid() % 0xFFFF:04x}"
#: Seconds any one ip/iptables/tc command may take.
COMMAND_TIMEOUT = 20.0


class Direction(enum.Enum):
    """Which way a fault applies, seen from the runner."""

    #: runner -> builder and builder -> runner.
    BOTH = "both"
    #: runner -> builder only (the builder's INPUT chain; the proxy's "down").
    TO_BUILDER = "to-builder"
    #: builder -> runner only (the builder's OUTPUT chain; the proxy's "up").
    TO_RUNNER = "to-runner"


class CommandError(Exception):
    """A network set-up command failed; the message has its stderr."""


async def run(*argv: str, stdin: bytes = b"") -> str:
    """Run one command (bounded), return its stdout; raise ``CommandError`` if it fails."""
    with trio.fail_after(COMMAND_TIMEOUT):
        done = await trio.run_process(
            list(argv), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )
    if done.returncode != 0:
        raise CommandError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.decode()}")
    return done.stdout.decode()


def run_sync(*argv: str) -> subprocess.CompletedProcess[str]:
    """For probes and last-resort cleanup outside the event loop (conftest)."""
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )


#: Starts a helper process under the test's farm: (name, argv) -> a handle with ``log()``.
Spawn = Callable[[str, list[str]], Awaitable["Helper"]]


class Helper(Protocol):
    def log(self) -> str: ...


class Link(Protocol):
    """One builder's path to the runner."""

    name: str

    @property
    def server(self) -> str:
        """The HOST:PORT the builder dials."""

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` as run on the builder's side of the link."""

    async def blackhole(self, direction: Direction) -> None:
        """Drop every packet in ``direction``: no RST, no FIN, no ICMP."""

    async def heal(self) -> None:
        """Undo ``blackhole``, ``link_down`` and ``lossy`` (a rate limit stays)."""

    async def link_down(self) -> None:
        """Take the link down (the runner's end of it)."""

    async def lossy(self, probability: float, delay: float, direction: Direction) -> None:
        """Lose each packet going ``direction`` with ``probability`` and delay the rest by
        ``delay`` seconds (``Direction.TO_RUNNER`` is what netem on the builder's interface
        would do)."""

    async def rate(self, bytes_per_second: int) -> None:
        """Limit each direction to ``bytes_per_second``."""


def describe(backend: str, fault: str) -> str:
    """How ``fault`` is injected on ``backend`` (for the report)."""
    if backend == "proxy":
        return {
            "blackhole": "fault proxy: discard bytes (kernel still ACKs)",
            "link-down": "fault proxy: discard bytes both ways",
            "lossy": "fault proxy: emulated loss (RTO backoff) + delay",
        }.get(fault, fault)
    return {
        "blackhole": f"{IPTABLES} -j DROP in the builder's netns",
        "link-down": "ip link set <runner-side veth> down",
        "lossy": f"{IPTABLES} -m statistic -j DROP + NFQUEUE delay (nfqdelay.py)",
    }.get(fault, fault)


# ---------------------------------------------------------------------------------------------
# The kernel: namespaces, veth pairs, iptables, tc.


def _pick_iptables() -> str:
    """``iptables`` (whichever backend it links to), else ``iptables-legacy``."""
    for name in ("iptables", "iptables-nft", "iptables-legacy"):
        if shutil.which(name):
            return name
    return "iptables"


IPTABLES = _pick_iptables()


def netns_problem() -> str | None:
    """None if this process may create namespaces, veth pairs and iptables rules in them;
    else why not (one line).  Creates and deletes one probe namespace."""
    for tool in ("ip", "tc", IPTABLES):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/system-deps.sh installs it as root)"
    ns, veth = f"{TOKEN}-probe", f"{TOKEN}-p"
    try:
        for argv in (
            ["ip", "netns", "add", ns],
            ["ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}x", "netns", ns],
        ):
            done = run_sync(*argv)
            if done.returncode != 0:
                return f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.returncode}"
        done = _restore_probe(ns)
        if done.returncode != 0:
            return f"{IPTABLES}-restore in a namespace failed: {done.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run ip: {exc}"
    finally:
        run_sync("ip", "link", "del", veth)
        run_sync("ip", "netns", "del", ns)
    return None


def _restore_probe(ns: str) -> subprocess.CompletedProcess[str]:
    rules = _ruleset(["-A INPUT -i lo -m statistic --mode random --probability 0.5 -j DROP"])
    return subprocess.run(
        ["ip", "netns", "exec", ns, IPTABLES + "-restore", "-w"],
        input=rules.decode(),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def cleanup_leftovers() -> list[str]:
    """Delete every namespace and link of this process (``TOKEN``); returns what it found."""
    found = []
    for line in run_sync("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(TOKEN):
            found.append(name)
            run_sync("ip", "netns", "del", name)
    for line in run_sync("ip", "-o", "link", "show").stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if name.startswith(TOKEN):
                found.append(name)
                run_sync("ip", "link", "del", name)
    return found


def _ruleset(rules: list[str]) -> bytes:
    """A whole filter table for ``iptables-restore`` (which swaps it in atomically)."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    return ("\n".join([*lines, *rules, "COMMIT", ""])).encode()


@attrs.define(eq=False)
class NetnsLink:
    """A builder's namespace and the veth pair joining it to the runner's."""

    name: str
    netns: str
    host_if: str
    ns_if: str
    host_ip: str
    port: int
    spawn: Spawn
    delayer: Helper | None = None

    @property
    def server(self) -> str:
        return f"{self.host_ip}:{self.port}"

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    async def _rules(self, rules: list[str]) -> None:
        await run(*self.command([IPTABLES + "-restore", "-w"]), stdin=_ruleset(rules))

    async def blackhole(self, direction: Direction) -> None:
        rules = []
        if direction is not Direction.TO_RUNNER:
            rules.append(f"-A INPUT -i {self.ns_if} -j DROP")
        if direction is not Direction.TO_BUILDER:
            rules.append(f"-A OUTPUT -o {self.ns_if} -j DROP")
        await self._rules(rules)

    async def heal(self) -> None:
        await self._rules([])
        await run("ip", "link", "set", "dev", self.host_if, "up")

    async def link_down(self) -> None:
        await run("ip", "link", "set", "dev", self.host_if, "down")

    async def lossy(self, probability: float, delay: float, direction: Direction) -> None:
        if self.delayer is None:
            nfqdelay = [sys.executable, str(HERE / "nfqdelay.py"), f"--delay={delay}", "0", "1"]
            self.delayer = await self.spawn(f"{self.name}-nfqdelay", self.command(nfqdelay))
            with trio.fail_after(10):
                while "READY" not in self.delayer.log():
                    await trio.sleep(0.02)
        drop = f"-m statistic --mode random --probability {probability} -j DROP"
        rules = []
        if direction is not Direction.TO_RUNNER:
            rules.append(f"-A INPUT -i {self.ns_if} {drop}")
            rules.append(f"-A INPUT -i {self.ns_if} -j NFQUEUE --queue-num 1 --queue-bypass")
        if direction is not Direction.TO_BUILDER:
            rules.append(f"-A OUTPUT -o {self.ns_if} {drop}")
            rules.append(f"-A OUTPUT -o {self.ns_if} -j NFQUEUE --queue-num 0 --queue-bypass")
        await self._rules(rules)

    async def rate(self, bytes_per_second: int) -> None:
        # tbf on each end's egress: the runner's end shapes runner -> builder, the
        # namespace's end builder -> runner.  The queue is short (limit) so a rate limit
        # does not become a multi-second buffer in front of the pings.
        tbf = ["root", "tbf", "rate", f"{bytes_per_second * 8}bit", "burst", "64kb"]
        tbf += ["limit", "256kb"]
        await run("tc", "qdisc", "replace", "dev", self.host_if, *tbf)
        await run("tc", "-n", self.netns, "qdisc", "replace", "dev", self.ns_if, *tbf)


@attrs.define(eq=False)
class NetnsNetwork:
    """Creates one namespace per builder; ``close`` deletes them all."""

    port: int
    spawn: Spawn
    subnet: int = attrs.field(factory=lambda: random.randrange(192, 255))
    links: list[NetnsLink] = attrs.field(factory=list)
    backend: str = "netns"

    async def add_link(self, name: str) -> NetnsLink:
        index = len(self.links) + 1
        netns = f"{TOKEN}-{index}"
        host_if, ns_if = f"{TOKEN}-h{index}", f"{TOKEN}-n{index}"
        host_ip, ns_ip = f"10.{self.subnet}.{index}.1", f"10.{self.subnet}.{index}.2"
        link = NetnsLink(
            name=name,
            netns=netns,
            host_if=host_if,
            ns_if=ns_if,
            host_ip=host_ip,
            port=self.port,
            spawn=self.spawn,
        )
        self.links.append(link)  # from here on, close() deletes it whatever fails below
        await run("ip", "netns", "add", netns)
        await run(
            "ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", netns
        )
        await run("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
        await run("ip", "link", "set", "dev", host_if, "up")
        await run("ip", "-n", netns, "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        await run("ip", "-n", netns, "link", "set", "dev", ns_if, "up")
        await run("ip", "-n", netns, "link", "set", "dev", "lo", "up")
        return link

    async def close(self) -> None:
        """Delete every namespace and veth pair (shielded: also when the test failed)."""
        with trio.CancelScope(shield=True):
            for link in self.links:
                for argv in (
                    ("ip", "link", "del", link.host_if),
                    ("ip", "netns", "del", link.netns),
                ):
                    try:
                        await run(*argv)
                    except (CommandError, trio.TooSlowError) as exc:
                        if "Cannot find" not in str(exc) and "No such" not in str(exc):
                            print(f"cleanup: {exc}")


def free_subnet() -> int:
    """A 10.X.0.0/16 no local address is in (X in 192..254)."""
    used = run_sync("ip", "-4", "-o", "addr", "show").stdout
    candidates = [x for x in range(192, 255) if f" 10.{x}." not in used]
    return random.choice(candidates)


# ---------------------------------------------------------------------------------------------
# The fallback: a fault proxy process per link.


@attrs.define(eq=False)
class ProxyLink:
    name: str
    server: str
    process: trio.Process
    _buffer: bytes = b""

    def command(self, argv: list[str]) -> list[str]:
        return argv

    async def _command(self, line: str) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        await self.process.stdin.send_all(line.encode() + b"\n")
        with trio.fail_after(5):
            while f"ok {line}".encode() not in self._buffer:
                self._buffer += await self.process.stdout.receive_some(4096)
        self._buffer = b""

    async def blackhole(self, direction: Direction) -> None:
        which = {Direction.BOTH: "both", Direction.TO_BUILDER: "down", Direction.TO_RUNNER: "up"}
        await self._command(f"drop {which[direction]}")

    async def heal(self) -> None:
        await self._command("heal")

    async def link_down(self) -> None:
        await self._command("drop both")

    async def lossy(self, probability: float, delay: float, direction: Direction) -> None:
        which = {Direction.BOTH: "both", Direction.TO_BUILDER: "down", Direction.TO_RUNNER: "up"}
        await self._command(f"delay {which[direction]} {delay}")
        await self._command(f"loss {which[direction]} {probability}")

    async def rate(self, bytes_per_second: int) -> None:
        await self._command(f"rate {bytes_per_second}")


@attrs.define(eq=False)
class ProxyNetwork:
    port: int
    nursery: trio.Nursery
    log_dir: Path
    stop: Callable[[trio.Process], Awaitable[None]]
    links: list[ProxyLink] = attrs.field(factory=list)
    backend: str = "proxy"

    async def add_link(self, name: str) -> ProxyLink:
        with (self.log_dir / f"{name}-proxy.log").open("ab") as log_file:
            process: trio.Process = await self.nursery.start(
                functools.partial(
                    trio.run_process,
                    [
                        sys.executable,
                        str(HERE / "faultproxy.py"),
                        f"--upstream=127.0.0.1:{self.port}",
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log_file,
                    check=False,
                    deliver_cancel=self.stop,
                )
            )
        assert process.stdout is not None
        buffer = b""
        with trio.fail_after(20):
            while b"\n" not in buffer:
                buffer += await process.stdout.receive_some(4096)
        first = buffer.decode().split("\n")[0]
        assert first.startswith("PORT "), first
        link = ProxyLink(name=name, server=f"127.0.0.1:{first.split()[1]}", process=process)
        self.links.append(link)
        return link

    async def close(self) -> None:
        pass  # the proxies are in the farm's nursery, stopped with it
