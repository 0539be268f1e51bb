"""
The server's ways of ending a session that a client would rather keep: the
total session time limit (slowloris) and closing at once after a 221 or 421,
also over TLS where the client never answers our close_notify.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import TLSVersion
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailfw.config import ConfigError, Section, ServerConfig
from mailfw.smtp._limits import SMTPLimits
from mailfw.smtp._server import CLOSE_GRACE, SESSION_END_RETRY, SMTPServerProtocol
from mailfw.smtp._settings import SessionSettings
from mailfw.tls import serverTLSOptions
from tests._smtpdoubles import HOSTNAME, DictRouter, RecordingQueue, connect
from tests._tlspair import tlsPair


class SessionTimeTests(SynchronousTestCase):
    """
    C{maxSessionTime} ends a session that is never idle.
    """

    def test_slowlorisEndsAtTheLimit(self) -> None:
        """
        A client that sends one byte every 5 s never reaches the idle
        timeout, but gets 421 4.4.2 and is closed at C{maxSessionTime}.
        """
        conn = connect(limits=SMTPLimits(idleTimeout=30, maxSessionTime=60))
        command = b"EHLO client.example\r\n" * 10
        for n in range(11):
            conn.send(command[n : n + 1])
            conn.clock.advance(5)
            self.assertFalse(conn.closed, f"closed after {conn.clock.seconds()} s")
        conn.clock.advance(5)
        self.assertTrue(conn.closed, "still open at the session time limit")
        self.assertEqual(
            conn.replies()[-1], b"421 mx.example.org Session time limit exceeded, closing connection"
        )

    def test_pendingReplyFirst(self) -> None:
        """
        At the limit, a reply the server still owes (the queue is committing
        a message) goes out first; the session ends right after it.
        """
        commit: Deferred[str] = Deferred()
        conn = connect(limits=SMTPLimits(maxSessionTime=60))
        conn.queue.commitResult = commit
        conn.send(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
        conn.send(b"DATA\r\n")
        conn.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(len(conn.queue.messages), 1, "the message did not reach the queue")
        conn.clock.advance(60 + SESSION_END_RETRY)
        self.assertFalse(conn.closed, "closed while the message was being queued")
        commit.callback("Q1")
        conn.clock.advance(SESSION_END_RETRY)
        self.assertEqual(conn.codes()[-2:], [b"250", b"421"])
        self.assertTrue(conn.closed)

    def test_noLimit(self) -> None:
        """
        C{max_session_time = 0} sets no timer at all.
        """
        conn = connect(limits=SMTPLimits(idleTimeout=1e9, maxSessionTime=0))
        conn.clock.advance(1e8)
        self.assertFalse(conn.closed)

    def test_fromSection(self) -> None:
        """
        C{max_session_time} is read from C{[smtp]}, as a number of seconds
        (default 3600); a negative one names the key.
        """
        self.assertEqual(SMTPLimits().maxSessionTime, 3600.0)
        limits = SMTPLimits.fromSection(Section("[smtp]", {"max_session_time": 90}))
        self.assertEqual(limits.maxSessionTime, 90.0)
        error = self.assertRaises(
            ConfigError, SMTPLimits.fromSection, Section("[smtp]", {"max_session_time": -1})
        )
        self.assertIn("max_session_time", str(error))


class SilentTLSClient(Protocol):
    """
    A client that records what it gets and never closes, nor answers a
    close_notify.
    """

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = reason


class CloseAfterGoodbyeTests(SynchronousTestCase):
    """
    After 221 (or 421) the server closes the connection at once, whatever
    the client does.
    """

    def tlsSession(self, kind: str) -> tuple[SMTPServerProtocol, SilentTLSClient, Any, Any, Clock]:
        clock = Clock()
        server = SMTPServerProtocol(
            SessionSettings(
                kind,
                HOSTNAME,
                RecordingQueue(),  # type: ignore[arg-type]
                DictRouter(),
                clock,
                (),
                SMTPLimits(),
            )
        )
        client = SilentTLSClient()
        clientTLS, _, pump = tlsPair(
            TLSVersion.TLSv1_3,
            server=server,
            client=client,
            serverPeer=IPv4Address("TCP", "192.0.2.7", 4000),
            clock=clock,
        )
        clientTLS.write(b"EHLO client.example\r\n")
        pump.flush()
        self.assertIn(b"250 ", client.received)
        # The client's TLS layer must not answer our close_notify: that is
        # the client this test is about.
        clientTLS._shutdownTLS = lambda: None
        return server, client, clientTLS, pump, clock

    def assertClosedAtOnce(self, kind: str) -> None:
        server, client, clientTLS, pump, clock = self.tlsSession(kind)
        clientTLS.write(b"QUIT\r\n")
        pump.flush()
        self.assertTrue(client.received.endswith(b"221 2.0.0 Bye\r\n"), client.received[-80:])
        # No time passes: closed as soon as the 221 and our close_notify
        # are out, not after CLOSE_GRACE.
        self.assertTrue(server.state.closed, f"{kind}: still open after the 221")
        self.assertIsNotNone(client.lost, f"{kind}: the client's connection is still open")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_submissionsQuit(self) -> None:
        """
        On implicit TLS (465), QUIT gets 221 and the server closes at once
        although the client never answers the close_notify.
        """
        self.assertClosedAtOnce("submissions")

    def test_smtpQuitOverTLS(self) -> None:
        """
        The same on a TLS session of the SMTP listener (after STARTTLS on
        25 or 587 the transport is the same).
        """
        self.assertClosedAtOnce("smtp")

    def test_plainQuit(self) -> None:
        """
        Without TLS, the connection is closed right after the 221, and no
        abort timer is left behind.
        """
        conn = connect()
        conn.send(b"QUIT\r\n")
        self.assertEqual(conn.codes(), [b"221"])
        self.assertTrue(conn.closed)
        self.assertIsNone(conn.transport.producer)
        conn.proto.connectionLost(Failure(Exception("closed")))
        self.assertEqual(conn.clock.getDelayedCalls(), [])

    def test_nonReadingClientAborted(self) -> None:
        """
        A client that does not read (our writes never drain) is aborted
        after L{CLOSE_GRACE}: the grace period is only for a full buffer.
        """
        conn = connect()
        conn.send(b"QUIT\r\n")
        self.assertTrue(conn.closed)
        conn.clock.advance(CLOSE_GRACE)
        self.assertTrue(conn.transport.disconnected or conn.transport.disconnecting)


class SelfSignedAfterDiskErrorTests(SynchronousTestCase):
    """
    The embedded default's self-signed certificate survives a disk error
    during its first start (found by the read-only disk test: ext4 left an
    empty certificate file, and mailfw refused to start again).
    """

    def config(self) -> ServerConfig:
        return ServerConfig(hostname="mx.example", dataDir=Path(self.mktemp()), listen={})

    def test_emptyPairRemade(self) -> None:
        """
        An empty self-signed certificate (or key) is made again, with a
        warning, instead of failing the start.
        """
        config = self.config()
        serverTLSOptions(config)
        certPath = config.dataDir / "tls" / "selfsigned-cert.pem"
        certPath.write_bytes(b"")
        with capturedLogs() as events:
            options = serverTLSOptions(config)
        self.assertIsNotNone(options.getContext())
        self.assertIn(b"BEGIN CERTIFICATE", certPath.read_bytes())
        self.assertTrue(any("remade" in e.get("log_format", "") for e in events), events)

    def test_configuredCertificateStillFails(self) -> None:
        """
        A certificate the operator configured is never replaced: a broken
        one stops the start with a L{ConfigError} naming it.
        """
        base = Path(self.mktemp())
        base.mkdir()
        (base / "cert.pem").write_bytes(b"")
        (base / "key.pem").write_bytes(b"")
        config = ServerConfig(
            hostname="mx.example",
            dataDir=base,
            listen={},
            certificate=base / "cert.pem",
            privateKey=base / "key.pem",
        )
        error = self.assertRaises(ConfigError, serverTLSOptions, config)
        self.assertIn("cert.pem", str(error))
        self.assertEqual((base / "cert.pem").read_bytes(), b"")

    def test_writtenDurably(self) -> None:
        """
        The pair is written through a temporary file renamed into place:
        no temporary file is left, and the key is private.
        """
        config = self.config()
        serverTLSOptions(config)
        names = sorted(p.name for p in (config.dataDir / "tls").iterdir())
        self.assertEqual(names, ["selfsigned-cert.pem", "selfsigned-key.pem"])
        self.assertEqual((config.dataDir / "tls" / "selfsigned-key.pem").stat().st_mode & 0o777, 0o600)
