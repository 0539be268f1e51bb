"""
Writing a stored message body to a consumer (a connection, a process's
standard input) without reading it on the reactor thread: the one
implementation behind every L{IMessageBody.produce}.

L{produceFromFile} reads a blocking reader a chunk at a time in a thread
given by the body's owner (the SQLite queue's reader thread, the
PostgreSQL queue's spool thread) and writes each chunk on the reactor
thread, the way L{twisted.web.client.FileBodyProducer} does with a
L{Cooperator} but with the reads moved off the reactor.  At most one chunk
is read ahead of what the consumer took, and none while it is paused, so a
slow peer never makes the process hold more of the message.
L{produceBytes} does the same for a body already in memory, without a
thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IProducer, IPushProducer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

__all__ = [
    "CHUNK_SIZE",
    "ProducerStopped",
    "ThreadPoolRunner",
    "ThreadRunner",
    "collect",
    "produceBytes",
    "produceFromFile",
]

_T = TypeVar("_T")

CHUNK_SIZE = 64 * 1024
"""How much of a body is read and written at a time."""


class ProducerStopped(Exception):
    """
    The consumer stopped the producer (the peer closed the connection or
    the process its input) before the whole body was written.
    """


class ThreadRunner(Protocol):
    """
    Runs a blocking callable off the reactor thread and gives its result
    back on the reactor thread.  Calls made one after another must run one
    after another: a reader is used by one thread at a time.
    """

    def __call__(self, work: Callable[[], _T]) -> Deferred[_T]: ...


class ThreadPoolRunner:
    """
    A L{ThreadRunner} over a thread pool of its own, started on first use
    and stopped when the reactor shuts down.
    """

    def __init__(self, reactor: Any, name: str, maxThreads: int = 4) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=maxThreads, name=name)
        self._started = False

    def __call__(self, work: Callable[[], _T]) -> Deferred[_T]:
        if not self._started:
            self._started = True
            self._pool.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)
        return deferToThreadPool(self._reactor, self._pool, work)


@implementer(IPushProducer)
class _ThreadedProducer:
    """
    Reads C{opener()}'s reader in C{runInThread}, one chunk in flight at a
    time, and writes the chunks to C{consumer}.

    @ivar done: see L{produceFromFile}.
    """

    log = Logger()

    def __init__(
        self,
        opener: Callable[[], BinaryIO],
        consumer: IConsumer,
        runInThread: ThreadRunner,
        chunkSize: int,
    ) -> None:
        self._opener = opener
        self._consumer = consumer
        self._runInThread = runInThread
        self._chunkSize = chunkSize
        # Touched only by work in runInThread, one call at a time.
        self._reader: BinaryIO | None = None

        self._paused = False
        self._reading = False
        self._finished = False
        self._closing = False
        self._looping = False
        self.done: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        self._consumer.registerProducer(self, True)
        self._readNext()
        return self.done

    def _readNext(self) -> None:
        if self._looping:
            # Called back from within the loop below (a runner that answers
            # at once): the loop goes on, so the stack does not grow with
            # every chunk.
            return
        self._looping = True
        try:
            while not (self._paused or self._reading or self._finished):
                self._reading = True
                self._runInThread(self._read).addCallbacks(self._gotChunk, self._readFailed)
        finally:
            self._looping = False

    def _read(self) -> bytes:
        if self._reader is None:
            self._reader = self._opener()
        return self._reader.read(self._chunkSize)

    def _closeReader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _gotChunk(self, chunk: bytes) -> None:
        self._reading = False
        if self._finished:
            # Stopped while this chunk was being read.
            self._close()
            return
        if not chunk:
            self._finish(None)
            return
        try:
            self._consumer.write(chunk)
        except Exception:
            # A consumer that cannot take the chunk ends the production:
            # the delivery fails now instead of hanging or reporting a
            # body it did not send.
            self._finish(Failure())
            return
        self._readNext()

    def _readFailed(self, failure: Failure) -> None:
        self._reading = False
        if self._finished:
            self._close()
            return
        self._finish(failure)

    def _close(self) -> None:
        """
        Close the reader in its thread, after the read in flight (if any).
        """
        if self._reading or self._closing:
            return
        self._closing = True

        def failed(failure: Failure) -> None:
            self.log.failure("closing a message reader failed", failure)

        self._runInThread(self._closeReader).addErrback(failed)

    def _finish(self, failure: Failure | None) -> None:
        self._finished = True
        self._consumer.unregisterProducer()
        self._close()
        if failure is None:
            self.done.callback(None)
        else:
            self.done.errback(failure)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._readNext()

    def stopProducing(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._close()
        self.done.errback(ProducerStopped())


def produceFromFile(
    opener: Callable[[], BinaryIO],
    consumer: IConsumer,
    runInThread: ThreadRunner,
    chunkSize: int = CHUNK_SIZE,
) -> Deferred[None]:
    """
    Write what C{opener()} reads to C{consumer} as a streaming producer:
    C{opener}, every read and the reader's C{close} run in C{runInThread};
    the writes run where C{runInThread}'s results arrive (the reactor
    thread).

    @return: fires with L{None} when the reader is exhausted and every
        chunk was written; fails with L{ProducerStopped} when the consumer
        stopped the producer, or with what opening or reading raised.  The
        reader is closed in every case (after the result fired when the
        runner is a real thread).
    """
    return _ThreadedProducer(opener, consumer, runInThread, chunkSize).start()


@implementer(IPushProducer)
class _MemoryProducer:
    """
    Writes bytes already in memory, a chunk at a time while not paused.
    """

    def __init__(self, data: bytes, consumer: IConsumer, chunkSize: int) -> None:
        self._data = memoryview(data)
        self._consumer = consumer
        self._chunkSize = chunkSize
        self._offset = 0
        self._paused = False
        self._writing = False
        self._finished = False
        self.done: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        self._consumer.registerProducer(self, True)
        self._write()
        return self.done

    def _write(self) -> None:
        if self._writing:
            # resumeProducing from inside a write: the loop below goes on.
            return
        self._writing = True
        try:
            while not self._paused and not self._finished and self._offset < len(self._data):
                end = self._offset + self._chunkSize
                chunk = bytes(self._data[self._offset : end])
                self._offset = end
                self._consumer.write(chunk)
        except Exception:
            # As in _ThreadedProducer: the caller's Deferred fails, never
            # the caller's stack or the transport's.
            self._finished = True
            self._consumer.unregisterProducer()
            self.done.errback(Failure())
            return
        finally:
            self._writing = False
        if not self._finished and self._offset >= len(self._data):
            self._finished = True
            self._consumer.unregisterProducer()
            self.done.callback(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if not self._finished:
            self._write()

    def stopProducing(self) -> None:
        if self._finished:
            return
        self._finished = True
        self.done.errback(ProducerStopped())


def produceBytes(data: bytes, consumer: IConsumer, chunkSize: int = CHUNK_SIZE) -> Deferred[None]:
    """
    Write C{data} to C{consumer} as a streaming producer, on the calling
    thread: for bodies held in memory, where there is nothing to block on.

    @return: as for L{produceFromFile}.
    """
    return _MemoryProducer(data, consumer, chunkSize).start()


@implementer(IConsumer)
class _Collector:
    """
    Keeps what is written, up to C{limit} octets; then stops the producer.
    """

    def __init__(self, limit: int | None) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._producer: IProducer | None = None
        self.full = False

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self._producer = producer

    def unregisterProducer(self) -> None:
        self._producer = None

    def write(self, data: bytes) -> None:
        if self.full:
            return
        if self._limit is not None and self._size + len(data) >= self._limit:
            data = data[: self._limit - self._size]
            self.full = True
        self._chunks.append(data)
        self._size += len(data)
        if self.full and self._producer is not None:
            self._producer.stopProducing()

    def data(self) -> bytes:
        return b"".join(self._chunks)


def collect(produce: Callable[[IConsumer], Deferred[None]], limit: int | None = None) -> Deferred[bytes]:
    """
    The bytes a body's C{produce} writes, or only its first C{limit}
    octets (the body is then read no further): for test doubles and for
    callers that need a bounded prefix of a message in memory.

    @return: fails as C{produce} does, except that stopping at C{limit}
        is success.
    """
    collector = _Collector(limit)

    def stopped(failure: Failure) -> bytes:
        if collector.full and failure.check(ProducerStopped):
            return collector.data()
        return failure  # type: ignore[return-value]

    return produce(collector).addCallbacks(lambda _: collector.data(), stopped)
