"""
SCRAM-SHA-256 and SCRAM-SHA-256-PLUS in the SMTP session (RFC 4954, RFC
5802, RFC 7677): scramp (an independent implementation) as the client,
over in-memory transports and, for channel binding, over real TLS 1.2 and
1.3 connections through L{twisted.test.iosim}; every bad input answered
with a reply and counted by the lockout.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, cast

import scramp
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.ssl import TLSVersion
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailfw.auth import MailRealm, PasswordFileChecker, hashPassword
from mailfw.auth._checker import TemporaryAuthFailure
from mailfw.auth._dovecot import DovecotAuthClient, DovecotChecker
from mailfw.auth._lockout import AUTH_LOCKED
from mailfw.auth._scram import SCRAM, SCRAM_PLUS, ChannelBinding, ScramKeys, channelBindingFor
from mailfw.config import ConfigError
from mailfw.reply import SMTPReply
from mailfw.smtp import SMTPLimits, SMTPServerProtocol
from mailfw.smtp._auth import AuthThrottle, SMTPAuth, scramKeySource
from mailfw.smtp._settings import SessionSettings
from tests._smtpdoubles import (
    EHLO,
    HOSTNAME,
    Connection,
    DictRouter,
    RecordingQueue,
    TLSStringTransport,
    connect,
)
from tests._tlspair import tlsPair
from tests.test_auth_config import build
from tests.test_auth_scram import allowExporter
from tests.test_smtp_auth import RecordingClient

PASSWORD = "pencil"
KEYS = ScramKeys.fromPassword(PASSWORD, iterations=4096)
FAILED = b"535 5.7.8 Authentication credentials invalid"
OK = b"235 2.7.0 Authentication successful"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def unb64(reply: bytes) -> str:
    assert reply.startswith(b"334 "), reply
    return base64.b64decode(reply[4:]).decode()


def client(mechanisms: list[str], password: str = PASSWORD, binding: ChannelBinding | None = None) -> Any:
    cb = None if binding is None else (binding.name, binding.data)
    return scramp.ScramClient(mechanisms, "user", password, channel_binding=cb)


def synchronous(f: Any, *args: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args)


class RecordingLockout:
    """
    A L{mailfw.smtp._auth.Lockout} that records what it is asked, and
    refuses every C{check} when told to.
    """

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.calls: list[tuple[str, str]] = []

    def delay(self, host: str) -> Deferred[float]:
        return succeed(0.0)

    def check(self, host: str, user: str) -> Deferred[SMTPReply | None]:
        self.calls.append(("check", user))
        return succeed(AUTH_LOCKED if self.refuse else None)

    def failed(self, host: str, user: str) -> Deferred[None]:
        self.calls.append(("failed", user))
        return succeed(None)

    def succeeded(self, host: str, user: str) -> Deferred[None]:
        self.calls.append(("succeeded", user))
        return succeed(None)


class KeyChecker(PasswordFileChecker):
    """
    The password file's checker, whose key lookups the test sees and may
    replace with C{answer}.
    """

    answer: Deferred[ScramKeys] | None = None

    def __init__(self, path: Path) -> None:
        super().__init__(path, synchronous, scramSecret=b"secret")
        self.asked: list[str] = []

    def scramKeys(self, user: str) -> Deferred[ScramKeys]:
        self.asked.append(user)
        if self.answer is not None:
            return self.answer
        return super().scramKeys(user)


class SessionMixin:
    mktemp: Any

    def setUp(self) -> None:
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"user:{hashPassword(PASSWORD, logN=4, r=1, p=1)}:::{KEYS.format()}\n")
        self.clock = Clock()
        self.checker = KeyChecker(path)
        self.lockout = RecordingLockout()
        self.auth = SMTPAuth(
            Portal(MailRealm(senders={"user": ("user@example.org",)}), [self.checker]),
            AuthThrottle(self.clock),
            timeout=30,
            lockout=self.lockout,
        )

    def secure(self) -> Connection:
        """
        A submissions session after EHLO, inside TLS without a channel
        binding (L{TLSStringTransport} has no OpenSSL connection).
        """
        conn = connect("submissions", transportFactory=TLSStringTransport, auth=self.auth, clock=self.clock)
        conn.send(EHLO)
        conn.transport.clear()
        return conn


def exchange(conn: Connection, scram: Any, mechanism: str = SCRAM, initial: bool = True) -> bytes:
    """
    Run a whole exchange with scramp's client C{scram}, which checks the
    server's signature; the last reply.
    """
    first = b64(scram.get_client_first().encode())
    if initial:
        conn.send(f"AUTH {mechanism} ".encode() + first + b"\r\n")
    else:
        conn.send(f"AUTH {mechanism}\r\n".encode())
        assert conn.replies()[-1] == b"334 ", conn.replies()
        conn.send(first + b"\r\n")
    scram.set_server_first(unb64(conn.replies()[-1]))
    conn.send(b64(scram.get_client_final().encode()) + b"\r\n")
    scram.set_server_final(unb64(conn.replies()[-1]))
    conn.send(b"\r\n")
    return conn.replies()[-1]


class SessionTests(SessionMixin, SynchronousTestCase):
    def test_advertised(self) -> None:
        """
        Inside TLS without a channel binding, SCRAM-SHA-256 is offered
        before PLAIN and LOGIN, and -PLUS is not.
        """
        conn = self.secure()
        conn.send(EHLO)
        self.assertEqual(conn.lines()[-1], b"250 AUTH SCRAM-SHA-256 PLAIN LOGIN")

    def test_scramp(self) -> None:
        """
        scramp's client logs in with SCRAM-SHA-256, with and without an
        initial response: the server-final message comes as a C{334}
        challenge, the empty response gets 235, and the session is
        authenticated; the lockout was asked first and told of the success.
        """
        for initial in (True, False):
            conn = self.secure()
            self.assertEqual(exchange(conn, client([SCRAM]), initial=initial), OK)
            self.assertEqual(conn.proto.session.authenticated, "user")
            conn.send(b"MAIL FROM:<user@example.org>\r\n")
            self.assertEqual(conn.codes()[-1], b"250")
        self.assertEqual(self.lockout.calls, [("check", "user"), ("succeeded", "user")] * 2)
        # Each login asks for the keys twice: for the server-first message,
        # and to confirm them when the portal logs the user in.
        self.assertEqual(self.checker.asked, ["user"] * 4)

    def test_wrongPassword(self) -> None:
        """
        A wrong password gets 535 5.7.8 after the client-final message,
        one counted failure, and no C{e=} on the wire.
        """
        conn = self.secure()
        scram = client([SCRAM], "pencils")
        conn.send(b"AUTH SCRAM-SHA-256 " + b64(scram.get_client_first().encode()) + b"\r\n")
        scram.set_server_first(unb64(conn.replies()[-1]))
        with capturedLogs() as events:
            conn.send(b64(scram.get_client_final().encode()) + b"\r\nNOOP\r\n")
        self.assertEqual(conn.replies()[-2:], [FAILED, b"250 2.0.0 Ok"])
        self.assertNotIn(b"e=", conn.transport.value())
        self.assertIsNone(conn.proto.session.authenticated)
        self.assertEqual(self.lockout.calls, [("check", "user"), ("failed", "user")])
        self.assertIn("wrong proof", [e.get("reason", "") for e in events][-1])

    def test_unknownUser(self) -> None:
        """
        An unknown user gets a server-first message (decoy keys) and fails
        like a wrong password.
        """
        conn = self.secure()
        scram = scramp.ScramClient([SCRAM], "nobody", PASSWORD)
        conn.send(b"AUTH SCRAM-SHA-256 " + b64(scram.get_client_first().encode()) + b"\r\n")
        scram.set_server_first(unb64(conn.replies()[-1]))
        conn.send(b64(scram.get_client_final().encode()) + b"\r\n")
        self.assertEqual(conn.replies()[-1], FAILED)
        self.assertEqual(self.lockout.calls, [("check", "nobody"), ("failed", "nobody")])

    def test_replayedProof(self) -> None:
        """
        A client-final message recorded from a successful exchange, sent
        again in a new one, is refused: the server's nonce differs.
        """
        conn = self.secure()
        scram = client([SCRAM])
        first = b64(scram.get_client_first().encode())
        conn.send(b"AUTH SCRAM-SHA-256 " + first + b"\r\n")
        scram.set_server_first(unb64(conn.replies()[-1]))
        final = b64(scram.get_client_final().encode())
        conn.send(final + b"\r\n\r\n")
        self.assertEqual(conn.replies()[-1], OK)
        replay = self.secure()
        replay.send(b"AUTH SCRAM-SHA-256 " + first + b"\r\n")
        self.assertTrue(replay.replies()[-1].startswith(b"334 "))
        replay.send(final + b"\r\n")
        self.assertEqual(replay.replies()[-1], FAILED)
        self.assertEqual(self.lockout.calls[-1], ("failed", "user"))

    def test_malformed(self) -> None:
        """
        Malformed client-first and client-final messages, and a response
        to the server-final message that is not empty, each get 535 5.7.8
        and one counted failure; the session goes on.
        """
        cases = [
            (b"AUTH SCRAM-SHA-256 " + b64(b"x") + b"\r\n", None),
            (b"AUTH SCRAM-SHA-256 " + b64(b"n,,m=ext,n=user,r=a") + b"\r\n", None),
            (b"AUTH SCRAM-SHA-256 " + b64(b"p=tls-unique,,n=user,r=a") + b"\r\n", None),
            (b"AUTH SCRAM-SHA-256 " + b64(b"n,,n=user,r=abc") + b"\r\n", b64(b"c=biws,r=abc,p=AAAA")),
            (b"AUTH SCRAM-SHA-256 " + b64(b"n,,n=user,r=abc") + b"\r\n", b64(b"\xff\xfe")),
        ]
        for command, final in cases:
            conn = self.secure()
            conn.send(command)
            if final is not None:
                self.assertTrue(conn.replies()[-1].startswith(b"334 "), conn.replies())
                conn.send(final + b"\r\n")
            conn.send(b"NOOP\r\n")
            self.assertEqual(conn.replies()[-2:], [FAILED, b"250 2.0.0 Ok"], command)
        failures = [call for call in self.lockout.calls if call[0] == "failed"]
        self.assertEqual(len(failures), len(cases))
        conn = self.secure()
        scram = client([SCRAM])
        conn.send(b"AUTH SCRAM-SHA-256 " + b64(scram.get_client_first().encode()) + b"\r\n")
        scram.set_server_first(unb64(conn.replies()[-1]))
        conn.send(b64(scram.get_client_final().encode()) + b"\r\n")
        conn.send(b64(b"more") + b"\r\n")
        self.assertEqual(conn.replies()[-1], FAILED)
        self.assertIsNone(conn.proto.session.authenticated)
        self.assertEqual(self.lockout.calls[-1], ("failed", "user"))

    def test_badBase64(self) -> None:
        """
        A response that is not base64 ends the exchange with 501 5.5.2, as
        for every mechanism.
        """
        conn = self.secure()
        conn.send(b"AUTH SCRAM-SHA-256\r\n!!\r\n")
        self.assertEqual(conn.lines(), [b"334 ", b"501 5.5.2 Cannot decode response as base64"])

    def test_cancel(self) -> None:
        """
        C{*} gets 501; once the server-first message (the user's salt) is
        out, the cancel also counts as a failure.
        """
        conn = self.secure()
        conn.send(b"AUTH SCRAM-SHA-256\r\n*\r\n")
        self.assertEqual(conn.lines(), [b"334 ", b"501 5.0.0 Authentication cancelled"])
        self.assertEqual(self.lockout.calls, [])
        scram = client([SCRAM])
        conn.send(b"AUTH SCRAM-SHA-256 " + b64(scram.get_client_first().encode()) + b"\r\n*\r\n")
        self.assertEqual(conn.replies()[-1], b"501 5.0.0 Authentication cancelled")
        self.assertEqual(self.lockout.calls, [("check", "user"), ("failed", "user")])

    def test_droppedAfterServerFirst(self) -> None:
        """
        An exchange that ends without the client's final message once the
        server-first (the user's salt) is out counts as a failure: a
        hang-up, an undecodable response or one over the line limit.
        Before the server-first, a hang-up costs nothing.
        """
        conn = self.secure()
        conn.send(b"AUTH SCRAM-SHA-256\r\n")
        conn.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.lockout.calls, [])
        for ending in (b"not base64!\r\n", b"A" * 20_000 + b"\r\n", None):
            self.lockout.calls.clear()
            conn = self.secure()
            conn.send(b"AUTH SCRAM-SHA-256 " + b64(client([SCRAM]).get_client_first().encode()) + b"\r\n")
            if ending is None:
                conn.proto.connectionLost(Failure(ConnectionDone()))
            else:
                conn.send(ending)
            self.assertEqual(self.lockout.calls, [("check", "user"), ("failed", "user")], ending)

    def test_lockedOut(self) -> None:
        """
        A user the lockout refuses gets its 454 before any key lookup.
        """
        self.lockout.refuse = True
        conn = self.secure()
        conn.send(b"AUTH SCRAM-SHA-256 " + b64(client([SCRAM]).get_client_first().encode()) + b"\r\n")
        self.assertEqual(conn.replies()[-1], b"454 4.7.0 " + AUTH_LOCKED.text.encode())
        self.assertEqual(self.checker.asked, [])

    def test_keysUnavailable(self) -> None:
        """
        Keys that cannot be read now (the checker fails, says so with
        L{TemporaryAuthFailure}, or takes longer than the timeout) get 454
        4.7.0 and count nothing.
        """
        temporary = b"454 4.7.0 Temporary authentication failure"
        first = b"AUTH SCRAM-SHA-256 " + b64(client([SCRAM]).get_client_first().encode()) + b"\r\n"
        self.checker.answer = fail(TemporaryAuthFailure("backend down"))
        conn = self.secure()
        with capturedLogs() as events:
            conn.send(first)
        self.assertEqual(conn.replies()[-1], temporary)
        self.assertEqual(
            [(e["log_level"], e.get("reason")) for e in events if "reason" in e],
            [(LogLevel.warn, cast(Any, self.checker.answer).result.value)],
        )
        self.checker.answer = fail(OSError("unreadable"))
        conn = self.secure()
        conn.send(first)
        self.assertEqual(conn.replies()[-1], temporary)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.checker.answer = Deferred()
        conn = self.secure()
        conn.send(first)
        self.assertEqual(conn.replies(), [])
        self.clock.advance(30)
        self.assertEqual(conn.replies()[-1], temporary)
        self.assertEqual([call[0] for call in self.lockout.calls], ["check"] * 3)


class OfferTests(SessionMixin, SynchronousTestCase):
    def test_notBeforeTLS(self) -> None:
        """
        Before STARTTLS, AUTH is not advertised; SCRAM-SHA-256 gets 538
        and -PLUS, which needs a binding, 504.
        """
        conn = connect("submission", tlsOptions=object(), transportFactory=TLSStringTransport, auth=self.auth)
        conn.send(EHLO)
        self.assertFalse([line for line in conn.lines() if b"AUTH" in line])
        conn.transport.clear()
        conn.send(b"AUTH SCRAM-SHA-256\r\nAUTH SCRAM-SHA-256-PLUS\r\n")
        self.assertEqual(
            conn.replies(),
            [
                b"538 5.7.11 Encryption required for requested authentication mechanism",
                b"504 5.5.4 Unrecognized authentication type",
            ],
        )
        self.assertEqual(self.lockout.calls, [])

    def test_plusNeedsBinding(self) -> None:
        """
        Inside TLS without a binding, -PLUS is not accepted either.
        """
        conn = self.secure()
        conn.send(b"AUTH SCRAM-SHA-256-PLUS\r\n")
        self.assertEqual(conn.replies(), [b"504 5.5.4 Unrecognized authentication type"])

    def test_checkerWithoutKeys(self) -> None:
        """
        A checker that only sees passwords (C{twisted.cred}'s, Dovecot's)
        has no SCRAM: the default list offers PLAIN and LOGIN, SCRAM gets
        504, and listing only SCRAM mechanisms is refused.
        """
        db = InMemoryUsernamePasswordDatabaseDontUse(user=b"pencil")
        auth = SMTPAuth(Portal(MailRealm(), [db]), AuthThrottle(self.clock))
        conn = connect("submissions", transportFactory=TLSStringTransport, auth=auth)
        conn.send(EHLO + b"AUTH SCRAM-SHA-256\r\n")
        self.assertIn(b"250 AUTH PLAIN LOGIN", conn.lines())
        self.assertEqual(conn.replies()[-1], b"504 5.5.4 Unrecognized authentication type")
        dovecot = DovecotChecker(DovecotAuthClient(None, self.clock, description="test"))  # type: ignore[arg-type]
        self.assertIsNone(scramKeySource(Portal(MailRealm(), [dovecot])))
        self.assertIs(scramKeySource(Portal(MailRealm(), [self.checker])), self.checker)
        self.assertRaises(ValueError, SMTPAuth, Portal(MailRealm(), [db]), AuthThrottle(self.clock), (SCRAM,))

    def test_configuredList(self) -> None:
        """
        Only the configured mechanisms are offered, in their order.
        """
        auth = SMTPAuth(Portal(MailRealm(), [self.checker]), AuthThrottle(self.clock), ("PLAIN", SCRAM))
        self.assertEqual(auth.offered(None), ("PLAIN", SCRAM))
        self.assertEqual(auth.offered(ChannelBinding("tls-exporter", b"x")), ("PLAIN", SCRAM))
        self.assertEqual(self.auth.offered(ChannelBinding("tls-exporter", b"x"))[:2], (SCRAM_PLUS, SCRAM))


class TLSTests(SessionMixin, SynchronousTestCase):
    """
    Over real TLS connections in memory, where the session has a channel
    binding: C{tls-exporter} on TLS 1.3, C{tls-unique} on TLS 1.2.
    """

    def connect(self, version: TLSVersion) -> tuple[RecordingClient, Any, Any]:
        """
        A submissions session over TLS C{version}, after EHLO.

        @return: the client, the client's TLS connection and the pump.
        """
        server = SMTPServerProtocol(
            SessionSettings(
                "submissions",
                HOSTNAME,
                RecordingQueue(),  # type: ignore[arg-type]
                DictRouter(),
                self.clock,
                (),
                SMTPLimits(),
                None,
                auth=self.auth,
            )
        )
        recorder = RecordingClient()
        clientTLS, _, pump = tlsPair(
            version,
            server=server,
            client=recorder,
            serverPeer=IPv4Address("TCP", "192.0.2.7", 4000),
            clock=self.clock,
        )
        clientTLS.write(EHLO)
        pump.flush()
        self.assertIn(b"250 AUTH SCRAM-SHA-256-PLUS SCRAM-SHA-256 PLAIN LOGIN\r\n", recorder.received)
        recorder.received = b""
        return recorder, clientTLS, pump

    def bindingOf(self, version: TLSVersion) -> tuple[Any, ChannelBinding]:
        """
        A connection's client end and the channel binding it sees.
        """
        recorder, clientTLS, _ = self.connect(version)
        binding = channelBindingFor(clientTLS, server=False)
        assert binding is not None
        return recorder, binding

    def test_plus(self) -> None:
        """
        scramp's client, given its own end's binding, logs in with
        SCRAM-SHA-256-PLUS on TLS 1.3 and TLS 1.2, and may send mail.
        """
        allowExporter(self)
        for version, name in ((TLSVersion.TLSv1_3, "tls-exporter"), (TLSVersion.TLSv1_2, "tls-unique")):
            recorder, clientTLS, pump = self.connect(version)
            binding = channelBindingFor(clientTLS, server=False)
            assert binding is not None
            self.assertEqual(binding.name, name)
            scram = client([SCRAM_PLUS], binding=binding)
            self.assertEqual(tlsExchange(recorder, clientTLS, pump, scram, SCRAM_PLUS), OK)
            self.assertEqual(
                send(recorder, clientTLS, pump, b"MAIL FROM:<user@example.org>"), b"250 2.1.0 Ok"
            )

    def test_withoutBinding(self) -> None:
        """
        A client that cannot bind (C{n}) may still use SCRAM-SHA-256 where
        -PLUS is offered.
        """
        recorder, clientTLS, pump = self.connect(TLSVersion.TLSv1_3)
        self.assertEqual(tlsExchange(recorder, clientTLS, pump, client([SCRAM]), SCRAM), OK)

    def test_bindingMismatch(self) -> None:
        """
        A client bound to another TLS connection (what a man in the middle
        who terminates TLS would relay) gets 535 5.7.8 and a counted
        failure; so does a client that says C{y} (it could bind but saw no
        -PLUS) where -PLUS was offered: someone removed it.
        """
        allowExporter(self)
        for version in (TLSVersion.TLSv1_3, TLSVersion.TLSv1_2):
            _, elsewhere = self.bindingOf(version)
            recorder, clientTLS, pump = self.connect(version)
            scram = client([SCRAM_PLUS], binding=elsewhere)
            self.assertEqual(tlsExchange(recorder, clientTLS, pump, scram, SCRAM_PLUS), FAILED)
        recorder, clientTLS, pump = self.connect(TLSVersion.TLSv1_2)
        scram = client([SCRAM], binding=channelBindingFor(clientTLS, server=False))
        first = b64(scram.get_client_first().encode())
        self.assertEqual(send(recorder, clientTLS, pump, b"AUTH SCRAM-SHA-256 " + first), FAILED)
        self.assertEqual([call[0] for call in self.lockout.calls], ["check", "failed"] * 2 + ["failed"])


def send(recorder: RecordingClient, clientTLS: Any, pump: Any, line: bytes) -> bytes:
    """
    Send C{line} over TLS; the reply.
    """
    recorder.received = b""
    clientTLS.write(line + b"\r\n")
    pump.flush()
    return recorder.received.removesuffix(b"\r\n")


def tlsExchange(recorder: RecordingClient, clientTLS: Any, pump: Any, scram: Any, mechanism: str) -> bytes:
    """
    Run a SCRAM exchange with scramp's client over TLS; the last reply.
    """
    reply = send(
        recorder, clientTLS, pump, f"AUTH {mechanism} ".encode() + b64(scram.get_client_first().encode())
    )
    scram.set_server_first(unb64(reply))
    reply = send(recorder, clientTLS, pump, b64(scram.get_client_final().encode()))
    if not reply.startswith(b"334 "):
        return reply
    scram.set_server_final(unb64(reply))
    return send(recorder, clientTLS, pump, b"")


class ConfigTests(SynchronousTestCase):
    def test_defaultList(self) -> None:
        """
        By default C{[auth]} lists both SCRAMs before PLAIN and LOGIN; with
        the password file they are offered, with a C{strcred} checker not.
        """
        setup = build(self, passwords="p")
        self.assertEqual(setup.auth.mechanisms, (SCRAM_PLUS, SCRAM, "PLAIN", "LOGIN"))
        self.assertEqual(setup.auth.offered(None), (SCRAM, "PLAIN", "LOGIN"))
        setup = build(self, checker="memory:a:b")
        self.assertEqual(setup.auth.offered(ChannelBinding("tls-unique", b"x")), ("PLAIN", "LOGIN"))
        setup = build(self, passwords="p", mechanisms=["scram-sha-256", "plain"])
        self.assertEqual(setup.auth.mechanisms, (SCRAM, "PLAIN"))

    def test_scramWithoutKeys(self) -> None:
        """
        Listing a SCRAM mechanism for a backend without SCRAM keys is a
        configuration error naming the key.
        """
        for options in (
            {"checker": "memory:a:b", "mechanisms": ["PLAIN", "SCRAM-SHA-256"]},
            {"backend": "dovecot", "mechanisms": ["SCRAM-SHA-256-PLUS"]},
        ):
            error = self.assertRaises(ConfigError, build, self, **options)
            self.assertIn("[auth] mechanisms: SCRAM-SHA-256", str(error))
