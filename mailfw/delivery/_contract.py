"""
The conformance kit for delivery agents: what every L{IDeliveryAgent} must
do, as a test mixin that plugin authors run against their own agent.

Usage::

    class WebhookAgentContractTests(DeliveryAgentContractTests, SynchronousTestCase):
        def makeAgent(self) -> IDeliveryAgent:
            self.http = FakeHTTP()
            return WebhookAgent(self.http, "hook", "https://example.net/in")

        def resultOf(self, agent, deferred):
            self.http.answerAll(200)       # let pending requests finish
            return self.successResultOf(deferred)

The mixin is not a test case by itself (so test runners do not collect
it); combine it with L{twisted.trial.unittest.SynchronousTestCase}.

Decisions the contract pins, beyond the interface's docstring:

  - An envelope without recipients gives an empty sequence (not a
    failure), and a delivery may be requested with the same body again:
    an agent must read the body afresh (C{body.produce(consumer)}, or
    C{body.open()} in a thread) for each delivery, never keep a reader
    between calls.
  - No agent reads a body on the thread that called C{deliver} (the
    reactor thread): L{TrackingBody} refuses to be opened or read there,
    and records the attempt.  Its C{produce} reads in another thread
    (L{runInOtherThread}); an agent that reads in a thread pool of its own
    must be given a runner like L{runInOtherThread} in these tests.
  - A body that cannot be read (C{open} raises L{OSError}, C{produce}
    fails) is the local system's fault: no recipient may get a 5xx for it,
    and the L{Deferred} must not fail.
  - Every reader the agent opened is closed when the result fires.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailfw.address import Address
from mailfw.envelope import Envelope, Recipient, RecipientOutcome
from mailfw.interfaces import IDeliveryAgent, IMessageBody
from mailfw.queue._produce import produceFromFile
from mailfw.reply import SMTPReply

__all__ = [
    "SAMPLE",
    "DeliveryAgentContractTests",
    "ReadOnCallingThread",
    "TrackingBody",
    "UnreadableBody",
    "runInOtherThread",
]

_T = TypeVar("_T")

if TYPE_CHECKING:
    from twisted.trial.unittest import SynchronousTestCase

    _Base = SynchronousTestCase
else:
    _Base = object


SAMPLE = (
    b"From: Sender <sender@example.net>\r\n"
    b"To: rcpt@example.org\r\n"
    b"Subject: contract\r\n"
    b"\r\n"
    b"first line\r\n"
    b".a line that starts with a dot\r\n"
    b"last line\r\n"
)


def runInOtherThread(work: Callable[[], _T]) -> Deferred[_T]:
    """
    A L{mailfw.queue._produce.ThreadRunner} for tests: run C{work} in a new
    thread and wait for it, so the result is ready when this returns (no
    reactor needed) yet C{work} never ran on the caller's thread.
    """
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(succeed(work()))
        except BaseException:
            outcome.append(fail(Failure()))

    thread = threading.Thread(target=run, name="mailfw-test-reader")
    thread.start()
    thread.join()
    result: Deferred[_T] = outcome[0]
    return result


class ReadOnCallingThread(Exception):
    """
    A L{TrackingBody} was opened or read on the thread that must not read
    (the one that made it: the test's, standing in for the reactor).
    Deliberately not an L{OSError}, which agents turn into a 4xx.
    """


class _TrackingReader(io.BytesIO):
    def __init__(self, data: bytes, body: TrackingBody) -> None:
        super().__init__(data)
        self._body = body
        self.bytesRead = 0

    def read(self, size: int | None = -1) -> bytes:
        self._body.checkThread("read")
        data = super().read(size)
        self.bytesRead += len(data)
        return data


@implementer(IMessageBody)
class TrackingBody:
    """
    An L{IMessageBody} that remembers the readers it handed out, so a test
    can tell whether they were closed and how much of each was read, and
    that refuses to be opened or read on the thread that made it.

    @ivar readThreads: the thread ident of every open and read.
    @ivar violations: what was attempted on the forbidden thread.
    """

    def __init__(self, data: bytes = SAMPLE, forbiddenThread: int | None = None) -> None:
        self.data = data
        self.size = len(data)
        self.readers: list[_TrackingReader] = []
        self.forbiddenThread = threading.get_ident() if forbiddenThread is None else forbiddenThread
        self.readThreads: list[int] = []
        self.violations: list[str] = []

    def checkThread(self, what: str) -> None:
        ident = threading.get_ident()
        self.readThreads.append(ident)
        if ident == self.forbiddenThread:
            self.violations.append(what)
            raise ReadOnCallingThread(f"{what} on the reactor thread")

    def open(self) -> BinaryIO:
        self.checkThread("open")
        reader = _TrackingReader(self.data, self)
        self.readers.append(reader)
        return reader

    def produce(self, consumer: IConsumer) -> Deferred[None]:
        return produceFromFile(self.open, consumer, runInOtherThread)


@implementer(IMessageBody)
class UnreadableBody:
    """
    An L{IMessageBody} whose storage has gone: C{open} raises L{OSError},
    and so C{produce} fails with it.
    """

    size = 100

    def open(self) -> BinaryIO:
        raise OSError(5, "Input/output error")

    def produce(self, consumer: IConsumer) -> Deferred[None]:
        return produceFromFile(self.open, consumer, runInOtherThread)


class DeliveryAgentContractTests(_Base):
    """
    Tests any L{IDeliveryAgent} must pass.  Mix into a
    L{twisted.trial.unittest.SynchronousTestCase} and override
    L{makeAgent}; override L{resultOf} if the agent needs help to finish
    (advance a clock, answer a fake peer, run queued thread work), and
    L{storedMessage} if the test can see what the agent delivered.
    """

    def makeAgent(self) -> IDeliveryAgent:
        """
        A fresh agent to test.  Subclasses must override this.
        """
        raise NotImplementedError(f"{type(self).__name__} must override makeAgent")

    def resultOf(
        self, agent: IDeliveryAgent, deferred: Deferred[Sequence[RecipientOutcome]]
    ) -> Sequence[RecipientOutcome]:
        """
        Drive C{agent} until C{deferred} fires and return its result.  The
        default expects it to have fired already.
        """
        return self.successResultOf(deferred)

    def recipientAddresses(self) -> list[Address]:
        """
        Three distinct recipients the agent accepts; override if the agent
        only delivers to particular addresses.
        """
        return [
            Address("alice", "example.org"),
            Address("bob", "example.org"),
            Address("carol", "example.org"),
        ]

    def nexthop(self) -> str | None:
        """
        The next hop to deliver with; C{None} suits local agents.
        """
        return None

    def storedMessage(self, agent: IDeliveryAgent, recipient: Address) -> bytes | None:
        """
        What C{agent} delivered to C{recipient} most recently, or C{None} if
        the test cannot see that (a discarding agent, a remote peer).
        """
        return None

    # -- helpers ------------------------------------------------------------

    def envelopeFor(self, addresses: Sequence[Address]) -> Envelope:
        return Envelope(
            sender=Address("sender", "example.net"),
            recipients=tuple(Recipient(a) for a in addresses),
            size=len(SAMPLE),
            arrival=1_700_000_000.0,
        )

    def deliverTo(
        self, agent: IDeliveryAgent, addresses: Sequence[Address], body: IMessageBody
    ) -> Sequence[RecipientOutcome]:
        envelope = self.envelopeFor(addresses)
        return self.resultOf(agent, agent.deliver(envelope, body, self.nexthop()))

    # -- the contract -------------------------------------------------------

    def test_providesIDeliveryAgent(self) -> None:
        """
        The agent provides L{IDeliveryAgent} completely.
        """
        agent = self.makeAgent()
        self.assertTrue(verifyObject(IDeliveryAgent, agent))

    def test_nameIsText(self) -> None:
        """
        The agent's C{name} is a non-empty string, for log events.
        """
        name: Any = self.makeAgent().name
        self.assertIsInstance(name, str)
        self.assertTrue(name)

    def test_oneOutcomePerRecipientInOrder(self) -> None:
        """
        The result has exactly one outcome per recipient, in envelope order.
        """
        agent = self.makeAgent()
        addresses = self.recipientAddresses()
        envelope = self.envelopeFor(addresses)
        outcomes = self.resultOf(agent, agent.deliver(envelope, TrackingBody(), self.nexthop()))
        self.assertEqual([o.recipient for o in outcomes], list(envelope.recipients))

    def test_reversedOrderIsKept(self) -> None:
        """
        Outcomes follow the envelope's order whatever that order is.
        """
        agent = self.makeAgent()
        addresses = list(reversed(self.recipientAddresses()))
        envelope = self.envelopeFor(addresses)
        outcomes = self.resultOf(agent, agent.deliver(envelope, TrackingBody(), self.nexthop()))
        self.assertEqual([o.recipient for o in outcomes], list(envelope.recipients))

    def test_outcomesAreValues(self) -> None:
        """
        Each outcome is a L{RecipientOutcome} carrying an L{SMTPReply}.
        """
        agent = self.makeAgent()
        outcomes = self.deliverTo(agent, self.recipientAddresses(), TrackingBody())
        for outcome in outcomes:
            self.assertIsInstance(outcome, RecipientOutcome)
            self.assertIsInstance(outcome.reply, SMTPReply)

    def test_noRecipients(self) -> None:
        """
        An envelope without recipients gives an empty result, not a failure.
        """
        agent = self.makeAgent()
        self.assertEqual(list(self.deliverTo(agent, [], TrackingBody())), [])

    def test_readersClosed(self) -> None:
        """
        Every reader the agent opened is closed once the result has fired.
        """
        agent = self.makeAgent()
        body = TrackingBody()
        self.deliverTo(agent, self.recipientAddresses(), body)
        self.assertEqual([r.closed for r in body.readers], [True] * len(body.readers))

    def test_bodyReadFromTheStart(self) -> None:
        """
        Delivering the same body twice reads it from the start each time:
        what is stored ends with the complete message both times.
        """
        agent = self.makeAgent()
        body = TrackingBody()
        [address] = self.recipientAddresses()[:1]
        for attempt in range(2):
            [outcome] = self.deliverTo(agent, [address], body)
            stored = self.storedMessage(agent, address)
            if outcome.delivered and stored is not None:
                self.assertTrue(
                    stored.replace(b"\r\n", b"\n").endswith(SAMPLE.replace(b"\r\n", b"\n")),
                    f"attempt {attempt}: stored message is incomplete",
                )
        for reader in body.readers:
            if reader.bytesRead:
                self.assertEqual(reader.bytesRead, len(SAMPLE))

    def test_noReadOnTheCallingThread(self) -> None:
        """
        The agent never opens or reads the body on the thread that called
        C{deliver} (in production, the reactor thread).
        """
        agent = self.makeAgent()
        body = TrackingBody()
        self.deliverTo(agent, self.recipientAddresses(), body)
        self.assertEqual(body.violations, [], "the body was read on the calling (reactor) thread")

    def test_unreadableBodyIsNotPermanent(self) -> None:
        """
        When the body cannot be read, no recipient gets a 5xx and the result
        does not fail.
        """
        agent = self.makeAgent()
        addresses = self.recipientAddresses()
        outcomes = self.deliverTo(agent, addresses, UnreadableBody())
        self.assertEqual(len(outcomes), len(addresses))
        self.assertEqual([o for o in outcomes if o.failed], [])
