"""
A running C{twistd mailfw} whose resolver goes away, and one whose resolver
answers only after 20 s.  The resolver is a small DNS server on a thread
of the test (UDP on 127.0.0.1) that can be down (nothing listens: ICMP
port unreachable), slow, or up; remote mail goes by MX to Postfix's
C{smtp-sink} on 127.0.0.2, local mail to a Maildir.

Remote mail waits while the resolver is down and is delivered once it is
back; local mail is delivered meanwhile as usual; the lookups in flight (one
UDP socket each) stay bounded by the scheduler's concurrency.  (That a
lookup nobody answers ends in 4.4.3 after the resolver's timeouts, a
minute, is shown faster by C{test_relay_real.test_dnsFailures}.)

The first two tests use the default concurrency (50) with 30 remote
domains.  L{test_resolverDownFewSlots} runs with C{max_concurrent = 5}:
the relay agent may then take only 4 deliveries (its own share, see
C{[scheduler] max_per_agent}), and the mail waiting behind it does not stop
the scheduler from taking local mail, so local mail is delivered within a
few seconds while all 30 remote messages wait on the dead resolver.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.names import dns

from tests.integration._faults import attempt, deliveredCounts, logOf
from tests.integration._peers import PEER, Sink, startSink, stopSink
from tests.integration._server import MailfwProcess, freePort, waitFor

DOMAINS = 30
CONCURRENCY = 50

CONFIG = """
[dns]
nameservers = ["127.0.0.1:{dnsPort}"]

[routing]
plugin = "static"
local_domains = ["localhost"]
relay_networks = ["127.0.0.0/8"]

[delivery.local]
plugin = "maildir"

[delivery.outbound]
plugin = "smtp-relay"
port = {sinkPort}
address_families = ["ipv4"]
tls = "none"

[scheduler]
first_retry = 2
backoff = 1
max_retry = 2
jitter = 0
max_concurrent = {concurrency}
"""


class ThreadDNS:
    """
    An authoritative server for C{*.test} on a thread: every C{dN.test}
    has the MX C{mx.test}, whose address is 127.0.0.2.  C{delay} holds
    each answer back; L{stop} closes the socket (the resolver is down).
    """

    def __init__(self, port: int, delay: float = 0.0) -> None:
        self.port = port
        self.delay = delay
        self.queries = 0
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> ThreadDNS:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", self.port))
        self.thread = threading.Thread(target=self._serve, args=(self.sock,), daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.thread is not None:
            self.thread.join(5)

    def _serve(self, sock: socket.socket) -> None:
        while True:
            try:
                data, peer = sock.recvfrom(4096)
            except OSError:
                return
            self.queries += 1
            answer = self._answer(data)
            if answer is None:
                continue
            if self.delay:
                threading.Timer(self.delay, self._send, (sock, answer, peer)).start()
            else:
                self._send(sock, answer, peer)

    @staticmethod
    def _send(sock: socket.socket, answer: bytes, peer: tuple[str, int]) -> None:
        with contextlib.suppress(OSError):
            sock.sendto(answer, peer)

    @staticmethod
    def _answer(data: bytes) -> bytes | None:
        message = dns.Message()
        try:
            message.fromStr(data)
        except Exception:
            return None
        reply = dns.Message(id=message.id, answer=True, auth=True, rCode=dns.OK)
        reply.queries = message.queries
        for query in message.queries:
            name = query.name.name.decode().lower()
            if query.type == dns.MX and name.endswith(".test") and name != "mx.test":
                reply.answers.append(
                    dns.RRHeader(name, dns.MX, payload=dns.Record_MX(10, b"mx.test"), ttl=60)
                )
            elif query.type == dns.A and name == "mx.test":
                reply.answers.append(dns.RRHeader(name, dns.A, payload=dns.Record_A(PEER), ttl=60))
            elif not name.endswith(".test"):
                reply.rCode = dns.ENAME
        return reply.toStr()


def udpSockets(pid: int) -> int:
    """
    How many UDP sockets process C{pid} holds: one per DNS query in flight.
    """
    inodes = set()
    for table in ("udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            inodes.add(line.split()[9])
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            count += 1
    return count


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    s = startSink(tmp_path)
    yield s
    stopSink(s)


def startServer(tmp_path: Path, dnsPort: int, sink: Sink, concurrency: int = CONCURRENCY) -> MailfwProcess:
    config = tmp_path / "mailfw.toml"
    config.write_text(CONFIG.format(dnsPort=dnsPort, sinkPort=sink.port, concurrency=concurrency))
    return MailfwProcess(tmp_path / "data", config=config).start()


def remoteDelivered(sink: Sink) -> set[str]:
    found = set()
    for message in sink.messages():
        for line in message.splitlines():
            if line.startswith(b"X-Test-ID: "):
                found.add(line[11:].strip().decode())
    return found


def sendBoth(server: MailfwProcess, prefix: str) -> tuple[set[str], set[str]]:
    remote, local = set(), set()
    for n in range(DOMAINS):
        ident = f"{prefix}-remote-{n}"
        assert attempt(server.smtpPort, ident, recipient=f"user@d{n}.test") == 250
        remote.add(ident)
    for n in range(5):
        ident = f"{prefix}-local-{n}"
        assert attempt(server.smtpPort, ident) == 250
        local.add(ident)
    return remote, local


def peakLookups(server: MailfwProcess, seconds: float) -> int:
    """
    The most DNS sockets the server held at once over C{seconds}: its
    lookups in flight.
    """
    assert server.process is not None
    peak = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, udpSockets(server.process.pid))
        time.sleep(0.2)
    return peak


def deliveredOnceBack(dnsPort: int, sink: Sink, remote: set[str], timeout: float) -> None:
    """
    Start the resolver on C{dnsPort} and wait until the sink has every
    C{remote} message.
    """
    resolver = ThreadDNS(dnsPort).start()
    try:
        waitFor(
            lambda: remoteDelivered(sink) >= remote,
            timeout=timeout,
            what="remote mail delivered once the resolver is back",
        )
    finally:
        resolver.stop()


def test_resolverDown(tmp_path: Path, sink: Sink) -> None:
    """
    Nothing answers DNS: local mail is delivered at once, remote mail
    waits, lookups in flight stay bounded; when the resolver comes back
    the remote mail is delivered, none lost.
    """
    dnsPort = freePort()
    server = startServer(tmp_path, dnsPort, sink)
    assert server.process is not None
    try:
        started = time.monotonic()
        remote, local = sendBoth(server, "down")
        waitFor(
            lambda: set(deliveredCounts(server.maildir("user"))) >= local,
            timeout=15,
            what="local mail delivered while DNS is down",
        )
        localSeconds = time.monotonic() - started
        peak = peakLookups(server, 10)
        assert not remoteDelivered(sink)
        deliveredOnceBack(dnsPort, sink, remote, timeout=90)
        recovered = time.monotonic() - started
        deferrals = logOf(server).count("4.4.3")
    finally:
        server.stop()
    print(
        f"\nresolver down: {len(local)} local messages delivered in {localSeconds:.1f} s,"
        f" {deferrals} deferrals with 4.4.3, peak DNS sockets {peak},"
        f" {len(remote)} remote messages delivered {recovered:.1f} s after sending, lost 0"
    )
    assert peak <= CONCURRENCY, f"{peak} lookups in flight with {CONCURRENCY} deliveries at a time"


def test_resolverSlow(tmp_path: Path, sink: Sink) -> None:
    """
    DNS answers only after 20 s: local mail is not held up, the lookups in
    flight stay bounded by the scheduler's concurrency while 30 domains
    wait, and the remote mail is delivered in the end, none lost.
    """
    dnsPort = freePort()
    resolver = ThreadDNS(dnsPort, delay=20.0).start()
    server = startServer(tmp_path, dnsPort, sink)
    assert server.process is not None
    try:
        started = time.monotonic()
        remote, local = sendBoth(server, "slow")
        waitFor(
            lambda: set(deliveredCounts(server.maildir("user"))) >= local,
            timeout=15,
            what="local mail delivered while DNS is slow",
        )
        localSeconds = time.monotonic() - started
        peak = 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            peak = max(peak, udpSockets(server.process.pid))
            time.sleep(0.2)
        resolver.delay = 0.0
        waitFor(
            lambda: remoteDelivered(sink) >= remote,
            timeout=90,
            what="remote mail delivered after the slow answers",
        )
        recovered = time.monotonic() - started
        deferrals = logOf(server).count("4.4.3")
    finally:
        server.stop()
        resolver.stop()
    print(
        f"\nresolver slow (20 s): {len(local)} local messages delivered in {localSeconds:.1f} s,"
        f" {resolver.queries} queries, {deferrals} deferrals with 4.4.3, peak DNS sockets {peak},"
        f" {len(remote)} remote messages delivered {recovered:.1f} s after sending, lost 0"
    )
    assert peak <= CONCURRENCY, f"{peak} lookups in flight with {CONCURRENCY} deliveries at a time"


def test_resolverDownFewSlots(tmp_path: Path, sink: Sink) -> None:
    """
    Nothing answers DNS and C{max_concurrent} is 5, far fewer than the 30
    remote messages waiting on lookups: local mail sent after them is
    still delivered within a few seconds (the relay agent holds at most
    its own 4 slots), exactly once; when the resolver comes back all the
    remote mail is delivered, none lost.
    """
    concurrency = 5
    dnsPort = freePort()
    server = startServer(tmp_path, dnsPort, sink, concurrency)
    assert server.process is not None
    try:
        started = time.monotonic()
        remote = set()
        for n in range(DOMAINS):
            ident = f"few-remote-{n}"
            assert attempt(server.smtpPort, ident, recipient=f"user@d{n}.test") == 250
            remote.add(ident)
        localStarted = time.monotonic()
        local = set()
        for n in range(5):
            ident = f"few-local-{n}"
            assert attempt(server.smtpPort, ident) == 250
            local.add(ident)
        waitFor(
            lambda: set(deliveredCounts(server.maildir("user"))) >= local,
            timeout=5,
            what=f"local mail delivered while DNS is down and {DOMAINS} remote messages wait",
        )
        localSeconds = time.monotonic() - localStarted
        peak = peakLookups(server, 5)
        assert not remoteDelivered(sink)
        deliveredOnceBack(dnsPort, sink, remote, timeout=150)
        recovered = time.monotonic() - started
        counts = deliveredCounts(server.maildir("user"))
    finally:
        server.stop()
    print(
        f"\nresolver down, max_concurrent {concurrency}: {len(local)} local messages delivered"
        f" {localSeconds:.1f} s after sending them, peak DNS sockets {peak},"
        f" {len(remote)} remote messages delivered {recovered:.1f} s after sending, lost 0"
    )
    assert {ident: counts[ident] for ident in local} == dict.fromkeys(local, 1), counts
    assert peak <= concurrency - 1, f"{peak} lookups in flight with the relay agent limited to 4 deliveries"
