"""
Tests for the per-client connection limit's exceptions
(L{mailfw.smtp.SMTPLimits.connectionLimitExceptions}, honoured by
L{mailfw.smtp.SMTPFactory}), for the HELP reply
(L{mailfw.smtp._replies.helpReply}), for the session limits every
listener kind keeps alike (foreign requests, error limits), and for stress
mode (the shorter limits of sessions that begin while a listener is
nearly full).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.cred.credentials import IUsernamePassword
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailfw.config import ConfigError, Section
from mailfw.envelope import Session
from mailfw.smtp import SMTPFactory, SMTPLimits, SMTPServerProtocol
from mailfw.smtp import _replies as R
from tests._smtpdoubles import (
    HOSTNAME,
    Connection,
    DictRouter,
    RecordingQueue,
    StagePolicy,
    TLSStringTransport,
    connect,
)
from tests.test_smtp_auth import login, makeAuth, plain, secure

TURNED_AWAY = b"421 mx.example.org Too many connections from your address, try again later\r\n"


def factory(limits: SMTPLimits) -> SMTPFactory:
    return SMTPFactory("smtp", HOSTNAME, RecordingQueue(), DictRouter(), Clock(), limits=limits)  # type: ignore[arg-type]


def openFrom(factory: SMTPFactory, address: IAddress) -> bytes:
    """
    Connect from C{address} and return what the server said first.
    """
    proto = factory.buildProtocol(address)
    assert proto is not None
    transport = StringTransport(peerAddress=address)
    proto.makeConnection(transport)
    return bytes(transport.value())


class ConnectionLimitExceptionsTests(SynchronousTestCase):
    def test_defaultIsLoopback(self) -> None:
        """
        By default the IPv4 and IPv6 loopback networks are exempt, and
        nothing else.
        """
        limits = SMTPLimits()
        self.assertEqual(
            limits.connectionLimitExceptions,
            (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        )
        for host in ("127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1", "::FFFF:127.0.0.2"):
            self.assertTrue(limits.exemptFromClientLimit(host), host)
        for host in ("192.0.2.1", "::2", "::ffff:192.0.2.1", "fe80::1", "UNIXAddress(None)", ""):
            self.assertFalse(limits.exemptFromClientLimit(host), host)

    def test_loopbackNotHeldToPerClientLimit(self) -> None:
        """
        More than C{maxConnectionsPerClient} sessions from 127.0.0.1 (a
        local relay, a benchmark) are all served, while another client is
        still limited.
        """
        f = factory(SMTPLimits(maxConnectionsPerClient=2))
        for port in range(5):
            self.assertTrue(openFrom(f, IPv4Address("TCP", "127.0.0.1", 1000 + port)).startswith(b"220 "))
        self.assertEqual(f.connectionsFrom(IPv4Address("TCP", "127.0.0.1", 1)), 5)
        openFrom(f, IPv4Address("TCP", "192.0.2.1", 1000))
        openFrom(f, IPv4Address("TCP", "192.0.2.1", 1001))
        self.assertEqual(openFrom(f, IPv4Address("TCP", "192.0.2.1", 1002)), TURNED_AWAY)

    def test_mappedAddressCountsAsIPv4(self) -> None:
        """
        An IPv4-mapped IPv6 peer is exempt like its IPv4 address, and is
        counted together with it.
        """
        f = factory(SMTPLimits(maxConnectionsPerClient=1))
        for port in range(3):
            value = openFrom(f, IPv6Address("TCP", "::ffff:127.0.0.1", 1000 + port))
            self.assertTrue(value.startswith(b"220 "))
        self.assertEqual(f.connectionsFrom(IPv4Address("TCP", "127.0.0.1", 1)), 3)
        openFrom(f, IPv4Address("TCP", "192.0.2.7", 1000))
        self.assertEqual(openFrom(f, IPv6Address("TCP", "::ffff:192.0.2.7", 1000)), TURNED_AWAY)

    def test_totalLimitStillApplies(self) -> None:
        """
        Exempt clients still count towards, and are held to, the total
        limit.
        """
        f = factory(SMTPLimits(maxConnections=2, maxConnectionsPerClient=1))
        openFrom(f, IPv4Address("TCP", "127.0.0.1", 1000))
        openFrom(f, IPv4Address("TCP", "127.0.0.1", 1001))
        self.assertEqual(
            openFrom(f, IPv4Address("TCP", "127.0.0.1", 1002)),
            b"421 mx.example.org Too many connections, try again later\r\n",
        )

    def test_emptyListHoldsEveryone(self) -> None:
        """
        With no exceptions, loopback clients are limited like any other.
        """
        f = factory(SMTPLimits(maxConnectionsPerClient=1, connectionLimitExceptions=()))
        openFrom(f, IPv4Address("TCP", "127.0.0.1", 1000))
        self.assertEqual(openFrom(f, IPv4Address("TCP", "127.0.0.1", 1001)), TURNED_AWAY)

    def test_unixPeerNotExempt(self) -> None:
        """
        A peer without an IP address (a UNIX socket) is held to the limit.
        """
        f = factory(SMTPLimits(maxConnectionsPerClient=1))
        openFrom(f, UNIXAddress(None))
        self.assertEqual(openFrom(f, UNIXAddress(None)), TURNED_AWAY)

    def test_fromSection(self) -> None:
        """
        C{connection_limit_exceptions} takes CIDRs and single addresses;
        host bits are ignored; the networks are stored as a tuple.
        """
        options: dict[str, Any] = {
            "connection_limit_exceptions": ["10.0.0.1/8", "2001:db8::/32", "192.0.2.9"]
        }
        limits = SMTPLimits.fromSection(Section("[smtp]", options))
        self.assertEqual(
            limits.connectionLimitExceptions,
            (
                ipaddress.ip_network("10.0.0.0/8"),
                ipaddress.ip_network("2001:db8::/32"),
                ipaddress.ip_network("192.0.2.9/32"),
            ),
        )
        self.assertTrue(limits.exemptFromClientLimit("10.1.2.3"))
        self.assertFalse(limits.exemptFromClientLimit("127.0.0.1"))
        default = SMTPLimits.fromSection(Section("[smtp]", {}))
        self.assertEqual(default.connectionLimitExceptions, SMTPLimits().connectionLimitExceptions)
        empty = SMTPLimits.fromSection(Section("[smtp]", {"connection_limit_exceptions": []}))
        self.assertEqual(empty.connectionLimitExceptions, ())

    def test_fromSectionErrors(self) -> None:
        """
        A bad network or a value that is not a list of strings names the
        section, the key and the entry.
        """
        e = self.assertRaises(
            ConfigError,
            SMTPLimits.fromSection,
            Section("[smtp]", {"connection_limit_exceptions": ["127.0.0.0/8", "localhost"]}),
        )
        self.assertEqual(str(e), "[smtp] connection_limit_exceptions: bad network 'localhost'")
        e = self.assertRaises(
            ConfigError,
            SMTPLimits.fromSection,
            Section("[smtp]", {"connection_limit_exceptions": [1]}),
        )
        self.assertIn("[smtp] connection_limit_exceptions", str(e))

    def test_hashable(self) -> None:
        """
        The limits stay a hashable frozen value.
        """
        self.assertEqual(hash(SMTPLimits()), hash(SMTPLimits()))


class HelpReplyTests(SynchronousTestCase):
    BASE = "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP"

    def test_onlyOfferedCommands(self) -> None:
        """
        HELP lists STARTTLS, AUTH and ETRN only when the session's EHLO
        keywords offer them.
        """
        plain = ["PIPELINING", "SIZE 1000", "8BITMIME", "CHUNKING", "DSN"]
        self.assertEqual(R.helpReply(plain), R.helpReply([]))
        self.assertEqual(R.helpReply(plain).text, self.BASE)
        self.assertEqual(R.helpReply([*plain, "STARTTLS"]).text, self.BASE + " STARTTLS")
        self.assertEqual(R.helpReply([*plain, "AUTH PLAIN LOGIN", "ETRN"]).text, self.BASE + " AUTH ETRN")
        self.assertEqual(
            R.helpReply(["ETRN", "AUTH PLAIN", "STARTTLS"]).text,
            self.BASE + " STARTTLS AUTH ETRN",
        )
        reply = R.helpReply(plain)
        self.assertEqual((reply.code, reply.enhanced), (214, "2.0.0"))


LISTENERS = ("smtp", "submission", "submissions")
HTTP_REQUESTS = (
    b"GET / HTTP/1.1",
    b"POST /login HTTP/1.1",
    b"CONNECT mx.example.org:443 HTTP/1.1",
    b"HEAD / HTTP/1.0",
    b"PUT /x HTTP/1.1",
    b"OPTIONS * HTTP/1.1",
    b"DELETE /x HTTP/1.1",
    b"PATCH /x HTTP/1.1",
    b"TRACE / HTTP/1.1",
    b"M-SEARCH * HTTP/1.1",
    b"PROPFIND /dav HTTP/1.1",
    b"GET /",
)
"""Foreign requests: the verbs of HTTP, and any line shaped like an HTTP
request line (M-SEARCH is not even a valid SMTP verb)."""


def session(kind: str, phase: str) -> Connection:
    """
    A C{kind} session with C{phase} done: C{"greeted"} (only the greeting),
    C{"ehlo"} (inside TLS where the listener has it, not authenticated),
    C{"sasl"} (inside an AUTH LOGIN exchange) or C{"authenticated"}.  The
    transport holds no replies yet.
    """
    if phase == "greeted":
        return connect(kind, auth=makeAuth(Clock()))
    conn = secure(kind)
    if phase == "sasl":
        conn.send(b"AUTH LOGIN\r\n")
        assert conn.replies() == [b"334 VXNlcm5hbWU6"], conn.replies()
        conn.transport.clear()
    elif phase == "authenticated":
        login(conn)
    return conn


class ForeignRequestTests(SynchronousTestCase):
    """
    An HTTP request gets one 221 2.7.0 and an immediate close on every
    listener kind, before EHLO, before and during AUTH and after it.
    """

    def test_everyListenerAndPhase(self) -> None:
        """
        Each foreign request, with the rest of an HTTP request pipelined
        behind it, gets exactly one reply and the connection is closed;
        nothing behind it is read.
        """
        for kind in LISTENERS:
            for phase in ("greeted", "ehlo", "sasl", "authenticated"):
                for request in HTTP_REQUESTS:
                    conn = session(kind, phase)
                    with capturedLogs() as events:
                        conn.send(request + b"\r\nHost: mx.example.org\r\nQUIT\r\n\r\n")
                    where = (kind, phase, request)
                    [reply] = conn.replies()
                    self.assertEqual(reply[:4], b"221 ", where)
                    self.assertIn(b"Not an SMTP client", reply, where)
                    if phase != "greeted":
                        self.assertEqual(reply[4:10], b"2.7.0 ", where)
                    self.assertTrue(conn.closed, where)
                    logged = [e for e in events if "non-SMTP" in e["log_format"]]
                    self.assertEqual(len(logged), 1, where)
                    self.assertEqual(logged[0]["peer"], "192.0.2.1:40000", where)
                    self.assertEqual(logged[0]["listener"], kind, where)

    def test_smtpLookalikesAreNotForeign(self) -> None:
        """
        A command that merely mentions HTTP, or an unknown verb without a
        request-line shape, is an ordinary error, not a reason to close.
        """
        conn = connect()
        conn.send(b"EHLO http.example\r\nXGET / x\r\nNOOP GET / HTTP/1.1\r\n")
        self.assertEqual(conn.codes(), [b"250", b"500", b"250"])
        self.assertFalse(conn.closed)


class ErrorLimitTests(SynchronousTestCase):
    """
    The error limits hold on every listener kind, before and after AUTH.
    """

    def test_hardLimitEveryListenerAndPhase(self) -> None:
        """
        At C{hardErrorLimit} errors the session gets 421 4.7.0 instead of
        the error and is closed.
        """
        for kind in LISTENERS:
            for phase in ("greeted", "ehlo", "authenticated"):
                conn = session(kind, phase)
                for _ in range(SMTPLimits().hardErrorLimit - 1):
                    conn.send(b"XYZZY\r\n")
                    conn.clock.advance(SMTPLimits().errorDelay)
                where = (kind, phase)
                self.assertEqual(set(conn.codes()), {b"500"}, where)
                self.assertFalse(conn.closed, where)
                conn.send(b"XYZZY\r\n")
                conn.clock.advance(SMTPLimits().errorDelay)
                self.assertEqual(conn.codes()[-1], b"421", where)
                self.assertIn(b"Too many errors", conn.replies()[-1], where)
                self.assertTrue(conn.closed, where)

    def test_softLimitDelaysEveryListener(self) -> None:
        """
        Past C{softErrorLimit} each error reply waits C{errorDelay} on the
        clock, on every listener kind and after AUTH too.
        """
        for kind in LISTENERS:
            conn = session(kind, "authenticated")
            for _ in range(SMTPLimits().softErrorLimit):
                conn.send(b"XYZZY\r\n")
            self.assertEqual(len(conn.codes()), SMTPLimits().softErrorLimit, kind)
            conn.send(b"XYZZY\r\n")
            self.assertEqual(len(conn.codes()), SMTPLimits().softErrorLimit, kind)
            conn.clock.advance(SMTPLimits().errorDelay - 0.01)
            self.assertEqual(len(conn.codes()), SMTPLimits().softErrorLimit, kind)
            conn.clock.advance(0.01)
            self.assertEqual(conn.codes()[-1], b"500", kind)


def stressFactory(clock: Clock, policies: Any = (), **limits: Any) -> SMTPFactory:
    """
    A listener of 10 connections whose stress mode begins at 4, unless
    C{limits} say otherwise.
    """
    limits.setdefault("stressThreshold", 4)
    return SMTPFactory(
        "smtp",
        HOSTNAME,
        RecordingQueue(),  # type: ignore[arg-type]
        DictRouter(),
        clock,
        policies,
        limits=SMTPLimits(maxConnections=10, **limits),
    )


def openSession(f: SMTPFactory, port: int) -> tuple[SMTPServerProtocol, StringTransport]:
    """
    Connect to C{f} from its own port of 192.0.2.1; drop the greeting.
    """
    address = IPv4Address("TCP", "192.0.2.1", port)
    proto = f.buildProtocol(address)
    assert isinstance(proto, SMTPServerProtocol)
    transport = StringTransport(peerAddress=address)
    proto.makeConnection(transport)
    assert transport.value() == b"220 mx.example.org ESMTP\r\n", transport.value()
    transport.clear()
    return proto, transport


class EndedPolicy(StagePolicy):
    """
    Records the sessions it is told have ended.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ended: list[Session] = []

    def sessionEnded(self, session: Session) -> None:
        self.ended.append(session)


class StressTests(SynchronousTestCase):
    """
    Stress mode (L{SMTPLimits.stressAt}): the listener factory decides it
    per connection; a session that begins under stress has the shorter
    idle timeout and the lower hard error limit, and says so in
    C{Session.stressed}.
    """

    def test_threshold(self) -> None:
        """
        By default stress begins at four fifths of C{maxConnections}; 0
        turns it off; C{underStress} only ever tightens, and 0 keeps a
        limit as it is.
        """
        self.assertEqual(SMTPLimits().stressAt, 800)
        self.assertEqual(SMTPLimits(maxConnections=10).stressAt, 8)
        self.assertEqual(SMTPLimits(stressThreshold=0).stressAt, 0)
        self.assertEqual(SMTPLimits(stressThreshold=5).stressAt, 5)
        stressed = SMTPLimits().underStress()
        self.assertEqual((stressed.idleTimeout, stressed.hardErrorLimit), (10.0, 1))
        self.assertEqual(stressed.softErrorLimit, SMTPLimits().softErrorLimit)
        loose = SMTPLimits(idleTimeout=5, hardErrorLimit=3, stressIdleTimeout=60, stressHardErrorLimit=0)
        self.assertEqual(loose.underStress(), loose)

    def test_fromSection(self) -> None:
        """
        The stress options are read from C{[smtp]} like the others;
        negative values are refused.
        """
        limits = SMTPLimits.fromSection(
            Section(
                "[smtp]",
                {"stress_threshold": 50, "stress_idle_timeout": 5, "stress_hard_error_limit": 2},
            )
        )
        self.assertEqual(
            (limits.stressAt, limits.stressIdleTimeout, limits.stressHardErrorLimit), (50, 5.0, 2)
        )
        self.assertIsNone(SMTPLimits.fromSection(Section("[smtp]", {})).stressThreshold)
        for key in ("stress_threshold", "stress_idle_timeout", "stress_hard_error_limit"):
            e = self.assertRaises(ConfigError, SMTPLimits.fromSection, Section("[smtp]", {key: -1}))
            self.assertIn(f"[smtp] {key}", str(e))

    def test_stressedIdleTimeout(self) -> None:
        """
        A session that begins at the threshold times out after the stress
        idle timeout; those that began before keep the normal one.
        """
        clock = Clock()
        f = stressFactory(clock, stressIdleTimeout=10)
        calm = [openSession(f, 1000 + i) for i in range(3)]
        self.assertFalse(f.stressed)
        proto, transport = openSession(f, 2000)
        self.assertTrue(f.stressed)
        self.assertTrue(proto.session.stressed)
        self.assertFalse(any(p.session.stressed for p, _ in calm))
        clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.1)
        self.assertEqual(transport.value(), b"421 mx.example.org Timeout exceeded, closing connection\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertFalse(any(t.disconnecting for _, t in calm))
        clock.advance(SMTPLimits().idleTimeout - 10)
        self.assertTrue(all(t.disconnecting for _, t in calm), "calm sessions kept the normal timeout")

    def test_stressedHardErrorLimit(self) -> None:
        """
        A session that begins under stress is closed at its first error
        reply (C{stressHardErrorLimit} 1: 421 4.7.0 instead of the error);
        one that began before gets the error and goes on.
        """
        f = stressFactory(Clock())
        calm = [openSession(f, 1000 + i) for i in range(3)]
        proto, transport = openSession(f, 2000)
        proto.dataReceived(b"XYZZY\r\n")
        self.assertEqual(transport.value()[:4], b"421 ")
        self.assertIn(b"Too many errors", transport.value())
        self.assertTrue(transport.disconnecting)
        calmProto, calmTransport = calm[0]
        calmProto.dataReceived(b"XYZZY\r\nNOOP\r\n")
        self.assertEqual([line[:3] for line in calmTransport.value().splitlines()], [b"500", b"250"])
        self.assertFalse(calmTransport.disconnecting)

    def test_enterAndLeaveLoggedOnce(self) -> None:
        """
        Entering stress mode is logged once, at the threshold, however many
        sessions begin under it; leaving once, below three quarters of the
        threshold (not at every connection around it); then new sessions
        are calm again.
        """
        f = stressFactory(Clock(), stressThreshold=8)
        with capturedLogs() as events:
            sessions = [openSession(f, 1000 + i) for i in range(10)]
            for proto, _ in sessions[:3]:
                proto.connectionLost(Failure(ConnectionDone()))
            self.assertTrue(f.stressed, "left stress mode too early")
            self.assertTrue(openSession(f, 3000)[0].session.stressed)
            for proto, _ in sessions[3:6]:
                proto.connectionLost(Failure(ConnectionDone()))
        on, off = (e for e in events if e.get("event") == "listener.stress")
        self.assertEqual(
            [formatEvent(e) for e in (on, off)],
            [
                "smtp listener: stress mode on at 8 connections",
                "smtp listener: stress mode off at 5 connections",
            ],
        )
        self.assertEqual((on["log_level"], off["log_level"]), (LogLevel.warn, LogLevel.info))
        self.assertEqual((on["connections"], off["connections"]), (8, 5))
        self.assertEqual(
            [(e["event"], e["listener"], e["stressed"]) for e in (on, off)],
            [("listener.stress", "smtp", True), ("listener.stress", "smtp", False)],
        )
        self.assertEqual([p.session.stressed for p, _ in sessions], [False] * 7 + [True] * 3)
        self.assertFalse(f.stressed)
        self.assertFalse(openSession(f, 4000)[0].session.stressed)

    def test_thresholdOff(self) -> None:
        """
        With C{stressThreshold} 0 no session is ever stressed.
        """
        f = stressFactory(Clock(), stressThreshold=0)
        sessions = [openSession(f, 1000 + i) for i in range(10)]
        self.assertFalse(f.stressed)
        self.assertFalse(any(p.session.stressed for p, _ in sessions))

    def test_policiesSeeErrorsAtEnd(self) -> None:
        """
        The session a policy is told has ended carries its error replies
        and failed AUTH exchanges (not its server's temporary failures),
        for a policy that counts them across sessions.
        """
        clock = Clock()
        policy = EndedPolicy()
        conn = connect(
            "submissions",
            [policy],
            auth=makeAuth(clock, maxFailures=100),
            clock=clock,
            transportFactory=TLSStringTransport,
        )
        conn.send(b"EHLO client.example.net\r\nXYZZY\r\n")
        conn.send(b"AUTH PLAIN " + plain(password="wrong") + b"\r\n")
        conn.send(b"AUTH PLAIN " + plain(password="wrong") + b"\r\n")
        login(conn)
        self.assertEqual(policy.ended, [])
        conn.proto.connectionLost(Failure(ConnectionDone()))
        [ended] = policy.ended
        self.assertEqual((ended.errors, ended.authFailures), (3, 2))
        self.assertEqual(ended.authenticated, "alice@example.org")

    def test_temporaryAuthFailureNotCounted(self) -> None:
        """
        An AUTH exchange that fails on the server's side (454 4.7.0) is not
        the client's failure.
        """
        clock = Clock()
        policy = EndedPolicy()

        class Broken:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials: object) -> Deferred[bytes]:
                return fail(OSError("directory down"))

        conn = connect(
            "submissions",
            [policy],
            auth=makeAuth(clock, credentialsChecker=Broken()),
            clock=clock,
            transportFactory=TLSStringTransport,
        )
        conn.send(b"EHLO client.example.net\r\nAUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(conn.codes()[-1], b"454")
        conn.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(policy.ended[0].authFailures, 0)
        self.flushLoggedErrors(OSError)
