"""
Relay end to end: receive over SMTP, queue durably, relay with
C{smtp-relay} to Postfix's C{smtp-sink}; mailfw against Postfix relaying
to a sink of its own, in the same run.

Usage (as root, from the repository)::

    python benchmarks/relay.py [--sessions 100,10,1] [--messages N]
        [--size 1024] [--repeat 3] [--workers 2] [--latency 300]

Each server gets its own C{smtp-sink} on a loopback port (started with
C{-c}, so that it prints a running count of messages whose final dot it
received; a thread reads that count and notes when each message arrived).
C{smtp-source} sends N messages over S sessions to the server; then the
benchmark waits until the sink has every one of them.

  - B{e2e msgs/s}: messages over the time from the first connection until
    the last message arrived at the sink: messages fully delivered per
    second.
  - B{accept msgs/s}: messages over the time until the last 250.
  - B{250-to-sink latency} (C{--latency N}, light load): one message at a
    time, from a lock-step client that reads the 250 after the final dot,
    then waits until the sink has that message before sending the next;
    the time from the 250 to the sink's count, p50 and p99.

Postfix: a private instance (C{_postfix.py}) with C{relayhost =
[127.0.0.1]:SINK} and the C{smtp} transport, defaults otherwise (its
connection cache and per-destination concurrency).  mailfw: C{twistd
mailfw} with the SQLite queue and an C{smtp-relay} instance (C{tls =
"none"}) that the transport table points at the sink.  See
benchmarks/README.rst.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _postfix import PostfixError, PostfixInstance, findProgram
from accept import BenchmarkError, MailfwServer, freePort, sizeName, stopProcess, treeTicks

# The domain the servers relay (not local to either: mailfw's own host
# name is always local, Postfix's mydestination is empty).
RELAY_DOMAIN = "sink.test"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DEFAULT_MESSAGES = {1: 1500, 10: 3000, 100: 5000}

MAILFW_RELAY_CONFIG = """\
[queue]
plugin = "sqlite"

[routing]
plugin = "static"
local_domains = ["bench.test"]
relay_domains = ["{domain}"]
transport = {{ "{domain}" = "outbound:[127.0.0.1]:{sinkPort}" }}

[delivery.local]
plugin = "discard"

[delivery.outbound]
plugin = "smtp-relay"
tls = "none"
address_families = ["ipv4"]

[smtp]
max_connections_per_client = 10000
"""


class Sink:
    """
    Postfix's C{smtp-sink -c} on a loopback port; a thread reads its
    running counters and notes the time each message's final dot arrived.
    """

    def __init__(self) -> None:
        self.port = freePort()
        self.arrivals: list[float] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [findProgram("smtp-sink"), "-c", "-u", "nobody", f"127.0.0.1:{self.port}", "1024"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        # "sess=N quit=N mesg=N\r" whenever a session ends, QUIT or "." arrives.
        stream = self.process.stdout
        assert stream is not None
        pending = b""
        while True:
            data = os.read(stream.fileno(), 65536)
            if not data:
                return
            now = time.monotonic()
            records = (pending + data).split(b"\r")
            pending = records.pop()
            for record in records:
                for field in record.split():
                    if field.startswith(b"mesg="):
                        count = int(field[5:])
                        with self._changed:
                            while len(self.arrivals) < count:
                                self.arrivals.append(now)
                            self._changed.notify_all()

    @property
    def count(self) -> int:
        return len(self.arrivals)

    def waitFor(self, count: int, timeout: float) -> float:
        """
        Wait until C{count} messages have arrived; when the last did.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.arrivals) < count:
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    raise BenchmarkError(
                        f"the sink has {len(self.arrivals)} of {count} messages after {timeout}s"
                    )
                self._changed.wait(min(left, 0.5))
            return self.arrivals[count - 1]

    def stop(self) -> None:
        stopProcess(self.process, 10)


class RelayServer:
    """
    A relaying server under test and its sink.
    """

    name: str
    port: int
    pid: int
    sink: Sink

    def stop(self) -> None:
        raise NotImplementedError


class PostfixRelay(RelayServer):
    name = "postfix"

    def __init__(self) -> None:
        self.sink = Sink()
        self.port = freePort()
        self.instance = PostfixInstance(self.port, RELAY_DOMAIN, relayTo=self.sink.port)
        try:
            self.instance.start()
        except BaseException:
            self.stop()
            raise
        self.pid = self.instance.masterPID()

    def stop(self) -> None:
        try:
            self.instance.stop()
        finally:
            self.sink.stop()


class MailfwRelay(RelayServer):
    def __init__(self, workers: int, extra: str = "") -> None:
        """
        @param extra: more configuration (policies) after the relay's own.
        """
        self.name = f"mailfw-w{workers}"
        self.sink = Sink()
        self.port = freePort()
        config = MAILFW_RELAY_CONFIG.format(domain=RELAY_DOMAIN, sinkPort=self.sink.port) + extra
        try:
            self.server = MailfwServer(self.port, workers=workers, name=self.name, config=config)
        except BaseException:
            self.sink.stop()
            raise
        self.pid = self.server.pid

    def stop(self) -> None:
        try:
            self.server.stop()
        finally:
            self.sink.stop()


@dataclass
class RelayRun:
    server: str
    sessions: int
    messages: int
    acceptSeconds: float
    deliveredSeconds: float
    cpuSeconds: float
    attempt: int = 0

    @property
    def acceptRate(self) -> float:
        return self.messages / self.acceptSeconds

    @property
    def deliveredRate(self) -> float:
        return self.messages / self.deliveredSeconds


def smtpSource(port: int, sessions: int, messages: int, size: int, timeout: float) -> None:
    command = [
        findProgram("smtp-source"),
        "-4",
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-M",
        "client.bench.test",
        "-f",
        "sender@bench.test",
        "-t",
        f"rcpt@{RELAY_DOMAIN}",
        "-C",
        "5",
        f"127.0.0.1:{port}",
    ]
    try:
        done = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"smtp-source did not finish within {timeout}s") from None
    if done.returncode != 0 or done.stderr.strip():
        raise BenchmarkError(f"smtp-source exited with {done.returncode}: {done.stderr.strip()[:500]}")


def measure(server: RelayServer, sessions: int, messages: int, size: int, timeout: float) -> RelayRun:
    """
    One run: send, then wait until the sink has every message.
    """
    before = server.sink.count
    ticks = treeTicks(server.pid)
    start = time.monotonic()
    smtpSource(server.port, sessions, messages, size, timeout)
    accepted = time.monotonic() - start
    last = server.sink.waitFor(before + messages, timeout)
    # Nothing more may arrive: a duplicate would be a relay bug.
    time.sleep(0.2)
    if server.sink.count != before + messages:
        raise BenchmarkError(
            f"{server.name}: the sink got {server.sink.count - before} of {messages} messages"
        )
    cpu = (treeTicks(server.pid) - ticks) / CLOCK_TICKS
    return RelayRun(server.name, sessions, messages, accepted, max(last - start, accepted), cpu)


BODY_LINE = b"x" * 76 + b"\r\n"


def latencies(server: RelayServer, messages: int, size: int, timeout: float = 30) -> list[float]:
    """
    Send C{messages} one at a time, each after the previous one reached
    the sink; the seconds from each 250 to the sink's count of it.
    """
    body = b"Subject: latency\r\n\r\n" + BODY_LINE * max(1, size // len(BODY_LINE)) + b".\r\n"
    commands = (
        b"EHLO client.bench.test\r\n",
        b"MAIL FROM:<sender@bench.test>\r\n",
        f"RCPT TO:<rcpt@{RELAY_DOMAIN}>\r\n".encode(),
        b"DATA\r\n",
        body,
    )
    results = []
    for _ in range(messages):
        expected = server.sink.count + 1
        with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
            replies = s.makefile("rb")
            for command in (None, *commands):
                if command is not None:
                    s.sendall(command)
                while True:
                    line = replies.readline()
                    if not line:
                        raise BenchmarkError(f"{server.name} closed the connection")
                    if line[3:4] != b"-":
                        break
                if line[:1] not in (b"2", b"3"):
                    raise BenchmarkError(f"{server.name} refused: {line!r}")
            acknowledged = time.monotonic()
            s.sendall(b"QUIT\r\n")
        arrived = server.sink.waitFor(expected, timeout)
        results.append(arrived - acknowledged)
    return results


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class RelayOutcome:
    text: str
    markdown: str
    ok: bool


def report(
    runs: Sequence[RelayRun],
    names: Sequence[str],
    sessionCounts: Sequence[int],
    delays: dict[str, list[float]],
) -> tuple[str, str]:
    lines = [
        f"{'server':9} {'sessions':>8} {'msgs':>6} {'e2e msgs/s':>10} {'(min-max)':>13} "
        f"{'accept msgs/s':>13} {'CPU ms/msg':>10}"
    ]

    def median(name: str, sessions: int, attribute: str) -> float | None:
        values = [getattr(r, attribute) for r in runs if r.server == name and r.sessions == sessions]
        return statistics.median(values) if values else None

    for sessions in sessionCounts:
        for name in names:
            mine = [r for r in runs if r.server == name and r.sessions == sessions]
            if not mine:
                continue
            rates = [r.deliveredRate for r in mine]
            lines.append(
                f"{name:9} {sessions:8d} {mine[0].messages:6d} {statistics.median(rates):10.0f} "
                f"{f'({min(rates):.0f}-{max(rates):.0f})':>13} "
                f"{statistics.median(r.acceptRate for r in mine):13.0f} "
                f"{statistics.median(1000 * r.cpuSeconds / r.messages for r in mine):10.2f}"
            )
    for name, values in delays.items():
        lines.append(
            f"{name:9} 250-to-sink latency, {len(values)} messages one at a time: "
            f"p50 {1000 * percentile(values, 0.5):.2f} ms, p99 {1000 * percentile(values, 0.99):.2f} ms"
        )
    others = [n for n in names if n != "postfix"]
    table = [
        "| load | Postfix e2e | "
        + " | ".join(f"{n} e2e | {n} accept" for n in others)
        + " | 250-to-sink latency p50 / p99 |",
        "|---" * (3 + 2 * len(others)) + "|",
    ]
    for index, sessions in enumerate(sessionCounts):
        postfix = median("postfix", sessions, "deliveredRate")
        postfixAccept = median("postfix", sessions, "acceptRate")
        if not postfix or not postfixAccept:
            continue
        cells = []
        for name in others:
            e2e = median(name, sessions, "deliveredRate")
            accept = median(name, sessions, "acceptRate")
            cells.append("–" if e2e is None else f"{e2e / postfix:.2f}x")
            cells.append("–" if accept is None else f"{accept / postfixAccept:.2f}x")
        latency = "–"
        if index == len(sessionCounts) - 1 and delays:
            latency = ", ".join(
                f"{n} {1000 * percentile(v, 0.5):.1f} / {1000 * percentile(v, 0.99):.1f} ms"
                for n, v in delays.items()
            )
        label = f"{sessions} session{'s' if sessions != 1 else ''}"
        table.append(f"| {label} | {postfix:.0f}/s | " + " | ".join(cells) + f" | {latency} |")
    table.append("")
    table.append("(accept ratios are to Postfix's accept rate in the same run)")
    return "\n".join(lines), "\n".join(table)


def addArguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--relay-sessions", dest="relaySessions", default="100,10,1")
    parser.add_argument("--relay-messages", dest="relayMessages", type=int, default=None)
    parser.add_argument("--relay-workers", dest="relayWorkers", default="2")
    parser.add_argument(
        "--latency",
        type=int,
        default=300,
        help="messages for the 250-to-sink latency, one at a time (default 300; 0: none)",
    )


def runRelay(args: argparse.Namespace) -> RelayOutcome:
    sessionCounts = [int(s) for s in args.relaySessions.split(",") if s.strip()]
    workerCounts = [int(w) for w in str(args.relayWorkers).split(",") if w.strip()]
    servers: list[RelayServer] = []

    def stopAll() -> None:
        while servers:
            server = servers.pop()
            try:
                server.stop()
            except Exception as e:
                print(f"# stopping {server.name}: {e}", file=sys.stderr)

    atexit.register(stopAll)
    runs: list[RelayRun] = []
    delays: dict[str, list[float]] = {}
    ok = True
    try:
        for workers in workerCounts:
            servers.append(MailfwRelay(workers))
        servers.append(PostfixRelay())
        names = [s.name for s in servers]
        for server in servers:
            print(
                f"# {server.name} relaying on 127.0.0.1:{server.port} to smtp-sink on 127.0.0.1:{server.sink.port}",
                file=sys.stderr,
            )
            measure(server, max(sessionCounts), 2 * max(sessionCounts), args.size, args.timeout)
        for sessions in sessionCounts:
            messages = args.relayMessages or max(
                1, round(getattr(args, "scale", 1.0) * DEFAULT_MESSAGES.get(sessions, 3000))
            )
            for attempt in range(args.repeat):
                for server in servers if attempt % 2 == 0 else servers[::-1]:
                    run = measure(server, sessions, messages, args.size, args.timeout)
                    run.attempt = attempt
                    runs.append(run)
                    print(
                        f"# relay {run.server:9} {sessions:4d} sessions: {messages} msgs, "
                        f"accepted {run.acceptRate:.0f}/s, delivered {run.deliveredRate:.0f}/s, "
                        f"CPU {1000 * run.cpuSeconds / messages:.2f} ms/msg",
                        file=sys.stderr,
                    )
        if args.latency:
            # Alternating halves, so that load changes hit both.
            half = max(1, args.latency // 2)
            for _ in range(2):
                for server in servers:
                    delays.setdefault(server.name, []).extend(latencies(server, half, args.size))
    except (BenchmarkError, PostfixError) as e:
        print(f"relay benchmark failed: {e}", file=sys.stderr)
        ok = False
        names = [s.name for s in servers]
    finally:
        stopAll()
    text, table = report(runs, names, sessionCounts, delays)
    heading = (
        f"relay end to end, {sizeName(args.size)} bodies, one connection per message, "
        f"median of {args.repeat}, {os.cpu_count()} CPUs, mailfw --workers={args.relayWorkers}"
    )
    return RelayOutcome(heading + "\n" + text, table, ok)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    addArguments(parser)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    outcome = runRelay(args)
    print(outcome.text)
    print()
    print(outcome.markdown)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
