"""
In-memory delivery for tests: a body over bytes and an agent that records
what it was given and answers what the test scripted.

These are public test doubles (re-exported by L{mailfw.delivery}); the
scheduler's, the server's and plugin authors' tests use them, so they keep
the full L{IDeliveryAgent} contract (see L{mailfw.delivery._contract}).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailfw.address import Address
from mailfw.envelope import Envelope, Recipient, RecipientOutcome
from mailfw.interfaces import IDeliveryAgent, IMessageBody
from mailfw.queue._produce import collect, produceBytes
from mailfw.reply import SMTPReply

__all__ = ["BytesBody", "MemoryDelivery", "MemoryDeliveryAgent"]

DELIVERED = SMTPReply(250, "2.0.0", "Delivered")
BODY_UNREADABLE = SMTPReply(451, "4.3.0", "Local error reading the message, try again later")


@implementer(IMessageBody)
class BytesBody:
    """
    An L{IMessageBody} over bytes held in memory.

    @ivar opened: how many readers L{open} has handed out, so tests can check
        that an agent reads the body afresh for each delivery.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        self.opened = 0

    def open(self) -> BinaryIO:
        """
        A new reader positioned at the start of the message.
        """
        self.opened += 1
        return io.BytesIO(self.data)

    def produce(self, consumer: IConsumer) -> Deferred[None]:
        """
        Write the bytes to C{consumer} at once (nothing blocks in memory);
        counted in L{opened} like a reader.
        """
        self.opened += 1
        return produceBytes(self.data, consumer)

    def __repr__(self) -> str:
        return f"<BytesBody {self.size} octets>"


@dataclass
class MemoryDelivery:
    """
    One call of L{MemoryDeliveryAgent.deliver}, as recorded.

    @ivar message: the body's bytes as read when C{deliver} was called.
    @ivar result: the L{Deferred} that C{deliver} returned; for an agent
        made with C{hold=True} it fires only when the test calls
        L{MemoryDeliveryAgent.release}.
    """

    envelope: Envelope
    message: bytes
    nexthop: str | None
    result: Deferred[Sequence[RecipientOutcome]] = field(repr=False)

    @property
    def recipients(self) -> list[Address]:
        return [r.address for r in self.envelope.recipients]


@implementer(IDeliveryAgent)
class MemoryDeliveryAgent:
    """
    A delivery agent that keeps what it is given in L{deliveries} and
    answers with scripted replies.

    By default every recipient gets C{250 2.0.0}.  L{setReply} scripts the
    reply for one address; C{hold=True} makes each delivery wait until the
    test calls L{release}, to exercise callers that must cope with slow
    agents; L{failNext} makes the next delivery fail as a buggy agent's
    would.

    The body is read synchronously when C{deliver} is called: acceptable for
    a test double over in-memory bodies, not for a real agent.
    """

    log = Logger()

    def __init__(
        self,
        name: str = "memory",
        defaultReply: SMTPReply = DELIVERED,
        hold: bool = False,
    ) -> None:
        self.name = name
        self.defaultReply = defaultReply
        self.hold = hold
        self.deliveries: list[MemoryDelivery] = []
        self._replies: dict[str, SMTPReply] = {}
        self._failure: BaseException | None = None

    def setReply(self, address: Address | str, reply: SMTPReply) -> None:
        """
        Answer C{reply} for C{address} (compared as text, e.g.
        C{"bob@example.org"}) from now on.
        """
        self._replies[str(address)] = reply

    def failNext(self, exception: BaseException) -> None:
        """
        Make the next L{deliver} return a L{Deferred} failing with
        C{exception}, as an agent with a bug would.
        """
        self._failure = exception

    def repliesFor(self, envelope: Envelope) -> list[RecipientOutcome]:
        """
        The scripted outcomes for C{envelope}'s recipients, in order.
        """
        return [
            RecipientOutcome(r, self._replies.get(str(r.address), self.defaultReply))
            for r in envelope.recipients
        ]

    def deliver(
        self, envelope: Envelope, body: IMessageBody, nexthop: str | None
    ) -> Deferred[Sequence[RecipientOutcome]]:
        if self._failure is not None:
            exception, self._failure = self._failure, None
            return fail(exception)
        if not envelope.recipients:
            return self._record(envelope, b"", nexthop)

        def unreadable(failure: Failure) -> Sequence[RecipientOutcome]:
            error = failure.getErrorMessage()
            self.log.warn("{agent}: cannot read the message: {error}", agent=self.name, error=error)
            return [RecipientOutcome(r, BODY_UNREADABLE) for r in envelope.recipients]

        reading = collect(body.produce)
        return reading.addCallbacks(lambda message: self._record(envelope, message, nexthop), unreadable)

    def _record(
        self, envelope: Envelope, message: bytes, nexthop: str | None
    ) -> Deferred[Sequence[RecipientOutcome]]:
        outcomes = self.repliesFor(envelope)
        result: Deferred[Sequence[RecipientOutcome]] = Deferred()
        self.deliveries.append(MemoryDelivery(envelope, message, nexthop, result))
        if not self.hold:
            result.callback(outcomes)
        return result

    @property
    def pending(self) -> list[MemoryDelivery]:
        """
        Held deliveries whose result has not fired yet.
        """
        return [d for d in self.deliveries if not d.result.called]

    def release(self, replies: Sequence[SMTPReply] | None = None, index: int = 0) -> MemoryDelivery:
        """
        Fire the C{index}th pending delivery of a C{hold=True} agent.

        @param replies: one reply per recipient; by default the scripted
            ones.
        @raise IndexError: if there is no such pending delivery.
        """
        delivery = self.pending[index]
        recipients: Sequence[Recipient] = delivery.envelope.recipients
        if replies is None:
            outcomes = self.repliesFor(delivery.envelope)
        else:
            if len(replies) != len(recipients):
                raise ValueError("one reply per recipient is needed")
            outcomes = [RecipientOutcome(r, reply) for r, reply in zip(recipients, replies, strict=False)]
        delivery.result.callback(outcomes)
        return delivery
