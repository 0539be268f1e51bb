"""
Relay peers that misbehave, against the real C{smtp-relay} agent: the
first MX of C{bad.test} is an in-process peer on 127.0.0.4 that stalls
(after DATA, or after the final dot), answers EHLO with a reply that never
ends, or closes in the middle of a reply; the second MX is Postfix's
C{smtp-sink} on 127.0.0.2.  Each phase has its own (short) timeout; the
agent gives up on the bad host and delivers to the next MX, except where
the message may already have been taken (no answer to the final dot): then
it defers, as RFC 5321 6.1 asks, rather than risk a second copy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.names import dns, server
from twisted.protocols.basic import LineReceiver

from tests.integration._peers import PEER, Sink, startSink, stopSink
from tests.integration.test_relay_real import MemoryAuthority, deliver, envelope, makeAgent, reactor

BAD = "127.0.0.4"
TIMEOUT = 2

ZONE: dict[str, list[Any]] = {
    "bad.test": [dns.Record_MX(10, b"mx-bad.test"), dns.Record_MX(20, b"mx-up.test")],
    "mx-bad.test": [dns.Record_A(BAD)],
    "mx-up.test": [dns.Record_A(PEER)],
}


class BadPeer(LineReceiver):
    """
    An SMTP server that behaves until its C{mode} says otherwise.
    """

    delimiter = b"\r\n"
    transport: Any

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.inData = False
        self.flood: LoopingCall | None = None

    def reply(self, text: str) -> None:
        self.transport.write(text.encode() + b"\r\n")

    def connectionMade(self) -> None:
        self.reply("220 mx-bad.test ESMTP")

    def connectionLost(self, reason: Any = None) -> None:
        if self.flood is not None and self.flood.running:
            self.flood.stop()

    def lineReceived(self, line: bytes) -> None:
        if self.inData:
            if line == b"." and self.mode != "stall-dot":
                self.inData = False
                self.reply("250 2.0.0 taken")
            return
        verb = line[:4].upper()
        if verb == b"EHLO":
            if self.mode == "endless":
                self.transport.write(b"250-mx-bad.test\r\n")
                self.flood = LoopingCall(self.transport.write, b"250-and on and on\r\n" * 50)
                self.flood.start(0.01)
                return
            self.reply("250-mx-bad.test")
            self.reply("250 8BITMIME")
        elif verb == b"MAIL" and self.mode == "close-mid-reply":
            self.transport.write(b"250-2.1.0 first line of a reply that")
            self.transport.loseConnection()
        elif verb == b"DATA":
            if self.mode == "stall-data":
                return
            self.inData = True
            self.reply("354 go ahead")
        elif verb == b"QUIT":
            self.reply("221 bye")
            self.transport.loseConnection()
        else:
            self.reply("250 ok")


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    s = startSink(tmp_path)
    yield s
    stopSink(s)


@pytest.fixture
def dnsPort() -> Iterator[int]:
    factory = server.DNSServerFactory(authorities=[MemoryAuthority(ZONE)])
    udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(controller=factory), interface="127.0.0.1")
    port = udp.getHost().port
    tcp = reactor.listenTCP(port, factory, interface="127.0.0.1")
    yield port
    udp.stopListening()
    tcp.stopListening()


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
@pytest.mark.parametrize(
    ("mode", "nextMX"),
    [("stall-data", True), ("endless", True), ("close-mid-reply", True), ("stall-dot", False)],
)
async def test_badFirstMX(tmp_path: Path, dnsPort: int, sink: Sink, mode: str, nextMX: bool) -> None:
    """
    The first MX misbehaves in C{mode}: the agent times out (or gives up)
    within its per-phase limits and delivers through the second MX, or,
    when the message may have been taken, defers with a 4xx.
    """
    factory = Factory.forProtocol(lambda: BadPeer(mode))
    port = reactor.listenTCP(sink.port, factory, interface=BAD)
    try:
        agent = makeAgent(
            tmp_path,
            dnsPort,
            sink.port,
            command_timeout=TIMEOUT,
            data_timeout=TIMEOUT,
            data_done_timeout=TIMEOUT,
            transfer_timeout=TIMEOUT,
        )
        started = time.monotonic()
        [outcome] = await deliver(agent, envelope("user@bad.test"))
        seconds = time.monotonic() - started
    finally:
        await port.stopListening()
    print(
        f"\n{mode}: {outcome.reply.code} {outcome.reply.enhanced} via {outcome.remoteMTA} in {seconds:.1f} s"
    )
    if nextMX:
        assert (outcome.reply.code, outcome.remoteMTA) == (250, "mx-up.test"), outcome
    else:
        assert 400 <= outcome.reply.code < 500, outcome
    assert seconds < 3 * TIMEOUT + 5, f"{mode} held the delivery for {seconds:.1f} s"
