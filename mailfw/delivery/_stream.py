"""
Sending a message body as SMTP or LMTP DATA: the dot-stuffing transform
and a consumer that applies it between a body's producer
(L{IMessageBody.produce}) and the connection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from twisted.internet.interfaces import IConsumer, IProducer
from zope.interface import implementer

__all__ = ["DotStuffer", "DotStuffingConsumer", "setNoDelay"]


class DotStuffer:
    """
    Dot-stuffs a CRLF message given in arbitrary chunks (RFC 5321 4.5.2):
    a C{.} at the start of a line is doubled, also when the line starts in
    one chunk and its dot arrives in the next.  L{end} gives the bytes that
    finish the data: a CRLF if the message did not end with one, then
    C{.CRLF}.
    """

    def __init__(self) -> None:
        # The last two octets seen; a message starts at a line start.
        self._tail = b"\r\n"

    def __call__(self, chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        previous = self._tail
        self._tail = (previous + chunk)[-2:]
        out = chunk.replace(b"\r\n.", b"\r\n..")
        if previous == b"\r\n" and chunk[:1] == b".":
            out = b"." + out
        elif previous[-1:] == b"\r" and chunk[:2] == b"\n.":
            out = b"\n." + out[1:]
        return out

    def end(self) -> bytes:
        return (b"" if self._tail == b"\r\n" else b"\r\n") + b".\r\n"


@implementer(IConsumer)
class DotStuffingConsumer:
    """
    Passes what a body's producer writes to C{transport} dot-stuffed, and
    holds the last chunk back so that L{finish} sends it together with the
    end of data in one write: a lone C{.CRLF} segment after the body would
    wait for the peer's delayed ACK under Nagle's algorithm.  At most one
    chunk is held.

    Producers register directly on C{transport}, so its flow control
    reaches the body's producer unchanged.
    """

    def __init__(self, transport: IConsumer, onProgress: Callable[[], None] = lambda: None) -> None:
        self._transport = transport
        self._onProgress = onProgress
        self._stuffer = DotStuffer()
        self._held = b""
        self._producer: IProducer | None = None

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self._producer = producer
        self._transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._producer = None
        self._transport.unregisterProducer()

    def stopProducer(self) -> None:
        """
        Stop the registered producer, if any (the protocol gives up on the
        transfer); it writes nothing more.
        """
        producer, self._producer = self._producer, None
        if producer is not None:
            self._transport.unregisterProducer()
            producer.stopProducing()

    def write(self, data: bytes) -> None:
        self._onProgress()
        held, self._held = self._held, self._stuffer(data)
        if held:
            self._transport.write(held)

    def finish(self) -> None:
        """
        Write the held chunk and the end of data (C{CRLF.CRLF} or C{.CRLF}).
        """
        held, self._held = self._held, b""
        self._transport.write(held + self._stuffer.end())


def setNoDelay(transport: object) -> None:
    """
    Turn off Nagle's algorithm on C{transport} if it is a TCP connection:
    a command or the end of data written after a body segment the peer
    has not acknowledged would otherwise wait for its delayed ACK (about
    40 ms per message).  Other transports (UNIX sockets, test doubles)
    are left alone.
    """
    setTcpNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setTcpNoDelay is not None:
        with contextlib.suppress(OSError):
            setTcpNoDelay(True)
