"""
The threads and bodies the SQL queues share: executors that run blocking
work off the reactor thread, and message bodies held in memory or in an
unlinked temporary file.
"""

from __future__ import annotations

import io
import os
import queue as _queue
import threading
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, BinaryIO, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailfw.interfaces import IMessageBody
from mailfw.queue._produce import ThreadRunner, produceBytes, produceFromFile

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "CHUNK",
    "Executor",
    "FileBody",
    "MemoryBody",
    "PieceReader",
    "SynchronousExecutor",
    "ThreadExecutor",
    "ThreadedBody",
    "copySpooled",
]

CHUNK = 1 << 20
"""How much body one piece of I/O moves: a BLOB write or read, a COPY
write, a slice read, a buffered reader's buffer."""


def copySpooled(
    queueID: str, head: bytes, spooled: IO[bytes], size: int, write: Callable[[bytes], object]
) -> None:
    """
    Feed C{head} and then the rest of the C{size} octets from a spilled
    body to C{write} in pieces of L{CHUNK}, so that the whole body is never
    in memory.

    @raise OSError: if the spool file is shorter than C{size}.
    """
    if head:
        write(head)
    spooled.seek(0)
    copied = len(head)
    while copied < size:
        chunk = spooled.read(min(CHUNK, size - copied))
        if not chunk:
            raise OSError(f"spool file for {queueID} is short: {copied} of {size}")
        write(chunk)
        copied += len(chunk)


class Executor(Protocol):
    """
    Runs jobs one after another, in the order submitted, on one thread.
    """

    def submit(self, job: Callable[[], None]) -> None:
        """
        Run C{job} after the jobs submitted before it.  C{job} must not
        raise.
        """

    def stop(self) -> None:
        """
        Run the jobs already submitted, then stop.
        """


class SynchronousExecutor:
    """
    An L{Executor} that runs each job at once on the caller's thread: for
    deterministic tests.
    """

    def submit(self, job: Callable[[], None]) -> None:
        job()

    def stop(self) -> None:
        pass


class ThreadExecutor:
    """
    An L{Executor} with one dedicated daemon thread, started on first use.
    """

    log = Logger()

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: _queue.SimpleQueue[Callable[[], None] | None] = _queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except BaseException:
                # Jobs report their own errors; this is a last resort so
                # that one bug does not silently stop the queue.
                self.log.failure("job on {thread} raised", thread=self._name)

    def stop(self) -> None:
        self._jobs.put(None)

    def join(self, timeout: float) -> bool:
        """
        Wait up to C{timeout} seconds for the thread to end after L{stop};
        for tests and shutdown.  Returns whether it ended.
        """
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()


@implementer(IMessageBody)
class MemoryBody:
    """
    An L{IMessageBody} held in memory.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)

    def open(self) -> BinaryIO:
        return io.BytesIO(self._data)

    def produce(self, consumer: IConsumer) -> Deferred[None]:
        return produceBytes(self._data, consumer)


class PieceReader(io.RawIOBase):
    """
    A raw reader with its own position over a store that reads a piece at
    any offset (L{_readAt}), so that every reader of one shared body has
    its own position; a buffered reader goes on top.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self._size = size
        self._position = 0

    def _readAt(self, offset: int, length: int) -> bytes:
        raise NotImplementedError()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._position)
        if want <= 0:
            return 0
        data = self._readAt(self._position, want)
        view[: len(data)] = data
        self._position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._position = offset
        elif whence == io.SEEK_CUR:
            self._position += offset
        else:
            self._position = self._size + offset
        return self._position

    def tell(self) -> int:
        return self._position


class _FileReader(PieceReader):
    """
    Reads a shared temporary file with C{pread}.  Holds the file open until
    closed.
    """

    def __init__(self, file: IO[bytes], size: int) -> None:
        super().__init__(size)
        self._file = file

    def _readAt(self, offset: int, length: int) -> bytes:
        return os.pread(self._file.fileno(), length, offset)


@implementer(IMessageBody)
class ThreadedBody:
    """
    A body too large to hold in memory, which L{produce} reads with the
    store's L{open} in the queue's C{reader} thread, never on the reactor
    thread.
    """

    def __init__(self, size: int, reader: ThreadRunner) -> None:
        self.size = size
        self._inReader = reader

    def open(self) -> BinaryIO:
        raise NotImplementedError()

    def produce(self, consumer: IConsumer) -> Deferred[None]:
        return produceFromFile(self.open, consumer, self._inReader)


class FileBody(ThreadedBody):
    """
    A large body copied out of the database into an unlinked temporary
    file; each L{open} reads it from the start.  The file closes when the
    body and every reader are gone.
    """

    def __init__(self, file: IO[bytes], size: int, reader: ThreadRunner) -> None:
        super().__init__(size, reader)
        self._file = file

    def open(self) -> BinaryIO:
        return io.BufferedReader(_FileReader(self._file, self.size), CHUNK)


_T = TypeVar("_T")


class ExecutorRunner:
    """
    A L{ThreadRunner} over a queue's L{Executor} (one thread, jobs in
    order), handing results back with C{deliver} (C{callFromThread}).
    """

    def __init__(self, executor: Executor, deliver: Callable[[Callable[[], None]], None]) -> None:
        self._executor = executor
        self._deliver = deliver

    def __call__(self, work: Callable[[], _T]) -> Deferred[_T]:
        d: Deferred[_T] = Deferred()
        deliver = self._deliver

        def job() -> None:
            try:
                result = work()
            except BaseException:
                failure = Failure()
                deliver(lambda: d.errback(failure))
            else:
                deliver(lambda: d.callback(result))

        self._executor.submit(job)
        return d
