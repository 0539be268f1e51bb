"""
Where one SMTP session's time goes: a lock-step client (greeting, EHLO,
MAIL, RCPT, DATA, a 1 KB message, QUIT, one connection per message, one
session at a time) against mailfw and Postfix set up as in C{accept.py},
printing the mean time from sending each command to reading its reply.

C{accept.py} measures throughput with Postfix's C{smtp-source}; this
script splits a single session into its steps, to see whether the
commit or the per-command turnaround decides the rate at one session.
Run it as root (for Postfix)::

    /work/venv/bin/python benchmarks/latency.py --messages 1000 --repeat 3
"""

from __future__ import annotations

import argparse
import itertools
import socket
import statistics
import sys
import time
from collections.abc import Sequence

from accept import MailfwServer, PostfixServer, Server, freePort

STEPS = ("greeting", "EHLO", "MAIL", "RCPT", "DATA", "message", "QUIT")
BODY = b"Subject: latency\r\n\r\n" + (b"x" * 76 + b"\r\n") * 13 + b".\r\n"
COMMANDS = (
    b"EHLO client.bench.test\r\n",
    b"MAIL FROM:<sender@bench.test>\r\n",
    b"RCPT TO:<rcpt@bench.test>\r\n",
    b"DATA\r\n",
    BODY,
    b"QUIT\r\n",
)


def session(port: int) -> list[float]:
    """
    One session; the seconds each step took, in the order of L{STEPS}.
    """
    times = [time.perf_counter()]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        replies = s.makefile("rb")

        def reply() -> bytes:
            while True:
                line = replies.readline()
                if not line:
                    raise ConnectionError("the server closed the connection")
                if line[3:4] != b"-":
                    return line

        for command in (None, *COMMANDS):
            if command is not None:
                s.sendall(command)
            line = reply()
            if line[:1] not in (b"2", b"3"):
                raise RuntimeError(f"refused: {line!r}")
            times.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(times)]


def measure(server: Server, messages: int) -> tuple[float, list[float]]:
    """
    Sessions per second, and the mean of each step in microseconds.
    """
    start = time.perf_counter()
    results = [session(server.port) for _ in range(messages)]
    rate = messages / (time.perf_counter() - start)
    return rate, [statistics.mean(r[i] for r in results) * 1e6 for i in range(len(STEPS))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", choices=("mailfw", "postfix"))
    args = parser.parse_args(argv)
    makers = {
        "mailfw": lambda: MailfwServer(freePort(), workers=args.workers),
        "postfix": lambda: PostfixServer(freePort()),
    }
    names = [args.only] if args.only else list(makers)
    print(f"{'server':8} {'sessions/s':>10}  " + " ".join(f"{s:>9}" for s in STEPS) + "  (mean us)")
    for name in names:
        server = makers[name]()
        try:
            measure(server, min(200, args.messages))  # warm-up
            for _ in range(args.repeat):
                rate, steps = measure(server, args.messages)
                print(f"{name:8} {rate:10.0f}  " + " ".join(f"{s:9.0f}" for s in steps))
                sys.stdout.flush()
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
