"""
The Dovecot authentication client and checker (L{mailfw.auth._dovecot}),
over L{StringTransport}s handed out by a scripted endpoint, with a
L{Clock} for the timeouts and pauses.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, cast

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailfw._sockets import socketEndpoint
from mailfw.auth import IMailUser, MailRealm
from mailfw.auth._checker import SessionCredentials, TemporaryAuthFailure
from mailfw.auth._config import authFromConfig
from mailfw.auth._dovecot import (
    MAX_LINE,
    DovecotAuthClient,
    DovecotAuthProtocol,
    DovecotChecker,
    DovecotProtocolError,
    DovecotReply,
    DovecotTimeout,
    DovecotUnavailable,
    escape,
    unescape,
)
from mailfw.config import ComponentContext, ConfigError, Section
from mailfw.envelope import Session
from mailfw.interfaces import ISessionCredentials
from mailfw.smtp._auth import AuthThrottle, SMTPAuth
from tests._smtpdoubles import EHLO, TLSStringTransport, connect

HANDSHAKE = (
    b"VERSION\t1\t2\n"
    b"MECH\tPLAIN\tplaintext\n"
    b"MECH\tLOGIN\tplaintext\n"
    b"SPID\t4242\n"
    b"CUID\t7\n"
    b"COOKIE\t0123456789abcdef\n"
    b"DONE\n"
)


def plainResponse(user: bytes, password: bytes) -> bytes:
    return base64.b64encode(b"\x00" + user + b"\x00" + password)


@implementer(IStreamClientEndpoint)
class ScriptedEndpoint:
    """
    An endpoint whose connection attempts the test completes or refuses.
    """

    def __init__(self) -> None:
        self.attempts: list[tuple[IProtocolFactory, Deferred[Any]]] = []

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        d: Deferred[Any] = Deferred(lambda d: self.attempts.remove(attempt))
        attempt = (protocolFactory, d)
        self.attempts.append(attempt)
        return d

    def accept(self) -> tuple[DovecotAuthProtocol, StringTransport]:
        factory, d = self.attempts.pop(0)
        protocol: object = factory.buildProtocol(cast(Any, None))
        assert isinstance(protocol, DovecotAuthProtocol)
        transport = StringTransport()
        protocol.makeConnection(transport)
        d.callback(protocol)
        return protocol, transport

    def refuse(self) -> None:
        _, d = self.attempts.pop(0)
        d.errback(ConnectionRefusedError("refused"))


class Harness:
    """
    A client on a scripted endpoint and a clock.
    """

    def __init__(self, **kw: Any) -> None:
        self.clock = Clock()
        self.endpoint = ScriptedEndpoint()
        self.client = DovecotAuthClient(self.endpoint, self.clock, description="test", **kw)

    def ready(self) -> tuple[DovecotAuthProtocol, StringTransport]:
        """
        Accept the pending connection attempt (starting the service to
        make one if needed) and complete the handshake.
        """
        if not self.endpoint.attempts:
            self.client.startService()
        protocol, transport = self.endpoint.accept()
        protocol.dataReceived(HANDSHAKE)
        return protocol, transport

    def sent(self, transport: StringTransport) -> list[bytes]:
        lines: list[bytes] = transport.value().split(b"\n")
        transport.clear()
        assert lines[-1] == b""
        return lines[:-1]


def lost(protocol: DovecotAuthProtocol) -> None:
    protocol.connectionLost(Failure(ConnectionDone("closed")))


class EscapingTests(SynchronousTestCase):
    def test_escape(self) -> None:
        """
        TAB, CR, LF, NUL and the escape character itself become two
        characters each; nothing else changes.
        """
        self.assertEqual(escape("a\tb\rc\nd\x00e\x01f"), "a\x01tb\x01rc\x01nd\x010e\x011f")
        self.assertEqual(escape("rip=192.0.2.1 zoë"), "rip=192.0.2.1 zoë")

    def test_unescapeRoundTrip(self) -> None:
        """
        L{unescape} undoes L{escape}.
        """
        for value in ("", "plain", "\t\r\n\x00\x01", "\x01\x01t", "x\x01"):
            self.assertEqual(unescape(escape(value)), value)

    def test_unescapeUnknown(self) -> None:
        """
        An unknown escape stands for the character after it, and a lone
        escape at the end is dropped.
        """
        self.assertEqual(unescape("a\x01zb\x01"), "azb")


class HandshakeTests(SynchronousTestCase):
    def test_handshakeThenRequest(self) -> None:
        """
        The client sends VERSION 1.2 and CPID on connecting; a request
        waits for DONE and is then sent as AUTH with the next ID, the
        service, and the base64 response.
        """
        h = Harness()
        d = h.client.authenticate("plain", b"\x00alice\x00pw", secured=True)
        protocol, transport = h.endpoint.accept()
        lines = h.sent(transport)
        self.assertEqual(lines[0], b"VERSION\t1\t2")
        self.assertTrue(lines[1].startswith(b"CPID\t") and lines[1][5:].isdigit(), lines)
        self.assertEqual(len(lines), 2)
        protocol.dataReceived(HANDSHAKE[:-5])
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(b"DONE\n")
        self.assertEqual(
            h.sent(transport),
            [b"AUTH\t1\tPLAIN\tservice=smtp\tsecured\tresp=" + plainResponse(b"alice", b"pw")],
        )
        self.assertEqual(protocol.mechanisms, {"PLAIN": {"plaintext"}, "LOGIN": {"plaintext"}})
        self.assertEqual((protocol.serverPID, protocol.connectionID), ("4242", "7"))
        self.assertEqual(protocol.cookie, "0123456789abcdef")
        self.assertNoResult(d)

    def test_requestParameters(self) -> None:
        """
        Without C{secured} the flag is left out; the client's address and
        port go as C{rip} and C{rport}, escaped; no response means no
        C{resp}.
        """
        h = Harness(service="sub\tmission")
        _protocol, transport = h.ready()
        h.sent(transport)
        h.client.authenticate("PLAIN", None, secured=False, peerHost="2001:db8::1", peerPort=4711)
        self.assertEqual(
            h.sent(transport), [b"AUTH\t1\tPLAIN\tservice=sub\x01tmission\trip=2001:db8::1\trport=4711"]
        )

    def test_unknownHandshakeLinesIgnored(self) -> None:
        """
        Handshake lines of later protocol versions are ignored.
        """
        h = Harness()
        h.client.authenticate("PLAIN", b"x")
        protocol, transport = h.endpoint.accept()
        protocol.dataReceived(HANDSHAKE.replace(b"DONE\n", b"NEWTHING\tx\nDONE\n"))
        self.assertTrue(protocol.ready)
        self.assertIn(b"AUTH\t1\tPLAIN", transport.value())

    def test_wrongMajorVersion(self) -> None:
        """
        A server speaking another major version is dropped, and the
        waiting request fails with L{DovecotProtocolError}.
        """
        h = Harness()
        d = h.client.authenticate("PLAIN", b"x")
        protocol, transport = h.endpoint.accept()
        protocol.dataReceived(b"VERSION\t2\t0\n")
        self.assertTrue(transport.disconnecting)
        lost(protocol)
        self.failureResultOf(d, DovecotProtocolError)

    def test_noVersionFirst(self) -> None:
        """
        A handshake that does not start with VERSION is a protocol error.
        """
        h = Harness()
        d = h.client.authenticate("PLAIN", b"x")
        protocol, transport = h.endpoint.accept()
        protocol.dataReceived(b"MECH\tPLAIN\n")
        self.assertTrue(transport.disconnecting)
        lost(protocol)
        self.failureResultOf(d, DovecotProtocolError)

    def test_mechanismNotOffered(self) -> None:
        """
        A request for a mechanism Dovecot did not list fails with
        L{DovecotUnavailable} (a configuration problem, 454) and is not
        sent.
        """
        h = Harness()
        d = h.client.authenticate("CRAM-MD5", b"x")
        _, transport = h.ready()
        h.sent(transport)
        f = self.failureResultOf(d, DovecotUnavailable)
        self.assertIn("does not offer CRAM-MD5", str(f.value))
        self.assertEqual(transport.value(), b"")

    def test_handshakeTimeout(self) -> None:
        """
        A server that accepts but never says DONE is dropped after the
        timeout, and the next attempt waits for the pause.
        """
        h = Harness(timeout=5)
        d = h.client.authenticate("PLAIN", b"x")
        protocol, transport = h.endpoint.accept()
        protocol.dataReceived(b"VERSION\t1\t2\n")
        h.clock.advance(5)
        self.assertTrue(transport.disconnecting)
        self.failureResultOf(d, DovecotTimeout)
        lost(protocol)
        self.failureResultOf(h.client.authenticate("PLAIN", b"x"), DovecotUnavailable)
        self.assertEqual(h.endpoint.attempts, [])


class ReplyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.protocol, self.transport = self.h.ready()
        self.h.sent(self.transport)

    def test_ok(self) -> None:
        """
        OK fires the request's L{Deferred} with its parameters.
        """
        d = self.h.client.authenticate("PLAIN", b"x")
        self.protocol.dataReceived(b"OK\t1\tuser=alice\n")
        self.assertEqual(self.successResultOf(d), DovecotReply("OK", 1, {"user": "alice"}))
        self.assertEqual(self.h.client.pending, 0)
        self.assertEqual(self.h.clock.getDelayedCalls(), [])

    def test_failWithReason(self) -> None:
        """
        FAIL carries its parameters, unescaped; a C{temp} flag or
        C{code=temp_fail} makes it temporary.
        """
        d1 = self.h.client.authenticate("PLAIN", b"x")
        d2 = self.h.client.authenticate("PLAIN", b"x")
        d3 = self.h.client.authenticate("PLAIN", b"x")
        self.protocol.dataReceived(
            b"FAIL\t2\tuser=bob\ttemp\n"
            b"FAIL\t1\tuser=alice\treason=Wrong\x01tpassword\n"
            b"FAIL\t3\tcode=temp_fail\n"
        )
        r1, r2, r3 = (self.successResultOf(d) for d in (d1, d2, d3))
        self.assertEqual(r1.parameters, {"user": "alice", "reason": "Wrong\tpassword"})
        self.assertFalse(r1.temporary)
        self.assertEqual(r2.parameters, {"user": "bob", "temp": ""})
        self.assertTrue(r2.temporary)
        self.assertTrue(r3.temporary)

    def test_cont(self) -> None:
        """
        CONT fires with the decoded challenge.
        """
        d = self.h.client.authenticate("LOGIN", None)
        self.protocol.dataReceived(b"CONT\t1\t" + base64.b64encode(b"Username:") + b"\n")
        self.assertEqual(self.successResultOf(d), DovecotReply("CONT", 1, {}, b"Username:"))

    def test_requestIDsShareOneConnection(self) -> None:
        """
        Several requests are in flight on one connection at once and are
        answered by ID, in any order.
        """
        ds = [self.h.client.authenticate("PLAIN", b"x") for _ in range(3)]
        sent = self.h.sent(self.transport)
        self.assertEqual([line.split(b"\t")[1] for line in sent], [b"1", b"2", b"3"])
        self.protocol.dataReceived(b"OK\t3\nFAIL\t1\nOK\t2\n")
        self.assertEqual([self.successResultOf(d).kind for d in ds], ["FAIL", "OK", "OK"])
        self.assertEqual(self.h.endpoint.attempts, [])

    def test_unknownIDIgnored(self) -> None:
        """
        An answer to no request (one that timed out) is logged and
        ignored; the connection stays up.
        """
        d = self.h.client.authenticate("PLAIN", b"x")
        with capturedLogs() as events:
            self.protocol.dataReceived(b"OK\t99\tuser=mallory\n")
        self.assertNoResult(d)
        self.assertEqual([e.get("requestID") for e in events], [99])
        self.assertFalse(self.transport.disconnecting)
        self.protocol.dataReceived(b"OK\t1\n")
        self.assertEqual(self.successResultOf(d).kind, "OK")

    def test_unknownCommandIgnored(self) -> None:
        """
        Unknown commands after the handshake are ignored, as the protocol
        asks.
        """
        d = self.h.client.authenticate("PLAIN", b"x")
        self.protocol.dataReceived(b"NOTIFY\tsomething\n\nOK\t1\n")
        self.assertEqual(self.successResultOf(d).kind, "OK")
        self.assertFalse(self.transport.disconnecting)

    def assertBroken(self, data: bytes) -> None:
        d = self.h.client.authenticate("PLAIN", b"x")
        self.protocol.dataReceived(data)
        self.assertTrue(self.transport.disconnecting, f"{data!r} did not drop the connection")
        lost(self.protocol)
        self.failureResultOf(d, DovecotProtocolError)

    def test_replyWithoutID(self) -> None:
        """
        OK without a numeric request ID drops the connection and fails
        the requests in flight with L{DovecotProtocolError}.
        """
        self.assertBroken(b"OK\n")

    def test_replyWithBadID(self) -> None:
        """
        A request ID that is not a decimal number is a protocol error too.
        """
        self.assertBroken(b"FAIL\t-1\n")

    def test_contNotBase64(self) -> None:
        """
        A CONT challenge that is not base64 is a protocol error.
        """
        self.assertBroken(b"CONT\t1\tnot base64!\n")

    def test_oversizeLine(self) -> None:
        """
        A line longer than Dovecot's own limit drops the connection before
        it is buffered further.
        """
        self.assertBroken(b"OK\t1\tuser=" + b"a" * MAX_LINE)

    def test_brokenConnectionIgnoresRest(self) -> None:
        """
        After a protocol error, later lines in the same read are not
        believed.
        """
        d1 = self.h.client.authenticate("PLAIN", b"x")
        d2 = self.h.client.authenticate("PLAIN", b"x")
        self.protocol.dataReceived(b"OK\tx\nOK\t2\n")
        lost(self.protocol)
        self.failureResultOf(d1, DovecotProtocolError)
        self.failureResultOf(d2, DovecotProtocolError)


class ConnectionTests(SynchronousTestCase):
    def test_lossFailsPending(self) -> None:
        """
        A lost connection fails every request in flight with
        L{DovecotUnavailable}; the next request connects again at once.
        """
        h = Harness()
        protocol, _transport = h.ready()
        ds = [h.client.authenticate("PLAIN", b"x") for _ in range(2)]
        lost(protocol)
        for d in ds:
            f = self.failureResultOf(d, DovecotUnavailable)
            self.assertIn("connection to Dovecot lost", str(f.value))
        self.assertEqual(h.client.pending, 0)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        d = h.client.authenticate("PLAIN", b"x")
        protocol2, transport2 = h.ready()
        self.assertIn(b"AUTH\t3\tPLAIN", transport2.value())
        protocol2.dataReceived(b"OK\t3\n")
        self.assertEqual(self.successResultOf(d).kind, "OK")

    def test_refusedThenBackoff(self) -> None:
        """
        A refused connection fails the waiting request; for a pause that
        doubles with each failure (0.5 s, 1 s, ...) requests fail at once
        without a connection attempt; after a handshake the pause is
        back to its minimum.
        """
        h = Harness(minDelay=0.5, maxDelay=1.5)
        d = h.client.authenticate("PLAIN", b"x")
        with capturedLogs() as events:
            h.endpoint.refuse()
        self.failureResultOf(d, DovecotUnavailable)
        self.assertEqual([e["log_level"] for e in events], [LogLevel.warn])
        self.failureResultOf(h.client.authenticate("PLAIN", b"x"), DovecotUnavailable)
        self.assertEqual(h.endpoint.attempts, [])
        for pause in (0.5, 1.0, 1.5, 1.5):
            h.clock.advance(pause - 0.01)
            self.failureResultOf(h.client.authenticate("PLAIN", b"x"), DovecotUnavailable)
            self.assertEqual(h.endpoint.attempts, [], f"attempt before the pause of {pause}s ended")
            h.clock.advance(0.01)
            d = h.client.authenticate("PLAIN", b"x")
            h.endpoint.refuse()
            self.failureResultOf(d, DovecotUnavailable)
        h.clock.advance(1.5)
        d = h.client.authenticate("PLAIN", b"x")
        protocol, _ = h.ready()
        protocol.dataReceived(b"OK\t" + str(h.client._nextID).encode() + b"\n")
        self.successResultOf(d)
        lost(protocol)
        # Lost after a handshake: no pause at all.
        d = h.client.authenticate("PLAIN", b"x")
        h.endpoint.refuse()
        self.failureResultOf(d, DovecotUnavailable)
        h.clock.advance(0.5)
        h.client.authenticate("PLAIN", b"x")
        self.assertEqual(len(h.endpoint.attempts), 1)

    def test_timeout(self) -> None:
        """
        A request without an answer within the timeout fails with
        L{DovecotTimeout} (a Twisted L{TimeoutError}); its late answer is
        ignored.
        """
        h = Harness(timeout=10)
        protocol, transport = h.ready()
        d = h.client.authenticate("PLAIN", b"x")
        h.clock.advance(9.9)
        self.assertNoResult(d)
        h.clock.advance(0.1)
        f = self.failureResultOf(d, DovecotTimeout)
        self.assertIsInstance(f.value, TimeoutError)
        self.assertEqual(h.client.pending, 0)
        protocol.dataReceived(b"OK\t1\n")
        self.assertFalse(transport.disconnecting)

    def test_maxPending(self) -> None:
        """
        Beyond C{maxPending} requests in flight, more fail at once.
        """
        h = Harness(maxPending=2)
        protocol, transport = h.ready()
        h.sent(transport)
        first = h.client.authenticate("PLAIN", b"x")
        h.client.authenticate("PLAIN", b"x")
        f = self.failureResultOf(h.client.authenticate("PLAIN", b"x"), DovecotUnavailable)
        self.assertIn("2 requests already waiting", str(f.value))
        self.assertEqual(len(h.sent(transport)), 2)
        protocol.dataReceived(b"OK\t1\n")
        self.successResultOf(first)
        h.client.authenticate("PLAIN", b"x")
        self.assertEqual(len(h.sent(transport)), 1)

    def test_cancel(self) -> None:
        """
        Cancelling a request forgets it and its timer.
        """
        h = Harness()
        _protocol, _ = h.ready()
        d = h.client.authenticate("PLAIN", b"x")
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual((h.client.pending, h.clock.getDelayedCalls()), (0, []))

    def test_stopService(self) -> None:
        """
        Stopping the service closes the connection quietly and fails what
        is in flight; later requests fail at once.
        """
        h = Harness()
        h.client.startService()
        protocol, transport = h.ready()
        d = h.client.authenticate("PLAIN", b"x")
        with capturedLogs() as events:
            h.client.stopService()
            lost(protocol)
        self.assertTrue(transport.disconnecting)
        self.failureResultOf(d, DovecotUnavailable)
        self.failureResultOf(h.client.authenticate("PLAIN", b"x"), DovecotUnavailable)
        self.assertEqual(events, [])
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_handshakeAfterStop(self) -> None:
        """
        A handshake that completes after the service stopped does not
        bring the connection back.
        """
        h = Harness()
        h.client.startService()
        protocol, transport = h.endpoint.accept()
        h.client.stopService()
        protocol.dataReceived(HANDSHAKE)
        self.assertTrue(transport.disconnecting)
        self.failureResultOf(h.client.authenticate("PLAIN", b"x"), DovecotUnavailable)

    def test_startServiceConnects(self) -> None:
        """
        Starting the service connects at once, so that an unreachable
        Dovecot is logged at start-up.
        """
        h = Harness()
        h.client.startService()
        self.assertEqual(len(h.endpoint.attempts), 1)


class CheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.checker = DovecotChecker(self.h.client)
        self.protocol, self.transport = self.h.ready()
        self.h.sent(self.transport)

    def check(self, credentials: Any) -> Deferred[Any]:
        return self.checker.requestAvatarId(credentials)

    def test_interface(self) -> None:
        """
        The checker is an L{ICredentialsChecker} for user names and
        passwords.
        """
        verifyObject(ICredentialsChecker, self.checker)
        self.assertEqual(self.checker.credentialInterfaces, (IUsernamePassword,))

    def test_ok(self) -> None:
        """
        The credentials go as PLAIN, C{secured}; OK gives the user name
        Dovecot answers with.
        """
        d = self.check(UsernamePassword(b"Alice", b"pw"))
        [line] = self.h.sent(self.transport)
        self.assertEqual(
            line, b"AUTH\t1\tPLAIN\tservice=smtp\tsecured\tresp=" + plainResponse(b"Alice", b"pw")
        )
        self.protocol.dataReceived(b"OK\t1\tuser=alice\n")
        self.assertEqual(self.successResultOf(d), "alice")

    def test_okWithoutUser(self) -> None:
        """
        Without C{user=} the avatar ID is the name given.
        """
        d = self.check(UsernamePassword("zoë".encode(), b"pw"))
        self.protocol.dataReceived(b"OK\t1\n")
        self.assertEqual(self.successResultOf(d), "zoë")

    def test_fail(self) -> None:
        """
        FAIL is L{UnauthorizedLogin}.
        """
        d = self.check(UsernamePassword(b"alice", b"wrong"))
        self.protocol.dataReceived(b"FAIL\t1\tuser=alice\n")
        self.failureResultOf(d, UnauthorizedLogin)

    def test_temporaryFail(self) -> None:
        """
        FAIL with C{temp} is L{DovecotUnavailable}, a
        L{TemporaryAuthFailure}, and is logged.
        """
        d = self.check(UsernamePassword(b"alice", b"pw"))
        with capturedLogs() as events:
            self.protocol.dataReceived(b"FAIL\t1\ttemp\treason=backend down\n")
        f = self.failureResultOf(d, DovecotUnavailable)
        self.assertIsInstance(f.value, TemporaryAuthFailure)
        [event] = events
        self.assertEqual((event["log_level"], event["user"]), (LogLevel.warn, "alice"))

    def test_unexpectedCont(self) -> None:
        """
        A challenge after a complete PLAIN response is a protocol error.
        """
        d = self.check(UsernamePassword(b"alice", b"pw"))
        self.protocol.dataReceived(b"CONT\t1\t\n")
        self.failureResultOf(d, DovecotProtocolError)

    def test_unencodable(self) -> None:
        """
        Credentials PLAIN cannot carry (a NUL, empty, not UTF-8 names,
        too long) are refused without asking Dovecot.
        """
        for username, password in [
            (b"al\x00ice", b"pw"),
            (b"alice", b"p\x00w"),
            (b"", b"pw"),
            (b"alice", b""),
            (b"\xff", b"pw"),
            (b"alice", b"x" * 9000),
        ]:
            self.failureResultOf(self.check(UsernamePassword(username, password)), UnauthorizedLogin)
        self.assertEqual(self.transport.value(), b"")

    def test_sessionCredentials(self) -> None:
        """
        Credentials with their session send the client's address, and
        C{secured} only for an encrypted session.
        """
        plainSession = Session("smtp", "192.0.2.7", 5555, tls=False)
        credentials = SessionCredentials(b"alice", b"pw", plainSession)
        verifyObject(ISessionCredentials, credentials)
        verifyObject(IUsernamePassword, credentials)
        self.check(credentials)
        self.check(SessionCredentials(b"alice", b"pw", Session("submission", "2001:db8::2", 1, tls=True)))
        first, second = self.h.sent(self.transport)
        self.assertIn(b"\tservice=smtp\trip=192.0.2.7\trport=5555\tresp=", first)
        self.assertIn(b"\tservice=smtp\tsecured\trip=2001:db8::2\trport=1\tresp=", second)

    def test_unreachable(self) -> None:
        """
        An unreachable Dovecot fails the check with L{DovecotUnavailable}
        and one warning.
        """
        lost(self.protocol)
        with capturedLogs() as events:
            d = self.check(UsernamePassword(b"alice", b"pw"))
            self.h.endpoint.refuse()
        self.failureResultOf(d, DovecotUnavailable)
        self.assertEqual([e["log_level"] for e in events], [LogLevel.warn, LogLevel.warn])

    def test_portal(self) -> None:
        """
        Through a portal and L{MailRealm}, a Dovecot user gets an
        L{IMailUser} that may send as itself.
        """
        portal = Portal(MailRealm(), [self.checker])
        d = portal.login(UsernamePassword(b"alice@example.org", b"pw"), None, IMailUser)
        self.protocol.dataReceived(b"OK\t1\tuser=alice@example.org\n")
        _, avatar, _ = self.successResultOf(d)
        self.assertEqual(IMailUser(avatar).identity, "alice@example.org")
        self.assertEqual(IMailUser(avatar).senders, ("alice@example.org",))


class SessionTests(SynchronousTestCase):
    """
    What the SMTP session makes of the checker's answers.
    """

    def session(self, endpoint: ScriptedEndpoint, clock: Clock) -> Any:
        client = DovecotAuthClient(endpoint, clock, timeout=10)
        portal = Portal(MailRealm(), [DovecotChecker(client)])
        auth = SMTPAuth(portal, AuthThrottle(clock, failureDelay=0), timeout=30)
        conn = connect(
            "submissions",
            transportFactory=TLSStringTransport,
            auth=auth,
            clock=clock,
        )
        conn.send(EHLO)
        conn.transport.clear()
        return conn

    def test_dovecotDownIs454(self) -> None:
        """
        With Dovecot down, AUTH PLAIN gets 454 4.7.0 and the session goes
        on; the session logs one warning with the reason, no traceback.
        """
        clock, endpoint = Clock(), ScriptedEndpoint()
        conn = self.session(endpoint, clock)
        conn.send(b"AUTH PLAIN " + plainResponse(b"alice", b"pw") + b"\r\n")
        with capturedLogs() as events:
            endpoint.refuse()
        self.assertEqual(conn.replies(), [b"454 4.7.0 Temporary authentication failure"])
        self.assertEqual(self.flushLoggedErrors(), [])
        [warning] = [e for e in events if e["log_format"].startswith("AUTH check for")]
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.assertEqual(warning["peer"], "192.0.2.1:40000")
        self.assertIsInstance(warning["reason"], DovecotUnavailable)
        conn.send(b"NOOP\r\n")
        self.assertEqual(conn.replies()[-1], b"250 2.0.0 Ok")

    def test_dovecotSilentIs454(self) -> None:
        """
        A Dovecot that does not answer gets 454 4.7.0 after the timeout.
        """
        clock, endpoint = Clock(), ScriptedEndpoint()
        conn = self.session(endpoint, clock)
        conn.send(b"AUTH PLAIN " + plainResponse(b"alice", b"pw") + b"\r\n")
        protocol, _ = endpoint.accept()
        protocol.dataReceived(HANDSHAKE)
        clock.advance(10)
        self.assertEqual(conn.replies(), [b"454 4.7.0 Temporary authentication failure"])

    def test_okAndFail(self) -> None:
        """
        OK is 235, FAIL 535, both for AUTH LOGIN too.
        """
        clock, endpoint = Clock(), ScriptedEndpoint()
        conn = self.session(endpoint, clock)
        conn.send(b"AUTH PLAIN " + plainResponse(b"alice", b"wrong") + b"\r\n")
        protocol, transport = endpoint.accept()
        protocol.dataReceived(HANDSHAKE + b"FAIL\t1\tuser=alice\n")
        conn.send(
            b"AUTH LOGIN\r\n" + base64.b64encode(b"alice") + b"\r\n" + base64.b64encode(b"pw") + b"\r\n"
        )
        self.assertIn(b"\tresp=" + plainResponse(b"alice", b"pw"), transport.value())
        # The session's credentials carry the client's address and TLS.
        self.assertIn(b"\tservice=smtp\tsecured\trip=192.0.2.1\trport=40000\tresp=", transport.value())
        protocol.dataReceived(b"OK\t2\tuser=alice\n")
        self.assertEqual(
            conn.replies(),
            [
                b"535 5.7.8 Authentication credentials invalid",
                b"334 VXNlcm5hbWU6",
                b"334 UGFzc3dvcmQ6",
                b"235 2.7.0 Authentication successful",
            ],
        )
        self.assertEqual(conn.proto.session.authenticated, "alice")


class EndpointTests(SynchronousTestCase):
    def test_unix(self) -> None:
        """
        A path, or C{unix:} and a path, is a unix socket; a relative path
        is resolved.
        """
        reactor = MemoryReactorClock()
        for text, expected in [
            ("/run/dovecot/auth-client", "/run/dovecot/auth-client"),
            ("unix:/x/auth", "/x/auth"),
            ("auth", "/data/auth"),
        ]:
            endpoint = socketEndpoint(reactor, text, lambda p: Path("/data") / p)
            assert isinstance(endpoint, UNIXClientEndpoint)
            self.assertEqual(endpoint._path, expected)

    def test_inet(self) -> None:
        """
        C{inet:HOST:PORT} is a TCP endpoint; IPv6 addresses in brackets; an
        address is connected to without a lookup, a name is looked up.
        """
        reactor = MemoryReactorClock()
        endpoint = socketEndpoint(reactor, "inet:127.0.0.1:12345", Path)
        assert isinstance(endpoint, TCP4ClientEndpoint)
        self.assertEqual((endpoint._host, endpoint._port), ("127.0.0.1", 12345))
        endpoint = socketEndpoint(reactor, "inet:[::1]:1", Path)
        assert isinstance(endpoint, TCP6ClientEndpoint)
        self.assertEqual((endpoint._host, endpoint._port), ("::1", 1))
        endpoint = socketEndpoint(reactor, "inet:dovecot.example:12345", Path)
        assert isinstance(endpoint, HostnameEndpoint)
        self.assertEqual((endpoint._hostBytes, endpoint._port), (b"dovecot.example", 12345))

    def test_bad(self) -> None:
        """
        Malformed values raise L{ValueError}.
        """
        for text in ["inet:127.0.0.1", "inet::25", "inet:host:0", "inet:host:x", "unix:", ""]:
            self.assertRaises(ValueError, socketEndpoint, MemoryReactorClock(), text, Path)


class ConfigTests(SynchronousTestCase):
    def build(self, **options: Any) -> Any:
        path = Path(self.mktemp())
        path.mkdir()
        context = ComponentContext(reactor=MemoryReactorClock(), hostname="mx.test", dataDir=path)
        return authFromConfig(Section("[auth]", options), context, lambda f, *a: maybeDeferred(f, *a))

    def test_dovecot(self) -> None:
        """
        C{backend = "dovecot"} checks with Dovecot at C{socket} (by
        default Debian's C{/run/dovecot/auth-client}), within C{timeout};
        the client is the AUTH service, so it stops with the server.
        """
        setup = self.build(backend="dovecot", timeout=5)
        [checker] = setup.auth.portal.checkers.values()
        assert isinstance(checker, DovecotChecker)
        self.assertIs(setup.service, checker.client)
        self.assertEqual(checker.client.timeout, 5)
        self.assertEqual(cast(Any, checker.client.endpoint)._path, "/run/dovecot/auth-client")
        setup = self.build(backend="dovecot", socket="inet:192.0.2.5:9999")
        [checker] = setup.auth.portal.checkers.values()
        self.assertIsInstance(checker.client.endpoint, TCP4ClientEndpoint)

    def test_errors(self) -> None:
        """
        The Dovecot backend takes no password file or checker, C{socket}
        needs it, and a bad C{socket} is named.
        """
        for options, message in [
            ({"backend": "dovecot", "passwords": "passwd"}, "not 'passwords' or 'checker'"),
            ({"backend": "dovecot", "checker": "unix"}, "not 'passwords' or 'checker'"),
            ({"passwords": "passwd", "socket": "/x"}, "socket: only for backend"),
            ({"backend": "dovecot", "socket": "inet:nowhere"}, "[auth] socket: expected inet:HOST:PORT"),
            ({"backend": "ldap"}, "[auth] backend: must be one of passwords, dovecot"),
        ]:
            with self.assertRaises(ConfigError) as e:
                self.build(**options)
            self.assertIn(message, str(e.exception))
