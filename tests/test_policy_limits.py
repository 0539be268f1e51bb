"""
Tests for the C{limits} policy (L{mailfw.policy._limits}): simultaneous
connections per client and per network, rates per minute, stress mode and
bounded memory, with a L{Clock}.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
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
    CLIENT_BUSY,
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
from mailfw.testing import connectedServer

_ids = iter(range(1, 1_000_000))


def session(host: str = "192.0.2.1", **kw: object) -> Session:
    return Session(listener="smtp", peerHost=host, id=str(next(_ids)), **kw)  # type: ignore[arg-type]


OFF = LimitSettings(
    connectionsPerClient=0,
    connectionsPerNetwork=0,
    connectionRate=0,
    messageRate=0,
    recipientRate=0,
    stressThreshold=0,
)


class LimitsTests(SynchronousTestCase):
    def make(self, **settings: object) -> LimitsPolicy:
        from dataclasses import replace

        self.clock = Clock()
        return LimitsPolicy("limits", self.clock, replace(OFF, **settings))  # type: ignore[arg-type]

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
        At the threshold stress mode starts (logged) and the tighter
        per-client limit applies; below three quarters of it, it ends.
        """
        policy = self.make(
            connectionsPerClient=10,
            stressThreshold=8,
            stressConnectionsPerClient=2,
            stressConnectionsPerNetwork=0,
        )
        others = [session(f"198.51.100.{i}") for i in range(6)]
        for s in others:
            self.connect(policy, s)
        self.connect(policy, session())
        self.assertFalse(policy.stressed)
        with capturedLogs() as events:
            self.assertEqual(self.connect(policy, session()), CONTINUE)
        self.assertTrue(policy.stressed)
        self.assertTrue(any("stress mode on" in e["log_format"] for e in events))
        self.assertEqual(self.connect(policy, session()).reply, CLIENT_BUSY)
        for s in others[:2]:
            policy.sessionEnded(s)
        self.assertTrue(policy.stressed, "left stress mode too early")
        policy.sessionEnded(others[2])
        self.assertFalse(policy.stressed)
        self.assertEqual(self.connect(policy, session()), CONTINUE)

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
        pending: list[Deferred[int]] = []

        @implementer(ISharedState)
        class Later:
            def count(self, key: str, amount: int, window: float, now: float) -> Deferred[int]:
                d: Deferred[int] = Deferred()
                pending.append(d)
                return d

            def mark(self, key: str, lifetime: float, now: float) -> Deferred[float]:
                raise NotImplementedError()

            def forget(self, key: str) -> Deferred[None]:
                raise NotImplementedError()

        policy = self.make(messageRate=1)
        policy.rates = Later()
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
                "stress_threshold": 100,
                "stress_connections_per_client": 1,
                "stress_connections_per_network": 4,
                "exempt_networks": [],
                "max_clients": 10,
            },
        )
        assert isinstance(built, LimitsPolicy)
        self.assertEqual(
            built.settings, LimitSettings(3, 7, 11, 13, 17, 30.0, 100, 1, 4), "an option was not read"
        )
        self.assertEqual(built.exempt, ())

    def test_defaults(self) -> None:
        """
        Loopback is exempt by default.
        """
        built = fromConfig(self.context(), "limits", {})
        self.assertEqual([str(n) for n in built.exempt], ["127.0.0.0/8", "::1/128"])
        self.assertEqual(built.settings, LimitSettings())

    def test_errors(self) -> None:
        """
        Negative limits, bad networks and unknown options are refused.
        """
        for options in ({"message_rate": -1}, {"exempt_networks": ["10.0.0.0/33"]}, {"mesage_rate": 5}):
            with self.assertRaises(ConfigError) as caught:
                fromConfig(self.context(), "limits", options)
            self.assertIn("[policy.limits]", str(caught.exception))
