"""
Delivery to an LMTP server (plugin C{lmtp}, RFC 2033), such as Dovecot's
C{dovecot-lmtpd} or Cyrus.

One connection per delivery: LHLO, MAIL, one RCPT per recipient, DATA,
the dot-stuffed body streamed from the stored message, and then one reply
per accepted recipient.  How each step maps to outcomes:

  - a refused RCPT: that reply, for that recipient;
  - the replies after the final dot: one per accepted recipient, in order;
  - MAIL or DATA refused: that reply for every recipient concerned;
  - no connection (refused, unreachable, C{connect_timeout}):
    C{451 4.4.1} for all;
  - greeting or LHLO refused: C{451 4.4.0} for all (the server is not
    taking mail now; a bounce would be wrong);
  - the connection lost or a reply timing out before a recipient's reply:
    C{451 4.4.2} for that recipient;
  - a reply that breaks the protocol (bad syntax, unexpected code):
    C{451 4.5.0} for the recipients still waiting.

A recipient whose delivery was not confirmed is deferred, so a lost
connection after the final dot can duplicate a message, never lose it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from mailfw.config import ConfigError, Section
from mailfw.delivery._stream import DotStuffingConsumer, setNoDelay
from mailfw.envelope import Envelope, Recipient, RecipientOutcome
from mailfw.interfaces import IDeliveryAgent, IMessageBody
from mailfw.queue._produce import ProducerStopped
from mailfw.reply import SMTPReply, replyFromPeer

if TYPE_CHECKING:
    from mailfw.config import ComponentContext

__all__ = ["LMTPClient", "LMTPDeliveryAgent", "fromConfig", "parseReplyLine"]

CANNOT_CONNECT = SMTPReply(451, "4.4.1", "Cannot connect to the LMTP server")
SESSION_REFUSED = SMTPReply(451, "4.4.0", "LMTP server refused the session")
CONNECTION_LOST = SMTPReply(451, "4.4.2", "Connection to the LMTP server lost")
TIMED_OUT = SMTPReply(451, "4.4.2", "LMTP server timed out")
PROTOCOL_ERROR = SMTPReply(451, "4.5.0", "LMTP protocol error")
LOCAL_ERROR = SMTPReply(451, "4.3.0", "Local error reading the message, try again later")


class ProtocolViolation(Exception):
    """
    The server sent something that is not a valid reply here.
    """


def parseReplyLine(line: bytes) -> tuple[int, bool, str]:
    """
    Split one reply line into its code, whether more lines follow, and its
    text.

    @raise ProtocolViolation: if it is not a reply line.
    """
    if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3:4] not in b" -"):
        raise ProtocolViolation(f"bad reply line {line[:40]!r}")
    code = int(line[:3])
    if not 200 <= code <= 599:
        raise ProtocolViolation(f"reply code {code} out of range")
    text = line[4:].decode("utf-8", "replace")
    return code, line[3:4] == b"-", text


class LMTPClient(LineReceiver):
    """
    One LMTP transaction for one envelope.

    @ivar result: fires with one reply per recipient, in envelope order,
        when every recipient has one; never fails.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = 4096
    log = Logger()

    def __init__(
        self,
        envelope: Envelope,
        body: IMessageBody,
        lhlo: str,
        clock: Any,
        commandTimeout: float = 300.0,
        dataTimeout: float = 600.0,
        agentName: str = "lmtp",
    ) -> None:
        self.envelope = envelope
        self.body = body
        self.lhloName = lhlo
        self.clock = clock
        self.commandTimeout = commandTimeout
        self.dataTimeout = dataTimeout
        self.agentName = agentName
        self.replies: list[SMTPReply | None] = [None] * len(envelope.recipients)
        self.result: Deferred[list[SMTPReply]] = Deferred()
        self.remoteMTA: str | None = None
        self.extensions: set[str] = set()
        self._lines: list[str] = []
        self._handler: Callable[[int, list[str]], None] | None = self._greeting
        self._timer: IDelayedCall | None = None
        self._rcptIndex = 0
        self._accepted: list[int] = []
        self._sending: Deferred[None] | None = None
        self._consumer: DotStuffingConsumer | None = None

    # -- plumbing -------------------------------------------------------------

    def _wait(self, timeout: float) -> None:
        self._cancelTimer()
        self._timer = self.clock.callLater(timeout, self._timedOut)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _send(self, command: str, handler: Callable[[int, list[str]], None]) -> None:
        self._handler = handler
        self._wait(self.commandTimeout)
        self.sendLine(command.encode("utf-8"))

    def _finishAll(self, reply: SMTPReply, indices: Sequence[int] | None = None) -> None:
        """
        Give C{reply} to the recipients in C{indices} (default: all without
        a reply yet) and finish if every recipient now has one.
        """
        if indices is None:
            indices = range(len(self.replies))
        for i in indices:
            if self.replies[i] is None:
                self.replies[i] = reply
        self._maybeDone()

    def _maybeDone(self, polite: bool = True) -> None:
        if self.result.called or any(r is None for r in self.replies):
            return
        self._cancelTimer()
        self._handler = None
        if self.transport is not None and self.connected:
            if polite:
                self.sendLine(b"QUIT")
                self.transport.loseConnection()
            else:
                self.transport.abortConnection()  # type: ignore[attr-defined]
        self.result.callback([r for r in self.replies if r is not None])

    def _abort(self, reply: SMTPReply, why: str) -> None:
        self.log.warn(
            "{agent}: LMTP session with {nexthop} ended early: {why}",
            agent=self.agentName,
            nexthop=self.remoteMTA,
            why=why,
        )
        self._handler = None
        if self._sending is not None:
            # Stop reading the body; the failure that causes is ignored.
            self._sending = None
            if self._consumer is not None:
                self._consumer.stopProducer()
        for i, existing in enumerate(self.replies):
            if existing is None:
                self.replies[i] = reply
        self._maybeDone(polite=False)

    def _timedOut(self) -> None:
        self._timer = None
        self._abort(TIMED_OUT, "timed out")

    def connectionMade(self) -> None:
        setNoDelay(self.transport)
        self._wait(self.commandTimeout)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelTimer()
        if not self.result.called:
            self.log.warn(
                "{agent}: lost the LMTP connection to {nexthop}: {why}",
                agent=self.agentName,
                nexthop=self.remoteMTA,
                why=reason.getErrorMessage(),
            )
            self._finishAll(CONNECTION_LOST)

    def lineReceived(self, line: bytes) -> None:
        try:
            code, more, text = parseReplyLine(line)
        except ProtocolViolation as e:
            self._abort(PROTOCOL_ERROR, str(e))
            return
        self._lines.append(text)
        if more:
            return
        lines, self._lines = self._lines, []
        if self._handler is None:
            self._abort(PROTOCOL_ERROR, f"unexpected reply {code}")
            return
        self._handler(code, lines)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._abort(PROTOCOL_ERROR, "reply line too long")

    # -- the transaction -------------------------------------------------------

    def _greeting(self, code: int, lines: list[str]) -> None:
        if code != 220:
            self._abort(SESSION_REFUSED, f"greeting {code} {lines[0]}")
            return
        self.remoteMTA = lines[0].split(" ", 1)[0] or None
        self._send(f"LHLO {self.lhloName}", self._lhlo)

    def _lhlo(self, code: int, lines: list[str]) -> None:
        if code != 250:
            self._abort(SESSION_REFUSED, f"LHLO {code} {lines[0]}")
            return
        self.extensions = {line.split(" ", 1)[0].upper() for line in lines[1:]}
        parameters = ""
        if self.envelope.body in ("8BITMIME", "BINARYMIME") and "8BITMIME" in self.extensions:
            parameters += " BODY=8BITMIME"
        if self.envelope.smtputf8 and "SMTPUTF8" in self.extensions:
            parameters += " SMTPUTF8"
        self._send(f"MAIL FROM:<{self.envelope.senderText}>{parameters}", self._mail)

    def _mail(self, code: int, lines: list[str]) -> None:
        if code != 250:
            self._finishAll(replyFromPeer(code, lines[0]) if code >= 400 else PROTOCOL_ERROR)
            return
        self._nextRcpt()

    def _nextRcpt(self) -> None:
        recipient = self.envelope.recipients[self._rcptIndex]
        self._send(f"RCPT TO:<{recipient.address}>", self._rcpt)

    def _rcpt(self, code: int, lines: list[str]) -> None:
        index = self._rcptIndex
        if code in (250, 251):
            self._accepted.append(index)
        elif code >= 400:
            self.replies[index] = replyFromPeer(code, lines[0])
        else:
            self._abort(PROTOCOL_ERROR, f"RCPT answered {code}")
            return
        self._rcptIndex += 1
        if self._rcptIndex < len(self.envelope.recipients):
            self._nextRcpt()
        elif self._accepted:
            self._send("DATA", self._data)
        else:
            self._maybeDone()

    def _data(self, code: int, lines: list[str]) -> None:
        if code != 354:
            reply = replyFromPeer(code, lines[0]) if code >= 400 else PROTOCOL_ERROR
            self._finishAll(reply, self._accepted)
            return
        self._handler = None  # no reply is due while the body is sent
        self._wait(self.commandTimeout)
        consumer = self._consumer = DotStuffingConsumer(
            self.transport,  # type: ignore[arg-type]
            onProgress=lambda: self._wait(self.commandTimeout),
        )
        sending = self._sending = self.body.produce(consumer)

        def sent(_: None) -> None:
            if self._sending is not sending:
                return
            self._sending = None
            self._handler = self._final
            self._wait(self.dataTimeout)
            consumer.finish()

        def failed(failure: Failure) -> None:
            if self._sending is not sending:
                return
            self._sending = None
            if not failure.check(ProducerStopped):
                self._abort(LOCAL_ERROR, f"cannot read the message: {failure.getErrorMessage()}")
            # Otherwise the connection went; connectionLost settles it.

        sending.addCallbacks(sent, failed)

    def _final(self, code: int, lines: list[str]) -> None:
        index = self._accepted.pop(0)
        # Any 2xx is success; 3xx has no meaning here.
        self.replies[index] = PROTOCOL_ERROR if 300 <= code < 400 else replyFromPeer(code, lines[0])
        if self._accepted:
            self._wait(self.dataTimeout)
        self._maybeDone()


@implementer(IDeliveryAgent)
class LMTPDeliveryAgent:
    """
    Delivers over LMTP to one endpoint.

    @ivar endpoint: where the LMTP server listens.
    @ivar clock: for timeouts.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        endpoint: IStreamClientEndpoint,
        clock: Any,
        lhlo: str,
        connectTimeout: float = 30.0,
        commandTimeout: float = 300.0,
        dataTimeout: float = 600.0,
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.clock = clock
        self.lhlo = lhlo
        self.connectTimeout = connectTimeout
        self.commandTimeout = commandTimeout
        self.dataTimeout = dataTimeout

    def deliver(
        self, envelope: Envelope, body: IMessageBody, nexthop: str | None
    ) -> Deferred[Sequence[RecipientOutcome]]:
        recipients = envelope.recipients
        if not recipients:
            return succeed([])
        client = LMTPClient(
            envelope,
            body,
            self.lhlo,
            self.clock,
            self.commandTimeout,
            self.dataTimeout,
            self.name,
        )
        connecting: Deferred[object] = connectProtocol(self.endpoint, client)
        connecting.addTimeout(self.connectTimeout, self.clock)

        def connected(_: object) -> Deferred[list[SMTPReply]]:
            return client.result

        def notConnected(failure: Failure) -> list[SMTPReply]:
            self.log.warn(
                "{agent}: cannot connect to the LMTP server: {why}",
                agent=self.name,
                why=failure.getErrorMessage(),
            )
            return [CANNOT_CONNECT] * len(recipients)

        def outcomes(replies: list[SMTPReply]) -> Sequence[RecipientOutcome]:
            results = []
            for recipient, reply in zip(recipients, replies, strict=False):
                self._logOutcome(envelope, recipient, reply, client.remoteMTA)
                results.append(RecipientOutcome(recipient, reply, client.remoteMTA))
            return results

        replies: Deferred[list[SMTPReply]] = connecting.addCallbacks(connected, notConnected)
        result: Deferred[Sequence[RecipientOutcome]] = replies.addCallback(outcomes)
        return result

    def _logOutcome(
        self, envelope: Envelope, recipient: Recipient, reply: SMTPReply, remote: str | None
    ) -> None:
        self.log.info(
            "{agent}: {recipient} from {sender} via {nexthop}: {code} {enhanced} {text}",
            agent=self.name,
            sender=envelope.senderText,
            recipient=str(recipient.address),
            nexthop=remote,
            code=reply.code,
            enhanced=reply.enhanced,
            text=reply.text,
        )


def fromConfig(
    context: ComponentContext, instanceName: str, options: Mapping[str, object]
) -> LMTPDeliveryAgent:
    """
    Build an LMTP agent from C{[delivery.NAME]}: C{endpoint} (a client
    endpoint string, e.g. C{"unix:/run/dovecot/lmtp"} or
    C{"tcp:host=127.0.0.1:port=24"}), C{lhlo} (default: the server's
    hostname), C{connect_timeout} (30 s), C{command_timeout} (300 s),
    C{data_timeout} (600 s, for the replies after the final dot).
    """
    section = Section(f"[delivery.{instanceName}]", options)
    description = section.text("endpoint")
    lhlo = section.text("lhlo", context.hostname)
    connectTimeout = section.number("connect_timeout", 30.0, minimum=0.001)
    commandTimeout = section.number("command_timeout", 300.0, minimum=0.001)
    dataTimeout = section.number("data_timeout", 600.0, minimum=0.001)
    section.finish()
    if not lhlo or any(c.isspace() for c in lhlo):
        raise ConfigError(f"{section.title} lhlo: must be one word")
    try:
        endpoint = clientFromString(context.reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{section.title} endpoint {description!r}: {e}") from None
    return LMTPDeliveryAgent(
        instanceName,
        endpoint,
        context.reactor,
        lhlo,
        connectTimeout=connectTimeout,
        commandTimeout=commandTimeout,
        dataTimeout=dataTimeout,
    )
