"""
The C{clamav} policy: ClamAV's C{clamd} asked about each message with its
C{zINSTREAM} command, over a unix socket or TCP, at the end-of-data stage.

One connection per message: it is opened when the header section is
accepted, and the message (the header section, then the body) goes to
clamd as it streams in, in chunks each prefixed by its length, then an
empty chunk.  clamd refuses a stream longer than its C{StreamMaxLength};
so the policy stops sending at C{max_size} (keep it at or below clamd's
value) and ends the stream there, as C{clamdscan} does, so the first
C{max_size} octets are scanned.  The chunks are written at the pace clamd
reads them (the socket's transport pauses the stream), so a slow clamd
slows the client instead of filling memory.

clamd's answer decides: C{stream: OK} lets the message through,
C{stream: NAME FOUND} refuses it with C{554 5.7.1} naming the signature.
clamd that cannot be reached, answers C{ERROR}, closes the connection,
answers with something else or too much, or nothing within
C{scan_timeout}: the message gets C{default_action}, and one log line
names the filter and what it did.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailfw._sockets import socketEndpoint
from mailfw.config import ComponentContext, ConfigError, Section
from mailfw.envelope import Envelope, Session
from mailfw.interfaces import IMessageCheck
from mailfw.policy import CONTINUE, AuthResult, Verdict
from mailfw.policy._streaming import DEFAULT_ACTIONS, BodyStream, FilterPolicy, StallTimer
from mailfw.reply import SMTPReply

__all__ = ["ClamavPolicy", "fromConfig", "verdictOf"]


# clamd's StreamMaxLength by default.
DEFAULT_MAX_SIZE = 25 << 20
# The size of the chunks sent (clamd reads any size up to StreamMaxLength).
CHUNK = 65536
# clamd answers one line; a virus name is short.
MAX_REPLY = 4096
COMMAND = b"zINSTREAM\0"
END = struct.pack("!I", 0)

_NAME = re.compile(r"[^\x21-\x7e]+")


class ClamdError(Exception):
    """
    clamd's answer is an error or not one this client understands.
    """


def verdictOf(answer: bytes) -> Verdict:
    """
    clamd's answer to C{INSTREAM} (without its NUL) as a verdict.

    @raise ClamdError: for C{ERROR} and for anything but C{OK} or C{FOUND}.
    """
    text = answer.decode("utf-8", "replace").strip()
    result = text.removeprefix("stream:").strip()
    if result == "OK":
        return CONTINUE
    if result.endswith(" FOUND") and text.startswith("stream:"):
        name = _NAME.sub("?", result[: -len(" FOUND")].strip())[:200] or "unknown"
        return Verdict(SMTPReply(554, "5.7.1", f"Message refused: virus found: {name}"))
    if result.endswith("ERROR"):
        raise ClamdError(f"clamd error: {_NAME.sub(' ', text)[:200]}")
    raise ClamdError(f"unexpected answer {text[:80]!r}")


class _ClamdProtocol(Protocol):
    """
    The connection of one scan: collects clamd's NUL-terminated answer.
    """

    def __init__(self, scan: _ClamdScan) -> None:
        self._scan = scan
        self._buffer = b""
        self.answered = False

    def dataReceived(self, data: bytes) -> None:
        if self.answered:
            return
        self._buffer += data
        answer, nul, _ = self._buffer.partition(b"\0")
        if nul:
            self.answered = True
            self._scan.answered(answer)
        elif len(self._buffer) > MAX_REPLY:
            self.answered = True
            self._scan.fail(f"answer longer than {MAX_REPLY} octets")

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        if not self.answered:
            self.answered = True
            self._scan.fail("clamd closed the connection before answering")


class ClamavPolicy(FilterPolicy):
    """
    clamd, asked about each message at the end of data.

    @ivar defaultAction: C{"tempfail"}, C{"accept"} or C{"reject"}: what
        clamd that is down or misbehaves means for a message.
    """

    log = Logger()
    filterKind = "clamav"

    def __init__(
        self,
        name: str,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        description: str,
        scanTimeout: float = 30.0,
        defaultAction: str = "tempfail",
        maxSize: int = DEFAULT_MAX_SIZE,
    ) -> None:
        self.name = name
        self._endpoint = endpoint
        self._clock = clock
        self.description = description
        self.scanTimeout = scanTimeout
        self.defaultAction = defaultAction
        self.maxSize = maxSize

    def openMessage(self, session: Session, envelope: Envelope, header: bytes) -> IMessageCheck | None:
        return _ClamdScan(self, self._endpoint, self._clock, session, envelope, header)


@implementer(IMessageCheck)
class _ClamdScan:
    """
    One message on its way to clamd: connect, C{zINSTREAM}, the chunks as
    they come, the empty chunk at the end, and the answer as the verdict.
    """

    def __init__(
        self,
        policy: ClamavPolicy,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        session: Session,
        envelope: Envelope,
        header: bytes,
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._session = session
        self._envelope = envelope
        self._verdict: Verdict | None = None
        self._ending: Deferred[Verdict] | None = None
        self._timer = StallTimer(
            clock, policy.scanTimeout, lambda: self.fail(f"no progress within {policy.scanTimeout:g}s")
        )
        self._protocol: _ClamdProtocol | None = None
        self._sent = 0
        self._stream = BodyStream()
        self._stream.write(COMMAND)
        self._frame(header)
        self._connecting: Deferred[Any] | None = endpoint.connect(
            Factory.forProtocol(lambda: _ClamdProtocol(self))
        )
        self._connecting.addCallbacks(self._connected, self._notConnected)

    def _connected(self, protocol: _ClamdProtocol) -> None:
        self._connecting = None
        self._protocol = protocol
        # A TCP or UNIX transport: a consumer that pauses its producer.
        transport: Any = protocol.transport
        if self._verdict is not None:
            transport.loseConnection()
            return
        transport.registerProducer(self._stream, True)
        self._stream.startProducing(transport)

    def _notConnected(self, f: Failure) -> None:
        self._connecting = None
        if f.check(CancelledError):
            return
        self.fail(f"cannot connect: {f.getErrorMessage()}")

    # --- the answer ----------------------------------------------------------------

    def answered(self, answer: bytes) -> None:
        try:
            verdict = verdictOf(answer)
        except ClamdError as e:
            self.fail(str(e))
            return
        self._settle(verdict)

    def fail(self, reason: str) -> None:
        """
        Give up on clamd for this message: log, default action.
        """
        if self._verdict is None:
            self._settle(self._policy.failed(self._session, reason))

    def _settle(self, verdict: Verdict) -> None:
        """
        Decide (once), hang up, and answer the end of data if it waits.
        """
        if self._verdict is None:
            self._verdict = verdict
        self._timer.stop()
        self._stream.stop()
        if self._connecting is not None:
            self._connecting.cancel()
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.answered = True
            transport: Any = protocol.transport
            transport.unregisterProducer()
            transport.loseConnection()
        ending, self._ending = self._ending, None
        if ending is not None:
            ending.callback(self._verdict)

    # --- IMessageCheck --------------------------------------------------------------

    def _frame(self, data: bytes) -> Deferred[None] | None:
        """
        Send as much of C{data} as C{max_size} allows, in framed chunks.
        """
        room = self._policy.maxSize - self._sent
        if room <= 0:
            return None
        data = data[:room]
        self._sent += len(data)
        wait = None
        for start in range(0, len(data), CHUNK):
            piece = data[start : start + CHUNK]
            wait = self._stream.write(struct.pack("!I", len(piece)) + piece)
        if self._sent >= self._policy.maxSize:
            self._policy.log.info(
                "clamav {policy} scans only the first {maxSize} octets of {queueID}",
                policy=self._policy.name,
                maxSize=self._policy.maxSize,
                queueID=self._envelope.queueID,
            )
        return wait

    def write(self, data: bytes) -> Deferred[None] | None:
        if self._verdict is not None or self._stream.stopped:
            return None
        wait = self._frame(data)
        if wait is None:
            return None
        self._timer.arm()
        return wait.addCallback(self._timer.progress)

    def end(self, results: tuple[AuthResult, ...]) -> Verdict | Deferred[Verdict]:
        if self._verdict is not None:
            return self._verdict

        def cancel(_: Deferred[Verdict]) -> None:
            self._ending = None
            self.fail("the session stopped waiting")

        self._ending = Deferred(cancel)
        ending = self._ending
        self._stream.write(END)
        self._stream.finish()
        self._timer.stop()
        self._timer.arm()
        return ending

    def abort(self) -> None:
        if self._verdict is None:
            self._settle(CONTINUE)


def fromConfig(context: ComponentContext, instanceName: str, options: Mapping[str, object]) -> ClamavPolicy:
    section = Section(f"[policy.{instanceName}]", options)
    address = section.text("address")
    scanTimeout = section.number("scan_timeout", 30.0, minimum=0.1)
    defaultAction = section.choice("default_action", DEFAULT_ACTIONS, "tempfail")
    maxSize = section.integer("max_size", DEFAULT_MAX_SIZE, minimum=1)
    section.finish()
    try:
        endpoint = socketEndpoint(context.reactor, address, context.path)
    except ValueError as e:
        raise ConfigError(f"{section.title} address: {e}") from None
    return ClamavPolicy(instanceName, endpoint, context.reactor, address, scanTimeout, defaultAction, maxSize)
