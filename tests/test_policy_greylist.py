"""
Tests for the C{greylist} policy (L{mailfw.policy._greylist}): triplets
deferred until their delay has passed, expiry, auto-allowing clients that
retried, and state kept in the queue's database, with a L{Clock}.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailfw.address import Address
from mailfw.config import ComponentContext, ConfigError
from mailfw.envelope import Envelope, Recipient, Session
from mailfw.interfaces import IPolicy, IPolicyFactory, ISharedState
from mailfw.plugin import findPlugin
from mailfw.policy import CONTINUE, Verdict
from mailfw.policy._greylist import GreylistPolicy, fromConfig
from mailfw.queue import MemoryQueue
from mailfw.sharedstate import MemorySharedState
from mailfw.testing import connectedServer
from tests.test_queue_sqlite import synchronousQueue

SESSION = Session(listener="smtp", peerHost="192.0.2.10", id="1")
SENDER = Address("alice", "sender.example")
ENVELOPE = Envelope(SENDER)
BOB = Recipient(Address("bob", "example.org"))
CAROL = Recipient(Address("carol", "example.org"))


class GreylistTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.state = MemorySharedState()
        self.policy = GreylistPolicy(
            "grey", self.state, self.clock, delay=300, retryWindow=3600, maxAge=86400
        )

    def ask(
        self, recipient: Recipient = BOB, session: Session = SESSION, envelope: Envelope = ENVELOPE
    ) -> Verdict:
        result = self.policy.checkRecipient(session, envelope, recipient)
        if isinstance(result, Deferred):
            return self.successResultOf(result)
        return result

    def assertDeferred(self, verdict: Verdict) -> None:
        self.assertIsNotNone(verdict.reply, "expected the triplet to be greylisted")
        assert verdict.reply is not None
        self.assertEqual((verdict.reply.code, verdict.reply.enhanced), (451, "4.7.1"))

    def test_providesIPolicy(self) -> None:
        self.assertTrue(verifyObject(IPolicy, self.policy))

    def test_firstAttemptDeferredRetryAccepted(self) -> None:
        """
        The first attempt gets 451 4.7.1; a retry before the delay too; a
        retry after it passes, and so do later messages of the triplet.
        """
        self.assertDeferred(self.ask())
        self.clock.advance(299)
        self.assertDeferred(self.ask())
        self.clock.advance(1)
        self.assertEqual(self.ask(), CONTINUE)
        self.clock.advance(3600 * 5)
        self.assertEqual(self.ask(), CONTINUE)

    def test_tripletsAreSeparate(self) -> None:
        """
        Another recipient, another sender, or a client in another /24 is a
        new triplet; a client in the same /24 is not.
        """
        self.ask()
        self.clock.advance(300)
        self.assertEqual(self.ask(), CONTINUE)
        self.assertDeferred(self.ask(CAROL))
        self.assertDeferred(self.ask(envelope=Envelope(Address("eve", "sender.example"))))
        self.assertDeferred(self.ask(session=Session(listener="smtp", peerHost="192.0.3.10")))
        self.assertEqual(self.ask(session=Session(listener="smtp", peerHost="192.0.2.77")), CONTINUE)

    def test_ipv6Slash64(self) -> None:
        """
        IPv6 clients are counted by their /64.
        """
        first = Session(listener="smtp", peerHost="2001:db8:1:2::10")
        self.assertDeferred(self.ask(session=first))
        self.clock.advance(300)
        self.assertEqual(self.ask(session=Session(listener="smtp", peerHost="2001:db8:1:2::99")), CONTINUE)
        self.assertDeferred(self.ask(session=Session(listener="smtp", peerHost="2001:db8:1:3::10")))

    def test_retryTooLateStartsAgain(self) -> None:
        """
        A retry after the retry window is a first attempt again.
        """
        self.assertDeferred(self.ask())
        self.clock.advance(3601)
        self.assertDeferred(self.ask())
        self.clock.advance(300)
        self.assertEqual(self.ask(), CONTINUE)

    def test_passedTripletExpires(self) -> None:
        """
        A passed triplet is remembered for C{maxAge}, then greylisted anew.
        """
        self.ask()
        self.clock.advance(300)
        self.ask()
        self.clock.advance(86400)
        self.assertDeferred(self.ask())

    def test_autoAllow(self) -> None:
        """
        After C{autoAllow} correct retries a client network is no longer
        greylisted for new triplets.
        """
        self.policy.autoAllow = 2
        for recipient in (BOB, CAROL):
            self.ask(recipient)
            self.clock.advance(300)
            self.assertEqual(self.ask(recipient), CONTINUE)
        self.assertEqual(self.ask(Recipient(Address("dave", "example.org"))), CONTINUE)

    def test_exemptClients(self) -> None:
        """
        Clients with relay rights, authenticated clients and exempt networks
        are not greylisted, and nothing is stored for them.
        """
        import ipaddress

        self.policy.exempt = (ipaddress.ip_network("198.51.100.0/24"),)
        for session in (
            Session(listener="smtp", peerHost="192.0.2.10", relayClient=True),
            Session(listener="smtp", peerHost="192.0.2.10", authenticated="alice"),
            Session(listener="smtp", peerHost="198.51.100.1"),
        ):
            self.assertEqual(self.ask(session=session), CONTINUE)
        self.assertEqual(len(self.state), 0)

    def test_nullSender(self) -> None:
        """
        Bounces (null sender) are greylisted like other mail.
        """
        self.assertDeferred(self.ask(envelope=Envelope(None)))
        self.clock.advance(300)
        self.assertEqual(self.ask(envelope=Envelope(None)), CONTINUE)

    def test_keysArePlain(self) -> None:
        """
        Keys hold a hash of the triplet, not the client's bytes: short and
        plain whatever the addresses are.
        """
        seen: list[str] = []
        original = self.state.mark

        def mark(key: str, lifetime: float, now: float) -> Deferred[float]:
            seen.append(key)
            return original(key, lifetime, now)

        self.state.mark = mark  # type: ignore[method-assign]
        self.ask(Recipient(Address('"we\\"ird ' + "x" * 50 + '"', "example.org")))
        [key] = seen
        self.assertRegex(key, r"^greylist:seen:[0-9a-f]{32}$")

    def test_stateFailureFails(self) -> None:
        """
        When the shared state fails the call fails, so that the chain's
        C{on_error} decides (451 by default), rather than letting it pass.
        """

        class Broken(MemorySharedState):
            def count(self, key: str, amount: int, window: float, now: float) -> Deferred[int]:
                return fail(OSError("database is locked"))

        self.policy.state = Broken()
        result = self.policy.checkRecipient(SESSION, ENVELOPE, BOB)
        assert isinstance(result, Deferred)
        self.failureResultOf(result, OSError)

    def test_survivesRestartInQueueDatabase(self) -> None:
        """
        With the SQLite queue's shared state, a new policy on a new queue
        object over the same file (a restarted server, or another node)
        knows the first attempt.
        """
        path = Path(self.mktemp()) / "queue.sqlite"
        path.parent.mkdir()
        first = synchronousQueue(path, self.clock)
        self.assertTrue(ISharedState.providedBy(first))
        self.policy = GreylistPolicy("grey", first, self.clock, delay=300, retryWindow=3600)
        self.assertDeferred(self.ask())
        self.successResultOf(first.close())
        self.clock.advance(300)
        second = synchronousQueue(path, self.clock)
        self.addCleanup(second.close)
        self.policy = GreylistPolicy("grey", second, self.clock, delay=300, retryWindow=3600)
        self.assertEqual(self.ask(), CONTINUE)

    def test_throughServer(self) -> None:
        """
        Through the real server the first RCPT gets 451 and one after the
        delay 250.
        """
        # Shorter than the server's idle timeout, so the session stays.
        self.policy.delay = 60
        connection = connectedServer(policies=[self.policy], peer="192.0.2.10", clock=self.clock)
        connection.send(
            b"EHLO client.example\r\nMAIL FROM:<alice@sender.example>\r\nRCPT TO:<bob@example.org>\r\n"
        )
        self.assertEqual(connection.codes()[-1], 451)
        self.clock.advance(60)
        connection.send(b"RCPT TO:<bob@example.org>\r\n")
        self.assertEqual(connection.codes()[-1], 250)


class FromConfigTests(SynchronousTestCase):
    def context(self) -> ComponentContext:
        return ComponentContext(
            reactor=Clock(), hostname="mx.example.org", dataDir=Path("."), queue=MemoryQueue(Clock())
        )

    def test_plugin(self) -> None:
        """
        The bundled plugin builds the policy with the options given.
        """
        built = findPlugin(IPolicyFactory, "greylist").fromConfig(
            self.context(), "grey", {"delay": 60, "retry_window": 600, "auto_allow": 0, "ipv4_prefix": 32}
        )
        assert isinstance(built, GreylistPolicy)
        self.assertEqual((built.delay, built.retryWindow, built.autoAllow, built.prefixV4), (60, 600, 0, 32))
        self.assertEqual(built.delay, 60.0)

    def test_defaults(self) -> None:
        """
        By default the delay is 5 minutes.
        """
        built = fromConfig(self.context(), "grey", {})
        self.assertEqual((built.delay, built.prefixV4, built.prefixV6), (300.0, 24, 64))

    def test_errors(self) -> None:
        """
        A retry window not longer than the delay, a bad prefix and unknown
        options are refused naming the section.
        """
        for options in ({"delay": 600, "retry_window": 600}, {"ipv4_prefix": 33}, {"dealy": 5}):
            with self.assertRaises(ConfigError) as caught:
                fromConfig(self.context(), "grey", options)
            self.assertIn("[policy.grey]", str(caught.exception))
