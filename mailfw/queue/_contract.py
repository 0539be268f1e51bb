"""
The contract every L{IMessageQueue} must keep, as a test mixin.

Use it by subclassing it together with
L{twisted.trial.unittest.SynchronousTestCase} and providing L{makeQueue}::

    class MyQueueTests(QueueContractTests, SynchronousTestCase):
        def makeQueue(self, clock: Clock) -> IMessageQueue:
            return MyQueue(clock)

A backend whose L{Deferred}s fire later (a real thread, a real database)
overrides L{QueueContractTests.wait} and L{QueueContractTests.waitFailure}
to drive its work to completion with a bounded wait, and
L{QueueContractTests.assertDurable} to check, independently of the queue
object, that a committed message really is stored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from mailfw.address import Address
from mailfw.envelope import Envelope, Recipient, RecipientOutcome
from mailfw.interfaces import (
    IIncomingMessage,
    ILeaseStore,
    IMessageBody,
    IMessageIntake,
    IMessageQueue,
    IQueueAdmin,
    ISharedState,
)
from mailfw.queued import (
    Disposition,
    Lease,
    LeaseLost,
    Notice,
    RecipientState,
    Selector,
)
from mailfw.reply import SMTPReply

if TYPE_CHECKING:
    from twisted.trial.unittest import SynchronousTestCase

    _Base = SynchronousTestCase
else:
    _Base = object

__all__ = ["QueueContractTests", "SharedStateContractTests", "makeEnvelope"]

_T = TypeVar("_T")

OK = SMTPReply(250, "2.0.0", "ok")
LATER = SMTPReply(451, "4.4.1", "try later")
NEVER = SMTPReply(550, "5.1.1", "no such user")
HELD = SMTPReply(450, "4.4.0", "held until the destination asks with ETRN")
START = 1000.0


def makeEnvelope(*recipients: str, sender: str | None = "sender@example.org", **kw: Any) -> Envelope:
    """
    An envelope from C{sender} to C{recipients} (addresses as text).
    """
    return Envelope(
        sender=None if sender is None else Address.parse(sender, utf8=True),
        recipients=tuple(Recipient(Address.parse(r, utf8=True)) for r in recipients),
        **kw,
    )


class QueueContractTests(_Base):
    """
    Tests that any L{IMessageQueue} must pass.  Mix into a
    L{SynchronousTestCase} and define L{makeQueue}.

    @ivar clock: the clock given to L{makeQueue}; it starts at C{1000}.
    """

    clock: Clock
    queue: IMessageQueue

    # --- what a backend provides -------------------------------------------

    def makeQueue(self, clock: Clock) -> IMessageQueue:
        """
        Build an empty queue that takes its time from C{clock}.  Subclasses
        must override this.
        """
        raise NotImplementedError("subclasses of QueueContractTests define makeQueue")

    def wait(self, d: Deferred[_T]) -> _T:
        """
        The result of C{d}, running whatever background work it needs.
        """
        return self.successResultOf(d)

    def waitFailure(self, d: Deferred[Any], *types: type[BaseException]) -> Failure:
        """
        The failure of C{d}, which must be one of C{types}.
        """
        failure: Failure = self.failureResultOf(d, *types)
        return failure

    def assertDurable(self, queueID: str) -> None:
        """
        Check, by a means independent of C{self.queue} where possible, that
        C{queueID} is stored.
        """
        [message] = self.wait(self.queue.list(Selector(queueIDs=(queueID,))))
        self.assertEqual(message.queueID, queueID)

    # --- helpers -----------------------------------------------------------

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.queue = self.makeQueue(self.clock)

    def enqueue(self, envelope: Envelope, body: bytes = b"Subject: hi\r\n\r\nhello\r\n") -> str:
        incoming = self.queue.receive(envelope)
        incoming.write(body)
        queueID = self.wait(incoming.commit())
        self.assertEqual(queueID, incoming.queueID)
        return queueID

    def claim(self, limit: int = 100) -> Sequence[Lease]:
        return self.wait(self.queue.claim(self.clock.seconds(), limit))

    def claimOne(self) -> Lease:
        leases = self.claim()
        self.assertEqual(len(leases), 1, leases)
        return leases[0]

    def outcome(self, lease: Lease, index: int, reply: SMTPReply) -> RecipientOutcome:
        return RecipientOutcome(lease.envelope.recipients[index], reply)

    def count(self, selector: Selector = Selector()) -> int:
        return sum(len(m.recipients) for m in self.wait(self.queue.list(selector)))

    def readBody(self, queueID: str) -> bytes:
        body = self.wait(self.queue.openBody(queueID))
        with body.open() as f:
            return f.read()

    # --- receiving -----------------------------------------------------------

    def test_providesInterfaces(self) -> None:
        """
        The queue provides L{IMessageQueue}, and so each of its parts, and
        its incoming messages provide L{IIncomingMessage}.
        """
        self.assertTrue(verifyObject(IMessageQueue, self.queue))
        for part in (IMessageIntake, ILeaseStore, IQueueAdmin):
            self.assertTrue(part.providedBy(self.queue), part)
        incoming = self.queue.receive(makeEnvelope("a@example.com"))
        self.assertTrue(verifyObject(IIncomingMessage, incoming))
        incoming.abort()

    def test_commitMakesDurable(self) -> None:
        """
        The commit fires with the incoming message's queue ID, and then the
        message is stored.
        """
        queueID = self.enqueue(makeEnvelope("a@example.com"))
        self.assertDurable(queueID)

    def test_queueIDsDiffer(self) -> None:
        """
        Each received message gets its own queue ID.
        """
        ids = {self.enqueue(makeEnvelope("a@example.com")) for _ in range(5)}
        self.assertEqual(len(ids), 5)

    def test_bodyRoundTrip(self) -> None:
        """
        A body written in pieces reads back whole, with its size.
        """
        incoming = self.queue.receive(makeEnvelope("a@example.com"))
        for piece in (b"Subject: x\r\n", b"\r\n", b"line one\r\n", b"\x00\xff\r\n"):
            incoming.write(piece)
        queueID = self.wait(incoming.commit())
        body = self.wait(self.queue.openBody(queueID))
        self.assertTrue(verifyObject(IMessageBody, body))
        self.assertEqual(body.size, 28)
        with body.open() as f:
            self.assertEqual(f.read(), b"Subject: x\r\n\r\nline one\r\n\x00\xff\r\n")
        with body.open() as f:
            self.assertEqual(f.read(7), b"Subject")

    def test_largeBodyRoundTrip(self) -> None:
        """
        A multi-MiB body written in chunks reads back byte for byte.
        """
        incoming = self.queue.receive(makeEnvelope("a@example.com"))
        digest = hashlib.sha256()
        for i in range(96):
            chunk = bytes([i]) * 65536
            digest.update(chunk)
            incoming.write(chunk)
        queueID = self.wait(incoming.commit())
        body = self.wait(self.queue.openBody(queueID))
        self.assertEqual(body.size, 96 * 65536)
        check = hashlib.sha256()
        with body.open() as f:
            while True:
                piece = f.read(100000)
                if not piece:
                    break
                check.update(piece)
        self.assertEqual(check.hexdigest(), digest.hexdigest())

    def test_commitWithHeader(self) -> None:
        """
        The header section given to the commit is stored above what was
        written, for a small body and for one spilled to disk, and counts
        in the size.
        """
        header = b"Received: by test\r\nSubject: x\r\n\r\n"
        for body in (b"small\r\n", b"L" * (3 << 20)):
            incoming = self.queue.receive(makeEnvelope("a@example.com"))
            incoming.write(body)
            queueID = self.wait(incoming.commit(header))
            self.assertEqual(self.readBody(queueID), header + body)
            [message] = self.wait(self.queue.list(Selector(queueIDs=(queueID,))))
            self.assertEqual(message.size, len(header) + len(body))

    def test_commitReplacesEnvelope(self) -> None:
        """
        An envelope given to the commit (a filter's edit) is the one stored.
        """
        incoming = self.queue.receive(makeEnvelope("a@example.com"))
        incoming.write(b"x\r\n")
        queueID = self.wait(incoming.commit(b"", makeEnvelope("b@example.com", "c@example.com")))
        [message] = self.wait(self.queue.list(Selector(queueIDs=(queueID,))))
        self.assertEqual(
            [str(r.recipient.address) for r in message.recipients], ["b@example.com", "c@example.com"]
        )

    def test_commitHeld(self) -> None:
        """
        A message committed held (quarantine) is never claimed until an
        operator releases it.
        """
        incoming = self.queue.receive(makeEnvelope("a@example.com"))
        incoming.write(b"x\r\n")
        self.wait(incoming.commit(b"", None, True))
        self.assertEqual(self.claim(), [])
        self.assertEqual(self.count(Selector(state=RecipientState.HOLD)), 1)
        self.assertEqual(self.wait(self.queue.release(Selector())), 1)
        self.claimOne()

    def test_rewind(self) -> None:
        """
        After a rewind only what is written next is stored, also when the
        forgotten part had been spilled to disk.
        """
        for first in (b"old\r\n", b"O" * (3 << 20)):
            incoming = self.queue.receive(makeEnvelope("a@example.com"))
            incoming.write(first)
            incoming.rewind()
            incoming.write(b"new\r\n")
            queueID = self.wait(incoming.commit(b"H: v\r\n\r\n"))
            self.assertEqual(self.readBody(queueID), b"H: v\r\n\r\nnew\r\n")

    def test_openBodyMissing(self) -> None:
        """
        Opening the body of a message that is not queued fails with
        L{KeyError}.
        """
        self.waitFailure(self.queue.openBody("NOSUCHID"), KeyError)

    def test_abortStoresNothing(self) -> None:
        """
        An aborted message is not stored, and committing it afterwards
        fails.
        """
        incoming = self.queue.receive(makeEnvelope("a@example.com"))
        incoming.write(b"x\r\n")
        incoming.abort()
        incoming.abort()
        self.assertEqual(self.wait(self.queue.list(Selector())), [])
        self.waitFailure(incoming.commit(), Exception)

    def test_envelopeRoundTrip(self) -> None:
        """
        Every envelope field, DSN parameters and UTF-8 addresses included,
        comes back unchanged in a lease, with the arrival time and size set
        by the queue when the server left them out.
        """
        envelope = Envelope(
            sender=Address.parse("s\u00e9nder@example.org", utf8=True),
            recipients=(
                Recipient(
                    Address.parse("r\u00e9@b\u00fccher.example", utf8=True),
                    notify=frozenset({"SUCCESS", "DELAY"}),
                    orcpt="rfc822;orig@example.com",
                ),
                Recipient(Address.parse("x@example.com"), notify=frozenset({"NEVER"})),
            ),
            ret="HDRS",
            envid="ENV123",
            body="8BITMIME",
            smtputf8=True,
            helo="client.example",
            peerHost="192.0.2.1",
            authenticated="alice",
        )
        self.enqueue(envelope, b"abc\r\n")
        lease = self.claimOne()
        self.assertEqual(lease.envelope.arrival, START)
        self.assertEqual(lease.envelope.size, 5)
        self.assertEqual(lease.size, 5)
        self.assertEqual(lease.envelope, replace(envelope, arrival=START, size=5))

    # --- claiming ------------------------------------------------------------

    def test_claimNewRecipients(self) -> None:
        """
        A new message's recipients are due at once and are claimed leased,
        with no attempts yet, under one lease per message.
        """
        queueID = self.enqueue(makeEnvelope("a@example.com", "b@example.net"))
        lease = self.claimOne()
        self.assertEqual(lease.queueID, queueID)
        self.assertEqual([r.index for r in lease.recipients], [0, 1])
        self.assertEqual({r.state for r in lease.recipients}, {RecipientState.LEASED})
        self.assertEqual({r.attempts for r in lease.recipients}, {0})
        self.assertGreater(lease.expires, START)
        self.assertEqual(self.count(Selector(state=RecipientState.LEASED)), 2)

    def test_claimIsExclusive(self) -> None:
        """
        Claimed recipients are not claimed again while the lease lasts.
        """
        self.enqueue(makeEnvelope("a@example.com"))
        self.claimOne()
        self.assertEqual(self.claim(), [])

    def test_claimLimit(self) -> None:
        """
        A claim takes at most C{limit} recipients; the rest are left for
        the next claim.
        """
        self.enqueue(makeEnvelope("a@example.com", "b@example.com", "c@example.com"))
        [first] = self.claim(2)
        self.assertEqual(len(first.recipients), 2)
        [second] = self.claim(2)
        self.assertEqual(len(second.recipients), 1)
        self.assertNotEqual(first.token, second.token)

    def test_claimGroupsByMessage(self) -> None:
        """
        Recipients of different messages come in different leases.
        """
        one = self.enqueue(makeEnvelope("a@example.com", "b@example.com"))
        two = self.enqueue(makeEnvelope("c@example.com"))
        leases = self.claim()
        self.assertEqual(
            sorted((lease.queueID, len(lease.recipients)) for lease in leases),
            sorted([(one, 2), (two, 1)]),
        )

    # --- recording -------------------------------------------------------------

    def test_deliveredAndFailedLeave(self) -> None:
        """
        Delivered and failed recipients leave the queue; the message goes
        when its last recipient does.
        """
        queueID = self.enqueue(makeEnvelope("a@example.com", "b@example.com"))
        lease = self.claimOne()
        self.wait(
            self.queue.record(
                lease,
                [Disposition(0, self.outcome(lease, 0, OK)), Disposition(1, self.outcome(lease, 1, NEVER))],
            )
        )
        self.assertEqual(self.wait(self.queue.list(Selector())), [])
        self.waitFailure(self.queue.openBody(queueID), KeyError)
        self.assertIsNone(self.wait(self.queue.nextDue()))

    def test_deferredWaits(self) -> None:
        """
        A deferred recipient counts the attempt, keeps the reply and the
        warned flag, and is due again only at its next attempt time.
        """
        self.enqueue(makeEnvelope("a@example.com", "b@example.com"))
        lease = self.claimOne()
        self.wait(
            self.queue.record(
                lease,
                [
                    Disposition(0, self.outcome(lease, 0, OK)),
                    Disposition(1, self.outcome(lease, 1, LATER), nextAttempt=START + 300, warned=True),
                ],
            )
        )
        [message] = self.wait(self.queue.list(Selector()))
        [r] = message.recipients
        self.assertEqual(
            (r.index, r.state, r.attempts, r.nextAttempt, r.warned, r.lastReply),
            (1, RecipientState.READY, 1, START + 300, True, LATER),
        )
        self.assertEqual(self.wait(self.queue.nextDue()), START + 300)
        self.assertEqual(self.claim(), [])
        self.clock.advance(300)
        [again] = self.claim()
        self.assertEqual([(r.index, r.attempts) for r in again.recipients], [(1, 1)])

    def test_undecidedReturnToReady(self) -> None:
        """
        Leased recipients left out of a record are ready again at once.
        """
        self.enqueue(makeEnvelope("a@example.com", "b@example.com"))
        lease = self.claimOne()
        self.wait(self.queue.record(lease, [Disposition(0, self.outcome(lease, 0, OK))]))
        [again] = self.claim()
        self.assertEqual([(r.index, r.attempts) for r in again.recipients], [(1, 0)])

    def test_recordUnknownRecipient(self) -> None:
        """
        A disposition for a recipient outside the lease is refused and
        nothing is written.
        """
        self.enqueue(makeEnvelope("a@example.com", "b@example.com"))
        [lease] = self.claim(1)
        self.waitFailure(
            self.queue.record(
                lease,
                [Disposition(0, self.outcome(lease, 0, OK)), Disposition(1, self.outcome(lease, 1, OK))],
            ),
            ValueError,
        )
        self.assertEqual(self.count(Selector(state=RecipientState.LEASED)), 1)
        self.assertEqual(self.count(), 2)

    def test_expiredLeaseTakenOver(self) -> None:
        """
        After a lease expires another claim takes the recipients with a new
        token, and a record under the old token fails with L{LeaseLost}
        without writing anything, not even its notices.
        """
        self.enqueue(makeEnvelope("a@example.com"))
        old = self.claimOne()
        self.assertEqual(self.wait(self.queue.nextDue()), old.expires)
        self.clock.advance(old.expires - self.clock.seconds())
        new = self.claimOne()
        self.assertNotEqual(new.token, old.token)
        notice = Notice(makeEnvelope("sender@example.org", sender=None), b"bounce\r\n")
        self.waitFailure(
            self.queue.record(old, [Disposition(0, self.outcome(old, 0, NEVER))], [notice]),
            LeaseLost,
        )
        [message] = self.wait(self.queue.list(Selector()))
        self.assertEqual(message.recipients[0].state, RecipientState.LEASED)
        self.wait(self.queue.record(new, [Disposition(0, self.outcome(new, 0, OK))]))
        self.assertEqual(self.wait(self.queue.list(Selector())), [])

    def test_expiredLeaseNotTakenOver(self) -> None:
        """
        A record for an expired lease that nobody took over is still
        accepted: the token, not the clock, fences records.
        """
        self.enqueue(makeEnvelope("a@example.com"))
        lease = self.claimOne()
        self.clock.advance(lease.expires - self.clock.seconds() + 1)
        self.wait(self.queue.record(lease, [Disposition(0, self.outcome(lease, 0, OK))]))
        self.assertEqual(self.count(), 0)

    def test_recover(self) -> None:
        """
        L{IMessageQueue.recover} returns expired leases to ready and counts
        them; a record under a recovered lease fails with L{LeaseLost}.
        """
        self.enqueue(makeEnvelope("a@example.com", "b@example.com"))
        lease = self.claimOne()
        self.assertEqual(self.wait(self.queue.recover(self.clock.seconds())), 0)
        self.assertEqual(self.wait(self.queue.recover(lease.expires)), 2)
        self.assertEqual(self.count(Selector(state=RecipientState.READY)), 2)
        self.waitFailure(self.queue.record(lease, []), LeaseLost)
        self.assertEqual(len(self.claimOne().recipients), 2)

    def test_noticesEnqueuedWithRecord(self) -> None:
        """
        Notices given to a record become queued messages of their own, with
        their envelope and body.
        """
        queueID = self.enqueue(makeEnvelope("a@example.com"))
        lease = self.claimOne()
        notice = Notice(makeEnvelope("sender@example.org", sender=None), b"Subject: bounce\r\n\r\nx\r\n")
        self.wait(self.queue.record(lease, [Disposition(0, self.outcome(lease, 0, NEVER))], [notice]))
        [message] = self.wait(self.queue.list(Selector()))
        self.assertNotEqual(message.queueID, queueID)
        self.assertIsNone(message.envelope.sender)
        self.assertEqual(self.readBody(message.queueID), notice.body)
        [bounce] = self.claim()
        self.assertEqual(str(bounce.envelope.recipients[0].address), "sender@example.org")

    # --- waking the scheduler ------------------------------------------------------

    def test_nextDue(self) -> None:
        """
        L{IMessageQueue.nextDue} is C{None} for an empty queue, the arrival
        time for a new message, and ignores held recipients.
        """
        self.assertIsNone(self.wait(self.queue.nextDue()))
        self.enqueue(makeEnvelope("a@example.com"))
        self.assertEqual(self.wait(self.queue.nextDue()), START)
        self.assertEqual(self.wait(self.queue.hold(Selector())), 1)
        self.assertIsNone(self.wait(self.queue.nextDue()))

    def test_notifyDue(self) -> None:
        """
        The due callback runs for a new message, a flush and a release, but
        not for a hold.
        """
        calls: list[None] = []
        self.queue.notifyDue(lambda: calls.append(None))
        self.enqueue(makeEnvelope("a@example.com"))
        self.assertEqual(len(calls), 1)
        self.wait(self.queue.hold(Selector()))
        self.assertEqual(len(calls), 1)
        self.wait(self.queue.release(Selector()))
        self.assertEqual(len(calls), 2)
        self.wait(self.queue.flush(Selector()))
        self.assertEqual(len(calls), 3)

    # --- operator actions ------------------------------------------------------------

    def _domains(self) -> str:
        return self.enqueue(
            makeEnvelope("a@example.com", "b@mx.example.com", "c@badexample.com", "d@other.org")
        )

    def _addresses(self, selector: Selector) -> list[str]:
        return sorted(
            str(r.recipient.address) for m in self.wait(self.queue.list(selector)) for r in m.recipients
        )

    def test_domainSelector(self) -> None:
        """
        A domain selects exactly that domain; with a leading C{@} it selects
        the domain and its subdomains but not look-alikes.
        """
        self._domains()
        self.assertEqual(self._addresses(Selector(domain="example.com")), ["a@example.com"])
        self.assertEqual(self._addresses(Selector(domain="EXAMPLE.com")), ["a@example.com"])
        self.assertEqual(
            self._addresses(Selector(domain="@example.com")), ["a@example.com", "b@mx.example.com"]
        )
        self.assertEqual(self._addresses(Selector(domain="@mx.example.com")), ["b@mx.example.com"])
        self.assertEqual(self._addresses(Selector(domain="@nothing.example")), [])

    def test_senderAndQueueIDSelectors(self) -> None:
        """
        Sender and queue ID selectors pick the messages they name; several
        fields must all match.
        """
        one = self.enqueue(makeEnvelope("a@example.com", sender="x@example.org"))
        two = self.enqueue(makeEnvelope("b@example.com", sender="y@example.org"))
        self.enqueue(makeEnvelope("c@example.com", sender=None))
        self.assertEqual(self._addresses(Selector(sender="x@EXAMPLE.org")), ["a@example.com"])
        self.assertEqual(self._addresses(Selector(sender="")), ["c@example.com"])
        self.assertEqual(self._addresses(Selector(queueIDs=(one, two))), ["a@example.com", "b@example.com"])
        self.assertEqual(self._addresses(Selector(queueIDs=(one,), sender="y@example.org")), [])

    def test_routeSelector(self) -> None:
        """
        A route selector matches recipients whose last attempt recorded that
        route name (C{ETRN #name}).
        """
        self.enqueue(makeEnvelope("a@example.com", "b@example.com"))
        lease = self.claimOne()
        self.wait(
            self.queue.record(
                lease,
                [
                    Disposition(0, self.outcome(lease, 0, LATER), START + 60, route="smarthost"),
                    Disposition(1, self.outcome(lease, 1, LATER), START + 60, route="direct"),
                ],
            )
        )
        self.assertEqual(self._addresses(Selector(route="smarthost")), ["a@example.com"])
        self.assertEqual(self.wait(self.queue.flush(Selector(route="direct"))), 1)
        [again] = self.claim()
        self.assertEqual([r.index for r in again.recipients], [1])

    def test_listOldestFirstWithMatchingRecipients(self) -> None:
        """
        L{IMessageQueue.list} returns messages oldest first, each with only
        its matching recipients.
        """
        first = self.enqueue(makeEnvelope("a@example.com", "b@other.org"))
        self.clock.advance(10)
        second = self.enqueue(makeEnvelope("c@example.com"))
        listed = self.wait(self.queue.list(Selector(domain="example.com")))
        self.assertEqual([m.queueID for m in listed], [first, second])
        self.assertEqual([len(m.recipients) for m in listed], [1, 1])
        self.assertEqual(listed[0].envelope.arrival, START)
        self.assertEqual(listed[0].size, len(b"Subject: hi\r\n\r\nhello\r\n"))

    def test_holdAndRelease(self) -> None:
        """
        Held recipients are never claimed; released ones are due at once.
        """
        self._domains()
        self.assertEqual(self.wait(self.queue.hold(Selector(domain="@example.com"))), 2)
        self.assertEqual(self.wait(self.queue.hold(Selector(domain="@example.com"))), 0)
        self.assertEqual(
            self._addresses(Selector(state=RecipientState.HOLD)), ["a@example.com", "b@mx.example.com"]
        )
        lease = self.claimOne()
        self.assertEqual(len(lease.recipients), 2)
        self.wait(
            self.queue.record(
                lease, [Disposition(r.index, self.outcome(lease, r.index, OK)) for r in lease.recipients]
            )
        )
        self.clock.advance(50)
        self.assertEqual(self.wait(self.queue.release(Selector(domain="example.com"))), 1)
        lease = self.claimOne()
        self.assertEqual([str(r.recipient.address) for r in lease.recipients], ["a@example.com"])
        self.assertEqual(lease.recipients[0].nextAttempt, START + 50)

    def test_flush(self) -> None:
        """
        A flush makes matching deferred recipients due now but leaves
        operator holds alone.
        """
        self.enqueue(makeEnvelope("a@example.com", "b@example.com", "c@other.org"))
        lease = self.claimOne()
        self.wait(
            self.queue.record(
                lease,
                [
                    Disposition(r.index, self.outcome(lease, r.index, LATER), START + 3600)
                    for r in lease.recipients
                ],
            )
        )
        self.wait(self.queue.hold(Selector(domain="example.com", queueIDs=(lease.queueID,))))
        self.wait(self.queue.release(Selector(domain="nothing.example")))
        self.assertEqual(self.wait(self.queue.flush(Selector(domain="other.org"))), 1)
        [flushed] = self.claim()
        self.assertEqual([str(r.recipient.address) for r in flushed.recipients], ["c@other.org"])
        self.assertEqual(self.wait(self.queue.flush(Selector(domain="example.com"))), 0)

    # --- hold for ETRN ----------------------------------------------------------------

    def _holdAll(
        self, lease: Lease, until: float, routes: Sequence[str | None] = (), counted: bool = False
    ) -> None:
        """
        Record every recipient of C{lease} as held for ETRN until C{until}.
        """
        self.wait(
            self.queue.record(
                lease,
                [
                    Disposition(
                        r.index,
                        self.outcome(lease, r.index, HELD),
                        until,
                        route=routes[n] if n < len(routes) else None,
                        hold=True,
                        counted=counted,
                    )
                    for n, r in enumerate(lease.recipients)
                ],
            )
        )

    def test_holdDisposition(self) -> None:
        """
        A hold disposition puts the recipient into state ETRN with its
        housekeeping time, keeps the reply, counts no attempt, and makes it
        due (for housekeeping only) at that time, not before.
        """
        self.enqueue(makeEnvelope("a@customer.test"))
        lease = self.claimOne()
        self.assertFalse(lease.recipients[0].released)
        self._holdAll(lease, START + 3600)
        [message] = self.wait(self.queue.list(Selector()))
        [r] = message.recipients
        self.assertEqual(
            (r.state, r.attempts, r.nextAttempt, r.lastReply, r.released),
            (RecipientState.ETRN, 0, START + 3600, HELD, False),
        )
        self.assertEqual(self._addresses(Selector(state=RecipientState.ETRN)), ["a@customer.test"])
        self.assertEqual(self.wait(self.queue.nextDue()), START + 3600)
        self.clock.advance(3599)
        self.assertEqual(self.claim(), [])
        self.clock.advance(1)
        again = self.claimOne()
        self.assertEqual(
            [(r.index, r.state, r.released) for r in again.recipients],
            [(0, RecipientState.LEASED, False)],
        )

    def test_holdCounted(self) -> None:
        """
        A hold recorded after a real attempt (a released recipient deferred
        again) counts that attempt.
        """
        self.enqueue(makeEnvelope("a@customer.test"))
        self._holdAll(self.claimOne(), START + 60, counted=True)
        [message] = self.wait(self.queue.list(Selector()))
        self.assertEqual(message.recipients[0].attempts, 1)

    def test_flushReleasesHeld(self) -> None:
        """
        A flush makes a held-for-ETRN recipient due now and marks it
        released, which the lease shows; the next record clears the mark.
        """
        self.enqueue(makeEnvelope("a@customer.test", "b@other.org"))
        self._holdAll(self.claimOne(), START + 3600)
        self.clock.advance(10)
        self.assertEqual(self.wait(self.queue.flush(Selector(domain="customer.test"))), 1)
        [r] = self.wait(self.queue.list(Selector(domain="customer.test")))[0].recipients
        self.assertEqual((r.state, r.nextAttempt, r.released), (RecipientState.READY, START + 10, True))
        self.assertEqual(self.wait(self.queue.nextDue()), START + 10)
        lease = self.claimOne()
        self.assertEqual(
            [(str(r.recipient.address), r.released) for r in lease.recipients],
            [("a@customer.test", True)],
        )
        self._holdAll(lease, START + 3600, counted=True)
        [r] = self.wait(self.queue.list(Selector(domain="customer.test")))[0].recipients
        self.assertEqual((r.state, r.released, r.attempts), (RecipientState.ETRN, False, 1))
        self.assertEqual(self.claim(), [])

    def test_recordClearsReleased(self) -> None:
        """
        A deferral clears the released mark of a flushed recipient; a
        recipient left out of a record keeps it, since it was not tried.
        """
        self.enqueue(makeEnvelope("a@example.com", "b@example.com"))
        lease = self.claimOne()
        self.wait(
            self.queue.record(
                lease,
                [
                    Disposition(r.index, self.outcome(lease, r.index, LATER), START + 600)
                    for r in lease.recipients
                ],
            )
        )
        self.assertEqual(self.wait(self.queue.flush(Selector())), 2)
        lease = self.claimOne()
        self.assertEqual([r.released for r in lease.recipients], [True, True])
        self.wait(self.queue.record(lease, [Disposition(0, self.outcome(lease, 0, LATER), START + 600)]))
        [message] = self.wait(self.queue.list(Selector()))
        self.assertEqual(
            [(r.index, r.state, r.released) for r in message.recipients],
            [(0, RecipientState.READY, False), (1, RecipientState.READY, True)],
        )

    def test_putBackKeepsReleased(self) -> None:
        """
        A released recipient put back untried (an uncounted deferral:
        traffic shaping, a busy agent) stays released, so the ETRN that
        released it still holds when its turn comes; its attempts do not
        move.
        """
        self.enqueue(makeEnvelope("a@example.com"))
        lease = self.claimOne()
        self.wait(self.queue.record(lease, [Disposition(0, self.outcome(lease, 0, LATER), START + 600)]))
        self.assertEqual(self.wait(self.queue.flush(Selector())), 1)
        lease = self.claimOne()
        self.wait(
            self.queue.record(
                lease, [Disposition(0, self.outcome(lease, 0, LATER), START + 30, counted=False)]
            )
        )
        [message] = self.wait(self.queue.list(Selector()))
        [r] = message.recipients
        self.assertEqual((r.state, r.released, r.attempts), (RecipientState.READY, True, 1))

    def test_flushSelectsHeld(self) -> None:
        """
        C{ETRN example.com}, C{ETRN @example.com} and C{ETRN #name} select
        held-for-ETRN recipients by exact domain, by domain and subdomains,
        and by recorded route name; others stay held.
        """
        self.enqueue(
            makeEnvelope(
                "a@example.com", "b@mx.example.com", "c@badexample.com", "d@other.org", "e@example.com"
            )
        )
        lease = self.claimOne()
        self._holdAll(lease, START + 3600, routes=[None, None, None, "uucp", None])
        self.assertEqual(self.wait(self.queue.flush(Selector(domain="example.com"))), 2)
        self.assertEqual(
            self._addresses(Selector(state=RecipientState.READY)), ["a@example.com", "e@example.com"]
        )
        self.assertEqual(self.wait(self.queue.flush(Selector(domain="@example.com"))), 3)
        self.assertEqual(
            self._addresses(Selector(state=RecipientState.ETRN)), ["c@badexample.com", "d@other.org"]
        )
        self.assertEqual(self.wait(self.queue.flush(Selector(route="uucp"))), 1)
        self.assertEqual(self._addresses(Selector(state=RecipientState.ETRN)), ["c@badexample.com"])
        self.assertEqual(self.wait(self.queue.flush(Selector(route="nothing"))), 0)
        released = [
            (str(r.recipient.address), r.released)
            for m in self.wait(self.queue.list(Selector()))
            for r in m.recipients
        ]
        self.assertEqual(
            sorted(released),
            [
                ("a@example.com", True),
                ("b@mx.example.com", True),
                ("c@badexample.com", False),
                ("d@other.org", True),
                ("e@example.com", True),
            ],
        )

    def test_operatorHoldOfHeld(self) -> None:
        """
        An operator hold takes a held-for-ETRN recipient out of ETRN's
        reach: a flush leaves it alone until an operator releases it.
        """
        self.enqueue(makeEnvelope("a@customer.test"))
        self._holdAll(self.claimOne(), START + 3600)
        self.assertEqual(self.wait(self.queue.hold(Selector())), 1)
        self.assertEqual(self.wait(self.queue.flush(Selector(domain="customer.test"))), 0)
        self.assertIsNone(self.wait(self.queue.nextDue()))
        self.assertEqual(self.wait(self.queue.release(Selector())), 1)
        self.assertEqual(len(self.claimOne().recipients), 1)

    # --- operator bounces ----------------------------------------------------------

    def _bounceState(self, selector: Selector = Selector()) -> list[tuple[str, RecipientState, float, bool]]:
        return sorted(
            (str(r.recipient.address), r.state, r.nextAttempt, r.bounceRequested)
            for m in self.wait(self.queue.list(selector))
            for r in m.recipients
        )

    def test_bounceMarksWaiting(self) -> None:
        """
        A bounce marks matching ready and held recipients, makes them ready
        and due now, wakes the scheduler, and the lease shows the mark.
        """
        self.enqueue(makeEnvelope("a@example.com", "b@example.com", "c@other.org"))
        lease = self.claimOne()
        self.assertEqual([r.bounceRequested for r in lease.recipients], [False] * 3)
        self.wait(
            self.queue.record(
                lease,
                [
                    Disposition(r.index, self.outcome(lease, r.index, LATER), START + 3600)
                    for r in lease.recipients
                ],
            )
        )
        self.wait(self.queue.hold(Selector(domain="example.com", queueIDs=(lease.queueID,))))
        calls: list[None] = []
        self.queue.notifyDue(lambda: calls.append(None))
        self.clock.advance(10)
        self.assertEqual(self.wait(self.queue.bounce(Selector(domain="example.com"))), 2)
        self.assertEqual(len(calls), 1)
        self.assertEqual(
            self._bounceState(),
            [
                ("a@example.com", RecipientState.READY, START + 10, True),
                ("b@example.com", RecipientState.READY, START + 10, True),
                ("c@other.org", RecipientState.READY, START + 3600, False),
            ],
        )
        self.assertEqual(self.wait(self.queue.nextDue()), START + 10)
        lease = self.claimOne()
        self.assertEqual(
            [(str(r.recipient.address), r.bounceRequested) for r in lease.recipients],
            [("a@example.com", True), ("b@example.com", True)],
        )
        # Returned to ready without a disposition, they keep the mark.
        self.wait(self.queue.record(lease, []))
        self.assertEqual(
            [r for r in self._bounceState() if r[3]],
            [
                ("a@example.com", RecipientState.READY, START + 10, True),
                ("b@example.com", RecipientState.READY, START + 10, True),
            ],
        )

    def test_bounceHeldForETRN(self) -> None:
        """
        A recipient held for ETRN is marked too and becomes ready and due
        now; the bounce does not count as a flush.
        """
        self.enqueue(makeEnvelope("a@customer.test"))
        self._holdAll(self.claimOne(), START + 3600)
        self.clock.advance(5)
        self.assertEqual(self.wait(self.queue.bounce(Selector(domain="customer.test"))), 1)
        lease = self.claimOne()
        [r] = lease.recipients
        self.assertEqual((r.bounceRequested, r.released), (True, False))
        self.assertEqual(r.nextAttempt, START + 5)

    def test_bounceLeavesLeased(self) -> None:
        """
        Recipients in delivery are not marked (the delivery under way
        decides them), and no one is woken for nothing.
        """
        self.enqueue(makeEnvelope("a@example.com"))
        lease = self.claimOne()
        calls: list[None] = []
        self.queue.notifyDue(lambda: calls.append(None))
        self.assertEqual(self.wait(self.queue.bounce(Selector())), 0)
        self.assertEqual(self.wait(self.queue.bounce(Selector(state=RecipientState.LEASED))), 0)
        self.assertEqual(calls, [])
        self.wait(self.queue.record(lease, []))
        self.assertEqual(self._bounceState(), [("a@example.com", RecipientState.READY, START, False)])

    def test_bounceSelectors(self) -> None:
        """
        A bounce applies only to recipients matching every field of the
        selector: queue IDs, domain with subdomains, sender and state.
        """
        first = self._domains()
        second = self.enqueue(makeEnvelope("e@example.com", sender="other@example.net"))
        self.wait(self.queue.hold(Selector(domain="other.org")))
        self.assertEqual(self.wait(self.queue.bounce(Selector(sender="nobody@example.net"))), 0)
        self.assertEqual(self.wait(self.queue.bounce(Selector(sender="other@EXAMPLE.NET"))), 1)
        self.assertEqual(self.wait(self.queue.bounce(Selector(queueIDs=(first,), domain="@example.com"))), 2)
        self.assertEqual(self.wait(self.queue.bounce(Selector(state=RecipientState.HOLD))), 1)
        marked = {
            (m.queueID, str(r.recipient.address)): r.bounceRequested
            for m in self.wait(self.queue.list(Selector()))
            for r in m.recipients
        }
        self.assertEqual(
            marked,
            {
                (first, "a@example.com"): True,
                (first, "b@mx.example.com"): True,
                (first, "c@badexample.com"): False,
                (first, "d@other.org"): True,
                (second, "e@example.com"): True,
            },
        )
        self.assertEqual(self._addresses(Selector(state=RecipientState.HOLD)), [])

    def test_delete(self) -> None:
        """
        Deleting removes matching recipients, and the message with its last
        recipient.
        """
        queueID = self._domains()
        self.assertEqual(self.wait(self.queue.delete(Selector(domain="@example.com"))), 2)
        self.assertEqual(self._addresses(Selector()), ["c@badexample.com", "d@other.org"])
        self.assertEqual(self.wait(self.queue.delete(Selector(queueIDs=(queueID,)))), 2)
        self.assertEqual(self.wait(self.queue.list(Selector())), [])
        self.waitFailure(self.queue.openBody(queueID), KeyError)

    def test_close(self) -> None:
        """
        Closing the queue completes.
        """
        self.enqueue(makeEnvelope("a@example.com"))
        self.assertIsNone(self.wait(self.queue.close()))


class SharedStateContractTests(_Base):
    """
    Tests that any L{ISharedState} must pass (the in-memory store and the
    SQL queues alike).  Mix into a L{SynchronousTestCase} and define
    L{makeState}; a store whose L{Deferred}s fire later overrides L{wait}.
    """

    state: ISharedState

    def makeState(self) -> ISharedState:
        """
        Build an empty store.  Subclasses must override this.
        """
        raise NotImplementedError("subclasses of SharedStateContractTests define makeState")

    def wait(self, d: Deferred[_T]) -> _T:
        """
        The result of C{d}, running whatever background work it needs.
        """
        return self.successResultOf(d)

    def setUp(self) -> None:
        self.state = self.makeState()

    def test_interface(self) -> None:
        """
        It provides L{ISharedState}.
        """
        self.assertTrue(verifyObject(ISharedState, self.state))

    def test_countWithinWindow(self) -> None:
        """
        Counts add up within the window and start again from zero after it.
        """
        self.assertEqual(self.wait(self.state.count("k", 1, 60, 1000)), 1)
        self.assertEqual(self.wait(self.state.count("k", 2, 60, 1030)), 3)
        self.assertEqual(self.wait(self.state.count("k", 0, 60, 1059)), 3)
        self.assertEqual(self.wait(self.state.count("k", 1, 60, 1060)), 1)
        self.assertEqual(self.wait(self.state.count("k", 0, 60, 1119)), 1)

    def test_readDoesNotStart(self) -> None:
        """
        Counting 0 of an unknown key reads 0 and starts no window: the
        window starts at the first real count.
        """
        self.assertEqual(self.wait(self.state.count("k", 0, 60, 0)), 0)
        self.assertEqual(self.wait(self.state.count("k", 1, 60, 100)), 1)
        self.assertEqual(self.wait(self.state.count("k", 0, 60, 159)), 1)
        self.assertEqual(self.wait(self.state.count("k", 0, 60, 160)), 0)

    def test_keysApart(self) -> None:
        """
        Each key counts on its own.
        """
        self.wait(self.state.count("a", 5, 60, 0))
        self.assertEqual(self.wait(self.state.count("b", 1, 60, 0)), 1)
        self.assertEqual(self.wait(self.state.count("a", 0, 60, 0)), 5)

    def test_mark(self) -> None:
        """
        A mark answers with its first time while it lives, and a new time
        after it expired.
        """
        self.assertEqual(self.wait(self.state.mark("t", 100, 5)), 5)
        self.assertEqual(self.wait(self.state.mark("t", 100, 50)), 5)
        self.assertEqual(self.wait(self.state.mark("t", 100, 105)), 105)
        self.assertEqual(self.wait(self.state.mark("t", 100, 204)), 105)

    def test_forget(self) -> None:
        """
        A forgotten counter starts again from zero, a forgotten mark anew;
        forgetting an unknown key does nothing.
        """
        self.wait(self.state.count("k", 5, 60, 0))
        self.wait(self.state.mark("t", 100, 0))
        self.assertIsNone(self.wait(self.state.forget("k")))
        self.wait(self.state.forget("t"))
        self.wait(self.state.forget("unknown"))
        self.assertEqual(self.wait(self.state.count("k", 1, 60, 1)), 1)
        self.assertEqual(self.wait(self.state.mark("t", 100, 2)), 2)
