"""
Every class that says C{@implementer} provides what it claims
(C{verifyObject} where it can be built cheaply, C{verifyClass} otherwise).
The queue and delivery-agent backends are also checked by their contract
suites (L{mailfw.testing}).
"""

from __future__ import annotations

from pathlib import Path

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm
from twisted.internet.interfaces import IConsumer, IPushProducer, IResolver
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from mailfw.auth._checker import PasswordFileChecker
from mailfw.auth._realm import MailRealm, MailUser
from mailfw.config import ComponentContext
from mailfw.delivery import BytesBody, TrackingBody, UnreadableBody
from mailfw.delivery._pipe import PipeDeliveryAgent
from mailfw.delivery._stream import DotStuffingConsumer
from mailfw.interfaces import (
    IDeliveryAgent,
    IDestinationSlots,
    IIncomingMessage,
    IMailUser,
    IMessageBody,
    IMessageQueue,
    IPolicy,
    IRouter,
)
from mailfw.policy import Policy
from mailfw.queue._memory import MemoryBody
from mailfw.routing._static import fromConfig as staticRouter
from mailfw.testing import FakeResolver


class ProvidesTests(SynchronousTestCase):
    def test_auth(self) -> None:
        """
        The password file checker, the realm and its avatar.
        """
        checker = PasswordFileChecker(Path(self.mktemp()), lambda f, *a: f(*a))
        self.assertTrue(verifyObject(ICredentialsChecker, checker))
        self.assertTrue(verifyObject(IRealm, MailRealm()))
        self.assertTrue(verifyObject(IMailUser, MailUser("alice")))

    def test_bodies(self) -> None:
        """
        The message bodies of the memory queue and the test doubles.
        """
        for body in (BytesBody(b"x"), MemoryBody(b"x"), TrackingBody(), UnreadableBody()):
            self.assertTrue(verifyObject(IMessageBody, body), body)

    def test_pipeAgent(self) -> None:
        """
        The pipe agent (not in the delivery contract suite: it needs
        processes).
        """
        agent = PipeDeliveryAgent(MemoryReactorClock(), "pipe", ["/bin/cat"])
        self.assertTrue(verifyObject(IDeliveryAgent, agent))

    def test_bodyProducers(self) -> None:
        """
        The producers that stream bodies to LMTP and SMTP peers and to
        processes, and the consumer that dot-stuffs them.
        """
        registered: list[tuple[object, bool]] = []

        class Recording(StringTransport):
            def registerProducer(self, producer: object, streaming: bool) -> None:
                registered.append((producer, streaming))
                super().registerProducer(producer, streaming)

        consumer = DotStuffingConsumer(Recording())
        self.assertTrue(verifyObject(IConsumer, consumer))
        for body in (BytesBody(b"x" * 10), TrackingBody()):
            self.successResultOf(body.produce(consumer))
        self.assertEqual([streaming for _, streaming in registered], [True, True])
        for producer, _ in registered:
            self.assertTrue(verifyObject(IPushProducer, producer))

    def test_policyAndRouter(self) -> None:
        """
        The policy base class and the static router.
        """
        self.assertTrue(verifyObject(IPolicy, Policy()))
        context = ComponentContext(
            reactor=Clock(), hostname="mx.example", dataDir=Path("."), agentNames=frozenset({"local"})
        )
        self.assertTrue(verifyObject(IRouter, staticRouter(context, "routing", {})))

    def test_fakeResolver(self) -> None:
        """
        The DNS double for plugin authors.
        """
        self.assertTrue(verifyObject(IResolver, FakeResolver({})))

    def test_sqlBackendsClasses(self) -> None:
        """
        The SQL backends' classes, including the parts only big messages
        use, and PostgreSQL's cluster-wide destination slots.
        """
        from mailfw.queue._io import FileBody as _FileBody
        from mailfw.queue._postgres import PostgresQueue
        from mailfw.queue._spool import SpoolingIncoming
        from mailfw.queue._sqlite import SQLiteQueue, _BlobBody

        for cls in (SQLiteQueue, PostgresQueue):
            self.assertTrue(verifyClass(IMessageQueue, cls))
        self.assertTrue(verifyClass(IDestinationSlots, PostgresQueue))
        self.assertTrue(verifyClass(IIncomingMessage, SpoolingIncoming))
        for body in (_BlobBody, _FileBody):
            self.assertTrue(verifyClass(IMessageBody, body))
