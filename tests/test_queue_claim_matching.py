"""
L{ISelectiveClaim.claimMatching} (ODMR's "lease this customer's mail
now") keeps the same contract on the memory, SQLite and PostgreSQL queues.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailfw.envelope import RecipientOutcome
from mailfw.interfaces import IMessageQueue, ISelectiveClaim
from mailfw.queue._contract import makeEnvelope
from mailfw.queue._memory import MemoryQueue
from mailfw.queued import Disposition, Lease, RecipientState, Selector
from mailfw.reply import SMTPReply
from tests.test_queue_postgres import PostgresHelpers
from tests.test_queue_sqlite import synchronousQueue

_T = TypeVar("_T")

LATER = SMTPReply(451, "4.4.1", "try later")


class _ClaimMatchingTests:
    """
    The contract; mixed into a L{SynchronousTestCase} with L{makeQueue}.
    """

    queue: Any
    clock: Clock

    def makeQueue(self, clock: Clock) -> IMessageQueue:
        raise NotImplementedError

    def wait(self, d: Deferred[_T]) -> _T:
        return self.successResultOf(d)  # type: ignore[attr-defined,no-any-return]

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.queue = self.makeQueue(self.clock)

    def enqueue(self, *recipients: str) -> str:
        incoming = self.queue.receive(makeEnvelope(*recipients))
        incoming.write(b"Subject: hi\r\n\r\nhello\r\n")
        return str(self.wait(incoming.commit()))

    def claimMatching(self, domain: str, limit: int = 100) -> Sequence[Lease]:
        result: Sequence[Lease] = self.wait(
            self.queue.claimMatching(Selector(domain=domain), self.clock.seconds(), limit)
        )
        return result

    def leased(self, leases: Sequence[Lease]) -> list[str]:
        return sorted(str(r.recipient.address) for lease in leases for r in lease.recipients)

    def test_provides(self) -> None:
        """
        The queue provides L{ISelectiveClaim}.
        """
        self.assertTrue(verifyObject(ISelectiveClaim, self.queue))  # type: ignore[attr-defined]

    def test_onlyMatching(self) -> None:
        """
        Only recipients of the selected domain are leased, grouped by
        message, and the others stay claimable by the scheduler.
        """
        first = self.enqueue("a@customer.test", "b@other.test")
        second = self.enqueue("c@customer.test")
        leases = self.claimMatching("customer.test")
        self.assertEqual({lease.queueID for lease in leases}, {first, second})  # type: ignore[attr-defined]
        self.assertEqual(self.leased(leases), ["a@customer.test", "c@customer.test"])  # type: ignore[attr-defined]
        rest = self.wait(self.queue.claim(self.clock.seconds(), 100))
        self.assertEqual(self.leased(rest), ["b@other.test"])  # type: ignore[attr-defined]

    def test_notYetDue(self) -> None:
        """
        Recipients waiting for a later attempt or held for ETRN are leased
        too: the customer is connected now.
        """
        self.enqueue("a@customer.test")
        [lease] = self.wait(self.queue.claim(self.clock.seconds(), 100))
        outcome = RecipientOutcome(lease.recipients[0].recipient, LATER)
        self.wait(self.queue.record(lease, [Disposition(0, outcome, 5000.0, hold=True)]))
        [again] = self.claimMatching("customer.test")
        self.assertEqual(again.recipients[0].state, RecipientState.LEASED)  # type: ignore[attr-defined]

    def test_leasedOnce(self) -> None:
        """
        A leased recipient is not leased again, by a second claimMatching
        or by the scheduler's claim, and the limit is kept.
        """
        for n in range(3):
            self.enqueue(f"u{n}@customer.test")
        self.assertEqual(len(self.leased(self.claimMatching("customer.test", limit=2))), 2)  # type: ignore[attr-defined]
        self.assertEqual(len(self.leased(self.claimMatching("customer.test"))), 1)  # type: ignore[attr-defined]
        self.assertEqual(self.claimMatching("customer.test"), [])  # type: ignore[attr-defined]
        self.assertEqual(self.wait(self.queue.claim(self.clock.seconds() + 10, 100)), [])  # type: ignore[attr-defined]

    def test_operatorHoldStays(self) -> None:
        """
        A recipient an operator holds is not collected.
        """
        self.enqueue("a@customer.test")
        self.wait(self.queue.hold(Selector(domain="customer.test")))
        self.assertEqual(self.claimMatching("customer.test"), [])  # type: ignore[attr-defined]


class MemoryClaimMatchingTests(_ClaimMatchingTests, SynchronousTestCase):
    def makeQueue(self, clock: Clock) -> IMessageQueue:
        return MemoryQueue(clock)


class SQLiteClaimMatchingTests(_ClaimMatchingTests, SynchronousTestCase):
    def makeQueue(self, clock: Clock) -> IMessageQueue:
        queue = synchronousQueue(Path(self.mktemp()), clock)
        self.addCleanup(queue.close)
        return queue


class PostgresClaimMatchingTests(_ClaimMatchingTests, SynchronousTestCase):
    helpers: PostgresHelpers

    def makeQueue(self, clock: Clock) -> IMessageQueue:
        self.helpers = PostgresHelpers()
        self.helpers.startDatabase(self)
        q: IMessageQueue = self.helpers.newQueue(clock)
        return q

    def wait(self, d: Deferred[_T]) -> _T:
        return self.helpers.wait(d)
