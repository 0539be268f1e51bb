"""
Reply ordering for a pipelining session (RFC 2920), and the error limits.

Every command takes a slot in the L{ReplyPipeline}; slots are written head
first, as soon as the head has its answer, so replies leave in command
order however long a policy or the queue takes.  The pipeline also counts
error replies (5xx): past L{SMTPLimits.softErrorLimit} each one waits
L{SMTPLimits.errorDelay} on the clock, and at
L{SMTPLimits.hardErrorLimit} the session gets 421 4.7.0 instead and is
closed.  These limits sit here, under every listener kind, so that no
session (SMTP, submission or submissions, before or after AUTH) escapes
them.

The pipeline talks to its session only through L{PipelineOwner}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailfw.reply import SMTPReply
from mailfw.smtp import _replies as R
from mailfw.smtp._limits import SMTPLimits
from mailfw.smtp._replies import Answer
from mailfw.smtp._state import ConnectionState

__all__ = ["PipelineOwner", "ReplyPipeline"]

Then = Callable[[Answer], None] | None


class PipelineOwner(Protocol):
    """
    What a L{ReplyPipeline} needs from its session.
    """

    peer: str
    """The client, for log events."""

    state: ConnectionState
    """The connection's lifecycle: once C{state.closing} is set nothing more is sent."""

    def sendAnswer(self, answer: Answer) -> None:
        """
        Write C{answer} to the client now.
        """

    def hangUp(self) -> None:
        """
        Close the connection after what has been written.
        """

    def closingReply(self, reply: SMTPReply) -> SMTPReply:
        """
        C{reply} as a closing reply (naming the server).
        """

    def repliesDrained(self) -> None:
        """
        Every reply is out: the session may read on.
        """


class _Slot:
    """
    One reply's place in the output order.
    """

    __slots__ = ("answer", "cancellable", "deferred", "overlappable", "penalized", "then")

    def __init__(
        self,
        answer: Answer | None,
        then: Then,
        overlappable: bool,
        deferred: Deferred[Any] | None = None,
        cancellable: bool = True,
    ) -> None:
        self.answer = answer
        self.then = then
        self.overlappable = overlappable
        self.deferred = deferred
        self.cancellable = cancellable
        self.penalized = False


class ReplyPipeline:
    """
    The replies of one session, in command order.

    @ivar errors: how many error replies (5xx) were sent.
    @ivar pending: the waiting replies, oldest first (read it, do not
        change it: its truthiness is the cheap "is a reply pending?").  A
        list, not a deque: it rarely holds more than one reply, and an
        empty deque costs about 700 octets per idle session against a
        list's 56.
    """

    __slots__ = ("_clock", "_flushing", "_limits", "_owner", "_penalty", "errors", "pending")

    log = Logger()

    def __init__(self, owner: PipelineOwner, limits: SMTPLimits, clock: IReactorTime) -> None:
        self._owner = owner
        self._limits = limits
        self._clock = clock
        self.pending: list[_Slot] = []
        self._flushing = False
        self._penalty: IDelayedCall | None = None
        self.errors = 0

    def allOverlappable(self) -> bool:
        """
        Whether every waiting reply lets a further RCPT be checked beside
        it (they are all RCPT replies).
        """
        return all(slot.overlappable for slot in self.pending)

    def respond(self, reply: SMTPReply | Answer, then: Then = None) -> None:
        """
        Answer the current command, after every earlier reply; then call
        C{then} with the answer sent.
        """
        answer = reply if isinstance(reply, Answer) else Answer(reply)
        self.pending.append(_Slot(answer, then, True))
        self.flush()

    def respondLater(
        self,
        d: Deferred[Answer],
        then: Then = None,
        overlappable: bool = False,
        cancellable: bool = True,
    ) -> None:
        """
        Answer the current command with what C{d} fires with, in order.
        C{d} should not fail (callers map failures to answers first); if
        it does, the failure is logged and answered with 451.

        @param overlappable: a further RCPT may be checked meanwhile.
        @param cancellable: cancel C{d} if the connection is lost.
        """
        if d.called and not d.paused and isinstance(d.result, Answer):
            # Already decided (no plugin waited): skip the callback chain.
            self.pending.append(_Slot(d.result, then, overlappable))
            self.flush()
            return
        slot = _Slot(None, then, overlappable, d, cancellable)
        self.pending.append(slot)

        def answered(answer: Answer) -> None:
            slot.answer = answer
            slot.deferred = None
            self.flush()

        def failed(f: Failure) -> None:
            if not self._owner.state.closed:
                self.log.failure("unexpected failure answering {peer}", f, peer=self._owner.peer)
                slot.answer = Answer(R.LOCAL_ERROR)
                slot.deferred = None
                self.flush()

        d.addCallbacks(answered, failed)

    def flush(self) -> None:
        """
        Send the answers at the head of the queue, counting errors: past the
        soft limit each error waits C{errorDelay} first; at the hard limit
        the server says 421 and hangs up instead.
        """
        owner = self._owner
        if self._flushing or owner.state.closing:
            return
        self._flushing = True
        slots, limits = self.pending, self._limits
        try:
            while slots and not owner.state.closing:
                slot = slots[0]
                answer = slot.answer
                if answer is None or (slot.penalized and self._penalty is not None):
                    break
                if answer.reply.code >= 500:
                    if self.errors + 1 >= limits.hardErrorLimit:
                        self.log.info("too many errors from {peer}", peer=owner.peer)
                        answer = Answer(owner.closingReply(R.TOO_MANY_ERRORS), True)
                    elif (
                        self.errors + 1 > limits.softErrorLimit
                        and not slot.penalized
                        and limits.errorDelay > 0
                    ):
                        slot.penalized = True
                        self._penalty = self._clock.callLater(limits.errorDelay, self._penaltyServed)
                        break
                    self.errors += 1
                del slots[0]
                owner.sendAnswer(answer)
                if slot.then is not None:
                    slot.then(answer)
                if answer.close:
                    owner.hangUp()
        finally:
            self._flushing = False
        if not slots and not owner.state.closing:
            owner.repliesDrained()

    def _penaltyServed(self) -> None:
        self._penalty = None
        self.flush()

    def stop(self) -> None:
        """
        The connection is gone: cancel the error delay and every waiting
        answer that may be cancelled.
        """
        if self._penalty is not None and self._penalty.active():
            self._penalty.cancel()
        self._penalty = None
        slots, self.pending = self.pending, []
        for slot in slots:
            if slot.deferred is not None and slot.cancellable and not slot.deferred.called:
                slot.deferred.cancel()
