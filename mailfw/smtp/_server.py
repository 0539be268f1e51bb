"""
The SMTP server protocol: RFC 5321 with PIPELINING, SIZE, 8BITMIME,
ENHANCEDSTATUSCODES, SMTPUTF8, STARTTLS, CHUNKING and DSN.

The protocol is written fresh (STYLE.md section 7).  It keeps the
connection's lifecycle (L{ConnectionState}), dispatches commands, answers
HELO/EHLO, STARTTLS, ETRN, QUIT, RSET, NOOP, HELP and VRFY itself, and wires
the session's parts, each in its own module and each talking back through
a small explicit interface: the input framer (L{mailfw.smtp._framing}), the
reply pipeline with the error limits (L{mailfw.smtp._pipeline}), the policy
chain (L{mailfw.policy._chain}), AUTH (L{mailfw.smtp._login} over
L{mailfw.smtp._sasl}) and the mail transaction (L{mailfw.smtp._transaction},
which owns the message sink, L{mailfw.smtp._sink}).  What every session of
a listener shares is one L{SessionSettings}.  Three rules that
C{twisted.mail.smtp} does not keep:

  - B{Replies strictly in command order.}  Every reply takes a slot in the
    L{ReplyPipeline}.  Pipelined RCPT commands are checked concurrently;
    any other command that arrives while a slot waits is held, and input
    is paused, until all earlier replies have been sent, because its
    meaning depends on them.
  - B{The body is never read as commands} (L{mailfw.smtp._transaction}).
  - B{Nothing sent before STARTTLS survives it.}  The input buffer is
    dropped and the session reset when TLS starts (RFC 3207 4.2).

The submission listeners require AUTH before MAIL.  ETRN (RFC 1985) is
answered by L{mailfw.smtp._etrn} where the factory gives an
L{ETRNHandler}.  TURN is never offered (502).
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, ClassVar, cast
from typing import Protocol as TypingProtocol

from OpenSSL import SSL
from twisted.internet.interfaces import IDelayedCall, IProtocol, ISSLTransport, ITLSTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailfw.auth._scram import channelBindingFor
from mailfw.envelope import Session
from mailfw.policy._chain import Stage
from mailfw.reply import SMTPReply
from mailfw.smtp import _replies as R
from mailfw.smtp._etrn import etrnCommand
from mailfw.smtp._framing import InputFramer
from mailfw.smtp._limits import SMTPLimits
from mailfw.smtp._login import Login
from mailfw.smtp._parser import parseCommandLine, parseDomainArgument
from mailfw.smtp._pipeline import ReplyPipeline
from mailfw.smtp._replies import Answer
from mailfw.smtp._settings import SessionSettings
from mailfw.smtp._state import ConnectionState, Phase
from mailfw.smtp._transaction import MailTransactions
from mailfw.verdict import AuthResult, Verdict

# Session.id: unique among this process's connections.
_sessionIDs = itertools.count(1)

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

# Seconds a closing connection may wait for a peer that does not read (a
# full write buffer) before it is aborted.
CLOSE_GRACE = 10.0
# Seconds between looks at a session past its total time limit whose own
# reply is still pending (a message being committed): it ends once the
# reply is out, so an accepted message is never cut off from its 250.
SESSION_END_RETRY = 1.0

# What a stopping server says once a session has no transaction under way.
SHUTTING_DOWN = SMTPReply(421, "4.3.2", "Service shutting down, closing transmission channel")


class SessionTracker(TypingProtocol):
    """
    Counts a listener's open sessions (its L{mailfw.smtp.SMTPFactory}).
    """

    def sessionOpened(self, protocol: SMTPServerProtocol) -> None: ...

    def sessionClosed(self, protocol: SMTPServerProtocol) -> None: ...


@functools.lru_cache(maxsize=512)
def _wire(reply: SMTPReply, enhanced: bool) -> bytes:
    """
    A one-line reply as sent: the same few replies go out all day.
    """
    return reply.lines(enhanced=enhanced)[0] + b"\r\n"


class SMTPServerProtocol(Protocol):
    """
    One SMTP, submission or submissions session.

    @cvar commands: the dispatch table, verb to handler.  Extensions such as
        ETRN add an entry here (a subclass may extend it with
        C{{**SMTPServerProtocol.commands, "ETRN": ...}}); a table entry wins
        over L{NOT_IMPLEMENTED}.  Handlers answer with C{replies.respond} or
        C{replies.respondLater}, which keep replies in order.
    @cvar mailParameters: MAIL parameters an extension checks itself.
    @ivar settings: the listener's L{SessionSettings}, shared by all its
        connections.
    @ivar state: the connection's L{ConnectionState}.
    @ivar replies: the L{ReplyPipeline} that orders this session's replies.
    @ivar transactions: the L{MailTransactions} (MAIL, RCPT, DATA, BDAT).
    @ivar peer: the client as C{"host:port"} text, for log events.
    @ivar clientKey: the client as its listener's per-client limit counts it.
    @ivar session: what the server knows about the client now (read only).
    @ivar limits: the limits this session is held to: the listener's, or,
        for a session that began under stress, L{SMTPLimits.underStress}
        (a shorter idle timeout and hard error limit).
    """

    log = Logger()
    commands: ClassVar[Mapping[str, Callable[[SMTPServerProtocol, str], None]]]
    mailParameters: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        settings: SessionSettings,
        tracker: SessionTracker | None = None,
        limits: SMTPLimits | None = None,
    ) -> None:
        self.settings = settings
        self.limits = settings.limits if limits is None else limits
        self._tracker = tracker
        self.clientKey = ""
        self.peer = ""
        self.session = Session(listener=settings.kind, peerHost="")
        self.state = ConnectionState()
        self._input = InputFramer(self, settings.limits.maxCommandLine)
        self.replies = ReplyPipeline(self, self.limits, settings.clock)
        # Built at AUTH: most sessions never authenticate.
        self._login: Login | None = None
        self._idle: IDelayedCall | None = None
        self._abortLater: IDelayedCall | None = None
        self._connectedAt = 0.0
        self._lastActivity = 0.0
        self._handedTo: IProtocol | None = None
        self._connectResults: tuple[AuthResult, ...] = ()
        self._heloResults: tuple[AuthResult, ...] = ()
        self._stopping = False

    @property
    def avatar(self) -> Any:
        """The L{mailfw.interfaces.IMailUser} after a successful AUTH, else C{None}."""
        return None if self._login is None else self._login.avatar

    @functools.cached_property
    def transactions(self) -> MailTransactions:
        """
        Built at first use: an idle connection (10,000 of them are a
        benchmark) does without.
        """
        return MailTransactions(self, self.settings, self.replies, self._input)

    # --- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        address = transport.getPeer()
        host = str(getattr(address, "host", ""))
        port = getattr(address, "port", 0)
        port = port if isinstance(port, int) else 0
        self.peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        tls = self.settings.kind == "submissions" or ISSLTransport.providedBy(transport)
        self.session = Session(
            listener=self.settings.kind,
            peerHost=host,
            peerPort=port,
            tls=tls,
            id=f"{next(_sessionIDs):x}",
            stressed=self.limits is not self.settings.limits,
        )
        # No format: a structured event for the operations observers (the
        # status page, metrics), which text logs skip (see docs/logging.rst).
        self.log.info(event="connection.opened", peer=self.peer, listener=self.settings.kind, tls=tls)
        # The connection is logged once, when it ends (with what happened):
        # twistd writes every event, debug ones too, and a line per event is
        # a measurable share of the cost of a message.
        self._connectedAt = self._lastActivity = self.settings.clock.seconds()
        if self._tracker is not None:
            self._tracker.sessionOpened(self)
        # As a streaming producer the framer stops reading while the
        # transport's write buffer is full: a client that pipelines without
        # reading the replies cannot make the server buffer them all.
        transport.registerProducer(self._input, True)  # type: ignore[attr-defined]
        self._input.attach(transport)
        # One timer per session for the idle timeout and the session time
        # limit (a timer is a few hundred octets, and 10,000 idle sessions
        # are a benchmark).
        self._idle = self.settings.clock.callLater(
            self._capped(self.limits.idleTimeout, self._connectedAt), self._idleTimedOut
        )
        session = self.session
        verdict = self.settings.chain.ask(Stage.CONNECT, lambda p: p.checkConnection(session), self.peer)
        self.replies.respondLater(verdict.addCallback(self._greeting), cancellable=True)

    def _greeting(self, verdict: Verdict) -> Answer:
        refusal = self.refusalFor(verdict)
        self._connectResults = verdict.results
        if refusal is None:
            self.state.greeted(refused=False)
            return Answer(SMTPReply(220, "", f"{self.settings.hostname} ESMTP"), plain=True)
        reply = refusal.reply
        code, enhanced = reply.code, reply.enhanced
        self.log.info(
            "connection from {peer} refused: {code} {enhanced}",
            event="connection.refused",
            peer=self.peer,
            listener=self.settings.kind,
            code=code,
            enhanced=enhanced,
        )
        if reply.isPermanent and not refusal.close:
            # RFC 5321 3.1: 554 instead of the greeting, then only QUIT.
            self.state.greeted(refused=True)
            return Answer(SMTPReply(554, "", f"{self.settings.hostname} {reply.text}"), plain=True)
        return Answer(SMTPReply(421, "", f"{self.settings.hostname} {reply.text}"), True, plain=True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.state.lost()
        for call in (self._idle, self._abortLater):
            if call is not None and call.active():
                call.cancel()
        self._idle = self._abortLater = None
        self.replies.stop()
        self.transactions.cancel()
        authFailures = 0
        if self._login is not None:
            self._login.end()
            authFailures = self._login.failures
        if self.settings.chain and self.session.id:
            errors = self.replies.errors
            if errors or authFailures:
                # For a policy that counts a client's errors across its
                # sessions (the limits policy).
                self.session = replace(self.session, errors=errors, authFailures=authFailures)
            self.settings.chain.sessionEnded(self.session)
        self.log.info(
            "connection from {peer} on {listener} closed after {duration:.1f}s:"
            " {accepted} messages accepted, {errors} errors",
            event="connection.closed",
            peer=self.peer,
            listener=self.settings.kind,
            helo=self.session.helo or "",
            tls=self.session.tls,
            duration=self.settings.clock.seconds() - self._connectedAt,
            accepted=self.transactions.accepted,
            errors=self.replies.errors,
        )
        if self._tracker is not None:
            tracker, self._tracker = self._tracker, None
            tracker.sessionClosed(self)
        if self._handedTo is not None:
            self._handedTo.connectionLost(reason)

    def hangUp(self) -> None:
        """
        Hang up after the replies written so far.
        """
        if not self.state.hangUp():
            return
        self._input.stop()
        self.transactions.reset()
        if self.transport is not None:
            self._closeAtOnce()
            # A peer that never reads keeps our write buffer full: it may
            # not hold the slot either.
            self._abortLater = self.settings.clock.callLater(CLOSE_GRACE, self._abortClose)

    def stopWhenIdle(self) -> None:
        """
        The server is stopping: say 421 and hang up as soon as no mail
        transaction is under way and every reply is out (at once if that
        is now), so that a message being sent is still accepted.  A
        session handed over (ODMR) is left to the server's grace period.
        """
        self._stopping = True
        self._closeIfStopping()

    def _closeIfStopping(self) -> bool:
        if (
            not self._stopping
            or self.state.closing
            or self._handedTo is not None
            or self.transactions.active
            or self.replies.pending
        ):
            return False
        self.replies.respond(Answer(self.closingReply(SHUTTING_DOWN), True))
        return True

    def _closeAtOnce(self) -> None:
        """
        Close the connection once what is written is sent, without waiting
        for the client.  Twisted's TLS close sends our close_notify only
        when no producer is registered, and then closes the TCP connection
        only after the client's close_notify: a client that does not answer
        it (many do not) would hold the slot until L{CLOSE_GRACE}.  The
        side that closes need not wait for that answer (RFC 8446 6.1, RFC
        5246 7.2.1), so the TLS connection is told it has had it.
        """
        transport = self.transport
        assert transport is not None
        handle = getattr(transport, "getHandle", None)
        connection = handle() if handle is not None else None
        if isinstance(connection, SSL.Connection):
            connection.set_shutdown(connection.get_shutdown() | SSL.RECEIVED_SHUTDOWN)
        if self._handedTo is None:
            transport.unregisterProducer()  # type: ignore[attr-defined]
        transport.loseConnection()

    def _abortClose(self) -> None:
        self._abortLater = None
        if not self.state.closed and self.transport is not None:
            self.log.info("{peer} did not close; aborting", peer=self.peer)
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _capped(self, delay: float, now: float) -> float:
        """
        C{delay}, or less if the session time limit comes first.
        """
        limit = self.limits.maxSessionTime
        if not limit:
            return delay
        return max(0.0, min(delay, self._connectedAt + limit - now))

    def _sessionTimedOut(self) -> None:
        """
        The session has lasted C{maxSessionTime}: 421 and close, also for a
        client that is never idle long enough for the idle timeout (one
        byte every few seconds, slowloris).
        """
        if self.replies.pending:
            # Our own answer is under way (the queue commits a message):
            # let it out first.
            self._idle = self.settings.clock.callLater(SESSION_END_RETRY, self._idleTimedOut)
            return
        self.log.info("session time limit for {peer}", peer=self.peer)
        self.sendAnswer(Answer(self.closingReply(R.SESSION_TOO_LONG)))
        self.hangUp()

    def closingReply(self, reply: SMTPReply) -> SMTPReply:
        """
        RFC 5321 4.2: a 421 names the server.
        """
        return replace(reply, text=f"{self.settings.hostname} {reply.text}")

    def _idleTimedOut(self) -> None:
        self._idle = None
        if self.state.closing:
            return
        clock, limits = self.settings.clock, self.limits
        now, timeout = clock.seconds(), limits.idleTimeout
        if (
            limits.maxSessionTime
            and now - self._connectedAt >= limits.maxSessionTime
            and self._handedTo is None
        ):
            self._sessionTimedOut()
            return
        remaining = self._lastActivity + timeout - now
        if remaining > 0:
            # Activity since the timer was set: wait for the rest.  (The
            # timer is moved lazily, not reset on every line.)
            self._idle = clock.callLater(self._capped(remaining, now), self._idleTimedOut)
            return
        if self.replies.pending or "verdict" in self._input.reasons:
            # We are the slow party (a policy or the queue); not the client.
            self._idle = clock.callLater(self._capped(timeout, now), self._idleTimedOut)
            return
        self.log.info("idle timeout for {peer}", peer=self.peer)
        self.sendAnswer(Answer(self.closingReply(R.TIMEOUT)))
        if "write" in self._input.reasons and self.transport is not None:
            # The client does not read: waiting for the buffer to drain
            # would keep the connection forever.
            self.state.hangUp()
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        self.hangUp()

    # --- input (FramingOwner) ------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """
        Hand input to the L{InputFramer}, which cuts command lines or passes
        DATA and BDAT octets on.
        """
        if self._handedTo is not None:
            self._handedTo.dataReceived(data)
            return
        if self.state.closing:
            return
        if data:
            self._lastActivity = self.settings.clock.seconds()
        self._input.feed(data)

    def handOver(self, protocol: IProtocol) -> None:
        """
        Give the connection to C{protocol} (ODMR's reversed session, RFC
        2645): this session reads no more commands, stops its idle timer and
        its producing, and passes on what arrives from now on (and anything
        already received but not handled) and the connection's end.
        """
        self._handedTo = protocol
        self._input.stop()
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        transport = self.transport
        assert transport is not None
        transport.unregisterProducer()  # type: ignore[attr-defined]
        protocol.makeConnection(transport)
        # A line pipelined behind the command that handed over (held until
        # that command's reply was out) belongs to the new protocol too.
        held, self.state.stalled = self.state.stalled, None
        unread = self._input.clear()
        if held is not None:
            unread = held + b"\r\n" + unread
        if unread:
            protocol.dataReceived(unread)

    def overrun(self) -> None:
        """
        L{FramingOwner.overrun}: the client sends on and on without
        reading our replies.
        """
        self.log.warn("{peer} sends without reading replies, aborting", peer=self.peer)
        self.state.hangUp()
        self.transport.abortConnection()  # type: ignore[union-attr]

    def lineTooLong(self) -> None:
        """
        L{FramingOwner.lineTooLong}: 500, and a SASL exchange ends.
        """
        if self._login is not None and self._login.exchange is not None:
            self._login.lineTooLong()
        else:
            self.replies.respond(R.LINE_TOO_LONG)

    def lineReceived(self, line: bytes) -> None:
        if self.replies.pending and not self._canOverlap(line):
            # An earlier reply is pending and this command depends on it.
            self.state.stalled = line
            self._input.pause("stall")
            return
        self._dispatch(line)

    def rawDataReceived(self, data: bytes) -> None:
        self.transactions.rawDataReceived(data)

    def _canOverlap(self, line: bytes) -> bool:
        """
        Whether C{line} may be processed while earlier replies wait: only a
        RCPT behind other RCPTs, within the limits.
        """
        if line[:4].upper() != b"RCPT" or line[4:5] not in (b" ", b""):
            return False
        replies, limits = self.replies, self.limits
        pending = len(replies.pending)
        return (
            replies.errors < limits.softErrorLimit
            and pending < limits.maxPendingChecks
            and self.transactions.takesRecipients(pending)
            and replies.allOverlappable()
        )

    # --- output (PipelineOwner) -----------------------------------------------

    def sendAnswer(self, answer: Answer) -> None:
        """
        L{PipelineOwner.sendAnswer}: write one reply now.
        """
        if self.state.closed or self.transport is None:
            return
        enhanced = self.session.esmtp and not answer.plain
        if answer.more:
            lines = answer.reply.lines(enhanced=enhanced, more=answer.more)
            self.transport.write(b"".join(line + b"\r\n" for line in lines))
        else:
            self.transport.write(_wire(answer.reply, enhanced))
        self._lastActivity = self.settings.clock.seconds()

    def repliesDrained(self) -> None:
        """
        L{PipelineOwner.repliesDrained}: every reply is out; run the
        command that was waiting, then read on.
        """
        state = self.state
        if state.draining or self._handedTo is not None:
            return
        if self._stopping and self._closeIfStopping():
            return
        line, state.stalled = state.stalled, None
        if line is not None:
            # The command answers through the pipeline, which must not call
            # back here and read on before the command has finished (a refused
            # DATA checks what was pipelined behind it).
            state.draining = True
            try:
                self._dispatch(line)
            finally:
                state.draining = False
            if self.replies.pending or self.state.closing:
                return
        self._input.unpause("stall")

    # --- what the parts ask -------------------------------------------------------

    @property
    def sessionResults(self) -> tuple[AuthResult, ...]:
        """
        L{TransactionOwner.sessionResults}.
        """
        return self._connectResults + self._heloResults

    def refusalFor(self, verdict: Verdict) -> Answer | None:
        """
        L{TransactionOwner.refusalFor}: the answer for a refusing verdict,
        or C{None} if it accepts.
        """
        reply = verdict.reply
        if reply is None or reply.isPositive:
            if verdict.disconnect:
                return Answer(self.closingReply(R.CLOSING), True)
            return None
        return Answer(reply, verdict.disconnect)

    def loggedIn(self, identity: str) -> None:
        """
        L{LoginOwner.loggedIn}.
        """
        self.session = replace(self.session, authenticated=identity, relayClient=True)

    # --- commands -------------------------------------------------------------------

    def _dispatch(self, line: bytes) -> None:
        if self._login is not None and self._login.exchange is not None:
            if b" " in line and (
                _HTTP_REQUEST.match(line) or line.partition(b" ")[0].upper().decode("latin-1") in FORBIDDEN
            ):
                # Base64 has no spaces: this is a request of another protocol.
                self._login.abandon()
                self._notSMTP()
            else:
                self._login.respond(line)
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
        elif self.state.phase is Phase.REFUSED:
            if verb == "QUIT":
                self.replies.respond(Answer(R.GOODBYE, True))
            else:
                self.replies.respond(Answer(R.BAD_SEQUENCE, plain=True))
        elif verb not in ("MAIL", "RCPT") and len(line) + 2 > self.settings.limits.maxLineLength:
            self.replies.respond(R.LINE_TOO_LONG)
        elif handler is None:
            self.replies.respond(R.NOT_IMPLEMENTED if verb in NOT_IMPLEMENTED else R.COMMAND_UNRECOGNIZED)
        else:
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
        settings, limits = self.settings, self.settings.limits
        keywords = [
            "PIPELINING",
            f"SIZE {limits.maxMessageSize}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
            "DSN",
            # RFC 9422: the limits this session enforces.
            f"LIMITS RCPTMAX={limits.maxRecipients} MAILMAX={limits.maxTransactions}",
        ]
        if (
            settings.tlsOptions is not None
            and not self.session.tls
            and ITLSTransport.providedBy(self.transport)
        ):
            keywords.append("STARTTLS")
        if self.session.tls:
            # RFC 8689: only over TLS, on every listener.
            keywords.append("REQUIRETLS")
        if settings.auth is not None and self.session.tls:
            keywords.append("AUTH " + " ".join(settings.auth.offered(channelBindingFor(self.transport))))
        if settings.etrn is not None:
            keywords.append("ETRN")
        return keywords

    def _helo(self, argument: str, esmtp: bool) -> None:
        name = parseDomainArgument(argument)
        if isinstance(name, SMTPReply):
            self.replies.respond(Answer(name, plain=True))
            return
        session = replace(self.session, helo=name, esmtp=esmtp)
        more = tuple(self.extensions()) if esmtp else ()
        accept = Answer(SMTPReply(250, "", self.settings.hostname), more=more, plain=True)

        results: list[AuthResult] = []

        def decided(verdict: Verdict) -> Answer:
            refusal = self.refusalFor(verdict)
            results.extend(verdict.results)
            return accept if refusal is None else replace(refusal, plain=True)

        def then(answer: Answer) -> None:
            if answer.reply.isPositive:
                # RFC 5321 4.1.4: EHLO/HELO also ends any transaction.
                self.transactions.reset()
                self.session = session
                self._heloResults = tuple(results)
                self.log.info(event="session.helo", peer=self.peer, helo=name)

        verdict = self.settings.chain.ask(Stage.HELO, lambda p: p.checkHelo(session, name), self.peer)
        self.replies.respondLater(verdict.addCallback(decided), then)

    def smtp_EHLO(self, argument: str) -> None:
        self._helo(argument, esmtp=True)

    def smtp_HELO(self, argument: str) -> None:
        self._helo(argument, esmtp=False)

    def smtp_MAIL(self, argument: str) -> None:
        self.transactions.mail(argument)

    def smtp_RCPT(self, argument: str) -> None:
        self.transactions.rcpt(argument)

    def smtp_DATA(self, argument: str) -> None:
        self.transactions.data(argument)

    def smtp_BDAT(self, argument: str) -> None:
        self.transactions.bdat(argument)

    def smtp_AUTH(self, argument: str) -> None:
        if self._login is None:
            self._login = Login(self, self.settings, self.replies, self._input)
        self._login.command(argument, self.transactions.active, channelBindingFor(self.transport))

    def smtp_RSET(self, argument: str) -> None:
        if argument:
            self.replies.respond(R.NO_PARAMETERS)
            return
        self.transactions.reset()
        self.replies.respond(R.OK)

    def smtp_NOOP(self, argument: str) -> None:
        self.replies.respond(R.OK)

    def smtp_HELP(self, argument: str) -> None:
        # The commands this session may use now, as EHLO would say.
        self.replies.respond(R.helpReply(self.extensions()))

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

    def smtp_ETRN(self, argument: str) -> None:
        """RFC 1985: start delivering the queue for a node (L{etrnCommand})."""
        settings, active = self.settings, self.transactions.active
        etrnCommand(settings.etrn, self.replies, self.session, self.peer, self.avatar, active, argument)

    def smtp_STARTTLS(self, argument: str) -> None:
        if argument:
            self.replies.respond(R.NO_PARAMETERS)
            return
        if self.session.tls:
            self.replies.respond(R.TLS_ACTIVE)
            return
        tls = ITLSTransport(self.transport, None)
        if self.settings.tlsOptions is None or tls is None:
            self.replies.respond(R.TLS_NOT_AVAILABLE)
            return
        if self.session.helo is None:
            self.replies.respond(R.NEED_HELO)
            return
        if self.transactions.active:
            self.replies.respond(R.STARTTLS_IN_TRANSACTION)
            return

        def then(answer: Answer) -> None:
            discarded = self._input.clear()
            if discarded:
                self.log.warn(
                    "discarded {count} octets pipelined after STARTTLS from {peer}",
                    count=len(discarded),
                    peer=self.peer,
                )
            self.session = replace(
                self.session, helo=None, esmtp=False, tls=True, authenticated=None, relayClient=False
            )
            if self._login is not None:
                self._login.end()
            self.transactions.reset()
            tls.startTLS(cast(Any, self.settings.tlsOptions))
            self.log.info("TLS started for {peer}", event="session.tls", peer=self.peer)

        self.replies.respond(R.TLS_READY, then)


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
