"""
STARTTLS (RFC 3207) in memory: L{twisted.test.iosim} connects a client and
the server and simulates the TLS handshake, so the tests can check what
survives it.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from mailfw.smtp import SMTPLimits, SMTPServerProtocol
from mailfw.smtp._settings import SessionSettings
from tests._smtpdoubles import (
    EHLO,
    HOSTNAME,
    DictRouter,
    FakeTLSContext,
    RecordingQueue,
    StagePolicy,
    TLSStringTransport,
    connect,
)


class RecordingClient(Protocol):
    """
    A client that keeps everything the server sends.
    """

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def codes(self) -> list[bytes]:
        lines = self.received.split(b"\r\n")[:-1]
        return [line[:3] for line in lines if line[3:4] != b"-"]


class Pair:
    """
    A server and a client joined by iosim.
    """

    def __init__(self, tls: object | None = FakeTLSContext()) -> None:
        self.context = tls
        self.policy = StagePolicy()
        self.queue = RecordingQueue()
        self.server = SMTPServerProtocol(
            SessionSettings(
                "smtp",
                HOSTNAME,
                self.queue,  # type: ignore[arg-type]
                DictRouter(),
                Clock(),
                (self.policy,),
                SMTPLimits(),
                tls,
            )
        )
        self.client = RecordingClient()
        serverTransport = iosim.FakeTransport(
            self.server, isServer=True, peerAddress=IPv4Address("TCP", "192.0.2.7", 4000)
        )
        clientTransport = iosim.FakeTransport(self.client, isServer=False)
        self.pump = iosim.connect(self.server, serverTransport, self.client, clientTransport)
        self.toServer = clientTransport

    def send(self, data: bytes) -> None:
        self.toServer.write(data)
        self.pump.flush()

    def startTLS(self) -> None:
        self.toServer.startTLS(self.context)
        self.pump.flush()


class STARTTLSTests(SynchronousTestCase):
    def test_pipelinedPlaintextDiscarded(self) -> None:
        """
        A command sent in the same packet as STARTTLS cannot take effect
        inside the TLS session (the CVE-2011-0411 class of attack).
        """
        pair = Pair()
        pair.send(EHLO + b"STARTTLS\r\nMAIL FROM:<injected@example.com>\r\n")
        self.assertEqual(pair.client.codes(), [b"220", b"250", b"220"])
        pair.startTLS()
        pair.send(EHLO + b"RCPT TO:<rcpt@example.org>\r\n")
        # Exactly one reply per command sent inside TLS: none for the MAIL.
        self.assertEqual(pair.client.codes(), [b"220", b"250", b"220", b"250", b"503"])
        self.assertTrue(pair.client.received.endswith(b"503 5.5.1 Need MAIL command first\r\n"))
        self.assertNotIn("sender", [stage for stage, args in pair.policy.calls])
        self.assertTrue(pair.server.session.tls)

    def test_sessionReset(self) -> None:
        """
        After TLS the client must EHLO again; STARTTLS is no longer offered;
        mail received is marked ESMTPS.
        """
        pair = Pair()
        pair.send(EHLO + b"STARTTLS\r\n")
        pair.startTLS()
        pair.send(b"MAIL FROM:<a@example.net>\r\n")
        self.assertTrue(pair.client.received.endswith(b"503 Send HELO or EHLO first\r\n"))
        pair.client.received = b""
        pair.send(EHLO)
        self.assertNotIn(b"STARTTLS", pair.client.received)
        pair.send(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<rcpt@example.org>\r\nDATA\r\n")
        pair.send(b"Subject: t\r\n\r\nhi\r\n.\r\n")
        self.assertEqual(pair.client.codes()[-4:], [b"250", b"250", b"354", b"250"])
        self.assertIn(b" with ESMTPS id ", pair.queue.messages[0][1].data)

    def test_twice(self) -> None:
        """
        STARTTLS inside TLS gets 503.
        """
        pair = Pair()
        pair.send(EHLO + b"STARTTLS\r\n")
        pair.startTLS()
        pair.send(EHLO + b"STARTTLS\r\n")
        self.assertTrue(pair.client.received.endswith(b"503 5.5.1 TLS already active\r\n"))

    def test_notAvailable(self) -> None:
        """
        Without TLS options STARTTLS is neither offered nor accepted (454).
        """
        pair = Pair(tls=None)
        pair.send(EHLO + b"STARTTLS\r\n")
        self.assertNotIn(b"250-STARTTLS", pair.client.received)
        self.assertTrue(pair.client.received.endswith(b"454 4.7.0 TLS not available\r\n"))

    def test_refusals(self) -> None:
        """
        STARTTLS with a parameter gets 501, before EHLO or inside a mail
        transaction 503.
        """
        pair = Pair()
        pair.send(b"STARTTLS\r\n" + EHLO + b"STARTTLS now\r\nMAIL FROM:<a@example.net>\r\nSTARTTLS\r\n")
        self.assertEqual(pair.client.codes(), [b"220", b"503", b"250", b"501", b"250", b"503"])
        self.assertFalse(pair.server.session.tls)


class StartTLSCallTests(SynchronousTestCase):
    def test_optionsPassed(self) -> None:
        """
        The factory's TLS options go to C{startTLS}, after the 220 has been
        written, and anything pipelined behind STARTTLS is dropped.
        """
        options = object()
        conn = connect(tlsOptions=options, transportFactory=TLSStringTransport)
        conn.send(EHLO + b"STARTTLS\r\nMAIL FROM:<x@example.net>\r\nRCPT TO:<y@example.org>\r\n")
        self.assertIs(conn.transport.tlsStartedWith, options)  # type: ignore[attr-defined]
        self.assertEqual(conn.replies()[-1], b"220 2.0.0 Ready to start TLS")
        self.assertIsNone(conn.proto.session.helo)
        self.assertEqual(conn.router.calls, [])
