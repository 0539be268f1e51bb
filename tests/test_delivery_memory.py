"""
Tests for the in-memory test doubles in L{mailfw.delivery._memory}.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailfw.address import Address
from mailfw.delivery._contract import DeliveryAgentContractTests
from mailfw.delivery._memory import BytesBody, MemoryDeliveryAgent
from mailfw.envelope import Envelope, Recipient, RecipientOutcome
from mailfw.interfaces import IDeliveryAgent, IMessageBody
from mailfw.reply import SMTPReply

ALICE, BOB = Address("alice", "example.org"), Address("bob", "example.org")
ENVELOPE = Envelope(sender=None, recipients=(Recipient(ALICE), Recipient(BOB)))
BUSY = SMTPReply(450, "4.2.1", "Busy")


class MemoryContractTests(DeliveryAgentContractTests, SynchronousTestCase):
    """
    The memory agent satisfies the delivery agent contract.
    """

    def makeAgent(self) -> IDeliveryAgent:
        return MemoryDeliveryAgent()

    def storedMessage(self, agent: IDeliveryAgent, recipient: Address) -> bytes | None:
        assert isinstance(agent, MemoryDeliveryAgent)
        return agent.deliveries[-1].message


class HeldMemoryContractTests(DeliveryAgentContractTests, SynchronousTestCase):
    """
    A holding memory agent satisfies the contract once released, showing
    how a plugin author fires results by overriding C{resultOf}.
    """

    def makeAgent(self) -> IDeliveryAgent:
        return MemoryDeliveryAgent(hold=True)

    def resultOf(
        self, agent: IDeliveryAgent, deferred: Deferred[Sequence[RecipientOutcome]]
    ) -> Sequence[RecipientOutcome]:
        assert isinstance(agent, MemoryDeliveryAgent)
        while agent.pending:
            agent.release()
        return self.successResultOf(deferred)


class BytesBodyTests(SynchronousTestCase):
    """
    L{BytesBody} serves its bytes afresh to each reader.
    """

    def test_interface(self) -> None:
        """
        It provides L{IMessageBody}, with C{size} the length of the data.
        """
        body = BytesBody(b"abc")
        self.assertTrue(verifyObject(IMessageBody, body))
        self.assertEqual(body.size, 3)

    def test_readersIndependent(self) -> None:
        """
        Each C{open} gives a new reader from the start and is counted.
        """
        body = BytesBody(b"abcdef")
        first = body.open()
        self.assertEqual(first.read(2), b"ab")
        self.assertEqual(body.open().read(), b"abcdef")
        self.assertEqual(body.opened, 2)


class MemoryAgentTests(SynchronousTestCase):
    """
    Recording and scripting of L{MemoryDeliveryAgent}.
    """

    def test_records(self) -> None:
        """
        Each delivery is recorded with its envelope, message and next hop.
        """
        agent = MemoryDeliveryAgent()
        self.successResultOf(agent.deliver(ENVELOPE, BytesBody(b"hi\r\n"), "mx.example"))
        [delivery] = agent.deliveries
        self.assertEqual(
            (delivery.envelope, delivery.message, delivery.nexthop), (ENVELOPE, b"hi\r\n", "mx.example")
        )
        self.assertEqual(delivery.recipients, [ALICE, BOB])

    def test_scriptedReplies(self) -> None:
        """
        C{setReply} scripts one address; others get the default reply.
        """
        agent = MemoryDeliveryAgent()
        agent.setReply("bob@example.org", BUSY)
        outcomes = self.successResultOf(agent.deliver(ENVELOPE, BytesBody(b""), None))
        self.assertEqual([o.reply.code for o in outcomes], [250, 450])

    def test_holdAndRelease(self) -> None:
        """
        A holding agent fires only on C{release}, with the given replies.
        """
        agent = MemoryDeliveryAgent(hold=True)
        d = agent.deliver(ENVELOPE, BytesBody(b""), None)
        self.assertNoResult(d)
        self.assertEqual(len(agent.pending), 1)
        with self.assertRaises(ValueError):
            agent.release([BUSY])
        agent.release([BUSY, BUSY])
        self.assertEqual([o.reply for o in self.successResultOf(d)], [BUSY, BUSY])
        self.assertEqual(agent.pending, [])

    def test_failNext(self) -> None:
        """
        C{failNext} makes only the next delivery fail, as a bug would.
        """
        agent = MemoryDeliveryAgent()
        agent.failNext(RuntimeError("bug"))
        self.failureResultOf(agent.deliver(ENVELOPE, BytesBody(b""), None), RuntimeError)
        self.successResultOf(agent.deliver(ENVELOPE, BytesBody(b""), None))
