"""
Streaming a message body to a consumer (a process's standard input, an
LMTP connection) in small pieces, with flow control and without holding
the whole message in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPullProducer
from zope.interface import implementer

__all__ = ["BodyProducer", "DotStuffer"]

CHUNK_SIZE = 16 * 1024


class ProducerStopped(Exception):
    """
    The consumer went away (the peer closed the connection or the pipe)
    before the whole body was written.
    """


@implementer(IPullProducer)
class BodyProducer:
    """
    Writes C{reader} to C{consumer} one chunk per C{resumeProducing}, the
    consumer asking for more as its buffer drains.

    Reads are small and touch a local file, which the L{IMessageBody}
    contract allows on the reactor thread.

    @ivar done: fires with the number of octets read when the reader is
        exhausted; fails with L{ProducerStopped} if the consumer stopped
        us, or with the L{OSError} a read raised.  The producer is
        unregistered in every case; the reader is not closed (its owner
        closes it).
    """

    def __init__(
        self,
        reader: BinaryIO,
        consumer: IConsumer,
        transform: Callable[[bytes], bytes] = bytes,
        onProgress: Callable[[], None] = lambda: None,
        chunkSize: int = CHUNK_SIZE,
    ) -> None:
        self._reader = reader
        self._consumer = consumer
        self._transform = transform
        self._onProgress = onProgress
        self._chunkSize = chunkSize
        self._octets = 0
        self._finished = False
        self.done: Deferred[int] = Deferred()

    def start(self) -> Deferred[int]:
        self._consumer.registerProducer(self, False)
        return self.done

    def _finish(self, result: object) -> None:
        if self._finished:
            return
        self._finished = True
        self._consumer.unregisterProducer()
        if isinstance(result, BaseException):
            self.done.errback(result)
        else:
            self.done.callback(self._octets)

    def resumeProducing(self) -> None:
        if self._finished:
            return
        try:
            chunk = self._reader.read(self._chunkSize)
        except OSError as e:
            self._finish(e)
            return
        if not chunk:
            self._finish(None)
            return
        self._octets += len(chunk)
        self._onProgress()
        self._consumer.write(self._transform(chunk))

    def stopProducing(self) -> None:
        if not self._finished:
            self._finished = True
            self.done.errback(ProducerStopped())


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
