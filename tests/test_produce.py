"""
Tests for L{mailfw.queue._produce}: bodies written to a consumer as a
streaming producer, with reads off the reactor thread, and the SQLite
queue's large bodies produced from its real reader thread.
"""

from __future__ import annotations

import io
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailfw.delivery._contract import ReadOnCallingThread, TrackingBody, runInOtherThread
from mailfw.delivery._stream import DotStuffingConsumer, setNoDelay
from mailfw.queue import _sqlite
from mailfw.queue._contract import makeEnvelope
from mailfw.queue._memory import MemoryBody
from mailfw.queue._produce import (
    CHUNK_SIZE,
    ProducerStopped,
    collect,
    produceBytes,
    produceFromFile,
)
from mailfw.queue._sqlite import SQLiteQueue, ThreadExecutor
from mailfw.testing import FullTransport

_T = TypeVar("_T")


class ManualRunner:
    """
    A thread runner whose work runs only when the test says so, so that
    what is in flight at each moment can be seen.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, work: Callable[[], _T]) -> Deferred[_T]:
        d: Deferred[_T] = Deferred()
        self.pending.append((work, d))
        return d

    def runOne(self) -> None:
        work, d = self.pending.pop(0)
        try:
            result = work()
        except BaseException:
            d.errback(Failure())
        else:
            d.callback(result)

    def runAll(self, limit: int = 10_000) -> None:
        for _ in range(limit):
            if not self.pending:
                return
            self.runOne()
        raise AssertionError("the runner never ran dry")


class Reader(io.BytesIO):
    """
    A reader that records the size of each read, and can fail.
    """

    def __init__(self, data: bytes, failAfter: int | None = None) -> None:
        super().__init__(data)
        self.reads = 0
        self.failAfter = failAfter

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        if self.failAfter is not None and self.reads > self.failAfter:
            raise OSError(5, "Input/output error")
        return super().read(size)


DATA = bytes(range(256)) * 1000  # 256000 octets: four chunks of 64 KiB


class ProduceFromFileTests(SynchronousTestCase):
    """
    L{produceFromFile} writes what a reader holds, reading in the runner.
    """

    def setUp(self) -> None:
        self.runner = ManualRunner()
        self.transport = FullTransport()
        self.transport.full = False
        self.reader = Reader(DATA)

    def produce(self, reader: Reader | None = None) -> Deferred[None]:
        chosen = reader or self.reader
        return produceFromFile(lambda: chosen, self.transport, self.runner)

    def test_writesEverything(self) -> None:
        """
        Every octet arrives in order, the producer is registered as
        streaming while it works and unregistered at the end, and the
        reader is closed (in the runner).
        """
        d = self.produce()
        self.assertIs(self.transport.streaming, True)
        self.assertIsNotNone(self.transport.producer)
        self.runner.runAll()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.transport.value(), DATA)
        self.assertIsNone(self.transport.producer)
        self.assertTrue(self.reader.closed)

    def test_consumerWriteFails(self) -> None:
        """
        A consumer whose C{write} raises ends the production: the result
        fails with that error at once, the producer is unregistered and the
        reader is closed, instead of the delivery hanging or succeeding
        without the body.
        """
        self.transport.write = _brokenWrite  # type: ignore[method-assign]
        d = self.produce()
        self.runner.runAll()
        self.failureResultOf(d, ConnectionError)
        self.assertIsNone(self.transport.producer)
        self.assertTrue(self.reader.closed)

    def test_oneReadInFlight(self) -> None:
        """
        At most one read is outstanding at any time, and each is at most
        one chunk.
        """
        d = self.produce()
        for _ in range(len(DATA) // CHUNK_SIZE + 3):
            if not self.runner.pending:
                break
            self.assertEqual(len(self.runner.pending), 1)
            before = len(self.transport.value())
            self.runner.runOne()
            self.assertLessEqual(len(self.transport.value()) - before, CHUNK_SIZE)
        self.runner.runAll()
        self.successResultOf(d)

    def test_pausedProducerReadsAndWritesNothing(self) -> None:
        """
        A consumer that pauses gets no more writes, and no more is read,
        until it resumes.
        """
        self.transport.full = True
        d = self.produce()
        self.runner.runOne()
        self.assertEqual(len(self.transport.value()), CHUNK_SIZE)
        self.assertEqual(self.runner.pending, [])
        self.assertEqual(self.reader.reads, 1)
        self.assertNoResult(d)
        assert self.transport.producer is not None
        self.transport.producer.resumeProducing()
        self.runner.runAll()
        self.assertEqual(len(self.transport.value()), 2 * CHUNK_SIZE)
        self.assertEqual(self.reader.reads, 2)
        self.transport.full = False
        self.transport.producer.resumeProducing()
        self.runner.runAll()
        self.successResultOf(d)
        self.assertEqual(self.transport.value(), DATA)

    def test_pauseWhileReading(self) -> None:
        """
        A chunk read while the consumer paused is still written (it was
        asked for), but no further read starts until it resumes.
        """
        d = self.produce()
        assert self.transport.producer is not None
        producer = self.transport.producer
        producer.pauseProducing()
        self.runner.runOne()
        self.assertEqual(len(self.transport.value()), CHUNK_SIZE)
        self.assertEqual(self.runner.pending, [])
        producer.resumeProducing()
        producer.resumeProducing()
        self.assertEqual(len(self.runner.pending), 1)
        self.runner.runAll()
        self.successResultOf(d)

    def test_stopProducing(self) -> None:
        """
        A consumer stopping the producer fails the result with
        L{ProducerStopped}; the read in flight is not written, and the
        reader is closed after it.
        """
        d = self.produce()
        self.runner.runOne()
        assert self.transport.producer is not None
        producer = self.transport.producer
        self.assertEqual(len(self.runner.pending), 1)
        producer.stopProducing()
        producer.stopProducing()
        self.failureResultOf(d, ProducerStopped)
        written = len(self.transport.value())
        self.runner.runAll()
        self.assertEqual(len(self.transport.value()), written)
        self.assertTrue(self.reader.closed)
        producer.resumeProducing()
        self.assertEqual(self.runner.pending, [])

    def test_readFails(self) -> None:
        """
        A read error fails the result with it, after the chunks before it
        were written; the producer is unregistered and the reader closed.
        """
        reader = Reader(DATA, failAfter=2)
        d = self.produce(reader)
        self.runner.runAll()
        self.failureResultOf(d, OSError)
        self.assertEqual(len(self.transport.value()), 2 * CHUNK_SIZE)
        self.assertIsNone(self.transport.producer)
        self.assertTrue(reader.closed)

    def test_openFails(self) -> None:
        """
        An opener that raises fails the result with its exception.
        """

        def opener() -> io.BytesIO:
            raise OSError(2, "No such file")

        d = produceFromFile(opener, self.transport, self.runner)
        self.runner.runAll()
        self.failureResultOf(d, OSError)
        self.assertEqual(self.transport.value(), b"")
        self.assertIsNone(self.transport.producer)

    def test_immediateRunnerDoesNotRecurse(self) -> None:
        """
        With a runner that answers at once, a long body does not grow the
        stack one level per chunk (it would overflow it).
        """
        data = b"x" * (3000 * 16)
        reader = Reader(data)
        d = produceFromFile(lambda: reader, self.transport, runInOtherThread, chunkSize=16)
        self.successResultOf(d)
        self.assertEqual(self.transport.value(), data)


def _brokenWrite(data: bytes) -> None:
    raise ConnectionError("the consumer is gone")


class ProduceBytesTests(SynchronousTestCase):
    """
    L{produceBytes} writes bytes from memory, honouring pauses.
    """

    def test_pausedGetsNoWrites(self) -> None:
        """
        Each write pauses a full transport; nothing more comes until it
        resumes, and then one chunk.
        """
        transport = FullTransport()
        d = produceBytes(DATA, transport)
        self.assertEqual(len(transport.value()), CHUNK_SIZE)
        self.assertNoResult(d)
        assert transport.producer is not None
        transport.producer.resumeProducing()
        self.assertEqual(len(transport.value()), 2 * CHUNK_SIZE)
        transport.drain()
        self.successResultOf(d)
        self.assertEqual(transport.value(), DATA)

    def test_consumerWriteFails(self) -> None:
        """
        A consumer whose C{write} raises fails the result; nothing is raised
        into the caller.
        """
        transport = FullTransport()
        transport.write = _brokenWrite  # type: ignore[method-assign]
        d = produceBytes(DATA, transport)
        self.failureResultOf(d, ConnectionError)
        self.assertIsNone(transport.producer)

    def test_stopped(self) -> None:
        """
        Stopping fails the result with L{ProducerStopped} and writes no more.
        """
        transport = FullTransport()
        d = produceBytes(DATA, transport)
        assert transport.producer is not None
        transport.producer.stopProducing()
        transport.producer.resumeProducing()
        self.failureResultOf(d, ProducerStopped)
        self.assertEqual(len(transport.value()), CHUNK_SIZE)

    def test_empty(self) -> None:
        """
        An empty body finishes at once, writing nothing.
        """
        transport = FullTransport()
        self.successResultOf(produceBytes(b"", transport))
        self.assertEqual((transport.value(), transport.producer), (b"", None))


class CollectTests(SynchronousTestCase):
    """
    L{collect} gathers what a body produces, or a bounded prefix.
    """

    def test_whole(self) -> None:
        self.assertEqual(self.successResultOf(collect(MemoryBody(DATA).produce)), DATA)

    def test_prefixStopsReading(self) -> None:
        """
        With a limit, only that many octets are kept and the body is read
        no further.
        """
        body = TrackingBody(DATA)
        self.assertEqual(self.successResultOf(collect(body.produce, 1000)), DATA[:1000])
        [reader] = body.readers
        self.assertEqual(reader.bytesRead, CHUNK_SIZE)
        self.assertTrue(reader.closed)

    def test_failure(self) -> None:
        """
        A failing body fails the collection.
        """
        body = TrackingBody(DATA, forbiddenThread=-1)
        body.open = lambda: Reader(DATA, failAfter=0)  # type: ignore[method-assign]
        self.failureResultOf(collect(body.produce), OSError)


class TrackingBodyTests(SynchronousTestCase):
    """
    The contract kit's body notices reads on the test's thread.
    """

    def test_refusesTheCallingThread(self) -> None:
        body = TrackingBody()
        self.assertRaises(ReadOnCallingThread, body.open)
        self.assertEqual(body.violations, ["open"])

    def test_producesFromAnotherThread(self) -> None:
        body = TrackingBody()
        self.assertEqual(self.successResultOf(collect(body.produce)), body.data)
        self.assertEqual(body.violations, [])
        self.assertNotIn(threading.get_ident(), body.readThreads)


class DotStuffingConsumerTests(SynchronousTestCase):
    """
    L{DotStuffingConsumer} stuffs, and sends the end of data with the last
    chunk.
    """

    def test_endWithLastChunk(self) -> None:
        transport = FullTransport()
        transport.full = False
        writes: list[bytes] = []
        transport.write = writes.append  # type: ignore[method-assign, assignment]
        consumer = DotStuffingConsumer(transport)
        consumer.write(b"a\r\n.b\r\n")
        self.assertEqual(writes, [])
        consumer.write(b".c")
        self.assertEqual(writes, [b"a\r\n..b\r\n"])
        consumer.finish()
        self.assertEqual(writes, [b"a\r\n..b\r\n", b"..c\r\n.\r\n"])

    def test_stopProducer(self) -> None:
        """
        L{DotStuffingConsumer.stopProducer} stops and unregisters the body's
        producer.
        """
        transport = FullTransport()
        consumer = DotStuffingConsumer(transport)
        d = produceBytes(DATA, consumer)
        self.assertIsNotNone(transport.producer)
        consumer.stopProducer()
        self.failureResultOf(d, ProducerStopped)
        self.assertIsNone(transport.producer)

    def test_setNoDelay(self) -> None:
        """
        L{setNoDelay} turns Nagle off where the transport can, and leaves
        transports without it (or refusing it) alone.
        """
        calls: list[bool] = []

        class TCP:
            def setTcpNoDelay(self, enabled: bool) -> None:
                calls.append(enabled)

        class UNIX:
            def setTcpNoDelay(self, enabled: bool) -> None:
                raise OSError(95, "Operation not supported")

        setNoDelay(TCP())
        setNoDelay(UNIX())
        setNoDelay(object())
        self.assertEqual(calls, [True])


class SQLiteBodyThreadTests(SynchronousTestCase):
    """
    A large SQLite body is opened and read in the queue's real reader
    thread, never on the thread that asked for it (the reactor's).
    """

    def setUp(self) -> None:
        self.path = Path(self.mktemp()) / "queue.sqlite"
        self.path.parent.mkdir()
        self.calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.executors = [ThreadExecutor(f"test-{n}") for n in ("writer", "reader", "spool")]
        self.queue = SQLiteQueue(
            self.path,
            Clock(),
            writer=self.executors[0],
            reader=self.executors[1],
            spool=self.executors[2],
            deliver=self.calls.put,
            spillThreshold=4096,
        )
        self.addCleanup(self.stopThreads)

    def stopThreads(self) -> None:
        self.wait(self.queue.close())
        for executor in self.executors:
            executor.stop()
            self.assertTrue(executor.join(10))

    def wait(self, d: Deferred[_T]) -> _T:
        """
        Run the calls the queue's threads hand to this (the "reactor")
        thread until C{d} fires, for at most 10 seconds.
        """
        done: list[bool] = []

        def finished(result: object) -> object:
            done.append(True)
            return result

        d.addBoth(finished)
        deadline = time.monotonic() + 10
        while not done:
            try:
                f = self.calls.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.fail("the queue's threads did not answer within 10 s")
            f()
        return self.successResultOf(d)

    def test_readsInTheReaderThread(self) -> None:
        message = b"Subject: big\r\n\r\n" + b"0123456789abcde\n" * 40_000
        incoming = self.queue.receive(makeEnvelope("a@example.com"))
        incoming.write(message)
        queueID = self.wait(incoming.commit())
        # Not from the cache of recent small bodies: from the database.
        recent = self.queue._recent
        assert recent is not None
        recent.discard(queueID)
        body = self.wait(self.queue.openBody(queueID))
        self.assertIsInstance(body, _sqlite._BlobBody)

        threads: list[tuple[str, int]] = []
        connect, readinto = _sqlite.connect, _sqlite._BlobReader.readinto

        def recordingConnect(path: Path) -> Any:
            threads.append(("connect", threading.get_ident()))
            return connect(path)

        def recordingReadinto(reader: Any, buffer: Any) -> int:
            threads.append(("read", threading.get_ident()))
            return readinto(reader, buffer)

        self.patch(_sqlite, "connect", recordingConnect)
        self.patch(_sqlite._BlobReader, "readinto", recordingReadinto)
        transport = FullTransport()
        d = body.produce(transport)
        for _ in range(1000):
            # A job after the read in flight: once it answers, so has the read.
            self.wait(self.queue.nextDue())
            if transport.producer is None:
                break
            transport.producer.resumeProducing()
        self.wait(d)
        self.assertEqual(transport.value(), message)
        self.assertEqual({what for what, _ in threads}, {"connect", "read"})
        here = threading.get_ident()
        self.assertEqual([what for what, ident in threads if ident == here], [])


class PostgresBodyThreadTests(SynchronousTestCase):
    """
    A large PostgreSQL body (copied to a temporary file) is read in the
    queue's spool thread, never on the thread that asked for it.
    """

    def test_readsInTheSpoolThread(self) -> None:
        from mailfw.queue import _io
        from tests.test_queue_postgres import PostgresHelpers

        helpers = PostgresHelpers()
        helpers.startDatabase(self)
        q = helpers.newQueue(Clock())
        message = b"Subject: big\r\n\r\n" + b"0123456789abcde\n" * 20_000
        incoming = q.receive(makeEnvelope("a@example.com"))
        incoming.write(message)
        queueID = helpers.wait(incoming.commit())
        body = helpers.wait(q.openBody(queueID))
        self.assertIsInstance(body, _io.FileBody)

        threads: list[int] = []
        readinto = _io._FileReader.readinto

        def recordingReadinto(reader: Any, buffer: Any) -> int:
            threads.append(threading.get_ident())
            return readinto(reader, buffer)

        self.patch(_io._FileReader, "readinto", recordingReadinto)
        transport = FullTransport()
        transport.full = False
        helpers.wait(body.produce(transport))
        self.assertEqual(transport.value(), message)
        self.assertNotEqual(threads, [])
        self.assertNotIn(threading.get_ident(), threads)
