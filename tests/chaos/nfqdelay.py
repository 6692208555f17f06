"""Delay every packet of some netfilter queues by a fixed time: netem's ``delay`` without netem.

The chaos suite's kernels may lack ``sch_netem`` (this one does), but have ``NFQUEUE``: an
iptables rule ``-j NFQUEUE --queue-num N`` hands each matching packet to the process bound to
queue N, and the kernel holds the packet until that process gives a verdict.  This script binds
the queues named on its command line, in the network namespace it runs in (run it with ``ip
netns exec``), and accepts each packet ``--delay`` seconds after it arrived.  The packets stay
in the kernel; the TCP stacks at both ends see a real round-trip time, retransmit on real
timers, and see the losses of an ``-m statistic`` rule in front of the queue as real losses.

Every packet of a queue is held for the same time, so they leave in the order they came:
one batch verdict (``NFQNL_MSG_VERDICT_BATCH``, "accept every id up to this one") releases all
that are due.  Only metadata is copied to user space (``NFQNL_COPY_META``).

Usage (as root, in the namespace whose packets are queued)::

    python nfqdelay.py --delay 0.2 0 1

It prints ``READY`` once bound, and runs until SIGINT or SIGTERM.  Rules should use
``--queue-bypass``, so packets pass undelayed (rather than being dropped) when it is not
running.  No dependencies: netlink by hand, with ``struct``.
"""

from __future__ import annotations

import argparse
import collections
import errno
import os
import selectors
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
#: Packets a queue may hold: at 200 ms this absorbs 40,000 packets/s.
QUEUE_MAXLEN = 8192


def _attr(kind: int, payload: bytes) -> bytes:
    header = struct.pack("=HH", 4 + len(payload), kind)
    return header + payload + b"\0" * (-len(payload) % 4)


def _message(kind: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST) -> bytes:
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue) + attrs
    return (
        struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, 0, 0) + body
    )


def _attrs(data: bytes) -> dict[int, bytes]:
    found = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        found[kind & 0x7FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return found


def _check_ack(sock: socket.socket) -> None:
    reply = sock.recv(65536)
    _length, kind = struct.unpack_from("=IH", reply)
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", reply, 16)
        if code:
            raise OSError(-code, f"nfqueue config: {os.strerror(-code)}")


def bind(queues: list[int]) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, 8 * 1024 * 1024)  # SO_RCVBUFFORCE (root)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sock.bind((0, 0))
    for queue in queues:
        command = struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET)
        sock.send(_message(NFQNL_MSG_CONFIG, queue, _attr(NFQA_CFG_CMD, command), 5))
        _check_ack(sock)
        params = struct.pack("!IB", 0, NFQNL_COPY_META)
        maxlen = struct.pack("!I", QUEUE_MAXLEN)
        config = _attr(NFQA_CFG_PARAMS, params) + _attr(NFQA_CFG_QUEUE_MAXLEN, maxlen)
        sock.send(_message(NFQNL_MSG_CONFIG, queue, config, 5))
        _check_ack(sock)
    return sock


def run(delay: float, queues: list[int]) -> None:
    sock = bind(queues)
    sock.setblocking(False)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    held: dict[int, collections.deque[tuple[float, int]]] = {q: collections.deque() for q in queues}
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    print("READY", flush=True)
    overruns = 0
    while not stop:
        now = time.monotonic()
        due = [q for q, packets in held.items() if packets and packets[0][0] <= now]
        for queue in due:
            packets = held[queue]
            last = None
            while packets and packets[0][0] <= now:
                last = packets.popleft()[1]
            verdict = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, last))
            sock.send(_message(NFQNL_MSG_VERDICT_BATCH, queue, verdict))
        heads = [packets[0][0] for packets in held.values() if packets]
        timeout = max(0.0, min(heads) - time.monotonic()) if heads else 0.5
        if not selector.select(timeout):
            continue
        while True:
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped some: they were lost
                    overruns += 1
                    continue
                raise
            arrived = time.monotonic()
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if length < 16:
                    break
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    (queue,) = struct.unpack_from("!H", data, offset + 18)
                    header = _attrs(data[offset + 20 : offset + length]).get(NFQA_PACKET_HDR)
                    if header is not None and queue in held:
                        (packet_id,) = struct.unpack_from("!I", header)
                        held[queue].append((arrived + delay, packet_id))
                offset += (length + 3) & ~3
    for queue, packets in held.items():  # let what is held go (the rules may be gone)
        if packets:
            verdict = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packets[-1][1]))
            sock.send(_message(NFQNL_MSG_VERDICT_BATCH, queue, verdict))
    if overruns:
        print(f"receive buffer overruns: {overruns}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--delay", type=float, required=True, help="seconds each packet waits")
    parser.add_argument("queues", type=int, nargs="+", help="netfilter queue numbers")
    args = parser.parse_args()
    run(args.delay, args.queues)


if __name__ == "__main__":
    main()
