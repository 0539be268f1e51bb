"""
Idle connections and start-up: what 10,000 idle SMTP clients cost mailfw
in memory, against Twisted's stock ESMTP server keeping nothing, and how
long C{twistd mailfw} takes from its start to its first greeting.

Usage (from the repository; root raises the descriptor limit)::

    python benchmarks/idle.py [--connections 10000] [--starts 5]

For each server: start it (one process, C{--workers 1}), read its
resident set size (C{VmRSS}) once it greets, open the connections one
after the other and read each one's greeting (so the server has built the
session), wait a second, read the resident set again; the difference
divided by the connections is the cost of one idle connection.  The
start-up time is measured C{--starts} times by L{startup.measure} (the
accept benchmark's configuration, for one and two workers; C{startup.py}
alone measures more).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import startup
from accept import (
    DOMAIN,
    MAILFW_CONFIG,
    SQLITE_QUEUE,
    BenchmarkError,
    MailfwServer,
    TwistedSinkServer,
    freePort,
)

IDLE_CONFIG = MAILFW_CONFIG.format(domain=DOMAIN, queue=SQLITE_QUEUE) + "max_connections = 50000\n"


def rss(pid: int) -> int:
    """
    The resident set size of one process, in bytes.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchmarkError(f"no VmRSS for {pid}")


def raiseDescriptorLimit(needed: int) -> None:
    """
    Allow this process (and the servers it starts, each on its own)
    C{needed} descriptors, as far as the hard limit allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


def openIdle(port: int, count: int, timeout: float = 30) -> list[socket.socket]:
    """
    C{count} connections to C{port}, each having read its greeting.
    """
    sockets = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            sockets.append(s)
            greeting = s.recv(512)
            if not greeting.startswith(b"220"):
                raise BenchmarkError(f"connection {len(sockets)} got {greeting[:80]!r}")
    except BaseException:
        for s in sockets:
            s.close()
        raise
    return sockets


@dataclass
class IdleResult:
    server: str
    connections: int
    before: int
    after: int

    @property
    def perConnection(self) -> float:
        return (self.after - self.before) / self.connections


def measureIdle(server: MailfwServer | TwistedSinkServer, connections: int) -> IdleResult:
    time.sleep(1)
    before = rss(server.pid)
    sockets = openIdle(server.port, connections)
    try:
        time.sleep(1)
        after = rss(server.pid)
    finally:
        for s in sockets:
            s.close()
    return IdleResult(server.name, connections, before, after)


def addArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connections", type=int, default=10000, help="idle connections (default 10000)")
    parser.add_argument("--starts", type=int, default=5, help="start-ups timed per worker count (default 5)")


def runIdle(args: argparse.Namespace) -> str:
    raiseDescriptorLimit(args.connections + 1000)
    lines = []
    results = []
    for make in (
        lambda: MailfwServer(freePort(), workers=1, name="mailfw", config=IDLE_CONFIG),
        lambda: TwistedSinkServer(freePort()),
    ):
        server = make()
        try:
            results.append(measureIdle(server, args.connections))
        finally:
            server.stop()
    lines.append(f"idle connections: {args.connections}, resident set of the one server process")
    for r in results:
        lines.append(
            f"{r.server:8} idle {r.before / 2**20:6.1f} MB, with the connections {r.after / 2**20:6.1f} MB: "
            f"{(r.after - r.before) / 2**20:5.1f} MB more, {r.perConnection / 1024:.2f} KB per connection"
        )
    for workers in (1, 2):
        lines.append("start-up: " + startup.measure("bench", workers, args.starts))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    addArguments(parser)
    args = parser.parse_args(argv)
    print(runIdle(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
