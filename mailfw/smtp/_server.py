"""
The SMTP server protocol: RFC 5321 with PIPELINING, SIZE, 8BITMIME,
ENHANCEDSTATUSCODES, SMTPUTF8, STARTTLS, CHUNKING and DSN.

The protocol is written fresh (STYLE.md section 7) and owns its framing:
command lines are cut from one buffer walked with an offset, DATA and BDAT
octets go to their readers as whole chunks, and a re-entrant call (a reply
written from inside the loop resumes input) only appends to the buffer.
It keeps three rules that C{twisted.mail.smtp} does not:

  - B{Replies strictly in command order.}  Every reply takes a slot in
    the session's L{ReplyPipeline} (L{mailfw.smtp._pipeline}); slots are
    written head first, as soon as the head has its answer.  Pipelined RCPT commands are checked
    concurrently (their slots wait side by side); any other command that
    arrives while a slot waits is held, and input is paused, until all
    earlier replies have been sent, because its meaning depends on them.
  - B{The body is never read as commands.}  DATA ends only at CRLF.CRLF; a
    lone CR or LF, an over-long line or an oversized message is read to the
    real end and refused then.  BDAT chunks are always consumed, also when
    refused.  Bytes pipelined behind a refused DATA are a synchronization
    error that closes the connection, since they are probably a body.
  - B{Nothing sent before STARTTLS survives it.}  The input buffer is
    dropped and the session reset when TLS starts (RFC 3207 4.2).

AUTH (RFC 4954) is offered when the factory gives an L{SMTPAuth}, and only
inside TLS: PLAIN and LOGIN send passwords in the clear.  While a SASL
exchange runs, input lines are client responses, not commands (up to
12288 octets each).  After a successful AUTH the session is
C{authenticated} and a C{relayClient}, and MAIL FROM must be an address
the user owns (L{mailfw.interfaces.IMailUser.maySend}).  The submission
listeners require AUTH before MAIL and add C{Date:} and C{Message-ID:} to
messages that lack them (RFC 6409 8).

ETRN (RFC 1985) is offered when the factory gives an L{ETRNHandler}: after
HELO/EHLO and outside a mail transaction (else 503 5.5.1), the handler
checks the argument, the client's rate and rights (its address, or the
authenticated user's ETRN domains) and records the flush; the reply
(250-253, 458, 459, 501) goes out once the queue has recorded it, and the
scheduler delivers over new connections.  TURN is never offered (502).

The session's parts, each in its own module and each talking back to the
protocol through a small explicit interface: the input framer
(L{mailfw.smtp._framing}), the reply pipeline with the error limits
(L{mailfw.smtp._pipeline}), the policy chain (L{mailfw.policy._chain}),
the AUTH exchange with the brute-force lockout (L{mailfw.smtp._sasl}), the
message sink (L{mailfw.smtp._sink}) and the header fields the server
writes (L{mailfw.smtp._headers}).  What every session of a listener shares
is one L{SessionSettings}.

Message text is decoded on whole chunks (L{mailfw.smtp._body}) and streamed
to L{IIncomingMessage.write} as it arrives.  The header section is held
(up to L{SMTPLimits.maxHeaderBytes}) until it is complete: then the loop
check runs and the policies' C{checkMessage} is called with it, so that the
headers a policy adds can still be written above it.  The verdict is
applied at the end of data, after the whole message has been read.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, cast

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    ISSLTransport,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailfw.auth._scram import channelBindingFor
from mailfw.envelope import Envelope, Recipient, RouteKind, Session
from mailfw.policy._chain import Stage
from mailfw.reply import SMTPReply
from mailfw.smtp import _auth as A
from mailfw.smtp import _replies as R
from mailfw.smtp._body import ChunkReader, DotReader
from mailfw.smtp._framing import InputFramer
from mailfw.smtp._headers import policyHeaders, receivedHeader, submissionHeaders
from mailfw.smtp._parser import (
    MailFrom,
    RcptTo,
    decodeXtext,
    parseBdat,
    parseCommandLine,
    parseDomainArgument,
    parseMailFrom,
    parseRcptTo,
)
from mailfw.smtp._pipeline import ReplyPipeline
from mailfw.smtp._replies import Answer
from mailfw.smtp._sasl import AuthOutcome, SASLExchange
from mailfw.smtp._settings import SessionSettings
from mailfw.smtp._sink import MessageSink
from mailfw.verdict import Verdict

__all__ = ["SMTPServerProtocol"]

# Commands of RFC 5321 and common extensions that this server knows but does
# not offer: 502 rather than 500.  TURN (RFC 821) would hand the queue to
# whoever connects: never.  (ETRN has an entry in SMTPServerProtocol.commands
# and answers 502 itself where it is not offered.)
NOT_IMPLEMENTED = frozenset({"EXPN", "TURN", "ATRN", "SEND", "SOML", "SAML", "VERB", "XCLIENT", "XFORWARD"})
# Requests of other protocols sent to an SMTP port (cross-protocol attacks,
# a browser pointed at the port; Postfix's smtpd_forbidden_commands): one
# 221 2.7.0, then closed, on every listener, before and after AUTH.
FORBIDDEN = frozenset({"GET", "POST", "PUT", "HEAD", "CONNECT", "OPTIONS", "DELETE", "PATCH", "TRACE"})
# Any line shaped like an HTTP request line ("M-SEARCH * HTTP/1.1").
_HTTP_REQUEST = re.compile(rb"[!-~]+ [!-~]+ HTTP/[0-9]")

# Seconds a closing connection may wait for the peer (TLS close_notify, a
# full write buffer) before it is aborted.
CLOSE_GRACE = 10.0

# What an empty policy chain says.
_NO_VERDICT = Verdict()


@functools.lru_cache(maxsize=512)
def _wire(reply: SMTPReply, enhanced: bool) -> bytes:
    """
    A one-line reply as sent: the same few replies go out all day.
    """
    return reply.lines(enhanced=enhanced)[0] + b"\r\n"


@dataclass(eq=False)
class _Transaction:
    """
    The state of one mail transaction, from MAIL to the end of data.
    """

    mail: MailFrom
    recipients: list[Recipient] = field(default_factory=list)
    attempted: int = 0
    bdat: bool = False
    message: MessageSink | None = None
    chunks: ChunkReader | None = None


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


class SMTPServerProtocol(Protocol):
    """
    One SMTP, submission or submissions session.

    @cvar commands: the dispatch table, verb to handler.  Extensions such as
        AUTH and ETRN add an entry here (a subclass may extend it with
        C{{**SMTPServerProtocol.commands, "ETRN": ...}}); a table entry wins
        over L{NOT_IMPLEMENTED}.  Handlers answer with C{replies.respond} or
        C{replies.respondLater}, which keep replies in order.
    @cvar mailParameters: MAIL parameters an extension checks itself.
    @ivar settings: the listener's L{SessionSettings}, shared by all its
        connections.
    @ivar replies: the L{ReplyPipeline} that orders this session's replies.
    @ivar peer: the client as C{"host:port"} text, for log events.
    @ivar closing: set once the session hangs up (read only).
    @ivar closed: set once the connection is gone (read only).
    """

    log = Logger()
    commands: ClassVar[Mapping[str, Callable[[SMTPServerProtocol, str], None]]]
    mailParameters: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        settings: SessionSettings,
        onOpen: Callable[[SMTPServerProtocol], None] | None = None,
        onClose: Callable[[SMTPServerProtocol], None] | None = None,
    ) -> None:
        self.settings = settings
        self._onOpen = onOpen
        self._onClose = onClose
        self.peer = ""
        self._session = Session(listener=settings.kind, peerHost="")
        self._transaction: _Transaction | None = None
        self._input = InputFramer(self, settings.limits.maxCommandLine)
        self.replies = ReplyPipeline(self, settings.limits, settings.clock)
        self._stalled: bytes | None = None
        self._idle: IDelayedCall | None = None
        self._abortLater: IDelayedCall | None = None
        self._draining = False
        self._accepted = 0
        self._connectedAt = 0.0
        self._lastActivity = 0.0
        self._refused = False
        self.closing = False
        self.closed = False
        self._dot: DotReader | None = None
        self._chunk: _Chunk | None = None
        self._sasl: SASLExchange | None = None
        self._avatar: Any = None
        self._logout: Callable[[], None] | None = None

    @property
    def avatar(self) -> Any:
        """
        The L{mailfw.interfaces.IMailUser} after a successful AUTH, else C{None}.
        """
        return self._avatar

    # --- connection ---------------------------------------------------------

    @property
    def session(self) -> Session:
        """
        What the server knows about the client now.
        """
        return self._session

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        address = transport.getPeer()
        host = str(getattr(address, "host", ""))
        port = getattr(address, "port", 0)
        port = port if isinstance(port, int) else 0
        self.peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        tls = self.settings.kind == "submissions" or ISSLTransport.providedBy(transport)
        self._session = Session(listener=self.settings.kind, peerHost=host, peerPort=port, tls=tls)
        # The connection is logged once, when it ends (with what happened):
        # twistd writes every event, debug ones too, and a line per event is
        # a measurable share of the cost of a message.
        self._connectedAt = self.settings.clock.seconds()
        if self._onOpen is not None:
            self._onOpen(self)
        # As a streaming producer the protocol stops reading while the
        # transport's write buffer is full: a client that pipelines without
        # reading the replies cannot make the server buffer them all.
        transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self._input.attach(transport)
        self._lastActivity = self.settings.clock.seconds()
        self._idle = self.settings.clock.callLater(self.settings.limits.idleTimeout, self._idleTimedOut)
        session = self._session
        verdict = self.settings.chain.ask(Stage.CONNECT, lambda p: p.checkConnection(session), self.peer)
        self.replies.respondLater(verdict.addCallback(self._greeting), cancellable=True)

    def _greeting(self, verdict: Verdict) -> Answer:
        refusal = self._refusalFor(verdict)
        if refusal is None:
            return Answer(SMTPReply(220, "", f"{self.settings.hostname} ESMTP"), plain=True)
        reply = refusal.reply
        self.log.info(
            "connection from {peer} refused: {code} {enhanced}",
            peer=self.peer,
            code=reply.code,
            enhanced=reply.enhanced,
        )
        if reply.isPermanent and not refusal.close:
            # RFC 5321 3.1: 554 instead of the greeting, then only QUIT.
            self._refused = True
            return Answer(SMTPReply(554, "", f"{self.settings.hostname} {reply.text}"), plain=True)
        return Answer(SMTPReply(421, "", f"{self.settings.hostname} {reply.text}"), True, plain=True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self.closing = True
        for call in (self._idle, self._abortLater):
            if call is not None and call.active():
                call.cancel()
        self._idle = self._abortLater = None
        self.replies.stop()
        tx, self._transaction = self._transaction, None
        if tx is not None and tx.message is not None:
            tx.message.cancel()
        self._sasl = None
        self._endLogin()
        self.log.info(
            "connection from {peer} on {listener} closed after {duration:.1f}s:"
            " {accepted} messages accepted, {errors} errors",
            peer=self.peer,
            listener=self.settings.kind,
            helo=self._session.helo or "",
            duration=self.settings.clock.seconds() - self._connectedAt,
            accepted=self._accepted,
            errors=self.replies.errors,
        )
        if self._onClose is not None:
            onClose, self._onClose = self._onClose, None
            onClose(self)

    def hangUp(self) -> None:
        """
        Hang up after the replies written so far.
        """
        if self.closing:
            return
        self.closing = True
        self._input.stop()
        tx, self._transaction = self._transaction, None
        if tx is not None and tx.message is not None:
            tx.message.abort()
        if self.transport is not None:
            self.transport.loseConnection()
            # A TLS close waits for the peer, and a peer that never reads
            # keeps our write buffer full: neither may hold the slot.
            self._abortLater = self.settings.clock.callLater(CLOSE_GRACE, self._abortClose)

    def _abortClose(self) -> None:
        self._abortLater = None
        if not self.closed and self.transport is not None:
            self.log.info("{peer} did not close; aborting", peer=self.peer)
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def closingReply(self, reply: SMTPReply) -> SMTPReply:
        """
        RFC 5321 4.2: a 421 names the server.
        """
        return replace(reply, text=f"{self.settings.hostname} {reply.text}")

    def _idleTimedOut(self) -> None:
        self._idle = None
        if self.closing:
            return
        remaining = self._lastActivity + self.settings.limits.idleTimeout - self.settings.clock.seconds()
        if remaining > 0:
            # Activity since the timer was set: wait for the rest.  (The
            # timer is moved lazily, not reset on every line.)
            self._idle = self.settings.clock.callLater(remaining, self._idleTimedOut)
            return
        if self.replies.pending or "verdict" in self._input.reasons:
            # We are the slow party (a policy or the queue); not the client.
            self._idle = self.settings.clock.callLater(self.settings.limits.idleTimeout, self._idleTimedOut)
            return
        self.log.info("idle timeout for {peer}", peer=self.peer)
        self.sendAnswer(Answer(self.closingReply(R.TIMEOUT)))
        if "write" in self._input.reasons and self.transport is not None:
            # The client does not read: waiting for the buffer to drain
            # would keep the connection forever.
            self.closing = True
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        self.hangUp()

    def _activity(self) -> None:
        self._lastActivity = self.settings.clock.seconds()

    # --- input ----------------------------------------------------------------

    def clearLineBuffer(self) -> bytes:
        """
        Drop and return everything received but not yet processed.
        """
        return self._input.clear()

    def dataReceived(self, data: bytes) -> None:
        """
        Hand input to the L{InputFramer}, which cuts command lines or passes
        DATA and BDAT octets on.
        """
        if self.closing:
            return
        if data:
            self._activity()
        self._input.feed(data)

    def overrun(self) -> None:
        """
        L{FramingOwner.overrun}: the client sends on and on without
        reading our replies.
        """
        self.log.warn("{peer} sends without reading replies, aborting", peer=self.peer)
        self.closing = True
        self.transport.abortConnection()  # type: ignore[union-attr]

    def lineTooLong(self) -> None:
        """
        L{FramingOwner.lineTooLong}: 500, and a SASL exchange ends.
        """
        if self._sasl is not None:
            self._setSASL(None)
            self.replies.respond(A.AUTH_LINE_TOO_LONG)
        else:
            self.replies.respond(R.LINE_TOO_LONG)

    def lineReceived(self, line: bytes) -> None:
        if self.replies.pending and not self._canOverlap(line):
            # An earlier reply is pending and this command depends on it.
            self._stalled = line
            self._input.pause("stall")
            return
        self._dispatch(line)

    def rawDataReceived(self, data: bytes) -> None:
        if self._dot is not None:
            self._dataReceived(data)
        else:
            self._bdatReceived(data)

    def _canOverlap(self, line: bytes) -> bool:
        """
        Whether C{line} may be processed while earlier replies wait: only a
        RCPT behind other RCPTs, within the limits.
        """
        if line[:4].upper() != b"RCPT" or line[4:5] not in (b" ", b""):
            return False
        tx = self._transaction
        if tx is None or tx.message is not None:
            return False
        replies, limits = self.replies, self.settings.limits
        if replies.errors >= limits.softErrorLimit:
            return False
        pending = len(replies.pending)
        if pending >= limits.maxPendingChecks:
            return False
        if len(tx.recipients) + pending >= limits.maxRecipients:
            return False
        return replies.allOverlappable()

    def pauseProducing(self) -> None:
        """
        The transport's write buffer is full: stop reading commands.
        """
        self._input.pause("write")

    def resumeProducing(self) -> None:
        """
        The transport's write buffer has drained: read on.
        """
        self._input.unpause("write")

    def stopProducing(self) -> None:
        """
        The transport is going away; L{connectionLost} cleans up.
        """
        self._input.pause("stopped")

    # --- output ---------------------------------------------------------------

    def sendAnswer(self, answer: Answer) -> None:
        """
        L{PipelineOwner.sendAnswer}: write one reply now.
        """
        if self.closed or self.transport is None:
            return
        enhanced = self._session.esmtp and not answer.plain
        if answer.more:
            lines = answer.reply.lines(enhanced=enhanced, more=answer.more)
            self.transport.write(b"".join(line + b"\r\n" for line in lines))
        else:
            self.transport.write(_wire(answer.reply, enhanced))
        self._activity()

    def repliesDrained(self) -> None:
        """
        L{PipelineOwner.repliesDrained}: every reply is out; run the
        command that was waiting, then read on.
        """
        if self._draining:
            return
        line, self._stalled = self._stalled, None
        if line is not None:
            # The command answers through the pipeline, which must not call
            # back here and read on before the command has finished (a refused
            # DATA checks what was pipelined behind it).
            self._draining = True
            try:
                self._dispatch(line)
            finally:
                self._draining = False
            if self.replies.pending or self.closing:
                return
        self._input.unpause("stall")

    # --- policies ---------------------------------------------------------------

    def _refusalFor(self, verdict: Verdict) -> Answer | None:
        """
        The answer for a refusing verdict, or C{None} if it accepts.
        """
        reply = verdict.reply
        if reply is None or reply.isPositive:
            if verdict.disconnect:
                return Answer(self.closingReply(R.CLOSING), True)
            return None
        return Answer(reply, verdict.disconnect)

    def _stageAnswer(self, verdict: Verdict, accept: Answer) -> Answer:
        return self._refusalFor(verdict) or accept

    def decideHeader(self, envelope: Envelope, header: bytes, whole: bool) -> Deferred[Answer | bytes]:
        """
        L{SinkOwner.decideHeader}: ask the chain's C{checkMessage}; on
        acceptance, the fields to add are the policies' and, on the
        submission listeners and for a whole header section, C{Date:} and
        C{Message-ID:} where missing.
        """
        settings = self.settings

        def decided(verdict: Verdict) -> Answer | bytes:
            refusal = self._refusalFor(verdict)
            if refusal is not None:
                return refusal
            added = policyHeaders(verdict.headers) if verdict.headers else b""
            if whole and settings.submission:
                added += submissionHeaders(settings.hostname, header, settings.clock.seconds())
            return added

        if not settings.chain.policies:
            # Nothing to ask: no Deferred callbacks on the hot path.
            return succeed(decided(_NO_VERDICT))
        session = self._session
        return settings.chain.ask(
            Stage.HEADERS, lambda p: p.checkMessage(session, envelope, header), self.peer
        ).addCallback(decided)

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

    # --- commands -------------------------------------------------------------------

    def _dispatch(self, line: bytes) -> None:
        if self._sasl is not None:
            self._saslResponse(line)
            return
        if b"\r" in line or b"\n" in line:
            self.replies.respond(R.BARE_LINE_ENDING_COMMAND)
            return
        parsed = parseCommandLine(line)
        if isinstance(parsed, SMTPReply):
            if _HTTP_REQUEST.match(line):
                self._notSMTP()
            else:
                self.replies.respond(parsed)
            return
        verb, argument = parsed.verb, parsed.argument
        handler = self.commands.get(verb)
        if handler is None and (verb in FORBIDDEN or _HTTP_REQUEST.match(line)):
            self._notSMTP()
            return
        if self._refused:
            if verb == "QUIT":
                self.replies.respond(Answer(R.GOODBYE, True))
            else:
                self.replies.respond(Answer(R.BAD_SEQUENCE, plain=True))
            return
        if verb not in ("MAIL", "RCPT") and len(line) + 2 > self.settings.limits.maxLineLength:
            self.replies.respond(R.LINE_TOO_LONG)
            return
        if handler is None:
            self.replies.respond(R.NOT_IMPLEMENTED if verb in NOT_IMPLEMENTED else R.COMMAND_UNRECOGNIZED)
            return
        handler(self, argument)

    def _notSMTP(self) -> None:
        """
        An HTTP (or other foreign) request: one reply, logged once, and
        close; nothing after it is read.
        """
        self.log.warn(
            "non-SMTP request from {peer} on {listener}, closing", peer=self.peer, listener=self.settings.kind
        )
        self.replies.respond(Answer(self.closingReply(R.NOT_AN_SMTP_CLIENT), True))

    def extensions(self) -> list[str]:
        """
        The EHLO keywords offered now.  Extensions add theirs here.
        """
        keywords = [
            "PIPELINING",
            f"SIZE {self.settings.limits.maxMessageSize}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
            "DSN",
        ]
        if self._tlsAvailable():
            keywords.append("STARTTLS")
        if self.settings.auth is not None and self._session.tls:
            offered = self.settings.auth.offered(channelBindingFor(self.transport))
            keywords.append("AUTH " + " ".join(offered))
        if self.settings.etrn is not None:
            keywords.append("ETRN")
        return keywords

    def _tlsAvailable(self) -> bool:
        return (
            self.settings.tlsOptions is not None
            and not self._session.tls
            and ITLSTransport.providedBy(self.transport)
        )

    def _helo(self, argument: str, esmtp: bool) -> None:
        name = parseDomainArgument(argument)
        if isinstance(name, SMTPReply):
            self.replies.respond(Answer(name, plain=True))
            return
        session = replace(self._session, helo=name, esmtp=esmtp)
        if esmtp:
            accept = Answer(
                SMTPReply(250, "", self.settings.hostname), more=tuple(self.extensions()), plain=True
            )
        else:
            accept = Answer(SMTPReply(250, "", self.settings.hostname), plain=True)

        def decided(verdict: Verdict) -> Answer:
            answer = self._stageAnswer(verdict, accept)
            return answer if answer is accept else replace(answer, plain=True)

        def then(answer: Answer) -> None:
            if answer.reply.isPositive:
                # RFC 5321 4.1.4: EHLO/HELO also ends any transaction.
                self._resetTransaction()
                self._session = session

        verdict = self.settings.chain.ask(Stage.HELO, lambda p: p.checkHelo(session, name), self.peer)
        self.replies.respondLater(verdict.addCallback(decided), then)

    def smtp_EHLO(self, argument: str) -> None:
        self._helo(argument, esmtp=True)

    def smtp_HELO(self, argument: str) -> None:
        self._helo(argument, esmtp=False)

    def smtp_MAIL(self, argument: str) -> None:
        if self._session.helo is None:
            self.replies.respond(R.NEED_HELO)
            return
        if self._transaction is not None:
            self.replies.respond(R.NESTED_MAIL)
            return
        if self.settings.submission and self._session.authenticated is None:
            self.replies.respond(R.NEED_AUTH)
            return
        extra = self.mailParameters
        if self.settings.auth is not None:
            extra = extra | {"AUTH"}
        parsed = parseMailFrom(argument, esmtp=self._session.esmtp, extraParameters=extra)
        if isinstance(parsed, SMTPReply):
            self.replies.respond(parsed)
            return
        if self.settings.auth is not None and "AUTH" in parsed.parameters:
            # RFC 4954 5: the identity a relay vouches for.  Checked for
            # syntax, then ignored: this server does not pass it on.
            value = parsed.parameters["AUTH"]
            try:
                if value is None or (value != "<>" and not decodeXtext(value)):
                    raise ValueError("empty")
            except ValueError:
                self.replies.respond(A.AUTH_PARAMETER_SYNTAX)
                return
        avatar = self._avatar
        if avatar is not None and not avatar.maySend(parsed.sender):
            self.log.info(
                "refused MAIL from {peer}: {sender} not allowed for {user}",
                peer=self.peer,
                sender="" if parsed.sender is None else str(parsed.sender),
                user=self._session.authenticated,
                code=A.SENDER_NOT_OWNED.code,
                enhanced=A.SENDER_NOT_OWNED.enhanced,
            )
            self.replies.respond(A.SENDER_NOT_OWNED)
            return
        if parsed.size is not None and parsed.size > self.settings.limits.maxMessageSize:
            self.replies.respond(R.MESSAGE_TOO_BIG)
            return
        session = self._session
        mail: MailFrom = parsed

        def then(answer: Answer) -> None:
            if answer.reply.isPositive:
                self._transaction = _Transaction(mail)
            else:
                self._logRefusal("MAIL", answer.reply, mail)

        d = self.settings.chain.ask(
            Stage.MAIL, lambda p: p.checkSender(session, mail.sender, mail.parameters), self.peer
        ).addCallback(self._stageAnswer, Answer(R.MAIL_OK))
        self.replies.respondLater(d, then)

    def smtp_RCPT(self, argument: str) -> None:
        tx = self._transaction
        if tx is None:
            self.replies.respond(R.NEED_MAIL if self._session.helo is not None else R.NEED_HELO)
            return
        if tx.message is not None:
            self.replies.respond(R.BAD_SEQUENCE)
            return
        parsed = parseRcptTo(
            argument, self.settings.hostname, esmtp=self._session.esmtp, smtputf8=tx.mail.smtputf8
        )
        tx.attempted += 1
        if isinstance(parsed, SMTPReply):
            self.replies.respond(parsed)
            return
        if len(tx.recipients) >= self.settings.limits.maxRecipients:
            self.replies.respond(R.TOO_MANY_RECIPIENTS)
            return
        recipient = Recipient(parsed.address, parsed.notify, parsed.orcpt)

        def then(answer: Answer) -> None:
            if self._transaction is not tx:
                return
            if answer.reply.isPositive:
                if all(r.address != recipient.address for r in tx.recipients):
                    tx.recipients.append(recipient)
            else:
                self._logRefusal("RCPT", answer.reply, tx.mail, recipient)

        d = self._checkRecipient(parsed, recipient, tx)
        self.replies.respondLater(d, then, overlappable=True)

    def _checkRecipient(self, parsed: RcptTo, recipient: Recipient, tx: _Transaction) -> Deferred[Answer]:
        """
        Route the recipient, then ask the policies.  The bare
        C{<postmaster>} of RFC 5321 4.5.1 is always accepted, and so is
        postmaster at a local domain whatever the policies say.
        """
        accept = Answer(R.RCPT_OK)
        if parsed.postmaster:
            return succeed(accept)
        session = self._session
        envelope = self._envelope(tx)
        routed: Deferred[Any] = maybeDeferred(self.settings.router.route, recipient.address, session)
        if not routed.called:
            routed.addTimeout(self.settings.limits.policyTimeout, self.settings.clock)

        def afterRoute(route: Any) -> Deferred[Answer] | Answer:
            if route.kind is RouteKind.REFUSE:
                reply = route.reply
                if reply is None or reply.isPositive:
                    reply = SMTPReply(550, "5.1.1", "Recipient address rejected")
                return Answer(reply)
            if route.kind is RouteKind.LOCAL and recipient.address.localpart.lower() == "postmaster":
                return accept
            return self.settings.chain.ask(
                Stage.RCPT, lambda p: p.checkRecipient(session, envelope, recipient), self.peer
            ).addCallback(self._stageAnswer, accept)

        def failed(f: Failure) -> Answer:
            return Answer(self.settings.chain.failureReply(f, "route", self.peer))

        return routed.addCallbacks(afterRoute, failed)

    def _envelope(self, tx: _Transaction) -> Envelope:
        mail = tx.mail
        session = self._session
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
            arrival=self.settings.clock.seconds(),
        )

    def _startMessage(self, tx: _Transaction) -> SMTPReply | None:
        """
        Open the message in the queue; C{None} when that worked.
        """
        envelope = self._envelope(tx)
        try:
            incoming = self.settings.queue.receive(envelope)
            queueID = str(incoming.queueID)
        except Exception:
            self.log.failure("queue refused a new message from {peer}", peer=self.peer)
            return R.LOCAL_ERROR
        settings = self.settings
        auth = settings.auth
        received = receivedHeader(
            settings.hostname,
            self._session,
            queueID,
            envelope,
            settings.clock.seconds(),
            identity=auth is not None and auth.receivedIdentity,
        )
        tx.message = MessageSink(self, incoming, envelope, received, settings.limits)
        return None

    def _refuseData(self, reply: SMTPReply) -> None:
        """
        Refuse DATA.  Octets already pipelined behind it would be read as
        commands, but they are probably the body (RFC 2920 3.1 forbids
        sending them), so that is a synchronization error.
        """
        pipelined = self._input.hasUnread()
        self.replies.respond(reply)
        if pipelined:
            self.log.warn("octets pipelined after refused DATA from {peer}", peer=self.peer)
            self.replies.respond(Answer(R.SYNCHRONIZATION, True))

    def smtp_DATA(self, argument: str) -> None:
        tx = self._transaction
        if argument:
            self._refuseData(R.NO_PARAMETERS)
            return
        if tx is None:
            self._refuseData(R.NEED_MAIL if self._session.helo is not None else R.NEED_HELO)
            return
        if tx.bdat:
            self._refuseData(R.DATA_AFTER_BDAT)
            return
        if not tx.recipients:
            self._refuseData(R.NO_VALID_RECIPIENTS if tx.attempted else R.NEED_RCPT)
            return
        problem = self._startMessage(tx)
        if problem is not None:
            self._refuseData(problem)
            return

        def then(answer: Answer) -> None:
            self._dot = DotReader(self.settings.limits.maxTextLine)
            self._input.raw = True

        self.replies.respond(R.START_DATA, then)

    def _dataReceived(self, data: bytes) -> None:
        dot, tx = self._dot, self._transaction
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

        def logged(answer: Answer) -> Answer:
            # Logged as soon as known, also if the client has gone meanwhile.
            reply = answer.reply
            if reply.code == 250:
                self._accepted += 1
                self.log.info(
                    "accepted {queueID} from {sender} for {count} recipients ({size} octets) from {peer}",
                    queueID=message.queueID,
                    sender="" if tx.mail.sender is None else str(tx.mail.sender),
                    count=len(message.envelope.recipients),
                    size=message.size,
                    peer=self.peer,
                )
            else:
                self._logRefusal("DATA", reply, tx.mail, queueID=message.queueID)
            return answer

        def then(answer: Answer) -> None:
            if self._transaction is tx:
                self._transaction = None

        self.replies.respondLater(d.addCallback(logged), then, cancellable=False)

    def smtp_BDAT(self, argument: str) -> None:
        parsed = parseBdat(argument)
        if isinstance(parsed, SMTPReply):
            # The chunk's length is unknown, so its octets cannot be skipped.
            self.replies.respond(Answer(parsed, True))
            return
        tx = self._transaction
        error: SMTPReply | None = None
        if tx is None:
            error = R.NEED_MAIL if self._session.helo is not None else R.NEED_HELO
        elif not tx.recipients:
            error = R.NO_VALID_RECIPIENTS if tx.attempted else R.NEED_RCPT
        elif tx.message is None:
            error = self._startMessage(tx)
            if error is None:
                tx.bdat = True
                tx.chunks = ChunkReader(self.settings.limits.maxTextLine)
        self._chunk = _Chunk(parsed.size, parsed.last, parsed.size, error)
        if parsed.size:
            self._input.raw = True
        else:
            self._endChunk()

    def _bdatReceived(self, data: bytes) -> None:
        chunk, tx = self._chunk, self._transaction
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
        tx = self._transaction
        if chunk.error is not None:
            self.replies.respond(chunk.error)
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
            if not answer.reply.isPositive and self._transaction is tx:
                # RFC 3030 2: a refused chunk fails the transaction.
                self._transaction = None
                self._logRefusal("BDAT", answer.reply, tx.mail, queueID=message.queueID)

        d = message.check(reader.bareLineEnding, reader.lineTooLong).addCallback(checked)
        self.replies.respondLater(d, then, cancellable=False)

    def smtp_RSET(self, argument: str) -> None:
        if argument:
            self.replies.respond(R.NO_PARAMETERS)
            return
        self._resetTransaction()
        self.replies.respond(R.OK)

    def _resetTransaction(self) -> None:
        tx, self._transaction = self._transaction, None
        if tx is not None and tx.message is not None:
            tx.message.abort()

    def smtp_NOOP(self, argument: str) -> None:
        self.replies.respond(R.OK)

    def smtp_HELP(self, argument: str) -> None:
        # The commands this session may use now, as EHLO would say.
        self.replies.respond(R.helpReply(self.extensions()))

    def smtp_ETRN(self, argument: str) -> None:
        """
        RFC 1985: start delivering the queue for a node (see the module
        docstring).
        """
        if self.settings.etrn is None:
            self.replies.respond(R.NOT_IMPLEMENTED)
            return
        if self._session.helo is None:
            self.replies.respond(R.NEED_HELO)
            return
        if self._transaction is not None:
            self.replies.respond(R.ETRN_IN_TRANSACTION)
            return
        avatar = self._avatar
        userDomains = tuple(avatar.etrnDomains) if avatar is not None else None
        d = self.settings.etrn.request(argument, self._session.peerHost, userDomains)

        def answered(reply: SMTPReply) -> Answer:
            self.log.info(
                "ETRN from {peer}: {code} {enhanced}",
                peer=self.peer,
                code=reply.code,
                enhanced=reply.enhanced,
            )
            return Answer(reply)

        self.replies.respondLater(d.addCallback(answered), cancellable=False)

    def smtp_VRFY(self, argument: str) -> None:
        if not argument:
            self.replies.respond(SMTPReply(501, "5.5.4", "Syntax: VRFY address"))
            return
        self.replies.respond(R.VRFY)

    def smtp_QUIT(self, argument: str) -> None:
        if argument:
            self.replies.respond(R.NO_PARAMETERS)
            return
        self.replies.respond(Answer(R.GOODBYE, True))

    def smtp_STARTTLS(self, argument: str) -> None:
        if argument:
            self.replies.respond(R.NO_PARAMETERS)
            return
        if self._session.tls:
            self.replies.respond(R.TLS_ACTIVE)
            return
        tls = ITLSTransport(self.transport, None)
        if self.settings.tlsOptions is None or tls is None:
            self.replies.respond(R.TLS_NOT_AVAILABLE)
            return
        if self._session.helo is None:
            self.replies.respond(R.NEED_HELO)
            return
        if self._transaction is not None:
            self.replies.respond(R.STARTTLS_IN_TRANSACTION)
            return

        def then(answer: Answer) -> None:
            discarded = self.clearLineBuffer()
            if discarded:
                self.log.warn(
                    "discarded {count} octets pipelined after STARTTLS from {peer}",
                    count=len(discarded),
                    peer=self.peer,
                )
            self._session = replace(
                self._session,
                helo=None,
                esmtp=False,
                tls=True,
                authenticated=None,
                relayClient=False,
            )
            self._endLogin()
            self._resetTransaction()
            tls.startTLS(cast(Any, self.settings.tlsOptions))
            self.log.info("TLS started for {peer}", peer=self.peer)

        self.replies.respond(R.TLS_READY, then)

    # --- AUTH (RFC 4954) ------------------------------------------------------------

    def smtp_AUTH(self, argument: str) -> None:
        """
        C{AUTH mechanism [initial-response]}.  The sequence is checked here
        (503); the exchange (L{SASLExchange}) checks the rest in the order
        of RFC 4954 and RFC 3207: syntax (501), mechanism (504), encryption
        (538), then the brute-force lockout (454) once the user is known.
        """
        auth = self.settings.auth
        session = self._session
        if auth is None:
            self.replies.respond(R.NOT_IMPLEMENTED)
            return
        if session.helo is None:
            self.replies.respond(R.NEED_HELO)
            return
        if not session.esmtp:
            self.replies.respond(A.AUTH_NEED_EHLO)
            return
        if session.authenticated is not None:
            self.replies.respond(A.AUTH_ALREADY)
            return
        if self._transaction is not None:
            self.replies.respond(A.AUTH_IN_TRANSACTION)
            return
        exchange = SASLExchange(
            auth, self.settings.clock, session, self.peer, channelBindingFor(self.transport)
        )
        self._saslStep(exchange, exchange.begin(argument))

    def _saslStep(self, exchange: SASLExchange, step: SMTPReply | Deferred[AuthOutcome]) -> None:
        """
        Send the exchange's next reply; while it waits for a response, the
        next input line is that response.
        """
        if isinstance(step, SMTPReply):
            self._setSASL(exchange if exchange.waiting else None)
            self.replies.respond(Answer(step, plain=step.code == 334))
        else:
            self._setSASL(None)
            self.replies.respondLater(step.addCallback(self._authenticated, exchange))

    def _setSASL(self, exchange: SASLExchange | None) -> None:
        """
        Inside a SASL exchange input lines are responses, up to 12288
        octets (RFC 4954 4).
        """
        self._sasl = exchange
        self._input.lineLimit = (
            A.SASL_LINE_LIMIT if exchange is not None else self.settings.limits.maxCommandLine
        )

    def _saslResponse(self, line: bytes) -> None:
        """
        One client response inside a SASL exchange.
        """
        exchange = self._sasl
        assert exchange is not None
        self._setSASL(None)
        if b" " in line and (
            _HTTP_REQUEST.match(line) or line.partition(b" ")[0].upper().decode("latin-1") in FORBIDDEN
        ):
            # Base64 has no spaces: this is a request of another protocol.
            self._notSMTP()
            return
        self._saslStep(exchange, exchange.respond(line))

    def _authenticated(self, outcome: AuthOutcome, exchange: SASLExchange) -> Answer:
        """
        Apply a successful exchange to the session; or, when the exchange
        still waits (a challenge that needed a lookup), take its response.
        """
        if exchange.waiting:
            self._setSASL(exchange)
            return Answer(outcome.reply, plain=True)
        logout = outcome.logout
        if logout is not None:
            if self.closed:
                logout()
            else:
                self._endLogin()
                self._avatar, self._logout = outcome.avatar, logout
                self._session = replace(self._session, authenticated=outcome.identity, relayClient=True)
        return Answer(outcome.reply)

    def _endLogin(self) -> None:
        """
        Forget the authenticated user (the connection ends, or TLS starts).
        """
        logout, self._logout = self._logout, None
        self._avatar = None
        if logout is not None:
            try:
                logout()
            except Exception:
                self.log.failure("avatar logout failed for {peer}", peer=self.peer)

    # --- logging ------------------------------------------------------------------------

    def _logRefusal(
        self,
        stage: str,
        reply: SMTPReply,
        mail: MailFrom,
        recipient: Recipient | None = None,
        queueID: str = "",
    ) -> None:
        self.log.info(
            "refused {stage} from {peer}: {code} {enhanced} "
            "sender=<{sender}> recipient=<{recipient}> queueID={queueID}",
            stage=stage,
            peer=self.peer,
            code=reply.code,
            enhanced=reply.enhanced,
            sender="" if mail.sender is None else str(mail.sender),
            recipient="" if recipient is None else str(recipient.address),
            queueID=queueID,
        )


SMTPServerProtocol.commands = {
    "EHLO": SMTPServerProtocol.smtp_EHLO,
    "HELO": SMTPServerProtocol.smtp_HELO,
    "MAIL": SMTPServerProtocol.smtp_MAIL,
    "RCPT": SMTPServerProtocol.smtp_RCPT,
    "DATA": SMTPServerProtocol.smtp_DATA,
    "BDAT": SMTPServerProtocol.smtp_BDAT,
    "RSET": SMTPServerProtocol.smtp_RSET,
    "NOOP": SMTPServerProtocol.smtp_NOOP,
    "HELP": SMTPServerProtocol.smtp_HELP,
    "VRFY": SMTPServerProtocol.smtp_VRFY,
    "QUIT": SMTPServerProtocol.smtp_QUIT,
    "STARTTLS": SMTPServerProtocol.smtp_STARTTLS,
    "AUTH": SMTPServerProtocol.smtp_AUTH,
    "ETRN": SMTPServerProtocol.smtp_ETRN,
}
