"""
The SMTP server protocol: RFC 5321 with PIPELINING, SIZE, 8BITMIME,
ENHANCEDSTATUSCODES, SMTPUTF8, STARTTLS, CHUNKING and DSN.

The protocol is written fresh on L{LineReceiver} (STYLE.md section 7).  It
keeps three rules that C{twisted.mail.smtp} does not:

  - B{Replies strictly in command order.}  Every reply takes a slot in
    L{SMTPServerProtocol._slots}; slots are written head first, as soon as
    the head has its answer.  Pipelined RCPT commands are checked
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
import secrets
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import format_datetime
from enum import Enum
from typing import Any, ClassVar, cast

import idna
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet.defer import Deferred, TimeoutError, fail, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
    ISSLTransport,
    ITLSTransport,
)
from twisted.internet.protocol import connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from mailfw.auth._realm import IMailUser
from mailfw.envelope import Envelope, Recipient, RouteKind, Session
from mailfw.etrn import ETRNHandler
from mailfw.interfaces import IIncomingMessage, IMessageQueue, IPolicy, IRouter
from mailfw.queued import QueueFull
from mailfw.reply import SMTPReply
from mailfw.smtp import _auth as A
from mailfw.smtp import _replies as R
from mailfw.smtp._auth import SMTPAuth
from mailfw.smtp._body import ChunkReader, DotReader
from mailfw.smtp._limits import SMTPLimits
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
from mailfw.verdict import Verdict

__all__ = ["SMTPServerProtocol"]

LISTENER_KINDS = ("smtp", "submission", "submissions")

# Commands of RFC 5321 and common extensions that this server knows but does
# not offer: 502 rather than 500.  TURN (RFC 821) would hand the queue to
# whoever connects: never.  (ETRN has an entry in SMTPServerProtocol.commands
# and answers 502 itself where it is not offered.)
NOT_IMPLEMENTED = frozenset({"EXPN", "TURN", "ATRN", "SEND", "SOML", "SAML", "VERB", "XCLIENT", "XFORWARD"})
SUBMISSION_KINDS = ("submission", "submissions")
# Requests of other protocols sent to an SMTP port (cross-protocol attacks,
# as Postfix's smtpd_forbidden_commands): answered with 421, then closed.
FORBIDDEN = frozenset({"GET", "POST", "PUT", "HEAD", "CONNECT", "OPTIONS", "DELETE"})

# How much unprocessed input is held while processing is paused and the
# transport keeps reading (TLS with a full write buffer).
_MAX_UNREAD = 1024 * 1024
# Seconds a closing connection may wait for the peer (TLS close_notify, a
# full write buffer) before it is aborted.
CLOSE_GRACE = 10.0

_RECEIVED = re.compile(rb"(?:^|\n)received[ \t]*:", re.IGNORECASE)
_DATE = re.compile(rb"(?:^|\n)date[ \t]*:", re.IGNORECASE)
_MESSAGE_ID = re.compile(rb"(?:^|\n)message-id[ \t]*:", re.IGNORECASE)
_COMMENT_UNSAFE = re.compile(r"[^\x21-\x7e ]")
_HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")


class _Mode(Enum):
    COMMAND = "command"
    DATA = "data"
    BDAT = "bdat"


@dataclass(frozen=True)
class _Answer:
    """
    What a command gets: a reply, whether to close the connection after it,
    and further text lines for a multi-line reply.
    """

    reply: SMTPReply
    close: bool = False
    more: tuple[str, ...] = ()
    plain: bool = False  # never carry the enhanced status code (RFC 2034)


# What an empty policy chain says at every stage.
_NO_VERDICT = Verdict()


@functools.lru_cache(maxsize=512)
def _wire(reply: SMTPReply, enhanced: bool) -> bytes:
    """
    A one-line reply as sent: the same few replies go out all day.
    """
    return reply.lines(enhanced=enhanced)[0] + b"\r\n"


@dataclass(eq=False)
class _Slot:
    """
    One reply's place in the output order.
    """

    answer: _Answer | None = None
    then: Callable[[_Answer], None] | None = None
    overlappable: bool = False
    deferred: Deferred[Any] | None = None
    cancellable: bool = True
    penalized: bool = False


@dataclass(eq=False)
class _Transaction:
    """
    The state of one mail transaction, from MAIL to the end of data.
    """

    mail: MailFrom
    recipients: list[Recipient] = field(default_factory=list)
    attempted: int = 0
    bdat: bool = False
    message: _MessageSink | None = None
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


class _SinkState(Enum):
    COLLECTING = "collecting"  # holding the header section
    WAITING = "waiting"  # checkMessage is deciding; holding what follows
    STREAMING = "streaming"  # headers written; text goes straight through
    DISCARDING = "discarding"  # refused: read to the end, store nothing


class _MessageSink:
    """
    Takes decoded message text, holds the header section for the loop check
    and C{checkMessage}, and streams the rest into the queue.
    """

    def __init__(
        self,
        proto: SMTPServerProtocol,
        incoming: IIncomingMessage,
        envelope: Envelope,
        received: bytes,
    ) -> None:
        self._proto = proto
        self._incoming = incoming
        self.envelope = envelope
        self._received = received
        self._limits = proto.limits
        self._state = _SinkState.COLLECTING
        self._head = bytearray()
        self._scanned = 0
        self._held: list[bytes] = []
        self._waiters: list[Deferred[None]] = []
        self._pausing = False
        self._refusal: _Answer | None = None
        self._oversize = False
        self._hops = False
        self._aborted = False
        self._tail = b""
        self._verdict: Deferred[Verdict] | None = None
        self._wholeHeader = True
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
        self._wholeHeader = whole
        if len(_RECEIVED.findall(header)) >= self._limits.maxReceivedHeaders:
            self._hops = True
            self._discard()
            return
        self._state = _SinkState.WAITING
        self._held = [rest] if rest else []
        d = self._proto._messageVerdict(self.envelope, header)
        self._verdict = d
        d.addCallback(self._applyVerdict, header)
        if self._state is _SinkState.WAITING:
            self._pausing = True
            self._proto._pause("verdict")

    def _applyVerdict(self, verdict: Verdict, header: bytes) -> None:
        self._verdict = None
        held, self._held = self._held, []
        if self._state is _SinkState.WAITING and not self._aborted:
            refusal = self._proto._refusalFor(verdict)
            if refusal is not None:
                self._refusal = refusal
                self._discard()
            else:
                self._state = _SinkState.STREAMING
                fixups = self._proto._submissionHeaders(header) if self._wholeHeader else b""
                first = b"".join(
                    [
                        self._received,
                        self._proto._formatHeaders(verdict.headers),
                        fixups,
                        header,
                        *held,
                    ]
                )
                self._write(first)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self._pausing:
            self._pausing = False
            self._proto._unpause("verdict")

    def _write(self, data: bytes) -> None:
        """
        Hand C{data} to the queue; a queue that raises refuses the message
        (451) instead of breaking the connection.
        """
        try:
            self._incoming.write(data)
        except Exception:
            self._proto.log.failure("queue write failed for {peer}", peer=self._proto.peer)
            self._refusal = _Answer(R.LOCAL_ERROR)
            self._discard()
            return
        self._tail = data[-2:] if len(data) >= 2 else (self._tail + data)[-2:]

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
            try:
                self._incoming.abort()
            except Exception:
                self._proto.log.failure("queue abort failed for {peer}", peer=self._proto.peer)
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

    def _problem(self, bare: bool, longLine: bool) -> _Answer | None:
        if self._oversize:
            return _Answer(R.MESSAGE_TOO_BIG)
        if bare:
            return _Answer(R.BAD_LINE_ENDING)
        if longLine:
            return _Answer(R.TEXT_LINE_TOO_LONG)
        if self._hops:
            return _Answer(R.TOO_MANY_HOPS)
        return self._refusal

    def check(self, bare: bool, longLine: bool) -> Deferred[_Answer | None]:
        """
        After a BDAT chunk that is not the last: the refusal so far, if any.
        """

        def settled(_: None) -> _Answer | None:
            problem = self._problem(bare, longLine)
            if problem is not None:
                self.abort()
            return problem

        return self._settled(False).addCallback(settled)

    def finish(self, bare: bool, longLine: bool) -> Deferred[_Answer]:
        """
        The message has ended: refuse it, or commit it and say 250 once the
        queue has made it durable.
        """

        def settled(_: None) -> Deferred[_Answer] | _Answer:
            problem = self._problem(bare, longLine)
            if problem is not None:
                self.abort()
                return problem
            if self.size and self._tail != b"\r\n":
                # A BDAT message need not end with CRLF; stored ones do.
                self._write(b"\r\n")
                if self._refusal is not None:
                    return self._refusal
            self.committing = True
            return maybeDeferred(self._incoming.commit).addCallbacks(self._committed, self._commitFailed)

        return self._settled(True).addCallback(settled)

    def _committed(self, queueID: str) -> _Answer:
        return _Answer(SMTPReply(250, "2.0.0", f"Ok: queued as {queueID}"))

    def _commitFailed(self, f: Failure) -> _Answer:
        self.committing = False
        self.abort()
        if f.check(QueueFull):
            self._proto.log.warn("queue full, message from {peer} deferred", peer=self._proto.peer)
            return _Answer(R.QUEUE_FULL)
        self._proto.log.failure("queue commit failed for {peer}", f, peer=self._proto.peer)
        return _Answer(R.LOCAL_ERROR)


class SMTPServerProtocol(LineReceiver):
    """
    One SMTP, submission or submissions session.

    @cvar commands: the dispatch table, verb to handler.  Extensions such as
        AUTH and ETRN add an entry here (a subclass may extend it with
        C{{**SMTPServerProtocol.commands, "ETRN": ...}}); a table entry wins
        over L{NOT_IMPLEMENTED}.  Handlers answer with C{_respond} or
        C{_respondLater}, which keep replies in order.
    @cvar mailParameters: MAIL parameters an extension checks itself.
    @ivar limits: the L{SMTPLimits} in force.
    @ivar peer: the client as C{"host:port"} text, for log events.
    @ivar auth: the L{SMTPAuth} settings when this listener offers AUTH.
    @ivar etrn: the L{ETRNHandler} when this listener offers ETRN.
    """

    log = Logger()
    delimiter = b"\r\n"
    commands: ClassVar[Mapping[str, Callable[[SMTPServerProtocol, str], None]]]
    mailParameters: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        kind: str,
        hostname: str,
        queue: IMessageQueue,
        router: IRouter,
        clock: IReactorTime,
        policies: Sequence[IPolicy] = (),
        limits: SMTPLimits = SMTPLimits(),
        tlsOptions: object | None = None,
        onOpen: Callable[[SMTPServerProtocol], None] | None = None,
        onClose: Callable[[SMTPServerProtocol], None] | None = None,
        auth: SMTPAuth | None = None,
        etrn: ETRNHandler | None = None,
    ) -> None:
        if kind not in LISTENER_KINDS:
            raise ValueError(f"unknown listener kind {kind!r}")
        self.auth = auth
        self.etrn = etrn
        self.kind = kind
        self.hostname = hostname
        self.queue = queue
        self.router = router
        self.clock = clock
        self.policies = tuple(policies)
        self.limits = limits
        self.tlsOptions = tlsOptions
        self.MAX_LENGTH = limits.maxCommandLine
        self._onOpen = onOpen
        self._onClose = onClose
        self.peer = ""
        self._session = Session(listener=kind, peerHost="")
        self._transaction: _Transaction | None = None
        self._mode = _Mode.COMMAND
        self._buffer = b""
        self._offset = 0
        self._discardingLine = False
        self._slots: deque[_Slot] = deque()
        self._flushing = False
        self._stalled: bytes | None = None
        self._pauseReasons: set[str] = set()
        self._transportPaused = False
        self._errors = 0
        self._penalty: IDelayedCall | None = None
        self._idle: IDelayedCall | None = None
        self._abortLater: IDelayedCall | None = None
        self._draining = False
        self._accepted = 0
        self._connectedAt = 0.0
        self._lastActivity = 0.0
        self._refused = False
        self._closing = False
        self._closed = False
        self._dot: DotReader | None = None
        self._chunk: _Chunk | None = None
        self._sasl: A.Mechanism | None = None
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
        tls = self.kind == "submissions" or ISSLTransport.providedBy(transport)
        self._session = Session(listener=self.kind, peerHost=host, peerPort=port, tls=tls)
        # The connection is logged once, when it ends (with what happened):
        # twistd writes every event, debug ones too, and a line per event is
        # a measurable share of the cost of a message.
        self._connectedAt = self.clock.seconds()
        if self._onOpen is not None:
            self._onOpen(self)
        # As a streaming producer the protocol stops reading while the
        # transport's write buffer is full: a client that pipelines without
        # reading the replies cannot make the server buffer them all.
        transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self._lastActivity = self.clock.seconds()
        self._idle = self.clock.callLater(self.limits.idleTimeout, self._idleTimedOut)
        session = self._session
        verdict = self._chain(lambda p: p.checkConnection(session), "connect")
        self._respondLater(verdict.addCallback(self._greeting), cancellable=True)

    def _greeting(self, verdict: Verdict) -> _Answer:
        refusal = self._refusalFor(verdict)
        if refusal is None:
            return _Answer(SMTPReply(220, "", f"{self.hostname} ESMTP"), plain=True)
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
            return _Answer(SMTPReply(554, "", f"{self.hostname} {reply.text}"), plain=True)
        return _Answer(SMTPReply(421, "", f"{self.hostname} {reply.text}"), True, plain=True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._closing = True
        for call in (self._idle, self._penalty, self._abortLater):
            if call is not None and call.active():
                call.cancel()
        self._idle = self._penalty = self._abortLater = None
        slots, self._slots = list(self._slots), deque()
        for slot in slots:
            if slot.deferred is not None and slot.cancellable and not slot.deferred.called:
                slot.deferred.cancel()
        tx, self._transaction = self._transaction, None
        if tx is not None and tx.message is not None:
            tx.message.cancel()
        self._sasl = None
        self._endLogin()
        self.log.info(
            "connection from {peer} on {listener} closed after {duration:.1f}s:"
            " {accepted} messages accepted, {errors} errors",
            peer=self.peer,
            listener=self.kind,
            helo=self._session.helo or "",
            duration=self.clock.seconds() - self._connectedAt,
            accepted=self._accepted,
            errors=self._errors,
        )
        if self._onClose is not None:
            onClose, self._onClose = self._onClose, None
            onClose(self)

    def _close(self) -> None:
        """
        Hang up after the replies written so far.
        """
        if self._closing:
            return
        self._closing = True
        self.paused = True
        tx, self._transaction = self._transaction, None
        if tx is not None and tx.message is not None:
            tx.message.abort()
        if self.transport is not None:
            if self._transportPaused:
                # A TLS transport must read to see the peer's close_notify
                # or EOF; what it reads now is dropped (we are closing).
                self._transportPaused = False
                self.transport.resumeProducing()  # type: ignore[attr-defined]
            self.transport.loseConnection()
            # A TLS close waits for the peer, and a peer that never reads
            # keeps our write buffer full: neither may hold the slot.
            self._abortLater = self.clock.callLater(CLOSE_GRACE, self._abortClose)

    def _abortClose(self) -> None:
        self._abortLater = None
        if not self._closed and self.transport is not None:
            self.log.info("{peer} did not close; aborting", peer=self.peer)
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _closingReply(self, reply: SMTPReply) -> SMTPReply:
        """
        RFC 5321 4.2: a 421 names the server.
        """
        return replace(reply, text=f"{self.hostname} {reply.text}")

    def _idleTimedOut(self) -> None:
        self._idle = None
        if self._closing:
            return
        remaining = self._lastActivity + self.limits.idleTimeout - self.clock.seconds()
        if remaining > 0:
            # Activity since the timer was set: wait for the rest.  (The
            # timer is moved lazily, not reset on every line.)
            self._idle = self.clock.callLater(remaining, self._idleTimedOut)
            return
        if self._slots or "verdict" in self._pauseReasons:
            # We are the slow party (a policy or the queue); not the client.
            self._idle = self.clock.callLater(self.limits.idleTimeout, self._idleTimedOut)
            return
        self.log.info("idle timeout for {peer}", peer=self.peer)
        self._send(_Answer(self._closingReply(R.TIMEOUT)))
        if "write" in self._pauseReasons and self.transport is not None:
            # The client does not read: waiting for the buffer to drain
            # would keep the connection forever.
            self._closing = True
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        self._close()

    def _activity(self) -> None:
        self._lastActivity = self.clock.seconds()

    # --- input ----------------------------------------------------------------

    def clearLineBuffer(self) -> bytes:
        """
        Drop and return everything received but not yet processed.
        """
        data = self._buffer[self._offset :]
        self._buffer, self._offset = b"", 0
        return data

    def dataReceived(self, data: bytes) -> None:
        """
        Split input into command lines or hand it to the DATA/BDAT reader.

        Unlike L{LineReceiver.dataReceived} this walks the buffer with an
        offset (no copy of the rest per line), answers an over-long line
        with 500 and skips it to its CRLF instead of hanging up, and never
        lets a command line's tail be read as a new command.
        """
        if self._closing:
            return
        if data:
            self._activity()
        if self._busyReceiving:
            self._buffer += data
            return
        if self.paused and len(self._buffer) - self._offset + len(data) > _MAX_UNREAD:
            # Sending on and on without reading our replies (see
            # _syncTransport): no more buffering.
            self.log.warn("{peer} sends without reading replies, aborting", peer=self.peer)
            self._closing = True
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._busyReceiving = True
        try:
            if self._offset:
                self._buffer = self._buffer[self._offset :]
                self._offset = 0
            if data:
                self._buffer += data
            while not self.paused and not self._closing and self._offset < len(self._buffer):
                if self._mode is _Mode.COMMAND:
                    if not self._nextLine():
                        break
                else:
                    chunk = self._buffer[self._offset :] if self._offset else self._buffer
                    self._buffer, self._offset = b"", 0
                    self.rawDataReceived(chunk)
        finally:
            self._busyReceiving = False
            if self._offset:
                self._buffer = self._buffer[self._offset :]
                self._offset = 0

    def _nextLine(self) -> bool:
        """
        Take one command line from the buffer, if there is a whole one.
        """
        buf, start = self._buffer, self._offset
        inSASL = self._sasl is not None
        limit = (A.SASL_LINE_LIMIT if inSASL else self.limits.maxCommandLine) - 2
        if self._discardingLine:
            end = buf.find(b"\r\n", start)
            if end < 0:
                # Keep a final CR: it may begin the CRLF that ends the line.
                self._buffer = b"\r" if buf.endswith(b"\r") else b""
                self._offset = 0
                return False
            self._discardingLine = False
            self._offset = end + 2
            return True
        end = buf.find(b"\r\n", start, start + limit + 2)
        if end < 0:
            if len(buf) - start > limit + 1:
                # No CRLF within the limit: refuse now, skip to the CRLF.
                self._discardingLine = True
                if inSASL:
                    self._sasl = None
                    self._respond(A.AUTH_LINE_TOO_LONG)
                else:
                    self._respond(R.LINE_TOO_LONG)
                return True
            return False
        self._offset = end + 2
        self.lineReceived(buf[start:end])
        return True

    def lineReceived(self, line: bytes) -> None:
        if self._slots and not self._canOverlap(line):
            # An earlier reply is pending and this command depends on it.
            self._stalled = line
            self._pause("stall")
            return
        self._dispatch(line)

    def rawDataReceived(self, data: bytes) -> None:
        if self._mode is _Mode.DATA:
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
        if self._errors >= self.limits.softErrorLimit:
            return False
        pending = len(self._slots)
        if pending >= self.limits.maxPendingChecks:
            return False
        if len(tx.recipients) + pending >= self.limits.maxRecipients:
            return False
        return all(slot.overlappable for slot in self._slots)

    def pauseProducing(self) -> None:
        """
        The transport's write buffer is full: stop reading commands.
        """
        self._pause("write")

    def resumeProducing(self) -> None:
        """
        The transport's write buffer has drained: read on.
        """
        self._unpause("write")

    def stopProducing(self) -> None:
        """
        The transport is going away; L{connectionLost} cleans up.
        """
        self._pause("stopped")

    def _pause(self, reason: str) -> None:
        self._pauseReasons.add(reason)
        self.paused = True
        self._syncTransport()

    def _unpause(self, reason: str) -> None:
        if reason not in self._pauseReasons:
            return
        self._pauseReasons.discard(reason)
        if self._pauseReasons or self._closing:
            self._syncTransport()
            return
        self.paused = False
        self._syncTransport()
        self.dataReceived(b"")

    def _syncTransport(self) -> None:
        """
        Stop or resume reading from the transport to match the pause
        reasons.  A full write buffer of a TLS transport does not stop
        reading: TLS may need to read before it can write (the handshake of
        an implicit-TLS session starts with the greeting buffered), so
        stopping would deadlock.  Input is then held in our buffer instead,
        up to L{_MAX_UNREAD} octets.
        """
        if self._closing or self.transport is None:
            return
        reasons = self._pauseReasons
        if "write" in reasons and ISSLTransport.providedBy(self.transport):
            reasons = reasons - {"write"}
        want = bool(reasons)
        if want != self._transportPaused:
            self._transportPaused = want
            if want:
                self.transport.pauseProducing()  # type: ignore[attr-defined]
            else:
                self.transport.resumeProducing()  # type: ignore[attr-defined]

    # --- output ---------------------------------------------------------------

    def _send(self, answer: _Answer) -> None:
        if self._closed or self.transport is None:
            return
        enhanced = self._session.esmtp and not answer.plain
        if answer.more:
            lines = answer.reply.lines(enhanced=enhanced, more=answer.more)
            self.transport.write(b"".join(line + b"\r\n" for line in lines))
        else:
            self.transport.write(_wire(answer.reply, enhanced))
        self._activity()

    def _respond(self, reply: SMTPReply | _Answer, then: Callable[[_Answer], None] | None = None) -> None:
        """
        Answer the current command, after every earlier reply.
        """
        answer = reply if isinstance(reply, _Answer) else _Answer(reply)
        self._slots.append(_Slot(answer, then, overlappable=True))
        self._flush()

    def _respondLater(
        self,
        d: Deferred[_Answer],
        then: Callable[[_Answer], None] | None = None,
        overlappable: bool = False,
        cancellable: bool = True,
    ) -> None:
        """
        Answer the current command with what C{d} fires with, in order.
        C{d} must not fail: callers map failures to answers first.
        """
        if d.called and not d.paused and isinstance(d.result, _Answer):
            # Already decided (no plugin waited): skip the callback chain.
            self._slots.append(_Slot(d.result, then, overlappable))
            self._flush()
            return
        slot = _Slot(None, then, overlappable, d, cancellable)
        self._slots.append(slot)

        def answered(answer: _Answer) -> None:
            slot.answer = answer
            slot.deferred = None
            self._flush()

        def failed(f: Failure) -> None:
            if not self._closed:
                self.log.failure("unexpected failure answering {peer}", f, peer=self.peer)
                slot.answer = _Answer(R.LOCAL_ERROR)
                slot.deferred = None
                self._flush()

        d.addCallbacks(answered, failed)

    def _flush(self) -> None:
        """
        Send the answers at the head of the queue, counting errors: past the
        soft limit each error waits C{errorDelay} first; at the hard limit
        the server says 421 and hangs up instead.
        """
        if self._flushing or self._closing:
            return
        self._flushing = True
        try:
            while self._slots and not self._closing:
                slot = self._slots[0]
                answer = slot.answer
                if answer is None or (slot.penalized and self._penalty is not None):
                    break
                if answer.reply.code >= 500:
                    if self._errors + 1 >= self.limits.hardErrorLimit:
                        self.log.info("too many errors from {peer}", peer=self.peer)
                        answer = _Answer(self._closingReply(R.TOO_MANY_ERRORS), True)
                    elif (
                        self._errors + 1 > self.limits.softErrorLimit
                        and not slot.penalized
                        and self.limits.errorDelay > 0
                    ):
                        slot.penalized = True
                        self._penalty = self.clock.callLater(self.limits.errorDelay, self._penaltyServed)
                        break
                    self._errors += 1
                self._slots.popleft()
                self._send(answer)
                if slot.then is not None:
                    slot.then(answer)
                if answer.close:
                    self._close()
        finally:
            self._flushing = False
        if not self._slots and not self._closing and not self._draining:
            self._drained()

    def _penaltyServed(self) -> None:
        self._penalty = None
        self._flush()

    def _drained(self) -> None:
        """
        Every reply is out: run the command that was waiting, then read on.
        """
        line, self._stalled = self._stalled, None
        if line is not None:
            # The command answers through _flush, which must not call back
            # here and read on before the command has finished (a refused
            # DATA checks what was pipelined behind it).
            self._draining = True
            try:
                self._dispatch(line)
            finally:
                self._draining = False
            if self._slots or self._closing:
                return
        self._unpause("stall")

    # --- policies ---------------------------------------------------------------

    def _chain(self, call: Callable[[IPolicy], Verdict | Deferred[Verdict]], stage: str) -> Deferred[Verdict]:
        """
        Ask the policies in order until one decides; each call has the
        policy timeout.  Headers of verdicts that let the chain continue are
        collected.  A failure or timeout becomes a 451 verdict here, so the
        result never fails.
        """
        policies = self.policies
        if not policies:
            return succeed(_NO_VERDICT)
        headers: list[tuple[str, str]] = []

        def absorb(verdict: object) -> Verdict | None:
            if not isinstance(verdict, Verdict):
                raise TypeError(f"policy returned {verdict!r}, not a Verdict")
            headers.extend(verdict.headers)
            if verdict.reply is not None or verdict.disconnect:
                return replace(verdict, headers=tuple(headers))
            return None

        def step(index: int) -> Deferred[Verdict]:
            while index < len(policies):
                policy = policies[index]
                try:
                    result = call(policy)
                except Exception:
                    return fail()
                if isinstance(result, Deferred):
                    if not result.called:
                        result.addTimeout(self.limits.policyTimeout, self.clock)
                    return result.addCallback(after, index)
                decided = absorb(result)
                if decided is not None:
                    return succeed(decided)
                index += 1
            return succeed(Verdict(headers=tuple(headers)))

        def after(verdict: Verdict, index: int) -> Verdict | Deferred[Verdict]:
            decided = absorb(verdict)
            if decided is not None:
                return decided
            return step(index + 1)

        return step(0).addErrback(self._verdictFailed, stage)

    def _verdictFailed(self, f: Failure, stage: str) -> Verdict:
        return Verdict(self._failureReply(f, stage))

    def _failureReply(self, f: Failure, stage: str) -> SMTPReply:
        """
        The 451 for a plugin that failed or timed out; logged, never shown.
        """
        if self._closed:
            return R.LOCAL_ERROR
        if f.check(TimeoutError):
            self.log.warn("{stage} check timed out for {peer}", stage=stage, peer=self.peer)
            return R.POLICY_TIMEOUT
        self.log.failure("{stage} check failed for {peer}", f, stage=stage, peer=self.peer)
        return R.LOCAL_ERROR

    def _refusalFor(self, verdict: Verdict) -> _Answer | None:
        """
        The answer for a refusing verdict, or C{None} if it accepts.
        """
        reply = verdict.reply
        if reply is None or reply.isPositive:
            if verdict.disconnect:
                return _Answer(self._closingReply(R.CLOSING), True)
            return None
        return _Answer(reply, verdict.disconnect)

    def _stageAnswer(self, verdict: Verdict, accept: _Answer) -> _Answer:
        return self._refusalFor(verdict) or accept

    def _messageVerdict(self, envelope: Envelope, header: bytes) -> Deferred[Verdict]:
        session = self._session
        return self._chain(lambda p: p.checkMessage(session, envelope, header), "message")

    def _formatHeaders(self, headers: Sequence[tuple[str, str]]) -> bytes:
        """
        Header fields added by policies, checked so that no policy can break
        the header section.
        """
        out = []
        for name, value in headers:
            if not _HEADER_NAME.match(name) or "\r" in value or "\n" in value:
                self.log.warn("policy header {name!r} dropped: invalid", name=name)
                continue
            out.append(f"{name}: {value}\r\n".encode())
        return b"".join(out)

    # --- commands -------------------------------------------------------------------

    def _dispatch(self, line: bytes) -> None:
        if self._sasl is not None:
            self._saslResponse(line)
            return
        if b"\r" in line or b"\n" in line:
            self._respond(R.BARE_LINE_ENDING_COMMAND)
            return
        parsed = parseCommandLine(line)
        if isinstance(parsed, SMTPReply):
            self._respond(parsed)
            return
        verb, argument = parsed.verb, parsed.argument
        if self._refused:
            if verb == "QUIT":
                self._respond(_Answer(R.GOODBYE, True))
            else:
                self._respond(_Answer(R.BAD_SEQUENCE, plain=True))
            return
        if verb in FORBIDDEN:
            self.log.warn("non-SMTP command from {peer}", peer=self.peer)
            self._respond(_Answer(self._closingReply(R.NOT_AN_SMTP_CLIENT), True))
            return
        if verb not in ("MAIL", "RCPT") and len(line) + 2 > self.limits.maxLineLength:
            self._respond(R.LINE_TOO_LONG)
            return
        handler = self.commands.get(verb)
        if handler is None:
            self._respond(R.NOT_IMPLEMENTED if verb in NOT_IMPLEMENTED else R.COMMAND_UNRECOGNIZED)
            return
        handler(self, argument)

    def extensions(self) -> list[str]:
        """
        The EHLO keywords offered now.  Extensions add theirs here.
        """
        keywords = [
            "PIPELINING",
            f"SIZE {self.limits.maxMessageSize}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
            "DSN",
        ]
        if self._tlsAvailable():
            keywords.append("STARTTLS")
        if self.auth is not None and self._session.tls:
            keywords.append("AUTH " + " ".join(self.auth.mechanisms))
        if self.etrn is not None:
            keywords.append("ETRN")
        return keywords

    def _tlsAvailable(self) -> bool:
        return (
            self.tlsOptions is not None and not self._session.tls and ITLSTransport.providedBy(self.transport)
        )

    def _helo(self, argument: str, esmtp: bool) -> None:
        name = parseDomainArgument(argument)
        if isinstance(name, SMTPReply):
            self._respond(_Answer(name, plain=True))
            return
        session = replace(self._session, helo=name, esmtp=esmtp)
        if esmtp:
            accept = _Answer(SMTPReply(250, "", self.hostname), more=tuple(self.extensions()), plain=True)
        else:
            accept = _Answer(SMTPReply(250, "", self.hostname), plain=True)

        def decided(verdict: Verdict) -> _Answer:
            answer = self._stageAnswer(verdict, accept)
            return answer if answer is accept else replace(answer, plain=True)

        def then(answer: _Answer) -> None:
            if answer.reply.isPositive:
                # RFC 5321 4.1.4: EHLO/HELO also ends any transaction.
                self._resetTransaction()
                self._session = session

        d = self._chain(lambda p: p.checkHelo(session, name), "helo").addCallback(decided)
        self._respondLater(d, then)

    def smtp_EHLO(self, argument: str) -> None:
        self._helo(argument, esmtp=True)

    def smtp_HELO(self, argument: str) -> None:
        self._helo(argument, esmtp=False)

    def smtp_MAIL(self, argument: str) -> None:
        if self._session.helo is None:
            self._respond(R.NEED_HELO)
            return
        if self._transaction is not None:
            self._respond(R.NESTED_MAIL)
            return
        if self.kind in SUBMISSION_KINDS and self._session.authenticated is None:
            self._respond(R.NEED_AUTH)
            return
        extra = self.mailParameters
        if self.auth is not None:
            extra = extra | {"AUTH"}
        parsed = parseMailFrom(argument, esmtp=self._session.esmtp, extraParameters=extra)
        if isinstance(parsed, SMTPReply):
            self._respond(parsed)
            return
        if self.auth is not None and "AUTH" in parsed.parameters:
            # RFC 4954 5: the identity a relay vouches for.  Checked for
            # syntax, then ignored: this server does not pass it on.
            value = parsed.parameters["AUTH"]
            try:
                if value is None or (value != "<>" and not decodeXtext(value)):
                    raise ValueError("empty")
            except ValueError:
                self._respond(A.AUTH_PARAMETER_SYNTAX)
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
            self._respond(A.SENDER_NOT_OWNED)
            return
        if parsed.size is not None and parsed.size > self.limits.maxMessageSize:
            self._respond(R.MESSAGE_TOO_BIG)
            return
        session = self._session
        mail: MailFrom = parsed

        def then(answer: _Answer) -> None:
            if answer.reply.isPositive:
                self._transaction = _Transaction(mail)
            else:
                self._logRefusal("MAIL", answer.reply, mail)

        d = self._chain(lambda p: p.checkSender(session, mail.sender, mail.parameters), "sender").addCallback(
            self._stageAnswer, _Answer(R.MAIL_OK)
        )
        self._respondLater(d, then)

    def smtp_RCPT(self, argument: str) -> None:
        tx = self._transaction
        if tx is None:
            self._respond(R.NEED_MAIL if self._session.helo is not None else R.NEED_HELO)
            return
        if tx.message is not None:
            self._respond(R.BAD_SEQUENCE)
            return
        parsed = parseRcptTo(argument, self.hostname, esmtp=self._session.esmtp, smtputf8=tx.mail.smtputf8)
        tx.attempted += 1
        if isinstance(parsed, SMTPReply):
            self._respond(parsed)
            return
        if len(tx.recipients) >= self.limits.maxRecipients:
            self._respond(R.TOO_MANY_RECIPIENTS)
            return
        recipient = Recipient(parsed.address, parsed.notify, parsed.orcpt)

        def then(answer: _Answer) -> None:
            if self._transaction is not tx:
                return
            if answer.reply.isPositive:
                if all(r.address != recipient.address for r in tx.recipients):
                    tx.recipients.append(recipient)
            else:
                self._logRefusal("RCPT", answer.reply, tx.mail, recipient)

        d = self._checkRecipient(parsed, recipient, tx)
        self._respondLater(d, then, overlappable=True)

    def _checkRecipient(self, parsed: RcptTo, recipient: Recipient, tx: _Transaction) -> Deferred[_Answer]:
        """
        Route the recipient, then ask the policies.  The bare
        C{<postmaster>} of RFC 5321 4.5.1 is always accepted, and so is
        postmaster at a local domain whatever the policies say.
        """
        accept = _Answer(R.RCPT_OK)
        if parsed.postmaster:
            return succeed(accept)
        session = self._session
        envelope = self._envelope(tx)
        routed: Deferred[Any] = maybeDeferred(self.router.route, recipient.address, session)
        if not routed.called:
            routed.addTimeout(self.limits.policyTimeout, self.clock)

        def afterRoute(route: Any) -> Deferred[_Answer] | _Answer:
            if route.kind is RouteKind.REFUSE:
                reply = route.reply
                if reply is None or reply.isPositive:
                    reply = SMTPReply(550, "5.1.1", "Recipient address rejected")
                return _Answer(reply)
            if route.kind is RouteKind.LOCAL and recipient.address.localpart.lower() == "postmaster":
                return accept
            return self._chain(
                lambda p: p.checkRecipient(session, envelope, recipient), "recipient"
            ).addCallback(self._stageAnswer, accept)

        def failed(f: Failure) -> _Answer:
            return _Answer(self._failureReply(f, "route"))

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
            arrival=self.clock.seconds(),
        )

    def _startMessage(self, tx: _Transaction) -> SMTPReply | None:
        """
        Open the message in the queue; C{None} when that worked.
        """
        envelope = self._envelope(tx)
        try:
            incoming = self.queue.receive(envelope)
            queueID = str(incoming.queueID)
        except Exception:
            self.log.failure("queue refused a new message from {peer}", peer=self.peer)
            return R.LOCAL_ERROR
        tx.message = _MessageSink(self, incoming, envelope, self._receivedHeader(queueID, envelope))
        return None

    def _receivedHeader(self, queueID: str, envelope: Envelope) -> bytes:
        """
        The RFC 5321 4.4 trace header, with the protocol names of RFC 3848
        and RFC 6531.
        """
        session = self._session
        helo = session.helo or "unknown"
        if not envelope.smtputf8 and not helo.isascii():
            try:
                helo = idna.encode(helo, uts46=True).decode("ascii")
            except idna.IDNAError:
                helo = "invalid"
        host = session.peerHost
        if host:
            literal = f"[IPv6:{host}]" if ":" in host else f"[{host}]"
            origin = f"from {helo} ({literal})"
        else:
            origin = f"from {helo}"
        if self.auth is not None and self.auth.receivedIdentity and session.authenticated:
            identity = _COMMENT_UNSAFE.sub("?", session.authenticated)
            identity = identity.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            origin += f"\r\n\t(Authenticated sender: {identity})"
        suffix = ("S" if session.tls else "") + ("A" if session.authenticated else "")
        if envelope.smtputf8:
            protocol = "UTF8SMTP" + suffix
        elif session.esmtp:
            protocol = "ESMTP" + suffix
        else:
            protocol = "SMTP"
        when = format_datetime(datetime.fromtimestamp(self.clock.seconds(), UTC))
        lines = [f"Received: {origin}", f"\tby {self.hostname} with {protocol} id {queueID}"]
        if len(envelope.recipients) == 1:
            lines.append(f"\tfor <{envelope.recipients[0].address}>; {when}")
        else:
            lines[-1] += f"; {when}"
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    def _refuseData(self, reply: SMTPReply) -> None:
        """
        Refuse DATA.  Octets already pipelined behind it would be read as
        commands, but they are probably the body (RFC 2920 3.1 forbids
        sending them), so that is a synchronization error.
        """
        pipelined = self._offset < len(self._buffer)
        self._respond(reply)
        if pipelined:
            self.log.warn("octets pipelined after refused DATA from {peer}", peer=self.peer)
            self._respond(_Answer(R.SYNCHRONIZATION, True))

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

        def then(answer: _Answer) -> None:
            self._dot = DotReader(self.limits.maxTextLine)
            self._mode = _Mode.DATA

        self._respond(R.START_DATA, then)

    def _dataReceived(self, data: bytes) -> None:
        dot, tx = self._dot, self._transaction
        assert dot is not None and tx is not None and tx.message is not None
        text, rest = dot.feed(data)
        tx.message.write(text)
        if rest is None:
            return
        self._mode = _Mode.COMMAND
        self._dot = None
        self._buffer = rest + self._buffer
        self._offset = 0
        self._endMessage(tx, tx.message.finish(dot.bareLineEnding, dot.lineTooLong))

    def _endMessage(self, tx: _Transaction, d: Deferred[_Answer]) -> None:
        message = tx.message
        assert message is not None

        def logged(answer: _Answer) -> _Answer:
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

        def then(answer: _Answer) -> None:
            if self._transaction is tx:
                self._transaction = None

        self._respondLater(d.addCallback(logged), then, cancellable=False)

    def smtp_BDAT(self, argument: str) -> None:
        parsed = parseBdat(argument)
        if isinstance(parsed, SMTPReply):
            # The chunk's length is unknown, so its octets cannot be skipped.
            self._respond(_Answer(parsed, True))
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
                tx.chunks = ChunkReader(self.limits.maxTextLine)
        self._chunk = _Chunk(parsed.size, parsed.last, parsed.size, error)
        if parsed.size:
            self._mode = _Mode.BDAT
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
            self._mode = _Mode.COMMAND
            self._buffer = data[len(take) :] + self._buffer
            self._offset = 0
            self._endChunk()

    def _endChunk(self) -> None:
        chunk, self._chunk = self._chunk, None
        assert chunk is not None
        tx = self._transaction
        if chunk.error is not None:
            self._respond(chunk.error)
            return
        assert tx is not None and tx.message is not None and tx.chunks is not None
        message, reader = tx.message, tx.chunks
        if chunk.last:
            message.write(reader.finish())
            self._endMessage(tx, message.finish(reader.bareLineEnding, reader.lineTooLong))
            return
        ok = _Answer(SMTPReply(250, "2.0.0", f"Ok: {chunk.size} octets received"))

        def checked(problem: _Answer | None) -> _Answer:
            return ok if problem is None else problem

        def then(answer: _Answer) -> None:
            if not answer.reply.isPositive and self._transaction is tx:
                # RFC 3030 2: a refused chunk fails the transaction.
                self._transaction = None
                self._logRefusal("BDAT", answer.reply, tx.mail, queueID=message.queueID)

        d = message.check(reader.bareLineEnding, reader.lineTooLong).addCallback(checked)
        self._respondLater(d, then, cancellable=False)

    def smtp_RSET(self, argument: str) -> None:
        if argument:
            self._respond(R.NO_PARAMETERS)
            return
        self._resetTransaction()
        self._respond(R.OK)

    def _resetTransaction(self) -> None:
        tx, self._transaction = self._transaction, None
        if tx is not None and tx.message is not None:
            tx.message.abort()

    def smtp_NOOP(self, argument: str) -> None:
        self._respond(R.OK)

    def smtp_HELP(self, argument: str) -> None:
        # The commands this session may use now, as EHLO would say.
        self._respond(R.helpReply(self.extensions()))

    def smtp_ETRN(self, argument: str) -> None:
        """
        RFC 1985: start delivering the queue for a node (see the module
        docstring).
        """
        if self.etrn is None:
            self._respond(R.NOT_IMPLEMENTED)
            return
        if self._session.helo is None:
            self._respond(R.NEED_HELO)
            return
        if self._transaction is not None:
            self._respond(R.ETRN_IN_TRANSACTION)
            return
        avatar = self._avatar
        userDomains = tuple(avatar.etrnDomains) if avatar is not None else None
        d = self.etrn.request(argument, self._session.peerHost, userDomains)

        def answered(reply: SMTPReply) -> _Answer:
            self.log.info(
                "ETRN from {peer}: {code} {enhanced}",
                peer=self.peer,
                code=reply.code,
                enhanced=reply.enhanced,
            )
            return _Answer(reply)

        self._respondLater(d.addCallback(answered), cancellable=False)

    def smtp_VRFY(self, argument: str) -> None:
        if not argument:
            self._respond(SMTPReply(501, "5.5.4", "Syntax: VRFY address"))
            return
        self._respond(R.VRFY)

    def smtp_QUIT(self, argument: str) -> None:
        if argument:
            self._respond(R.NO_PARAMETERS)
            return
        self._respond(_Answer(R.GOODBYE, True))

    def smtp_STARTTLS(self, argument: str) -> None:
        if argument:
            self._respond(R.NO_PARAMETERS)
            return
        if self._session.tls:
            self._respond(R.TLS_ACTIVE)
            return
        tls = ITLSTransport(self.transport, None)
        if self.tlsOptions is None or tls is None:
            self._respond(R.TLS_NOT_AVAILABLE)
            return
        if self._session.helo is None:
            self._respond(R.NEED_HELO)
            return
        if self._transaction is not None:
            self._respond(R.STARTTLS_IN_TRANSACTION)
            return

        def then(answer: _Answer) -> None:
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
            tls.startTLS(cast(Any, self.tlsOptions))
            self.log.info("TLS started for {peer}", peer=self.peer)

        self._respond(R.TLS_READY, then)

    # --- AUTH (RFC 4954) ------------------------------------------------------------

    def smtp_AUTH(self, argument: str) -> None:
        """
        C{AUTH mechanism [initial-response]}.  The checks run in the order
        of RFC 4954 and RFC 3207: sequence (503), syntax (501), mechanism
        (504), encryption (538), then the brute-force lockout (454).
        """
        auth = self.auth
        session = self._session
        if auth is None:
            self._respond(R.NOT_IMPLEMENTED)
            return
        if session.helo is None:
            self._respond(R.NEED_HELO)
            return
        if not session.esmtp:
            self._respond(A.AUTH_NEED_EHLO)
            return
        if session.authenticated is not None:
            self._respond(A.AUTH_ALREADY)
            return
        if self._transaction is not None:
            self._respond(A.AUTH_IN_TRANSACTION)
            return
        words = argument.split(" ")
        if not words[0] or len(words) > 2 or (len(words) == 2 and not words[1]):
            self._respond(A.AUTH_SYNTAX)
            return
        name = words[0].upper()
        if not A.validMechanismName(name) or name not in auth.mechanisms:
            self._respond(A.AUTH_UNKNOWN_MECHANISM)
            return
        if not session.tls:
            self._respond(A.AUTH_NEEDS_TLS)
            return
        if auth.throttle.lockedOut(session.peerHost):
            self.log.info("AUTH from {peer} refused: locked out", peer=self.peer)
            self._respondLater(self._delayed(_Answer(A.AUTH_LOCKED)))
            return
        initial: bytes | None = None
        if len(words) == 2:
            if words[1] == "=":
                initial = b""
            else:
                initial = A.decodeResponse(words[1].encode("ascii", "replace"))
                if initial is None:
                    self._respond(A.AUTH_BAD_BASE64)
                    return
        mechanism = A.makeMechanism(name)
        assert mechanism is not None
        self._saslStep(mechanism, mechanism.start(initial))

    def _saslStep(self, mechanism: A.Mechanism, step: A.Step) -> None:
        """
        Send the next challenge, check the credentials, or refuse.
        """
        if isinstance(step, A.Challenge):
            self._sasl = mechanism
            self._respond(_Answer(SMTPReply(334, "", A.encodeChallenge(step.data)), plain=True))
        elif isinstance(step, SMTPReply):
            self._sasl = None
            self._authFailed(mechanism.name, "", "malformed response")
        else:
            self._sasl = None
            self._checkCredentials(mechanism.name, step)

    def _saslResponse(self, line: bytes) -> None:
        """
        One client response inside a SASL exchange.
        """
        mechanism = self._sasl
        assert mechanism is not None
        self._sasl = None
        if line == b"*":
            self.log.info("AUTH cancelled by {peer}", peer=self.peer)
            self._respond(A.AUTH_CANCELLED)
            return
        data = A.decodeResponse(line)
        if data is None:
            self._respond(A.AUTH_BAD_BASE64)
            return
        self._saslStep(mechanism, mechanism.respond(data))

    def _delayed(self, answer: _Answer) -> Deferred[_Answer]:
        """
        C{answer}, after the throttle's failure delay.
        """
        assert self.auth is not None
        delay = self.auth.throttle.failureDelay
        if delay <= 0:
            return succeed(answer)
        return deferLater(self.clock, delay, lambda: answer)

    def _authFailed(self, mechanism: str, user: str, reason: str) -> None:
        """
        Count a failed attempt and refuse it with 535, after the delay.
        """
        assert self.auth is not None
        lockedOut = self.auth.throttle.failed(self._session.peerHost)
        self.log.info(
            "AUTH {mechanism} failed for {peer} (user {user}): {reason}",
            mechanism=mechanism,
            peer=self.peer,
            user=user,
            reason=reason,
            code=A.AUTH_FAILED.code,
            enhanced=A.AUTH_FAILED.enhanced,
        )
        if lockedOut:
            self.log.warn("too many failed AUTH attempts from {peer}: locked out", peer=self.peer)
        self._respondLater(self._delayed(_Answer(A.AUTH_FAILED)))

    def _checkCredentials(self, mechanism: str, credentials: Any) -> None:
        auth = self.auth
        assert auth is not None
        user = _printable(credentials.username)
        d: Deferred[Any] = maybeDeferred(auth.portal.login, credentials, None, IMailUser)
        if not d.called:
            d.addTimeout(auth.timeout, self.clock)

        def succeeded(result: tuple[Any, Any, Callable[[], None]]) -> _Answer:
            _, avatar, logout = result
            if self._closed:
                logout()
                return _Answer(A.AUTH_OK)
            self._endLogin()
            self._avatar, self._logout = avatar, logout
            self._session = replace(self._session, authenticated=str(avatar.identity), relayClient=True)
            self.log.info(
                "AUTH {mechanism} succeeded for {peer}: authenticated as {user}",
                mechanism=mechanism,
                peer=self.peer,
                user=str(avatar.identity),
            )
            return _Answer(A.AUTH_OK)

        def failed(f: Failure) -> _Answer | Deferred[_Answer]:
            if self._closed:
                return _Answer(A.AUTH_TEMPORARY)
            if f.check(UnauthorizedLogin, UnhandledCredentials):
                assert auth is not None
                lockedOut = auth.throttle.failed(self._session.peerHost)
                self.log.info(
                    "AUTH {mechanism} failed for {peer} (user {user}): bad credentials",
                    mechanism=mechanism,
                    peer=self.peer,
                    user=user,
                    code=A.AUTH_FAILED.code,
                    enhanced=A.AUTH_FAILED.enhanced,
                )
                if lockedOut:
                    self.log.warn("too many failed AUTH attempts from {peer}: locked out", peer=self.peer)
                return self._delayed(_Answer(A.AUTH_FAILED))
            if f.check(TimeoutError):
                self.log.warn("AUTH check timed out for {peer}", peer=self.peer)
            else:
                self.log.failure("AUTH check failed for {peer}", f, peer=self.peer)
            return _Answer(A.AUTH_TEMPORARY)

        self._respondLater(d.addCallbacks(succeeded, failed))

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

    # --- submission (RFC 6409) --------------------------------------------------------

    def _submissionHeaders(self, header: bytes) -> bytes:
        """
        On the submission listeners, the C{Date:} and C{Message-ID:} fields
        a message lacks (RFC 6409 8.2 and 8.3); nothing elsewhere.
        """
        if self.kind not in SUBMISSION_KINDS:
            return b""
        out = b""
        if not _DATE.search(header):
            when = format_datetime(datetime.fromtimestamp(self.clock.seconds(), UTC))
            out += f"Date: {when}\r\n".encode("ascii")
        if not _MESSAGE_ID.search(header):
            out += f"Message-ID: <{secrets.token_hex(16)}@{_idHost(self.hostname)}>\r\n".encode("ascii")
        return out

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


def _printable(name: bytes | str) -> str:
    """
    A user name a client sent, fit for a log event: decoded leniently,
    control characters escaped, at most 64 characters.
    """
    text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text[:64]


def _idHost(hostname: str) -> str:
    """
    The right-hand side of a C{Message-ID}: the host name in ASCII.
    """
    try:
        host = idna.encode(hostname.rstrip("."), uts46=True).decode("ascii")
    except idna.IDNAError:
        host = ""
    return host if re.fullmatch(r"[A-Za-z0-9.-]+", host) else "localhost"


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
