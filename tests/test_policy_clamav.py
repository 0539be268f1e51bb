"""
The C{clamav} policy against a scripted clamd: the C{zINSTREAM} framing,
C{StreamMaxLength}, flow control, the answers, and clamd that is down,
slow or broken.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mailfw.config import ComponentContext, ConfigError
from mailfw.policy._clamav import ClamavPolicy, fromConfig
from mailfw.testing import PolicyContractTests
from tests._smtpdoubles import HOSTNAME, PROLOGUE, connect

BODY = b"Subject: hello\r\nFrom: <sender@example.net>\r\n\r\nline one\r\n"
TEMPFAIL = b"451 4.7.1 Service unavailable - try again later"


class ClamdTransport(StringTransport):
    """
    The client's side of a connection to a scripted clamd: parses what the
    policy writes, and when the stream ends answers with C{reply} (raw
    bytes; C{None} says nothing).
    """

    def __init__(self, reply: bytes | None) -> None:
        super().__init__()
        self.reply = reply
        self.protocol: Protocol | None = None
        self.chunks: list[bytes] = []
        self.ended = False

    def write(self, data: bytes) -> None:
        super().write(data)
        raw = self.value()
        assert raw.startswith(b"zINSTREAM\0"), raw[:20]
        rest, self.chunks = raw[len(b"zINSTREAM\0") :], []
        while len(rest) >= 4:
            (length,) = struct.unpack("!I", rest[:4])
            if length == 0:
                if not self.ended and self.reply is not None:
                    self.ended = True
                    assert self.protocol is not None
                    self.protocol.dataReceived(self.reply)
                return
            if len(rest) < 4 + length:
                return
            self.chunks.append(rest[4 : 4 + length])
            rest = rest[4 + length :]

    @property
    def scanned(self) -> bytes:
        return b"".join(self.chunks)


@implementer(IStreamClientEndpoint)
class ClamdEndpoint:
    """
    Connects each scan to a L{ClamdTransport}; C{refuse} fails every
    connection, C{hang} never completes one.
    """

    def __init__(
        self, reply: bytes | None = b"stream: OK\0", refuse: bool = False, hang: bool = False
    ) -> None:
        self.reply = reply
        self.refuse = refuse
        self.hang = hang
        self.transports: list[ClamdTransport] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.refuse:
            return fail(ConnectionRefusedError("nobody listens"))
        if self.hang:
            return Deferred()
        protocol = factory.buildProtocol(None)
        transport = ClamdTransport(self.reply)
        transport.protocol = protocol
        self.transports.append(transport)
        protocol.makeConnection(transport)
        return succeed(protocol)


def clamav(endpoint: ClamdEndpoint, clock: Clock, **kw: Any) -> ClamavPolicy:
    return ClamavPolicy("virus", endpoint, clock, "unix:/run/clamd.ctl", **kw)


class ClamavTests(SynchronousTestCase):
    def session(self, endpoint: ClamdEndpoint, body: bytes = BODY, **kw: Any) -> Any:
        clock = Clock()
        conn = connect(policies=(clamav(endpoint, clock, **kw),), clock=clock)
        conn.send(PROLOGUE + body + b".\r\n")
        return conn

    def test_clean(self) -> None:
        """
        The whole message (header section, then body) goes to clamd as
        zINSTREAM chunks; OK accepts it, and the connection is closed.
        """
        endpoint = ClamdEndpoint()
        conn = self.session(endpoint)
        self.assertEqual(conn.lines()[-1][:3], b"250")
        [transport] = endpoint.transports
        self.assertTrue(transport.scanned.startswith(b"Received: from client.example.net"))
        self.assertTrue(transport.scanned.endswith(BODY))
        self.assertTrue(transport.disconnecting)
        [(_, incoming)] = conn.queue.committed
        self.assertTrue(incoming.data.endswith(BODY))

    def test_virus(self) -> None:
        """
        FOUND refuses the message with 554 5.7.1 naming the signature.
        """
        conn = self.session(ClamdEndpoint(b"stream: Eicar-Signature FOUND\0"))
        self.assertEqual(conn.lines()[-1], b"554 5.7.1 Message refused: virus found: Eicar-Signature")
        self.assertEqual(conn.queue.committed, [])

    def test_errorAndGarbage(self) -> None:
        """
        An ERROR answer, an unexpected one, or one too long: default action.
        """
        for reply in (
            b"INSTREAM size limit exceeded. ERROR\0",
            b"stream: something else\0",
            b"x" * 5000,
        ):
            conn = self.session(ClamdEndpoint(reply))
            self.assertEqual(conn.lines()[-1], TEMPFAIL, reply[:40])
            self.assertEqual(conn.queue.committed, [])

    def test_clamdDown(self) -> None:
        """
        clamd that cannot be reached: the default action (tempfail, accept
        or reject), one log line naming the filter.
        """
        events: list[dict[str, Any]] = []
        self.patch(ClamavPolicy, "log", Logger(observer=events.append))  # type: ignore[arg-type]
        conn = self.session(ClamdEndpoint(refuse=True))
        self.assertEqual(conn.lines()[-1], TEMPFAIL)
        [event] = events
        self.assertEqual((event["policy"], event["filter"]), ("virus", "unix:/run/clamd.ctl"))
        self.assertIn("cannot connect", event["reason"])
        conn = self.session(ClamdEndpoint(refuse=True), defaultAction="accept")
        self.assertEqual(conn.lines()[-1][:3], b"250")
        conn = self.session(ClamdEndpoint(refuse=True), defaultAction="reject")
        self.assertEqual(conn.lines()[-1], b"550 5.7.1 Command rejected")

    def test_closesBeforeAnswering(self) -> None:
        """
        clamd that hangs up without answering: default action.
        """
        clock = Clock()
        endpoint = ClamdEndpoint(reply=None)
        conn = connect(policies=(clamav(endpoint, clock),), clock=clock)
        conn.send(PROLOGUE + BODY + b".\r\n")
        [transport] = endpoint.transports
        assert transport.protocol is not None
        transport.protocol.connectionLost()
        self.assertEqual(conn.lines()[-1], TEMPFAIL)

    def test_neverAnswers(self) -> None:
        """
        clamd that never answers, or a connection that never completes:
        after scan_timeout the default action.
        """
        for endpoint in (ClamdEndpoint(reply=None), ClamdEndpoint(hang=True)):
            clock = Clock()
            conn = connect(policies=(clamav(endpoint, clock, scanTimeout=10.0),), clock=clock)
            conn.send(PROLOGUE + BODY + b".\r\n")
            self.assertEqual(conn.lines()[-1][:3], b"354")
            clock.advance(10)
            self.assertEqual(conn.lines()[-1], TEMPFAIL)

    def test_streamMaxLength(self) -> None:
        """
        At max_size the stream ends: clamd gets the first max_size octets
        and the empty chunk, never more.
        """
        endpoint = ClamdEndpoint()
        body = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 200
        conn = self.session(endpoint, body=body, maxSize=50_000)
        self.assertEqual(conn.lines()[-1][:3], b"250")
        [transport] = endpoint.transports
        self.assertEqual(len(transport.scanned), 50_000)
        self.assertTrue(all(len(chunk) <= 65536 for chunk in transport.chunks))
        self.assertTrue(transport.value().endswith(b"\0\0\0\0"))

    def test_flowControl(self) -> None:
        """
        While clamd's socket is full (the transport pauses the stream) the
        session stops reading from the client; it reads on when clamd
        catches up.
        """
        clock = Clock()
        endpoint = ClamdEndpoint()
        conn = connect(policies=(clamav(endpoint, clock),), clock=clock)
        conn.send(PROLOGUE + b"Subject: s\r\n\r\nfirst line\r\n")
        [transport] = endpoint.transports
        assert transport.producer is not None
        transport.producer.pauseProducing()
        conn.send(b"x" * 998 + b"\r\n")
        self.assertEqual(conn.transport.producerState, "paused")
        before = len(transport.scanned)
        transport.producer.resumeProducing()
        self.assertEqual(conn.transport.producerState, "producing")
        self.assertGreater(len(transport.scanned), before)
        conn.send(b".\r\n")
        self.assertEqual(conn.lines()[-1][:3], b"250")

    def test_config(self) -> None:
        """
        fromConfig checks the address, the default action and the numbers.
        """
        context = ComponentContext(reactor=MemoryReactorClock(), hostname=HOSTNAME, dataDir=None)  # type: ignore[arg-type]
        policy = fromConfig(
            context, "virus", {"plugin": "clamav", "address": "inet:127.0.0.1:3310", "max_size": 1000}
        )
        self.assertEqual((policy.description, policy.maxSize), ("inet:127.0.0.1:3310", 1000))
        for bad in (
            {},
            {"address": "inet:nope"},
            {"address": "unix:/x", "default_action": "maybe"},
            {"address": "unix:/x", "max_size": 0},
            {"address": "unix:/x", "colour": "red"},
        ):
            with self.assertRaises(ConfigError):
                fromConfig(context, "virus", {"plugin": "clamav", **bad})


class ClamavContractTests(PolicyContractTests, SynchronousTestCase):
    def makePolicy(self) -> ClamavPolicy:
        return clamav(ClamdEndpoint(), Clock())
