"""
The mail transaction: MAIL, RCPT, DATA and BDAT, the envelope they build,
the DATA and BDAT readers and the message sink's lifetime.

B{The body is never read as commands.}  DATA ends only at CRLF.CRLF; a
lone CR or LF, an over-long line or an oversized message is read to the
real end and refused then.  BDAT chunks are always consumed, also when
refused.  Bytes pipelined behind a refused DATA are a synchronization
error that closes the connection, since they are probably a body.

Message text is decoded on whole chunks (L{mailfw.smtp._body}) and streamed
to the L{MessageSink}, which holds the header section for the loop check
and the policies' C{checkMessage} and applies the verdict at the end of
data.  The session talks to L{MailTransactions} through its command methods
and L{MailTransactions.rawDataReceived}; it talks back only through the
small L{TransactionOwner} interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailfw import tracing
from mailfw.envelope import Envelope, Recipient, RouteKind, Session
from mailfw.policy._chain import MessageChecks, Stage
from mailfw.reply import SMTPReply
from mailfw.smtp import _auth as A
from mailfw.smtp import _replies as R
from mailfw.smtp._body import ChunkReader, DotReader
from mailfw.smtp._framing import InputFramer
from mailfw.smtp._headers import policyHeaders, receivedHeader, submissionHeaders
from mailfw.smtp._parser import MailFrom, RcptTo, decodeXtext, parseBdat, parseMailFrom, parseRcptTo
from mailfw.smtp._pipeline import ReplyPipeline
from mailfw.smtp._replies import Answer
from mailfw.smtp._settings import SessionSettings
from mailfw.smtp._sink import MessageSink
from mailfw.smtp._state import SESSION_LOG_NAMESPACE
from mailfw.verdict import AuthResult, MessageEdit, Verdict

# Not a class attribute: as a descriptor, Logger would name the class.
_log = Logger(namespace=SESSION_LOG_NAMESPACE)

__all__ = ["MailTransactions", "TransactionOwner"]

# What an empty policy chain says.
_NO_VERDICT = Verdict()


class TransactionOwner(Protocol):
    """
    What L{MailTransactions} needs from its session: no more than this.
    """

    @property
    def peer(self) -> str:
        """The client, for log events."""

    @property
    def session(self) -> Session:
        """What the server knows about the client now."""

    @property
    def mailParameters(self) -> frozenset[str]:
        """MAIL parameters an extension checks itself."""

    @property
    def avatar(self) -> Any:
        """The authenticated L{mailfw.interfaces.IMailUser}, or C{None}."""

    @property
    def sessionResults(self) -> tuple[AuthResult, ...]:
        """Authentication results of the connection and HELO stages."""

    def refusalFor(self, verdict: Verdict) -> Answer | None:
        """
        The answer for a refusing verdict, or C{None} if it accepts.
        """


@dataclass(eq=False)
class _Transaction:
    """
    The state of one mail transaction, from MAIL to the end of data.
    """

    mail: MailFrom
    recipients: list[Recipient] = field(default_factory=list)
    results: list[AuthResult] = field(default_factory=list)
    edits: list[MessageEdit] = field(default_factory=list)
    attempted: int = 0
    bdat: bool = False
    message: MessageSink | None = None
    chunks: ChunkReader | None = None
    checking: int = 0
    trace: Any = None
    ending: bool = False

    def carry(self, verdicts: list[Verdict]) -> None:
        """
        Keep the results and edits of the accepting C{verdicts}.
        """
        for verdict in verdicts:
            self.results.extend(verdict.results)
            self.edits.extend(verdict.edits)


@dataclass(eq=False)
class _Chunk:
    """
    A BDAT chunk being consumed.  With C{error} set its octets are thrown
    away and the error is the reply.
    """

    remaining: int
    last: bool
    size: int
    error: SMTPReply | None = None


class MailTransactions:
    """
    The mail transactions of one session, one at a time.

    @ivar accepted: how many messages the session has had accepted.
    @ivar started: how many transactions the session has started (MAIL
        accepted), held to L{SMTPLimits.maxTransactions}.
    """

    def __init__(
        self,
        owner: TransactionOwner,
        settings: SessionSettings,
        replies: ReplyPipeline,
        framer: InputFramer,
    ) -> None:
        self._owner = owner
        self._settings = settings
        self._replies = replies
        self._input = framer
        self._current: _Transaction | None = None
        self._dot: DotReader | None = None
        self._chunk: _Chunk | None = None
        self.accepted = 0
        self.started = 0

    @property
    def peer(self) -> str:
        """
        L{SinkOwner.peer}.
        """
        return self._owner.peer

    @property
    def active(self) -> bool:
        """
        Whether a transaction has started (MAIL was accepted).
        """
        return self._current is not None

    def takesRecipients(self, pending: int) -> bool:
        """
        Whether a RCPT may be checked now beside C{pending} other checks:
        before the data, within the recipients limit.
        """
        tx = self._current
        return (
            tx is not None
            and tx.message is None
            and len(tx.recipients) + pending < self._settings.limits.maxRecipients
        )

    # --- ending -------------------------------------------------------------------

    def reset(self) -> None:
        """
        End the transaction (RSET, HELO, STARTTLS, hang-up): a message
        being received is thrown away.
        """
        tx, self._current = self._current, None
        if tx is not None:
            _abandonTrace(tx)
            if tx.message is not None:
                tx.message.abort()

    def cancel(self) -> None:
        """
        The connection is gone: also stop waiting for the policies.
        """
        tx, self._current = self._current, None
        if tx is not None:
            _abandonTrace(tx)
            if tx.message is not None:
                tx.message.cancel()

    # --- MAIL and RCPT --------------------------------------------------------------

    def mail(self, argument: str) -> None:
        """
        C{MAIL FROM:<reverse-path> [parameters]}.
        """
        settings, session, replies = self._settings, self._owner.session, self._replies
        if session.helo is None:
            replies.respond(R.NEED_HELO)
            return
        if self._current is not None:
            replies.respond(R.NESTED_MAIL)
            return
        if settings.submission and session.authenticated is None:
            replies.respond(R.NEED_AUTH)
            return
        extra = self._owner.mailParameters
        if settings.auth is not None:
            extra = extra | {"AUTH"}
        if session.tls:
            extra = extra | {"REQUIRETLS"}
        parsed = parseMailFrom(argument, esmtp=session.esmtp, extraParameters=extra)
        if isinstance(parsed, SMTPReply):
            replies.respond(parsed)
            return
        if settings.auth is not None and "AUTH" in parsed.parameters:
            # RFC 4954 5: the identity a relay vouches for.  Checked for
            # syntax, then ignored: this server does not pass it on.
            value = parsed.parameters["AUTH"]
            try:
                if value is None or (value != "<>" and not decodeXtext(value)):
                    raise ValueError("empty")
            except ValueError:
                replies.respond(A.AUTH_PARAMETER_SYNTAX)
                return
        avatar = self._owner.avatar
        if avatar is not None and not avatar.maySend(parsed.sender):
            _log.info(
                "refused MAIL from {peer}: {sender} not allowed for {user}",
                event="transaction.refused",
                stage="MAIL",
                peer=self._owner.peer,
                sender="" if parsed.sender is None else str(parsed.sender),
                user=session.authenticated,
                code=A.SENDER_NOT_OWNED.code,
                enhanced=A.SENDER_NOT_OWNED.enhanced,
            )
            replies.respond(A.SENDER_NOT_OWNED)
            return
        if parsed.size is not None and parsed.size > settings.limits.maxMessageSize:
            replies.respond(R.MESSAGE_TOO_BIG)
            return
        if self.started >= settings.limits.maxTransactions:
            replies.respond(R.TOO_MANY_TRANSACTIONS)
            return
        mail: MailFrom = parsed
        # One trace per message, from MAIL on (L{mailfw.tracing}).
        trace = (
            tracing.startSpan(
                "smtp.receive",
                attributes={
                    "mailfw.listener": settings.kind,
                    "mailfw.peer": self._owner.peer,
                    "smtp.sender": "" if mail.sender is None else str(mail.sender),
                },
            )
            if tracing.enabled()
            else None
        )

        carried: list[Verdict] = []

        def ask() -> Deferred[Answer]:
            return settings.chain.ask(
                Stage.MAIL,
                tracing.tracedCall(
                    trace, "sender", lambda p: p.checkSender(session, mail.sender, mail.parameters)
                ),
                self._owner.peer,
            ).addCallback(self._stageAnswer, Answer(R.MAIL_OK), carried)

        def quotaChecked(overQuota: SMTPReply | None) -> Deferred[Answer] | Answer:
            return ask() if overQuota is None else Answer(overQuota)

        def then(answer: Answer) -> None:
            if answer.reply.isPositive:
                self.started += 1
                tx = self._current = _Transaction(mail, trace=trace, results=list(self._owner.sessionResults))
                tx.carry(carried)
            else:
                tracing.endSpan(trace, answer.reply.code, answer.reply.enhanced)
                self._logRefusal("MAIL", answer.reply, mail)

        quotas, user = settings.quotas, session.authenticated
        if quotas is None or user is None:
            replies.respondLater(ask(), then)
        else:
            replies.respondLater(quotas.checkMessage(user).addCallback(quotaChecked), then)

    def rcpt(self, argument: str) -> None:
        """
        C{RCPT TO:<forward-path> [parameters]}: checked concurrently with
        other pipelined RCPT commands.
        """
        tx, replies = self._current, self._replies
        if tx is None:
            replies.respond(R.NEED_MAIL if self._owner.session.helo is not None else R.NEED_HELO)
            return
        if tx.message is not None:
            replies.respond(R.BAD_SEQUENCE)
            return
        parsed = parseRcptTo(
            argument, self._settings.hostname, esmtp=self._owner.session.esmtp, smtputf8=tx.mail.smtputf8
        )
        tx.attempted += 1
        if isinstance(parsed, SMTPReply):
            replies.respond(parsed)
            return
        if len(tx.recipients) >= self._settings.limits.maxRecipients:
            replies.respond(R.TOO_MANY_RECIPIENTS)
            return
        recipient = Recipient(parsed.address, parsed.notify, parsed.orcpt)

        carried: list[Verdict] = []

        def then(answer: Answer) -> None:
            tx.checking -= 1
            if self._current is not tx:
                return
            if answer.reply.isPositive:
                if all(r.address != recipient.address for r in tx.recipients):
                    tx.recipients.append(recipient)
                    tx.carry(carried)
            else:
                self._logRefusal("RCPT", answer.reply, tx.mail, recipient)

        quotas, user = self._settings.quotas, self._owner.session.authenticated
        if quotas is not None and user is not None:
            # Recipients whose checks are still running count as added.
            pending = len(tx.recipients) + tx.checking

            def quotaChecked(overQuota: SMTPReply | None) -> Deferred[Answer] | Answer:
                if overQuota is None:
                    return self._checkRecipient(parsed, recipient, tx, carried)
                return Answer(overQuota)

            d: Deferred[Answer] = quotas.checkRecipient(user, pending).addCallback(quotaChecked)
        else:
            d = self._checkRecipient(parsed, recipient, tx, carried)
        tx.checking += 1
        replies.respondLater(d, then, overlappable=True)

    def _checkRecipient(
        self, parsed: RcptTo, recipient: Recipient, tx: _Transaction, carried: list[Verdict]
    ) -> Deferred[Answer]:
        """
        Route the recipient, then ask the policies.  The bare
        C{<postmaster>} of RFC 5321 4.5.1 is always accepted, and so is
        postmaster at a local domain whatever the policies say.
        """
        accept = Answer(R.RCPT_OK)
        if parsed.postmaster:
            return succeed(accept)
        settings, session, peer = self._settings, self._owner.session, self._owner.peer
        envelope = self._envelope(tx)
        routed: Deferred[Any] = maybeDeferred(settings.router.route, recipient.address, session)
        if not routed.called:
            routed.addTimeout(settings.limits.policyTimeout, settings.clock)
        if tx.trace is not None:
            span = tracing.childSpan(tx.trace, "route", {"smtp.recipient": str(recipient.address)})
            tracing.tracedDeferred(span, routed)

        def afterRoute(route: Any) -> Deferred[Answer] | Answer:
            if route.kind is RouteKind.REFUSE:
                reply = route.reply
                if reply is None or reply.isPositive:
                    reply = SMTPReply(550, "5.1.1", "Recipient address rejected")
                return Answer(reply)
            if route.kind is RouteKind.LOCAL and recipient.address.localpart.lower() == "postmaster":
                return accept
            return settings.chain.ask(
                Stage.RCPT,
                tracing.tracedCall(
                    tx.trace, "recipient", lambda p: p.checkRecipient(session, envelope, recipient)
                ),
                peer,
            ).addCallback(self._stageAnswer, accept, carried)

        def failed(f: Failure) -> Answer:
            return Answer(settings.chain.failureReply(f, "route", peer))

        return routed.addCallbacks(afterRoute, failed)

    def _stageAnswer(self, verdict: Verdict, accept: Answer, carried: list[Verdict]) -> Answer:
        """
        The answer for C{verdict}; an accepting one is kept in C{carried}
        for its results and edits.
        """
        refusal = self._owner.refusalFor(verdict)
        if refusal is not None:
            return refusal
        if verdict.results or verdict.edits:
            carried.append(verdict)
        return accept

    def _envelope(self, tx: _Transaction) -> Envelope:
        mail = tx.mail
        session = self._owner.session
        return Envelope(
            sender=mail.sender,
            recipients=tuple(tx.recipients),
            ret=mail.ret,
            envid=mail.envid,
            body=mail.body,
            smtputf8=mail.smtputf8,
            size=mail.size,
            helo=session.helo or "",
            peerHost=session.peerHost,
            authenticated=session.authenticated,
            arrival=self._settings.clock.seconds(),
            requireTLS=mail.requireTLS,
            traceparent=tracing.traceparentOf(tx.trace),
        )

    # --- the message --------------------------------------------------------------

    def _startMessage(self, tx: _Transaction) -> SMTPReply | None:
        """
        Open the message in the queue; C{None} when that worked.
        """
        envelope = self._envelope(tx)
        settings = self._settings
        try:
            incoming = settings.queue.receive(envelope)
            queueID = str(incoming.queueID)
        except Exception:
            _log.failure("queue refused a new message from {peer}", peer=self._owner.peer)
            return R.LOCAL_ERROR
        auth = settings.auth
        received = receivedHeader(
            settings.hostname,
            self._owner.session,
            queueID,
            envelope,
            settings.clock.seconds(),
            identity=auth is not None and auth.receivedIdentity,
        )
        envelope = replace(envelope, queueID=queueID)
        tx.message = MessageSink(self, incoming, envelope, received, settings.limits, settings.hostname)
        return None

    def _missing(self, tx: _Transaction | None) -> SMTPReply | None:
        """
        Why data cannot start now, if it cannot: no MAIL, or no recipient.
        """
        if tx is None:
            return R.NEED_MAIL if self._owner.session.helo is not None else R.NEED_HELO
        if not tx.recipients:
            return R.NO_VALID_RECIPIENTS if tx.attempted else R.NEED_RCPT
        return None

    def _refuseData(self, reply: SMTPReply) -> None:
        """
        Refuse DATA.  Octets already pipelined behind it would be read as
        commands, but they are probably the body (RFC 2920 3.1 forbids
        sending them), so that is a synchronization error.
        """
        pipelined = self._input.hasUnread()
        self._replies.respond(reply)
        if pipelined:
            _log.warn("octets pipelined after refused DATA from {peer}", peer=self._owner.peer)
            self._replies.respond(Answer(R.SYNCHRONIZATION, True))

    def data(self, argument: str) -> None:
        """
        C{DATA}: 354, then the text up to CRLF.CRLF.
        """
        tx = self._current
        if argument:
            self._refuseData(R.NO_PARAMETERS)
            return
        problem = self._missing(tx)
        if problem is None and tx is not None:
            problem = R.DATA_AFTER_BDAT if tx.bdat else self._startMessage(tx)
        if problem is not None:
            self._refuseData(problem)
            return

        def then(answer: Answer) -> None:
            self._dot = DotReader(self._settings.limits.maxTextLine)
            self._input.raw = True

        self._replies.respond(R.START_DATA, then)

    def rawDataReceived(self, data: bytes) -> None:
        """
        Octets of DATA text or of a BDAT chunk (the framer is raw).
        """
        if self._dot is not None:
            self._dataReceived(data)
        else:
            self._bdatReceived(data)

    def _dataReceived(self, data: bytes) -> None:
        dot, tx = self._dot, self._current
        assert dot is not None and tx is not None and tx.message is not None
        text, rest = dot.feed(data)
        tx.message.write(text)
        if rest is None:
            return
        self._input.raw = False
        self._dot = None
        self._input.unread(rest)
        self._endMessage(tx, tx.message.finish(dot.bareLineEnding, dot.lineTooLong))

    def _endMessage(self, tx: _Transaction, d: Deferred[Answer]) -> None:
        message = tx.message
        assert message is not None
        clock = self._settings.clock
        ended = clock.seconds()
        trace = tx.trace
        if trace is not None:
            tx.ending = True
            span = tracing.childSpan(trace, "enqueue", {"mailfw.queue_id": message.queueID})
            d = tracing.tracedDeferred(span, d, _answerCode)

        def logged(answer: Answer) -> Answer:
            # Logged as soon as known, also if the client has gone meanwhile.
            reply = answer.reply
            if reply.code == 250:
                self.accepted += 1
                self._charge(message.envelope)
                _log.info(
                    "accepted {queueID} from {sender} for {count} recipients ({size} octets) from {peer}",
                    event="message.received",
                    queueID=message.queueID,
                    sender="" if tx.mail.sender is None else str(tx.mail.sender),
                    count=len(message.envelope.recipients),
                    size=message.size,
                    peer=self._owner.peer,
                    listener=self._owner.session.listener,
                    # End of data to the 250: the queue's commit.
                    latency=clock.seconds() - ended,
                )
            else:
                self._logRefusal("DATA", reply, tx.mail, queueID=message.queueID)
            if trace is not None:
                tx.trace = None
                tracing.endSpan(
                    trace,
                    reply.code,
                    reply.enhanced,
                    attributes={
                        "mailfw.queue_id": message.queueID,
                        "smtp.recipients": len(message.envelope.recipients),
                        "smtp.size": message.size,
                    },
                )
            return answer

        def then(answer: Answer) -> None:
            if self._current is tx:
                self._current = None

        self._replies.respondLater(d.addCallback(logged), then, cancellable=False)

    def _charge(self, envelope: Envelope) -> None:
        """
        Count an accepted message against its user's sending quota (only
        now: a refused or abandoned message costs nothing).
        """
        quotas, user = self._settings.quotas, envelope.authenticated
        if quotas is not None and user is not None:
            quotas.charge(user, len(envelope.recipients)).addErrback(
                lambda f: _log.failure("charging the sending quota of {user} failed", f, user=user)
            )

    def bdat(self, argument: str) -> None:
        """
        C{BDAT size [LAST]} (RFC 3030): the chunk's octets are always
        consumed, also when it is refused.
        """
        parsed = parseBdat(argument)
        if isinstance(parsed, SMTPReply):
            # The chunk's length is unknown, so its octets cannot be skipped.
            self._replies.respond(Answer(parsed, True))
            return
        tx = self._current
        error = self._missing(tx)
        if error is None and tx is not None and tx.message is None:
            error = self._startMessage(tx)
            if error is None:
                tx.bdat = True
                tx.chunks = ChunkReader(self._settings.limits.maxTextLine)
        self._chunk = _Chunk(parsed.size, parsed.last, parsed.size, error)
        if parsed.size:
            self._input.raw = True
        else:
            self._endChunk()

    def _bdatReceived(self, data: bytes) -> None:
        chunk, tx = self._chunk, self._current
        assert chunk is not None
        take = data[: chunk.remaining]
        chunk.remaining -= len(take)
        if chunk.error is None and tx is not None and tx.message is not None:
            assert tx.chunks is not None
            tx.message.write(tx.chunks.feed(take))
        if chunk.remaining == 0:
            self._input.raw = False
            self._input.unread(data[len(take) :])
            self._endChunk()

    def _endChunk(self) -> None:
        chunk, self._chunk = self._chunk, None
        assert chunk is not None
        tx = self._current
        if chunk.error is not None:
            self._replies.respond(chunk.error)
            return
        assert tx is not None and tx.message is not None and tx.chunks is not None
        message, reader = tx.message, tx.chunks
        if chunk.last:
            message.write(reader.finish())
            self._endMessage(tx, message.finish(reader.bareLineEnding, reader.lineTooLong))
            return
        ok = Answer(SMTPReply(250, "2.0.0", f"Ok: {chunk.size} octets received"))

        def checked(problem: Answer | None) -> Answer:
            return ok if problem is None else problem

        def then(answer: Answer) -> None:
            if not answer.reply.isPositive and self._current is tx:
                # RFC 3030 2: a refused chunk fails the transaction.
                self._current = None
                _abandonTrace(tx)
                self._logRefusal("BDAT", answer.reply, tx.mail, queueID=message.queueID)

        d = message.check(reader.bareLineEnding, reader.lineTooLong).addCallback(checked)
        self._replies.respondLater(d, then, cancellable=False)

    # --- SinkOwner --------------------------------------------------------------------

    def decideHeader(self, envelope: Envelope, header: bytes, whole: bool) -> Deferred[Answer | bytes]:
        """
        L{SinkOwner.decideHeader}: ask the chain's C{checkMessage}; on
        acceptance, the fields to add are the policies' and, on the
        submission listeners and for a whole header section, C{Date:} and
        C{Message-ID:} where missing.
        """
        settings = self._settings

        def decided(verdict: Verdict) -> Answer | bytes:
            refusal = self._owner.refusalFor(verdict)
            if refusal is not None:
                return refusal
            if self._current is not None:
                self._current.carry([verdict])
            added = policyHeaders(verdict.headers) if verdict.headers else b""
            if whole and settings.submission:
                added += submissionHeaders(settings.hostname, header, settings.clock.seconds())
            return added

        if not settings.chain:
            # Nothing to ask: no Deferred callbacks on the hot path.
            return succeed(decided(_NO_VERDICT))
        session = self._owner.session
        tx = self._current
        return settings.chain.ask(
            Stage.HEADERS,
            tracing.tracedCall(
                tx.trace if tx is not None else None,
                "message",
                lambda p: p.checkMessage(session, envelope, header),
            ),
            self._owner.peer,
        ).addCallback(decided)

    def openChecks(self, envelope: Envelope, header: bytes) -> MessageChecks | None:
        """
        L{SinkOwner.openChecks}.
        """
        chain = self._settings.chain
        if not chain:
            return None
        return chain.openMessage(self._owner.session, envelope, header, self._owner.peer)

    def endChecks(self, checks: MessageChecks | None) -> Deferred[Verdict]:
        """
        L{SinkOwner.endChecks}: the checks' verdict with the results and
        edits of the transaction's earlier stages (in front of the
        checks' own).
        """
        tx = self._current
        results = tuple(tx.results) if tx is not None else ()
        edits = tuple(tx.edits) if tx is not None else ()
        if checks is None:
            return succeed(Verdict(results=results, edits=edits) if results or edits else _NO_VERDICT)

        def combined(verdict: Verdict) -> Verdict:
            return replace(verdict, results=results + verdict.results, edits=edits + verdict.edits)

        return checks.end(results).addCallback(combined)

    def holdInput(self) -> None:
        """
        L{SinkOwner.holdInput}.
        """
        self._input.pause("verdict")

    def releaseInput(self) -> None:
        """
        L{SinkOwner.releaseInput}.
        """
        self._input.unpause("verdict")

    def _logRefusal(
        self,
        stage: str,
        reply: SMTPReply,
        mail: MailFrom,
        recipient: Recipient | None = None,
        queueID: str = "",
    ) -> None:
        _log.info(
            "refused {stage} from {peer}: {code} {enhanced} "
            "sender=<{sender}> recipient=<{recipient}> queueID={queueID}",
            event="transaction.refused",
            stage=stage,
            peer=self._owner.peer,
            code=reply.code,
            enhanced=reply.enhanced,
            sender="" if mail.sender is None else str(mail.sender),
            recipient="" if recipient is None else str(recipient.address),
            queueID=queueID,
        )


def _answerCode(answer: Answer) -> int:
    return answer.reply.code


def _abandonTrace(tx: _Transaction) -> None:
    """
    End the trace of a transaction that ends without its end-of-data
    reply (RSET, a refused chunk, the client gone).  One whose message is
    being committed is ended by that reply instead: it may still be
    accepted.
    """
    trace = tx.trace
    if trace is not None and not tx.ending:
        tx.trace = None
        tracing.endSpan(trace, error="transaction abandoned")
