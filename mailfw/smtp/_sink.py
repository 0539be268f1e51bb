"""
The message sink: decoded message text in, the queued copy out.

It holds the header section (up to L{SMTPLimits.maxHeaderBytes}) for the
loop check and the policies' C{checkMessage}, then streams the body into
the L{IIncomingMessage} and to the end-of-data checks as it arrives, so
that a large body is never buffered.  The header section stays with the
sink until the end of data: the checks' verdict may still edit it, and it
is handed to the queue with the commit, above the body, together with one
C{Authentication-Results:} field.  A refused message is read to its end
and thrown away.  The session talks to it through L{MessageSink.write},
L{MessageSink.check}, L{MessageSink.finish}, L{MessageSink.abort} and
L{MessageSink.cancel}, and it talks back only through the small
L{SinkOwner} interface.
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailfw.envelope import Envelope
from mailfw.interfaces import IIncomingMessage
from mailfw.policy._chain import MessageChecks
from mailfw.queued import QueueFull
from mailfw.reply import SMTPReply
from mailfw.smtp import _replies as R
from mailfw.smtp._headers import RECEIVED_FIELD, MessageDraft
from mailfw.smtp._limits import SMTPLimits
from mailfw.smtp._replies import Answer
from mailfw.verdict import Verdict

__all__ = ["MessageSink", "SinkOwner"]


class _SinkState(Enum):
    COLLECTING = "collecting"  # holding the header section
    WAITING = "waiting"  # checkMessage is deciding; holding what follows
    STREAMING = "streaming"  # headers written; text goes straight through
    DISCARDING = "discarding"  # refused: read to the end, store nothing


class SinkOwner(Protocol):
    """
    What a L{MessageSink} needs from its session: no more than this.
    """

    @property
    def peer(self) -> str:
        """The client, for log events."""

    def decideHeader(self, envelope: Envelope, header: bytes, whole: bool) -> Deferred[Answer | bytes]:
        """
        The header section is complete (or, with C{whole} false, as much
        of it as is held): ask the policies.  Fires with a refusal, or with
        the header fields to write above C{header}.  Never fails.
        """

    def openChecks(self, envelope: Envelope, header: bytes) -> MessageChecks | None:
        """
        The header section (as it will be queued) is accepted: the
        end-of-data checks that want to see the body, if any.
        """

    def endChecks(self, checks: MessageChecks | None) -> Deferred[Verdict]:
        """
        The message has ended: the checks' verdict (C{checks} may be
        C{None}), with the transaction's results and edits from every
        stage.  Never fails.
        """

    def holdInput(self) -> None:
        """
        Stop reading input while the decision waits.
        """

    def releaseInput(self) -> None:
        """
        Read on.
        """


class MessageSink:
    """
    Takes decoded message text, holds the header section for the loop check
    and C{checkMessage}, and streams the rest into the queue.

    Each body chunk handed to the queue goes to the end-of-data checks too
    (L{_write}), and L{finish} waits for their verdict and applies its
    edits before the commit.
    """

    log = Logger()

    def __init__(
        self,
        owner: SinkOwner,
        incoming: IIncomingMessage,
        envelope: Envelope,
        received: bytes,
        limits: SMTPLimits,
        authservID: str,
    ) -> None:
        self._owner = owner
        self._authservID = authservID
        self._incoming = incoming
        self.envelope = envelope
        self._received = received
        self._limits = limits
        self._state = _SinkState.COLLECTING
        self._head = bytearray()
        self._scanned = 0
        self._held: list[bytes] = []
        self._waiters: list[Deferred[None]] = []
        self._pausing = False
        self._refusal: Answer | None = None
        self._oversize = False
        self._hops = False
        self._aborted = False
        self._tail = b""
        self._verdict: Deferred[Answer | bytes] | None = None
        self._header = b""
        self._checks: MessageChecks | None = None
        self._checkWaits = 0
        self.committing = False
        self.size = 0

    @property
    def queueID(self) -> str:
        return str(self._incoming.queueID)

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        state = self._state
        if state is _SinkState.DISCARDING:
            return
        if self.size > self._limits.maxMessageSize:
            self._oversize = True
            self._discard()
            return
        if state is _SinkState.STREAMING:
            self._write(data)
        elif state is _SinkState.WAITING:
            self._held.append(data)
        else:
            self._collect(data)

    def _collect(self, data: bytes) -> None:
        head = self._head
        head += data
        if head.startswith(b"\r\n"):
            split = 0
        else:
            split = head.find(b"\r\n\r\n", max(0, self._scanned - 3))
            if split >= 0:
                split += 2
        self._scanned = len(head)
        if split >= 0:
            self._headerComplete(bytes(head[:split]), bytes(head[split:]))
        elif len(head) > self._limits.maxHeaderBytes:
            self._headerComplete(bytes(head), b"", whole=False)

    def _headerComplete(self, header: bytes, rest: bytes, whole: bool = True) -> None:
        self._head = bytearray()
        if len(RECEIVED_FIELD.findall(header)) >= self._limits.maxReceivedHeaders:
            self._hops = True
            self._discard()
            return
        self._state = _SinkState.WAITING
        self._held = [rest] if rest else []
        d = self._owner.decideHeader(self.envelope, header, whole)
        self._verdict = d
        d.addCallback(self._decided, header)
        if self._state is _SinkState.WAITING:
            self._pausing = True
            self._owner.holdInput()

    def _decided(self, decision: Answer | bytes, header: bytes) -> None:
        self._verdict = None
        held, self._held = self._held, []
        if self._state is _SinkState.WAITING and not self._aborted:
            if isinstance(decision, Answer):
                self._refusal = decision
                self._discard()
            else:
                self._state = _SinkState.STREAMING
                if held and held[0].startswith(b"\r\n"):
                    # The empty line that ends the header section belongs
                    # to it: the body is what follows.
                    header += b"\r\n"
                    held[0] = held[0][2:]
                self._header = self._received + decision + header
                self._tail = self._header[-2:]
                self._checks = self._owner.openChecks(self.envelope, self._header)
                body = b"".join(held)
                if body:
                    self._write(body)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self._pausing:
            self._pausing = False
            self._owner.releaseInput()

    def _write(self, data: bytes) -> None:
        """
        Hand body C{data} to the queue and the checks; a queue that raises
        refuses the message (451) instead of breaking the connection.
        """
        try:
            self._incoming.write(data)
        except Exception:
            self.log.failure("queue write failed for {peer}", peer=self._owner.peer)
            self._refusal = Answer(R.LOCAL_ERROR)
            self._discard()
            return
        self._tail = data[-2:] if len(data) >= 2 else (self._tail + data)[-2:]
        checks = self._checks
        if checks is not None:
            wait = checks.write(data)
            if wait is not None:
                self._checkWaits += 1
                if self._checkWaits == 1:
                    self._owner.holdInput()
                wait.addBoth(self._checkCaughtUp)

    def _checkCaughtUp(self, result: object) -> None:
        self._checkWaits -= 1
        if self._checkWaits == 0:
            self._owner.releaseInput()

    def _discard(self) -> None:
        self._state = _SinkState.DISCARDING
        self._head = bytearray()
        self._held = []
        self.abort()

    def abort(self) -> None:
        """
        Forget the message (once; never after the commit has started).
        """
        if not self._aborted and not self.committing:
            self._aborted = True
            checks, self._checks = self._checks, None
            if checks is not None:
                checks.abort()
            try:
                self._incoming.abort()
            except Exception:
                self.log.failure("queue abort failed for {peer}", peer=self._owner.peer)
            if self._state is not _SinkState.WAITING:
                self._state = _SinkState.DISCARDING

    def cancel(self) -> None:
        """
        The connection is gone: forget the message and stop waiting for a
        policy.
        """
        self.abort()
        verdict, self._verdict = self._verdict, None
        if verdict is not None and not verdict.called:
            verdict.cancel()

    def _settled(self, ended: bool) -> Deferred[None]:
        """
        Fires when no verdict is pending.  At the end of the message
        (C{ended}) a header section without a body is complete too.
        """
        if ended and self._state is _SinkState.COLLECTING:
            self._headerComplete(bytes(self._head), b"")
        if self._state is _SinkState.WAITING:
            d: Deferred[None] = Deferred()
            self._waiters.append(d)
            return d
        return succeed(None)

    def _problem(self, bare: bool, longLine: bool) -> Answer | None:
        if self._oversize:
            return Answer(R.MESSAGE_TOO_BIG)
        if bare:
            return Answer(R.BAD_LINE_ENDING)
        if longLine:
            return Answer(R.TEXT_LINE_TOO_LONG)
        if self._hops:
            return Answer(R.TOO_MANY_HOPS)
        return self._refusal

    def check(self, bare: bool, longLine: bool) -> Deferred[Answer | None]:
        """
        After a BDAT chunk that is not the last: the refusal so far, if any.
        """

        def settled(_: None) -> Answer | None:
            problem = self._problem(bare, longLine)
            if problem is not None:
                self.abort()
            return problem

        return self._settled(False).addCallback(settled)

    def finish(self, bare: bool, longLine: bool) -> Deferred[Answer]:
        """
        The message has ended: refuse it, or ask the end-of-data checks,
        apply their edits, and commit it; say 250 once the queue has made
        it durable.
        """

        def settled(_: None) -> Deferred[Answer] | Answer:
            problem = self._problem(bare, longLine)
            if problem is not None:
                self.abort()
                return problem
            if self.size and self._tail != b"\r\n":
                # A BDAT message need not end with CRLF; stored ones do.
                self._write(b"\r\n")
                if self._refusal is not None:
                    return self._refusal
            checks, self._checks = self._checks, None
            return self._owner.endChecks(checks).addCallback(self._judged)

        return self._settled(True).addCallback(settled)

    def _judged(self, verdict: Verdict) -> Deferred[Answer] | Answer:
        """
        The end-of-data verdict: refuse, or apply its edits and commit.
        """
        if self._aborted:
            return Answer(R.LOCAL_ERROR)
        reply = verdict.reply
        if (reply is not None and not reply.isPositive) or verdict.disconnect:
            self.abort()
            return Answer(reply or R.LOCAL_ERROR, verdict.disconnect)
        if not (verdict.edits or verdict.results):
            # The common case: nothing to change.
            return self._commit(self._header, None, False)
        draft = MessageDraft(self._header, self.envelope)
        draft.apply(verdict.edits)
        draft.addResults(self._authservID, verdict.results)
        if draft.replacedBody is not None:
            self._incoming.rewind()
            self._incoming.write(draft.replacedBody)
        if draft.discard is not None or not draft.envelope.recipients:
            self.log.info(
                "discarded {queueID} from {peer}: {reason}",
                queueID=self.queueID,
                peer=self._owner.peer,
                reason=draft.discard or "a filter removed every recipient",
            )
            self.abort()
            return self._committed(self.queueID)
        if draft.quarantine is not None:
            self.log.info(
                "quarantined {queueID} from {peer}: {reason}",
                queueID=self.queueID,
                peer=self._owner.peer,
                reason=draft.quarantine,
            )
        envelope = draft.envelope if draft.envelope is not self.envelope else None
        return self._commit(draft.header, envelope, draft.quarantine is not None)

    def _commit(self, header: bytes, envelope: Envelope | None, hold: bool) -> Deferred[Answer]:
        self.committing = True
        return maybeDeferred(self._incoming.commit, header, envelope, hold).addCallbacks(
            self._committed, self._commitFailed
        )

    def _committed(self, queueID: str) -> Answer:
        return Answer(SMTPReply(250, "2.0.0", f"Ok: queued as {queueID}"))

    def _commitFailed(self, f: Failure) -> Answer:
        self.committing = False
        self.abort()
        if f.check(QueueFull):
            self.log.warn("queue full, message from {peer} deferred", peer=self._owner.peer)
            return Answer(R.QUEUE_FULL)
        self.log.failure("queue commit failed for {peer}", f, peer=self._owner.peer)
        return Answer(R.LOCAL_ERROR)
