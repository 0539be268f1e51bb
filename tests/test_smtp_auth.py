"""
SMTP AUTH (RFC 4954) and message submission (RFC 6409, RFC 8314) in the
server protocol: every reply code, over in-memory transports and, for the
TLS handshake, L{twisted.test.iosim}.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface, implementer

from mailfw.auth import AuthLockout, MailRealm
from mailfw.auth._lockout import AUTH_LOCKED
from mailfw.queue._memory import MemoryQueue
from mailfw.reply import SMTPReply
from mailfw.sharedstate import sharedStateFor
from mailfw.smtp import SMTPFactory, SMTPLimits, SMTPServerProtocol
from mailfw.smtp._auth import AuthThrottle, SMTPAuth
from mailfw.smtp._settings import SessionSettings
from tests._smtpdoubles import (
    EHLO,
    HOSTNAME,
    Connection,
    DictRouter,
    FakeTLSContext,
    RecordingQueue,
    TLSStringTransport,
    connect,
)

PASSWORD = "correct horse"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def plain(user: str = "alice@example.org", password: str = PASSWORD, authzid: str = "") -> bytes:
    return b64(f"{authzid}\0{user}\0{password}".encode())


def checker() -> InMemoryUsernamePasswordDatabaseDontUse:
    db = InMemoryUsernamePasswordDatabaseDontUse()
    db.addUser(b"alice@example.org", PASSWORD.encode())
    db.addUser(b"bob", b"hunter2")
    db.addUser("zoë".encode(), "pässword".encode())
    return db


@implementer(ICredentialsChecker)
class ScriptedChecker:
    """
    A checker whose answers the test controls: C{error} to fail with, or
    C{slow} for a L{Deferred} in C{pending}.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, error: BaseException | None = None, slow: bool = False) -> None:
        self.error = error
        self.slow = slow
        self.calls: list[Any] = []
        self.pending: list[Deferred[Any]] = []

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        self.calls.append(credentials)
        if self.slow:
            d: Deferred[Any] = Deferred()
            self.pending.append(d)
            return d
        assert self.error is not None
        return fail(self.error)


def makeAuth(
    clock: Clock,
    credentialsChecker: Any = None,
    failureDelay: float = 0.0,
    senderCheck: str = "exact",
    allowNullSender: bool = True,
    maxFailures: int = 5,
    **kw: Any,
) -> SMTPAuth:
    realm = MailRealm(
        senders={"bob": ("bob@example.org", "@shared.example")},
        senderCheck=senderCheck,
        allowNullSender=allowNullSender,
    )
    portal = Portal(realm, [credentialsChecker or checker()])
    throttle = AuthThrottle(clock, maxFailures=maxFailures, failureDelay=failureDelay)
    return SMTPAuth(portal, throttle, **kw)


def secure(
    kind: str = "submission",
    peer: str = "192.0.2.1",
    clock: Clock | None = None,
    auth: SMTPAuth | None = None,
    quotas: Any = None,
    **authOptions: Any,
) -> Connection:
    """
    A session of C{kind} that has said EHLO inside TLS (after STARTTLS, or
    at once on submissions); the transport holds no replies yet.
    """
    clock = clock or Clock()
    auth = auth or makeAuth(clock, **authOptions)
    conn = connect(
        kind,
        tlsOptions=object(),
        transportFactory=TLSStringTransport,
        auth=auth,
        peer=peer,
        clock=clock,
        quotas=quotas,
    )
    if kind != "submissions":
        conn.send(EHLO + b"STARTTLS\r\n")
        assert conn.replies()[-1] == b"220 2.0.0 Ready to start TLS", conn.replies()
        assert conn.proto.session.tls
    conn.send(EHLO)
    conn.transport.clear()
    return conn


def login(conn: Connection, user: str = "alice@example.org", password: str = PASSWORD) -> None:
    conn.send(b"AUTH PLAIN " + plain(user, password) + b"\r\n")
    assert conn.replies()[-1] == b"235 2.7.0 Authentication successful", conn.replies()
    conn.transport.clear()


def ehloLines(conn: Connection) -> list[bytes]:
    conn.transport.clear()
    conn.send(EHLO)
    return conn.lines()


class AdvertisingTests(SynchronousTestCase):
    def test_notInCleartext(self) -> None:
        """
        On submission before STARTTLS, AUTH is not advertised and AUTH PLAIN
        gets 538 5.7.11 without the credentials being checked.
        """
        clock = Clock()
        scripted = ScriptedChecker(slow=True)
        conn = connect(
            "submission",
            tlsOptions=object(),
            transportFactory=TLSStringTransport,
            auth=makeAuth(clock, scripted),
            clock=clock,
        )
        lines = ehloLines(conn)
        self.assertEqual(lines[-1], b"250 STARTTLS")
        self.assertFalse([line for line in lines if b"AUTH" in line])
        conn.send(b"AUTH PLAIN " + plain() + b"\r\nAUTH LOGIN\r\n")
        self.assertEqual(
            conn.replies()[-2:],
            [b"538 5.7.11 Encryption required for requested authentication mechanism"] * 2,
        )
        self.assertEqual(scripted.calls, [])
        self.assertIsNone(conn.proto.session.authenticated)

    def test_afterSTARTTLS(self) -> None:
        """
        After STARTTLS and a new EHLO, AUTH PLAIN LOGIN is advertised and
        STARTTLS no longer is.
        """
        conn = secure()
        lines = ehloLines(conn)
        self.assertIn(b"250 AUTH PLAIN LOGIN", lines)
        self.assertNotIn(b"250-STARTTLS", lines)

    def test_submissionsAtOnce(self) -> None:
        """
        On submissions (implicit TLS) AUTH is offered in the first EHLO.
        """
        conn = connect("submissions", auth=makeAuth(Clock()))
        self.assertIn(b"250 AUTH PLAIN LOGIN", ehloLines(conn))

    def test_configuredMechanisms(self) -> None:
        """
        Only the configured mechanisms are offered; another known one gets
        504.
        """
        conn = secure(mechanisms=("PLAIN",))
        self.assertIn(b"250 AUTH PLAIN", ehloLines(conn))
        conn.send(b"AUTH LOGIN\r\n")
        self.assertEqual(conn.replies()[-1], b"504 5.5.4 Unrecognized authentication type")

    def test_notConfigured(self) -> None:
        """
        A listener without AUTH settings neither offers AUTH nor accepts it
        (502), also inside TLS.
        """
        conn = connect("smtp", tlsOptions=object(), transportFactory=TLSStringTransport)
        conn.send(EHLO + b"STARTTLS\r\n")
        lines = ehloLines(conn)
        self.assertFalse([line for line in lines if b"AUTH" in line])
        conn.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(conn.replies()[-1], b"502 5.5.1 Command not implemented")

    def test_mxWithAuth(self) -> None:
        """
        On the MX with AUTH configured, AUTH is offered after STARTTLS; an
        authenticated client may relay, an anonymous one may not, and
        anonymous mail to local domains still needs no AUTH.
        """
        conn = secure("smtp")
        self.assertIn(b"250 AUTH PLAIN LOGIN", ehloLines(conn))
        conn.send(
            b"MAIL FROM:<x@example.net>\r\nRCPT TO:<rcpt@example.org>\r\nRCPT TO:<a@remote.example>\r\nRSET\r\n"
        )
        self.assertEqual(conn.codes()[-4:], [b"250", b"250", b"554", b"250"])
        login(conn)
        conn.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<a@remote.example>\r\n")
        self.assertEqual(conn.codes(), [b"250", b"250"])
        self.assertTrue(conn.router.calls[-1][1].relayClient)  # type: ignore[union-attr]


class PlainTests(SynchronousTestCase):
    def test_initialResponse(self) -> None:
        """
        AUTH PLAIN with an initial response succeeds with 235 2.7.0; the
        session becomes authenticated and a relay client.
        """
        conn = secure()
        conn.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(conn.replies(), [b"235 2.7.0 Authentication successful"])
        session = conn.proto.session
        self.assertEqual((session.authenticated, session.relayClient), ("alice@example.org", True))
        self.assertEqual(conn.proto.avatar.identity, "alice@example.org")

    def test_challenge(self) -> None:
        """
        Without an initial response the server sends an empty challenge
        (C{334 }) and takes the response on the next line; the mechanism
        name is case-insensitive.
        """
        conn = secure()
        conn.send(b"auth plain\r\n")
        self.assertEqual(conn.lines(), [b"334 "])
        conn.send(plain() + b"\r\n")
        self.assertEqual(conn.replies()[-1], b"235 2.7.0 Authentication successful")

    def test_authorizationIdentity(self) -> None:
        """
        An authorization identity equal to the user is accepted; acting as
        another user is refused like a bad password.
        """
        conn = secure()
        conn.send(b"AUTH PLAIN " + plain("bob", "hunter2", authzid="alice@example.org") + b"\r\n")
        self.assertEqual(conn.replies()[-1], b"535 5.7.8 Authentication credentials invalid")
        conn.send(b"AUTH PLAIN " + plain("bob", "hunter2", authzid="bob") + b"\r\n")
        self.assertEqual(conn.replies()[-1], b"235 2.7.0 Authentication successful")
        self.assertEqual(conn.proto.session.authenticated, "bob")

    def test_utf8(self) -> None:
        """
        User names and passwords are UTF-8 (RFC 4616).
        """
        conn = secure()
        conn.send(b"AUTH PLAIN " + plain("zoë", "pässword") + b"\r\n")
        self.assertEqual(conn.replies()[-1], b"235 2.7.0 Authentication successful")
        self.assertEqual(conn.proto.session.authenticated, "zoë")

    def test_badCredentials(self) -> None:
        """
        A wrong password, an unknown user, and malformed PLAIN messages
        (the C{=} empty initial response, missing NULs, empty fields) get
        535 5.7.8.
        """
        conn = secure(maxFailures=100)
        for response in [
            plain(password="wrong"),
            plain(user="nobody@example.org"),
            b"=",
            b64(b"alice@example.org" + PASSWORD.encode()),
            b64(b"\0alice@example.org\0"),
            b64(b"\0\0" + PASSWORD.encode()),
            b64(b"a\0b\0c\0d"),
        ]:
            conn.transport.clear()
            conn.send(b"AUTH PLAIN " + response + b"\r\n")
            self.assertEqual(conn.replies(), [b"535 5.7.8 Authentication credentials invalid"], response)
        self.assertIsNone(conn.proto.session.authenticated)
        self.assertFalse(conn.proto.session.relayClient)

    def test_badBase64(self) -> None:
        """
        A response that is not strict base64 gets 501 5.5.2, as initial
        response and as reply to a challenge.
        """
        conn = secure()
        for bad in [b"not-base64!", b"YWJj=", b"YQ", b"YQ==YQ==", b"Y*Q="]:
            conn.transport.clear()
            conn.send(b"AUTH PLAIN " + bad + b"\r\n")
            self.assertEqual(conn.replies()[-1], b"501 5.5.2 Cannot decode response as base64", bad)
        conn.transport.clear()
        conn.send(b"AUTH PLAIN\r\n%%%%\r\nAUTH PLAIN\r\nY Q==\r\n")
        self.assertEqual(conn.lines(), [b"334 ", b"501 5.5.2 Cannot decode response as base64"] * 2)

    def test_cancel(self) -> None:
        """
        C{*} cancels the exchange with 501 5.0.0; the next line is a command
        again.
        """
        conn = secure()
        conn.send(b"AUTH PLAIN\r\n*\r\nNOOP\r\n")
        self.assertEqual(conn.lines(), [b"334 ", b"501 5.0.0 Authentication cancelled", b"250 2.0.0 Ok"])
        self.assertIsNone(conn.proto.session.authenticated)


class LoginTests(SynchronousTestCase):
    def test_exchange(self) -> None:
        """
        LOGIN prompts for the user name and the password (base64 prompts)
        and succeeds with 235.
        """
        conn = secure()
        conn.send(b"AUTH LOGIN\r\n")
        self.assertEqual(conn.lines(), [b"334 VXNlcm5hbWU6"])
        conn.send(b64(b"alice@example.org") + b"\r\n")
        self.assertEqual(conn.lines()[-1], b"334 UGFzc3dvcmQ6")
        conn.send(b64(PASSWORD.encode()) + b"\r\n")
        self.assertEqual(conn.lines()[-1], b"235 2.7.0 Authentication successful")

    def test_initialResponse(self) -> None:
        """
        An initial response to LOGIN is the user name; only the password is
        prompted for.
        """
        conn = secure()
        conn.send(b"AUTH LOGIN " + b64(b"bob") + b"\r\n" + b64(b"hunter2") + b"\r\n")
        self.assertEqual(conn.lines(), [b"334 UGFzc3dvcmQ6", b"235 2.7.0 Authentication successful"])

    def test_wrongPassword(self) -> None:
        """
        A wrong password or an empty one gets 535 5.7.8.
        """
        conn = secure()
        conn.send(b"AUTH LOGIN " + b64(b"bob") + b"\r\n" + b64(b"nope") + b"\r\n")
        conn.send(b"AUTH LOGIN " + b64(b"bob") + b"\r\n\r\n")
        self.assertEqual(conn.codes(), [b"334", b"535", b"334", b"535"])

    def test_cancelAtPassword(self) -> None:
        """
        C{*} at the password prompt cancels with 501.
        """
        conn = secure()
        conn.send(b"AUTH LOGIN\r\n" + b64(b"bob") + b"\r\n*\r\n")
        self.assertEqual(conn.codes(), [b"334", b"334", b"501"])


class SequenceTests(SynchronousTestCase):
    def test_beforeEhlo(self) -> None:
        """
        AUTH before EHLO gets 503; after HELO too (AUTH is an ESMTP
        extension).
        """
        conn = connect("submissions", auth=makeAuth(Clock()))
        conn.send(b"AUTH PLAIN " + plain() + b"\r\nHELO c.example\r\nAUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(
            conn.replies(), [b"503 Send HELO or EHLO first", b"250 mx.example.org", b"503 Send EHLO first"]
        )

    def test_twice(self) -> None:
        """
        A second AUTH after a successful one gets 503 5.5.1, and the first
        identity stays.
        """
        conn = secure()
        login(conn)
        conn.send(b"AUTH PLAIN " + plain("bob", "hunter2") + b"\r\n")
        self.assertEqual(conn.replies(), [b"503 5.5.1 Already authenticated"])
        self.assertEqual(conn.proto.session.authenticated, "alice@example.org")

    def test_duringTransaction(self) -> None:
        """
        AUTH inside a mail transaction gets 503 5.5.1 (on the MX, where MAIL
        needs no AUTH).
        """
        conn = secure("smtp")
        conn.send(b"MAIL FROM:<a@example.net>\r\nAUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(conn.replies(), [b"250 2.1.0 Ok", b"503 5.5.1 Mail transaction in progress"])

    def test_syntax(self) -> None:
        """
        AUTH without a mechanism, or with more than one argument, gets 501
        5.5.4.
        """
        conn = secure()
        conn.send(b"AUTH\r\nAUTH PLAIN abc def\r\nAUTH \r\n")
        self.assertEqual(conn.replies(), [b"501 5.5.4 Syntax: AUTH mechanism [initial-response]"] * 3)

    def test_unknownMechanism(self) -> None:
        """
        Mechanisms this server does not offer, and invalid mechanism names,
        get 504 5.5.4, also in cleartext.
        """
        conn = secure()
        conn.send(
            b"AUTH CRAM-MD5\r\nAUTH SCRAM-SHA-256 biwsbj1hLHI9eA==\r\nAUTH PL@IN\r\nAUTH AVERYLONGMECHANISMNAME1\r\n"
        )
        self.assertEqual(conn.replies(), [b"504 5.5.4 Unrecognized authentication type"] * 4)
        plainConn = connect(
            "submission", tlsOptions=object(), transportFactory=TLSStringTransport, auth=makeAuth(Clock())
        )
        plainConn.send(EHLO + b"AUTH GSSAPI\r\n")
        self.assertEqual(plainConn.replies()[-1], b"504 5.5.4 Unrecognized authentication type")

    def test_submissionNeedsAuth(self) -> None:
        """
        On submission, MAIL before AUTH gets 530 5.7.0 (in TLS or not), and
        is accepted after it.
        """
        clock = Clock()
        conn = connect(
            "submission",
            tlsOptions=object(),
            transportFactory=TLSStringTransport,
            auth=makeAuth(clock),
            clock=clock,
        )
        conn.send(EHLO + b"MAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(conn.replies()[-1], b"530 5.7.0 Authentication required")
        conn = secure()
        conn.send(b"MAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(conn.replies()[-1], b"530 5.7.0 Authentication required")
        login(conn)
        conn.send(b"MAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(conn.replies(), [b"250 2.1.0 Ok"])

    def test_submissionsNeedsAuth(self) -> None:
        """
        On submissions too, MAIL before AUTH gets 530 5.7.0.
        """
        conn = secure("submissions")
        conn.send(b"MAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(conn.replies(), [b"530 5.7.0 Authentication required"])

    def test_pipelinedAfterAuth(self) -> None:
        """
        Commands pipelined behind AUTH wait for its answer and then see the
        authenticated session.
        """
        conn = secure()
        conn.send(
            b"AUTH PLAIN " + plain() + b"\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<x@remote.example>\r\n"
        )
        self.assertEqual(conn.codes(), [b"235", b"250", b"250"])

    def test_longResponse(self) -> None:
        """
        A SASL response may be longer than a command line (up to 12288
        octets, RFC 4954 4); a longer one gets 500 5.5.6, is skipped to its
        CRLF, and the session goes on.
        """
        conn = secure()
        conn.send(b"AUTH LOGIN\r\n" + b64(b"u" * 6000) + b"\r\n" + b64(b"pw") + b"\r\n")
        self.assertEqual(conn.codes(), [b"334", b"334", b"535"])
        conn.transport.clear()
        conn.send(b"AUTH PLAIN\r\n" + b"QUFB" * 3200 + b"\r\nNOOP\r\n")
        self.assertEqual(
            conn.lines(),
            [b"334 ", b"500 5.5.6 Authentication exchange line is too long", b"250 2.0.0 Ok"],
        )

    def test_commandLineLimitAfterExchange(self) -> None:
        """
        Once the exchange is over, the command line limit applies again.
        """
        conn = secure()
        conn.send(b"AUTH PLAIN\r\n*\r\nNOOP " + b"x" * 3000 + b"\r\nNOOP\r\n")
        self.assertEqual(conn.codes(), [b"334", b"501", b"500", b"250"])

    def test_ehloAndRsetKeepAuthentication(self) -> None:
        """
        A session that authenticated keeps it across EHLO and RSET.
        """
        conn = secure()
        login(conn)
        conn.send(EHLO + b"RSET\r\n")
        self.assertEqual(conn.proto.session.authenticated, "alice@example.org")


class BackendTests(SynchronousTestCase):
    def test_failureIs454(self) -> None:
        """
        A checker that fails (not a refusal) gets 454 4.7.0, is logged, and
        does not count as a failed attempt.
        """
        clock = Clock()
        auth = makeAuth(clock, ScriptedChecker(error=OSError("disk gone")))
        conn = secure(auth=auth, clock=clock)
        with capturedLogs() as events:
            conn.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(conn.replies(), [b"454 4.7.0 Temporary authentication failure"])
        self.assertTrue([e for e in events if e.get("log_failure") is not None])
        self.flushLoggedErrors(OSError)
        self.assertEqual(len(auth.throttle), 0)

    def test_timeout(self) -> None:
        """
        A checker slower than the timeout gets 454 4.7.0.
        """
        clock = Clock()
        scripted = ScriptedChecker(slow=True)
        conn = secure(auth=makeAuth(clock, scripted, timeout=10.0), clock=clock)
        conn.send(b"AUTH PLAIN " + plain() + b"\r\nNOOP\r\n")
        self.assertEqual(conn.replies(), [])
        clock.advance(10)
        self.assertEqual(conn.replies(), [b"454 4.7.0 Temporary authentication failure", b"250 2.0.0 Ok"])

    def test_slowCheckKeepsOrder(self) -> None:
        """
        While the check runs, later commands wait; they are answered after
        the AUTH reply.
        """
        clock = Clock()
        scripted = ScriptedChecker(slow=True)
        conn = secure(auth=makeAuth(clock, scripted), clock=clock)
        conn.send(b"AUTH PLAIN " + plain() + b"\r\nMAIL FROM:<alice@example.org>\r\n")
        self.assertEqual(conn.replies(), [])
        scripted.pending[0].callback(b"alice@example.org")
        self.assertEqual(conn.codes(), [b"235", b"250"])

    def test_refusalFromChecker(self) -> None:
        """
        L{UnauthorizedLogin} from a checker is 535.
        """
        clock = Clock()
        conn = secure(auth=makeAuth(clock, ScriptedChecker(error=UnauthorizedLogin())), clock=clock)
        conn.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(conn.codes(), [b"535"])

    def test_connectionLostWhileChecking(self) -> None:
        """
        A client that goes away during the check leaves no error behind.
        """
        clock = Clock()
        scripted = ScriptedChecker(slow=True)
        conn = secure(auth=makeAuth(clock, scripted), clock=clock)
        conn.send(b"AUTH PLAIN " + plain() + b"\r\n")
        conn.proto.connectionLost(Failure(ConnectionError()))
        self.assertTrue(scripted.pending[0].called, "the check is cancelled")
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertIsNone(conn.proto.session.authenticated)


class SenderTests(SynchronousTestCase):
    def mail(self, conn: Connection, sender: bytes, params: bytes = b"") -> bytes:
        conn.transport.clear()
        conn.send(b"MAIL FROM:<" + sender + b">" + params + b"\r\nRSET\r\n")
        return conn.replies()[0]

    def test_exact(self) -> None:
        """
        With the default check, a user called by an address may send as that
        address (local part and domain in any case), nothing else: 553
        5.7.1.
        """
        conn = secure()
        login(conn)
        self.assertEqual(self.mail(conn, b"alice@example.org"), b"250 2.1.0 Ok")
        self.assertEqual(self.mail(conn, b"ALICE@Example.ORG"), b"250 2.1.0 Ok")
        for other in [b"bob@example.org", b"alice@example.net", b"alice@sub.example.org"]:
            self.assertEqual(
                self.mail(conn, other), b"553 5.7.1 Sender address not owned by authenticated user", other
            )

    def test_patterns(self) -> None:
        """
        C{@domain} patterns allow any address in that domain.
        """
        conn = secure()
        login(conn, "bob", "hunter2")
        self.assertEqual(self.mail(conn, b"bob@example.org"), b"250 2.1.0 Ok")
        self.assertEqual(self.mail(conn, b"anyone@shared.example"), b"250 2.1.0 Ok")
        self.assertEqual(self.mail(conn, b"carol@example.org")[:3], b"553")

    def test_domainCheck(self) -> None:
        """
        With C{sender_check = "domain"} any address in the user's domains is
        allowed.
        """
        conn = secure(senderCheck="domain")
        login(conn)
        self.assertEqual(self.mail(conn, b"carol@example.org"), b"250 2.1.0 Ok")
        self.assertEqual(self.mail(conn, b"carol@example.net")[:3], b"553")

    def test_anyCheck(self) -> None:
        """
        With C{sender_check = "any"} every sender is allowed.
        """
        conn = secure(senderCheck="any")
        login(conn)
        self.assertEqual(self.mail(conn, b"someone@elsewhere.example"), b"250 2.1.0 Ok")

    def test_nullSender(self) -> None:
        """
        C{MAIL FROM:<>} is allowed by default and refused (553) when
        configured so.
        """
        conn = secure()
        login(conn)
        self.assertEqual(self.mail(conn, b""), b"250 2.1.0 Ok")
        conn = secure(allowNullSender=False)
        login(conn)
        self.assertEqual(self.mail(conn, b"")[:7], b"553 5.7")

    def test_authParameter(self) -> None:
        """
        Where AUTH is offered, MAIL accepts the AUTH= parameter (C{<>} or
        xtext) and refuses a malformed one with 501.
        """
        conn = secure()
        login(conn)
        self.assertEqual(self.mail(conn, b"alice@example.org", b" AUTH=<>"), b"250 2.1.0 Ok")
        self.assertEqual(self.mail(conn, b"alice@example.org", b" AUTH=alice+40example.org"), b"250 2.1.0 Ok")
        self.assertEqual(
            self.mail(conn, b"alice@example.org", b" AUTH=bad+4"), b"501 5.5.4 Syntax: AUTH=<> or AUTH=xtext"
        )
        self.assertEqual(
            self.mail(conn, b"alice@example.org", b" AUTH"), b"501 5.5.4 Syntax: AUTH=<> or AUTH=xtext"
        )

    def test_authParameterWithoutAuth(self) -> None:
        """
        Where AUTH is not offered, the AUTH= parameter is unknown (555).
        """
        conn = connect()
        conn.send(EHLO + b"MAIL FROM:<a@example.net> AUTH=<>\r\n")
        self.assertEqual(conn.replies()[-1], b"555 5.5.4 Unsupported parameter AUTH")

    def test_unauthenticatedMXNotChecked(self) -> None:
        """
        On the MX, anonymous senders are not checked against any user.
        """
        conn = secure("smtp")
        self.assertEqual(self.mail(conn, b"anyone@example.net"), b"250 2.1.0 Ok")


MESSAGE = b"From: alice@example.org\r\nSubject: hi\r\n\r\nbody\r\n.\r\n"


class MessageTests(SynchronousTestCase):
    def submit(self, conn: Connection, message: bytes = MESSAGE, rcpt: bytes = b"rcpt@example.org") -> bytes:
        conn.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<" + rcpt + b">\r\nDATA\r\n" + message)
        self.assertEqual(conn.codes()[-4:], [b"250", b"250", b"354", b"250"])
        return conn.queue.messages[-1][1].data

    def test_receivedESMTPSA(self) -> None:
        """
        Mail after AUTH inside TLS is received C{with ESMTPSA}; the user's
        name is not in the header by default, but the envelope has it.
        """
        conn = secure()
        login(conn)
        data = self.submit(conn)
        self.assertIn(b" with ESMTPSA id ", data)
        self.assertNotIn(b"Authenticated", data)
        self.assertEqual(conn.queue.messages[-1][0].authenticated, "alice@example.org")

    def test_receivedIdentity(self) -> None:
        """
        With C{received_identity}, the header names the user in a comment,
        with comment specials escaped.
        """
        clock = Clock()
        db = checker()
        db.addUser(b"we(i)rd\\", b"pw")
        conn = secure(auth=makeAuth(clock, db, receivedIdentity=True, senderCheck="any"), clock=clock)
        login(conn, "we(i)rd\\", "pw")
        data = self.submit(conn)
        self.assertIn(b"\t(Authenticated sender: we\\(i\\)rd\\\\)\r\n", data)

    def test_fixups(self) -> None:
        """
        On submission a message without C{Date:} and C{Message-ID:} gets
        both (RFC 6409 8), above its own header.
        """
        clock = Clock()
        clock.advance(1700000000)
        conn = secure(clock=clock)
        login(conn)
        data = self.submit(conn)
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n", head)
        [messageID] = [line for line in head.split(b"\r\n") if line.startswith(b"Message-ID: ")]
        self.assertRegex(messageID.decode(), r"^Message-ID: <[0-9a-f]{32}@mx\.example\.org>$")
        self.assertTrue(head.endswith(b"From: alice@example.org\r\nSubject: hi"))
        self.assertEqual(body, b"body\r\n")

    def test_noFixupsWhenPresent(self) -> None:
        """
        Fields already present (in any case) are not added again.
        """
        conn = secure("submissions")
        login(conn)
        data = self.submit(
            conn, b"DATE: Mon, 1 Jan 2024 00:00:00 +0000\r\nmessage-id: <x@y>\r\n\r\nb\r\n.\r\n"
        )
        self.assertEqual(data.lower().count(b"\ndate:"), 1)
        self.assertEqual(data.lower().count(b"message-id:"), 1)

    def test_fixupsHeaderOnly(self) -> None:
        """
        A message that is only a header section gets the fields too.
        """
        conn = secure()
        login(conn)
        data = self.submit(conn, b"Subject: only\r\n.\r\n")
        self.assertIn(b"\r\nDate: ", data)
        self.assertIn(b"\r\nMessage-ID: <", data)

    def test_noFixupsForTruncatedHeader(self) -> None:
        """
        A header section longer than the server holds is passed on
        unchanged: a C{Date:} further down cannot be ruled out.
        """
        clock = Clock()
        auth = makeAuth(clock)
        conn = connect("submissions", auth=auth, clock=clock, limits=SMTPLimits(maxHeaderBytes=100))
        conn.send(EHLO)
        login(conn)
        conn.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<rcpt@example.org>\r\nDATA\r\n")
        conn.send(b"X-Long: " + b"y" * 200 + b"\r\n")
        conn.send(b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nb\r\n.\r\n")
        self.assertEqual(conn.codes()[-1], b"250")
        data = conn.queue.messages[-1][1].data
        self.assertEqual(data.count(b"Date:"), 1)
        self.assertNotIn(b"Message-ID:", data)

    def test_noFixupsOnMX(self) -> None:
        """
        The MX leaves messages as they are, also from authenticated users.
        """
        conn = secure("smtp")
        login(conn)
        data = self.submit(conn)
        self.assertNotIn(b"Date:", data)
        self.assertNotIn(b"Message-ID:", data)

    def test_logs(self) -> None:
        """
        A successful AUTH is logged with the user; the password never
        appears in any log event.
        """
        conn = secure()
        with capturedLogs() as events:
            conn.send(b"AUTH PLAIN " + plain() + b"\r\n")
            conn.send(b"AUTH LOGIN\r\n")
            conn.send(b"AUTH PLAIN " + plain("bob", "wrong-" + PASSWORD) + b"\r\n")
        [success] = [e for e in events if "succeeded" in e["log_format"]]
        self.assertEqual((success["user"], success["mechanism"]), ("alice@example.org", "PLAIN"))
        self.assertEqual(success["log_level"], LogLevel.info)
        self.assertNotIn(PASSWORD, repr(events))


class ThrottleTests(SynchronousTestCase):
    def failOnce(self, conn: Connection, clock: Clock, delay: float = 2.0) -> bytes:
        conn.transport.clear()
        conn.send(b"AUTH PLAIN " + plain(password="wrong") + b"\r\n")
        self.assertEqual(conn.replies(), [])
        clock.advance(delay)
        [reply] = conn.replies()
        return reply

    def test_failuresDelayed(self) -> None:
        """
        A failed attempt is answered only after the failure delay.
        """
        clock = Clock()
        conn = secure(clock=clock, failureDelay=2.0)
        conn.send(b"AUTH PLAIN " + plain(password="wrong") + b"\r\n")
        clock.advance(1.9)
        self.assertEqual(conn.replies(), [])
        clock.advance(0.1)
        self.assertEqual(conn.replies(), [b"535 5.7.8 Authentication credentials invalid"])

    def test_lockout(self) -> None:
        """
        With the default L{ThrottleLockout}, after five failures from one
        address AUTH gets 454 4.7.0 without a check (once the user name is
        known), also with the right password and on a new connection, until
        the lockout ends; other addresses are not affected.
        """
        clock = Clock()
        auth = makeAuth(clock, failureDelay=2.0)
        conn = secure(clock=clock, auth=auth)
        for _ in range(5):
            self.assertEqual(self.failOnce(conn, clock)[:3], b"535")
        conn.transport.clear()
        conn.send(b"AUTH PLAIN " + plain() + b"\r\n")
        clock.advance(2)
        self.assertEqual(
            conn.replies(), [b"454 4.7.0 Too many failed authentication attempts, try again later"]
        )
        other = secure(clock=clock, auth=auth)
        other.send(b"AUTH LOGIN\r\n" + b64(b"alice@example.org") + b"\r\n" + b64(PASSWORD.encode()) + b"\r\n")
        clock.advance(2)
        self.assertEqual(other.codes(), [b"334", b"334", b"454"])
        elsewhere = secure(clock=clock, auth=auth, peer="192.0.2.99")
        elsewhere.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(elsewhere.codes(), [b"235"])
        clock.advance(600)
        again = secure(clock=clock, auth=auth)
        again.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(again.codes(), [b"235"])

    def test_cancelAndMalformedNotFree(self) -> None:
        """
        Malformed PLAIN messages count as failures; a cancelled exchange
        does not.
        """
        clock = Clock()
        auth = makeAuth(clock)
        conn = secure(clock=clock, auth=auth)
        conn.send(b"AUTH PLAIN\r\n*\r\n")
        self.assertFalse(auth.throttle.lockedOut("192.0.2.1"))
        self.assertEqual(len(auth.throttle), 0)
        conn.send(b"AUTH PLAIN =\r\n")
        self.assertEqual(len(auth.throttle), 1)

    def test_window(self) -> None:
        """
        Failures older than the window are forgotten.
        """
        clock = Clock()
        throttle = AuthThrottle(clock, maxFailures=3, window=60, lockout=100)
        throttle.failed("192.0.2.1")
        throttle.failed("192.0.2.1")
        clock.advance(61)
        self.assertFalse(throttle.failed("192.0.2.1"))
        self.assertFalse(throttle.lockedOut("192.0.2.1"))
        self.assertFalse(throttle.failed("192.0.2.1"))
        self.assertTrue(throttle.failed("192.0.2.1"))
        self.assertTrue(throttle.lockedOut("192.0.2.1"))
        clock.advance(100)
        self.assertFalse(throttle.lockedOut("192.0.2.1"))

    def test_ipv6Prefix(self) -> None:
        """
        IPv6 addresses are counted per /64; IPv4-mapped ones as IPv4.
        """
        clock = Clock()
        throttle = AuthThrottle(clock, maxFailures=2)
        throttle.failed("2001:db8::1")
        throttle.failed("2001:db8::ffff:2")
        self.assertTrue(throttle.lockedOut("2001:db8::3"))
        self.assertFalse(throttle.lockedOut("2001:db8:0:1::1"))
        throttle.failed("::ffff:192.0.2.5")
        throttle.failed("192.0.2.5")
        self.assertTrue(throttle.lockedOut("192.0.2.5"))

    def test_bounded(self) -> None:
        """
        At most C{maxClients} addresses are remembered; the least recently
        failed one goes first.
        """
        clock = Clock()
        throttle = AuthThrottle(clock, maxFailures=2, maxClients=3)
        throttle.failed("192.0.2.1")
        throttle.failed("192.0.2.1")
        for i in range(2, 5):
            throttle.failed(f"192.0.2.{i}")
        self.assertEqual(len(throttle), 3)
        self.assertFalse(throttle.lockedOut("192.0.2.1"))
        for i in range(10, 1000):
            throttle.failed(f"10.0.{i // 256}.{i % 256}")
        self.assertEqual(len(throttle), 3)

    def test_arguments(self) -> None:
        """
        Nonsense limits are refused.
        """
        self.assertRaises(ValueError, AuthThrottle, Clock(), maxFailures=0)
        self.assertRaises(ValueError, AuthThrottle, Clock(), maxClients=0)


class FakeLockout:
    """
    The API of L{mailfw.auth.AuthLockout}, scripted: the calls in order, a
    lock per (host, user) in C{locked}, and a delay per host that grows by
    C{step} seconds with each failure and is cleared by a success.
    """

    def __init__(self, step: float = 2.0) -> None:
        self.step = step
        self.calls: list[tuple[str, ...]] = []
        self.failures: dict[str, int] = {}
        self.locked: set[tuple[str, str]] = set()
        self.checkError: BaseException | None = None

    floor = 0.0

    def delay(self, host: str) -> Deferred[float]:
        self.calls.append(("delay", host))
        return succeed(max(self.floor, self.step * self.failures.get(host, 0)))

    def check(self, host: str, user: str) -> Deferred[SMTPReply | None]:
        self.calls.append(("check", host, user))
        if self.checkError is not None:
            return fail(self.checkError)
        return succeed(AUTH_LOCKED if (host, user) in self.locked else None)

    def failed(self, host: str, user: str) -> Deferred[None]:
        self.calls.append(("failed", host, user))
        self.failures[host] = self.failures.get(host, 0) + 1
        return succeed(None)

    def succeeded(self, host: str, user: str) -> Deferred[None]:
        self.calls.append(("succeeded", host, user))
        self.failures.pop(host, None)
        return succeed(None)


class LockoutTests(SynchronousTestCase):
    """
    The SASL exchange asks the L{mailfw.smtp._auth.Lockout} in
    L{SMTPAuth.lockout}: check before the password, failed or succeeded
    after, and each reply waits its delay on the clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.lockout = FakeLockout()
        self.auth = makeAuth(self.clock, lockout=self.lockout)

    def test_wrongThenRightSucceeds(self) -> None:
        """
        A wrong password and then the right one from the same address: the
        failure is answered after the delay, and the right password
        succeeds, answered at once (the success is recorded before the
        delay is asked, as the lockout documents).
        """
        conn = secure(clock=self.clock, auth=self.auth)
        conn.send(b"AUTH PLAIN " + plain(password="wrong") + b"\r\n")
        self.assertEqual(conn.replies(), [])
        self.clock.advance(1.99)
        self.assertEqual(conn.replies(), [])
        self.clock.advance(0.01)
        self.assertEqual(conn.replies(), [b"535 5.7.8 Authentication credentials invalid"])
        conn.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(conn.codes(), [b"535", b"235"])
        self.assertEqual(conn.proto.session.authenticated, "alice@example.org")
        host, user = "192.0.2.1", "alice@example.org"
        self.assertEqual(
            self.lockout.calls,
            [
                ("check", host, user),
                ("failed", host, user),
                ("delay", host),
                ("check", host, user),
                ("succeeded", host, user),
                ("delay", host),
            ],
        )

    def test_wrongThenRightWithDefaultThrottle(self) -> None:
        """
        Without a shared lockout (the default L{ThrottleLockout}), a wrong
        password and then the right one from one address also succeeds.
        """
        clock = Clock()
        conn = secure(clock=clock, auth=makeAuth(clock, failureDelay=2.0, maxFailures=2))
        conn.send(b"AUTH PLAIN " + plain(password="wrong") + b"\r\n")
        clock.advance(2)
        conn.send(b"AUTH PLAIN " + plain() + b"\r\n")
        clock.advance(2)
        self.assertEqual(conn.codes(), [b"535", b"235"])

    def test_checkedBeforePassword(self) -> None:
        """
        A locked (address, user) pair gets the lockout's refusal without a
        password check; another user from the same address is checked.
        """
        scripted = ScriptedChecker(error=UnauthorizedLogin())
        auth = makeAuth(self.clock, scripted, lockout=self.lockout)
        self.lockout.locked.add(("192.0.2.1", "alice@example.org"))
        conn = secure(clock=self.clock, auth=auth)
        with capturedLogs() as events:
            conn.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(
            conn.replies(), [b"454 4.7.0 Too many failed authentication attempts, try again later"]
        )
        self.assertEqual(scripted.calls, [])
        [event] = [e for e in events if "throttled" in e["log_format"]]
        self.assertEqual((event["peer"], event["user"]), ("192.0.2.1:40000", "alice@example.org"))
        conn.send(b"AUTH PLAIN " + plain("bob", "x") + b"\r\n")
        self.clock.advance(2)
        self.assertEqual(conn.codes(), [b"454", b"535"])
        self.assertEqual(len(scripted.calls), 1)

    def test_loginChecksOnceUserKnown(self) -> None:
        """
        With LOGIN the lockout is asked once the user name and password
        have arrived, before the password is checked.
        """
        conn = secure(clock=self.clock, auth=self.auth)
        conn.send(b"AUTH LOGIN\r\n" + b64(b"bob") + b"\r\n")
        self.assertEqual(self.lockout.calls, [])
        conn.send(b64(b"hunter2") + b"\r\n")
        self.assertEqual(conn.codes(), [b"334", b"334", b"235"])
        self.assertEqual(self.lockout.calls[0], ("check", "192.0.2.1", "bob"))

    def test_delayDoesNotBlockOthers(self) -> None:
        """
        While one client's failure reply waits its delay, another client is
        answered at once.
        """
        slow = secure(clock=self.clock, auth=self.auth)
        slow.send(b"AUTH PLAIN " + plain(password="wrong") + b"\r\n")
        other = secure(clock=self.clock, auth=self.auth, peer="198.51.100.7")
        other.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual((slow.codes(), other.codes()), ([], [b"235"]))
        self.clock.advance(2)
        self.assertEqual(slow.codes(), [b"535"])

    def test_growingDelay(self) -> None:
        """
        Each reply waits the delay the lockout gives at that moment.
        """
        conn = secure(clock=self.clock, auth=self.auth)
        for failures in range(1, 4):
            conn.send(b"AUTH PLAIN " + plain(password="wrong") + b"\r\n")
            self.clock.advance(2.0 * failures - 0.01)
            self.assertEqual(len(conn.codes()), failures - 1)
            self.clock.advance(0.01)
            self.assertEqual(len(conn.codes()), failures)

    def test_malformedCounts(self) -> None:
        """
        A malformed PLAIN message is a failure with an empty user name.
        """
        conn = secure(clock=self.clock, auth=self.auth)
        conn.send(b"AUTH PLAIN =\r\n")
        self.clock.advance(2)
        self.assertEqual(conn.codes(), [b"535"])
        self.assertEqual(self.lockout.calls, [("failed", "192.0.2.1", ""), ("delay", "192.0.2.1")])

    def test_lockoutFailureIs454(self) -> None:
        """
        A lockout that cannot answer (its database is down) gets 454, is
        logged, and the password is not checked.
        """
        scripted = ScriptedChecker(error=UnauthorizedLogin())
        auth = makeAuth(self.clock, scripted, lockout=self.lockout)
        self.lockout.checkError = OSError("database gone")
        conn = secure(clock=self.clock, auth=auth)
        conn.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(conn.replies(), [b"454 4.7.0 Temporary authentication failure"])
        self.assertEqual(scripted.calls, [])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_connectionLostDuringDelay(self) -> None:
        """
        A client that hangs up while its successful AUTH waits the delay is
        logged out, and no timer is left behind.
        """
        logouts: list[bool] = []
        self.lockout.floor = 1.0
        conn = secure(clock=self.clock, auth=self.auth)
        realm = self.auth.portal.realm
        original = realm.requestAvatar

        def requestAvatar(
            avatarId: bytes | tuple[()], mind: object, *interfaces: type[Interface]
        ) -> tuple[type[Interface], object, Callable[[], None]]:
            answer = original(avatarId, mind, *interfaces)
            # A MailRealm without a hosting table answers at once.
            assert not isinstance(answer, Deferred)
            interface, avatar, logout = answer

            def recorded() -> None:
                logouts.append(True)
                logout()

            return interface, avatar, recorded

        realm.requestAvatar = requestAvatar  # type: ignore[method-assign]
        conn.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual((conn.replies(), logouts), ([], []))
        conn.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(logouts, [True])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(conn.proto.avatar)


class RealLockoutTests(SynchronousTestCase):
    """
    The session with the real L{AuthLockout} over the shared state of a
    memory queue, on a L{Clock}.
    """

    def test_wrongThenRightSucceeds(self) -> None:
        """
        One wrong password and then the right one from one address: 535
        after the first failure's delay, then 235 at once; another user at
        the same address is not locked out by the first one's failures.
        """
        clock = Clock()
        lockout = AuthLockout(sharedStateFor(MemoryQueue(clock)), clock)
        auth = makeAuth(clock, lockout=lockout)
        conn = secure(clock=clock, auth=auth)
        conn.send(b"AUTH PLAIN " + plain(password="wrong") + b"\r\n")
        self.assertEqual(conn.codes(), [])
        clock.advance(lockout.settings.penaltyDelay)
        self.assertEqual(conn.codes(), [b"535"])
        conn.send(b"AUTH PLAIN " + plain() + b"\r\n")
        self.assertEqual(conn.codes(), [b"535", b"235"])
        other = secure(clock=clock, auth=auth)
        other.send(b"AUTH PLAIN " + plain("bob", "hunter2") + b"\r\n")
        self.assertEqual(other.codes(), [b"235"])

    def test_lockedPairOthersGoOn(self) -> None:
        """
        Once one user name is locked for the client's network, it gets 454
        without a password check, while another user at the same address
        still logs in.
        """
        clock = Clock()
        lockout = AuthLockout(sharedStateFor(MemoryQueue(clock)), clock)
        conn = secure(clock=clock, auth=makeAuth(clock, lockout=lockout))
        for _ in range(lockout.settings.userFailures):
            conn.send(b"AUTH PLAIN " + plain(password="wrong") + b"\r\n")
            clock.advance(lockout.settings.maxPenaltyDelay)
        conn.transport.clear()
        conn.send(b"AUTH PLAIN " + plain() + b"\r\n")
        clock.advance(lockout.settings.maxPenaltyDelay)
        self.assertEqual(conn.codes(), [b"454"])
        conn.send(b"AUTH PLAIN " + plain("bob", "hunter2") + b"\r\n")
        clock.advance(lockout.settings.maxPenaltyDelay)
        self.assertEqual(conn.codes(), [b"454", b"235"])


class RecordingClient(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def codes(self) -> list[bytes]:
        lines = self.received.split(b"\r\n")[:-1]
        return [line[:3] for line in lines if line[3:4] != b"-"]


class IosimTests(SynchronousTestCase):
    def test_submissionOverTLS(self) -> None:
        """
        A whole submission: EHLO, STARTTLS, the TLS handshake, EHLO with
        AUTH, AUTH PLAIN, and a message relayed for a remote recipient.
        """
        clock = Clock()
        queue = RecordingQueue()
        context = FakeTLSContext()
        server = SMTPServerProtocol(
            SessionSettings(
                "submission",
                HOSTNAME,
                queue,  # type: ignore[arg-type]
                DictRouter(),
                clock,
                (),
                SMTPLimits(),
                context,
                auth=makeAuth(clock),
            )
        )
        client = RecordingClient()
        serverTransport = iosim.FakeTransport(
            server, isServer=True, peerAddress=IPv4Address("TCP", "192.0.2.7", 4000)
        )
        clientTransport = iosim.FakeTransport(client, isServer=False)
        pump = iosim.connect(server, serverTransport, client, clientTransport)
        clientTransport.write(EHLO + b"AUTH PLAIN " + plain() + b"\r\nSTARTTLS\r\n")
        pump.flush()
        self.assertEqual(client.codes(), [b"220", b"250", b"538", b"220"])
        self.assertNotIn(b"AUTH", client.received.split(b"538")[0])
        clientTransport.startTLS(context)
        pump.flush()
        client.received = b""
        clientTransport.write(EHLO)
        pump.flush()
        self.assertIn(b"250 AUTH PLAIN LOGIN\r\n", client.received)
        clientTransport.write(
            b"AUTH PLAIN " + plain() + b"\r\nMAIL FROM:<alice@example.org>\r\n"
            b"RCPT TO:<friend@remote.example>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n"
        )
        pump.flush()
        self.assertEqual(client.codes()[1:], [b"235", b"250", b"250", b"354", b"250", b"221"])
        [(envelope, incoming)] = queue.committed
        self.assertEqual(envelope.authenticated, "alice@example.org")
        self.assertIn(b" with ESMTPSA id ", incoming.data)


class FactoryTests(SynchronousTestCase):
    def test_authPassed(self) -> None:
        """
        The factory gives its AUTH settings to each protocol it builds.
        """
        auth = makeAuth(Clock())
        factory = SMTPFactory("submission", HOSTNAME, RecordingQueue(), DictRouter(), Clock(), auth=auth)  # type: ignore[arg-type]
        proto = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1))
        self.assertIs(proto.settings.auth, auth)  # type: ignore[union-attr]

    def test_mechanismsChecked(self) -> None:
        """
        L{SMTPAuth} refuses mechanisms it does not implement.
        """
        self.assertRaises(ValueError, makeAuth, Clock(), mechanisms=("CRAM-MD5",))
        self.assertRaises(ValueError, makeAuth, Clock(), mechanisms=())
