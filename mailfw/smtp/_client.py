"""
The outbound ESMTP client: one connection to one mail host.

Written fresh on L{LineReceiver} rather than on C{twisted.mail.smtp}, so
that every reply is a value and every wait has a timeout.  The protocol
keeps a queue of replies it is waiting for, each with its own timeout
started only when it reaches the head of the queue (the server answers in
order); the conversation itself is written as straight-line code with
L{inlineCallbacks}: L{SMTPClient.handshake} (greeting, EHLO or HELO,
STARTTLS, AUTH), L{SMTPClient.transaction} (MAIL, RCPT for each
recipient, DATA, the body), L{SMTPClient.quit}.  With PIPELINING, MAIL,
every RCPT and DATA go out in one write and their replies are read in
order (RFC 2920).  A server announcing C{LIMITS} (RFC 9422) gets a
message's recipients in transactions of at most C{RCPTMAX}, and at most
C{MAILMAX} transactions on one connection.

Failures that are about the host rather than a recipient raise
L{HostFailure} (the caller may try the next host); failures of a
transaction are values: one L{SMTPReply} per recipient.
"""

from __future__ import annotations

import contextlib
from base64 import b64encode
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from mailfw.address import Address
from mailfw.delivery._stream import DotStuffingConsumer, setNoDelay
from mailfw.envelope import Envelope
from mailfw.interfaces import IMessageBody
from mailfw.queue._produce import ProducerStopped
from mailfw.reply import SMTPReply, replyFromPeer

__all__ = [
    "TLS_LEVELS",
    "Capabilities",
    "ClientOptions",
    "HostFailure",
    "Response",
    "SMTPClient",
    "TLSFailure",
    "Timeouts",
    "xtext",
]

TLS_LEVELS = ("none", "may", "encrypt", "verify", "dane")

MAX_REPLY_LINES = 200


@dataclass(frozen=True)
class Timeouts:
    """
    How long to wait at each step, in seconds (RFC 5321 4.5.3.2 minimums,
    Postfix's defaults for the data transfer).

    @ivar command: the greeting and the replies to EHLO/HELO, STARTTLS,
        AUTH, MAIL, RCPT and RSET.
    @ivar data: the reply to DATA (the 354).
    @ivar transfer: a stall while sending the body (no progress at all).
    @ivar dataDone: the reply to the final dot.
    @ivar quit: the reply to QUIT; the connection closes anyway.
    """

    connect: float = 30.0
    command: float = 300.0
    data: float = 120.0
    transfer: float = 180.0
    dataDone: float = 600.0
    quit: float = 30.0


@dataclass(frozen=True)
class ClientOptions:
    """
    How to talk to one host.

    @ivar helo: our name in EHLO/HELO.
    @ivar tls: C{"none"} (never STARTTLS), C{"may"} (STARTTLS when
        offered, any certificate), C{"encrypt"} (TLS required, any
        certificate) or C{"verify"} (TLS required, certificate valid for
        the host name).
    @ivar tlsContext: builds the TLS client context for a host name and
        the level; C{None} disables STARTTLS (like C{"none"}, but a
        required level then fails).
    @ivar credentials: C{(user, password)} for AUTH PLAIN or LOGIN, sent
        only over TLS.
    @ivar peerCheck: checks the peer's certificate chain (its own
        certificate first) after the TLS handshake and before anything
        else is said: C{None} if it passes, else why not (the host is
        then not used).  DANE (level C{"dane"}) checks this way, since
        OpenSSL knows nothing of TLSA records.
    """

    helo: str
    tls: str = "may"
    tlsContext: Callable[[str, str], Any] | None = None
    credentials: tuple[str, str] | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    peerCheck: Callable[[list[Any]], str | None] | None = None

    @property
    def tlsRequired(self) -> bool:
        return self.tls in ("encrypt", "verify", "dane")


@dataclass(frozen=True)
class Response:
    """
    One reply as received: the code and the text of each line.
    """

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(line.strip() for line in self.lines).strip()

    def reply(self) -> SMTPReply:
        """
        As an L{SMTPReply}, taking the enhanced status code from the text
        when the server gave one of the right class, else a generic one.
        """
        return replyFromPeer(self.code, self.text)


@dataclass(frozen=True)
class Capabilities:
    """
    What the server announced in its EHLO reply (nothing after HELO).

    @ivar keywords: upper-case keyword to its parameters.
    """

    esmtp: bool
    keywords: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def fromEHLO(cls, response: Response) -> Capabilities:
        keywords: dict[str, tuple[str, ...]] = {}
        for line in response.lines[1:]:
            words = line.split()
            if not words:
                continue
            keyword, _, first = words[0].upper().partition("=")
            params = ([first] if first else []) + words[1:]
            keywords[keyword] = tuple(p.upper() if keyword == "AUTH" else p for p in params)
        return cls(True, keywords)

    def has(self, keyword: str) -> bool:
        return keyword in self.keywords

    @property
    def sizeLimit(self) -> int | None:
        """
        The announced SIZE limit, or C{None} for none (also C{SIZE 0}).
        """
        params = self.keywords.get("SIZE")
        if not params:
            return None
        try:
            limit = int(params[0])
        except ValueError:
            return None
        return limit or None

    @property
    def authMechanisms(self) -> tuple[str, ...]:
        return self.keywords.get("AUTH", ())

    @property
    def limits(self) -> tuple[int | None, int | None]:
        """
        The C{RCPTMAX} and C{MAILMAX} values of the server's C{LIMITS}
        keyword (RFC 9422): recipients per transaction and transactions
        per session, C{None} when not announced.  A value that is not 1 to
        6 digits, or is 0, is ignored, as the RFC asks of unknown or
        malformed limits.
        """
        found: dict[str, int] = {}
        for param in self.keywords.get("LIMITS", ()):
            name, _, value = param.partition("=")
            if value.isascii() and value.isdigit() and len(value) <= 6 and int(value) > 0:
                found[name.upper()] = int(value)
        return found.get("RCPTMAX"), found.get("MAILMAX")


class HostFailure(Exception):
    """
    This host cannot take the message now; the caller may try another.

    @ivar reply: what to record if no other host works out.
    @ivar stage: the step that failed, for logs (C{"greeting"},
        C{"ehlo"}, C{"starttls"}, C{"auth"}, C{"mail"}, ...).
    @ivar permanent: the failure is about the message and would be the
        same on every host (no other host should be tried).
    """

    def __init__(self, reply: SMTPReply, stage: str, permanent: bool = False) -> None:
        super().__init__(f"{stage}: {reply}")
        self.reply = reply
        self.stage = stage
        self.permanent = permanent


class TLSFailure(HostFailure):
    """
    The TLS handshake (or certificate verification) failed; with the
    C{"may"} level the caller retries the host in plaintext.
    """


class _ReplyTimeout(Exception):
    pass


class _ProtocolError(Exception):
    pass


class _Lost(Exception):
    def __init__(self, reason: Failure) -> None:
        super().__init__(reason.getErrorMessage())
        self.reason = reason


def xtext(text: str) -> str:
    """
    Encode C{text} as RFC 3461 xtext (for ENVID and ORCPT).
    """
    out = []
    for byte in text.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def _lostReply(stage: str) -> SMTPReply:
    return SMTPReply(421, "4.4.2", f"Connection lost during {stage}")


def _timeoutReply(stage: str) -> SMTPReply:
    return SMTPReply(421, "4.4.2", f"Timed out waiting for the reply to {stage}")


def _errorReply(stage: str) -> SMTPReply:
    return SMTPReply(421, "4.5.0", f"Protocol error from the server during {stage}")


class SMTPClient(LineReceiver):
    """
    The client side of one SMTP connection.

    @ivar hostname: the host's name (for certificate verification and
        logs); C{address} its IP address.
    @ivar useTLS: whether to attempt STARTTLS at all (the caller turns it
        off to retry a host whose handshake failed).
    @ivar capabilities: the latest EHLO answer.
    @ivar tls: whether the connection is encrypted now.
    @ivar tlsInfo: the TLS version and cipher, once encrypted.
    @ivar transactions: how many transactions were started on this
        connection.
    @ivar maxTransactions: the most transactions this connection may
        carry by our own choice (the caller sets it), or C{None}.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = 8192

    log = Logger()

    def __init__(
        self,
        options: ClientOptions,
        clock: IReactorTime,
        hostname: str,
        address: str = "",
        useTLS: bool = True,
        encrypted: bool = False,
    ) -> None:
        """
        @param encrypted: the connection is encrypted already: one that was
            taken over rather than opened (ODMR, RFC 2645: the customer
            connected and did STARTTLS, then the roles reversed), which the
            client may be given with C{makeConnection} at any time.
        """
        self.options = options
        self.clock = clock
        self.hostname = hostname
        self.address = address
        self.useTLS = useTLS
        self.capabilities = Capabilities(False)
        self.tls = encrypted
        self.tlsInfo: str | None = None
        self.connected = False
        self._partial: list[str] = []
        self._partialCode: int | None = None
        # Replies awaited, in order: (deferred, timeout, timer once running).
        self._waiting: deque[list[Any]] = deque()
        self._lostReason: Failure | None = None
        self._closeWaiters: list[Deferred[None]] = []
        self._transferTimer: IDelayedCall | None = None
        self.transactions = 0
        self.maxTransactions: int | None = None

    # --- transport events ------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        # No format: counts outbound sessions (the TLS share's denominator).
        self.log.info(event="client.connected", host=self.hostname)
        setNoDelay(self.transport)
        self.greeting = self._expect(self.options.timeouts.command)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self._lostReason = reason
        self._stopTransferTimer()
        waiting, self._waiting = self._waiting, deque()
        for entry in waiting:
            if entry[2] is not None and entry[2].active():
                entry[2].cancel()
            entry[0].errback(_Lost(reason))
        closeWaiters, self._closeWaiters = self._closeWaiters, []
        for d in closeWaiters:
            d.callback(None)

    def whenClosed(self) -> Deferred[None]:
        """
        Fires when the connection has closed.
        """
        d: Deferred[None] = Deferred()
        if self.connected:
            self._closeWaiters.append(d)
        else:
            d.callback(None)
        return d

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if len(text) < 3 or not text[:3].isdigit() or text[3:4] not in ("", " ", "-"):
            self._protocolError(f"malformed reply line {text[:80]!r}")
            return
        code = int(text[:3])
        if not 200 <= code <= 599 or (self._partialCode not in (None, code)):
            self._protocolError(f"bad reply code in {text[:80]!r}")
            return
        self._partialCode = code
        self._partial.append(text[4:])
        if len(self._partial) > MAX_REPLY_LINES:
            self._protocolError("reply too long")
            return
        if text[3:4] == "-":
            return
        response = Response(code, tuple(self._partial))
        self._partial = []
        self._partialCode = None
        if not self._waiting:
            self.log.info(
                "Unexpected reply from {host}: {code} {text}",
                host=self.hostname,
                code=code,
                text=response.text[:200],
            )
            if code == 421:
                self._abort()
            return
        entry = self._waiting.popleft()
        if entry[2] is not None and entry[2].active():
            entry[2].cancel()
        self._startHeadTimer()
        entry[0].callback(response)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._protocolError("reply line too long")

    def _protocolError(self, why: str) -> None:
        self.log.info("Protocol error from {host}: {why}", host=self.hostname, why=why)
        self._failAll(_ProtocolError(why))
        self._abort()

    def _failAll(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, deque()
        for entry in waiting:
            if entry[2] is not None and entry[2].active():
                entry[2].cancel()
            entry[0].errback(error)

    def _abort(self) -> None:
        if self.transport is not None and self.connected:
            abort = getattr(self.transport, "abortConnection", None)
            if abort is not None:
                abort()
            else:
                self.transport.loseConnection()

    # --- waiting for replies ---------------------------------------------

    def _expect(self, timeout: float) -> Deferred[Response]:
        d: Deferred[Response] = Deferred()
        if not self.connected:
            d.errback(_Lost(self._lostReason or Failure(ConnectionDone())))
            return d
        self._waiting.append([d, timeout, None])
        if len(self._waiting) == 1:
            self._startHeadTimer()
        return d

    def _startHeadTimer(self) -> None:
        if self._waiting and self._waiting[0][2] is None:
            head = self._waiting[0]
            head[2] = self.clock.callLater(head[1], self._timedOut)

    def _timedOut(self) -> None:
        self.log.info("Timed out waiting for {host}", host=self.hostname)
        self._failAll(_ReplyTimeout())
        self._abort()

    def _send(self, *lines: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"".join(line + b"\r\n" for line in lines))

    def command(self, line: bytes, timeout: float | None = None) -> Deferred[Response]:
        """
        Send one command and wait for its reply.
        """
        self._send(line)
        return self._expect(self.options.timeouts.command if timeout is None else timeout)

    @inlineCallbacks
    def _step(
        self, stage: str, line: bytes | None, timeout: float | None = None
    ) -> Generator[Deferred[Any], Any, Response]:
        """
        Send C{line} (or nothing, for the greeting) and return its reply,
        turning timeouts, losses and garbage into L{HostFailure}s.
        """
        d = self.greeting if line is None else self.command(line, timeout)
        try:
            response: Response = yield d
        except _ReplyTimeout:
            raise HostFailure(_timeoutReply(stage), stage) from None
        except _Lost:
            raise HostFailure(_lostReply(stage), stage) from None
        except _ProtocolError:
            raise HostFailure(_errorReply(stage), stage) from None
        return response

    # --- the session ------------------------------------------------------

    @inlineCallbacks
    def handshake(self) -> Generator[Deferred[Any], Any, Capabilities]:
        """
        Read the greeting, say EHLO (or HELO), do STARTTLS and AUTH as
        configured.

        @raise HostFailure: (in the L{Deferred}) if this host cannot be
            used; L{TLSFailure} when the TLS handshake failed.
        """
        greeting = yield self._step("greeting", None)
        if greeting.code != 220:
            raise HostFailure(_asFailure(greeting, "greeting"), "greeting")
        yield self._hello()
        offered = self.capabilities.has("STARTTLS")
        if self.useTLS and self.options.tls != "none" and self.options.tlsContext is not None and offered:
            yield self._startTLS()
        if self.options.tlsRequired and not self.tls:
            self.log.info("TLS required but not available from {host}", host=self.hostname)
            raise HostFailure(
                SMTPReply(451, "4.7.10", f"TLS is required but {self.hostname} does not offer it"),
                "starttls",
            )
        if self.options.credentials is not None:
            yield self._authenticate()
        return self.capabilities

    @inlineCallbacks
    def _hello(self) -> Generator[Deferred[Any], Any, None]:
        helo = self.options.helo.encode("ascii", "replace")
        response = yield self._step("EHLO", b"EHLO " + helo)
        if response.code == 250:
            self.capabilities = Capabilities.fromEHLO(response)
            return
        if response.code in (421,) or not self.connected:
            raise HostFailure(_asFailure(response, "EHLO"), "ehlo")
        response = yield self._step("HELO", b"HELO " + helo)
        if response.code != 250:
            raise HostFailure(_asFailure(response, "HELO"), "helo")
        self.capabilities = Capabilities(False)

    @inlineCallbacks
    def _startTLS(self) -> Generator[Deferred[Any], Any, None]:
        try:
            response = yield self.command(b"STARTTLS")
        except _Lost:
            # Some servers (and middleboxes stripping STARTTLS) hang up
            # here; for the retry logic that is a failed TLS attempt.
            self.log.info("{host} hung up after STARTTLS", host=self.hostname)
            raise TLSFailure(_lostReply("STARTTLS"), "tls") from None
        except _ReplyTimeout:
            raise HostFailure(_timeoutReply("STARTTLS"), "starttls") from None
        except _ProtocolError:
            raise HostFailure(_errorReply("STARTTLS"), "starttls") from None
        if response.code != 220:
            self.log.info(
                "STARTTLS refused by {host}: {code} {text}",
                host=self.hostname,
                code=response.code,
                text=response.text[:200],
            )
            if self.options.tlsRequired:
                raise HostFailure(_asFailure(response, "STARTTLS"), "starttls")
            return
        assert self.options.tlsContext is not None
        context = self.options.tlsContext(self.hostname, self.options.tls)
        self.transport.startTLS(context)  # type: ignore[union-attr]
        self.tls = True
        helo = self.options.helo.encode("ascii", "replace")
        self._send(b"EHLO " + helo)
        try:
            response = yield self._expect(self.options.timeouts.command)
        except _Lost as lost:
            why = _describeTLSError(lost.reason)
            self.log.info("TLS handshake with {host} failed: {why}", host=self.hostname, why=why)
            raise TLSFailure(
                SMTPReply(451, "4.7.5", f"TLS failed with {self.hostname}: {why}"), "tls"
            ) from None
        except _ReplyTimeout:
            raise TLSFailure(_timeoutReply("EHLO after STARTTLS"), "tls") from None
        except _ProtocolError:
            raise HostFailure(_errorReply("EHLO after STARTTLS"), "ehlo") from None
        if response.code != 250:
            raise HostFailure(_asFailure(response, "EHLO after STARTTLS"), "ehlo")
        self.capabilities = Capabilities.fromEHLO(response)
        self.tlsInfo = _describeTLS(self.transport)
        self.log.info(
            "TLS with {host}: {tlsInfo}", event="client.tls", host=self.hostname, tlsInfo=self.tlsInfo
        )
        self._checkPeer()

    def _checkPeer(self) -> None:
        """
        Apply L{ClientOptions.peerCheck} to the peer's certificate chain.

        @raise TLSFailure: (4.7.5) if the check fails; the connection is
            closed without another command.
        """
        check = self.options.peerCheck
        if check is None:
            return
        why = check(_peerChain(self.transport))
        if why is None:
            return
        self.log.warn(
            "Certificate of {host} refused: {why}", host=self.hostname, address=self.address, why=why
        )
        self._abort()
        raise TLSFailure(
            SMTPReply(451, "4.7.5", f"Certificate of {self.hostname} not accepted: {why}"[:400]), "tls"
        )

    @inlineCallbacks
    def _authenticate(self) -> Generator[Deferred[Any], Any, None]:
        assert self.options.credentials is not None
        user, password = self.options.credentials
        if not self.tls:
            self.log.info("Not sending credentials to {host} without TLS", host=self.hostname)
            raise HostFailure(SMTPReply(451, "4.7.10", "Refusing to authenticate without TLS"), "auth")
        mechanisms = self.capabilities.authMechanisms
        if "PLAIN" in mechanisms:
            token = b64encode(b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8"))
            response = yield self._step("AUTH", b"AUTH PLAIN " + token)
        elif "LOGIN" in mechanisms:
            response = yield self._step("AUTH", b"AUTH LOGIN")
            if response.code == 334:
                response = yield self._step("AUTH", b64encode(user.encode("utf-8")))
            if response.code == 334:
                response = yield self._step("AUTH", b64encode(password.encode("utf-8")))
        else:
            raise HostFailure(
                SMTPReply(451, "4.7.0", f"{self.hostname} offers no usable AUTH mechanism"),
                "auth",
            )
        if response.code != 235:
            self.log.info(
                "Authentication to {host} failed: {code} {text}",
                host=self.hostname,
                code=response.code,
                text=response.text[:200],
            )
            # Our credentials are wrong or the account is locked: an
            # operator problem, so defer instead of bouncing.
            reply = response.reply()
            raise HostFailure(
                SMTPReply(451, "4.7.8", f"Authentication failed: {reply.code} {reply.text}"[:400]),
                "auth",
            )

    # --- the server's LIMITS (RFC 9422) --------------------------------------

    @property
    def transactionsLeft(self) -> int | None:
        """
        How many more transactions this connection may carry: within the
        server's C{MAILMAX} and our own C{maxTransactions} (traffic
        shaping's C{max_messages_per_connection}), or C{None} for no limit.
        """
        limits = [n for n in (self.capabilities.limits[1], self.maxTransactions) if n is not None]
        return max(0, min(limits) - self.transactions) if limits else None

    def transaction(self, envelope: Envelope, body: IMessageBody) -> Deferred[list[SMTPReply]]:
        """
        Send one message to all of C{envelope}'s recipients, in as many
        transactions as the server's C{LIMITS} ask (RFC 9422): at most
        C{RCPTMAX} recipients in each, at most C{MAILMAX} on this
        connection.  Recipients that did not fit into the connection's
        remaining transactions get C{452 4.5.3} (retried later).

        @return: one reply per recipient, in order: 2xx delivered, 4xx
            retry later, 5xx failed.
        @raise HostFailure: (in the L{Deferred}) as for one transaction,
            only while no recipient is decided; also, without sending
            anything, when a connection used before has too few
            transactions left for the whole message (the caller then opens
            a new one).
        """
        return Deferred.fromCoroutine(self._split(envelope, body))

    async def _split(self, envelope: Envelope, body: IMessageBody) -> list[SMTPReply]:
        rcptMax = self.capabilities.limits[0]
        count = len(envelope.recipients)
        size = rcptMax or count or 1
        chunks = [range(start, min(start + size, count)) for start in range(0, count, size)] or [range(0)]
        left = self.transactionsLeft
        if left is not None and left < len(chunks) and self.transactions:
            raise HostFailure(SESSION_FULL, "mail")
        if len(chunks) == 1:
            self.transactions += 1
            replies: list[SMTPReply] = await self._transactionOnce(envelope, body)
            return replies
        self.log.info(
            "Sending {count} recipients to {host} in {transactions} transactions (RCPTMAX {rcptMax})",
            host=self.hostname,
            count=count,
            transactions=len(chunks),
            rcptMax=rcptMax,
        )
        decided: list[SMTPReply] = []
        for n, chunk in enumerate(chunks):
            if left is not None and n >= left:
                decided.extend(SESSION_FULL for _ in chunk)
                continue
            if not self.connected:
                decided.extend(_lostReply("MAIL") for _ in chunk)
                continue
            part = replace(envelope, recipients=tuple(envelope.recipients[i] for i in chunk))
            self.transactions += 1
            try:
                decided.extend(await self._transactionOnce(part, body))
            except HostFailure as f:
                if n == 0:
                    # Nothing decided yet: another host may do better.
                    raise
                decided.extend(f.reply for _ in chunk)
        return decided

    # --- one transaction ---------------------------------------------------

    @inlineCallbacks
    def _transactionOnce(
        self, envelope: Envelope, body: IMessageBody
    ) -> Generator[Deferred[Any], Any, list[SMTPReply]]:
        """
        Send one message to all of C{envelope}'s recipients in one
        transaction.

        @return: one reply per recipient, in order: 2xx delivered, 4xx
            retry later, 5xx failed.
        @raise HostFailure: (in the L{Deferred}) when the host refused
            before any recipient was decided: the greeting was fine but
            MAIL got a 4xx, or the connection broke before RCPT replies.
            C{permanent} is set when every host would answer the same.
        """
        caps = self.capabilities
        count = len(envelope.recipients)
        replies: list[SMTPReply | None] = [None] * count

        if envelope.body == "BINARYMIME":
            reply = SMTPReply(554, "5.6.3", "Binary content cannot be relayed without CHUNKING")
            raise HostFailure(reply, "mail", permanent=True)
        limit = caps.sizeLimit
        if limit is not None and body.size > limit:
            reply = SMTPReply(552, "5.3.4", f"Message too big for {self.hostname} (limit {limit} octets)")
            raise HostFailure(reply, "size", permanent=True)

        utf8Server = caps.has("SMTPUTF8")
        sender = envelope.sender
        if sender is not None and not sender.isASCII and not utf8Server:
            raise HostFailure(_NEEDS_UTF8, "mail", permanent=True)
        for i, recipient in enumerate(envelope.recipients):
            if not recipient.address.isASCII and not utf8Server:
                replies[i] = _NEEDS_UTF8
        sendable = [i for i in range(count) if replies[i] is None]
        if not sendable:
            return _filled(replies, _errorReply("RCPT"))

        mail = b"MAIL FROM:<" + _path(sender) + b">" + self._mailParameters(envelope, body)
        rcpts = [
            b"RCPT TO:<" + _path(envelope.recipients[i].address) + b">" + self._rcptParameters(envelope, i)
            for i in sendable
        ]
        timeouts = self.options.timeouts
        pipelining = caps.has("PIPELINING")
        rcptDs: list[Deferred[Response]] = []
        dataD: Deferred[Response] | None = None

        try:
            if pipelining:
                self._send(mail, *rcpts, b"DATA")
                mailD = self._expect(timeouts.command)
                rcptDs = [self._expect(timeouts.command) for _ in rcpts]
                dataD = self._expect(timeouts.data)
            else:
                mailD = self.command(mail)
            mailResponse: Response = yield mailD
            if mailResponse.code != 250:
                if pipelining:
                    # Collect (and ignore) the replies already asked for.
                    for d in rcptDs:
                        yield d
                    assert dataD is not None
                    dataResponse: Response = yield dataD
                    if dataResponse.code == 354:
                        yield self.command(b".", timeouts.dataDone)
                self._send(b"RSET")
                self._expect(timeouts.command).addErrback(lambda f: None)
                reply = _asFailure(mailResponse, "MAIL")
                raise HostFailure(reply, "mail", permanent=reply.isPermanent)
            accepted: list[int] = []
            for n, i in enumerate(sendable):
                if pipelining:
                    response = yield rcptDs[n]
                else:
                    response = yield self.command(rcpts[n])
                if response.code in (250, 251):
                    accepted.append(i)
                else:
                    replies[i] = _asFailure(response, "RCPT")
            if not pipelining:
                if not accepted:
                    self._send(b"RSET")
                    self._expect(timeouts.command).addErrback(lambda f: None)
                    return _filled(replies, _errorReply("RCPT"))
                dataD = self.command(b"DATA", timeouts.data)
            assert dataD is not None
            dataResponse = yield dataD
            if dataResponse.code != 354:
                for i in accepted:
                    replies[i] = _asFailure(dataResponse, "DATA")
                return _filled(replies, _errorReply("RCPT"))
            if not accepted:
                # RFC 2920 3.1: a 354 after every RCPT failed gets an empty
                # message, which the server then refuses or discards.
                yield self.command(b".", timeouts.dataDone)
                return _filled(replies, _errorReply("RCPT"))
        except (_ReplyTimeout, _Lost, _ProtocolError) as e:
            # Pipelined replies not waited for fail the same way: consumed
            # here, not logged as unhandled.
            for pending in (*rcptDs, dataD):
                if pending is not None:
                    pending.addErrback(lambda f: None)
            reply = _problemReply(e, "the transaction")
            if not any(r is not None and r is not _NEEDS_UTF8 for r in replies):
                # Nothing decided yet: another host may do better.
                raise HostFailure(reply, "mail") from None
            return _filled(replies, reply)

        # The body.  From here on a lost connection may still mean the
        # message was delivered, so recipients are deferred, never failed.
        stage = "the end of data"
        try:
            yield self._sendBody(body)
            final: Response = yield self._expect(timeouts.dataDone)
        except _BodyUnreadable:
            self._abort()
            reply = SMTPReply(451, "4.3.0", "Local error reading the queued message")
            for i in accepted:
                replies[i] = reply
            return _filled(replies, reply)
        except (_ReplyTimeout, _Lost, _ProtocolError) as e:
            reply = _problemReply(e, stage)
            for i in accepted:
                replies[i] = reply
            return _filled(replies, reply)
        finalReply = final.reply() if final.code != 354 else _errorReply(stage)
        if 300 <= final.code < 400:
            finalReply = _errorReply(stage)
        for i in accepted:
            replies[i] = finalReply
        return _filled(replies, finalReply)

    def _mailParameters(self, envelope: Envelope, body: IMessageBody) -> bytes:
        caps = self.capabilities
        params: list[str] = []
        if caps.has("SIZE"):
            params.append(f"SIZE={body.size}")
        if envelope.body == "8BITMIME":
            if caps.has("8BITMIME"):
                params.append("BODY=8BITMIME")
            else:
                # RFC 6152 wants a conversion we do not implement; sending as
                # is works with almost every server today.
                self.log.info(
                    "{host} does not offer 8BITMIME; sending 8-bit data as is",
                    host=self.hostname,
                )
        if caps.has("SMTPUTF8") and (envelope.smtputf8 or _needsUTF8(envelope)):
            params.append("SMTPUTF8")
        if envelope.requireTLS and caps.has("REQUIRETLS"):
            params.append("REQUIRETLS")
        if caps.has("DSN"):
            if envelope.ret:
                params.append(f"RET={envelope.ret}")
            if envelope.envid:
                params.append(f"ENVID={xtext(envelope.envid)}")
        return b"".join(b" " + p.encode("utf-8") for p in params)

    def _rcptParameters(self, envelope: Envelope, index: int) -> bytes:
        recipient = envelope.recipients[index]
        params: list[str] = []
        if self.capabilities.has("DSN"):
            if recipient.notify:
                order = ["NEVER", "SUCCESS", "FAILURE", "DELAY"]
                notify = sorted(recipient.notify, key=lambda n: order.index(n) if n in order else 9)
                params.append("NOTIFY=" + ",".join(notify))
            if recipient.orcpt:
                kind, _, address = recipient.orcpt.partition(";")
                params.append(f"ORCPT={kind};{xtext(address)}")
        return b"".join(b" " + p.encode("utf-8") for p in params)

    @inlineCallbacks
    def _sendBody(self, body: IMessageBody) -> Generator[Deferred[Any], Any, None]:
        """
        Stream C{body} dot-stuffed from its producer (which reads off the
        reactor thread), then the end of data in the same write as the
        body's last chunk.
        """
        assert self.transport is not None
        consumer = DotStuffingConsumer(self.transport, onProgress=self._progress)  # type: ignore[arg-type]
        self._progress()
        try:
            yield body.produce(consumer)
        except ProducerStopped:
            # The connection is going away (the transport tells the
            # producer before the protocol).
            raise _Lost(self._lostReason or Failure(ConnectionLost())) from None
        except Exception as e:
            self.log.info("Cannot read the queued message: {why}", why=str(e))
            raise _BodyUnreadable() from None
        finally:
            self._stopTransferTimer()
        if not self.connected:
            raise _Lost(self._lostReason or Failure(ConnectionDone()))
        consumer.finish()

    def _progress(self) -> None:
        self._stopTransferTimer()
        self._transferTimer = self.clock.callLater(self.options.timeouts.transfer, self._transferStalled)

    def _stopTransferTimer(self) -> None:
        if self._transferTimer is not None and self._transferTimer.active():
            self._transferTimer.cancel()
        self._transferTimer = None

    def _transferStalled(self) -> None:
        self._transferTimer = None
        self.log.info("Sending the message to {host} stalled", host=self.hostname)
        self._abort()

    # --- the end ------------------------------------------------------------

    @inlineCallbacks
    def quit(self) -> Generator[Deferred[Any], Any, None]:
        """
        Say QUIT, wait briefly for the reply, and close.  Never fails.
        """
        if self.connected:
            with contextlib.suppress(Exception):
                yield self.command(b"QUIT", self.options.timeouts.quit)
        if self.connected and self.transport is not None:
            self.transport.loseConnection()


class _BodyUnreadable(Exception):
    pass


SESSION_FULL = SMTPReply(452, "4.5.3", "Too many transactions for one session")

_NEEDS_UTF8 = SMTPReply(553, "5.6.7", "The recipient's server does not support SMTPUTF8 (non-ASCII address)")


def _filled(replies: list[SMTPReply | None], default: SMTPReply) -> list[SMTPReply]:
    return [default if r is None else r for r in replies]


def _needsUTF8(envelope: Envelope) -> bool:
    if envelope.sender is not None and not envelope.sender.isASCII:
        return True
    return any(not r.address.isASCII for r in envelope.recipients)


def _path(address: Address | None) -> bytes:
    return b"" if address is None else str(address).encode("utf-8")


def _asFailure(response: Response, stage: str) -> SMTPReply:
    """
    A non-success reply as a failure reply; a success code where failure
    or another step was expected becomes a transient protocol error.
    """
    if response.code < 400:
        return _errorReply(stage)
    return response.reply()


def _problemReply(error: Exception, stage: str) -> SMTPReply:
    if isinstance(error, _ReplyTimeout):
        return _timeoutReply(stage)
    if isinstance(error, _Lost):
        return _lostReply(stage)
    return _errorReply(stage)


def _describeTLSError(reason: Failure) -> str:
    value = reason.value
    text = str(value) or type(value).__name__
    return f"{type(value).__name__}: {text}"[:300].replace("\r", " ").replace("\n", " ")


def _peerChain(transport: Any) -> list[Any]:
    """
    The peer's certificates as C{cryptography} objects, its own first
    (empty if there are none or the transport is not TLS).
    """
    try:
        connection = transport.getHandle()
        chain = connection.get_peer_cert_chain() or []
        leaf = connection.get_peer_certificate()
    except Exception:
        return []
    certificates = [c.to_cryptography() for c in chain]
    if leaf is not None:
        first = leaf.to_cryptography()
        if not certificates or certificates[0] != first:
            certificates.insert(0, first)
    return certificates


def _describeTLS(transport: Any) -> str | None:
    try:
        connection = transport.getHandle()
        return f"{connection.get_protocol_version_name()} {connection.get_cipher_name()}"
    except Exception:
        return None
