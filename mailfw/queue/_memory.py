"""
A queue that lives in memory: for tests and for trying things out.

It implements the whole of L{IMessageQueue} with the same semantics as the
SQL backends (it passes the same contract tests), deterministically: every
L{Deferred} it returns has already fired, queue IDs come from a counter
(or a callable you pass), and time comes from the clock you pass.  Nothing
survives the process.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.logger import Logger
from zope.interface import implementer

from mailfw.config import ComponentContext, Section
from mailfw.envelope import Envelope, Recipient
from mailfw.interfaces import IDescribed, IIncomingMessage, IMessageBody, IMessageQueue, ISelectiveClaim
from mailfw.queue._io import MemoryBody
from mailfw.queue._schema import selectorMatches
from mailfw.queued import (
    Disposition,
    Lease,
    LeaseLost,
    Notice,
    QueuedMessage,
    QueuedRecipient,
    QueueFull,
    RecipientState,
    Selector,
)
from mailfw.reply import SMTPReply

__all__ = ["MemoryBody", "MemoryQueue", "fromConfig"]


@dataclass
class _Recipient:
    index: int
    recipient: Recipient
    state: RecipientState
    nextAttempt: float
    attempts: int = 0
    warned: bool = False
    lastReply: SMTPReply | None = None
    route: str | None = None
    released: bool = False
    bounceRequested: bool = False
    leaseToken: str | None = None
    leaseExpires: float = 0.0

    def snapshot(self) -> QueuedRecipient:
        return QueuedRecipient(
            index=self.index,
            recipient=self.recipient,
            state=self.state,
            attempts=self.attempts,
            nextAttempt=self.nextAttempt,
            warned=self.warned,
            lastReply=self.lastReply,
            released=self.released,
            bounceRequested=self.bounceRequested,
        )


@dataclass
class _Message:
    queueID: str
    envelope: Envelope
    body: bytes
    recipients: dict[int, _Recipient] = field(default_factory=dict)


@implementer(IIncomingMessage)
class _MemoryIncoming:
    def __init__(self, queue: MemoryQueue, queueID: str, envelope: Envelope) -> None:
        self.queueID = queueID
        self._queue = queue
        self._envelope = envelope
        self._chunks: list[bytes] = []
        self._finished = False

    def write(self, data: bytes) -> None:
        if self._finished:
            raise ValueError("write after commit or abort")
        self._chunks.append(data)

    def rewind(self) -> None:
        if self._finished:
            raise ValueError("rewind after commit or abort")
        self._chunks = []

    def commit(
        self, header: bytes = b"", envelope: Envelope | None = None, hold: bool = False
    ) -> Deferred[str]:
        if self._finished:
            return fail(ValueError("commit after commit or abort"))
        self._finished = True
        body = b"".join([header, *self._chunks])
        self._chunks = []
        return self._queue._commit(self.queueID, envelope or self._envelope, body, hold)

    def abort(self) -> None:
        self._finished = True
        self._chunks = []


@implementer(IMessageQueue, IDescribed, ISelectiveClaim)
class MemoryQueue:
    """
    An L{IMessageQueue} in memory.

    Test helpers beyond the interface: L{full} and L{failure} make commits
    fail, L{holdCommits} keeps commit L{Deferred}s waiting until
    L{releaseCommits}, and L{body}, L{envelope}, L{queueIDs} inspect what
    is stored.

    @ivar full: when true, commits fail with L{QueueFull} (the server's
        452 path).
    @ivar failure: when set, commits fail with it (the server's 451 path).
    @ivar holdCommits: when true, commits wait until L{releaseCommits}, to
        test what happens while the queue is slow.
    @ivar leaseSeconds: how long a claim lasts.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime | None = None,
        idGenerator: Callable[[], str] | None = None,
        leaseSeconds: float = 7200.0,
    ) -> None:
        """
        @param clock: the time source for arrival and due times; a fresh
            L{Clock} (time 0) by default.
        @param idGenerator: makes queue IDs; by default C{"Q1"}, C{"Q2"}...
        """
        self._clock: IReactorTime = Clock() if clock is None else clock
        counter = itertools.count(1)
        self._ids = idGenerator or (lambda: f"Q{next(counter)}")
        self._tokens = itertools.count(1)
        self.leaseSeconds = leaseSeconds
        self._messages: dict[str, _Message] = {}
        self._callbacks: list[Callable[[], None]] = []
        self.full = False
        self.failure: Exception | None = None
        self.holdCommits = False
        self._held: list[tuple[str, Envelope, bytes, bool, Deferred[str]]] = []
        self.closed = False

    # --- receiving --------------------------------------------------------

    def receive(self, envelope: Envelope) -> IIncomingMessage:
        return _MemoryIncoming(self, self._ids(), envelope)

    def _commit(self, queueID: str, envelope: Envelope, body: bytes, hold: bool = False) -> Deferred[str]:
        if self.holdCommits:
            d: Deferred[str] = Deferred()
            self._held.append((queueID, envelope, body, hold, d))
            return d
        return self._store(queueID, envelope, body, hold)

    def _store(self, queueID: str, envelope: Envelope, body: bytes, hold: bool = False) -> Deferred[str]:
        if self.full:
            return fail(QueueFull("memory queue marked full"))
        if self.failure is not None:
            return fail(self.failure)
        self._insert(queueID, envelope, body, hold)
        self._notify()
        return succeed(queueID)

    def releaseCommits(self) -> None:
        """
        Complete the commits that waited while L{holdCommits} was set.
        """
        held, self._held = self._held, []
        for queueID, envelope, body, hold, d in held:
            self._store(queueID, envelope, body, hold).chainDeferred(d)

    def _insert(self, queueID: str, envelope: Envelope, body: bytes, hold: bool = False) -> None:
        now = self._clock.seconds()
        if not envelope.arrival:
            envelope = replace(envelope, arrival=now)
        if envelope.size is None:
            envelope = replace(envelope, size=len(body))
        message = _Message(queueID, envelope, body)
        for index, recipient in enumerate(envelope.recipients):
            message.recipients[index] = _Recipient(
                index, recipient, RecipientState.HOLD if hold else RecipientState.READY, now
            )
        if message.recipients:
            self._messages[queueID] = message

    def _notify(self) -> None:
        for callback in list(self._callbacks):
            callback()

    # --- test helpers -----------------------------------------------------

    def queueIDs(self) -> list[str]:
        """
        The IDs of queued messages, oldest first.
        """
        return list(self._messages)

    def body(self, queueID: str) -> bytes:
        """
        The stored bytes of a queued message.
        """
        return self._messages[queueID].body

    def envelope(self, queueID: str) -> Envelope:
        """
        The stored envelope of a queued message (with its arrival time).
        """
        return self._messages[queueID].envelope

    def recipients(self, queueID: str) -> list[QueuedRecipient]:
        """
        The recipients of a queued message still in the queue.
        """
        return [r.snapshot() for r in self._messages[queueID].recipients.values()]

    # --- the scheduler's side ---------------------------------------------

    def claim(self, now: float, limit: int) -> Deferred[Sequence[Lease]]:
        due: list[tuple[float, int, _Message, _Recipient]] = []
        for order, message in enumerate(self._messages.values()):
            for r in message.recipients.values():
                if r.state in (RecipientState.READY, RecipientState.ETRN) and r.nextAttempt <= now:
                    due.append((r.nextAttempt, order, message, r))
                elif r.state is RecipientState.LEASED and r.leaseExpires <= now:
                    due.append((r.leaseExpires, order, message, r))
        due.sort(key=lambda item: (item[0], item[1], item[3].index))
        return succeed(self._lease(due[: max(limit, 0)], now))

    def claimMatching(self, selector: Selector, now: float, limit: int) -> Deferred[Sequence[Lease]]:
        order = {queueID: n for n, queueID in enumerate(self._messages)}
        due = [
            (r.nextAttempt, order[m.queueID], m, r)
            for m, r in self._matching(selector)
            if r.state in (RecipientState.READY, RecipientState.ETRN)
        ]
        due.sort(key=lambda item: (item[0], item[1], item[3].index))
        return succeed(self._lease(due[: max(limit, 0)], now))

    def _lease(self, due: Sequence[tuple[float, int, _Message, _Recipient]], now: float) -> list[Lease]:
        chosen: dict[str, list[_Recipient]] = {}
        for _, _, message, r in due:
            chosen.setdefault(message.queueID, []).append(r)
        leases = []
        expires = now + self.leaseSeconds
        for queueID, claimed in chosen.items():
            message = self._messages[queueID]
            token = f"T{next(self._tokens)}"
            claimed.sort(key=lambda r: r.index)
            for r in claimed:
                r.state = RecipientState.LEASED
                r.leaseToken = token
                r.leaseExpires = expires
            leases.append(
                Lease(
                    queueID=queueID,
                    envelope=message.envelope,
                    recipients=tuple(r.snapshot() for r in claimed),
                    token=token,
                    expires=expires,
                    size=len(message.body),
                )
            )
        return leases

    def record(
        self, lease: Lease, dispositions: Sequence[Disposition], notices: Sequence[Notice] = ()
    ) -> Deferred[None]:
        message = self._messages.get(lease.queueID)
        claimed = [r.index for r in lease.recipients]
        if message is None:
            return fail(LeaseLost(lease.queueID))
        for index in claimed:
            r = message.recipients.get(index)
            if r is None or r.state is not RecipientState.LEASED or r.leaseToken != lease.token:
                return fail(LeaseLost(lease.queueID))
        for d in dispositions:
            if d.index not in claimed:
                return fail(ValueError(f"recipient {d.index} is not in the lease"))
        if self.full and notices:
            return fail(QueueFull("memory queue marked full"))
        decided = {d.index: d for d in dispositions}
        for index in claimed:
            r = message.recipients[index]
            r.leaseToken = None
            r.leaseExpires = 0.0
            disposition = decided.get(index)
            if disposition is None:
                r.state = RecipientState.READY
                continue
            outcome = disposition.outcome
            r.released = r.released and disposition.keepsRelease
            if disposition.hold or outcome.deferred:
                r.state = RecipientState.ETRN if disposition.hold else RecipientState.READY
                r.attempts += int(disposition.counted)
                r.nextAttempt = (
                    disposition.nextAttempt if disposition.nextAttempt is not None else r.nextAttempt
                )
                r.warned = r.warned or disposition.warned
                r.lastReply = outcome.reply
                route = disposition.route
                if route is not None:
                    r.route = route
            else:
                del message.recipients[index]
        if not message.recipients:
            del self._messages[message.queueID]
        for notice in notices:
            self._insert(self._ids(), notice.envelope, notice.body)
        if notices or len(decided) < len(claimed):
            self._notify()
        return succeed(None)

    def openBody(self, queueID: str) -> Deferred[IMessageBody]:
        message = self._messages.get(queueID)
        if message is None:
            return fail(KeyError(queueID))
        return succeed(MemoryBody(message.body))

    def nextDue(self) -> Deferred[float | None]:
        times = [
            r.leaseExpires if r.state is RecipientState.LEASED else r.nextAttempt
            for m in self._messages.values()
            for r in m.recipients.values()
            if r.state in (RecipientState.READY, RecipientState.ETRN, RecipientState.LEASED)
        ]
        return succeed(min(times) if times else None)

    def notifyDue(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def recover(self, now: float) -> Deferred[int]:
        count = 0
        for message in self._messages.values():
            for r in message.recipients.values():
                if r.state is RecipientState.LEASED and r.leaseExpires <= now:
                    r.state = RecipientState.READY
                    r.leaseToken = None
                    r.leaseExpires = 0.0
                    count += 1
        if count:
            self._notify()
        return succeed(count)

    # --- the operator's side ----------------------------------------------

    def _matching(self, selector: Selector) -> list[tuple[_Message, _Recipient]]:
        return [
            (m, r)
            for m in self._messages.values()
            for r in m.recipients.values()
            if selectorMatches(
                selector,
                m.queueID,
                m.envelope.senderText,
                r.recipient.address.domain,
                r.state,
                r.route,
            )
        ]

    def list(self, selector: Selector) -> Deferred[Sequence[QueuedMessage]]:
        found: dict[str, list[QueuedRecipient]] = {}
        for m, r in self._matching(selector):
            found.setdefault(m.queueID, []).append(r.snapshot())
        messages = [
            QueuedMessage(
                queueID=queueID,
                envelope=self._messages[queueID].envelope,
                size=len(self._messages[queueID].body),
                recipients=tuple(recipients),
            )
            for queueID, recipients in found.items()
        ]
        messages.sort(key=lambda m: (m.envelope.arrival, m.queueID))
        return succeed(messages)

    def hold(self, selector: Selector) -> Deferred[int]:
        count = 0
        for _, r in self._matching(selector):
            if r.state in (RecipientState.READY, RecipientState.ETRN):
                r.state = RecipientState.HOLD
                count += 1
        return succeed(count)

    def release(self, selector: Selector) -> Deferred[int]:
        now = self._clock.seconds()
        count = 0
        for _, r in self._matching(selector):
            if r.state is RecipientState.HOLD:
                r.state = RecipientState.READY
                r.nextAttempt = now
                count += 1
        if count:
            self._notify()
        return succeed(count)

    def flush(self, selector: Selector) -> Deferred[int]:
        now = self._clock.seconds()
        count = 0
        for _, r in self._matching(selector):
            if r.state in (RecipientState.READY, RecipientState.ETRN):
                r.state = RecipientState.READY
                r.nextAttempt = min(r.nextAttempt, now)
                r.released = True
                count += 1
        if count:
            self._notify()
        return succeed(count)

    def bounce(self, selector: Selector) -> Deferred[int]:
        now = self._clock.seconds()
        count = 0
        for _, r in self._matching(selector):
            if r.state in (RecipientState.READY, RecipientState.HOLD, RecipientState.ETRN):
                r.state = RecipientState.READY
                r.nextAttempt = now
                r.bounceRequested = True
                count += 1
        if count:
            self._notify()
        return succeed(count)

    def delete(self, selector: Selector) -> Deferred[int]:
        count = 0
        for m, r in self._matching(selector):
            del m.recipients[r.index]
            count += 1
            if not m.recipients:
                del self._messages[m.queueID]
        return succeed(count)

    def describe(self) -> str:
        return "memory (messages are lost when the process ends)"

    def ownedPaths(self) -> Sequence[str]:
        """
        None: nothing is written.
        """
        return []

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


def fromConfig(context: ComponentContext, instanceName: str, options: Mapping[str, object]) -> MemoryQueue:
    """
    Build a L{MemoryQueue} from C{[queue]} with C{plugin = "memory"}.

    Options: C{lease_seconds} (default 900).  Messages are lost when the
    process ends: for tests and experiments only.
    """
    section = Section(f"[{instanceName}]", options)
    leaseSeconds = section.number("lease_seconds", 7200.0, minimum=1)
    section.finish()
    MemoryQueue.log.warn(
        'the memory queue keeps messages only until the process ends; use plugin = "sqlite" for real mail'
    )
    return MemoryQueue(clock=context.reactor, leaseSeconds=leaseSeconds)
