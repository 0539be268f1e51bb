"""
Tests for the C{limits} policy (L{mailfw.policy._limits}): simultaneous
connections per client and per network, rates per minute, error and AUTH
failure counts across sessions, stress mode and bounded memory, with a
L{Clock}.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailfw.address import Address
from mailfw.config import ComponentContext, ConfigError
from mailfw.envelope import Envelope, Recipient, Session
from mailfw.interfaces import IPolicy, IPolicyFactory, ISharedState
from mailfw.plugin import findPlugin
from mailfw.policy import CONTINUE, Verdict
from mailfw.policy._limits import (
    AUTH_FAILURES,
    CLIENT_BUSY,
    CLIENT_ERRORS,
    CONNECTION_RATE,
    MESSAGE_RATE,
    NETWORK_BUSY,
    RECIPIENT_RATE,
    LimitSettings,
    LimitsPolicy,
    fromConfig,
)
from mailfw.queue import MemoryQueue
from mailfw.sharedstate import MemorySharedState
from mailfw.smtp import SMTPFactory, SMTPServerProtocol
from mailfw.testing import connectedServer
from tests._smtpdoubles import EHLO, DictRouter, TLSStringTransport, connect
from tests.test_smtp_auth import makeAuth, plain

_ids = iter(range(1, 1_000_000))


def session(host: str = "192.0.2.1", **kw: object) -> Session:
    return Session(listener="smtp", peerHost=host, id=str(next(_ids)), **kw)  # type: ignore[arg-type]


OFF = LimitSettings(
    connectionsPerClient=0,
    connectionsPerNetwork=0,
    connectionRate=0,
    messageRate=0,
    recipientRate=0,
    errorsPerClient=0,
    authFailuresPerClient=0,
)


LOOPBACK_ONLY = (ipaddress.ip_network("127.0.0.0/8"),)


def openSession(factory: SMTPFactory, host: str = "192.0.2.1") -> tuple[SMTPServerProtocol, StringTransport]:
    """
    A new connection from C{host} to C{factory}'s listener.
    """
    address = IPv4Address("TCP", host, 40000)
    proto = factory.buildProtocol(address)
    assert isinstance(proto, SMTPServerProtocol)
    transport = StringTransport(peerAddress=address)
    proto.makeConnection(transport)
    return proto, transport


@implementer(ISharedState)
class LaterCounts:
    """
    A shared store whose counts answer later, as the queue's database does:
    each C{count} is recorded in C{calls} and waits in C{pending} for the
    test to fire it.  Marks are kept at once.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.pending: list[Deferred[int]] = []
        self._marks = MemorySharedState(100)

    def count(self, key: str, amount: int, window: float, now: float) -> Deferred[int]:
        self.calls.append((key, amount))
        d: Deferred[int] = Deferred()
        self.pending.append(d)
        return d

    def mark(self, key: str, lifetime: float, now: float) -> Deferred[float]:
        return self._marks.mark(key, lifetime, now)

    def forget(self, key: str) -> Deferred[None]:
        return self._marks.forget(key)


class LimitsTests(SynchronousTestCase):
    def make(self, exempt: object = (), **settings: object) -> LimitsPolicy:
        self.clock = Clock()
        return LimitsPolicy("limits", self.clock, replace(OFF, **settings), exempt=exempt)  # type: ignore[arg-type]

    def answer(self, result: Verdict | Deferred[Verdict]) -> Verdict:
        if isinstance(result, Deferred):
            return self.successResultOf(result)
        return result

    def connect(self, policy: LimitsPolicy, s: Session) -> Verdict:
        return self.answer(policy.checkConnection(s))

    def test_providesIPolicy(self) -> None:
        self.assertTrue(verifyObject(IPolicy, self.make()))

    def test_connectionsPerClient(self) -> None:
        """
        Past the per-client limit a connection gets 421 and is closed; when
        one ends the next is admitted.
        """
        policy = self.make(connectionsPerClient=2)
        first, second = session(), session()
        self.assertEqual(self.connect(policy, first), CONTINUE)
        self.assertEqual(self.connect(policy, second), CONTINUE)
        refused = self.connect(policy, session())
        self.assertEqual(refused, Verdict(CLIENT_BUSY, disconnect=True))
        self.assertEqual(self.connect(policy, session("192.0.2.2")), CONTINUE)
        policy.sessionEnded(first)
        self.assertEqual(self.connect(policy, session()), CONTINUE)

    def test_connectionsPerNetwork(self) -> None:
        """
        Clients of one /24 share the per-network limit; another /24 does not.
        """
        policy = self.make(connectionsPerNetwork=2)
        self.connect(policy, session("192.0.2.1"))
        self.connect(policy, session("192.0.2.2"))
        self.assertEqual(self.connect(policy, session("192.0.2.3")).reply, NETWORK_BUSY)
        self.assertEqual(self.connect(policy, session("192.0.3.1")), CONTINUE)

    def test_ipv6Slash64(self) -> None:
        """
        IPv6 clients of one /64 are one client.
        """
        policy = self.make(connectionsPerClient=1)
        self.connect(policy, session("2001:db8::1"))
        self.assertEqual(self.connect(policy, session("2001:db8::2")).reply, CLIENT_BUSY)
        self.assertEqual(self.connect(policy, session("2001:db8:0:1::1")), CONTINUE)

    def test_endedSessionsForgotten(self) -> None:
        """
        Counts hold live sessions only: after every session ends nothing is
        kept, so memory does not grow with the number of clients seen.
        """
        policy = self.make(connectionsPerClient=5, connectionsPerNetwork=5)
        sessions = [session(f"10.{i // 250}.{i % 250}.1") for i in range(1000)]
        for s in sessions:
            self.connect(policy, s)
        self.assertEqual(policy.connections, 1000)
        for s in sessions:
            policy.sessionEnded(s)
            policy.sessionEnded(s)  # twice: harmless
        self.assertEqual(policy.connections, 0)
        self.assertEqual((policy._sessions, policy._perClient, policy._perNetwork), ({}, {}, {}))

    def test_refusedNotCounted(self) -> None:
        """
        A refused connection does not hold a place.
        """
        policy = self.make(connectionsPerClient=1)
        kept, refused = session(), session()
        self.connect(policy, kept)
        self.connect(policy, refused)
        policy.sessionEnded(refused)
        self.assertEqual(self.connect(policy, session()).reply, CLIENT_BUSY)

    def test_connectionRate(self) -> None:
        """
        Past the rate within the window a connection gets 421; the next
        window starts from zero.
        """
        policy = self.make(connectionRate=3)
        for _ in range(3):
            s = session()
            self.assertEqual(self.connect(policy, s), CONTINUE)
            policy.sessionEnded(s)
        over = session()
        self.assertEqual(self.connect(policy, over), Verdict(CONNECTION_RATE, disconnect=True))
        self.assertEqual(policy.connections, 0, "a connection refused for its rate holds no place")
        self.clock.advance(60)
        self.assertEqual(self.connect(policy, session()), CONTINUE)

    def test_messageAndRecipientRates(self) -> None:
        """
        MAIL and RCPT past their rates get 450 4.7.1 (try later).
        """
        policy = self.make(messageRate=2, recipientRate=3)
        s = session()
        envelope = Envelope(None)
        rcpt = Recipient(Address("bob", "example.org"))
        results = [self.answer(policy.checkSender(s, None, {})) for _ in range(3)]
        self.assertEqual(results[:2], [CONTINUE, CONTINUE])
        self.assertEqual(results[2].reply, MESSAGE_RATE)
        results = [self.answer(policy.checkRecipient(s, envelope, rcpt)) for _ in range(4)]
        self.assertEqual(results[3].reply, RECIPIENT_RATE)
        self.assertEqual(results[3].reply.code, 450)  # type: ignore[union-attr]
        self.clock.advance(60)
        self.assertEqual(self.answer(policy.checkSender(s, None, {})), CONTINUE)

    def test_ratesSkipTrustedClients(self) -> None:
        """
        Authenticated clients and clients with relay rights are not held to
        the message and recipient rates.
        """
        policy = self.make(messageRate=1)
        for s in (session(authenticated="alice"), session(relayClient=True)):
            for _ in range(5):
                self.assertEqual(self.answer(policy.checkSender(s, None, {})), CONTINUE)

    def test_exempt(self) -> None:
        """
        Exempt clients are held to nothing but count towards the total.
        """
        policy = self.make(connectionsPerClient=1, connectionRate=1, messageRate=1)
        policy.exempt = (ipaddress.ip_network("127.0.0.0/8"),)
        for _ in range(3):
            s = session("127.0.0.1")
            self.assertEqual(self.connect(policy, s), CONTINUE)
            self.assertEqual(self.answer(policy.checkSender(s, None, {})), CONTINUE)
        self.assertEqual(policy.connections, 3)

    def test_stressMode(self) -> None:
        """
        A session that began under stress (C{Session.stressed}, the
        listener's decision) is held to the tighter per-client and
        per-network limits, and its refusal says so in the log; others are
        held to the normal ones.
        """
        policy = self.make(
            connectionsPerClient=10,
            connectionsPerNetwork=10,
            stressConnectionsPerClient=2,
            stressConnectionsPerNetwork=3,
        )
        self.connect(policy, session())
        self.connect(policy, session())
        with capturedLogs() as events:
            self.assertEqual(self.connect(policy, session(stressed=True)).reply, CLIENT_BUSY)
        self.assertEqual([e["stress"] for e in events], [" (stress mode)"])
        self.assertEqual(self.connect(policy, session()), CONTINUE)
        self.assertEqual(self.connect(policy, session("192.0.2.9", stressed=True)).reply, NETWORK_BUSY)
        self.assertEqual(self.connect(policy, session("192.0.3.9", stressed=True)), CONTINUE)

    def test_stressOff(self) -> None:
        """
        With both stress limits 0 (C{stress_threshold = 0} of old) a
        stressed session is held to the normal limits.
        """
        policy = self.make(
            connectionsPerClient=3, stressConnectionsPerClient=0, stressConnectionsPerNetwork=0
        )
        for _ in range(3):
            self.assertEqual(self.connect(policy, session(stressed=True)), CONTINUE)
        self.assertEqual(self.connect(policy, session(stressed=True)).reply, CLIENT_BUSY)

    def end(self, policy: LimitsPolicy, host: str = "192.0.2.1", **counts: object) -> None:
        """
        A whole session from C{host}: admitted, then ended with C{counts}.
        """
        s = session(host)
        self.assertEqual(self.connect(policy, s), CONTINUE, "the session itself was refused")
        policy.sessionEnded(replace(s, **counts))  # type: ignore[arg-type]

    def test_errorsPerClient(self) -> None:
        """
        Errors add up across a client's sessions: at C{errorsPerClient}
        within the window its next connection gets 421 4.7.0 and is
        closed (and does not count as a connection), another client is
        let in, and after the window the client is let in again.
        """
        policy = self.make(errorsPerClient=5)
        self.end(policy, errors=3)
        self.end(policy, errors=1)
        self.end(policy, errors=1)
        refused = self.connect(policy, session())
        self.assertEqual(refused, Verdict(CLIENT_ERRORS, disconnect=True))
        self.assertEqual(policy.connections, 0)
        self.assertEqual(self.connect(policy, session("192.0.2.2")), CONTINUE)
        self.clock.advance(59)
        self.assertEqual(self.connect(policy, session()).reply, CLIENT_ERRORS)
        self.clock.advance(1)
        self.assertEqual(self.connect(policy, session()), CONTINUE)

    def test_errorsUnderLimit(self) -> None:
        """
        One error fewer than the limit lets the client in.
        """
        policy = self.make(errorsPerClient=5)
        self.end(policy, errors=4)
        self.assertEqual(self.connect(policy, session()), CONTINUE)

    def test_authFailuresPerClient(self) -> None:
        """
        AUTH failures add up across sessions, also those of a session that
        authenticated in the end; at C{authFailuresPerClient} the next
        connection gets 421 4.7.0.
        """
        policy = self.make(authFailuresPerClient=3, errorsPerClient=100)
        self.end(policy, authFailures=2, authenticated="alice", relayClient=True, errors=2)
        self.assertEqual(self.connect(policy, session()), CONTINUE)
        self.end(policy, authFailures=1, errors=1)
        self.assertEqual(self.connect(policy, session()), Verdict(AUTH_FAILURES, disconnect=True))
        self.clock.advance(60)
        self.assertEqual(self.connect(policy, session()), CONTINUE)

    def test_trustedErrorsNotCounted(self) -> None:
        """
        The errors of authenticated and relay sessions are not counted, nor
        anything of an exempt client; an IPv6 client is counted by its /64.
        """
        policy = self.make(errorsPerClient=1, authFailuresPerClient=1, exempt=LOOPBACK_ONLY)
        self.end(policy, errors=5, authenticated="alice", relayClient=True)
        self.end(policy, errors=5, relayClient=True)
        self.assertEqual(self.connect(policy, session()), CONTINUE)
        self.end(policy, "127.0.0.1", errors=5, authFailures=5)
        self.assertEqual(self.connect(policy, session("127.0.0.1")), CONTINUE)
        self.end(policy, "2001:db8::1", errors=1)
        self.assertEqual(self.connect(policy, session("2001:db8::2")).reply, CLIENT_ERRORS)

    def test_failureCountsOff(self) -> None:
        """
        With both counts 0 nothing is counted or kept.
        """
        policy = self.make()
        self.end(policy, errors=500, authFailures=500)
        self.assertEqual(self.connect(policy, session()), CONTINUE)
        self.assertEqual(len(policy.rates), 0)  # type: ignore[arg-type]

    def test_failureCountsSharedStore(self) -> None:
        """
        With a store that answers later, the connection waits for each
        counter in turn (errors, AUTH failures, then the connection rate,
        which a refused connection does not count); ended sessions add to
        it, and a store that fails to count is logged.
        """
        later = LaterCounts()
        calls, pending = later.calls, later.pending
        policy = self.make(errorsPerClient=5, authFailuresPerClient=3, connectionRate=10)
        policy.rates = later
        s = session()
        verdict = policy.checkConnection(s)
        assert isinstance(verdict, Deferred)
        for count in (4, 2, 1):
            self.assertNoResult(verdict)
            pending[-1].callback(count)
        self.assertEqual(self.successResultOf(verdict), CONTINUE)
        self.assertEqual(
            calls,
            [
                ("limits:err:192.0.2.1/32", 0),
                ("limits:auth:192.0.2.1/32", 0),
                ("limits:conn:192.0.2.1/32", 1),
            ],
        )
        del calls[:]
        refused = policy.checkConnection(session())
        assert isinstance(refused, Deferred)
        pending[-1].callback(5)
        self.assertEqual(self.successResultOf(refused).reply, CLIENT_ERRORS)
        self.assertEqual(calls, [("limits:err:192.0.2.1/32", 0)])
        del calls[:]
        with capturedLogs() as events:
            policy.sessionEnded(replace(s, errors=2, authFailures=1))
            self.assertEqual(calls, [("limits:err:192.0.2.1/32", 2), ("limits:auth:192.0.2.1/32", 1)])
            pending[-2].callback(3)
            pending[-1].errback(OSError("database is locked"))
        self.assertEqual([e["key"] for e in events], ["limits:auth:192.0.2.1/32"])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_rateMemoryBounded(self) -> None:
        """
        The rate counters keep at most the configured number of clients.
        """
        policy = self.make(messageRate=5)
        policy.rates = MemorySharedState(100)
        for i in range(1000):
            self.answer(policy.checkSender(session(f"10.0.{i // 250}.{i % 250}"), None, {}))
        self.assertEqual(len(policy.rates), 100)

    def test_sharedStoreAnsweringLater(self) -> None:
        """
        With a store that answers later (the queue's database), the verdict
        waits for the count; a store that fails fails the call, for the
        link's C{on_error}.
        """
        later = LaterCounts()
        pending = later.pending
        policy = self.make(messageRate=1)
        policy.rates = later
        s = session()
        first = policy.checkSender(s, None, {})
        assert isinstance(first, Deferred)
        self.assertNoResult(first)
        pending[0].callback(1)
        self.assertEqual(self.successResultOf(first), CONTINUE)
        second = policy.checkSender(s, None, {})
        assert isinstance(second, Deferred)
        pending[1].callback(2)
        self.assertEqual(self.successResultOf(second).reply, MESSAGE_RATE)
        third = policy.checkSender(s, None, {})
        assert isinstance(third, Deferred)
        pending[2].errback(OSError("database is locked"))
        self.failureResultOf(third, OSError)

    def test_errorsThroughServer(self) -> None:
        """
        Through the real server and factory: a client whose sessions
        collected C{errors_per_client} error replies gets 421 4.7.0
        instead of the greeting on its next connection, and the greeting
        again after the window.
        """
        policy = self.make(errorsPerClient=4)
        factory = SMTPFactory(
            "smtp", "mx.example.org", MemoryQueue(self.clock), DictRouter(), self.clock, [policy]
        )
        for _ in range(2):
            proto, transport = openSession(factory)
            proto.dataReceived(b"XYZZY\r\nXYZZY\r\n")
            self.assertEqual(transport.value().count(b"500 "), 2)
            proto.connectionLost(Failure(ConnectionDone()))
        proto, transport = openSession(factory)
        self.assertEqual(
            transport.value(),
            b"421 mx.example.org Too many errors from your address, try again later\r\n",
        )
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(60)
        proto, transport = openSession(factory)
        self.assertEqual(transport.value(), b"220 mx.example.org ESMTP\r\n")

    def test_authFailuresThroughServer(self) -> None:
        """
        Through the real server: failed AUTH exchanges of a session are
        counted when it ends, and at C{auth_failures_per_client} the
        client's next connection gets 421 4.7.0.
        """
        policy = self.make(authFailuresPerClient=3)
        auth = makeAuth(self.clock, maxFailures=100)
        conn = connect(
            "submissions", [policy], auth=auth, clock=self.clock, transportFactory=TLSStringTransport
        )
        conn.send(EHLO)
        for _ in range(3):
            conn.send(b"AUTH PLAIN " + plain(password="wrong") + b"\r\n")
        self.assertEqual(conn.codes()[-3:], [b"535"] * 3)
        conn.proto.connectionLost(Failure(ConnectionDone()))
        again = connect("submissions", [policy], auth=auth, clock=self.clock, greet=False)
        self.assertEqual(
            again.transport.value(),
            b"421 mx.example.org Too many failed logins from your address, try again later\r\n",
        )

    def test_throughServer(self) -> None:
        """
        Through the real server a third MAIL within a minute gets 450.
        """
        policy = self.make(messageRate=2)
        connection = connectedServer(policies=[policy], clock=self.clock)
        connection.send(b"EHLO client.example\r\n")
        for _ in range(3):
            connection.send(b"MAIL FROM:<a@sender.example>\r\nRSET\r\n")
        self.assertEqual(connection.codes()[-6:], [250, 250, 250, 250, 450, 250])


class FromConfigTests(SynchronousTestCase):
    def context(self) -> ComponentContext:
        return ComponentContext(
            reactor=Clock(), hostname="mx.example.org", dataDir=Path("."), queue=MemoryQueue(Clock())
        )

    def test_plugin(self) -> None:
        """
        The bundled plugin reads every option.
        """
        built = findPlugin(IPolicyFactory, "limits").fromConfig(
            self.context(),
            "limits",
            {
                "connections_per_client": 3,
                "connections_per_network": 7,
                "connection_rate": 11,
                "message_rate": 13,
                "recipient_rate": 17,
                "rate_window": 30,
                "stress_connections_per_client": 1,
                "stress_connections_per_network": 4,
                "errors_per_client": 19,
                "auth_failures_per_client": 23,
                "exempt_networks": [],
                "max_clients": 10,
            },
        )
        assert isinstance(built, LimitsPolicy)
        self.assertEqual(
            built.settings, LimitSettings(3, 7, 11, 13, 17, 30.0, 1, 4, 19, 23), "an option was not read"
        )
        self.assertEqual(built.exempt, ())

    def test_defaults(self) -> None:
        """
        Loopback is exempt by default.
        """
        built = fromConfig(self.context(), "limits", {})
        self.assertEqual([str(n) for n in built.exempt], ["127.0.0.0/8", "::1/128"])
        self.assertEqual(built.settings, LimitSettings())

    def test_oldStressThreshold(self) -> None:
        """
        C{stress_threshold = 0}, "never tighter", keeps its meaning; any
        other value is refused with a message that says where stress mode
        is set now.
        """
        built = fromConfig(
            self.context(), "limits", {"stress_threshold": 0, "stress_connections_per_client": 1}
        )
        self.assertEqual(
            (built.settings.stressConnectionsPerClient, built.settings.stressConnectionsPerNetwork), (0, 0)
        )
        with self.assertRaises(ConfigError) as caught:
            fromConfig(self.context(), "limits", {"stress_threshold": 500})
        self.assertIn("[policy.limits] stress_threshold", str(caught.exception))
        self.assertIn("[smtp] stress_threshold", str(caught.exception))

    def test_errors(self) -> None:
        """
        Negative limits, bad networks and unknown options are refused.
        """
        for options in (
            {"message_rate": -1},
            {"errors_per_client": -1},
            {"auth_failures_per_client": -1},
            {"stress_threshold": -1},
            {"exempt_networks": ["10.0.0.0/33"]},
            {"mesage_rate": 5},
        ):
            with self.assertRaises(ConfigError) as caught:
                fromConfig(self.context(), "limits", options)
            self.assertIn("[policy.limits]", str(caught.exception))
